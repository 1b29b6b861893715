"""One fixed piece of work, two ways to spend the cores on it: N one-thread worker processes
(``gradreg reproduce --jobs N``, :class:`gradreg.runner.Runner` with ``jobs = N``) against one
process whose torch uses N intra-op threads (``--jobs 1`` with N threads).

The work is either a wave of independent trainings (``--methods``, each ``--epochs`` epochs of
the C&W CNN on ``--data``, batch 128), trained from scratch in fresh folders by each mode, or
(``--evaluate RUN ...``) the evaluations of finished runs with an experiment budget's protocol
(``--experiment``, ``--budget``: what ``gradreg reproduce`` runs on each row), into fresh cache
folders by each mode. The two modes alternate over ``--rounds`` rounds (a background load slows
both alike). Reported: each mode's wall time per round and the median ratio.

    python benchmarks/workers.py --data mnist10k --methods clean gn fgsm-rs trades --epochs 1 --rounds 2
    python benchmarks/workers.py --evaluate out/runs/clean-s0 out/runs/gn-s0 ... --experiment family-mnist10k --budget cpu
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gradreg import __version__, experiments
from gradreg.config import TrainConfig
from gradreg.data import load as load_data
from gradreg.protocols import cached_evaluation
from gradreg.reproduce import audited, eval_settings
from gradreg.runner import EvalJob, Runner
from gradreg.runs import load_run


def wave(methods: list[str], args: argparse.Namespace, out: Path) -> list[tuple[str, TrainConfig]]:
    """The fixed work: one training per method, in its own folder under ``out``."""
    return [(m, TrainConfig(data=args.data, model="cw", method=m, epochs=args.epochs, batch_size=128, seed=0,
                            out=str(out / m), monitor=False).validate()) for m in methods]


def evaluations(args: argparse.Namespace, out: Path) -> list[EvalJob]:
    """The fixed work of ``--evaluate``: each run evaluated as ``reproduce`` evaluates a row of
    the budget (the Square audit on the runs whose method holds a gradient penalty)."""
    exp = experiments.load(args.experiment).for_budget(args.budget)
    budget = exp.budget(args.budget)
    settings = eval_settings(exp, budget)
    jobs = []
    for k, run in enumerate(args.evaluate):
        method = load_run(run, device="cpu").config["config"]["method"]
        row = next((r for r in exp.rows if r.method == method), None)
        square = int(budget.get("square_n", 0)) if settings.autoattack and row is not None and audited(row) else 0
        jobs.append(EvalJob(label=f"{k}:{Path(run).name}", run_dir=str(run), device="cpu", data=budget["data"],
                            data_dir=args.data_dir, name=f"{k}:{Path(run).name}", cache=str(out / f"{k}.json"),
                            settings=dataclasses.replace(settings, square_n=square,
                                                         aa_cache=str(out / "aa") if settings.autoattack else None)))
    return jobs


def timed(jobs: int, threads: int, args: argparse.Namespace, root: Path) -> float:
    """Wall seconds for the work with ``jobs`` workers (jobs = 1: in this process on ``threads``)."""
    out = Path(tempfile.mkdtemp(dir=root))
    torch.set_num_threads(threads)
    started = time.perf_counter()
    runner = Runner(jobs=jobs, eval_jobs=jobs, log=lambda s: None)
    if not args.evaluate:
        runner.run(wave(args.methods, args, out))
        return time.perf_counter() - started
    todo = evaluations(args, out)
    if runner.evaluate(todo) == 0:  # one job: evaluated here, on this process's threads
        bundle = load_data(todo[0].data, data_dir=args.data_dir)
        for job in todo:
            model = load_run(job.run_dir, device="cpu").model
            cached_evaluation(model, bundle, job.settings, cache=Path(job.cache), name=job.name, progress=False)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="mnist10k")
    ap.add_argument("--methods", nargs="+", default=["clean", "gn", "fgsm-rs", "trades"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cores", type=int, default=2, help="N: workers of one thread vs one process of N threads")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--evaluate", nargs="+", metavar="RUN", help="finished run folders: time their evaluations instead")
    ap.add_argument("--experiment", default="family-mnist10k", help="--evaluate: the experiment whose protocol runs")
    ap.add_argument("--budget", default="cpu", help="--evaluate: the experiment's budget")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    workers: list[float] = []
    threaded: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = [("workers", args.cores, 1), ("threads", 1, args.cores)]
            for name, jobs, threads in order if r % 2 == 0 else order[::-1]:
                seconds = timed(jobs, threads, args, Path(tmp))
                (workers if name == "workers" else threaded).append(seconds)
                print(f"round {r + 1}: {name}: {seconds:.1f} s", flush=True)
    ratio = statistics.median(t / w for t, w in zip(threaded, workers))
    print(f"\n# workers vs threads: gradreg {__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}")
    if args.evaluate:
        print(f"# work: the evaluations of {len(args.evaluate)} run(s) ({', '.join(Path(r).name for r in args.evaluate)}) "
              f"with {args.experiment} --budget {args.budget}'s protocol; {args.rounds} rounds, modes alternating")
    else:
        print(f"# work: {', '.join(args.methods)} on {args.data}, C&W CNN, {args.epochs} epoch(s), batch 128; "
              f"{args.rounds} rounds, modes alternating")
    print(f"| mode | wall per round (s) |\n|---|---|")
    print(f"| {args.cores} one-thread workers | {', '.join(f'{t:.1f}' for t in workers)} |")
    print(f"| 1 process, {args.cores} threads | {', '.join(f'{t:.1f}' for t in threaded)} |")
    print(f"\nthreads / workers, median over rounds: {ratio:.2f}×")


if __name__ == "__main__":
    main()
