"""FedProx and SCAFFOLD in the one local-training routine, and in every engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlearn.config import TrainConfig
from fedlearn.errors import ConfigError
from fedlearn.models import get_weights
from fedlearn.sim import ClientTask, SequentialEngine, make_engine
from fedlearn.sim.functional import FunctionalEngine
from fedlearn.sim.vectorized import VectorizedEngine, unsupported_reason
from fedlearn.strategies.scaffold import DELTA_C, control_update
from fedlearn.tasks import Task
from fedlearn.training import Shard, Trainer
from fedlearn.types import ControlVariates, Weights
from tests.unit.test_sim_functional import (
    SIZES,
    assert_same,
    make_model,
    prox_reference,
    tasks_of,
    toy_data,
)

# Toy-sized tensors train fastest (and steadiest on a busy machine) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SGD = TrainConfig(optimizer="sgd", lr=0.1, batch_size=8, epochs=2)


def controls(weights: Weights, seed: int) -> ControlVariates:
    """Non-trivial server and client control variates shaped like the model's floats."""
    rng = np.random.default_rng(seed)
    floats = {k: v for k, v in weights.items() if v.dtype.kind == "f"}
    return ControlVariates(
        {k: (rng.normal(size=v.shape) * 0.05).astype(v.dtype) for k, v in floats.items()},
        {k: (rng.normal(size=v.shape) * 0.05).astype(v.dtype) for k, v in floats.items()})


def trainer_and_shard(name: str = "mlp") -> tuple[Trainer, Weights, Shard, torch.Tensor,
                                                  torch.Tensor]:
    model, shape = make_model(name)
    x, y = toy_data(shape)
    trainer = Trainer(Task(name="toy", model=lambda: model), seed=0)
    return trainer, get_weights(model), Shard(x, y, tasks_of(SIZES)[0].indices), x, y


def test_prox_term_in_the_sequential_loop_matches_a_hand_loop() -> None:
    model, shape = make_model("mlp")
    x, y = toy_data(shape)
    weights = get_weights(model)
    task = tasks_of(SIZES)[0]
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=8, epochs=2,
                      extra={"prox_mu": 0.5})
    got = SequentialEngine(model, x, y).train_round(weights, [task], cfg)[0]
    assert_same(got.delta, prox_reference(model, weights, x, y, task, cfg, 0.5))
    plain = SequentialEngine(model, x, y).train_round(weights, [task], SGD)[0]
    assert not np.allclose(got.delta["fc1.weight"], plain.delta["fc1.weight"])


