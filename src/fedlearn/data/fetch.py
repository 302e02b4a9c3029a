"""Where dataset files come from: a local cache, a system copy, or a download.

Lookup order for a dataset ``NAME``:

1. ``$FEDLEARN_DATA/NAME`` (default ``~/.cache/fedlearn/NAME``);
2. ``/usr/share/datasets/NAME`` (the roots can be replaced by the
   ``os.pathsep``-separated list in ``$FEDLEARN_SYSTEM_DATA``);
3. a download with :mod:`pooch` into the first directory, each file checked
   against its official MD5, each mirror tried in turn. ``FEDLEARN_OFFLINE=1``
   forbids any network access.

IDX files may be stored gzipped (the official names) or un-gzipped (the name
without ``.gz``); CIFAR-10 may be the official archive or its extracted
``cifar-10-batches-bin/`` folder.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from fedlearn.data.formats import CIFAR10_DIR, CIFAR10_MEMBERS
from fedlearn.errors import ConfigError, DatasetNotFoundError

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "digits")

DEFAULT_SYSTEM_ROOT = Path("/usr/share/datasets")
DOWNLOAD_TIMEOUT_S = 20


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset's files come from and what they must hash to.

    ``files`` maps each official file name to its official checksum
    (``"md5:..."``), which downloads are checked against. ``contents`` maps the
    name of a gzipped file's *decompressed* payload to the payload's checksum,
    so a copy that was re-compressed (a different gzip header) can still be
    recognised as genuine by :func:`verify_file`. ``system_dirs`` are the
    folder names looked for under each system root.
    """

    name: str
    files: dict[str, str]
    train_size: int
    test_size: int
    input_shape: tuple[int, int, int]
    num_classes: int
    mirrors: tuple[str, ...] = ()
    system_dirs: tuple[str, ...] = ()
    contents: dict[str, str] = field(default_factory=dict)
    system_package: str | None = None


@dataclass(frozen=True)
class DatasetStatus:
    """What is known about a dataset without loading it."""

    name: str
    found_at: Path | None
    train_size: int
    test_size: int
    input_shape: tuple[int, int, int]
    num_classes: int


_IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_source(
    name: str,
    gz_md5: tuple[str, str, str, str],
    raw_md5: tuple[str, str, str, str],
    mirrors: tuple[str, ...],
    system_package: str | None = None,
) -> DatasetSource:
    """The entry of an MNIST-like dataset: four gzipped IDX files of 28x28 images."""
    return DatasetSource(
        name=name,
        files={f"{n}.gz": f"md5:{h}" for n, h in zip(_IDX_NAMES, gz_md5, strict=True)},
        mirrors=mirrors,
        system_dirs=(name,),
        contents={n: f"md5:{h}" for n, h in zip(_IDX_NAMES, raw_md5, strict=True)},
        system_package=system_package,
        train_size=60000,
        test_size=10000,
        input_shape=(1, 28, 28),
        num_classes=10,
    )


