"""Tiny copies of the built-in image datasets, in their official file formats.

The pictures are scikit-learn's 8x8 digits scaled up (learnable, unlike noise),
so ``--dataset fashion-mnist --model cnn`` and ``--dataset cifar10 --model
cifar-cnn`` run in seconds on a few hundred rows. Point ``$FEDLEARN_DATA`` at
the folder given (``cli_env`` uses ``tmp_path/data-cache``).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from fedlearn.data.formats import CIFAR10_TEST_MEMBER, CIFAR10_TRAIN_MEMBERS


def digit_images(size: int, channels: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` digits as uint8 images [count, channels, size, size] and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))[:count]
    scale = size // 8
    pad = (size - 8 * scale) // 2
    big = np.kron(digits.images[order], np.ones((scale, scale)))
    big = np.pad(big, ((0, 0), (pad, size - 8 * scale - pad), (pad, size - 8 * scale - pad)))
    pixels = (big * (255.0 / 16.0)).astype(np.uint8)
    # Colour channels differ a little, so a 3-channel model sees three planes.
    stacked = np.stack([pixels // (c + 1) for c in range(channels)], axis=1)
    return stacked, digits.target[order].astype(np.uint8)


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_tiny_idx(home: Path, train: int = 360, test: int = 200,
                   name: str = "fashion-mnist") -> Path:
    """``home/name``: gzipped IDX files of ``train`` + ``test`` 28x28 digits."""
    images, labels = digit_images(28, 1, train + test)
    folder = home / name
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train": (images[:train, 0], labels[:train]),
             "t10k": (images[train:, 0], labels[train:])}
    for prefix, (x, y) in parts.items():
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(x)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(y)))
    return folder


def write_tiny_cifar(home: Path, train: int = 360, test: int = 200) -> Path:
    """``home/cifar10``: CIFAR-10's extracted binary batches holding 32x32x3 digits."""
    images, labels = digit_images(32, 3, train + test)
    folder = home / "cifar10"

    def records(rows: np.ndarray) -> bytes:
        return b"".join(bytes([int(labels[i])]) + images[i].tobytes() for i in rows)

    chunks = np.array_split(np.arange(train), len(CIFAR10_TRAIN_MEMBERS))
    for member, rows in zip(CIFAR10_TRAIN_MEMBERS, chunks, strict=True):
        (folder / member).parent.mkdir(parents=True, exist_ok=True)
        (folder / member).write_bytes(records(rows))
    (folder / CIFAR10_TEST_MEMBER).write_bytes(records(np.arange(train, train + test)))
    return folder
