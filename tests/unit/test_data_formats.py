"""The IDX and CIFAR-10 binary parsers, on small files written in the official formats."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fedlearn.data.formats import (
    CIFAR10_MEMBERS,
    read_cifar10_binary,
    read_cifar10_dir,
    read_idx,
)
from fedlearn.errors import DatasetCorruptError, DatasetNotFoundError


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """The IDX encoding of ``array``: 0x0000, type code, ndim, big-endian dims, data."""
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtypes[type_code]).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def cifar_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """One label byte then 3072 pixel bytes (R, G, B planes, row-major) per record."""
    out = bytearray()
    for image, label in zip(images, labels, strict=True):
        out.append(int(label))
        out += image.astype(np.uint8).tobytes()
    return bytes(out)


def make_cifar(rng: np.random.Generator, per_batch: int = 3) -> dict[str, tuple[np.ndarray, ...]]:
    return {
        m: (
            rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, 10, size=per_batch).astype(np.int64),
        )
        for m in CIFAR10_MEMBERS
    }


def write_cifar_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_images_and_labels_roundtrip(
    tmp_path: Path, rng: np.random.Generator, gz: bool
) -> None:
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5).astype(np.uint8)
    img_path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=gz)
    lbl_path = write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, gz=gz)
    assert img_path.read_bytes()[:2] == (b"\x1f\x8b" if gz else b"\x00\x00")
    if not gz:
        assert img_path.read_bytes()[:4] == b"\x00\x00\x08\x03"
        assert lbl_path.read_bytes()[:4] == b"\x00\x00\x08\x01"
    got_images = read_idx(img_path)
    got_labels = read_idx(lbl_path)
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_idx_gzip_detected_by_magic_not_name(tmp_path: Path, rng: np.random.Generator) -> None:
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    path = tmp_path / "labels-without-extension"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(path), labels)


@pytest.mark.parametrize(
    ("code", "dtype"),
    [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)],
)
def test_idx_other_type_codes_big_endian(tmp_path: Path, code: int, dtype: type) -> None:
    array: np.ndarray = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(array, code))
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-10])
    with pytest.raises(DatasetCorruptError, match="t10k-images-idx3-ubyte") as info:
        read_idx(path, dataset="mnist")
    assert "fedlearn datasets fetch mnist" in str(info.value)
    assert "truncated" in str(info.value)


def test_idx_trailing_garbage(tmp_path: Path) -> None:
    path = tmp_path / "labels.idx"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"junk")
    with pytest.raises(DatasetCorruptError, match=r"labels\.idx"):
        read_idx(path)


@pytest.mark.parametrize("header", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00"])
def test_idx_wrong_magic(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad-magic-idx1-ubyte"
    path.write_bytes(header + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DatasetCorruptError, match="bad-magic-idx1-ubyte"):
        read_idx(path)


def test_idx_too_short_and_truncated_header(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetCorruptError, match="short"):
        read_idx(short)
    header = tmp_path / "header"
    header.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 2))
    with pytest.raises(DatasetCorruptError, match="header"):
        read_idx(header)


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetCorruptError, match=r"train-labels-idx1-ubyte\.gz") as info:
        read_idx(path)
    assert "gzip" in str(info.value)


def test_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="nothing-here"):
        read_idx(tmp_path / "nothing-here")


# --- CIFAR-10 binary -----------------------------------------------------------------------


def _expected(parts: dict[str, tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    train = [parts[m] for m in CIFAR10_MEMBERS[:5]]
    return (
        np.concatenate([p[0] for p in train]),
        np.concatenate([p[1] for p in train]),
        parts[CIFAR10_MEMBERS[5]][0],
        parts[CIFAR10_MEMBERS[5]][1],
    )


def test_cifar_archive_roundtrip(tmp_path: Path, rng: np.random.Generator) -> None:
    parts = make_cifar(rng)
    archive = write_cifar_tar(
        tmp_path / "cifar-10-binary.tar.gz",
        {m: cifar_records(*parts[m]) for m in CIFAR10_MEMBERS},
    )
    got = read_cifar10_binary(archive)
    want = _expected(parts)
    assert got[0].shape == (15, 3, 32, 32) and got[0].dtype == np.uint8
    assert got[1].dtype == np.int64 and got[2].shape == (3, 3, 32, 32)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # Channel planes: byte 1..1024 of a record is the red plane, row-major.
    record = cifar_records(parts[CIFAR10_MEMBERS[0]][0][:1], parts[CIFAR10_MEMBERS[0]][1][:1])
    red = np.frombuffer(record[1:1025], np.uint8).reshape(32, 32)
    np.testing.assert_array_equal(got[0][0, 0], red)


def test_cifar_extracted_dir(tmp_path: Path, rng: np.random.Generator) -> None:
    parts = make_cifar(rng, per_batch=2)
    for member in CIFAR10_MEMBERS:
        path = tmp_path / member
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(cifar_records(*parts[member]))
    want = _expected(parts)
    for source in (tmp_path, tmp_path / "cifar-10-batches-bin"):
        for g, w in zip(read_cifar10_dir(source), want, strict=True):
            np.testing.assert_array_equal(g, w)
    for g, w in zip(read_cifar10_binary(tmp_path), want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_cifar_bad_member_size(tmp_path: Path, rng: np.random.Generator) -> None:
    parts = make_cifar(rng, per_batch=1)
    members = {m: cifar_records(*parts[m]) for m in CIFAR10_MEMBERS}
    members[CIFAR10_MEMBERS[2]] += b"\x00\x01"
    archive = write_cifar_tar(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.raises(DatasetCorruptError, match=r"cifar-10-binary\.tar\.gz") as info:
        read_cifar10_binary(archive)
    assert "data_batch_3.bin" in str(info.value) and "3073" in str(info.value)


def test_cifar_missing_member(tmp_path: Path, rng: np.random.Generator) -> None:
    parts = make_cifar(rng, per_batch=1)
    members = {m: cifar_records(*parts[m]) for m in CIFAR10_MEMBERS[:-1]}
    archive = write_cifar_tar(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.raises(DatasetCorruptError, match=r"cifar-10-binary\.tar\.gz") as info:
        read_cifar10_binary(archive)
    assert "test_batch.bin" in str(info.value)


def test_cifar_label_out_of_range(tmp_path: Path, rng: np.random.Generator) -> None:
    parts = make_cifar(rng, per_batch=1)
    members = {m: cifar_records(*parts[m]) for m in CIFAR10_MEMBERS}
    members[CIFAR10_MEMBERS[0]] = b"\x0a" + members[CIFAR10_MEMBERS[0]][1:]
    archive = write_cifar_tar(tmp_path / "cifar-10-binary.tar.gz", members)
    with pytest.raises(DatasetCorruptError, match="label 10"):
        read_cifar10_binary(archive)


def test_cifar_not_a_tar(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(b"this is not a tar archive at all" * 20)
    with pytest.raises(DatasetCorruptError, match=r"cifar-10-binary\.tar\.gz"):
        read_cifar10_binary(archive)


def test_cifar_truncated_archive(tmp_path: Path, rng: np.random.Generator) -> None:
    parts = make_cifar(rng, per_batch=2)
    archive = write_cifar_tar(
        tmp_path / "cifar-10-binary.tar.gz",
        {m: cifar_records(*parts[m]) for m in CIFAR10_MEMBERS},
    )
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetCorruptError, match=r"cifar-10-binary\.tar\.gz"):
        read_cifar10_binary(archive)
