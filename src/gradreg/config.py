"""The typed training configuration. CLI flags map one-to-one onto its fields; ``--config
FILE.toml`` and ``--set key=value`` reach every field (``--set penalty.sigma=0.1`` for a
penalty's own parameters)."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")
# the metrics.json key of a tuning run's validation robust accuracy, per validation attack
VALIDATION_SCORE_KEYS = {"pgd": "validation_pgd_accuracy", "lrc": "validation_lrc_accuracy"}


def validation_score(metrics: dict[str, Any]) -> float | None:
    """A finished tuning run's validation robust accuracy (under PGD or LRC noise, whichever it
    was scored with), or None when ``metrics`` has none (the run has not finished)."""
    for key in VALIDATION_SCORE_KEYS.values():
        if key in metrics:
            return float(metrics[key])
    return None
NONFINITE = ("stop", "skip")
AMP = ("none", "bf16")
DATA_LOADERS = ("auto", "memory", "stream")
LOGS = ("csv", "tensorboard")
ON_OVERFIT = ("warn", "stop", "restore")  # gradreg.monitor: what a flagged check does


# Field metadata: a field that says where or how a run executes, not what it computes, may
# change when the run resumes (the trainer derives its compatibility check from it).
_RUNTIME = {"runtime": True}


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the field."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults are our choices unless a paper is named."""

    # data
    data: str = "digits"
    data_dir: str | None = field(default=None, metadata=_RUNTIME)
    download: bool = field(default=False, metadata=_RUNTIME)
    augment: bool = False
    augment_kind: str = "auto"  # "auto": the data set's own (crop-flip on CIFAR); or none | crop | crop-flip
    augment_pad: str = "zero"  # "mid": pad crops with mid-range pixels (the SGR paper's footnote)
    standardize: str = "none"  # "per-image": the model standardizes each image first (SGR paper)
    aux: str | None = None  # auxiliary task for multi-task DataGrad ("parity")
    # how training batches are read: "memory" indexes tensors held in memory (the fast path),
    # "stream" reads them through a torch DataLoader, "auto" streams only a map-style Dataset from
    # a factory too large to hold (gradreg.data.stream.STREAM_ABOVE_BYTES); either gives the same
    # batches, so a run may resume with the other one
    data_loader: str = field(default="auto", metadata=_RUNTIME)
    num_workers: int = field(default=0, metadata=_RUNTIME)  # DataLoader worker processes (streaming only)
    # validation (for tuning): > 0 carves this stratified fraction off the training split, trains
    # on the rest and scores that held-out part instead of the test split (never loaded into the run)
    validation_fraction: float = 0.0
    validation_eps: float | None = None  # with validation_fraction > 0: also its PGD accuracy at this ε (input units)
    validation_norm: str = "linf"
    validation_pgd_steps: int = 20
    # what the validation split is attacked with: "pgd" (at validation_eps, validation_norm), or
    # "lrc": worst-of-validation_lrc_samples long-range-correlated noise of strength validation_eps
    # and decay length validation_lrc_zeta_px (the SGR paper tunes λ this way, at ζ = 8)
    validation_attack: str = "pgd"
    validation_lrc_zeta_px: float = 8.0
    validation_lrc_samples: int = 100
    validation_lrc_scale: str = "data"  # "data": noise standardized to the training inputs' per-pixel variance; "unit"
    # model
    model: str = "auto"
    model_params: dict[str, Any] = field(default_factory=dict)
    init_weights: str | None = None  # start from these weights (.safetensors, or .pt read with weights_only=True)
    # method: task_weight·task loss + lam·penalty
    method: str = "clean"
    lam: float | None = None  # None: the method's default
    task_weight: float | None = None  # None: the method's default (1; fgsm-at/pgd-at 0: the term is the mixture)
    penalty: dict[str, Any] = field(default_factory=dict)  # the penalty's keyword parameters
    # further terms λᵢ·penaltyᵢ, each {"method": NAME, "lam": λ (None: its default), **its parameters};
    # given as "NAME:lam=2,eps=0.1" strings (--add, TOML add = [...]) or TOML tables ([[add]])
    add: list[dict[str, Any]] = field(default_factory=list)
    # optimization
    epochs: int = field(default=10, metadata=_RUNTIME)
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step schedule, fractions of training
    lr_gamma: float = 0.1
    seed: int = 0
    # running
    device: str = field(default="auto", metadata=_RUNTIME)
    amp: str = "none"  # "bf16": autocast the forward passes (penalty norms stay float32)
    channels_last: bool = False  # NHWC memory layout for convolutions (faster on recent GPUs)
    compile: bool = False  # torch.compile the model (not with double-backprop penalties)
    fast_paths: bool = field(default=True, metadata=_RUNTIME)  # shared clean pass, fused mode, first-order kernels (False: the plain composition)
    eval_batch_size: int = field(default=500, metadata=_RUNTIME)
    checkpoint_every: int = field(default=0, metadata=_RUNTIME)  # also checkpoint every N steps (0: at epoch ends only)
    on_nonfinite: str = field(default="stop", metadata=_RUNTIME)
    out: str = field(default="runs/run", metadata=_RUNTIME)
    quiet: bool = field(default=False, metadata=_RUNTIME)
    log: str = field(default="csv", metadata=_RUNTIME)  # "tensorboard": log.csv and TensorBoard events in OUT/tensorboard
    # catastrophic-overfitting monitor (gradreg.monitor): FGSM and PGD-10 accuracy at the training ε
    # on a fixed held-out batch, every epoch (or every monitor_every_steps steps)
    monitor: bool = True
    monitor_every_steps: int = 0  # 0: at the end of every epoch
    monitor_points: int = 256  # size of the fixed batch (our choice)
    monitor_eps: float | None = None  # None: the method's ε, else the data set's standard ℓ∞ radius
    monitor_drop: float = 0.2  # flag when PGD accuracy falls this far below its best (Wong et al. 2020)
    on_overfit: str = "warn"  # warn | stop | restore (the weights of the last check before the drop)

    def validate(self) -> TrainConfig:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(self.epochs >= 0, f"epochs must be ≥ 0, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be ≥ 1, got {self.eval_batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        need(self.device in DEVICES, f"unknown device {self.device!r}; use one of {', '.join(DEVICES)}")
        need(self.amp in AMP, f"amp must be one of {', '.join(AMP)}, got {self.amp!r}")
        need(self.on_nonfinite in NONFINITE, f"on_nonfinite must be one of {', '.join(NONFINITE)}")
        need(self.checkpoint_every >= 0, "checkpoint_every must be ≥ 0")
        need(all(0 < m < 1 for m in self.lr_milestones), "lr_milestones are fractions of training in (0, 1)")
        need(self.lam is None or self.lam >= 0, f"lam must be ≥ 0, got {self.lam}")
        need(self.augment_kind in ("auto", "none", "crop", "crop-flip"),
             f"augment_kind must be auto, none, crop or crop-flip, got {self.augment_kind!r}")
        need(self.augment_pad in ("zero", "mid"), f"augment_pad must be zero or mid, got {self.augment_pad!r}")
        need(self.standardize in ("none", "per-image"), f"standardize must be none or per-image, got {self.standardize!r}")
        need(0 <= self.validation_fraction < 1, f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        need(self.validation_eps is None or self.validation_eps >= 0, f"validation_eps must be ≥ 0, got {self.validation_eps}")
        need(self.validation_norm in ("linf", "l2"), f"validation_norm must be linf or l2, got {self.validation_norm!r}")
        need(self.validation_pgd_steps >= 1, f"validation_pgd_steps must be ≥ 1, got {self.validation_pgd_steps}")
        need(self.validation_attack in VALIDATION_SCORE_KEYS,
             f"validation_attack must be one of {', '.join(VALIDATION_SCORE_KEYS)}, got {self.validation_attack!r}")
        need(self.validation_lrc_zeta_px > 0, f"validation_lrc_zeta_px must be > 0, got {self.validation_lrc_zeta_px}")
        need(self.validation_lrc_samples >= 1, f"validation_lrc_samples must be ≥ 1, got {self.validation_lrc_samples}")
        need(self.validation_lrc_scale in ("data", "unit"),
             f"validation_lrc_scale must be data or unit, got {self.validation_lrc_scale!r}")
        need(self.task_weight is None or self.task_weight >= 0, f"task_weight must be ≥ 0, got {self.task_weight}")
        need(self.data_loader in DATA_LOADERS, f"data_loader must be one of {', '.join(DATA_LOADERS)}, got {self.data_loader!r}")
        need(self.num_workers >= 0, f"num_workers must be ≥ 0, got {self.num_workers}")
        need(self.monitor_every_steps >= 0, f"monitor_every_steps must be ≥ 0, got {self.monitor_every_steps}")
        need(self.monitor_points >= 1, f"monitor_points must be ≥ 1, got {self.monitor_points}")
        need(self.monitor_eps is None or self.monitor_eps > 0, f"monitor_eps must be > 0, got {self.monitor_eps}")
        need(0 < self.monitor_drop <= 1, f"monitor_drop must be in (0, 1], got {self.monitor_drop}")
        need(self.on_overfit in ON_OVERFIT, f"on_overfit must be one of {', '.join(ON_OVERFIT)}, got {self.on_overfit!r}")
        need(self.on_overfit == "warn" or self.monitor, f"on_overfit {self.on_overfit!r} needs the monitor (monitor = true)")
        need(self.log in LOGS, f"log must be one of {', '.join(LOGS)}, got {self.log!r}")
        for term in self.add:
            need(isinstance(term.get("method"), str) and bool(term["method"]), f"an added term needs a method, got {term!r}")
            lam = term.get("lam")
            need(lam is None or (isinstance(lam, (int, float)) and lam >= 0), f"lam of added {term['method']!r} must be ≥ 0, got {lam!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def runtime_fields(cls) -> frozenset[str]:
        """Fields that may differ when a run resumes: where and how it runs (and ``epochs``, to
        extend it), not what it computes."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("runtime"))

    def differing_fields(self, saved: dict[str, Any], *, free: frozenset[str]) -> list[str]:
        """The fields outside ``free`` in which a stored configuration (``to_dict`` as JSON, e.g.
        a checkpoint's or ``config.json``'s) differs from this one; a field newer than the
        stored one compares as its default."""
        import json

        now, defaults = json.loads(json.dumps(self.to_dict())), json.loads(json.dumps(TrainConfig().to_dict()))
        return [k for k in now if k not in free and saved.get(k, defaults[k]) != now[k]]


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = get_type_hints(TrainConfig)


def _coerce(name: str, value: Any) -> Any:
    """Check a value against the field's annotation (ints are accepted for floats)."""
    hint = str(_HINTS[name])
    if value is None:
        if "None" not in hint:
            raise ConfigError(f"{name} cannot be empty")
        return None
    if hint.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table of key = value")
        return dict(value)
    if hint.startswith("list"):
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if name == "add":
            return [parse_term(v) if isinstance(v, str) else _term_table(v) for v in value]
        return [float(v) for v in value]
    if "bool" in hint:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if "float" in hint:
        if isinstance(value, str) and name.endswith("_eps"):  # an ε as text (--monitor-eps 8/255)
            from .threat import parse_eps

            try:
                return parse_eps(value)
            except ValueError as err:
                raise ConfigError(f"{name}: {err}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if "int" in hint:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _split_params(text: str) -> list[str]:
    """``a=1,b=[1, 2],c="x,y"`` → its ``key=value`` items: commas inside brackets or quotes
    belong to the value."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_term(spec: str) -> dict[str, Any]:
    """An added term ``NAME[:key=value,...]`` (``trades:lam=2,eps=0.1``) as the ``add`` entry
    ``{"method": NAME, "lam": λ or None, **parameters}``; values are TOML literals as in ``--set``."""
    method, _, rest = spec.partition(":")
    method = method.strip()
    if not method or any(c in method for c in "=,"):
        raise ConfigError(f"an added term is NAME or NAME:key=value,..., got {spec!r}")
    term: dict[str, Any] = {"method": method}
    for item in _split_params(rest):
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"added term {spec!r}: expected key=value, got {item!r}")
        term[key.strip().replace("-", "_")] = parse_value(text.strip())
    return _term_table(term)


def _term_table(value: Any) -> dict[str, Any]:
    """A TOML ``[[add]]`` table (or a parsed spec) checked: a method name, λ a number or absent."""
    if not isinstance(value, dict) or not isinstance(value.get("method"), str):
        raise ConfigError(f"an added term needs method = NAME, got {value!r}")
    term = dict(value)
    lam = term.get("lam")
    if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float))):
        raise ConfigError(f"lam of added {term['method']!r} must be a number, got {lam!r}")
    term["lam"] = None if lam is None else float(lam)
    return term


def parse_value(text: str) -> Any:
    """A ``--set`` value as a TOML literal (``1e-3``, ``true``, ``[1, 2]``, ``"x"``); anything
    that is not a TOML literal is taken as a bare string, so ``--set data=mnist`` works."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """Set fields from a flat or nested mapping; ``penalty.sigma`` style keys reach dict fields."""
    for key, value in values.items():
        name, _, sub = key.partition(".")
        if name not in _FIELDS:
            raise ConfigError(f"unknown configuration key {key!r} (known: {', '.join(_FIELDS)})")
        if sub:
            current = getattr(cfg, name)
            if not isinstance(current, dict):
                raise ConfigError(f"{name} has no sub-keys (got {key!r})")
            current[sub.replace("-", "_")] = value
        else:
            setattr(cfg, name, _coerce(name, value))
    return cfg


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(text.strip())
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None
