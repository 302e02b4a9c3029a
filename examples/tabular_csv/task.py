"""Tabular data in CSV files, one per hospital; ROC AUC; no data on the server at all.

    python examples/tabular_csv/make_data.py
    fedlearn run --task examples/tabular_csv/task.py:task \
        --data 'examples/tabular_csv/data/client-{i}.csv' --label diagnosis \
        --test-fraction 0.25 --clients 3 --rounds 10
    # one hospital by hand, against a running server:
    fedlearn client --server http://SERVER:8080 --token-file join-token \
        --task examples/tabular_csv/task.py:task --data my-records.csv --label diagnosis \
        --test-fraction 0.25
"""

from __future__ import annotations

import numpy as np
from torch import nn

import fedlearn
from fedlearn.data import read_local


def model() -> nn.Module:
    """A small network over the 30 features."""
    return nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2))


def load(ctx: fedlearn.DataContext) -> fedlearn.Data:
    """Read this hospital's CSV and standardise it with its own statistics.

    fedlearn holds out ``--test-fraction`` of the rows as the local test set.
    """
    if ctx.path is None:
        raise fedlearn.FedlearnError("pass --data FILE.csv --label diagnosis.")
    table = read_local(ctx.path, label=ctx.label or "diagnosis", num_classes=2)
    x = (table.x - table.x.mean(axis=0)) / (table.x.std(axis=0) + 1e-6)
    return fedlearn.Data(x.astype(np.float32), table.y)


task = fedlearn.Task(
    name="breast-cancer",
    model=model,
    data=load,
    num_classes=2,
    metrics=["accuracy", "auc"],
    config={"optimizer": "adam", "lr": 0.01, "batch_size": 16},
)
