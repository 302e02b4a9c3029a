"""A task with no torch: numpy softmax regression, trained by client.py (the client API).

    fedlearn run --task examples/numpy_client/task.py:task --clients 3 --rounds 5
    fedlearn sim --task examples/numpy_client/task.py:task --clients 3 --per-round 3 --rounds 5

The server holds the digits test split and evaluates with `evaluate` below
(numpy too), so the whole run never trains a torch model.
"""

from pathlib import Path

import numpy as np

import fedlearn


def init(seed: int) -> dict[str, np.ndarray]:
    """Small random weights for 64 inputs and 10 classes."""
    rng = np.random.default_rng(seed)
    return {"weight": (rng.normal(0, 0.01, (64, 10))).astype(np.float32),
            "bias": np.zeros(10, np.float32)}


def test_data() -> fedlearn.Data:
    """The last 300 digits (no client trains on them)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return fedlearn.Data((d.data[-300:] / 16.0).astype(np.float32), d.target[-300:])


def evaluate(ctx: fedlearn.EvalContext) -> dict[str, float]:
    """Accuracy and cross-entropy of the weights on ``ctx.data``."""
    z = ctx.data.x @ ctx.weights["weight"] + ctx.weights["bias"]
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = ctx.data.y
    return {"accuracy": float((p.argmax(1) == y).mean()),
            "loss": float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())}


task = fedlearn.Task(
    name="numpy-softmax",
    init=init,
    script=Path(__file__).resolve().parent / "client.py",
    test_data=test_data,
    evaluate=evaluate,
    config={"lr": 0.5, "epochs": 2},
)
