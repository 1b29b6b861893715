"""The documented Python surface: ``gradreg.evaluate(...)`` and ``gradreg.train(...)``.

Both are thin: :func:`evaluate` builds attacks and lets :mod:`gradreg.judge` score them;
:func:`train` fills a :class:`gradreg.config.TrainConfig` and runs :mod:`gradreg.trainer`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .stats import Interval, proportion
from .threat import ThreatModel, check_eps_fits, parse_eps


@dataclass
class EvaluationResult:
    """Accuracies of one model on ``n`` inputs, each with its 95 % Wilson interval, and the
    per-example outcomes behind them (for paired tests, :func:`gradreg.stats.compare`)."""

    n: int
    eps: list[float]
    clean: Interval
    clean_correct: torch.Tensor  # (n,) bool: classified correctly without attack
    robust: dict[str, list[Interval]] = field(default_factory=dict)  # attack → one Interval per ε
    outcomes: dict[str, torch.Tensor] = field(default_factory=dict)  # attack → (len(eps), n) bool: robust

    def accuracy(self, attack: str, eps: float | str | None = None) -> Interval:
        """Robust accuracy under ``attack`` at ``eps`` (default: the only/last ε)."""
        intervals = self.robust[attack]
        if eps is None:
            return intervals[-1]
        e = parse_eps(eps)
        for value, interval in zip(self.eps, intervals):
            if abs(value - e) <= 1e-12:
                return interval
        raise KeyError(f"ε = {e:g} was not evaluated (evaluated: {', '.join(f'{v:g}' for v in self.eps)})")

    def summary(self) -> str:
        lines = [f"clean: {self.clean.text()} % (n = {self.n})"]
        for attack, intervals in self.robust.items():
            for e, iv in zip(self.eps, intervals):
                lines.append(f"{attack} ε={e:.4g}: {iv.text()} %")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "eps": self.eps, "clean": self.clean.as_dict(),
                "robust": {a: [iv.as_dict() for iv in ivs] for a, ivs in self.robust.items()}}


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, *,
             attacks: Sequence[str | Any] = ("pgd",), eps: Sequence[float | str] | None = None,
             steps: int = 40, labels: str = "predicted", seed: int = 0, batch_size: int = 256,
             device: torch.device | str | None = None, progress: bool | None = False) -> EvaluationResult:
    """Clean and robust accuracy of any ``nn.Module`` returning logits.

    ``threat`` gives the norm, the bounds and (unless ``eps`` lists several radii) the radius.
    ``attacks``: registered names (``"pgd"``, ``"fgsm"``, ``"autoattack"``, …; PGD-like ones
    get ``steps`` and ``seed``) or attack objects from :func:`gradreg.attacks.make`. Every
    adversarial example is re-checked and re-judged by :func:`gradreg.judge.evaluate_attack`.
    ``labels="predicted"`` attacks the model's own prediction (no label leaking).
    """
    from . import attacks as attack_registry
    from .judge import clean_correct, evaluate_attack

    if x.dim() < 2 or len(x) != len(y):
        raise ValueError(f"x must be (N, ...) with one label per row; got x {tuple(x.shape)}, y {tuple(y.shape)}")
    eps_values = [parse_eps(e) for e in eps] if eps is not None else [threat.eps]
    for e in eps_values:
        check_eps_fits(e, threat.norm, threat.bounds, x[0].numel())
    clean = clean_correct(model, x, y, batch_size=batch_size, progress=progress, device=device)
    result = EvaluationResult(n=len(y), eps=eps_values, clean=proportion(clean), clean_correct=clean)
    for spec in attacks:
        if isinstance(spec, str):
            params: dict[str, Any] = {"labels": labels}
            if spec in ("pgd", "tpgd"):
                params.update(steps=steps, seed=seed)
            elif spec in ("uniform", "gaussian", "lrc"):
                params.update(seed=seed)
            attack = attack_registry.make(spec, **params)
        else:
            attack = spec
        report = evaluate_attack(model, x, y, attack, threat, eps_values, batch_size=batch_size, labels=labels,
                                 progress=progress, device=device)
        result.robust[attack.name] = [proportion(row) for row in report.robust]
        result.outcomes[attack.name] = report.robust
    return result


def train(config: Any = None, *, resume: bool = False, log: Any = None, **fields: Any) -> Any:
    """Train one run and return it loaded (:class:`gradreg.runs.LoadedRun`: ``.model``,
    ``.metrics``, ``.path``).

    ``gradreg.train(data="digits", method="gn", lam=0.1, out="runs/gn")``: keyword fields of
    :class:`gradreg.config.TrainConfig`, on top of the data set's training defaults (as the
    CLI); or pass a ready ``TrainConfig``. ``model`` is a registered name, a spec
    (``"mynets:make_net"``, ``"nets/mynets.py:make_net"``), a factory (called with ``in_shape``
    and ``num_classes`` when it takes them) or a ready ``nn.Module`` (trained in place). The run
    records the factory as ``module:name``, so ``gradreg eval RUN`` rebuilds it where that
    module can be imported (or from the file it came from).
    """
    import difflib

    from .config import ConfigError, TrainConfig, apply_overrides
    from .data import train_defaults
    from .loading import register_live
    from .runs import load_run
    from .trainer import train as run_training

    known = {f for f in TrainConfig.__dataclass_fields__}
    unknown = [k for k in fields if k not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(known))})"
        raise ConfigError(f"gradreg.train() got an unknown keyword {unknown[0]!r}{hint}")
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        if not (isinstance(model, nn.Module) or callable(model)):
            raise ConfigError(f"model must be a name, a 'module:factory' spec, a factory or an nn.Module, "
                              f"got {type(model).__name__}")
        fields["model"] = register_live(model)
    if config is None:
        config = TrainConfig()
        apply_overrides(config, train_defaults(fields.get("data", config.data)))
        apply_overrides(config, fields)
    elif fields:
        raise ValueError("pass either a TrainConfig or keyword fields, not both")
    config.validate()
    check_names(config)
    absolute_paths(config)
    run_training(config, resume=resume, log=log or print)
    return load_run(config.out, device=config.device)


def check_names(config: Any) -> None:
    """Unknown method names fail here, with the registry's did-you-mean, before data is read."""
    from . import penalties

    penalties.PENALTIES.get(config.method)
    for term in config.add:
        penalties.PENALTIES.get(term["method"])


def absolute_paths(config: Any) -> None:
    """Data files and folders, the data directory, and model files (``nets/mynets.py:make_net``), as absolute paths,
    so the run can be evaluated from any folder."""
    from .data.external import absolute_spec
    from .loading import split_spec

    from .data import DATASETS

    if config.data not in DATASETS:  # a registered name wins over a folder of the same name
        config.data = absolute_spec(config.data)
    if config.data_dir and Path(config.data_dir).is_dir():  # a registered set's folder, too
        config.data_dir = str(Path(config.data_dir).resolve())
    if ":" in config.model:
        module_part, attr = split_spec(config.model)
        if module_part.endswith(".py") and Path(module_part).is_file():
            config.model = f"{Path(module_part).resolve()}:{attr}"
