"""One method-agnostic training loop for every member of the family (its I/O lives beside it,
in :mod:`gradreg.trainio`).

The method only changes the :class:`~gradreg.objective.Objective`; the loop, optimizer,
schedule, checkpointing, logging, evaluation and the catastrophic-overfitting monitor
(:mod:`gradreg.monitor`) are shared. State is checkpointed exactly
(model, optimizer, penalty state, global RNG, position in the epoch); data order and
augmentation are pure functions of (seed, epoch, step), so a resumed run repeats the
uninterrupted one bit for bit on CPU. The training data is one
:class:`~gradreg.data.source.TrainSource`, whose batches are indexed from tensors in memory or
streamed through a DataLoader over the same permutation; the loop never asks which, and both
give the same run.

Length (≈ 540 lines, over the project's 500): the loop, its exact resume (state, checkpoint,
compatibility check) and its validation scores read and write one :class:`Trainer`'s state;
their I/O already lives in :mod:`gradreg.trainio`, the data in :mod:`gradreg.data.source` and
the monitor in :mod:`gradreg.monitor` (our choice: the rest stays with the state it touches).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

from . import checkpoint, data, distributed, models, penalties
from .config import TrainConfig
from .data.augment import attach_standardization
from .data.source import TrainBatch, TrainSource
from .data.stream import open_training_data
from .data.validation import carve_validation
from .inference import accuracy
from .monitor import OverfitMonitor, fixed_subset, training_threat, warning_line
from .objective import Objective
from .schedule import BatchNoise
from .devices import resolve_device
from .progress import progress_bar
from .trainio import (LOG_FIELDS, TensorBoardLog, check_tensorboard, git_commit, interrupt_guard, load_weights, versions,
                      write_log)

__all__ = ["LOG_FIELDS", "NonFiniteError", "Trainer", "TrainingInterrupted", "git_commit", "load_weights", "train"]



class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/inf; the message names the step and the terms."""


class TrainingInterrupted(RuntimeError):
    """Stopped by a signal after saving a checkpoint; ``--resume`` continues."""


def build_model(cfg: TrainConfig, bundle: data.DataBundle | TrainSource) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the spec that rebuilds it (saved in config.json)."""
    if ":" in cfg.model:  # a user's factory: package.module:name or file.py:name (gradreg.loading)
        from .loading import build_factory_model

        user_model, record = build_factory_model(cfg.model, cfg.model_params, in_shape=bundle.in_shape,
                                                 num_classes=bundle.num_classes)
        attach_standardization(user_model, cfg.standardize)
        return user_model, record
    name = models.auto_name(bundle.name, bundle.in_shape) if cfg.model == "auto" else cfg.model
    models.MODELS.get(name)  # clear error for an unknown name before anything else
    params: dict[str, Any] = {
        "in_shape": list(bundle.in_shape), "num_classes": bundle.num_classes,
        "mean": list(bundle.mean), "std": list(bundle.std),
        "aux_classes": [2] if cfg.aux else [],
        # standardized images have mean 0 and std 1: the per-channel normalization becomes the identity
        **({"mean": [0.0] * bundle.in_shape[0], "std": [1.0] * bundle.in_shape[0]}
           if cfg.standardize == "per-image" else {}),
        **cfg.model_params,
    }
    try:
        model = models.make(name, **{k: tuple(v) if k == "in_shape" else v for k, v in params.items()})
    except TypeError as err:
        raise ValueError(f"bad model parameters for {name!r}: {err}") from None
    attach_standardization(model, cfg.standardize)
    return model, {"name": name, "params": params}


def _make_penalty(method: str, params: dict[str, Any]) -> penalties.Penalty:
    try:
        return penalties.make(method, **params)
    except TypeError as err:
        raise ValueError(f"bad parameters for method {method!r}: {err}") from None


def added_terms(cfg: TrainConfig) -> list[tuple[str, penalties.Penalty, float]]:
    """The ``--add`` terms as (name, penalty, λ); a method added twice (or the main one again)
    is named ``NAME#2``, ``NAME#3``, … so each keeps its own state in the checkpoint."""
    names, out = [cfg.method], []
    for spec in cfg.add:
        method = str(spec["method"])
        pen = _make_penalty(method, {k: v for k, v in spec.items() if k not in ("method", "lam")})
        name = method if method not in names else f"{method}#{sum(n.split('#')[0] == method for n in names) + 1}"
        names.append(name)
        out.append((name, pen, pen.default_lam if spec.get("lam") is None else float(spec["lam"])))
    return out


