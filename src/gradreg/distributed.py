"""torch.distributed glue: process-group set-up from torchrun's environment, sharding and
reductions that are no-ops in a single process.

gradreg's loop is written for data parallelism from the start: every rank takes rows
``rank::world`` of each *global* batch (indexed from the data set in memory, or read through a
DataLoader with the same rows, :class:`gradreg.data.stream.ShardSampler`), and
DistributedDataParallel averages the gradients, so N ranks with global batch B follow the 1-rank
run with batch B.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch
import torch.distributed as dist


_joined = False  # this process joined a process group (kept after leaving it)


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def was_active() -> bool:
    """True in a process that joined a process group, even after :func:`shutdown`."""
    return _joined


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if is_active():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, nccl
    on CUDA). Returns True when running distributed."""
    if is_active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    global _joined
    _joined = True
    return True


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if is_active() else torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over ranks in place (nothing to do in a single process)."""
    if is_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(n: int) -> slice:
    """This rank's contiguous share of ``range(n)`` (for evaluation; sizes differ by ≤ 1)."""
    rank, world = rank_world()
    start = n * rank // world
    return slice(start, n * (rank + 1) // world)


def gather_cat(t: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate every rank's contiguous shard (see :func:`shard`) back into ``n_total`` rows."""
    if not is_active():
        return t
    world = dist.get_world_size()
    sizes = [n_total * (r + 1) // world - n_total * r // world for r in range(world)]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_gather_rows(index: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (index ``(n_r,)``, rows ``(n_r, ...)``) concatenated, on every rank. Ranks
    may hold different numbers of rows (a global batch split unevenly)."""
    if not is_active():
        return index, rows
    world = dist.get_world_size()
    dev = rows.device if rows.device.type == "cuda" else torch.device("cpu")
    count = torch.tensor([index.numel()], device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = int(max(int(c) for c in counts))
    pad_i = torch.full((most,), -1, dtype=torch.long, device=dev)
    pad_i[: index.numel()] = index.to(dev)
    pad_r = rows.new_zeros((most, *rows.shape[1:])).to(dev)
    pad_r[: rows.shape[0]] = rows.to(dev)
    all_i = [torch.empty_like(pad_i) for _ in range(world)]
    all_r = [torch.empty_like(pad_r) for _ in range(world)]
    dist.all_gather(all_i, pad_i)
    dist.all_gather(all_r, pad_r)
    idx, out = torch.cat(all_i), torch.cat(all_r)
    keep = idx >= 0
    return idx[keep].to(index.device), out[keep].to(rows.device)


def shutdown() -> None:
    """Wait for every rank, then leave the process group. Exiting with the group still up lets
    gloo's threads die mid-flight ("terminate called without an active exception", SIGABRT).
    Only a group that gradreg joined (:func:`init_from_env`) is left; a caller's own stays up."""
    if is_active() and _joined:
        # tensors still held by finished collectives are freed now, while the interpreter is whole
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a torchrun rank with exit status ``code`` without Python's interpreter finalization.

    A rank's results are written and its files closed by the time it gets here. What finalization
    would add is a teardown race: a C++ thread of the collective backend that still frees a tensor
    needs the GIL, and a thread that asks for the GIL while the interpreter is being torn down
    is ended by force, which C++ answers with std::terminate ("terminate called without an
    active exception", SIGABRT). torchrun then reports the rank as failed with signal 6 although
    its work was done, or hides the status the rank meant to return. This was seen on this
    project's 2-core CI, rarely and under load; skipping finalization is our choice of cure."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


def barrier() -> None:
    if is_active():
        dist.barrier()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Re-run ``gradreg ARGV`` under ``torchrun --standalone --nproc_per_node NPROC``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "gradreg", *argv]
    return subprocess.call(cmd)
