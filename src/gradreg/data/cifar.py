"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the "python version" pickles.

Format (https://www.cs.toronto.edu/~kriz/cifar.html): each batch file is a Python-2 pickle
of a dict with ``b"data"``, a uint8 ``(N, 3072)`` array (1024 red, then green, then blue
values, each a 32×32 image in row-major order) and ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` (CIFAR-100), a list of N ints.

- ``cifar-10-batches-py/``: ``data_batch_1`` … ``data_batch_5`` (50,000), ``test_batch`` (10,000),
  ``batches.meta`` (``b"label_names"``).
- ``cifar-100-python/``: ``train`` (50,000), ``test`` (10,000), ``meta`` (``b"fine_label_names"``).

Images come out float32 ``(N, 3, 32, 32)`` in [0, 1], labels int64; ``augment_kind`` is
``"crop-flip"`` (the usual CIFAR training augmentation, see :mod:`gradreg.data.augment`).

Unpickling untrusted bytes can run arbitrary code, so these files are read with
:class:`RestrictedUnpickler`, which resolves only the few numpy names an array needs.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import DATASETS
from .base import DataBundle
from .download import MissingDataError, default_root, missing_files_message
from .download import download as fetch_dataset  # the factories' ``download`` flag shadows the name

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR100_DIR = "cifar-100-python"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list (it may be trying to run code)."""


def _numpy_reconstruct() -> Any:
    # numpy ≥ 2 moved the helper to numpy._core; the files name the old numpy.core path, and
    # importing that shim warns, so both names resolve to the new location directly.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]  # numpy < 2 names the module numpy.core
    return _reconstruct


# The whole allow-list: what a pickled numpy array needs. Dicts, lists, ints, strings and bytes
# are pickle opcodes and never reach find_class, so no builtins are needed.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays, dicts, lists and scalars.

    Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen`` …) raises
    :class:`UnsafePickleError` before it is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name} from a data pickle: only numpy array "
                f"reconstruction is allowed (the file may be malicious or not a CIFAR batch)"
            ) from None


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; Python-2 ``str`` become ``bytes``
    (``encoding="bytes"``), as the CIFAR files were written by Python 2."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def read_batch(path: Path, *, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file as uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``."""
    batch = restricted_loads(path.read_bytes())
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: not a CIFAR batch (expected a dict with b'data' and {label_key!r}, got {keys})")
    data, labels = batch[b"data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: b'data' must be a uint8 (N, 3072) array, got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {label_key!r} must hold {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)  # rows are R, G, B planes of 32×32


def read_label_names(path: Path, *, key: bytes) -> tuple[str, ...]:
    """Class names from a ``batches.meta``/``meta`` pickle, or () if the file is absent."""
    if not path.is_file():
        return ()
    meta = restricted_loads(path.read_bytes())
    names = meta.get(key, []) if isinstance(meta, dict) else []
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def resolve_dir(*, dataset: str, data_dir: str | None, folder: str, expected: tuple[str, ...],
                download: bool) -> Path:
    """The batches folder: ``data_dir/folder`` if it exists, else ``data_dir`` itself (the user
    pointed at the folder directly). Default ``data_dir``: the download cache ``<root>/<dataset>``.
    With ``download`` the archive is fetched into ``data_dir`` first (it unpacks to ``folder``)."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_root() / dataset
    if download and not (root / folder).is_dir() and not all((root / f).is_file() for f in expected):
        fetch_dataset(dataset, directory=root)
    directory = root / folder if (root / folder).is_dir() else root
    missing = [f for f in expected if not (directory / f).is_file()]
    if missing:
        raise MissingDataError(missing_files_message(
            dataset=dataset, directory=directory, expected=expected, missing=missing,
            note=f"data_dir may be the {folder}/ folder or the folder that contains it"))
    return directory


def _bundle(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            num_classes: int, classes: tuple[str, ...]) -> DataBundle:
    def to_float(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(torch.float32).div_(255.0)  # uint8 0..255 -> [0, 1]

    if len(classes) != num_classes:  # a meta file that does not fit is ignored, not trusted
        classes = ()

    return DataBundle(
        name=name,
        train_x=to_float(train[0]), train_y=torch.from_numpy(train[1]),
        test_x=to_float(test[0]), test_y=torch.from_numpy(test[1]),
        num_classes=num_classes, bounds=(0.0, 1.0),  # uint8 pixels divided by 255 in to_float
        classes=classes, augment_kind="crop-flip",
    )


@DATASETS.register("cifar10")
def cifar10(*, data_dir: str | None = None, download: bool = False) -> DataBundle:
    """CIFAR-10, 50,000 train / 10,000 test, 3×32×32, from ``cifar-10-batches-py`` (python pickles)."""
    expected = (*CIFAR10_TRAIN, CIFAR10_TEST)
    directory = resolve_dir(dataset="cifar10", data_dir=data_dir, folder=CIFAR10_DIR, expected=expected,
                            download=download)
    parts = [read_batch(directory / f, label_key=b"labels") for f in CIFAR10_TRAIN]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = read_batch(directory / CIFAR10_TEST, label_key=b"labels")
    classes = read_label_names(directory / "batches.meta", key=b"label_names") or CIFAR10_CLASSES
    return _bundle("cifar10", train, test, 10, classes)


@DATASETS.register("cifar100")
def cifar100(*, data_dir: str | None = None, download: bool = False) -> DataBundle:
    """CIFAR-100 (fine labels), 50,000 train / 10,000 test, 3×32×32, from ``cifar-100-python``."""
    directory = resolve_dir(dataset="cifar100", data_dir=data_dir, folder=CIFAR100_DIR, expected=("train", "test"),
                            download=download)
    train = read_batch(directory / "train", label_key=b"fine_labels")
    test = read_batch(directory / "test", label_key=b"fine_labels")
    return _bundle("cifar100", train, test, 100, read_label_names(directory / "meta", key=b"fine_label_names"))
