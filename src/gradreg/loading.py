"""Models and weights from anywhere: ``package.module:factory`` specs, foreign checkpoints,
RobustBench model ids.

- :func:`import_object` resolves ``package.module:attr`` (dots after the colon walk attributes).
- :func:`read_state_dict` reads ``.safetensors``, or ``.pt``/``.pth`` with
  ``torch.load(weights_only=True)`` (never unpickles code), finds a state dict nested under a
  common key (``state_dict``, ``model``, ``model_state_dict``, ``net``, ``state``, …) and strips
  ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes.
- :func:`load_state` loads it strictly, except that missing input-normalization buffers
  (``mu``/``sigma``, ``normalize.mean``/``normalize.std``) keep the model's own values
  (our choice: many published checkpoints normalize outside the saved module).
- :func:`build_model` builds a registered model name or a ``package.module:factory``.
- :func:`robustbench_model` loads a RobustBench model id through the ``robustbench`` package
  when it is installed, otherwise from a local checkpoint ``DIR/dataset/threat/NAME.pt`` for
  the ids whose architecture gradreg has (:data:`ROBUSTBENCH_ARCHS`).
"""
from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "state", "ema", "params")
PREFIXES = ("module.", "_orig_mod.")
NORMALIZATION_KEYS = ("mu", "sigma", "normalize.mean", "normalize.std")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes in torch's messages

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

# RobustBench id → (gradreg model, parameters); from RobustBench's model zoo (CIFAR-10). Ids
# with other architectures need the robustbench package.
ROBUSTBENCH_ARCHS: dict[tuple[str, str], dict[str, tuple[str, dict[str, Any]]]] = {
    ("cifar10", "Linf"): {
        "Standard": ("wrn", {"depth": 28, "widen_factor": 10}),
        "Wong2020Fast": ("preact-resnet18", {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}),
        "Andriushchenko2020Understanding": ("preact-resnet18", {}),
        "Carmon2019Unlabeled": ("wrn", {"depth": 28, "widen_factor": 10, "sub_block1": True}),
        "Sehwag2020Hydra": ("wrn", {"depth": 28, "widen_factor": 10, "sub_block1": True}),
        "Wang2020Improving": ("wrn", {"depth": 28, "widen_factor": 10, "sub_block1": True}),
        "Zhang2019Theoretically": ("wrn", {"depth": 34, "widen_factor": 10, "sub_block1": True}),
        "Huang2020Self": ("wrn", {"depth": 34, "widen_factor": 10, "sub_block1": True}),
        "Zhang2019You": ("wrn", {"depth": 34, "widen_factor": 10, "sub_block1": True}),
        "Zhang2020Attacks": ("wrn", {"depth": 34, "widen_factor": 10, "sub_block1": True}),
        "Wu2020Adversarial_extra": ("wrn", {"depth": 28, "widen_factor": 10, "sub_block1": True}),
        "Wu2020Adversarial": ("wrn", {"depth": 34, "widen_factor": 10}),
        "Sehwag2021Proxy": ("wrn", {"depth": 34, "widen_factor": 10}),
        "Sitawarin2020Improving": ("wrn", {"depth": 34, "widen_factor": 10, "sub_block1": True}),
        "Zhang2020Geometry": ("wrn", {"depth": 28, "widen_factor": 10, "sub_block1": True}),
        "Chen2021LTD_WRN34_10": ("wrn", {"depth": 34, "widen_factor": 10}),
        "Addepalli2022Efficient_WRN_34_10": ("wrn", {"depth": 34, "widen_factor": 10}),
    },
    ("cifar10", "L2"): {
        "Standard": ("wrn", {"depth": 28, "widen_factor": 10}),
        "Wu2020Adversarial": ("wrn", {"depth": 34, "widen_factor": 10}),
        "Sehwag2021Proxy": ("wrn", {"depth": 34, "widen_factor": 10}),
    },
}
THREAT_MODELS = ("Linf", "L2", "corruptions")


