"""Training data read batch by batch through a ``torch.utils.data.DataLoader`` (the streaming
path), for data sets that should not be held in memory.

Both paths are a :class:`~gradreg.data.source.TrainSource`; they differ only in how a row is
read. The in-memory path (:class:`~gradreg.data.source.TensorRows`) indexes tensors; the
streaming path (:class:`DatasetRows`) reads the *same* rows through a DataLoader whose batch
sampler (:class:`ShardSampler`) walks the trainer's per-epoch permutation and takes this rank's
rows ``rank::world`` of every global batch, exactly as the in-memory loop does. Augmentation and
the penalties' random draws happen on the batch afterwards, in the trainer, so both paths give
the same batches, the same steps and the same weights.

Which path a run takes (``TrainConfig.data_loader``):

- ``"memory"``: always the tensors (a factory's Dataset is read into memory once);
- ``"stream"``: always a DataLoader (data gradreg holds anyway is wrapped in a ``TensorDataset``);
- ``"auto"`` (default): stream only a map-style Dataset returned by a ``package.module:factory``
  whose float32 training images would take more than :data:`STREAM_ABOVE_BYTES`; everything
  else (registered sets, image folders, tensor files, small Datasets) is held in memory.

What streaming still holds in memory: the test (or validation) split, one label per training
row, and up to :data:`SETUP_ROWS` training images for the penalties' ``setup`` (our choice:
SGR's data variance and LRC-aug's data scale are estimated from those rows when the training set
is larger; opnorm's warm start keeps a vector per row and is refused then). The per-channel
mean/std are computed in one pass over the training Dataset (float64 sums).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, TensorDataset

from .base import DataBundle, stratified_split
from .external import IMAGE_BOUNDS, SPLIT_SEED, DataError, as_images, as_labels, dataset_tensors
from .source import TrainSource, shard_of

STREAM_ABOVE_BYTES = 2**30  # "auto" streams a Dataset whose float32 training images exceed 1 GiB (our choice)
SETUP_ROWS = 10_000  # training images handed to the penalties' setup on the streaming path (our choice)
SCAN_BATCH = 256


@dataclass(frozen=True, eq=False)
class DatasetRows:
    """Training rows read from a map-style ``Dataset`` through a DataLoader (the streaming
    :class:`~gradreg.data.source.TrainRows`). Items are ``(image, label)`` in any layout
    :mod:`gradreg.data.external` accepts, converted per batch by :meth:`batch`."""

    dataset: Dataset[Any]
    name: str  # for error messages
    num_workers: int = 0
    device: torch.device = torch.device("cpu")  # where the batches are delivered
    note: str = " (streamed)"

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))  # map-style (open_training_data checks it): it has a length

    def batch(self, items: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated ``(images, labels)`` batch as float32 ``(B, C, H, W)`` and int64 ``(B,)``,
        converted exactly as the in-memory loaders convert the whole set."""
        xb, yb = items
        return as_images(torch.as_tensor(xb), self.name), as_labels(torch.as_tensor(yb), self.name)

    def shards(self, order: torch.Tensor, *, batch_size: int, rank: int, world: int,
               start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cuda = self.device.type == "cuda"
        sampler = ShardSampler(order, batch_size=batch_size, rank=rank, world=world, start=start)
        for items in epoch_loader(self.dataset, sampler, num_workers=self.num_workers, pin_memory=cuda):
            x, y = self.batch(items)  # (B, C, H, W), (B,)
            yield x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)

    def read(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # dataset_tensors' DataLoader has no generator of its own, so this read draws one number
        # (its base seed) from the global RNG; the monitor reads its rows after the trainer's
        # reseed, so that draw is part of a streamed run's numbers and is kept (a model that draws
        # from the global RNG, e.g. dropout, therefore differs between the two paths)
        return dataset_tensors(Subset(self.dataset, index.tolist()), self.name)

    def setup_images(self) -> torch.Tensor:
        """The first :data:`SETUP_ROWS` training images ``(S, C, H, W)`` (all of them when fewer)."""
        rows = Subset(self.dataset, range(min(SETUP_ROWS, len(self))))
        return torch.cat([self.batch(b)[0] for b in _loader(rows, num_workers=self.num_workers)])

    def subset(self, index: torch.Tensor) -> DatasetRows:
        return replace(self, dataset=Subset(self.dataset, index.tolist()))

    def to(self, device: torch.device) -> DatasetRows:
        return replace(self, device=device)


class ShardSampler(Sampler[list[int]]):
    """This rank's rows ``rank::world`` of every global batch of ``order`` (one epoch's
    permutation), from step ``start`` on: the rows the in-memory loop indexes, as index lists."""

    def __init__(self, order: torch.Tensor, *, batch_size: int, rank: int, world: int, start: int = 0) -> None:
        self.order, self.batch_size, self.rank, self.world, self.start = order.cpu(), batch_size, rank, world, start

    def __len__(self) -> int:
        return max(math.ceil(len(self.order) / self.batch_size) - self.start, 0)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.start + len(self)):
            yield shard_of(self.order, step, batch_size=self.batch_size, rank=self.rank, world=self.world).tolist()


