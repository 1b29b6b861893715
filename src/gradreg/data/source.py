"""One interface to a run's training data: :class:`TrainSource`.

The trainer needs four things of its training data, whatever holds it:

- **batches** for one epoch's permutation from a start step (exact resume), each rank taking
  rows ``rank::world`` of every global batch (:meth:`TrainSource.batches`, yielding
  :class:`TrainBatch`: the images and labels it trains on plus where they sit in the global
  batch, for the rank-independent random draws and the DDP loss share);
- **rows** by index (:meth:`TrainSource.read`: the monitor's fixed batch, the validation part)
  and the rows the penalties' ``setup`` estimates from (:meth:`TrainSource.setup_images`);
- **what the data is**: name, classes, shape, per-channel mean/std and the input bounds;
- a **held-out split** (the test split, or the validation split once carved; read on first
  use, so carving a validation split never reads the test split) and one
  :func:`gradreg.data.validation.carve_validation` for every source.

Design (our choice): *one* class, not one per data path. What differs between the paths is only
how a training row is read, so that is the one thing behind a protocol, :class:`TrainRows`:
:class:`TensorRows` indexes tensors held in memory (the trivial case, the fast path) and
:class:`gradreg.data.stream.DatasetRows` reads a ``Dataset`` through a DataLoader whose batch
sampler walks the same permutation. Everything else — labels, statistics, bounds, the held-out
split, the global-batch bookkeeping of :meth:`TrainSource.batches` — exists once, so the two
paths cannot drift apart and the trainer never asks which one it has. The loaders keep
returning :class:`~gradreg.data.DataBundle` (train and test tensors, what evaluation reads);
:meth:`TrainSource.from_bundle` wraps one without copying.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .base import DataBundle


def shard_of(order: torch.Tensor, step: int, *, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows ``rank::world`` of global batch ``step`` of ``order`` (one epoch's permutation)."""
    return order[step * batch_size:(step + 1) * batch_size][rank::world]


