"""A client's own data, read from the path given with ``--data``.

:func:`read_local` picks the reader by what the path is:

- a folder with one sub-folder of images per class (see
  :mod:`fedlearn.data.local_images`);
- a ``.csv``, ``.parquet`` or ``.pq`` table with a label column (see
  :mod:`fedlearn.data.local_tables`);
- an ``.npz`` archive holding arrays ``x`` and ``y``.

Every reader returns numpy arrays: float32 features and int64 class labels
(or float32 regression targets). Pillow and pyarrow are imported only when a
file needs them. Every problem raises a :class:`~fedlearn.errors.DatasetError`
(or :class:`~fedlearn.errors.ConfigError` for a bad argument) whose message
names the offending file, folder or column.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlearn.data.local_images import read_image_folder
from fedlearn.data.local_tables import (
    PARQUET_SUFFIXES,
    TABLE_SUFFIXES,
    column_names,
    read_table,
)
from fedlearn.errors import (
    ConfigError,
    DatasetCorruptError,
    DatasetError,
    DatasetNotFoundError,
)

__all__ = ["KINDS", "LocalData", "check_labels", "read_local", "split_test"]

#: The kinds of learning task a local data set can feed.
KINDS: tuple[str, ...] = ("classification", "regression")

FORMATS_HINT = (
    "a folder with one sub-folder of images per class, a .csv or .parquet table, "
    "or an .npz file with arrays x and y"
)


@dataclass(frozen=True, eq=False)
class LocalData:
    """Features and labels read from a client's own files.

    ``x`` is float32: (N, C, H, W) for images, (N, F) for tables, as stored for
    ``.npz``. ``y`` is int64 class labels (classification) or float32 targets
    (regression). ``classes`` names the classes in label order when the files
    say them (image folders, text labels); ``source`` says what was read.
    """

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...] | None
    source: str

    def __post_init__(self) -> None:
        if self.x.ndim == 0 or self.y.ndim == 0 or self.x.shape[0] != self.y.shape[0]:
            raise DatasetError(
                f"{self.source} gives features of shape {self.x.shape} and labels of shape "
                f"{self.y.shape}; give one label per row of features."
            )

    def __len__(self) -> int:
        """Number of examples (rows of ``x``)."""
        return int(self.x.shape[0])


def read_local(
    path: str | Path,
    *,
    kind: str = "classification",
    label: str | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> LocalData:
    """Read a client's own data from ``path`` (an image folder, a table or an ``.npz``).

    ``kind`` is ``"classification"`` or ``"regression"``. ``label`` names a
    table's label column (required for CSV and Parquet). ``image_size``
    (H, W), ``channels`` (1 or 3), ``mean`` and ``std`` apply to image folders
    only. ``classes`` fixes the class order: folder names for images, label
    values for text labels. When ``num_classes`` is given, classification
    labels outside 0..num_classes-1 are an error. Raises
    DatasetNotFoundError for a missing path, DatasetError (or its subclass
    DatasetCorruptError) for bad contents and ConfigError for bad arguments.
    """
    path = Path(path)
    _check_arguments(kind, image_size, channels, mean, std, classes, num_classes)
    fixed = tuple(classes) if classes is not None else None
    if not path.exists():
        raise DatasetNotFoundError(f"{path} does not exist; pass --data with {FORMATS_HINT}.")
    if path.is_dir():
        if kind != "classification":
            raise ConfigError(
                f"{path} is an image folder, whose labels are classes, but the task is {kind}; "
                "use a table or an .npz file for regression."
            )
        x, y, names = read_image_folder(
            path, image_size=image_size, channels=channels, mean=mean, std=std, classes=fixed
        )
        data = LocalData(x=x, y=y, classes=names, source=str(path))
    else:
        data = _read_file(path, kind=kind, label=label, classes=fixed)
    if len(data) == 0:
        raise DatasetError(f"{path} holds no rows; give at least one example.")
    if kind == "classification":
        if num_classes is not None:
            check_labels(data.y, num_classes, data.source)
        if data.classes is not None:
            check_labels(data.y, len(data.classes), data.source)
    return data


def _read_file(
    path: Path, *, kind: str, label: str | None, classes: tuple[str, ...] | None
) -> LocalData:
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        if label is None:
            raise ConfigError(
                f"{path} is a table and needs a label column; pass --label COLUMN "
                f"with one of its columns: {', '.join(column_names(path))}."
            )
        x, raw = read_table(path, label=label, parquet=suffix in PARQUET_SUFFIXES)
        where = f"column {label!r} of {path}"
        y, names = _to_targets(raw, kind=kind, classes=classes, where=where)
        return LocalData(x=x, y=y, classes=names, source=str(path))
    if suffix == ".npz":
        return _read_npz(path, kind=kind, classes=classes)
    raise DatasetError(
        f"{path} has the unsupported suffix {path.suffix or '(none)'!r}; pass --data with "
        f"{FORMATS_HINT}."
    )


def _check_arguments(
    kind: str,
    image_size: tuple[int, int] | None,
    channels: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    classes: Sequence[str] | None,
    num_classes: int | None,
) -> None:
    if kind not in KINDS:
        raise ConfigError(f"Task kind {kind!r} is unknown; use one of {', '.join(KINDS)}.")
    if image_size is not None and (
        len(image_size) != 2 or not all(_is_int(d) and d >= 1 for d in image_size)
    ):
        raise ConfigError(
            f"Image size {image_size!r} is not two positive integers; give (height, width)."
        )
    if channels is not None and (not _is_int(channels) or channels not in (1, 3)):
        raise ConfigError(f"channels = {channels!r} is not 1 or 3; use 1 (grayscale) or 3 (RGB).")
    if not mean or not std or not all(math.isfinite(float(m)) for m in mean):
        raise ConfigError(f"Normalisation mean {tuple(mean)} and std {tuple(std)} must be "
                          "non-empty and finite; give one value or one per channel.")
    if not all(math.isfinite(float(s)) and float(s) > 0 for s in std):
        raise ConfigError(f"Normalisation std {tuple(std)} has a value that is not positive "
                          "and finite; give standard deviations above 0.")
    if classes is not None:
        names = list(classes)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise ConfigError(
                f"Classes {names!r} must be distinct names, at least one; list each class once."
            )
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        raise ConfigError(f"num_classes = {num_classes!r} is not a positive integer; give one.")


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _read_npz(path: Path, *, kind: str, classes: tuple[str, ...] | None) -> LocalData:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise _bad_npz(path, exc) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetCorruptError(
            f"{path} holds a single array, not an .npz archive; save it with "
            "np.savez(PATH, x=features, y=labels)."
        )
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            held = ", ".join(archive.files) or "nothing"
            raise DatasetError(
                f"{path} has no array {missing[0]!r} (it holds {held}); save it with "
                "np.savez(PATH, x=features, y=labels)."
            )
        try:
            x_raw, y_raw = archive["x"], archive["y"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise _bad_npz(path, exc) from exc
    if x_raw.ndim == 0 or y_raw.ndim == 0 or x_raw.shape[0] != y_raw.shape[0]:
        raise DatasetError(
            f"{path} has x of shape {x_raw.shape} and y of shape {y_raw.shape}; "
            "save one label in y per row of x."
        )
    if x_raw.dtype.kind not in "biuf":
        raise DatasetError(
            f"Array 'x' of {path} has dtype {x_raw.dtype}, which is not numeric; "
            "save the features as numbers."
        )
    x = x_raw.astype(np.float32)
    if not np.isfinite(x).all():
        raise DatasetError(
            f"Array 'x' of {path} has NaN or infinite values; fill or drop those rows."
        )
    y, names = _to_targets(y_raw, kind=kind, classes=classes, where=f"array 'y' of {path}")
    return LocalData(x=x, y=y, classes=names, source=str(path))


def _bad_npz(path: Path, exc: Exception) -> DatasetCorruptError:
    return DatasetCorruptError(
        f"{path} is not a readable .npz archive without pickled objects ({exc}); save it "
        "with np.savez(PATH, x=features, y=labels)."
    )


def _to_targets(
    values: np.ndarray, *, kind: str, classes: tuple[str, ...] | None, where: str
) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Labels as the task needs them: ``(y, classes)``.

    Classification gives int64 labels: whole numbers are kept, text labels are
    numbered in the order of ``classes`` (sorted names when None) and those
    names returned. Regression gives float32 targets. ``where`` names the
    labels in error messages.
    """
    if values.dtype.kind in "OUS":
        if kind != "classification":
            raise DatasetError(
                f"The labels in {where} are text but the task is {kind}; "
                "give numeric targets or use a classification task."
            )
        return _text_labels(values, classes, where)
    if values.dtype.kind not in "biuf":
        raise DatasetError(
            f"The labels in {where} have type {values.dtype}; give numbers or class names."
        )
    if kind == "regression":
        y = values.astype(np.float32)
        if not np.isfinite(y).all():
            raise DatasetError(f"The targets in {where} have NaN or infinite values; "
                               "fill or drop those rows.")
        return y, None
    if values.dtype.kind == "f":
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if bad.size:
            raise DatasetError(
                f"The labels in {where} include {bad.flat[0]!r}, which is not a whole number; "
                "give integer class labels or use a regression task."
            )
    if values.ndim != 1:
        raise DatasetError(
            f"The labels in {where} have shape {values.shape}; give one class label per row."
        )
    y = values.astype(np.int64)
    if y.size and int(y.min()) < 0:
        raise DatasetError(
            f"The labels in {where} include {int(y.min())}; number the classes from 0."
        )
    return y, classes


