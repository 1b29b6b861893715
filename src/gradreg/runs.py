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
    # test data named on the command line (--data) instead of the run's own: used whole
    data_override: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def train_config(self) -> dict[str, Any]:
        return self.config["config"]

    @property
    def data_spec(self) -> str:
        """The data it is evaluated on: ``--data`` when given, else the data it was trained on."""
        return self.data_override or self.train_config["data"]

    def data(self, *, data_dir: str | None = None) -> data.DataBundle:
        if self.data_override:
            bundle = eval_data(self.data_override, data_dir=data_dir)
        else:
            cfg = self.train_config
            bundle = data.load(run_data_spec(cfg["data"], self.path), data_dir=data_dir or cfg.get("data_dir"),
                               download=False)
        check_model_fits(self.model, bundle, name=self.name)
        return bundle


def run_data_spec(spec: str, run_dir: Path) -> str:
    """A run's data as recorded; a relative file or folder (recorded by older versions) is
    looked for from the current folder, then beside the run directory."""
    if spec in data.DATASETS or not data.external.is_path_spec(spec) or Path(spec).is_absolute() or Path(spec).exists():
        return spec
    for base in (run_dir.parent, run_dir.parent.parent):
        if (base / spec).exists():
            return str((base / spec).resolve())
    return spec


def eval_data(spec: str, *, data_dir: str | None = None) -> data.DataBundle:
    """Test data named for an evaluation: a registered set's test split, or an external source
    used whole (a labelled file or folder without its own split is all test data)."""
    return data.load_test(spec, data_dir=data_dir)


