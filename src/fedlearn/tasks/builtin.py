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


@functools.lru_cache(maxsize=8)
def _parts(name: str, spec: str, clients: int, seed: int) -> tuple[np.ndarray, ...]:
    from fedlearn.data import load_dataset, partition

    return tuple(partition(load_dataset(name).y_train, clients, spec, seed))


def builtin_data(name: str, ctx: DataContext) -> ClientData:
    """A party's share of built-in dataset ``name`` (see the module docstring)."""
    from fedlearn.data import load_dataset, parse_partition
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
        spec = parse_partition(ctx.partition)
        if spec.part is not None:
            n, i = spec.part
            whole = ctx.partition.rsplit(":", 2)[0]
            rows = _parts(name, whole, n, ctx.seed)[i]
        else:
            rows = _parts(name, ctx.partition, 1, ctx.seed)[0]
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
