"""Reading a run directory back: the trained model, its configuration, its data."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import data, models
from .data.augment import attach_standardization
from .train import resolve_device


class NotARunError(ValueError):
    """A directory that does not hold a finished gradreg run."""


@dataclass
class LoadedRun:
    path: Path
    model: nn.Module  # eval mode, on ``device``
    config: dict[str, Any]  # the whole config.json
    metrics: dict[str, Any]
    device: torch.device

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def train_config(self) -> dict[str, Any]:
        return self.config["config"]

    def data(self, *, data_dir: str | None = None) -> data.DataBundle:
        cfg = self.train_config
        return data.load(cfg["data"], data_dir=data_dir or cfg.get("data_dir"), download=False)


def load_run(run_dir: str | Path, *, device: str = "auto") -> LoadedRun:
    """Rebuild the model of a finished run from ``config.json`` and ``model.safetensors``."""
    path = Path(run_dir)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not path.is_dir():
        raise NotARunError(f"{path} is not a directory")
    if not cfg_file.is_file() or not weights.is_file():
        raise NotARunError(f"{path} is not a finished gradreg run (expected config.json and model.safetensors)")
    try:
        config = json.loads(cfg_file.read_text())
        spec = config["resolved"]["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise NotARunError(f"{cfg_file} is not a gradreg run configuration ({err})") from None
    params = dict(spec["params"])
    params["in_shape"] = tuple(params["in_shape"])
    model = models.make(spec["name"], **params)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise NotARunError(f"{weights} cannot be read ({err})") from None
    model.load_state_dict(state)
    attach_standardization(model, config.get("config", {}).get("standardize", "none"))  # part of the model
    dev = resolve_device(device)
    model.to(dev).eval()
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return LoadedRun(path=path, model=model, config=config, metrics=metrics, device=dev)
