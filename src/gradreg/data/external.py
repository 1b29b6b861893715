"""Data from anywhere: ``package.module:factory``, image folders and tensor files.

``load_external(spec)`` turns any of these into a :class:`DataBundle` (in memory, pixels in
[0, 1]):

- ``package.module:factory`` — the factory (called with no arguments) returns a
  ``DataBundle``, a ``torch.utils.data.Dataset`` of ``(image, label)`` pairs, or a
  ``(train, test)`` pair of them;
- an image folder — one sub-folder per class (``DIR/cat/*.png``), or ``DIR/train/<class>``
  and ``DIR/test/<class>``; images read with Pillow, 8-bit values scaled to [0, 1];
- a tensor file — ``.npz`` or ``.safetensors`` holding ``x`` and ``y`` (or ``x_train``,
  ``y_train``, ``x_test``, ``y_test``; for evaluation ``x_test``, ``y_test`` alone); ``x`` is
  ``(N, C, H, W)``, ``(N, H, W, C)`` with C ∈ {1, 3} or ``(N, H, W)``, uint8 (scaled by 1/255)
  or float in [0, 1].

For training, a source without its own test split gets a fixed stratified 80/20 split (our
choice, the same as the built-in digits set). For evaluation (``test_only=True``: data given to
``eval``/``attack``) a source without a split is all test data, and a source with one gives
its test part.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DataBundle, stratified_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TENSOR_SUFFIXES = (".npz", ".safetensors")
SPLIT_SEED = 0
# The input range of what as_images returns: uint8 pixels are divided by 255; float images are taken as
# given and must already lie in it (DataBundle refuses values outside, e.g. floats in [0, 255]).
IMAGE_BOUNDS = (0.0, 1.0)


class DataError(ValueError):
    """A data source that cannot be read as images and labels (one-line message)."""


def is_external(spec: str) -> bool:
    """Whether ``spec`` names external data rather than a registered data set."""
    return ":" in spec or spec.endswith(TENSOR_SUFFIXES) or Path(spec).is_dir()


def is_path_spec(spec: str) -> bool:
    """Whether ``spec`` names a file or folder (recorded absolute in a run)."""
    return not is_factory_spec(spec) and (spec.endswith(TENSOR_SUFFIXES) or Path(spec).exists())


def absolute_spec(spec: str) -> str:
    """A relative file or folder as an absolute path (so a run can be evaluated from anywhere);
    anything else unchanged."""
    return str(Path(spec).resolve()) if is_path_spec(spec) and Path(spec).exists() else spec


def is_factory_spec(spec: str) -> bool:
    """Whether ``spec`` is ``package.module:factory`` (not a path that happens to hold a colon)."""
    return ":" in spec and not Path(spec).exists()


def load_external(spec: str, *, test_only: bool = False, **_: object) -> DataBundle:
    """The bundle of ``spec``; ``test_only``: evaluation data (module docstring): no 80/20 cut,
    the train split is the test split (only its statistics are ever read)."""
    if is_factory_spec(spec):
        bundle = _from_factory(spec, test_only=test_only)
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"data {spec!r} is neither a registered data set nor an existing file or folder")
        if path.is_dir():
            bundle = _from_folder(path, test_only=test_only)
        elif path.suffix in TENSOR_SUFFIXES:
            bundle = _from_tensor_file(path, test_only=test_only)
        else:
            raise DataError(f"cannot read data from {path} (expected a folder, .npz or .safetensors)")
    return bundle


# ----- tensors --------------------------------------------------------------------------
def as_images(x: np.ndarray | torch.Tensor, source: str) -> torch.Tensor:
    """Any common image layout → float32 (N, C, H, W) in :data:`IMAGE_BOUNDS` ([0, 1])."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dim() == 3:
        t = t[:, None]  # (N, H, W) → (N, 1, H, W)
    if t.dim() != 4:
        raise DataError(f"{source}: images must be (N, C, H, W), (N, H, W, C) or (N, H, W), got {tuple(t.shape)}")
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)  # (N, H, W, C) → (N, C, H, W)
    if t.dtype == torch.uint8:
        return t.float().div_(255.0).contiguous()
    if not t.is_floating_point():
        raise DataError(f"{source}: images must be uint8 or float, got {t.dtype}")
    return t.float().contiguous()


def as_labels(y: np.ndarray | torch.Tensor, source: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
    if t.is_floating_point() and bool((t != t.round()).any()):
        raise DataError(f"{source}: labels must be integers")
    t = t.long().reshape(-1)
    if t.numel() and int(t.min()) < 0:
        raise DataError(f"{source}: labels must be ≥ 0")
    return t


def _bundle(name: str, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor | None = None,
            y_test: torch.Tensor | None = None, classes: Sequence[str] = (), *, test_only: bool = False) -> DataBundle:
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} images but {len(y)} labels")
    if test_only:
        if x_test is None or y_test is None:  # evaluation data used whole
            x_test, y_test = x, y
        x, y = x_test, y_test
        if not len(y_test):
            raise DataError(f"{name}: no test points")
    if x_test is None or y_test is None:
        counts = torch.bincount(y)
        if len(y) < 10 or int(counts[counts > 0].min()) < 2:
            raise DataError(f"{name}: too few examples per class for a stratified train/test split")
        try:
            tr, te = stratified_split(y.numpy(), test_fraction=0.2, seed=SPLIT_SEED)
        except ValueError as err:  # e.g. fewer test points than classes
            raise DataError(f"{name}: cannot make a stratified 80/20 split ({str(err).splitlines()[0]}); "
                            "give more examples or your own x_test/y_test") from None
        x, y, x_test, y_test = x[tr], y[tr], x[te], y[te]
    elif len(x_test) != len(y_test):
        raise DataError(f"{name}: {len(x_test)} test images but {len(y_test)} test labels")
    num_classes = max(int(y.max()), int(y_test.max()) if len(y_test) else 0) + 1 if len(y) else 0
    num_classes = max(num_classes, len(classes))
    try:
        return DataBundle(name=name, train_x=x, train_y=y, test_x=x_test, test_y=y_test, num_classes=num_classes,
                          bounds=IMAGE_BOUNDS, classes=tuple(classes))
    except ValueError as err:
        raise DataError(str(err)) from None