def check_model_fits(model: nn.Module, bundle: data.DataBundle, *, name: str) -> None:
    """One forward pass on one test input, so a model that cannot take the data fails in one
    line before any attack runs (not deep inside one)."""
    if not len(bundle.test_y):
        raise ValueError(f"data {bundle.name!r} has no test points")
    param = next(iter(model.parameters()), None)
    x = bundle.test_x[:1].to(param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()  # one input through BatchNorm in train mode would fail for another reason
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model {name} does not take the inputs of data {bundle.name!r} (shape "
                         f"{tuple(bundle.in_shape)}, C,H,W): {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < bundle.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {name} returns {shape} for one input of data {bundle.name!r}; expected "
                         f"(1, K) logits with K ≥ {bundle.num_classes} classes")


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
    if ":" in spec["name"]:  # a user's factory (gradreg.loading)
        from .loading import rebuild_factory_model

        model = rebuild_factory_model(spec, run=str(path))
    else:
        params = dict(spec["params"])
        params["in_shape"] = tuple(params["in_shape"])
        model = models.make(spec["name"], **params)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise NotARunError(f"{weights} cannot be read ({err})") from None
    from .loading import load_state

    load_state(model, state, source=f"weights in {weights}")
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
    bundle: data.DataBundle | None = None  # the checked test data, read once

    @property
    def train_config(self) -> dict[str, Any]:
        return {"data": self.data_spec}

    @property
    def config(self) -> dict[str, Any]:
        return {"config": self.train_config, "model": self.name}

    def data(self, *, data_dir: str | None = None) -> data.DataBundle:
        """The test data, checked against the declared input shape, classes and bounds."""
        if self.bundle is not None:
            return self.bundle
        bundle = checked_data(self.data_spec, data_dir=data_dir, input_shape=self.input_shape, bounds=self.bounds,
                              num_classes=self.num_classes)
        check_model_fits(self.model, bundle, name=self.name)
        self.bundle = bundle
        return bundle


def checked_data(spec: str, *, data_dir: str | None, input_shape: tuple[int, int, int] | None,
                 bounds: tuple[float, float] | None, num_classes: int | None) -> data.DataBundle:
    """Test data for ``--model``, checked against ``--input-shape``, ``--num-classes``, ``--bounds``."""
    bundle = eval_data(spec, data_dir=data_dir)
    if input_shape is not None and bundle.in_shape != input_shape:
        raise ValueError(f"data {bundle.name!r} has inputs of shape {bundle.in_shape}, "
                         f"--input-shape says {input_shape}")
    if num_classes is not None:
        if bundle.num_classes > num_classes:
            raise ValueError(f"data {bundle.name!r} has {bundle.num_classes} classes, "
                             f"--num-classes says {num_classes}")
        bundle = replace(bundle, num_classes=num_classes)
    if bounds is not None and tuple(bundle.bounds) != bounds:
        check_bounds(bundle, bounds)
        bundle = replace(bundle, bounds=bounds)  # __post_init__ checks the data lies inside
    return bundle


def check_bounds(bundle: data.DataBundle, bounds: tuple[float, float]) -> None:
    """Refuse ``--bounds`` far wider than the data (our choice: more than 10× its range, e.g.
    0,255 on pixels in [0, 1]): ε and the attacks' clipping would be in other units than the
    data, and every attack would be meaningless."""
    lo, hi = (float(bundle.test_x.min()), float(bundle.test_x.max())) if len(bundle.test_y) else bundle.bounds
    span = hi - lo if hi > lo else float(bundle.bounds[1] - bundle.bounds[0])  # constant images: the data's bounds
    if bounds[1] - bounds[0] > 10 * span:
        raise ValueError(f"--bounds {bounds[0]:g},{bounds[1]:g} is far wider than the data, whose values lie in "
                         f"[{lo:g}, {hi:g}]: inputs and ε must be in the same units (gradreg reads 8-bit images "
                         f"as [0, 1]; put any other scaling inside the model)")


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
                   model_dir: str = "models", data_dir: str | None = None) -> ExternalModel:
    """Build ``spec`` (``package.module:factory``, ``file.py:factory``, a registered name or
    ``robustbench:NAME``), load ``weights`` into it and pair it with its test data; the input
    shape and classes the model is built for default to the data's."""
    from .loading import LoadError, build_model, load_state, read_state_dict, robustbench_model

    if num_classes is not None and num_classes < 2:
        raise LoadError(f"--num-classes must be ≥ 2, got {num_classes}")
    bundle = None
    if spec.startswith("robustbench:"):
        rb_name = spec.split(":", 1)[1]
        if weights or params:
            raise LoadError("a RobustBench model takes no --weights or --model-param (its file lives in --model-dir)")
        model = robustbench_model(rb_name, model_dir=model_dir, dataset=dataset, threat_model=threat_model)
        name, data_spec = rb_name, data_spec or dataset
    else:
        if data_spec is None:
            raise LoadError("--model needs --data: the test data to evaluate it on")
        if weights is None:
            raise LoadError(f"--model {spec} needs --weights FILE (.safetensors, .pt or .pth)")
        state = read_state_dict(weights)  # a bad file fails before the data is read
        bundle = checked_data(data_spec, data_dir=data_dir, input_shape=input_shape, bounds=bounds,
                              num_classes=num_classes)
        model = build_model(spec, params, in_shape=input_shape or bundle.in_shape,
                            num_classes=num_classes or bundle.num_classes)
        try:
            load_state(model, state, source=f"weights in {weights}")
        except LoadError as err:
            if input_shape is not None and num_classes is not None:
                raise
            raise LoadError(f"{err} (it was built for the data's inputs {bundle.in_shape} and {bundle.num_classes} "
                            f"classes: give --input-shape or --num-classes if the model has others)") from None
        name = Path(weights).stem
    dev = resolve_device(device)
    model.to(dev).eval()
    ext = ExternalModel(name=name, model=model, data_spec=data_spec, device=dev, input_shape=input_shape,
                        bounds=bounds, num_classes=num_classes, path=Path(weights) if weights else None)
    if bundle is not None:
        check_model_fits(model, bundle, name=name)
        ext.bundle = bundle
    return ext
