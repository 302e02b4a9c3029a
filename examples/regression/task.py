"""A regression task: predict a number, MSE loss, MSE and MAE metrics, .npz files per client.

    python examples/regression/make_data.py
    fedlearn run --task examples/regression/task.py:task \
        --data 'examples/regression/data/client-{i}.npz' --clients 3 --rounds 5
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

import fedlearn

HERE = Path(__file__).resolve().parent


def test_data() -> fedlearn.Data | None:
    """data/test.npz, when make_data.py has written it."""
    path = HERE / "data" / "test.npz"
    if not path.exists():
        return None
    with np.load(path) as f:
        return fedlearn.Data(f["x"], f["y"])


task = fedlearn.Task(
    name="diabetes-progression",
    model=lambda: nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1)),
    kind="regression",          # loss "mse"; metrics "mse" and "mae"
    test_data=test_data,
    config={"optimizer": "sgd", "lr": 0.02, "batch_size": 16, "epochs": 2},
)
