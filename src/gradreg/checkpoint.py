"""Exact, atomic, checksummed training state in one safetensors file.

Tensors (model, optimizer moments, penalty state, RNG states) are stored as safetensors;
everything else (epoch, step, optimizer hyper-parameters, history) is JSON in the file's
metadata. gradreg never unpickles: a checkpoint can be opened safely whatever its origin.

Writes go to a temporary file that is flushed, fsynced and renamed over the old one, so a
run killed at any moment leaves either the old or the new checkpoint, never half of one. The
previous good checkpoint is kept beside it; a SHA-256 over the contents detects corruption,
and :func:`load_latest` falls back to the previous file.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CURRENT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (truncated, corrupted, or from another format)."""


def _digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    h = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": rest["param_groups"]}


def save(path: Path, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    """Atomically write ``groups`` (name → tensors) and ``meta`` to ``path``; the file already
    there becomes the previous checkpoint."""
    tensors = {f"{g}/{k}": v.detach().cpu().contiguous().clone() for g, d in groups.items() for k, v in d.items()}
    meta_json = json.dumps(meta, sort_keys=True)
    metadata = {"gradreg": meta_json, "sha256": _digest(tensors, meta_json)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as fh:  # make the bytes durable before the rename publishes them
        os.fsync(fh.fileno())
    if path.exists():
        os.replace(path, path.with_name(PREVIOUS) if path.name == CURRENT else path.with_name(path.name + ".prev"))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read and verify a checkpoint; raises :class:`CheckpointError` with the reason."""
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({err}); it is truncated or not a gradreg checkpoint") from None
    meta_json = metadata.get("gradreg")
    if meta_json is None or metadata.get("sha256") != _digest(tensors, meta_json):
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 check: the file is corrupted")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        g, name = key.split("/", 1)
        groups.setdefault(g, {})[name] = value
    return groups, json.loads(meta_json)


def load_latest(folder: Path, *, warn: Callable[[str], object] = print
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that passes its check (current, else previous);
    None when there is none. A bad current file is reported through ``warn``."""
    current, previous = folder / CURRENT, folder / PREVIOUS
    if current.exists():
        try:
            return load(current)
        except CheckpointError as err:
            if not previous.exists():
                raise
            warn(f"warning: {err}; using the previous checkpoint {previous.name}")
    if previous.exists():
        return load(previous)
    return None