def _from_tensor_file(path: Path, *, test_only: bool = False) -> DataBundle:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays: dict[str, Any] = {k: f[k] for k in f.files}
        except (OSError, ValueError) as err:
            raise DataError(f"{path} is not a readable .npz file ({err})") from None
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            arrays = dict(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise DataError(f"{path} is not a readable safetensors file ({err})") from None
    src = str(path)
    if "x_train" in arrays and "y_train" in arrays and "x_test" in arrays and "y_test" in arrays:
        return _bundle(path.stem, as_images(arrays["x_train"], src), as_labels(arrays["y_train"], src),
                       as_images(arrays["x_test"], src), as_labels(arrays["y_test"], src), test_only=test_only)
    if "x_test" in arrays and "y_test" in arrays and test_only:  # test arrays alone: enough to evaluate
        xt, yt = as_images(arrays["x_test"], src), as_labels(arrays["y_test"], src)
        return _bundle(path.stem, xt, yt, xt, yt, test_only=True)
    if "x" in arrays and "y" in arrays:
        return _bundle(path.stem, as_images(arrays["x"], src), as_labels(arrays["y"], src), test_only=test_only)
    if "x_test" in arrays and "y_test" in arrays:
        raise DataError(f"{path} holds only x_test and y_test: enough to evaluate a model (eval, attack), "
                        "not to train one (add x_train and y_train, or give x and y)")
    raise DataError(f"{path} must hold x and y (or x_train, y_train, x_test, y_test); it has {', '.join(arrays)}")


# ----- image folders ------------------------------------------------------------------------
def _read_class_folders(root: Path, classes: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(classes) if classes is not None else found
    if not names:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    extra = sorted(set(found) - set(names))
    if extra:
        raise DataError(f"{root} has classes that the training folder does not: {', '.join(extra)}")
    images, labels = [], []
    mode = None
    for label, name in enumerate(names):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for f in files:
            try:
                with Image.open(f) as im:
                    if mode is None:  # the first image decides: grey stays grey, anything else RGB
                        mode = "L" if im.mode in ("1", "L", "I;16", "I") else "RGB"
                    arr = np.asarray(im.convert(mode), dtype=np.uint8)
            except OSError as err:
                raise DataError(f"cannot read image {f} ({err})") from None
            images.append(arr)
            labels.append(label)
    if not images:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise DataError(f"images in {root} differ in size ({', '.join(map(str, sorted(shapes)))}); resize them to one size")
    x = as_images(np.stack(images), str(root))
    return x, torch.tensor(labels, dtype=torch.long), names


def _from_folder(root: Path, *, test_only: bool = False) -> DataBundle:
    train, test = root / "train", root / "test"
    if train.is_dir() and test.is_dir():
        x, y, names = _read_class_folders(train)
        xt, yt, _ = _read_class_folders(test, names)
        return _bundle(root.name, x, y, xt, yt, classes=names, test_only=test_only)
    x, y, names = _read_class_folders(root)
    return _bundle(root.name, x, y, classes=names, test_only=test_only)


# ----- factories ---------------------------------------------------------------------------
def dataset_tensors(ds: Any, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (image, label) pairs of a map-style or iterable Dataset, stacked."""
    from torch.utils.data import DataLoader

    xs, ys = [], []
    try:
        for xb, yb in DataLoader(ds, batch_size=256, shuffle=False):
            xs.append(torch.as_tensor(xb))
            ys.append(torch.as_tensor(yb))
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"{source}: items must be (image tensor, integer label) pairs ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not xs:
        raise DataError(f"{source}: the data set is empty")
    return as_images(torch.cat(xs), source), as_labels(torch.cat(ys), source)


def call_factory(spec: str) -> Any:
    """What ``package.module:factory`` returns (an object that is already a Dataset is taken as is)."""
    from torch.utils.data import Dataset

    from ..loading import LoadError, import_object

    try:
        factory = import_object(spec)
    except LoadError as err:
        raise DataError(str(err)) from None
    return factory() if callable(factory) and not isinstance(factory, Dataset) else factory


def bundle_from_object(spec: str, obj: Any, *, test_only: bool = False) -> DataBundle:
    """A factory's result in memory: a ``DataBundle`` as is, a Dataset or a (train, test) pair read whole."""
    name = spec.rsplit(":", 1)[1]
    if isinstance(obj, DataBundle):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        x, y = dataset_tensors(obj[0], f"{spec} (train)")
        xt, yt = dataset_tensors(obj[1], f"{spec} (test)")
        return _bundle(name, x, y, xt, yt, classes=getattr(obj[0], "classes", ()) or (), test_only=test_only)
    if hasattr(obj, "__getitem__") or hasattr(obj, "__iter__"):
        x, y = dataset_tensors(obj, spec)
        return _bundle(name, x, y, classes=getattr(obj, "classes", ()) or (), test_only=test_only)
    raise DataError(f"{spec} returned {type(obj).__name__}; expected a Dataset, a (train, test) pair or a DataBundle")


def _from_factory(spec: str, *, test_only: bool = False) -> DataBundle:
    return bundle_from_object(spec, call_factory(spec), test_only=test_only)