def _text_labels(
    values: np.ndarray, classes: tuple[str, ...] | None, where: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    if values.ndim != 1:
        raise DatasetError(
            f"The labels in {where} have shape {values.shape}; give one class label per row."
        )
    text = values.astype(str)
    names = classes if classes is not None else tuple(str(n) for n in np.unique(text))
    lookup = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(np.unique(text).tolist()) - set(lookup))
    if unknown:
        raise DatasetError(
            f"The label {unknown[0]!r} in {where} is not one of the task's classes "
            f"{', '.join(names)}; relabel those rows or add it to the classes."
        )
    return np.fromiter((lookup[t] for t in text), dtype=np.int64, count=text.shape[0]), names


def check_labels(y: np.ndarray, num_classes: int, source: str) -> None:
    """Raise DatasetError unless every label in ``y`` is a class index 0..num_classes-1."""
    if not _is_int(num_classes) or num_classes < 1:
        raise ConfigError(f"num_classes = {num_classes!r} is not a positive integer; give one.")
    if y.dtype.kind not in "iub":
        raise DatasetError(
            f"The labels in {source} have type {y.dtype}, not integer class labels; "
            "use integer labels or a regression task."
        )
    if y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise DatasetError(
            f"labels {lo}..{hi} in {source} are outside the task's classes "
            f"0..{num_classes - 1}; relabel the data or use a task with at least "
            f"{hi + 1} classes."
        )


