"""Write the run directories that tests/test_train.py resumes to check that checkpoints of an
earlier gradreg still load. Run it with the *earlier* gradreg on the path, e.g.

    PYTHONPATH=/path/to/old/gradreg/src python tests/data/legacy_checkpoints/make.py

Each run is one epoch of a two-epoch training (stopped after epoch 1), tiny on purpose: the
digits data set, an MLP with 8 hidden units, batch 512."""
from __future__ import annotations

import shutil
from pathlib import Path

from gradreg.config import TrainConfig
from gradreg.trainer import train

HERE = Path(__file__).resolve().parent
# methods whose penalty state (or its absence) changed shape in the refactoring
METHODS = {"gn": {}, "sgr": {"source": "sign"}, "opnorm": {"warm_start": True}, "snr": {}}


def config(method: str, out: Path) -> TrainConfig:
    return TrainConfig(data="digits", model="mlp", model_params={"hidden": [8]}, method=method,
                       penalty=dict(METHODS[method]), epochs=2, batch_size=512, seed=0, quiet=True, out=str(out))


def main() -> None:
    for method in METHODS:
        out = HERE / method
        shutil.rmtree(out, ignore_errors=True)
        train(config(method, out), stop_after_epoch=1, log=lambda s: None)
        for extra in ("log.csv", "config.json", "checkpoint.prev.safetensors"):
            (out / extra).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
