"""Where data files live, and the opt-in download that puts them there.

Nothing here touches the network unless a loader is called with ``download=True``
(``--download`` on the command line). A downloaded file is checked against a SHA-256 from
a public, independent record *before* anything reads it; a file that does not match is
deleted. Archives are unpacked only after every member has been checked to stay inside
the target directory.

Provenance of the checksums (sizes and SHA-256 as published by their sources):

- MNIST: tensorflow/datasets ``url_checksums/mnist.txt``; the two ``t10k`` values also match
  ``/work/shared/data/mnist-test/README.md``.
- Fashion-MNIST: tensorflow/datasets ``url_checksums/fashion_mnist.txt``.
- CIFAR-10 / CIFAR-100 (python pickles): tensorflow/datasets ``url_checksums/cifar10.csv`` and
  ``cifar100.csv``; the same values are pinned in ``keras.datasets.cifar10``/``cifar100``.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0


class MissingDataError(FileNotFoundError):
    """The files a data set needs are not in the directory it was pointed at."""


class ChecksumError(ValueError):
    """A file's SHA-256 differs from the published value, or no published value is known."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the extraction directory (or is a device/link)."""


@dataclass(frozen=True)
class Resource:
    """One downloadable file: its name on the mirror, size in bytes and published SHA-256.
    ``extract`` marks a ``.tar.gz`` archive to unpack after verification."""

    filename: str
    size_bytes: int
    sha256: str
    extract: bool = False


