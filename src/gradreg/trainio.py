"""The training loop's I/O, beside the loop (:mod:`gradreg.trainer`): weights from files, run metadata, the CSV log and the signal guard."""
from __future__ import annotations

import csv
import platform
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .version import __version__

from .monitor import FIELDS as MONITOR_FIELDS

# the monitor's columns are empty in the rows of a run (or of epochs) without checks
LOG_FIELDS = ("epoch", "step", "lr", "train_loss", "train_accuracy", "test_accuracy", "epoch_seconds", *MONITOR_FIELDS)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
    return {"gradreg": __version__, "torch": torch.__version__, "python": platform.python_version()}


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict from ``.safetensors`` or a foreign ``.pt``/``.pth`` file. Foreign files
    are read with ``torch.load(weights_only=True)``, which refuses pickled code: gradreg never
    unpickles arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{p} is not a readable safetensors file ({err})") from None
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling refusal is reported the same way
            raise ValueError(f"{p} cannot be loaded as plain weights ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{p} does not hold a state dict of tensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"weights in {p} do not fit the model: {str(err).splitlines()[0]}") from None


def write_log(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """The per-epoch history as CSV (:data:`LOG_FIELDS`)."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


TENSORBOARD_HINT = "pip install gradreg[tensorboard]"


def check_tensorboard() -> None:
    """``--log tensorboard`` fails at once, in one line, when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports tensorboard)
    except ImportError:
        raise ValueError(f"--log tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from None


class TensorBoardLog:
    """Per-epoch scalars in TensorBoard's event format: the fields of the CSV log
    (:data:`LOG_FIELDS`) under their own names, one point per epoch (step = epoch number). A
    resumed run appends a new event file to the same folder; TensorBoard merges them."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, row: dict[str, Any]) -> None:
        for name in LOG_FIELDS:
            if name != "epoch" and row.get(name) is not None:
                self.writer.add_scalar(name, float(row[name]), global_step=int(row["epoch"]))
        self.writer.flush()  # an epoch's point is on disk when the epoch's checkpoint is

    def close(self) -> None:
        self.writer.close()


@contextmanager
def interrupt_guard() -> Iterator[dict[str, bool]]:
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a stop never lands in the
    middle of an optimizer update and the loop can checkpoint before exiting."""
    flag = {"stop": False}
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:  # a second signal: give up at once
            raise KeyboardInterrupt
        flag["stop"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