class LoadError(ValueError):
    """A model spec, weights file or RobustBench id that cannot be used (one-line message)."""


def _is_file_spec(module_part: str) -> bool:
    """``./nets/mynets.py`` (a path to a Python file), not ``package.module``."""
    return module_part.endswith(".py") or "/" in module_part or "\\" in module_part


def _import_file(path_text: str, spec: str) -> ModuleType:
    """A ``.py`` file imported as a module named after it (a second file of the same name gets
    a suffixed name, so two users' ``nets.py`` never replace each other)."""
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise LoadError(f"cannot import {spec!r}: the file {path} does not exist")
    for module in list(sys.modules.values()):  # imported before: the same module object
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == path:  # type: ignore[arg-type]
            return module
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else \
        f"gradreg_user_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise LoadError(f"cannot import {spec!r}: {path} is not a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec: dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file: report its first line, not a traceback
        del sys.modules[name]
        raise LoadError(f"importing {path} failed ({type(err).__name__}: {_first_line(err)})") from None
    return module


def _import_module(module_name: str, spec: str) -> ModuleType:
    """``importlib.import_module`` with the current folder searched first, as ``python -m``
    does (a user's ``mynets.py`` beside them needs no PYTHONPATH)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise LoadError(f"cannot import {module_name!r} from {spec!r} ({err}; looked in the current folder {cwd} "
                        "and on sys.path; a file elsewhere can be named by its path: path/to/file.py:name)") from None
    except Exception as err:  # noqa: BLE001 - an error inside the user's module: one line
        raise LoadError(f"importing {module_name!r} failed ({type(err).__name__}: {_first_line(err)})") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def split_spec(spec: str) -> tuple[str, str]:
    """``"package.module:attr"`` or ``"path/to/file.py:attr"`` → (module part, attribute part)."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr or (":" in module_part and not _is_file_spec(module_part)):
        raise LoadError(f"expected package.module:name or path/to/file.py:name, got {spec!r}")
    return module_part, attr


def import_object(spec: str) -> Any:
    """``package.module:attr[.attr…]`` or ``path/to/file.py:attr`` → the object. A module is
    looked for in the current folder first (as ``python -m`` does), then on ``sys.path``."""
    module_part, attr = split_spec(spec)
    obj: Any = _import_file(module_part, spec) if _is_file_spec(module_part) else _import_module(module_part, spec)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LoadError(f"module {module_part!r} has no attribute {attr!r}") from None
    return obj


def source_file(spec: str) -> str | None:
    """The absolute path of the file that defines ``spec``'s module (recorded in a run, so the
    model can be rebuilt from another folder)."""
    module_part, _ = split_spec(spec)
    if _is_file_spec(module_part):
        return str(Path(module_part).expanduser().resolve())
    module = sys.modules.get(module_part)
    file = getattr(module, "__file__", None)
    return str(Path(file).resolve()) if file else None