class TrainRows(Protocol):
    """How the training rows of a :class:`TrainSource` are read (in memory or streamed).

    Images come back float32 ``(M, C, H, W)`` in the data's bounds, labels int64 ``(M,)``."""

    @property
    def note(self) -> str:
        """What the summary says about the path ("" in memory, " (streamed)")."""
        ...

    def __len__(self) -> int: ...

    def shards(self, order: torch.Tensor, *, batch_size: int, rank: int, world: int,
               start: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (images, labels) of every global batch of ``order`` from step ``start``
        on (the rows :func:`shard_of` names), on the device given to :meth:`to`."""
        ...

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the rows ``index``, in that order."""
        ...

    def setup_images(self) -> torch.Tensor:
        """The images the penalties' ``setup`` estimates from: all of them, or a prefix."""
        ...

    def subset(self, index: torch.Tensor) -> TrainRows:
        """Only the rows ``index`` (renumbered ``0..len(index)-1``)."""
        ...

    def to(self, device: torch.device) -> TrainRows:
        """The same rows, delivered on ``device``."""
        ...


@dataclass(frozen=True, eq=False)
class TensorRows:
    """Training rows held as tensors: ``x`` ``(N, C, H, W)``, ``y`` ``(N,)``; a batch is an index."""

    x: torch.Tensor
    y: torch.Tensor
    note: str = ""

    def __len__(self) -> int:
        return len(self.y)

    def shards(self, order: torch.Tensor, *, batch_size: int, rank: int, world: int,
               start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(start, math.ceil(len(order) / batch_size)):
            local = shard_of(order, step, batch_size=batch_size, rank=rank, world=world)
            yield self.x[local], self.y[local]  # (B, C, H, W), (B,)

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def setup_images(self) -> torch.Tensor:
        return self.x  # held anyway: the penalties see every row

    def subset(self, index: torch.Tensor) -> TensorRows:
        return TensorRows(self.x[index], self.y[index])

    def to(self, device: torch.device) -> TensorRows:
        # moved once: every step then indexes on the device (the fast path)
        return TensorRows(self.x.to(device), self.y.to(device))


@dataclass(frozen=True, eq=False)
class TrainBatch:
    """One step's rows on this rank: what :meth:`gradreg.trainer.Trainer.train_step` trains on."""

    step: int  # position in the epoch
    x: torch.Tensor  # (B, C, H, W) images
    y: torch.Tensor  # (B,) main labels
    index: torch.Tensor  # (B,) their rows of the training set (for per-example penalty state)
    rows: torch.Tensor  # (B,) their positions in the global batch (rank-independent random draws)
    global_size: int  # rows in the global batch, over all ranks

    @property
    def share(self) -> float:
        """This rank's fraction of the global batch (DDP averages over ranks, so the local mean
        loss is scaled by ``share·world`` to make the global-batch mean)."""
        return len(self.index) / self.global_size


@dataclass(frozen=True, eq=False)
class TrainSource:
    """A run's training data (module docstring): rows read by ``rows``, everything else held once.

    ``train_y``: ``(N,)`` labels of every training row, in memory on either path (sizes, the
    stratified validation carve). ``held_out``: returns the ``(test_x, test_y)`` split when first
    asked (:attr:`test_x`, :attr:`test_y`): the test split, or the validation split once carved.
    """

    name: str
    rows: TrainRows
    train_y: torch.Tensor
    held_out: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    bounds: tuple[float, float]
    classes: tuple[str, ...] = field(default=())
    augment_kind: str = "none"

    @classmethod
    def from_bundle(cls, bundle: DataBundle) -> TrainSource:
        """The in-memory source of a bundle: its tensors indexed, its test split read only when asked."""
        return cls(name=bundle.name, rows=TensorRows(bundle.train_x, bundle.train_y), train_y=bundle.train_y,
                   held_out=lambda: (bundle.test_x, bundle.test_y), num_classes=bundle.num_classes,
                   in_shape=bundle.in_shape, mean=bundle.mean, std=bundle.std, bounds=bundle.bounds,
                   classes=bundle.classes, augment_kind=bundle.augment_kind)

    def __len__(self) -> int:
        return len(self.train_y)

    @cached_property
    def _held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.held_out()

    @property
    def test_x(self) -> torch.Tensor:
        """``(M, C, H, W)`` images of the held-out split."""
        return self._held_out[0]

    @property
    def test_y(self) -> torch.Tensor:
        """``(M,)`` labels of the held-out split."""
        return self._held_out[1]

    def summary(self) -> str:
        c, h, w = self.in_shape
        return (f"{self.name}: {len(self)} train{self.rows.note} / {len(self.test_y)} test, {c}×{h}×{w}, "
                f"{self.num_classes} classes, bounds {self.bounds}")

    def to(self, device: torch.device) -> TrainSource:
        """The same source, its training batches delivered on ``device``."""
        return replace(self, rows=self.rows.to(device))

    def batches(self, order: torch.Tensor, *, batch_size: int, start: int = 0, rank: int = 0,
                world: int = 1) -> Iterator[TrainBatch]:
        """This rank's :class:`TrainBatch` of every global batch of ``order`` (one epoch's
        permutation of ``0..N-1``) from step ``start`` on: the same rows on either path, so a
        resumed epoch continues exactly where it stopped."""
        steps = math.ceil(len(order) / batch_size)
        images = self.rows.shards(order, batch_size=batch_size, rank=rank, world=world, start=start)
        for step, (x, y) in zip(range(start, steps), images):
            global_size = len(order[step * batch_size:(step + 1) * batch_size])
            yield TrainBatch(step=step, x=x, y=y,
                             index=shard_of(order, step, batch_size=batch_size, rank=rank, world=world),
                             rows=torch.arange(global_size)[rank::world], global_size=global_size)

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images ``(M, C, H, W)`` and labels ``(M,)`` of the rows ``index``."""
        return self.rows.read(index)

    def setup_images(self) -> torch.Tensor:
        """The training images the penalties' ``setup`` sees (:meth:`TrainRows.setup_images`)."""
        return self.rows.setup_images()
