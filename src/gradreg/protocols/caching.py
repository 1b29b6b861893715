"""What makes a long evaluation resumable: a fingerprint of the model, atomic JSON writes, the key
of a whole evaluation and AutoAttack's per-batch cache (:func:`resumable_flags`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..attacks.base import Attack
from ..data import DataBundle
from ..judge import evaluate_attack, sharded_outcomes
from ..threat import ThreatModel
from .settings import EvalSettings, bits

def fingerprint(model: nn.Module) -> str:
    """A short hash of the model's parameters and buffers (a resumed run must be the same model)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        # reshape(-1) first: a 0-dim tensor (BatchNorm's int64 num_batches_tracked) cannot be
        # viewed as bytes; for any other tensor the bytes, and so the hash, are unchanged
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename, so that an interrupt
    leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)


def resumable_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, threat: ThreatModel,
                    eps: float, settings: EvalSettings, *, cache: Path | None, key: dict[str, Any]) -> torch.Tensor:
    """Robust flags ``(N,)`` at one ε, batch by batch; with ``cache`` every finished batch is
    written to that JSON file at once and skipped when the evaluation is run again with the same
    ``key`` (model fingerprint, ε, attack settings, points, batch size). Under torch.distributed
    the batches are sharded as :func:`gradreg.judge.sharded_outcomes` and nothing is cached."""
    if cache is None or distributed.rank_world()[1] > 1:
        return sharded_outcomes(model, x, y, attack, threat, [eps], batch_size=settings.batch_size)[0][0]
    bs = settings.batch_size
    done: dict[str, str] = {}
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            done = saved["batches"] if saved.get("key") == key else {}
        except (ValueError, KeyError, TypeError):  # a torn or foreign file: start afresh
            done = {}
    out = torch.zeros(len(y), dtype=torch.bool)
    for i in range(0, len(y), bs):
        part = done.get(str(i))
        if part is None or len(part) != len(y[i:i + bs]):
            rep = evaluate_attack(model, x[i:i + bs], y[i:i + bs], attack, threat, [eps], batch_size=bs,
                                  progress=False)
            part = bits(rep.robust[0])
            done[str(i)] = part
            write_json_atomic(cache, {"key": key, "batches": done})
        out[i:i + len(part)] = torch.tensor([c == "1" for c in part])
    return out


def evaluation_key(model: nn.Module, bundle: DataBundle, settings: EvalSettings, name: str) -> dict[str, Any]:
    """What an evaluation depends on: the model's weights, the data and every setting (the
    AutoAttack cache folder aside: where batches are kept does not change what they hold)."""
    fields = {k: v for k, v in vars(settings).items() if k != "aa_cache"}
    if not fields.get("aa_after_pgd"):  # added later: at its default it stays out, so earlier evaluations are reused
        fields.pop("aa_after_pgd", None)
    fields["attacks"] = list(fields["attacks"])
    test_fp = hashlib.sha256(bundle.test_x.contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"model": fingerprint(model), "data": bundle.name, "test": test_fp, "name": name,
            "settings": json.loads(json.dumps(fields, default=str))}