def build_objective(cfg: TrainConfig) -> tuple[Objective, float, float]:
    """The objective w₀·L + λ·penalty (``cfg.method``) + Σ λᵢ·penaltyᵢ (``cfg.add``); returns it with
    the main method's λ and the task weight w₀ (the main method's: an added term never changes it)."""
    pen = _make_penalty(cfg.method, cfg.penalty)
    lam = pen.default_lam if cfg.lam is None else cfg.lam
    task_weight = pen.task_weight if cfg.task_weight is None else cfg.task_weight
    terms = [(cfg.method, pen, lam), *added_terms(cfg)]
    return Objective(terms, task_weight=task_weight, fast_paths=cfg.fast_paths), lam, task_weight


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The schedule as a pure function of the global step (nothing to checkpoint)."""
    if cfg.schedule == "constant" or total_steps == 0:
        return cfg.lr
    frac = step / total_steps
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * cfg.lr_gamma ** sum(frac >= m for m in cfg.lr_milestones)


def build_optimizer(cfg: TrainConfig, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of the training set for one epoch; the same on every rank and resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A generator for per-step data randomness (augmentation), a pure function of position."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + step) % (2**63))


def make_targets(cfg: TrainConfig, y: torch.Tensor) -> torch.Tensor:
    """``(N,)`` labels, or ``(N, 2)`` [label, auxiliary label] for a multi-task run."""
    if not cfg.aux:
        return y
    return torch.stack([y, data.aux_labels(cfg.aux, y)], dim=1)


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of the current epoch completed
    global_step: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0


class Trainer:
    """Holds everything of one run; :meth:`fit` trains, checkpoints, evaluates and writes it."""

    def __init__(self, cfg: TrainConfig, *, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg.validate()
        self.log = log
        self.rank, self.world = distributed.rank_world()
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.out)
        if cfg.log == "tensorboard":
            check_tensorboard()  # before minutes of data loading, not after
        torch.manual_seed(cfg.seed)
        source = open_training_data(cfg.data, loader=cfg.data_loader, num_workers=cfg.num_workers,
                                    data_dir=cfg.data_dir, download=cfg.download)
        if cfg.validation_fraction > 0:  # tuning: the held-out part of the training split replaces the test split
            source = carve_validation(source, fraction=cfg.validation_fraction)
        # seeded again: the initialisation depends on the seed alone, not on what reading the data
        # drew from the global generator (a DataLoader draws its base seed there)
        torch.manual_seed(cfg.seed)
        self.model, self.model_spec = build_model(cfg, source)
        if cfg.init_weights:
            load_weights(self.model, cfg.init_weights)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to's stubs omit memory_format
        # the module that takes training steps: DDP averages gradients over ranks
        self.net: nn.Module = self.model
        if cfg.compile:
            self.net = cast(nn.Module, torch.compile(self.model))  # compiling a module returns a module
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")  # 1-channel convs
            self.net = DistributedDataParallel(self.net, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.objective, self.lam, self.task_weight = build_objective(cfg)
        if cfg.compile and any(p.requires.double_backward for p in self.objective.terms().values()):
            raise ValueError(f"method {cfg.method!r} differentiates a gradient (double backward), which "
                             "torch.compile does not support; train it without --compile")
        self.objective.to(self.device)
        # the training batches arrive on the device (held tensors are moved there once)
        self.source: TrainSource = source.to(self.device)
        self.n_train = len(self.source)
        self.test_x = self.source.test_x.to(self.device)
        self.test_y = self.source.test_y.to(self.device)
        setup_x = self.source.setup_images().to(self.device)
        per_row = [n for n, p in self.objective.terms().items() if p.per_example_state]
        if per_row and len(setup_x) < self.n_train:  # streamed data hands setup a prefix of its rows
            raise ValueError(f"{', '.join(per_row)} keeps state per training example, but this training data "
                             f"hands setup {len(setup_x)} of its {self.n_train} rows (streamed); use "
                             "--data-loader memory or drop that state")
        # the penalties take the data set's bounds (their ε defaults scale with the box)
        self.setup_x = setup_x  # the rows the objective is set up on (also σ_data of the LRC validation score)
        self.objective.setup(self.model, setup_x, self.source.bounds)
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self.steps_per_epoch = math.ceil(self.n_train / cfg.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.state = RunState()
        self.history: list[dict[str, Any]] = []
        self.monitor = self._build_monitor()

    def _build_monitor(self) -> OverfitMonitor | None:
        """The catastrophic-overfitting monitor on its fixed held-out batch (:mod:`gradreg.monitor`):
        a fixed subset of the validation split when there is one, else of the training split
        ("train batch"); never the test split."""
        cfg = self.cfg
        if not cfg.monitor:
            return None
        if cfg.validation_fraction > 0:  # the source's held-out part *is* the validation split here
            rows = fixed_subset(len(self.source.test_y), cfg.monitor_points)
            x, y, source = self.source.test_x[rows], self.source.test_y[rows], "validation"
        else:
            rows = fixed_subset(self.n_train, cfg.monitor_points)
            x, y = self.source.read(rows)  # (M, C, H, W), (M,)
            source = "train batch"
        threat = training_threat(list(self.objective.terms().values()), eps=cfg.monitor_eps, data_name=cfg.data,
                                 bounds=self.source.bounds, dim=x[0].numel())
        return OverfitMonitor(self.model, x.to(self.device), y.to(self.device), threat, source=source,
                              drop=cfg.monitor_drop, keep_snapshot=cfg.on_overfit == "restore",
                              batch_size=cfg.eval_batch_size)

    @property
    def monitor_ended(self) -> bool:
        """Whether the monitor ended the run (``on_overfit`` stop or restore)."""
        return self.monitor is not None and self.monitor.state.outcome is not None

    # ----- run directory --------------------------------------------------------------
    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def run_config(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "resolved": {"model": self.model_spec, "lam": self.lam, "task_weight": self.task_weight,
                         "penalty": repr(self.objective.penalties[self.cfg.method]),
                         "terms": {name: {"lam": self.objective.lams[name], "penalty": repr(pen)}
                                   for name, pen in self.objective.terms().items()},
                         "data": self.source.summary(), "device": str(self.device), "world_size": self.world,
                         "monitor": None if self.monitor is None else self.monitor.describe()},
            "seed": self.cfg.seed,
            "versions": versions(),
            "git_commit": git_commit(),
        }

    def save_checkpoint(self) -> None:
        if not self.is_writer:
            return
        opt_tensors, opt_rest = checkpoint.flatten_optimizer(self.optimizer.state_dict())
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        groups = {"model": self.model.state_dict(), "objective": self.objective.state_dict(),
                  "optim": opt_tensors, "rng": rng}
        meta = {"state": vars(self.state), "optimizer": opt_rest, "history": self.history,
                "config": self.cfg.to_dict()}
        if self.monitor is not None:
            meta["monitor"] = self.monitor.state_meta()
            if self.monitor.snapshot is not None:  # on_overfit restore: the weights to roll back to
                groups["monitor"] = self.monitor.snapshot
        self.out.mkdir(parents=True, exist_ok=True)
        checkpoint.save(self.out / checkpoint.CURRENT, groups, meta)

    def restore(self) -> bool:
        found = checkpoint.load_latest(self.out, warn=self.log)
        if found is None:
            return False
        groups, meta = found
        self._check_compatible(meta["config"])
        self.model.load_state_dict(groups.get("model", {}))
        try:
            self.objective.load_checkpoint_state(groups.get("objective", {}))
        except ValueError as err:
            raise ValueError(f"cannot resume {self.out}: {err}") from None
        self.optimizer.load_state_dict(checkpoint.unflatten_optimizer(groups.get("optim", {}), meta["optimizer"]))
        torch.set_rng_state(groups["rng"]["torch"])
        if "cuda" in groups["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(groups["rng"]["cuda"])
        self.state = RunState(**meta["state"])
        self.history = meta["history"]
        if self.monitor is not None:  # a checkpoint from before the monitor leaves it fresh
            self.monitor.load_meta(meta.get("monitor"), groups.get("monitor"))
        return True

    def _check_compatible(self, saved: dict[str, Any]) -> None:
        """Resuming may extend ``epochs`` or change where and how quietly it runs, nothing else."""
        diff = self.cfg.differing_fields(saved, free=TrainConfig.runtime_fields())
        if diff:
            raise ValueError(f"cannot resume {self.out}: the configuration differs in {', '.join(diff)}")

    def write_log(self) -> None:
        write_log(self.out / "log.csv", self.history)

    # ----- training -------------------------------------------------------------------
    def train_step(self, batch: TrainBatch, epoch: int) -> tuple[float, float] | None:
        """One optimizer step on ``batch``, this rank's rows of global batch ``batch.step`` of
        ``epoch``. Returns (mean loss, correct count), or None for a skipped step. DDP averages
        gradients over ranks, so the local mean loss is scaled by ``batch.share·world`` to make the
        result the global-batch mean even when the last batch does not split evenly."""
        cfg, step = self.cfg, batch.step
        x, y = batch.x, make_targets(cfg, batch.y)  # (B, C, H, W), (B,) or (B, 2)
        kind = self.source.augment_kind if cfg.augment_kind == "auto" else cfg.augment_kind
        if cfg.augment and kind != "none":
            from .data.augment import augment, pad_value_for

            x = augment(x, kind=kind, generator=step_generator(cfg.seed, epoch, step),
                        pad_value=pad_value_for(cfg.augment_pad, self.source.bounds))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.state.global_step, self.total_steps)
        # the penalties' random draws (random starts, TRADES' start noise): a pure function of
        # the position in training, identical for any number of ranks
        noise = BatchNoise(int(step_generator(cfg.seed, epoch, step).initial_seed()), batch.rows, batch.global_size)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # bf16 autocast covers the forward passes; CleanPass hands penalties float32 gradients
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            out = self.objective(self.net, x, y, index=batch.index, noise=noise)
        # gradients for the parameters only: the clean pass's input may be in the graph (for the
        # penalties' input gradients), and nobody wants its .grad
        (out.loss * (batch.share * self.world)).backward(inputs=[p for p in self.model.parameters() if p.requires_grad])
        bad = [k for k, v in out.parts.items() if not torch.isfinite(v)]
        if not torch.isfinite(out.loss):
            bad.append("loss")
        if not bad and any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.model.parameters()):
            bad.append("gradient")
        if bad:
            where = (f"non-finite {', '.join(sorted(set(bad)))} at epoch {epoch + 1}, step {step + 1} "
                     f"(method {cfg.method!r}, λ = {self.lam})")
            if cfg.on_nonfinite == "skip":
                self.log(f"warning: {where}; step skipped")
                self.optimizer.zero_grad(set_to_none=True)
                self.state.skipped_steps += 1
                return None
            raise NonFiniteError(f"{where}; the last good checkpoint is kept in {self.out} "
                                 "(lower lr or λ, or pass --on-nonfinite skip)")
        self.optimizer.step()
        labels = y if y.dim() == 1 else y[:, 0]
        return float(out.loss.detach()), float((out.logits.argmax(1) == labels).float().sum())

    def fit(self, *, resume: bool = False, stop_after_epoch: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.epochs`` (or stop, checkpointed, once ``stop_after_epoch`` epochs are
        done, for time-boxed jobs; ``resume`` continues later with the same schedule)."""
        cfg = self.cfg
        if resume and self.restore():
            self.log(f"resumed {self.out} at epoch {self.state.epoch + 1}, step {self.state.step_in_epoch}")
        elif self.is_writer:
            if (self.out / checkpoint.CURRENT).exists():
                raise ValueError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            self.out.mkdir(parents=True, exist_ok=True)
        if self.is_writer:
            (self.out / "config.json").write_text(json.dumps(self.run_config(), indent=2) + "\n")
        n = self.n_train
        board = TensorBoardLog(self.out / "tensorboard") if cfg.log == "tensorboard" and self.is_writer else None
        try:
            with interrupt_guard() as flag:
                while self.state.epoch < cfg.epochs and not self.monitor_ended:
                    if stop_after_epoch is not None and self.state.epoch >= stop_after_epoch:
                        return {"stopped_after_epoch": self.state.epoch}
                    self._run_epoch(n, flag)
                    if board is not None:
                        board.write(self.history[-1])
        finally:
            if board is not None:
                board.close()
        # the last epoch already scored the final weights
        test_acc = (self.history[-1]["test_accuracy"] if self.history else
                    accuracy(self.model, self.test_x, self.test_y, batch_size=cfg.eval_batch_size))
        if cfg.validation_fraction > 0:  # what was scored is the validation split: say so in the keys
            scores: dict[str, Any] = {"eval_split": "validation", "validation_accuracy": test_acc}
            if cfg.validation_eps is not None:
                if cfg.validation_attack == "lrc":
                    scores["validation_lrc_accuracy"] = self.validation_lrc_accuracy()
                    scores.update(validation_eps=cfg.validation_eps, validation_attack="lrc",
                                  validation_lrc_zeta_px=cfg.validation_lrc_zeta_px)
                else:
                    scores["validation_pgd_accuracy"] = self.validation_pgd_accuracy()
                    scores.update(validation_eps=cfg.validation_eps, validation_norm=cfg.validation_norm)
        else:
            scores = {"eval_split": "test", "test_accuracy": test_acc}
        scores["eval_n"] = int(len(self.test_y))  # the points behind that accuracy (for its interval)
        metrics = {**scores, "train_seconds": self.state.train_seconds,
                   "epochs": cfg.epochs, "steps": self.state.global_step, "skipped_steps": self.state.skipped_steps,
                   "method": cfg.method, "lam": self.lam, "data": cfg.data, "model": self.model_spec["name"]}
        if self.monitor is not None:
            metrics["monitor"] = self.monitor.summary()
        if self.is_writer:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                      str(self.out / "model.safetensors"))
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics

    def validation_pgd_accuracy(self) -> float:
        """Fraction of the validation split still classified correctly under PGD (Madry et al.
        2018; random start, ``validation_pgd_steps`` steps of 2.5·ε/steps, true labels) at
        ``validation_eps``, judged by :mod:`gradreg.judge`: the score a sweep tunes λ on."""
        from .attacks import make
        from .judge import robust_accuracy
        from .threat import ThreatModel

        cfg = self.cfg
        assert cfg.validation_eps is not None
        attack = make("pgd", steps=cfg.validation_pgd_steps, labels="true", seed=cfg.seed)
        threat = ThreatModel(norm=cfg.validation_norm, eps=0.0, bounds=self.source.bounds)
        return robust_accuracy(self.model, self.test_x, self.test_y, attack, threat, [cfg.validation_eps],
                               batch_size=cfg.eval_batch_size, progress=False)[0]

    def validation_lrc_accuracy(self) -> float:
        """Fraction of the validation split still classified correctly under worst-of-
        ``validation_lrc_samples`` long-range-correlated noise (SGR paper, SPEC §3) of strength
        ``validation_eps`` and decay length ``validation_lrc_zeta_px``: the score the SGR paper
        tunes λ on (at ζ = 8). With scale "data" the unit-variance noise is multiplied by σ_data,
        the square root of the mean per-pixel variance of the rows the objective was set up on
        (the whole training split in memory, a fixed subset when streamed), as the LRC columns do."""
        from .attacks import make
        from .attacks.lrc import mean_marginal_variance
        from .judge import robust_accuracy
        from .threat import ThreatModel

        cfg = self.cfg
        assert cfg.validation_eps is not None
        std = math.sqrt(mean_marginal_variance(self.setup_x)) if cfg.validation_lrc_scale == "data" else 1.0
        attack = make("lrc", zeta_px=cfg.validation_lrc_zeta_px, samples=cfg.validation_lrc_samples,
                      marginal_std=std, labels="true", seed=cfg.seed)
        threat = ThreatModel("l2", 0.0, self.source.bounds)  # a noise strength, not a radius: only the bounds apply
        return robust_accuracy(self.model, self.test_x, self.test_y, attack, threat, [cfg.validation_eps],
                               batch_size=cfg.eval_batch_size, progress=False)[0]

    def _run_epoch(self, n: int, flag: dict[str, bool]) -> None:
        cfg, st = self.cfg, self.state
        epoch = st.epoch
        order = epoch_order(cfg.seed, epoch, n).to(self.device)
        loss_sum = correct = seen = 0.0
        started = time.perf_counter()
        bar = progress_bar(total=self.steps_per_epoch, initial=st.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           show=False if cfg.quiet or not self.is_writer else None)
        batches = self.source.batches(order, batch_size=cfg.batch_size, start=st.step_in_epoch, rank=self.rank,
                                      world=self.world)
        try:
            for batch in batches:
                t0 = time.perf_counter()
                result = self.train_step(batch, epoch)
                st.train_seconds += time.perf_counter() - t0
                step = batch.step
                st.step_in_epoch = step + 1
                st.global_step += 1
                if result is not None:
                    loss_sum += result[0] * len(batch.index)
                    correct += result[1]
                    seen += len(batch.index)
                    bar.set_postfix(loss=f"{result[0]:.3f}", refresh=False)
                bar.update(1)
                if self.monitor is not None and cfg.monitor_every_steps and st.global_step % cfg.monitor_every_steps == 0:
                    self._monitor_check(epoch)
                if cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if flag["stop"]:
                    self.save_checkpoint()
                    raise TrainingInterrupted(
                        f"interrupted at epoch {epoch + 1}, step {step + 1}; checkpoint saved in {self.out} "
                        "(continue with --resume)")
                if self.monitor_ended:
                    break
        finally:
            bar.close()
        if self.monitor is not None and not cfg.monitor_every_steps:
            self._monitor_check(epoch)
        test_acc = accuracy(self.model, self.test_x, self.test_y, batch_size=cfg.eval_batch_size)
        totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64,
                              device=self.device if self.device.type == "cuda" else "cpu")
        loss_sum, correct, seen = distributed.all_reduce_sum_(totals).tolist()
        row = {"epoch": epoch + 1, "step": st.global_step, "lr": learning_rate(cfg, st.global_step - 1, self.total_steps),
               "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
               "test_accuracy": test_acc, "epoch_seconds": time.perf_counter() - started,
               **({} if self.monitor is None else self.monitor.epoch_columns(epoch + 1))}
        self.history.append(row)
        if st.step_in_epoch == self.steps_per_epoch:  # else the monitor ended the run mid-epoch
            st.epoch += 1
            st.step_in_epoch = 0
        if not cfg.quiet and self.is_writer:
            watched = ("" if row.get("monitor_pgd_accuracy") is None else
                       f", monitor FGSM {row['monitor_fgsm_accuracy']:.4f} / PGD {row['monitor_pgd_accuracy']:.4f}")
            self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, "
                     f"train acc {row['train_accuracy']:.4f}, "
                     f"{'validation' if cfg.validation_fraction > 0 else 'test'} acc {test_acc:.4f}{watched}")
        if self.is_writer:
            self.write_log()
        self.save_checkpoint()

    def _monitor_check(self, epoch: int) -> None:
        """One check of the monitor; hands its reading to the penalties that listen
        (``on_monitor``) and acts on a flag as ``on_overfit`` says."""
        assert self.monitor is not None
        cfg, mon = self.cfg, self.monitor
        result = mon.check(epoch=epoch + 1, step=self.state.global_step)
        for pen in self.objective.terms().values():
            hook = getattr(pen, "on_monitor", None)
            if callable(hook):
                hook(fgsm_accuracy=result.fgsm_accuracy, pgd_accuracy=result.pgd_accuracy,
                     overfit=result.overfit, step=result.step)
        if not result.overfit:
            return
        action = {"warn": "training continues (--on-overfit stop|restore ends it)",
                  "stop": "training stops here",
                  "restore": f"restoring the weights of step {mon.state.healthy_step} and stopping"}[cfg.on_overfit]
        if self.is_writer:
            self.log(warning_line(result, mon.state, mon, action))
        if cfg.on_overfit == "restore":
            mon.restore_snapshot()
            mon.state.outcome = "restored"
        elif cfg.on_overfit == "stop":
            mon.state.outcome = "stopped"


def train(cfg: TrainConfig, *, resume: bool = False, stop_after_epoch: int | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train one run as configured and write its run directory; returns its metrics. The run
    directory is locked against a second writer first (:mod:`gradreg.lock`)."""
    from .lock import run_lock

    with run_lock(cfg.out, enabled=distributed.rank_world()[0] == 0):
        return Trainer(cfg, log=log).fit(resume=resume, stop_after_epoch=stop_after_epoch)
