"""Data loaders, downloads and augmentation.

Small files are written here in the exact on-disk formats (IDX by hand with ``struct``;
CIFAR batches as Python-2-style pickles), so the loaders are checked against data whose
content the test knows independently of the code under test.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gradreg import data
from gradreg.data import augment as aug
from gradreg.data import cifar, download as dl, idx
from gradreg.data.base import stratified_split

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-test"
needs_shared_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(), reason="shared MNIST test set not present"
)


# ----------------------------------------------------------------------------- format writers
def idx_bytes(arr: np.ndarray, *, type_code: int = 0x08) -> bytes:
    """IDX encoding written from the format description: 0,0,type,ndim; big-endian dims; data."""
    be = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    head = bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(be).tobytes(order="C")


def write_idx(path: Path, arr: np.ndarray, *, gz: bool, type_code: int = 0x08) -> Path:
    raw = idx_bytes(arr, type_code=type_code)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_mnist_dir(directory: Path, *, n_train: int, n_test: int, seed: int, gz: bool | None) -> dict:
    """The four standard IDX files; ``gz=None`` mixes compressed and plain files."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for i, (stem, arr) in enumerate(arrays.items()):
        compress = (i % 2 == 0) if gz is None else gz
        write_idx(directory / (stem + (".gz" if compress else "")), arr, gz=compress)
    return arrays


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes ``str``/``bytes`` as Python 2 ``str`` (BINSTRING opcodes), as the CIFAR files,
    pickled by Python 2, hold them; Python 3's protocol 2 would route bytes through
    ``_codecs.encode`` instead, which real files never contain."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        raw = obj if isinstance(obj, bytes) else obj.encode("latin-1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy ≥ 2 names numpy._core; the real (numpy 1.x era) files name numpy.core.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """The CIFAR row layout from its description: 1024 red values, then green, then blue,
    each plane row-major, built with explicit concatenation (not a reshape)."""
    rows = [np.concatenate([images[n, c].ravel() for c in range(3)]) for n in range(len(images))]
    return np.stack(rows).astype(np.uint8)


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], *, label_key: bytes) -> None:
    obj = {b"batch_label": b"synthetic batch", label_key: labels, b"data": cifar_rows(images),
           b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
    if label_key == b"fine_labels":
        obj[b"coarse_labels"] = [lab % 20 for lab in labels]
    path.write_bytes(py2_pickle(obj))


def write_cifar10(root: Path, *, n_per_batch: int, seed: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        images = rng.integers(0, 256, (n_per_batch, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        write_cifar_batch(folder / name, images, labels, label_key=b"labels")
        batches[name] = (images, labels)
    names = [f"class{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": names, b"num_vis": 3072}))
    return batches


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    ints = rng.integers(-2**31, 2**31 - 1, (3, 4), dtype=np.int64).astype(np.int32)
    floats = rng.standard_normal(5).astype(np.float32)
    for name, arr, code in (("u8", images, 0x08), ("i32", ints, 0x0C), ("f32", floats, 0x0D)):
        got = idx.read_idx(write_idx(tmp_path / name, arr, gz=gz, type_code=code))
        assert got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    good = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28) % 251)
    cases = {
        "truncated": good[:-10],
        "trailing": good + b"\x00",
        "header_only": good[:6],
        "bad_magic": b"\x12\x34" + good[2:],
        "bad_type": good[:2] + b"\x07" + good[3:],
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(idx.IdxFormatError):
            idx.read_idx(tmp_path / name)
    # A cut-off gzip stream and one with a flipped byte in its body.
    gz = gzip.compress(good)
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    garbled = bytearray(gz)
    garbled[len(gz) // 2] ^= 0xFF
    (tmp_path / "garbled.gz").write_bytes(bytes(garbled))
    for name in ("cut.gz", "garbled.gz"):
        with pytest.raises(idx.IdxFormatError, match="gzip|IDX"):
            idx.read_idx(tmp_path / name)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("gz", [True, False, None])
def test_standard_idx_loaders(tmp_path: Path, name: str, gz: bool | None) -> None:
    arrays = write_mnist_dir(tmp_path, n_train=30, n_test=12, seed=3, gz=gz)
    bundle = data.load(name, data_dir=str(tmp_path))
    assert bundle.train_x.shape == (30, 1, 28, 28) and bundle.test_x.shape == (12, 1, 28, 28)
    assert bundle.train_x.dtype == torch.float32 and bundle.train_y.dtype == torch.int64
    assert float(bundle.train_x.min()) >= 0.0 and float(bundle.train_x.max()) <= 1.0
    # Pixel (n, i, j) of the file is value/255 at (n, 0, i, j), checked at explicit positions.
    imgs = arrays["train-images-idx3-ubyte"]
    for n, i, j in [(0, 0, 0), (5, 13, 27), (29, 27, 3)]:
        assert bundle.train_x[n, 0, i, j].item() == pytest.approx(imgs[n, i, j] / 255.0, abs=1e-7)
    np.testing.assert_allclose(bundle.test_x.numpy()[:, 0], arrays["t10k-images-idx3-ubyte"] / 255.0, atol=1e-7)
    assert bundle.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert bundle.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert bundle.augment_kind == "none" and bundle.num_classes == 10


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    arrays = write_mnist_dir(tmp_path, n_train=10, n_test=4, seed=0, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", arrays["train-labels-idx1-ubyte"][:9], gz=True)
    with pytest.raises(idx.IdxFormatError, match="labels"):
        data.load("mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "mnist10k", "cifar10", "cifar100"])
def test_missing_files_message(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        data.load(name, data_dir=str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path) in msg and "--data-dir" in msg and "--download" in msg
    expected_file = {"mnist": "train-images-idx3-ubyte", "fashion-mnist": "t10k-labels-idx1-ubyte",
                     "mnist10k": "t10k-images-idx3-ubyte.gz", "cifar10": "data_batch_1", "cifar100": "train, test"}[name]
    assert expected_file in msg


def test_registered_names() -> None:
    for name in ("digits", "mnist10k", "mnist", "fashion-mnist", "cifar10", "cifar100"):
        assert name in data.DATASETS


# ----------------------------------------------------------------------------- splits
def test_digits_split_and_stratified_split_fixed() -> None:
    bundle = data.load("digits")
    assert (len(bundle.train_y), len(bundle.test_y)) == (1437, 360)
    assert bundle.bounds == (0.0, 1.0) and float(bundle.train_x.max()) == 1.0  # counts 0..16 over 16
    y = np.random.default_rng(0).integers(0, 5, 503)
    a, b = stratified_split(y, test_size=100, seed=0), stratified_split(y, test_size=100, seed=0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert len(np.intersect1d(a[0], a[1])) == 0 and len(a[0]) + len(a[1]) == 503


def _raw_mnist_t10k() -> tuple[np.ndarray, np.ndarray]:
    """The shared MNIST test files read directly (IDX header is 16/8 bytes), not via gradreg."""
    images = np.frombuffer(gzip.decompress((SHARED_MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()),
                           dtype=np.uint8, offset=16).reshape(10000, 28, 28)
    labels = np.frombuffer(gzip.decompress((SHARED_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()),
                           dtype=np.uint8, offset=8)
    return images, labels.astype(np.int64)


@needs_shared_mnist
def test_mnist10k_real_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(idx.MNIST10K_ENV, raising=False)
    bundle = data.load("mnist10k")  # found by discovery, no data_dir
    assert bundle.train_x.shape == (8000, 1, 28, 28) and bundle.test_x.shape == (2000, 1, 28, 28)
    assert bundle.train_x.dtype == torch.float32 and bundle.test_y.dtype == torch.int64
    assert 0.0 <= float(bundle.train_x.min()) and float(bundle.train_x.max()) <= 1.0
    images, labels = _raw_mnist_t10k()
    # Class-stratified: each class's test count is within ±1 of its proportional share.
    total = np.bincount(labels, minlength=10)
    test_counts = np.bincount(bundle.test_y.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - total * 2000 / 10000) <= 1), (test_counts, total)
    assert np.array_equal(np.bincount(bundle.train_y.numpy(), minlength=10) + test_counts, total)
    # Fixed: the documented split of the raw labels, computed twice, gives the same indices and
    # exactly the bundle's images/labels.
    tr, te = stratified_split(labels, test_size=2000, seed=0)
    tr2, te2 = stratified_split(labels, test_size=2000, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert np.array_equal(bundle.test_y.numpy(), labels[te])
    assert np.array_equal(bundle.train_y.numpy(), labels[tr])
    np.testing.assert_allclose(bundle.test_x.numpy()[:, 0], images[te] / 255.0, atol=1e-7)


@needs_shared_mnist
def test_mnist10k_discovery_and_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good"
    shutil.copytree(SHARED_MNIST, good)
    monkeypatch.setenv(idx.MNIST10K_ENV, str(good))
    assert idx.mnist10k_candidates()[0] == good
    assert idx._resolve_mnist10k_dir(None) == good
    # One flipped byte inside the gzip name field keeps it decodable but breaks the hash.
    bad = tmp_path / "bad"
    shutil.copytree(SHARED_MNIST, bad)
    (bad / "t10k-labels-idx1-ubyte.gz").chmod(0o644)
    raw = bytearray((bad / "t10k-labels-idx1-ubyte.gz").read_bytes())
    raw[-1] ^= 0x01
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(bytes(raw))
    with pytest.raises(dl.ChecksumError, match="SHA-256 mismatch"):
        data.load("mnist10k", data_dir=str(bad))


@needs_shared_mnist
def test_checksum_table_matches_readme() -> None:
    """The hard-coded t10k hashes and sizes equal those in the shared README (parsed here)."""
    readme = (SHARED_MNIST / "README.md").read_text()
    table = {m[0]: (int(m[1]), m[2]) for m in re.findall(r"\|\s*(\S+\.gz)\s*\|\s*(\d+)\s*\|\s*([0-9a-f]{64})", readme)}
    assert len(table) == 2
    for res in dl.RESOURCES["mnist10k"]:
        assert table[res.filename] == (res.size_bytes, res.sha256)
        assert hashlib.sha256((SHARED_MNIST / res.filename).read_bytes()).hexdigest() == res.sha256
    assert {r.filename: r.sha256 for r in dl.RESOURCES["mnist"] if r.filename.startswith("t10k")} == \
        {k: v[1] for k, v in table.items()}


# ----------------------------------------------------------------------------- CIFAR
@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_loader(tmp_path: Path, point_at_folder: bool) -> None:
    batches = write_cifar10(tmp_path, n_per_batch=6, seed=4)
    where = tmp_path / "cifar-10-batches-py" if point_at_folder else tmp_path
    bundle = data.load("cifar10", data_dir=str(where))
    assert bundle.train_x.shape == (30, 3, 32, 32) and bundle.test_x.shape == (6, 3, 32, 32)
    assert bundle.train_x.dtype == torch.float32 and bundle.train_y.dtype == torch.int64
    assert 0.0 <= float(bundle.train_x.min()) and float(bundle.train_x.max()) <= 1.0
    expected_train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]) / 255.0
    np.testing.assert_allclose(bundle.train_x.numpy(), expected_train, atol=1e-7)
    np.testing.assert_allclose(bundle.test_x.numpy(), batches["test_batch"][0] / 255.0, atol=1e-7)
    assert bundle.train_y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert bundle.test_y.tolist() == batches["test_batch"][1]
    assert bundle.classes == tuple(f"class{i}" for i in range(10))
    assert bundle.augment_kind == "crop-flip" and bundle.in_shape == (3, 32, 32)


def test_cifar100_loader(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    split = {}
    for name, n in (("train", 9), ("test", 4)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100, n)]
        write_cifar_batch(folder / name, images, labels, label_key=b"fine_labels")
        split[name] = (images, labels)
    (folder / "meta").write_bytes(py2_pickle({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                              b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}))
    bundle = data.load("cifar100", data_dir=str(tmp_path))
    assert bundle.num_classes == 100 and bundle.train_x.shape == (9, 3, 32, 32)
    np.testing.assert_allclose(bundle.train_x.numpy(), split["train"][0] / 255.0, atol=1e-7)
    assert bundle.train_y.tolist() == split["train"][1] and bundle.test_y.tolist() == split["test"][1]
    assert bundle.classes[7] == "c7"


class _RunsCode:
    def __init__(self, command: tuple) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return self.command


_WRITERS = {
    "py2": py2_pickle,  # as the real files: the dict keys load fine, so only the payload can refuse
    "py3-protocol4": lambda obj: pickle.dumps(obj, protocol=4),
    "py3-protocol0": lambda obj: pickle.dumps(obj, protocol=0),  # text opcodes, GLOBAL by name
}


@pytest.mark.parametrize("writer", list(_WRITERS))
@pytest.mark.parametrize("top_level", [False, True])
def test_malicious_pickle_refused(tmp_path: Path, writer: str, top_level: bool) -> None:
    marker = tmp_path / "pwned"
    payloads = [
        (os.system, (f"touch {marker}",)),
        (eval, (f"open({str(marker)!r}, 'w').close()",)),
    ]
    write_cifar10(tmp_path / "set", n_per_batch=2, seed=0)
    for payload in payloads:
        # str keys: Python 3 pickles bytes below protocol 3 via _codecs.encode, itself refused,
        # which would stop the load before the payload and hide a hole in the allow-list.
        evil = _RunsCode(payload) if top_level else {"data": _RunsCode(payload), "labels": [0]}
        (tmp_path / "set" / "cifar-10-batches-py" / "data_batch_1").write_bytes(_WRITERS[writer](evil))
        with pytest.raises(pickle.UnpicklingError, match="refusing to load global (posix|os|nt|builtins|__builtin__)"):
            data.load("cifar10", data_dir=str(tmp_path / "set"))
        assert not marker.exists()
    # The same bytes *would* have run code under the plain unpickler: the test is not vacuous.
    pickle.loads(_WRITERS[writer](_RunsCode(payloads[1])))
    assert marker.exists()


def test_restricted_unpickler_accepts_numpy_arrays_only() -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(cifar.restricted_loads(py2_pickle({b"a": arr}))[b"a"], arr)
    with pytest.raises(cifar.UnsafePickleError):
        cifar.restricted_loads(pickle.dumps(shutil.rmtree, protocol=2))


# ----------------------------------------------------------------------------- download
def _file_resource(path: Path, *, extract: bool = False, sha: str | None = None) -> dl.Resource:
    digest = sha or hashlib.sha256(path.read_bytes()).hexdigest()
    return dl.Resource(path.name, path.stat().st_size, digest, extract=extract)


def test_download_mnist_from_file_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    arrays = write_mnist_dir(mirror, n_train=8, n_test=5, seed=9, gz=True)
    resources = tuple(_file_resource(p) for p in sorted(mirror.iterdir()))
    monkeypatch.setitem(dl.RESOURCES, "mnist", resources)
    # First mirror does not exist (network error path), the second serves the files.
    monkeypatch.setitem(dl.MIRRORS, "mnist", [(tmp_path / "nowhere").as_uri() + "/", mirror.as_uri() + "/"])
    target = tmp_path / "target"
    bundle = data.load("mnist", data_dir=str(target), download=True)
    assert bundle.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert sorted(p.name for p in target.iterdir()) == sorted(r.filename for r in resources)
    data.load("mnist", data_dir=str(target), download=True)  # second call: verified, not re-fetched


def test_download_checksum_mismatch_deletes(tmp_path: Path) -> None:
    src = tmp_path / "mirror" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(b"not the canonical bytes")
    wrong = dl.Resource("blob.bin", src.stat().st_size, hashlib.sha256(b"canonical").hexdigest())
    target = tmp_path / "target"
    with pytest.raises(dl.ChecksumError, match="mismatch"):
        dl.fetch_resource(wrong, directory=target, mirrors=[src.parent.as_uri() + "/"])
    assert list(target.iterdir()) == []  # neither blob.bin nor blob.bin.part remains
    right_hash_wrong_size = dl.Resource("blob.bin", 3, hashlib.sha256(src.read_bytes()).hexdigest())
    with pytest.raises(dl.ChecksumError, match="expected 3"):
        dl.fetch_resource(right_hash_wrong_size, directory=target, mirrors=[src.parent.as_uri() + "/"])
    assert list(target.iterdir()) == []
    # A pre-existing corrupt file under the real name is refused too, not reused.
    (target / "blob.bin").write_bytes(b"corrupt")
    with pytest.raises(dl.ChecksumError):
        dl.fetch_resource(wrong, directory=target, mirrors=[])


def test_download_uses_injected_fetch_and_refuses_unverified(tmp_path: Path) -> None:
    payload = b"hello mnist"
    res = dl.Resource("x.gz", len(payload), hashlib.sha256(payload).hexdigest())
    seen = []

    def fake_fetch(url: str, dest: Path) -> None:
        seen.append(url)
        dest.write_bytes(payload)

    path = dl.fetch_resource(res, directory=tmp_path, mirrors=["https://example.invalid/d/"], fetch=fake_fetch)
    assert path.read_bytes() == payload and seen == ["https://example.invalid/d/x.gz"]
    with pytest.raises(dl.ChecksumError, match="no verified"):
        dl.download("imagenet", directory=tmp_path)


def test_download_cifar10_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "staging"
    batches = write_cifar10(staging, n_per_batch=3, seed=2)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = mirror / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(dl.RESOURCES, "cifar10", (_file_resource(archive, extract=True),))
    monkeypatch.setitem(dl.MIRRORS, "cifar10", [mirror.as_uri() + "/"])
    bundle = data.load("cifar10", data_dir=str(tmp_path / "target"), download=True)
    assert bundle.test_y.tolist() == batches["test_batch"][1]


def _tar_with(path: Path, members: list[tarfile.TarInfo], payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            if info.isfile():
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    return path


def _info(name: str, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("members", [
    [_info("../evil.txt")],
    [_info("ok/../../evil.txt")],
    [_info("/tmp/gradreg-evil-abs.txt")],
    [_info("link", kind=tarfile.SYMTYPE, link="../..")],
    [_info("dir/link", kind=tarfile.SYMTYPE, link="/etc/passwd")],
    [_info("hard", kind=tarfile.LNKTYPE, link="../outside")],
    [_info("fifo", kind=tarfile.FIFOTYPE)],
], ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "fifo"])
def test_unsafe_archive_refused(tmp_path: Path, members: list[tarfile.TarInfo]) -> None:
    archive = _tar_with(tmp_path / "evil.tar.gz", [_info("fine.txt"), *members])
    dest = tmp_path / "a" / "b"
    with pytest.raises(dl.UnsafeArchiveError):
        dl.safe_extract(archive, directory=dest)
    assert not (dest / "fine.txt").exists()  # nothing is written from a refused archive
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_planted_traversal_via_download_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A correctly hashed archive is still refused if it tries to escape."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = _tar_with(mirror / "cifar-10-python.tar.gz", [_info("cifar-10-batches-py/../../escaped.txt")])
    monkeypatch.setitem(dl.RESOURCES, "cifar10", (_file_resource(archive, extract=True),))
    monkeypatch.setitem(dl.MIRRORS, "cifar10", [mirror.as_uri() + "/"])
    with pytest.raises(dl.UnsafeArchiveError):
        data.load("cifar10", data_dir=str(tmp_path / "t" / "target"), download=True)
    assert not (tmp_path / "t" / "escaped.txt").exists()


def test_safe_archive_extracts(tmp_path: Path) -> None:
    archive = _tar_with(tmp_path / "ok.tar.gz", [_info("d", kind=tarfile.DIRTYPE), _info("d/f.txt"),
                                                 _info("d/rel", kind=tarfile.SYMTYPE, link="f.txt")], b"data")
    dl.safe_extract(archive, directory=tmp_path / "out")
    assert (tmp_path / "out" / "d" / "f.txt").read_bytes() == b"data"
    assert (tmp_path / "out" / "d" / "rel").read_bytes() == b"data"


# ----------------------------------------------------------------------------- augmentation
def _reference(x: torch.Tensor, off_y: list[int], off_x: list[int], flip: list[bool], pad: int) -> torch.Tensor:
    """Pad-crop-flip with explicit loops: out[n,c,i,j] = padded[n,c,oy+i, ox+(W-1-j if flip else j)]."""
    n, c, h, w = x.shape
    out = torch.empty_like(x)
    for b in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    jj = (w - 1 - j) if flip[b] else j
                    src_i, src_j = off_y[b] + i - pad, off_x[b] + jj - pad
                    inside = 0 <= src_i < h and 0 <= src_j < w
                    out[b, ch, i, j] = x[b, ch, src_i, src_j] if inside else 0.0
    return out


@pytest.mark.parametrize("kind", ["crop", "crop-flip"])
def test_augment_matches_loop_reference(kind: str) -> None:
    x = torch.rand(6, 2, 7, 5, generator=torch.Generator().manual_seed(0))
    pad = 3
    out = aug.augment(x, kind=kind, generator=torch.Generator().manual_seed(11), pad_pixels=pad)
    # The documented draw order: row offsets, column offsets, then flip coins.
    g = torch.Generator().manual_seed(11)
    off_y = torch.randint(0, 2 * pad + 1, (6,), generator=g).tolist()
    off_x = torch.randint(0, 2 * pad + 1, (6,), generator=g).tolist()
    flip = torch.randint(0, 2, (6,), generator=g).bool().tolist() if kind == "crop-flip" else [False] * 6
    torch.testing.assert_close(out, _reference(x, off_y, off_x, flip, pad), rtol=0, atol=0)


def test_augment_each_output_is_a_valid_crop() -> None:
    """Independent of draw order: every output image equals exactly one (offset, flip) crop, and
    over many images every offset and both flip states occur."""
    n, pad = 400, 2
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(1)) + 0.5  # no zeros inside
    out = aug.augment(x, kind="crop-flip", generator=torch.Generator().manual_seed(2), pad_pixels=pad)
    seen = set()
    for b in range(n):
        matches = [(oy, ox, f) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1) for f in (False, True)
                   if torch.equal(out[b:b + 1], _reference(x[b:b + 1], [oy], [ox], [f], pad))]
        # Interior pixels are distinct random values, so the (offset, flip) pair is unique.
        assert len(matches) == 1, f"image {b} is not a pad-crop-flip of its input ({matches})"
        seen.update(matches)
    assert {(oy, ox) for oy, ox, _ in seen} == {(a, b) for a in range(5) for b in range(5)}
    assert {f for *_, f in seen} == {False, True}


def test_augment_shapes_range_determinism() -> None:
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert aug.augment(x, kind="none") is x
    a = aug.augment(x, kind="crop-flip", generator=torch.Generator().manual_seed(5))
    b = aug.augment(x, kind="crop-flip", generator=torch.Generator().manual_seed(5))
    c = aug.augment(x, kind="crop-flip", generator=torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # No padding: a crop is the identity, a crop-flip is the identity or a mirror per image.
    assert torch.equal(aug.augment(x, kind="crop", pad_pixels=0), x)
    d = aug.augment(x, kind="crop-flip", pad_pixels=0, generator=torch.Generator().manual_seed(0))
    for b_ in range(len(x)):
        assert torch.equal(d[b_], x[b_]) or torch.equal(d[b_], x[b_].flip(-1))
    with pytest.raises(ValueError, match="unknown augmentation"):
        aug.augment(x, kind="rotate")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_cuda_with_cpu_generator() -> None:
    """The trainer passes a CPU generator for a batch that may live on the GPU."""
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cpu = aug.augment(x, kind="crop-flip", generator=torch.Generator().manual_seed(4), pad_pixels=2)
    gpu = aug.augment(x.cuda(), kind="crop-flip", generator=torch.Generator().manual_seed(4), pad_pixels=2)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