_MNIST_T10K = (
    Resource("t10k-images-idx3-ubyte.gz", 1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    Resource("t10k-labels-idx1-ubyte.gz", 4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
)

# Data set name -> the files it needs. A data set missing here cannot be downloaded (there is
# no verified checksum for it), and download() says so instead of fetching unverified bytes.
RESOURCES: dict[str, tuple[Resource, ...]] = {
    "mnist10k": _MNIST_T10K,
    "mnist": (
        Resource("train-images-idx3-ubyte.gz", 9912422,
                 "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        Resource("train-labels-idx1-ubyte.gz", 28881,
                 "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        *_MNIST_T10K,
    ),
    "fashion-mnist": (
        Resource("train-images-idx3-ubyte.gz", 26421880,
                 "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        Resource("train-labels-idx1-ubyte.gz", 29515,
                 "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        Resource("t10k-images-idx3-ubyte.gz", 4422102,
                 "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        Resource("t10k-labels-idx1-ubyte.gz", 5148,
                 "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ),
    "cifar10": (
        Resource("cifar-10-python.tar.gz", 170498071,
                 "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce", extract=True),
    ),
    "cifar100": (
        Resource("cifar-100-python.tar.gz", 169001437,
                 "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7", extract=True),
    ),
}

# URL bases tried in order; a file's URL is base + filename. Module-level so that a user (or a
# test, with a file:// URL) can point at a local mirror: MIRRORS["mnist"] = ["file:///srv/mnist/"].
MIRRORS: dict[str, list[str]] = {
    "mnist10k": ["https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "https://ossci-datasets.s3.amazonaws.com/mnist/"],
    "mnist": ["https://storage.googleapis.com/cvdf-datasets/mnist/",
              "https://ossci-datasets.s3.amazonaws.com/mnist/"],
    # This S3 website endpoint serves plain http only; integrity comes from the SHA-256 check.
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}

Fetcher = Callable[[str, Path], None]


def default_root() -> Path:
    """Root of downloaded data: ``$GRADREG_DATA_DIR`` or ``~/.cache/gradreg``; one folder per set."""
    return Path(os.environ.get("GRADREG_DATA_DIR", "~/.cache/gradreg")).expanduser()


def missing_files_message(*, dataset: str, directory: Path, expected: Sequence[str],
                          missing: Sequence[str], note: str = "") -> str:
    """The one message every loader gives for absent files: what, where, and how to fix it."""
    lines = [
        f"{dataset}: data files not found in {directory}",
        f"  expected: {', '.join(expected)}",
        f"  missing:  {', '.join(missing)}",
    ]
    if note:
        lines.append(f"  {note}")
    can_download = dataset in RESOURCES
    lines.append(
        "  Point --data-dir (data_dir=...) at the folder that holds them"
        + (", or add --download (download=True) to fetch them with SHA-256 verification." if can_download
           else "; this data set cannot be downloaded.")
    )
    return "\n".join(lines)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (the CIFAR archives are ~170 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, *, expected: str, delete_on_mismatch: bool = False) -> None:
    """Raise :class:`ChecksumError` unless ``path`` hashes to ``expected``; optionally delete it."""
    actual = sha256_file(path)
    if actual != expected.lower():
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        raise ChecksumError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}"
            + (" (the file was deleted)" if delete_on_mismatch else "")
            + ". The file is corrupt, truncated or not the canonical release."
        )


def urllib_fetch(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` with urllib (http, https and file:// URLs)."""
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:  # noqa: S310
        shutil.copyfileobj(response, out, CHUNK_BYTES)


def fetch_resource(resource: Resource, *, directory: Path, mirrors: Sequence[str],
                   fetch: Fetcher = urllib_fetch) -> Path:
    """Download one file into ``directory`` and verify it; return its path.

    An existing file with the right hash is kept. The download goes to ``<name>.part`` and is
    renamed only after its SHA-256 matched, so a half-written or tampered file never sits under
    the real name. A network error moves on to the next mirror; a checksum mismatch stops (a
    mirror that serves wrong bytes is a problem to report, not to work around silently).
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / resource.filename
    if target.exists():
        verify_sha256(target, expected=resource.sha256)  # never silently reuse a corrupt file
        return target
    part = target.with_name(target.name + ".part")
    errors: list[str] = []
    for base in mirrors:
        url = base + resource.filename
        try:
            fetch(url, part)
        except (urllib.error.URLError, OSError) as err:
            part.unlink(missing_ok=True)
            errors.append(f"{url}: {err}")
            continue
        size = part.stat().st_size
        if size != resource.size_bytes:  # a cut-off transfer: say so plainly before hashing
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{url}: got {size} bytes, expected {resource.size_bytes} (incomplete or wrong "
                                f"file; deleted)")
        verify_sha256(part, expected=resource.sha256, delete_on_mismatch=True)
        part.replace(target)
        return target
    raise ConnectionError(f"could not download {resource.filename} from any mirror:\n  " + "\n  ".join(errors))


def _stays_inside(name: str) -> bool:
    """Whether the archive-relative path ``name`` stays under the extraction root."""
    if "\\" in name or PureWindowsPath(name).drive:  # a Windows drive or separator: refuse outright
        return False
    norm = posixpath.normpath(name)
    return not (posixpath.isabs(norm) or norm == ".." or norm.startswith("../"))


def check_tar_members(tar: tarfile.TarFile) -> None:
    """Refuse an archive with any member outside its root: absolute paths, ``..``, links whose
    target leaves the root, hard links to such paths, devices and FIFOs. All members are
    checked before anything is written, so a refused archive leaves nothing behind."""
    for member in tar.getmembers():
        name = member.name
        if not _stays_inside(name):
            raise UnsafeArchiveError(f"refusing archive member with an unsafe path: {name!r}")
        if member.issym():
            # A symlink's target is relative to the link's own folder.
            target = posixpath.join(posixpath.dirname(name), member.linkname)
            if posixpath.isabs(member.linkname) or not _stays_inside(target):
                raise UnsafeArchiveError(f"refusing symlink {name!r} -> {member.linkname!r} outside the archive")
        elif member.islnk():
            # A hard link's target is relative to the archive root.
            if not _stays_inside(member.linkname):
                raise UnsafeArchiveError(f"refusing hard link {name!r} -> {member.linkname!r} outside the archive")
        elif not (member.isfile() or member.isdir()):
            raise UnsafeArchiveError(f"refusing special archive member {name!r} (device or FIFO)")


def safe_extract(archive: Path, *, directory: Path) -> None:
    """Unpack a (gzip-compressed) tar archive into ``directory`` after :func:`check_tar_members`.

    Python's own ``filter="data"`` runs too where available, as a second line of defence
    (it also drops set-uid bits and other unsafe metadata).
    """
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        check_tar_members(tar)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(directory, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(directory)  # noqa: S202 - members checked above


def download(dataset: str, *, directory: Path, mirrors: Sequence[str] | None = None,
             fetch: Fetcher = urllib_fetch) -> list[Path]:
    """Fetch, verify and (for archives) unpack every file of ``dataset`` into ``directory``.

    ``mirrors`` overrides :data:`MIRRORS` (e.g. ``["file:///srv/data/"]``); ``fetch`` replaces
    the urllib transport (tests). Archives are kept next to what they unpack to, so a second
    call neither downloads nor trusts anything it has not hashed.
    """
    if dataset not in RESOURCES:
        raise ChecksumError(
            f"{dataset}: no verified SHA-256 is known for its files, so gradreg will not download it; "
            f"place the files yourself and pass --data-dir"
        )
    bases = list(mirrors) if mirrors is not None else MIRRORS.get(dataset, [])
    if not bases:
        raise ValueError(f"{dataset}: no download mirror configured (set gradreg.data.download.MIRRORS)")
    paths = []
    for resource in RESOURCES[dataset]:
        path = fetch_resource(resource, directory=directory, mirrors=bases, fetch=fetch)
        if resource.extract:
            safe_extract(path, directory=directory)
        paths.append(path)
    return paths