def parse_params(items: Sequence[str], *, flag: str = "--model-param") -> dict[str, Any]:
    """``["depth=16", "mean=(0.5,0.5,0.5)"]`` → dict; values are Python literals, else strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LoadError(f"{flag} expects KEY=VALUE, got {item!r}")
        try:
            params[key.strip().replace("-", "_")] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            params[key.strip().replace("-", "_")] = value.strip()
    return params


def _find_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(4):  # a few levels: {"model": {"state_dict": {...}}}
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors and len(tensors) >= len(obj) - 2:  # a state dict next to e.g. "epoch"
                return tensors
            break
        obj = inner
    raise LoadError(f"{path} does not hold a state dict of tensors (looked under: {', '.join(NESTED_KEYS)})")


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for prefix in PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pt``/``.pth``/``.bin`` (weights only)."""
    p = Path(path)
    if not p.is_file():
        raise LoadError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return strip_prefixes(load_file(str(p)))
        except (SafetensorError, OSError) as err:
            raise LoadError(f"{p} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every refusal (pickled code, corrupt file) reads the same
        text = ANSI.sub("", str(err))
        if "Unsupported global" in text:  # torch's weights-only unpickler met a class: pickled code
            raise LoadError(f"{p} holds pickled Python objects (e.g. a whole model saved with torch.save(model)), "
                            f"which gradreg does not unpickle because that can run any code: save "
                            f"model.state_dict() instead (or use .safetensors) and give the model with --model") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        marker = next((i for i, line in enumerate(lines) if line.startswith("Please file an issue")), None)
        first = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else (lines[0] if lines else "")
        raise LoadError(f"{p} cannot be loaded as plain weights ({type(err).__name__}: {first})") from None
    return strip_prefixes(_find_state(obj, p))


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "weights") -> None:
    """``load_state_dict`` that names the first mismatch in one line; missing normalization
    buffers keep the model's values (module docstring)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in NORMALIZATION_KEYS]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]!r})")
        raise LoadError(f"{source} do not fit the model: {'; '.join(parts)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise LoadError(f"{source} do not fit the model: {k!r} has shape {tuple(v.shape)}, "
                            f"the model's is {tuple(own[k].shape)}")
    model.load_state_dict({**{k: own[k] for k in NORMALIZATION_KEYS if k in own}, **state})


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_model(spec: str, params: Mapping[str, Any] | None = None, *, in_shape: tuple[int, int, int] | None = None,
                num_classes: int | None = None) -> nn.Module:
    """A registered model name (``wrn-28-10``) or a ``package.module:factory`` called with
    ``params``; ``in_shape``/``num_classes`` are passed when the factory takes them."""
    from . import models

    kwargs = dict(params or {})
    if ":" in spec:
        factory = import_object(spec)
        if not callable(factory):
            raise LoadError(f"{spec} is not callable")
    else:
        factory = models.MODELS.get(spec)
    for name, value in (("in_shape", in_shape), ("num_classes", num_classes)):
        if value is not None and name not in kwargs and _accepts(factory, name):
            kwargs[name] = value
    return _call_factory(factory, spec, kwargs)


# Models handed to gradreg.train as Python objects (an nn.Module or a factory), by the spec
# recorded for them: looked up before importing, so objects that no module exports still train.
LIVE_MODELS: dict[str, Callable[..., nn.Module]] = {}


def object_spec(obj: Any) -> str:
    """``module:qualname`` of a factory or of a module's class (what a run records)."""
    target = obj if not isinstance(obj, nn.Module) else type(obj)
    module = getattr(target, "__module__", None) or "__main__"
    return f"{module}:{getattr(target, '__qualname__', type(target).__name__)}"


def build_factory_model(spec: str, params: Mapping[str, Any] | None = None, *, in_shape: tuple[int, int, int] | None,
                        num_classes: int | None) -> tuple[nn.Module, dict[str, Any]]:
    """A user's model for training: the factory ``spec`` (``package.module:name``,
    ``file.py:name`` or an object given to :func:`gradreg.train`) with ``params``, plus
    ``in_shape``/``num_classes`` when it takes them; and the record that rebuilds it
    (``{"name", "params", "file"}``, saved in the run's config.json)."""
    factory = LIVE_MODELS.get(spec)
    live = factory is not None
    if factory is None:
        factory = import_object(spec)
    if not callable(factory):
        raise LoadError(f"{spec} is not callable")
    kwargs = dict(params or {})
    if not live or not isinstance(factory, _Instance):
        for name, value in (("in_shape", in_shape), ("num_classes", num_classes)):
            if value is not None and name not in kwargs and _accepts(factory, name):
                kwargs[name] = value
    model = _call_factory(factory, spec, kwargs)
    record_params = {k: list(v) if k == "in_shape" else v for k, v in kwargs.items()}
    file = None
    if not live:
        file = source_file(spec)
    elif spec.partition(":")[0] in sys.modules:
        file = getattr(sys.modules[spec.partition(":")[0]], "__file__", None)
    return model, {"name": spec, "params": record_params, "file": str(Path(file).resolve()) if file else None}