def epoch_loader(dataset: Dataset[Any], sampler: ShardSampler, *, num_workers: int, pin_memory: bool) -> DataLoader[Any]:
    """One epoch's DataLoader. It gets its own generator: a DataLoader draws its workers' base
    seed when iterated, and from the global RNG otherwise, which would shift every later random
    draw of the run (and break equality with the in-memory path and exact resume)."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(0))


def _loader(ds: Dataset[Any], *, num_workers: int) -> DataLoader[Any]:
    return DataLoader(ds, batch_size=SCAN_BATCH, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(0))


def _is_map_style(obj: Any) -> bool:
    return isinstance(obj, Dataset) and not isinstance(obj, IterableDataset) and hasattr(obj, "__len__")


def _float_bytes(ds: Any) -> int:
    """What the float32 training images of a map-style Dataset would take in memory."""
    if len(ds) == 0:
        return 0
    return 4 * len(ds) * torch.as_tensor(ds[0][0]).numel()


def _labels_of(ds: Any, source: str, *, num_workers: int) -> torch.Tensor:
    """All labels: the Dataset's ``targets`` when it has them, else one pass over it."""
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == len(ds):
        return as_labels(torch.as_tensor(targets), source)
    return torch.cat([as_labels(torch.as_tensor(yb), source) for _, yb in _loader(ds, num_workers=num_workers)])


def _channel_stats(ds: Dataset[Any], source: str, *, num_workers: int) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    """(in_shape, mean, std) of the training images in one pass (float64 sums; the unbiased std
    over N·H·W values per channel, as ``DataBundle`` computes it), checking the values as
    ``DataBundle`` does: finite and in [0, 1]."""
    n = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    shape: tuple[int, int, int] | None = None
    for xb, _ in _loader(ds, num_workers=num_workers):
        x = as_images(torch.as_tensor(xb), source)  # (B, C, H, W)
        if not torch.isfinite(x).all():
            raise DataError(f"{source}: train images contain NaN or infinite values")
        if float(x.min()) < 0.0 or float(x.max()) > 1.0:
            raise DataError(f"{source}: train images have values outside [0, 1] (normalization belongs in the model)")
        c, h, w = (int(d) for d in x.shape[1:])
        shape = shape or (c, h, w)
        xd = x.double()
        total = xd.sum(dim=(0, 2, 3)) + (0 if total is None else total)
        squares = xd.pow(2).sum(dim=(0, 2, 3)) + (0 if squares is None else squares)
        n += x.shape[0] * h * w
    if shape is None or total is None or squares is None:
        raise DataError(f"{source}: the data set is empty")
    mean = total / n
    std = ((squares - n * mean.pow(2)) / max(n - 1, 1)).clamp_min(0).sqrt()
    # rounded to float32, the precision of the in-memory statistics: the exact value rounds to the
    # same float as their (accurate) float32 reduction, so both paths normalize alike
    return (shape, tuple(float(v) for v in mean.float()),
            tuple(max(float(v), 1e-6) for v in std.float()))


