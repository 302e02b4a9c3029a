"""Reading a CSV or Parquet table with pyarrow into a feature matrix and a label column.

One column holds the labels; every other column is a feature and must be
numeric (integer, floating point or boolean) with no missing values. pyarrow
is imported only when a table is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.errors import ConfigError, DatasetCorruptError, DatasetError

__all__ = ["PARQUET_SUFFIXES", "TABLE_SUFFIXES", "column_names", "read_table"]

#: Suffixes read as Parquet; ``.csv`` is the other table format.
PARQUET_SUFFIXES: frozenset[str] = frozenset({".parquet", ".pq"})
TABLE_SUFFIXES: frozenset[str] = PARQUET_SUFFIXES | {".csv"}


def _load(path: Path, *, parquet: bool) -> Any:
    """The whole table in ``path`` as a ``pyarrow.Table``."""
    import pyarrow as pa

    try:
        if parquet:
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.csv as pacsv

        return pacsv.read_csv(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        what = "Parquet" if parquet else "CSV"
        raise DatasetCorruptError(
            f"{path} is not a readable {what} table ({exc}); check the file or export it again."
        ) from exc


def column_names(path: Path) -> list[str]:
    """The column names of the table in ``path``, in file order."""
    return [str(n) for n in _load(path, parquet=path.suffix.lower() in PARQUET_SUFFIXES)
            .column_names]


def read_table(path: Path, *, label: str, parquet: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` into ``(x, labels)``: float32 features (N, F) and the raw label column.

    Features are every column except ``label``, in file order. The label
    column comes back as numbers, or as an object array of strings for text
    labels. A missing label column, no rows, no feature columns, a missing
    value, a feature that is not numeric, or a NaN or infinite feature raises
    an error naming the column.
    """
    import pyarrow as pa

    table = _load(path, parquet=parquet)
    names = [str(n) for n in table.column_names]
    if label not in names:
        raise ConfigError(
            f"{path} has no label column {label!r}; pass --label with one of its columns: "
            f"{', '.join(names)}."
        )
    if names.count(label) > 1:
        raise DatasetError(
            f"{path} has {names.count(label)} columns named {label!r}; rename all but one."
        )
    if table.num_rows == 0:
        raise DatasetError(f"{path} holds no rows; give at least one example.")
    features = [(i, n) for i, n in enumerate(names) if n != label]
    if not features:
        raise DatasetError(
            f"{path} has no feature columns besides the label {label!r}; add some."
        )
    for name, column in zip(names, table.columns, strict=True):
        if column.null_count:
            raise DatasetError(
                f"Column {name!r} of {path} has {column.null_count} missing values; "
                "fill or drop those rows."
            )
    x = np.empty((table.num_rows, len(features)), dtype=np.float32)
    for j, (i, name) in enumerate(features):
        column = table.column(i)
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind)):
            raise DatasetError(
                f"Column {name!r} of {path} has type {kind}, which is not numeric; "
                "encode it as numbers or drop it."
            )
        with np.errstate(over="ignore", invalid="ignore"):
            x[:, j] = column.to_numpy()
        if not np.isfinite(x[:, j]).all():
            raise DatasetError(
                f"Column {name!r} of {path} has NaN or infinite values "
                "(or numbers too large for float32); fill or drop those rows."
            )
    return x, _label_values(table.column(names.index(label)), label, path)


def _label_values(column: Any, label: str, path: Path) -> np.ndarray:
    """The label column as a numpy array: numbers as they are, text as str objects."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return np.array(column.to_pylist(), dtype=object)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return np.asarray(column.to_numpy())
    raise DatasetError(
        f"Label column {label!r} of {path} has type {kind}; give numbers or class names."
    )