def test_scaffold_one_step_by_hand() -> None:
    """One full-batch SGD step: y = x - lr (g + c - c_i), so the delta moves by -lr (c - c_i);
    and option II gives c_i+ = c_i - c + (x - y) / lr."""
    trainer, weights, shard, _, _ = trainer_and_shard()
    cfg = TrainConfig(optimizer="sgd", lr=0.1, batch_size=64, epochs=1)
    cv = controls(weights, 1)
    plain = trainer.fit(weights, shard, cfg, seed=3)
    got = trainer.fit(weights, shard, cfg, seed=3, control=cv)
    assert plain.control is None and plain.extra == {}
    for k in weights:
        want = plain.delta[k] - 0.1 * (cv.server[k] - cv.client[k])
        np.testing.assert_allclose(got.delta[k], want, rtol=0, atol=1e-6, err_msg=k)
    # (weights + delta only approximates the trained weights in float32.)
    new = {k: weights[k] + got.delta[k] for k in weights}
    kept, dc = control_update(cv.client, cv.server, weights, new, steps=1, lr=0.1)
    assert got.control is not None
    for k in cv.server:
        np.testing.assert_allclose(got.control[k], kept[k], rtol=0, atol=1e-7)
        np.testing.assert_allclose(got.extra[DELTA_C][k], dc[k], rtol=0, atol=1e-7)
    # With zero variates SCAFFOLD trains exactly like plain SGD.
    zeros = {k: np.zeros_like(v) for k, v in cv.server.items()}
    same = trainer.fit(weights, shard, cfg, seed=3, control=ControlVariates(zeros, zeros))
    for k in weights:
        np.testing.assert_array_equal(same.delta[k], plain.delta[k])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_scaffold_control_variate_is_the_mean_of_the_clients_own_gradients(
        momentum: float) -> None:
    """Option II makes c_i+ the mean of the client's raw (uncorrected) gradients over its K
    steps; with SGD momentum too (the paper's (x - y)/(K lr) would be about 1/(1 - beta)
    times that, which made SCAFFOLD over-correct and diverge under momentum clients)."""
    trainer, weights, shard, _, _ = trainer_and_shard()
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=momentum, batch_size=8, epochs=2)
    cv = controls(weights, 2)
    assert trainer.model is not None
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [p.register_hook(lambda g, n=n: seen.setdefault(n, []).append(g.detach().clone()))
             for n, p in trainer.model.named_parameters()]
    try:
        got = trainer.fit(weights, shard, cfg, seed=5, control=cv)
    finally:
        for h in hooks:
            h.remove()
    steps = 2 * -(-len(shard) // 8)
    assert got.control is not None and all(len(v) == steps for v in seen.values())
    for n, grads in seen.items():
        mean = torch.stack(grads).mean(0).numpy()
        np.testing.assert_allclose(got.control[n], mean, rtol=0, atol=2e-5, err_msg=n)
        np.testing.assert_allclose(got.extra[DELTA_C][n], mean - cv.client[n], rtol=0,
                                   atol=2e-5, err_msg=n)
    if momentum:  # what the paper's formula, taken literally, would have given instead
        new = {k: weights[k] + got.delta[k] for k in weights}
        literal, _ = control_update(cv.client, cv.server, weights, new, steps=steps, lr=0.05)
        shift = cv.client["fc1.weight"] - cv.server["fc1.weight"]
        ratio = (np.linalg.norm(literal["fc1.weight"] - shift)
                 / np.linalg.norm(got.control["fc1.weight"] - shift))
        assert ratio > 3, ratio


@pytest.mark.parametrize("name", ["mlp", "bn-cnn"])
@pytest.mark.parametrize("config", ["sgd", "momentum-prox"])
def test_functional_engine_matches_sequential_with_scaffold(name: str, config: str) -> None:
    model, shape = make_model(name)
    x, y = toy_data(shape)
    weights = get_weights(model)
    cfg = SGD if config == "sgd" else TrainConfig(
        optimizer="sgd", lr=0.05, momentum=0.9, batch_size=8, epochs=2, extra={"prox_mu": 0.1})
    tasks = [ClientTask(t.client_id, t.indices, t.seed, controls(weights, i))
             for i, t in enumerate(tasks_of(SIZES))]
    got = FunctionalEngine(model, x, y, log=lambda _: None).train_round(weights, tasks, cfg)
    want = SequentialEngine(model, x, y).train_round(weights, tasks, cfg)
    for g, w in zip(got, want, strict=True):
        assert_same(g.delta, w.delta)
        assert g.control is not None and w.control is not None
        # c_i+ divides the delta by K * lr (here up to 10 * 0.05): a larger tolerance.
        assert_same(g.control, w.control, atol=1e-4)
        assert_same(g.extra[DELTA_C], w.extra[DELTA_C], atol=1e-4)


def test_the_mlp_engine_declines_prox_and_scaffold_and_the_stacked_one_takes_them() -> None:
    model, shape = make_model("mlp")
    x, y = toy_data(shape)
    task = Task(name="toy", model=lambda: model)
    assert unsupported_reason(model, SGD) is None
    prox = TrainConfig(optimizer="sgd", lr=0.1, extra={"prox_mu": 0.1})
    scaffold = TrainConfig(optimizer="sgd", lr=0.1, extra={"scaffold": 1})
    for cfg in (prox, scaffold):
        assert "no FedProx term or SCAFFOLD correction" in (unsupported_reason(model, cfg) or "")
        said: list[str] = []
        engine = make_engine("vectorized", task, x, y, cfg, log=said.append)
        assert isinstance(engine, FunctionalEngine), said
    assert isinstance(make_engine("vectorized", task, x, y, SGD, log=print), VectorizedEngine)
    with pytest.raises(ValueError, match="no FedProx term"):
        VectorizedEngine(model, x, y).train_round(get_weights(model), tasks_of(SIZES), prox)


def test_scaffold_refuses_a_task_with_its_own_train_function() -> None:
    model, shape = make_model("mlp")
    x, y = toy_data(shape)
    task = Task(name="own", model=lambda: model, train=lambda ctx: None)
    trainer = Trainer(task, seed=0)
    weights = get_weights(model)
    with pytest.raises(ConfigError, match="cannot take SCAFFOLD's corrected steps"):
        trainer.fit(weights, Shard(x, y), SGD, seed=0, control=controls(weights, 0))
