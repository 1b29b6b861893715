"""Reading a run directory back: the trained model, its configuration, its data."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import data, models
from .data.augment import attach_standardization
from .devices import resolve_device


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


@dataclass
class ExternalModel:
    """A model that is not a gradreg run (``--model``), with the data it is evaluated on.
    Quacks like :class:`LoadedRun` for the evaluation commands."""

    name: str
    model: nn.Module  # eval mode, on ``device``
    data_spec: str
    device: torch.device
    input_shape: tuple[int, int, int] | None = None
    bounds: tuple[float, float] | None = None
    num_classes: int | None = None
    path: Path | None = None

    @property
    def train_config(self) -> dict[str, Any]:
        return {"data": self.data_spec}

    @property
    def config(self) -> dict[str, Any]:
        return {"config": self.train_config, "model": self.name}

    def data(self, *, data_dir: str | None = None) -> data.DataBundle:
        """The test data, checked against the declared input shape, classes and bounds."""
        bundle = data.load(self.data_spec, data_dir=data_dir, download=False)
        if self.input_shape is not None and bundle.in_shape != self.input_shape:
            raise ValueError(f"data {bundle.name!r} has inputs of shape {bundle.in_shape}, "
                             f"--input-shape says {self.input_shape}")
        if self.num_classes is not None:
            if bundle.num_classes > self.num_classes:
                raise ValueError(f"data {bundle.name!r} has {bundle.num_classes} classes, "
                                 f"--num-classes says {self.num_classes}")
            bundle = replace(bundle, num_classes=self.num_classes)
        if self.bounds is not None and tuple(bundle.bounds) != self.bounds:
            bundle = replace(bundle, bounds=self.bounds)  # __post_init__ checks the data lies inside
        return bundle


def parse_shape(text: str | None) -> tuple[int, int, int] | None:
    """``"3,32,32"`` or ``"3x32x32"`` → (3, 32, 32)."""
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").replace("×", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--input-shape expects C,H,W (e.g. 3,32,32), got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--input-shape expects three positive sizes C,H,W, got {text!r}")
    return shape  # length checked above


def parse_bounds(text: str | None) -> tuple[float, float] | None:
    """``"0,1"`` → (0.0, 1.0); lo < hi."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--bounds expects LO,HI (e.g. 0,1), got {text!r}") from None
    if not lo < hi:
        raise ValueError(f"--bounds needs LO < HI, got {text!r}")
    return lo, hi


def external_model(spec: str, *, params: dict[str, Any] | None = None, weights: str | None = None,
                   data_spec: str | None = None, input_shape: tuple[int, int, int] | None = None,
                   bounds: tuple[float, float] | None = None, num_classes: int | None = None,
                   device: str = "auto", threat_model: str = "Linf", dataset: str = "cifar10",
                   model_dir: str = "models") -> ExternalModel:
    """Build ``spec`` (``package.module:factory``, a registered name or ``robustbench:NAME``),
    load ``weights`` into it and pair it with its test data."""
    from .loading import LoadError, build_model, load_state, read_state_dict, robustbench_model

    if num_classes is not None and num_classes < 2:
        raise LoadError(f"--num-classes must be ≥ 2, got {num_classes}")
    if spec.startswith("robustbench:"):
        rb_name = spec.split(":", 1)[1]
        if weights or params:
            raise LoadError("a RobustBench model takes no --weights or --model-param (its file lives in --model-dir)")
        model = robustbench_model(rb_name, model_dir=model_dir, dataset=dataset, threat_model=threat_model)
        name, data_spec = rb_name, data_spec or dataset
    else:
        if data_spec is None:
            raise LoadError("--model needs --data: the test data to evaluate it on")
        model = build_model(spec, params, in_shape=input_shape, num_classes=num_classes)
        if weights is None:
            raise LoadError(f"--model {spec} needs --weights FILE (.safetensors, .pt or .pth)")
        load_state(model, read_state_dict(weights), source=f"weights in {weights}")
        name = Path(weights).stem
    dev = resolve_device(device)
    model.to(dev).eval()
    return ExternalModel(name=name, model=model, data_spec=data_spec, device=dev, input_shape=input_shape,
                         bounds=bounds, num_classes=num_classes, path=Path(weights) if weights else None)
