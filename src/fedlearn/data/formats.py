"""Pure parsers for the on-disk formats of the datasets fedlearn knows.

- IDX (MNIST, Fashion-MNIST), gzipped or plain: :func:`read_idx`.
- The official CIFAR-10 *binary* release (``cifar-10-binary.tar.gz``), read
  straight from the archive without extracting it: :func:`read_cifar10_binary`,
  or from an already extracted ``cifar-10-batches-bin/`` folder:
  :func:`read_cifar10_dir`.

Nothing here unpickles anything. Every problem with a file's contents raises
:class:`~fedlearn.errors.DatasetCorruptError` naming the file and telling the
user to delete it and fetch it again.
"""

from __future__ import annotations

import gzip
import math
import tarfile
import zlib
from pathlib import Path

import numpy as np

from fedlearn.errors import DatasetCorruptError, DatasetNotFoundError

__all__ = [
    "CIFAR10_MEMBERS",
    "CIFAR10_TEST_MEMBER",
    "CIFAR10_TRAIN_MEMBERS",
    "read_cifar10_binary",
    "read_cifar10_dir",
    "read_idx",
]

GZIP_MAGIC = b"\x1f\x8b"

#: IDX type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN_MEMBERS: tuple[str, ...] = tuple(
    f"{CIFAR10_DIR}/data_batch_{i}.bin" for i in range(1, 6)
)
CIFAR10_TEST_MEMBER = f"{CIFAR10_DIR}/test_batch.bin"
CIFAR10_MEMBERS: tuple[str, ...] = (*CIFAR10_TRAIN_MEMBERS, CIFAR10_TEST_MEMBER)
CIFAR10_RECORD = 1 + 3 * 32 * 32
CIFAR10_NUM_CLASSES = 10

CifarArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _fetch_hint(dataset: str | None) -> str:
    name = dataset if dataset else "NAME"
    return f"delete it and run `fedlearn datasets fetch {name}` to download it again"


def _corrupt(path: Path | str, detail: str, dataset: str | None) -> DatasetCorruptError:
    return DatasetCorruptError(f"{path} is corrupt ({detail}); {_fetch_hint(dataset)}.")


def _read_bytes(path: Path, dataset: str | None) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        name = dataset if dataset else "NAME"
        raise DatasetNotFoundError(
            f"{path} does not exist; run `fedlearn datasets fetch {name}` to download it."
        ) from None
    except OSError as exc:
        raise _corrupt(path, f"it cannot be read: {exc.strerror or exc}", dataset) from exc


def read_idx(path: Path, *, dataset: str | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or plain; gzip is detected by its magic bytes).

    Returns the array in native byte order with the shape stored in the file.
    ``dataset`` only names the dataset in the error message's advice.
    Raises :class:`DatasetCorruptError` on a bad gzip stream, a wrong magic
    number, truncated data or trailing bytes.
    """
    path = Path(path)
    raw = _read_bytes(path, dataset)
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise _corrupt(path, f"bad gzip stream: {exc}", dataset) from exc
    if len(raw) < 4:
        raise _corrupt(path, f"only {len(raw)} bytes, too short for an IDX header", dataset)
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise _corrupt(path, f"magic number 0x{raw[:4].hex()} is not an IDX magic", dataset)
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    ndim = raw[3]
    if ndim == 0:
        raise _corrupt(path, "IDX header declares zero dimensions", dataset)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise _corrupt(path, "truncated IDX header", dataset)
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    # Python ints: an int64 product of four dims of 2**16 wraps to 0 and would pass the checks.
    expected = math.prod(dims) * dtype.itemsize
    actual = len(raw) - header_len
    if actual < expected:
        raise _corrupt(
            path, f"truncated: {actual} data bytes where the header promises {expected}", dataset
        )
    if actual > expected:
        raise _corrupt(
            path, f"{actual - expected} unexpected bytes after the {expected} data bytes", dataset
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _parse_cifar_records(
    data: bytes, where: str, dataset: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Split CIFAR-10 binary records into (images uint8 (N,3,32,32), labels int64)."""
    if len(data) == 0:
        raise _corrupt(where, "it holds no records", dataset)
    if len(data) % CIFAR10_RECORD != 0:
        raise _corrupt(
            where,
            f"size {len(data)} is not a multiple of the {CIFAR10_RECORD}-byte record",
            dataset,
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if int(labels.max()) >= CIFAR10_NUM_CLASSES:
        raise _corrupt(where, f"label {int(labels.max())} is outside 0..9", dataset)
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def _assemble(
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
) -> CifarArrays:
    x_train = np.concatenate([parts[m][0] for m in CIFAR10_TRAIN_MEMBERS])
    y_train = np.concatenate([parts[m][1] for m in CIFAR10_TRAIN_MEMBERS])
    x_test, y_test = parts[CIFAR10_TEST_MEMBER]
    return x_train, y_train, x_test, y_test


def read_cifar10_binary(archive: Path, *, dataset: str | None = "cifar10") -> CifarArrays:
    """Read ``cifar-10-binary.tar.gz`` (the official binary release) without extracting it.

    Returns ``(x_train, y_train, x_test, y_test)``: images uint8 of shape
    (N, 3, 32, 32) and labels int64. A directory is handed to
    :func:`read_cifar10_dir`. A missing member, a member whose size is not a
    multiple of 3073 bytes, a label above 9 or a damaged archive raises
    :class:`DatasetCorruptError` naming the file.
    """
    archive = Path(archive)
    if archive.is_dir():
        return read_cifar10_dir(archive, dataset=dataset)
    if not archive.exists():
        _read_bytes(archive, dataset)  # raises DatasetNotFoundError
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in CIFAR10_MEMBERS or not member.isfile() or name in parts:
                    continue
                handle = tar.extractfile(member)
                if handle is None:  # pragma: no cover - isfile() members always extract
                    continue
                with handle:
                    data = handle.read()
                parts[name] = _parse_cifar_records(data, f"{archive} (member {name})", dataset)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _corrupt(archive, f"not a readable tar archive: {exc}", dataset) from exc
    missing = [m for m in CIFAR10_MEMBERS if m not in parts]
    if missing:
        raise _corrupt(archive, f"member {missing[0]} is missing", dataset)
    return _assemble(parts)


def read_cifar10_dir(directory: Path, *, dataset: str | None = "cifar10") -> CifarArrays:
    """Read an extracted CIFAR-10 binary release.

    ``directory`` is either the folder that contains ``cifar-10-batches-bin/``
    or that folder itself. Returns the same arrays as :func:`read_cifar10_binary`.
    """
    directory = Path(directory)
    base = directory.parent if directory.name == CIFAR10_DIR else directory
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for member in CIFAR10_MEMBERS:
        path = base / member
        if not path.is_file():
            raise _corrupt(directory, f"file {member} is missing", dataset)
        parts[member] = _parse_cifar_records(_read_bytes(path, dataset), str(path), dataset)
    return _assemble(parts)
