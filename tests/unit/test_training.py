"""local_update and evaluate on small synthetic data (known answers, determinism)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlearn.config import TrainConfig
from fedlearn.errors import ConfigError
from fedlearn.models import build_model, get_weights
from fedlearn.training import Shard, epoch_orders, evaluate, local_update


def blobs(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated classes of 1x4x4 'images'."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int64)
    x = rng.normal(0, 0.3, (n, 1, 4, 4)).astype(np.float32)
    x[y == 1] += 1.0
    return x, y


def test_local_update_learns_and_returns_delta() -> None:
    x, y = blobs()
    model = build_model("mlp", (1, 4, 4), 2, seed=0)
    start = get_weights(model)
    cfg = TrainConfig(epochs=3, batch_size=16, optimizer="sgd", lr=0.1, momentum=0.9)
    res = local_update(model, start, Shard.from_numpy(x, y), cfg, seed=1, base_version=4)
    assert res.num_examples == 400 and res.base_version == 4
    assert set(res.delta) == set(start)
    new = {k: start[k] + res.delta[k] for k in start}
    acc = evaluate(build_model("mlp", (1, 4, 4), 2), Shard.from_numpy(x, y), new)
    assert acc.accuracy > 0.95
    assert res.metrics["train_accuracy"] > 0.9
    assert res.metrics["seconds"] > 0


def test_local_update_trains_only_on_its_indices() -> None:
    x, y = blobs()
    model = build_model("mlp", (1, 4, 4), 2, seed=0)
    w = get_weights(model)
    cfg = TrainConfig(epochs=1, batch_size=8)
    rows = np.sort(np.random.default_rng(1).choice(len(y), 40, replace=False))
    # Rows outside the shard are poison: touching any of them makes the delta non-finite.
    poisoned = x.copy()
    poisoned[np.setdiff1d(np.arange(len(y)), rows)] = np.nan
    res = local_update(model, w, Shard.from_numpy(poisoned, y, rows), cfg, seed=0)
    assert res.num_examples == 40
    assert all(np.isfinite(v).all() for v in res.delta.values())
    assert any(np.abs(v).max() > 0 for v in res.delta.values())  # it did train
    # Exactly as if the client held only those rows, in that order.
    alone = local_update(model, w, Shard.from_numpy(x[rows], y[rows]), cfg, seed=0)
    assert set(res.delta) == set(alone.delta)
    for k in alone.delta:
        np.testing.assert_array_equal(res.delta[k], alone.delta[k], err_msg=k)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_same_seed_same_model(optimizer: str) -> None:
    x, y = blobs()
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer=optimizer, lr=0.01)
    w = get_weights(build_model("mlp", (1, 4, 4), 2, seed=3))
    shard = Shard.from_numpy(x, y, np.arange(100, 300))
    a = local_update(build_model("mlp", (1, 4, 4), 2), w, shard, cfg, seed=5).delta
    b = local_update(build_model("mlp", (1, 4, 4), 2), w, shard, cfg, seed=5).delta
    c = local_update(build_model("mlp", (1, 4, 4), 2), w, shard, cfg, seed=6).delta
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_epoch_orders_are_permutations() -> None:
    orders = epoch_orders(10, 3, seed=0)
    assert len(orders) == 3
    assert all(sorted(o.tolist()) == list(range(10)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])


def test_evaluate_known_answer() -> None:
    x, y = blobs(50)
    model = build_model("mlp", (1, 4, 4), 2)
    w = {k: np.zeros_like(v) for k, v in get_weights(model).items()}
    # All-zero weights give equal logits: loss ln 2, argmax picks class 0.
    res = evaluate(model, Shard.from_numpy(x, y), w)
    assert res.loss == pytest.approx(np.log(2), rel=1e-6)
    assert res.accuracy == pytest.approx(float(np.mean(y == 0)))


@pytest.mark.parametrize(
    "kwargs",
    [{"epochs": 0}, {"batch_size": 0}, {"optimizer": "rmsprop"}, {"lr": 0.0}, {"lr": -1.0},
     {"momentum": 1.5}, {"weight_decay": -1.0}],
)
def test_bad_train_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)  # type: ignore[arg-type]
