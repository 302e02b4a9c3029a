"""The built-in datasets and models as tasks, written with the same public API as a user's.

``builtin_task("fashion-mnist", "mlp")`` is what ``--dataset fashion-mnist --model mlp``
names. A client's data is its ``--partition`` part of the training set (or
``--data PATH`` read with the dataset's image size and normalisation); the
server's test data is the official test split.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from fedlearn.errors import ConfigError
from fedlearn.tasks.base import ClientData, Data, DataContext, Task

# Each entry keeps its labels array alive, so its id cannot be reused by another array
# while the entry exists (an id alone could name a freed and reallocated array).
_PARTS: dict[tuple[int, str, int, int], tuple[np.ndarray, tuple[np.ndarray, ...]]] = {}


def partition_rows(labels: np.ndarray, spec: str, seed: int) -> np.ndarray:
    """The rows of ``labels`` that partition ``spec`` (``iid:N:I`` ...) gives this party.

    The whole N-way split is computed once per (labels, spec, seed) and kept, so N
    simulated clients do not each recompute it.
    """
    from fedlearn.data import client_indices, parse_partition, partition

    parsed = parse_partition(spec)
    if parsed.part is None:  # range:L-R, or a spec that names no part (refused)
        return client_indices(labels, parsed, seed)
    n, i = parsed.part
    whole = spec.rsplit(":", 2)[0]
    key = (id(labels), whole, n, seed)
    entry = _PARTS.get(key)
    if entry is None or entry[0] is not labels:
        if len(_PARTS) > 16:
            _PARTS.clear()
        entry = (labels, tuple(partition(labels, n, whole, seed)))
        _PARTS[key] = entry
    return entry[1][i]


def array_task(
    name: str, model: Any, train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None = None, **options: Any,
) -> Task:
    """A task over in-memory arrays: each party gets its ``--partition`` share of ``train``
    (all of it when no partition is named); ``test`` is the server's test set."""
    x, y = train

    def data(ctx: DataContext) -> ClientData:
        from fedlearn.tasks.runtime import with_local_test

        if ctx.partition is None:
            return with_local_test(ClientData(Data(x, y)), ctx)
        rows = partition_rows(y, ctx.partition, ctx.seed)
        return with_local_test(ClientData(Data(x[rows], y[rows])), ctx)

    test_data = None if test is None else (lambda: Data(*test))
    return Task(name=name, model=model, data=data, test_data=test_data, **options)


def builtin_data(name: str, ctx: DataContext) -> ClientData:
    """A party's share of built-in dataset ``name`` (see the module docstring)."""
    from fedlearn.data import load_dataset
    from fedlearn.data.datasets import NORMALIZATION
    from fedlearn.data.fetch import get_source
    from fedlearn.tasks.runtime import read_path, with_local_test

    if ctx.path is not None:
        source = get_source(name)
        norm = NORMALIZATION[name]
        _, h, w = source.input_shape
        return read_path(ctx, kind="classification", num_classes=source.num_classes,
                         image_size=(h, w), channels=source.input_shape[0],
                         mean=norm.mean, std=norm.std)
    ds = load_dataset(name)
    if ctx.partition is None:
        train = Data(ds.x_train, ds.y_train)
    else:
        rows = partition_rows(ds.y_train, ctx.partition, ctx.seed)
        train = Data(ds.x_train[rows], ds.y_train[rows])
    return with_local_test(ClientData(train), ctx)


def builtin_task(dataset: str, model: str) -> Task:
    """The task of built-in ``model`` on built-in ``dataset`` (fitting is checked here)."""
    from fedlearn.data.fetch import get_source
    from fedlearn.models import MODELS, model_fits

    source = get_source(dataset)
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}, or "
                          "bring your own with --task file.py:NAME.")
    model_fits(model, source.input_shape)
    return _cached(dataset, model)


@functools.lru_cache(maxsize=16)
def _cached(dataset: str, model: str) -> Task:
    from fedlearn.data.fetch import get_source

    source = get_source(dataset)

    def make_model() -> Any:
        from fedlearn.models import build_model

        return build_model(model, source.input_shape, source.num_classes, seed=None)

    def test_data() -> Data:
        from fedlearn.data import load_dataset

        ds = load_dataset(dataset)
        return Data(ds.x_test, ds.y_test)

    return Task(
        name=f"{dataset}/{model}",
        model=make_model,
        data=functools.partial(builtin_data, dataset),
        test_data=test_data,
        kind="classification",
        num_classes=source.num_classes,
    )
