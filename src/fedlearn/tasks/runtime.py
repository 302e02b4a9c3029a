"""Loading a party's data for a task, and checking it (numpy only; no torch).

:func:`load_client_data` is what every command calls: it runs the task's
``data`` function (or reads ``--data PATH``), splits off a local test set when
asked, and checks the result (non-empty, labels inside the task's classes), so
bad data is one clear sentence before anything registers or trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.errors import ConfigError, DatasetError
from fedlearn.tasks.base import ClientData, Data, DataContext, Task, user_call


def expand_path(template: str | Path | None, index: int | None) -> Path | None:
    """``--data`` with ``{i}`` replaced by the client index (for ``run`` and ``sim``)."""
    if template is None:
        return None
    text = str(template)
    if "{i}" in text:
        if index is None:
            raise ConfigError(f"--data {text} has {{i}} but this command has no client index; "
                              "give one path.")
        text = text.replace("{i}", str(index))
    return Path(text)


def read_path(
    ctx: DataContext,
    *,
    kind: str,
    num_classes: int | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    classes: Sequence[str] | None = None,
) -> ClientData:
    """``ctx.path`` read as an image folder, CSV/Parquet (``ctx.label``) or ``.npz``."""
    from fedlearn.data.local import read_local

    if ctx.path is None:
        raise ConfigError("this task reads its data from --data PATH; pass --data (a folder of "
                          "images per class, a CSV or Parquet file with --label, or an .npz).")
    local = read_local(ctx.path, kind=kind, label=ctx.label, image_size=image_size,
                       channels=channels, mean=mean, std=std, classes=classes,
                       num_classes=num_classes)
    return with_local_test(ClientData(Data(local.x, local.y)), ctx)


def with_local_test(data: ClientData, ctx: DataContext) -> ClientData:
    """Hold out ``ctx.test_fraction`` of the training data as the local test set (seeded)."""
    if ctx.test_fraction <= 0:
        return data
    if not 0 < ctx.test_fraction < 1:
        raise ConfigError(f"--test-fraction must be in [0, 1), got {ctx.test_fraction}.")
    n = len(data.train)
    k = max(1, round(ctx.test_fraction * n))
    if k >= n:
        raise ConfigError(f"--test-fraction {ctx.test_fraction} of {n} examples leaves no "
                          "training data; lower it.")
    order = np.random.default_rng([ctx.seed, 7_919]).permutation(n)
    test, train = order[:k], order[k:]
    local_test = Data(data.train.x[test], data.train.y[test])
    merged = local_test if data.test is None else Data(
        np.concatenate([data.test.x, local_test.x]), np.concatenate([data.test.y, local_test.y]))
    return ClientData(Data(data.train.x[train], data.train.y[train]), merged)


def default_data(task: Task, ctx: DataContext) -> ClientData:
    """A task without a data function reads ``--data`` with its ``reader`` options."""
    options: dict[str, Any] = dict(task.reader)
    size = options.pop("image_size", None)
    return read_path(ctx, kind=task.kind, num_classes=task.num_classes,
                     image_size=tuple(size) if size is not None else None, **options)


def load_client_data(task: Task, ctx: DataContext) -> ClientData:
    """The party's data for ``task``, checked; every problem is one FedlearnError sentence."""
    data = user_call(task.name, "loading the data",
                     task.data if task.data is not None else lambda c: default_data(task, c),
                     ctx, error=DatasetError)
    if isinstance(data, Data):
        data = with_local_test(ClientData(data), ctx)
    if not isinstance(data, ClientData):
        raise ConfigError(f"task {task.name!r}: its data function returned a "
                          f"{type(data).__name__}; return fedlearn.ClientData(train, test).")
    where = f" in {ctx.path}" if ctx.path is not None else ""
    if len(data.train) == 0:
        raise DatasetError(f"task {task.name!r} found no training examples{where}; check the "
                           "data path or partition.")
    for part in (data.train, data.test):
        if part is not None:
            check_targets(task, part, where)
    return data


def check_targets(task: Task, data: Data, where: str = "") -> None:
    """Classification labels must be integers inside ``0..num_classes-1``; values finite."""
    if data.x.dtype.kind == "f" and not np.isfinite(data.x).all():
        raise DatasetError(f"task {task.name!r}: the inputs{where} hold NaN or infinite "
                           "values; clean the data.")
    if task.kind != "classification" or task.train is not None or task.script is not None:
        return
    y = data.y
    if y.dtype.kind not in "iu":
        raise DatasetError(f"task {task.name!r}: classification labels{where} must be "
                           f"integers, got {y.dtype}; encode the classes as 0..K-1.")
    if len(y) and task.num_classes is not None:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= task.num_classes:
            raise DatasetError(
                f"labels {lo}..{hi}{where} are outside the task's classes "
                f"0..{task.num_classes - 1}; fix the labels or the task's num_classes."
            )


def server_test_data(task: Task) -> Data | None:
    """The task's server-side test set, or None (federated evaluation only)."""
    if task.test_data is None:
        return None
    data = user_call(task.name, "test_data()", task.test_data, error=DatasetError)
    if data is not None:
        check_targets(task, data)
    return data


def context(
    *, index: int | None = None, num_clients: int | None = None, client_id: str = "",
    data: str | Path | None = None, label: str | None = None, partition: str | None = None,
    seed: int = 0, test_fraction: float = 0.0,
) -> DataContext:
    """A :class:`DataContext`, with ``{i}`` of ``data`` expanded."""
    return replace(DataContext(), client_index=index, num_clients=num_clients,
                   client_id=client_id, path=expand_path(data, index), label=label,
                   partition=partition, seed=seed, test_fraction=test_fraction)