def from_datasets(name: str, train: Dataset[Any], test: Dataset[Any] | None, *, num_workers: int = 0,
                  classes: tuple[str, ...] = ()) -> TrainSource:
    """Stream ``train``; ``test`` (or, without one, the fixed stratified 20 % of ``train`` that the
    in-memory path would hold out) is read into memory."""
    labels = _labels_of(train, name, num_workers=num_workers)
    if test is None:  # the same split as data.external's in-memory bundle: the same labels, the same seed
        try:
            tr, te = stratified_split(labels.numpy(), test_fraction=0.2, seed=SPLIT_SEED)
        except ValueError as err:
            raise DataError(f"{name}: cannot make a stratified 80/20 split ({str(err).splitlines()[0]})") from None
        test = Subset(train, te.tolist())
        train, labels = Subset(train, tr.tolist()), labels[torch.as_tensor(tr)]
    test_x, test_y = dataset_tensors(test, f"{name} (test)")
    in_shape, mean, std = _channel_stats(train, name, num_workers=num_workers)
    if tuple(test_x.shape[1:]) != in_shape:
        raise DataError(f"{name}: test images are {tuple(test_x.shape[1:])}, train images {in_shape}")
    num_classes = max(int(labels.max()) if len(labels) else -1, int(test_y.max()) if len(test_y) else -1) + 1
    num_classes = max(num_classes, len(classes))
    # external images are scaled to IMAGE_BOUNDS by as_images (batch() converts with it, as the
    # in-memory loader does), and _channel_stats checked they lie there
    return TrainSource(name=name, rows=DatasetRows(train, name, num_workers=num_workers), train_y=labels,
                       held_out=lambda: (test_x, test_y), num_classes=num_classes, in_shape=in_shape, mean=mean,
                       std=std, bounds=IMAGE_BOUNDS,
                       classes=tuple(classes) or tuple(str(i) for i in range(num_classes)))


def from_bundle(bundle: DataBundle, *, num_workers: int = 0) -> TrainSource:
    """Stream a bundle held in memory anyway (``--data-loader stream`` on any data): its statistics
    and splits are kept, so the run equals the in-memory one."""
    rows = DatasetRows(TensorDataset(bundle.train_x, bundle.train_y), bundle.name, num_workers=num_workers)
    return replace(TrainSource.from_bundle(bundle), rows=rows)


def open_training_data(spec: str, *, loader: str, num_workers: int = 0, **params: object) -> TrainSource:
    """The training data of a run, in memory or streamed by the rule of ``loader`` (see the
    module docstring). A factory is called once."""
    from . import external, load

    if loader == "memory":
        return TrainSource.from_bundle(load(spec, **params))
    from . import DATASETS

    obj: Any = None
    if spec not in DATASETS and external.is_external(spec) and external.is_factory_spec(spec):
        obj = external.call_factory(spec)
        pair = isinstance(obj, tuple) and len(obj) == 2
        train = obj[0] if pair else obj
        if _is_map_style(train) and (loader == "stream" or _float_bytes(train) > STREAM_ABOVE_BYTES):
            name = spec.rsplit(":", 1)[1]
            return from_datasets(name, train, obj[1] if pair else None, num_workers=num_workers,
                                 classes=tuple(getattr(train, "classes", ()) or ()))
        if not isinstance(obj, DataBundle) and not _is_map_style(train) and loader == "stream":
            raise DataError(f"{spec}: streaming needs a map-style Dataset (with __len__ and __getitem__), "
                            f"got {type(train).__name__}; use --data-loader memory")
    bundle = external.bundle_from_object(spec, obj) if obj is not None else load(spec, **params)
    return from_bundle(bundle, num_workers=num_workers) if loader == "stream" else TrainSource.from_bundle(bundle)
