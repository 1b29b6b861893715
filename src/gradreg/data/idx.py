"""MNIST-style data sets in LeCun's IDX format, and the reader for that format.

IDX (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``0x00 0x00 <type> <ndim>``,
``ndim`` big-endian uint32 sizes, then the values, big-endian, in C order. The files are
usually gzip-compressed (``*.gz``); both forms are read here.

Registered data sets (images float32 ``(N, 1, 28, 28)`` in [0, 1], labels int64):

- ``mnist10k``: the real MNIST *test* set (10,000 images), the only real MNIST available
  offline, split into a fixed, class-stratified 8,000 train / 2,000 test. Report it as
  "MNIST-10k", never as MNIST.
- ``mnist``, ``fashion-mnist``: the standard 60,000 / 10,000 splits from the four IDX files.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from . import DATASETS
from .base import DataBundle, stratified_split
from .download import RESOURCES, MissingDataError, default_root, missing_files_message, verify_sha256
from .download import download as fetch_dataset  # the factories' ``download`` flag shadows the name

SPLIT_SEED = 0  # fixed: the 8,000/2,000 split is part of mnist10k's definition
MNIST10K_TEST_SIZE = 2000
MNIST10K_ENV = "GRADREG_MNIST10K_DIR"
MNIST10K_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
STANDARD_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# IDX type byte -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


class IdxFormatError(ValueError):
    """A file is not a complete, well-formed IDX file."""


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped if it starts with the gzip magic (the name is not trusted)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:  # truncated stream, bad CRC, garbled deflate data
        raise IdxFormatError(f"{path}: corrupt or truncated gzip data ({err})") from err


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into an array in native byte order, checking magic and exact size."""
    if len(data) < 4:
        raise IdxFormatError(f"{source}: {len(data)} bytes is too short for an IDX header")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{source}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000 <type> <ndim> with a type in "
            f"{{{', '.join(hex(t) for t in IDX_DTYPES)}}}); not an IDX file, or garbled"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{source}: truncated IDX header ({len(data)} of {header} bytes)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise IdxFormatError(f"{source}: IDX file {what}: header says shape {shape} ({expected} bytes), "
                             f"file holds {len(data)} bytes")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # own, writable, native-endian


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip-compressed or plain) into a numpy array."""
    path = Path(path)
    return parse_idx(_read_bytes(path), source=str(path))


def _find(directory: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``directory`` (plain first: it is what an unpacked copy holds)."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_images_labels(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An IDX image file ``(N, 28, 28)`` uint8 and its label file ``(N,)`` as float32
    ``(N, 1, 28, 28)`` in [0, 1] and int64 ``(N,)``."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IdxFormatError(f"{images_path}: expected uint8 images of shape (N, 28, 28), "
                             f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise IdxFormatError(f"{labels_path}: expected {images.shape[0]} uint8 labels, got {labels.dtype} "
                             f"{labels.shape}")
    x = (images.astype(np.float32) / 255.0)[:, None]  # (N, 28, 28) -> (N, 1, 28, 28)
    return x, labels.astype(np.int64)


def _bundle(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
            classes: tuple[str, ...] = ()) -> DataBundle:
    return DataBundle(
        name=name,
        train_x=torch.from_numpy(train[0]), train_y=torch.from_numpy(train[1]),
        test_x=torch.from_numpy(test[0]), test_y=torch.from_numpy(test[1]),
        num_classes=10, bounds=(0.0, 1.0),  # uint8 pixels divided by 255 in read_images_labels
        classes=classes, augment_kind="none",
    )


def mnist10k_candidates() -> list[Path]:
    """Where ``mnist10k`` looks without ``data_dir``, in order: ``$GRADREG_MNIST10K_DIR``, the
    shared folder next to the repository, the shared folder next to the working directory, and
    the download cache."""
    found = []
    if os.environ.get(MNIST10K_ENV):
        found.append(Path(os.environ[MNIST10K_ENV]).expanduser())
    repo_root = Path(__file__).resolve().parents[3]  # src/gradreg/data/idx.py -> repository root
    found += [repo_root.parent / "shared" / "data" / "mnist-test",
              Path.cwd().parent / "shared" / "data" / "mnist-test",
              default_root() / "mnist10k"]
    return found


def _resolve_mnist10k_dir(data_dir: str | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    candidates = mnist10k_candidates()
    for directory in candidates:
        if all((directory / f).is_file() for f in MNIST10K_FILES):
            return directory
    # Nothing found: a download lands in the cache; otherwise the error names every place tried.
    return candidates[-1]


@DATASETS.register("mnist10k")
def mnist10k(*, data_dir: str | None = None, download: bool = False) -> DataBundle:
    """Real MNIST test set (10,000), fixed stratified 8,000 train / 2,000 test; SHA-256 checked.

    Reads ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` from ``data_dir`` or
    the first of :func:`mnist10k_candidates` that holds both. Both files must be the canonical
    ones (SHA-256 as in the shared folder's README), so the split is the same everywhere.
    The split is ``stratified_split(y, test_size=2000, seed=0)``.
    """
    directory = _resolve_mnist10k_dir(data_dir)
    if download:
        fetch_dataset("mnist10k", directory=directory)
    missing = [f for f in MNIST10K_FILES if not (directory / f).is_file()]
    if missing:
        tried = [directory] if data_dir is not None else mnist10k_candidates()
        raise MissingDataError(missing_files_message(
            dataset="mnist10k", directory=directory, expected=MNIST10K_FILES, missing=missing,
            note="looked in: " + ", ".join(str(d) for d in tried) + f" (or set ${MNIST10K_ENV})",
        ))
    # The canonical gzip files' hashes pin the exact images, hence the exact split.
    for resource in RESOURCES["mnist10k"]:
        verify_sha256(directory / resource.filename, expected=resource.sha256)
    x, y = read_images_labels(directory / MNIST10K_FILES[0], directory / MNIST10K_FILES[1])
    tr, te = stratified_split(y, test_size=MNIST10K_TEST_SIZE, seed=SPLIT_SEED)
    return _bundle("mnist10k", (x[tr], y[tr]), (x[te], y[te]))


def load_standard(name: str, *, data_dir: str | None, download: bool,
                  classes: tuple[str, ...] = ()) -> DataBundle:
    """The four standard IDX files (``train-*``, ``t10k-*``, each plain or ``.gz``) of ``name``
    from ``data_dir`` (default: the download cache ``<root>/<name>``)."""
    directory = Path(data_dir).expanduser() if data_dir is not None else default_root() / name
    if download:
        fetch_dataset(name, directory=directory)
    paths = {stem: _find(directory, stem) for stem in STANDARD_STEMS}
    missing = [f"{stem}[.gz]" for stem, path in paths.items() if path is None]
    if missing:
        raise MissingDataError(missing_files_message(
            dataset=name, directory=directory, expected=[f"{s}[.gz]" for s in STANDARD_STEMS], missing=missing))
    found = [path for path in paths.values() if path is not None]  # all four, in STANDARD_STEMS order
    train = read_images_labels(found[0], found[1])
    test = read_images_labels(found[2], found[3])
    return _bundle(name, train, test, classes)


@DATASETS.register("mnist")
def mnist(*, data_dir: str | None = None, download: bool = False) -> DataBundle:
    """MNIST (LeCun et al.), 60,000 train / 10,000 test, from the four IDX files in ``data_dir``."""
    return load_standard("mnist", data_dir=data_dir, download=download)


@DATASETS.register("fashion-mnist")
def fashion_mnist(*, data_dir: str | None = None, download: bool = False) -> DataBundle:
    """Fashion-MNIST (Xiao et al. 2017), 60,000 train / 10,000 test, from four IDX files in ``data_dir``."""
    return load_standard("fashion-mnist", data_dir=data_dir, download=download, classes=FASHION_CLASSES)