# Official checksums of the published files (``files``) and of their decompressed
# payloads (``contents``); the payload checksums also recognise re-gzipped copies.
SOURCES: dict[str, DatasetSource] = {
    "fashion-mnist": _idx_source(
        "fashion-mnist",
        gz_md5=(
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
        raw_md5=(
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "9018921c3c673c538a1fc5bad174d6f9",
            "8181f5470baa50b63fa0f6fddb340f0a",
            "15d484375f8d13e6eb1aabb0c3f46965",
        ),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_package="dataset-fashion-mnist",
    ),
    "mnist": _idx_source(
        "mnist",
        gz_md5=(
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
        raw_md5=(
            "6bbc9ace898e44ae57da46a324031adb",
            "a25bea736e30d166cdddb491f175f624",
            "2646ac647ad5339dbf082846283269ea",
            "27ae3e4e09519cfbb04c329615203637",
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "cifar10": DatasetSource(
        name="cifar10",
        files={"cifar-10-binary.tar.gz": "md5:c32a1d4ab5d03f1284b67883e8d87530"},
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        system_dirs=("cifar10", "cifar-10"),
        train_size=50000,
        test_size=10000,
        input_shape=(3, 32, 32),
        num_classes=10,
    ),
    "digits": DatasetSource(
        name="digits",
        files={},
        train_size=1437,
        test_size=360,
        input_shape=(1, 8, 8),
        num_classes=10,
    ),
}


def get_source(name: str) -> DatasetSource:
    """Return the registry entry of dataset ``name``; an unknown name raises ConfigError."""
    source = SOURCES.get(name)
    if source is None:
        raise ConfigError(f"Unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    return source


def data_home() -> Path:
    """The per-user dataset folder: ``$FEDLEARN_DATA`` or ``~/.cache/fedlearn``."""
    env = os.environ.get("FEDLEARN_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedlearn"


def _system_roots() -> list[Path]:
    env = os.environ.get("FEDLEARN_SYSTEM_DATA")
    if env is None:
        return [DEFAULT_SYSTEM_ROOT]
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p]


def system_dirs(name: str) -> list[Path]:
    """System-wide folders that may hold dataset ``name`` (``/usr/share/datasets/<name>``).

    ``$FEDLEARN_SYSTEM_DATA`` (an ``os.pathsep``-separated list of roots)
    replaces ``/usr/share/datasets``.
    """
    source = get_source(name)
    return [root / sub for root in _system_roots() for sub in source.system_dirs]


def _offline() -> bool:
    return os.environ.get("FEDLEARN_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def find_file(directory: Path, filename: str) -> Path | None:
    """The path under ``directory`` that provides the official file ``filename``, if any.

    ``name.gz`` may also be present un-gzipped as ``name``; the CIFAR-10
    archive may also be present extracted as ``cifar-10-batches-bin/``.
    """
    exact = directory / filename
    if exact.is_file():
        return exact
    if filename.endswith(".tar.gz"):
        if all((directory / m).is_file() for m in CIFAR10_MEMBERS):
            return directory / CIFAR10_DIR
        return None
    if filename.endswith(".gz"):
        plain = directory / filename.removesuffix(".gz")
        if plain.is_file():
            return plain
    return None


def _sklearn_digits_dir() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "datasets" / "data"
    return folder if (folder / "digits.csv.gz").is_file() else None


def locate(name: str) -> Path | None:
    """The first folder (data home, then system folders) holding all files of ``name``.

    Never touches the network. For ``digits`` (shipped with scikit-learn) this
    is scikit-learn's data folder.
    """
    source = get_source(name)
    if not source.files:
        return _sklearn_digits_dir()
    for directory in [data_home() / name, *system_dirs(name)]:
        if directory.is_dir() and all(find_file(directory, f) for f in source.files):
            return directory
    return None


def not_found_message(name: str, reason: str) -> str:
    """The one-sentence explanation of how to get dataset ``name`` onto this machine."""
    source = get_source(name)
    target = (data_home() / name).resolve()
    files = ", ".join(source.files)
    system = " or ".join(str(d) for d in system_dirs(name)) or "a system folder"
    install = f"install a system copy into {system}"
    if source.system_package:
        install += f" (`apt-get install {source.system_package}`)"
    return (
        f"Dataset {name!r} was not found locally and could not be downloaded ({reason}); "
        f"put {files} in {target}, {install}, "
        f"or run `fedlearn datasets fetch {name}` with internet access."
    )


def _download(checksum: str, url_base: str, filename: str, target: Path, progress: bool) -> None:
    import pooch

    downloader = pooch.HTTPDownloader(timeout=DOWNLOAD_TIMEOUT_S, progressbar=progress)
    pooch.retrieve(
        url_base + filename,
        known_hash=checksum,
        fname=filename,
        path=target,
        downloader=downloader,
        progressbar=progress,
    )


def fetch(name: str, *, progress: bool = False) -> Path:
    """Return a folder holding all files of ``name``, downloading them if needed.

    A local or system copy is used as is. Otherwise every file is downloaded
    into ``data_home()/name`` with pooch (MD5-checked), trying each mirror in
    order. With ``FEDLEARN_OFFLINE=1``, or if every mirror fails, raises
    :class:`DatasetNotFoundError` explaining the three ways to get the data.
    """
    source = get_source(name)
    found = locate(name)
    if found is not None:
        return found
    if not source.files:
        raise DatasetNotFoundError(
            f"Dataset {name!r} ships with scikit-learn, which is not installed; "
            "reinstall fedlearn with its dependencies."
        )
    if _offline():
        raise DatasetNotFoundError(not_found_message(name, "FEDLEARN_OFFLINE is set"))
    target = data_home() / name
    for filename, checksum in source.files.items():
        if find_file(target, filename) is not None:
            continue
        errors: list[str] = []
        for mirror in source.mirrors:
            try:
                _download(checksum, mirror, filename, target, progress)
            except Exception as exc:  # any failure of one mirror: try the next
                errors.append(f"{mirror}{filename}: {type(exc).__name__}")
                continue
            break
        else:
            reason = "; ".join(errors) or "no mirror is known"
            raise DatasetNotFoundError(not_found_message(name, reason))
    return target


def _md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data, usedforsecurity=False).hexdigest()


def verify_file(name: str, path: Path) -> bool:
    """Whether ``path`` is a genuine copy of one of dataset ``name``'s files.

    True when its bytes match the official checksum, or (for a gzipped or
    un-gzipped IDX file) when its decompressed payload matches the official
    payload checksum. Reads the whole file.
    """
    source = get_source(name)
    path = Path(path)
    data = path.read_bytes()
    if source.files.get(path.name) == _md5(data):
        return True
    payload_name = path.name.removesuffix(".gz")
    expected = source.contents.get(payload_name)
    if expected is None:
        return False
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return False
    return _md5(data) == expected


def status(name: str) -> DatasetStatus:
    """Where dataset ``name`` is and its fixed sizes, without loading it."""
    source = get_source(name)
    return DatasetStatus(
        name=name,
        found_at=locate(name),
        train_size=source.train_size,
        test_size=source.test_size,
        input_shape=source.input_shape,
        num_classes=source.num_classes,
    )
