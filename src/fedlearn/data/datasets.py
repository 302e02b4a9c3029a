"""Loading a dataset into normalised, read-only numpy arrays.

:func:`load_dataset` finds (or fetches) the files, parses them, checks their
shapes and label ranges, and applies the dataset's entry in
:data:`NORMALIZATION`, the one place where per-dataset normalisation lives.
Results are cached in-process, keyed on the files' paths, sizes and
modification times, and every array is read-only so the cache cannot be
corrupted by a caller.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlearn.data.fetch import (
    fetch,
    find_file,
    get_source,
    locate,
    not_found_message,
)
from fedlearn.data.formats import read_cifar10_binary, read_idx
from fedlearn.errors import DatasetCorruptError, DatasetNotFoundError

__all__ = ["NORMALIZATION", "Dataset", "Normalization", "clear_cache", "load_dataset"]

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0

Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Normalization:
    """Pixels are divided by ``scale`` (to [0, 1]) then standardised per channel."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Return ``pixels`` (N, C, H, W) as normalised float32."""
        x = pixels.astype(np.float32)
        x /= np.float32(self.scale)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        x -= mean
        x /= std
        return x


NORMALIZATION: dict[str, Normalization] = {
    "fashion-mnist": Normalization(scale=255.0, mean=(0.5,), std=(0.5,)),
    "mnist": Normalization(scale=255.0, mean=(0.5,), std=(0.5,)),
    "cifar10": Normalization(
        scale=255.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)
    ),
    "digits": Normalization(scale=16.0, mean=(0.5,), std=(0.5,)),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: normalised float32 images (N, C, H, W) and int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, int, int]
    source: str

    @property
    def train_size(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def test_size(self) -> int:
        """Number of test samples."""
        return int(self.x_test.shape[0])


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _corrupt(path: Path, detail: str, name: str) -> DatasetCorruptError:
    return DatasetCorruptError(
        f"{path} is corrupt ({detail}); delete it and run "
        f"`fedlearn datasets fetch {name}` to download it again."
    )


def _build(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    source: str,
) -> Dataset:
    spec = get_source(name)
    norm = NORMALIZATION[name]
    return Dataset(
        name=name,
        x_train=_readonly(norm.apply(train[0])),
        y_train=_readonly(train[1].astype(np.int64)),
        x_test=_readonly(norm.apply(test[0])),
        y_test=_readonly(test[1].astype(np.int64)),
        num_classes=spec.num_classes,
        input_shape=spec.input_shape,
        source=source,
    )


def _idx_pair(
    name: str, directory: Path, images_file: str, labels_file: str
) -> tuple[np.ndarray, np.ndarray]:
    spec = get_source(name)
    _, height, width = spec.input_shape
    images_path = find_file(directory, images_file)
    labels_path = find_file(directory, labels_file)
    if images_path is None or labels_path is None:
        missing = images_file if images_path is None else labels_file
        raise DatasetNotFoundError(not_found_message(name, f"{directory} lacks {missing}"))
    images = read_idx(images_path, dataset=name)
    labels = read_idx(labels_path, dataset=name)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (height, width):
        raise _corrupt(
            images_path,
            f"it holds {images.dtype} data of shape {images.shape}, "
            f"not {height}x{width} uint8 images",
            name,
        )
    if images.shape[0] == 0:
        raise _corrupt(images_path, "it holds no images", name)
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise _corrupt(
            labels_path, f"it holds {labels.dtype} data of shape {labels.shape}, not labels", name
        )
    if labels.shape[0] != images.shape[0]:
        raise _corrupt(
            labels_path,
            f"{labels.shape[0]} labels for the {images.shape[0]} images of {images_path.name}",
            name,
        )
    if int(labels.max()) >= spec.num_classes:
        raise _corrupt(
            labels_path, f"label {int(labels.max())} is outside 0..{spec.num_classes - 1}", name
        )
    return images[:, None, :, :], labels


def _load_idx(name: str, directory: Path) -> Dataset:
    train = _idx_pair(name, directory, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    test = _idx_pair(name, directory, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return _build(name, train, test, str(directory))


def _load_cifar10(directory: Path) -> Dataset:
    path = find_file(directory, "cifar-10-binary.tar.gz")
    if path is None:
        raise DatasetNotFoundError(
            not_found_message("cifar10", f"{directory} lacks cifar-10-binary.tar.gz")
        )
    x_train, y_train, x_test, y_test = read_cifar10_binary(path, dataset="cifar10")
    return _build("cifar10", (x_train, y_train), (x_test, y_test), str(path))


@functools.lru_cache(maxsize=4)
def _load_files(name: str, directory: str, fingerprint: Fingerprint) -> Dataset:
    del fingerprint  # only part of the cache key
    if name == "cifar10":
        return _load_cifar10(Path(directory))
    return _load_idx(name, Path(directory))


@functools.lru_cache(maxsize=1)
def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=DIGITS_TEST_SIZE,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    return _build(
        "digits",
        (np.asarray(x_train), np.asarray(y_train)),
        (np.asarray(x_test), np.asarray(y_test)),
        "scikit-learn load_digits()",
    )


def _fingerprint(name: str, directory: Path) -> Fingerprint:
    entries: list[tuple[str, int, int]] = []
    for filename in get_source(name).files:
        path = find_file(directory, filename)
        if path is None:
            continue
        paths = sorted(path.iterdir()) if path.is_dir() else [path]
        for p in paths:
            st = p.stat()
            entries.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(entries)


def load_dataset(name: str, *, download: bool = True) -> Dataset:
    """Load dataset ``name`` (one of ``DATASETS``), normalised and read-only.

    Uses a local or system copy if there is one, else downloads it when
    ``download`` is true (see :func:`fedlearn.data.fetch.fetch`). Raises
    ConfigError for an unknown name, DatasetNotFoundError when no copy can be
    had, and DatasetCorruptError naming the file when its contents are wrong.
    Repeated calls return the same cached object.
    """
    get_source(name)
    if name == "digits":
        return _load_digits()
    if download:
        directory = fetch(name)
    else:
        found = locate(name)
        if found is None:
            raise DatasetNotFoundError(not_found_message(name, "downloading was not allowed"))
        directory = found
    directory = directory.resolve()
    return _load_files(name, str(directory), _fingerprint(name, directory))


def clear_cache() -> None:
    """Forget every dataset loaded so far in this process."""
    _load_files.cache_clear()
    _load_digits.cache_clear()