class _Instance:
    """A ready module handed to gradreg.train, as a factory without parameters."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> nn.Module:
        return self.module


def register_live(model: Any) -> str:
    """Make an ``nn.Module`` or a factory given to :func:`gradreg.train` buildable by spec;
    returns the spec (``module:qualname``, what the run records)."""
    spec = object_spec(model)
    LIVE_MODELS[spec] = _Instance(model) if isinstance(model, nn.Module) else model
    return spec


def rebuild_factory_model(record: Mapping[str, Any], *, run: str) -> nn.Module:
    """The model of a run trained with a user's factory, from its record: imported by spec
    (current folder first), else from the file recorded at training time."""
    spec = record["name"]
    params = {k: tuple(v) if k == "in_shape" else v for k, v in dict(record.get("params") or {}).items()}
    factory = LIVE_MODELS.get(spec)
    if isinstance(factory, _Instance):  # the object trained in this process: a copy has its architecture
        return copy.deepcopy(factory.module)
    if factory is None:
        try:
            factory = import_object(spec)
        except LoadError as err:
            file = record.get("file")
            _, attr = split_spec(spec)
            if not file or not Path(file).is_file():
                module_part = split_spec(spec)[0]
                where = f" and its file at training time, {file}, is gone" if file else ""
                raise LoadError(f"run {run} needs its model {spec}, but {module_part!r} cannot be imported from "
                                f"{os.getcwd()}{where}; run from the folder that holds it, or put it on "
                                f"PYTHONPATH (import error: {err})") from None
            factory = import_object(f"{file}:{attr}")
    return _call_factory(factory, spec, params)


def _call_factory(factory: Callable[..., Any], spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise LoadError(f"cannot build {spec} with {dict(kwargs) or 'no parameters'}: {_first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise LoadError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def robustbench_path(name: str, *, model_dir: str | Path, dataset: str, threat_model: str) -> Path:
    """Where RobustBench keeps a checkpoint: ``model_dir/dataset/threat_model/name.pt``."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def robustbench_model(name: str, *, model_dir: str | Path = "models", dataset: str = "cifar10",
                      threat_model: str = "Linf") -> nn.Module:
    """A RobustBench model in eval mode, from local files (no download when the file exists)."""
    if threat_model not in THREAT_MODELS:
        raise LoadError(f"--threat-model must be one of {', '.join(THREAT_MODELS)}, got {threat_model!r}")
    path = robustbench_path(name, model_dir=model_dir, dataset=dataset, threat_model=threat_model)
    try:
        from robustbench.utils import load_model as rb_load  # optional extra
    except ImportError:
        rb_load = None
    if rb_load is not None:
        try:
            return rb_load(model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model).eval()
        except Exception as err:  # noqa: BLE001 - robustbench raises many kinds; report one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise LoadError(f"robustbench could not load {name!r} ({type(err).__name__}: {first})") from None
    archs = ROBUSTBENCH_ARCHS.get((dataset, threat_model), {})
    if name not in archs:
        raise LoadError(f"RobustBench model {name!r} ({dataset}, {threat_model}) needs the robustbench package "
                        f"(pip install 'gradreg[robustbench]'); without it gradreg knows: "
                        f"{', '.join(sorted(archs)) or 'none for this data set and threat model'}")
    if not path.is_file():
        raise LoadError(f"no checkpoint for {name!r} at {path} (download it with RobustBench, or pass --model-dir)")
    arch, params = archs[name]
    model = build_model(arch, params)
    load_state(model, read_state_dict(path), source=f"weights in {path}")
    return model.eval()
