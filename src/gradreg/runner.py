"""A wave of independent trainings or evaluations: run here, by parallel one-thread workers, or
(trainings) printed.

``gradreg reproduce`` plans its trainings in waves whose members do not depend on each other
(every row's next sweep points; then every row × seed training) and hands each wave to a
:class:`Runner`:

- ``jobs = 1``: one after the other in this process (torch's threads as the caller set them);
- ``jobs = N > 1``: N ``gradreg train --resume`` subprocesses at a time, each with one
  OMP/MKL thread (:func:`gradreg.sweep.run_trainings`, the machinery of ``gradreg sweep
  --jobs``). Small models gain more from N one-thread workers than from one N-thread process,
  whose operations are too small to split; each worker pays torch's import (4–9 s on the
  2-core machine), which is why a budget of sub-second trainings may prefer ``jobs = 1``;
- ``print_only``: one resumable shell line per unfinished training, for an external scheduler
  (a SLURM array, GNU parallel); nothing runs. Re-running the same ``reproduce`` command then
  prints the next wave (a widened λ, the rows' trainings at their tuned λ), and nothing once
  every training has finished.

A run folder is trained at most once per wave, whatever number of rows share it (the sweeps'
common clean reference), and a finished one never again; a finished folder whose stored
configuration differs from the planned one (a row's penalty changed since) is refused with the
differing fields, never reused.

The evaluations of finished models are a wave too (:meth:`Runner.evaluate`): with
``eval_jobs > 1`` the unfinished ones run in ``eval_jobs`` one-thread worker processes
(spawned, so that no OpenMP state is forked), each writing its result to its evaluation cache
file (:func:`gradreg.protocols.cached_evaluation`); the caller then reads every result from
those files in its own order, so the report is the same whatever finished first. ``eval_jobs``
is 1 by default: on the 2-core machine one two-thread process evaluated faster (BENCHMARKS.md).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shlex
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig, validation_score
from .data import DataBundle
from .data import load as load_data
from .protocols import EvalSettings, cached_evaluation, stored_evaluation
from .runs import load_run
from .sweep import RUN_LOG, run_trainings, train_argv
from .trainer import train


def default_jobs() -> int:
    """The cores this process may use (its CPU affinity where the platform tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def stale_fields(cfg: TrainConfig) -> list[str]:
    """The fields in which a finished run folder's stored configuration (``config.json``)
    differs from ``cfg``: where and how it ran aside (:meth:`TrainConfig.runtime_fields`), except
    ``epochs``, which changes the result; a field newer than the folder compares as its default.
    Empty when nothing is stored."""
    try:
        saved = json.loads((Path(cfg.out) / "config.json").read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return []
    return cfg.differing_fields(saved, free=TrainConfig.runtime_fields() - {"epochs"})


def is_trained(cfg: TrainConfig) -> bool:
    """Finished: a tuning run (validation split with an ε) has its validation robust accuracy in
    ``metrics.json``; any other run has its ``model.safetensors``."""
    run = Path(cfg.out)
    if cfg.validation_fraction > 0 and cfg.validation_eps is not None:
        try:
            return validation_score(json.loads((run / "metrics.json").read_text())) is not None
        except (OSError, json.JSONDecodeError):
            return False
    return (run / "model.safetensors").exists()


@dataclass(frozen=True)
class EvalJob:
    """One evaluation of a finished run, as a worker process receives it (everything picklable)."""

    label: str  # for the log, e.g. "GN (seed 1)"
    run_dir: str
    device: str
    data: str
    data_dir: str | None
    settings: EvalSettings
    name: str  # the row's name: part of the cache key and of AutoAttack's cache file names
    cache: str  # the evaluation's JSON cache file


def is_evaluated(job: EvalJob, model: torch.nn.Module, bundle: DataBundle) -> bool:
    """``job``'s cache file holds the evaluation of this model, data and settings."""
    return stored_evaluation(model, bundle, job.settings, cache=Path(job.cache), name=job.name) is not None


_WORKER_DATA: dict[tuple[str, str | None], DataBundle] = {}  # a worker loads each data set once


def _one_thread_worker() -> None:
    torch.set_num_threads(1)


def _evaluate_in_worker(job: EvalJob) -> str:
    key = (job.data, job.data_dir)
    if key not in _WORKER_DATA:
        _WORKER_DATA[key] = load_data(job.data, data_dir=job.data_dir)
    model = load_run(Path(job.run_dir), device=job.device).model
    cached_evaluation(model, _WORKER_DATA[key], job.settings, cache=Path(job.cache), name=job.name, progress=False)
    return job.label


@dataclass
class Runner:
    jobs: int = 1
    eval_jobs: int = 1  # evaluations' workers (1: the caller evaluates in its own process)
    print_only: bool = False
    launcher: Sequence[str] | None = None
    log: Callable[[str], None] = print
    printed: list[str] = field(default_factory=list)  # every line printed so far (print_only)

    def __post_init__(self) -> None:
        if self.jobs < 1 or self.eval_jobs < 1:
            raise ValueError(f"jobs and eval_jobs must be ≥ 1, got {self.jobs} and {self.eval_jobs}")

    def run(self, trainings: Sequence[tuple[str, TrainConfig]]) -> int:
        """Train (or print) the unfinished ``(label, config)`` of one wave; the number of them.
        A failed subprocess stops the run with its log's path."""
        todo: dict[str, tuple[str, TrainConfig]] = {}
        for label, cfg in trainings:
            if not is_trained(cfg):
                todo.setdefault(str(Path(cfg.out)), (label, cfg))  # a shared run folder once
            elif diff := stale_fields(cfg):  # never reuse a model trained for another config
                raise ValueError(f"{cfg.out} holds a finished run of another configuration (it differs in "
                                 f"{', '.join(diff)}): move or delete that folder, or use another --out")
        if not todo:
            return 0
        if self.print_only:
            for label, cfg in todo.values():
                line = shlex.join(train_argv(cfg, launcher=self.launcher))
                self.printed.append(line)
                print(line)
            return len(todo)
        if self.jobs == 1:
            for label, cfg in todo.values():
                self.log(f"training {label} ({cfg.method}, seed {cfg.seed}) on {cfg.data}, {cfg.epochs} epochs")
                train(cfg, resume=True, log=lambda s: None)
            return len(todo)
        self.log(f"training {len(todo)} run(s) as {min(self.jobs, len(todo))} one-thread workers")
        codes = run_trainings(list(todo.values()), jobs=self.jobs, launcher=self.launcher, log=self.log, threads=1)
        failed = [f"{label} (exit {rc}, {Path(cfg.out) / RUN_LOG})" for label, cfg in todo.values()
                  if (rc := codes.get(label, 0)) != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} training(s) failed: {'; '.join(failed)}")
        return len(todo)

    def evaluate(self, jobs: Sequence[EvalJob]) -> int:
        """Evaluate ``jobs`` (the unfinished ones: the caller checks :func:`is_evaluated`) in
        ``self.eval_jobs`` one-thread worker processes, each result written to its cache file;
        the number run. With ``eval_jobs = 1`` or a single job nothing runs here (0): the caller
        evaluates in its own process, with its own threads. A worker's error stops the run with it."""
        if self.eval_jobs == 1 or len(jobs) < 2 or self.print_only:
            return 0
        workers = min(self.eval_jobs, len(jobs))
        self.log(f"evaluating {len(jobs)} model(s) as {workers} one-thread workers")
        context = multiprocessing.get_context("spawn")  # a fork would copy the parent's OpenMP threads' state
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_one_thread_worker) as pool:
            futures = [pool.submit(_evaluate_in_worker, job) for job in jobs]
            try:
                for k, done in enumerate(as_completed(futures), 1):
                    self.log(f"[{k}/{len(jobs)}] evaluated {done.result()}")
            except BaseException:  # a failed evaluation or Ctrl-C: start no more (finished ones are cached)
                for f in futures:
                    f.cancel()
                raise
        return len(jobs)