def split_test(data: LocalData, fraction: float, seed: int) -> tuple[LocalData, LocalData | None]:
    """Hold out ``round(fraction * N)`` rows (at least 1) as a test set, chosen by ``seed``.

    Returns ``(train, test)``; ``fraction`` 0 returns ``(data, None)``. Rows
    keep their file order within each part. Raises ConfigError for a fraction
    outside [0, 1), a negative seed, or a split that leaves no training rows.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.floating) or not (
        0 <= fraction < 1
    ):
        raise ConfigError(
            f"Test fraction {fraction!r} is not in [0, 1); give one such as 0.1, or 0 for none."
        )
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"Seed {seed!r} is not a non-negative integer; pass one such as 0.")
    if fraction == 0:
        return data, None
    n = len(data)
    n_test = max(1, round(fraction * n))
    if n_test >= n:
        raise ConfigError(
            f"A test fraction of {fraction} takes {n_test} of the {n} rows in {data.source} "
            "and leaves none for training; lower the fraction or bring more data."
        )
    order = np.random.default_rng(int(seed)).permutation(n)
    test_rows, train_rows = np.sort(order[:n_test]), np.sort(order[n_test:])
    train = LocalData(data.x[train_rows], data.y[train_rows], data.classes, data.source)
    test = LocalData(data.x[test_rows], data.y[test_rows], data.classes, data.source)
    return train, test
