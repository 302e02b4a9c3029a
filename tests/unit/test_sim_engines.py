"""Every simulator engine against the one reference: ``local_update``, client by client.

One shared test body runs against every engine: whatever an engine does
inside, each client must end where ``local_update`` takes it for the same
weights, rows, seed and optimizer, to float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedlearn.config import TrainConfig
from fedlearn.errors import ConfigError
from fedlearn.models import build_model, get_weights
from fedlearn.sim import (
    ENGINES,
    ClientTask,
    SequentialEngine,
    VectorizedEngine,
    make_engine,
)
from fedlearn.sim.vectorized import make_schedule
from fedlearn.training import Shard, epoch_orders, local_update
from fedlearn.types import Weights

# Toy-sized tensors train fastest (and steadiest on a busy machine) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (1, 4, 4)
CLASSES = 3


def toy_data(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three noisy classes of 1x4x4 'images' (learnable, so gradients stay informative)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    x = rng.normal(0, 1.0, (n, *SHAPE)).astype(np.float32)
    x[:, 0, 0, :] += y[:, None].astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def tasks_of(sizes: list[int], seed: int = 0) -> list[ClientTask]:
    """Disjoint clients of the given sizes, with scattered rows and their own seeds."""
    rows = np.random.default_rng(seed).permutation(600)
    out, start = [], 0
    for i, n in enumerate(sizes):
        out.append(ClientTask(f"client-{i}", rows[start : start + n].astype(np.int64), 1000 + i))
        start += n
    return out


@dataclass(frozen=True)
class Case:
    name: str
    config: TrainConfig
    sizes: tuple[int, ...]


CASES = [
    Case("sgd-equal", TrainConfig(optimizer="sgd", lr=0.1, batch_size=16), (64, 64, 64)),
    Case("sgd-partial", TrainConfig(optimizer="sgd", lr=0.1, batch_size=16), (37, 100, 5, 64, 16)),
    Case("sgd-momentum-wd",
         TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=16),
         (37, 100, 5, 64)),
    Case("sgd-wd", TrainConfig(optimizer="sgd", lr=0.05, weight_decay=1e-2, batch_size=8),
         (30, 9, 50)),
    Case("adam", TrainConfig(optimizer="adam", lr=0.01, batch_size=16), (37, 100, 5, 64)),
    Case("adam-wd-2-epochs",
         TrainConfig(optimizer="adam", lr=0.01, weight_decay=1e-3, batch_size=16, epochs=2),
         (37, 100, 5, 64)),
    Case("sgd-momentum-3-epochs",
         TrainConfig(optimizer="sgd", lr=0.05, momentum=0.5, batch_size=32, epochs=3),
         (70, 33, 128)),
    Case("one-client-one-row", TrainConfig(optimizer="sgd", lr=0.1, batch_size=16), (1,)),
]


def reference(weights: Weights, tasks: list[ClientTask], config: TrainConfig,
              x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[Weights, int]]:
    model = build_model("mlp", SHAPE, CLASSES)
    out = {}
    for t in tasks:
        res = local_update(model, weights, Shard(x, y, t.indices), config, seed=t.seed)
        out[t.client_id] = (res.delta, res.num_examples)
    return out


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_engine_matches_local_update(engine: str, case: Case) -> None:
    x, y = toy_data()
    model = build_model("mlp", SHAPE, CLASSES, seed=1)
    weights = get_weights(model)
    tasks = tasks_of(list(case.sizes))
    eng = make_engine(engine, model, x, y, case.config)
    assert eng.name == engine
    updates = eng.train_round(weights, tasks, case.config)
    expected = reference(weights, tasks, case.config, x, y)
    assert [u.client_id for u in updates] == [t.client_id for t in tasks]
    for u in updates:
        delta, n = expected[u.client_id]
        assert u.num_examples == n == len(tasks[int(u.client_id.split("-")[1])].indices)
        assert set(u.delta) == set(delta)
        for k in delta:
            assert u.delta[k].shape == delta[k].shape and u.delta[k].dtype == np.float32
            np.testing.assert_allclose(u.delta[k], delta[k], rtol=0, atol=2e-5, err_msg=k)
        # Training moved every client (a vacuous match of zeros would prove nothing).
        assert max(float(np.abs(v).max()) for v in u.delta.values()) > 1e-3


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sizes", [[20, 50], [20]])
def test_engine_does_not_change_its_inputs(engine: str, sizes: list[int]) -> None:
    x, y = toy_data()
    x0, y0 = x.clone(), y.clone()
    weights = get_weights(build_model("mlp", SHAPE, CLASSES, seed=2))
    before = {k: v.copy() for k, v in weights.items()}
    for v in weights.values():
        v.setflags(write=False)  # as decoded safetensors are; no warning, no copy needed
    tasks = tasks_of(sizes)
    rows = [t.indices.copy() for t in tasks]
    cfg = TrainConfig(optimizer="adam", lr=0.01, batch_size=8)
    make_engine(engine, build_model("mlp", SHAPE, CLASSES), x, y, cfg).train_round(
        weights, tasks, cfg)
    assert all(np.array_equal(before[k], weights[k]) for k in weights)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert all(np.array_equal(r, t.indices) for r, t in zip(rows, tasks, strict=True))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_engine_serves_rounds_of_any_size(engine: str, optimizer: str) -> None:
    """An engine keeps working buffers between rounds; rounds may grow and shrink."""
    x, y = toy_data()
    cfg = TrainConfig(optimizer=optimizer, lr=0.05, momentum=0.9 if optimizer == "sgd" else 0,
                      batch_size=16)
    model = build_model("mlp", SHAPE, CLASSES, seed=5)
    eng = make_engine(engine, model, x, y, cfg)
    kept = []
    for round_sizes in ([30, 60, 10], [50], [12, 70, 33, 9, 40], [25, 25]):
        weights = get_weights(build_model("mlp", SHAPE, CLASSES, seed=len(round_sizes)))
        tasks = tasks_of(round_sizes, seed=len(round_sizes))
        expected = reference(weights, tasks, cfg, x, y)
        updates = eng.train_round(weights, tasks, cfg)
        kept.append((updates, {u.client_id: {k: v.copy() for k, v in u.delta.items()}
                               for u in updates}))
        for u in updates:
            for k, v in expected[u.client_id][0].items():
                np.testing.assert_allclose(u.delta[k], v, rtol=0, atol=2e-5, err_msg=k)
    # Later rounds did not write into the deltas handed out earlier.
    for updates, copies in kept:
        assert all(np.array_equal(u.delta[k], copies[u.client_id][k])
                   for u in updates for k in u.delta)


def test_engines_agree_over_several_rounds() -> None:
    """Chain three rounds of FedAvg by hand with each engine; the models stay together."""
    x, y = toy_data()
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=16)
    finals = []
    for engine in ENGINES:
        model = build_model("mlp", SHAPE, CLASSES, seed=3)
        weights = get_weights(model)
        eng = make_engine(engine, model, x, y, cfg)
        for rnd in range(3):
            tasks = [ClientTask(t.client_id, t.indices, t.seed + rnd)
                     for t in tasks_of([37, 100, 5, 64])]
            ups = eng.train_round(weights, tasks, cfg)
            total = sum(u.num_examples for u in ups)
            weights = {k: v + sum(u.num_examples * u.delta[k] for u in ups) / total
                       for k, v in weights.items()}
        finals.append(weights)
    assert max(float(np.abs(finals[0][k] - finals[1][k]).max()) for k in finals[0]) < 1e-4


def test_schedule_orders_clients_by_steps_without_padding_waste() -> None:
    tasks = tasks_of([5, 40, 17])
    plan = make_schedule(tasks, batch_size=16, epochs=1)
    # 1, 3 and 2 steps: the stack is [client-1, client-2, client-0].
    assert plan.order.tolist() == [1, 2, 0]
    assert plan.active == [3, 2, 1]
    assert plan.rows.shape == (3, 3, 16)
    # client-1 (40 rows): two full batches, then 8 real rows and 8 of weight zero.
    scale = plan.scale[:, 0].numpy()
    assert np.allclose(scale[0], 1 / 16) and np.allclose(scale[1], 1 / 16)
    assert np.allclose(scale[2, :8], 1 / 8) and np.all(scale[2, 8:] == 0)
    # client-0 (5 rows) in its own epoch order, in slot 2 at step 0.
    order = epoch_orders(5, 1, tasks[0].seed)[0]
    assert plan.rows[0, 2, :5].tolist() == tasks[0].indices[order].tolist()
    assert np.allclose(plan.scale[0, 2, :5].numpy(), 1 / 5)
    # Every real row of every client appears exactly once per epoch.
    for slot, ci in enumerate(plan.order):
        real = plan.rows[:, slot][plan.scale[:, slot] > 0].numpy()
        assert sorted(real.tolist()) == sorted(tasks[ci].indices.tolist())


def test_schedule_epochs_use_each_epochs_permutation() -> None:
    task = tasks_of([20])[0]
    plan = make_schedule([task], batch_size=8, epochs=2)
    assert plan.active == [1] * 6
    orders = epoch_orders(20, 2, task.seed)
    for e in range(2):
        # Three steps per epoch: two full batches of 8, then the last 4 rows and padding.
        epoch = plan.rows[3 * e : 3 * e + 3, 0].reshape(-1)[:20].tolist()
        assert epoch == task.indices[orders[e]].tolist()
        assert plan.scale[3 * e + 2, 0].tolist() == [0.25] * 4 + [0.0] * 4


class Branchy(torch.nn.Module):
    """A forward that branches on tensor values: not stackable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(torch.flatten(x, 1))
        return out if bool(out.sum() > 0) else -out


def test_vectorized_falls_back_for_a_model_it_cannot_stack() -> None:
    lines: list[str] = []
    net = Branchy()
    cfg = TrainConfig(optimizer="sgd", lr=0.01)
    x, y = toy_data(4)
    eng = make_engine("vectorized", net, x, y, cfg, log=lines.append)
    assert isinstance(eng, SequentialEngine)
    assert len(lines) == 1 and "sequential" in lines[0] and "control flow" in lines[0], lines
    ups = eng.train_round(get_weights(net), [ClientTask("a", np.arange(4), 0)], cfg)
    assert ups[0].num_examples == 4


class ConvBN(torch.nn.Module):
    """A small conv net with BatchNorm2d, as a user would write one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(torch.flatten(h, 1))  # type: ignore[no-any-return]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("max_parallel", [None, 1, 2])
def test_vectorized_stacks_conv_nets_and_matches_sequential(opt: str,
                                                            max_parallel: int | None) -> None:
    from fedlearn.sim.functional import FunctionalEngine

    torch.manual_seed(0)
    net = ConvBN()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    cfg = TrainConfig(optimizer=opt, lr=0.05, batch_size=8, momentum=0.9 if opt == "sgd" else 0.0,
                      epochs=2)
    lines: list[str] = []
    eng = make_engine("vectorized", net, x, y, cfg, max_parallel=max_parallel,
                      log=lines.append)
    assert isinstance(eng, FunctionalEngine), lines
    seq = make_engine("sequential", net, x, y, cfg)
    tasks = [ClientTask("a", np.arange(0, 20), 1), ClientTask("b", np.arange(20, 33), 2),
             ClientTask("c", np.arange(33, 50), 3)]
    start = get_weights(net)
    for got, want in zip(eng.train_round(start, tasks, cfg), seq.train_round(start, tasks, cfg),
                         strict=True):
        assert got.client_id == want.client_id
        for k in want.delta:
            np.testing.assert_allclose(got.delta[k], want.delta[k], atol=2e-5, err_msg=k)


def test_mlp_engine_in_chunks_matches_all_at_once() -> None:
    mlp = build_model("mlp", SHAPE, CLASSES)
    x, y = toy_data(60)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, batch_size=4)
    tasks = [ClientTask(f"c{i}", np.arange(i * 10, i * 10 + 5 + i), i) for i in range(5)]
    whole = make_engine("vectorized", mlp, x, y, cfg)
    chunked = make_engine("vectorized", mlp, x, y, cfg, max_parallel=2)
    assert isinstance(chunked, VectorizedEngine)
    start = get_weights(mlp)
    for got, want in zip(chunked.train_round(start, tasks, cfg),
                         whole.train_round(start, tasks, cfg), strict=True):
        assert got.client_id == want.client_id
        for k in want.delta:
            np.testing.assert_allclose(got.delta[k], want.delta[k], atol=1e-6, err_msg=k)


def test_bf16_precision_trains_close_to_fp32() -> None:
    from fedlearn.sim.functional import FunctionalEngine

    torch.manual_seed(0)
    net = ConvBN()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    cfg = TrainConfig(optimizer="sgd", lr=0.05, batch_size=8)
    tasks = [ClientTask("a", np.arange(0, 20), 1), ClientTask("b", np.arange(20, 40), 2)]
    start = get_weights(net)
    fp32 = make_engine("sequential", net, x, y, cfg).train_round(start, tasks, cfg)
    lines: list[str] = []
    for name, model in (("vectorized", net), ("sequential", net), ("vectorized", plain)):
        eng = make_engine(name, model, x, y, cfg, precision="bf16", log=lines.append)
        if model is plain:
            assert isinstance(eng, FunctionalEngine), lines
            start = get_weights(plain)
            fp32 = make_engine("sequential", plain, x, y, cfg).train_round(start, tasks, cfg)
        got = eng.train_round(start, tasks, cfg)
        for u, w in zip(got, fp32, strict=True):
            key = "fc.weight" if model is net else "3.weight"
            d = u.delta[key]
            assert np.isfinite(d).all() and not np.array_equal(d, w.delta[key])
            np.testing.assert_allclose(d, w.delta[key], atol=0.05)
    # BatchNorm's stacked form has no bfloat16 kernel here: one line, then sequential.
    assert "using the sequential engine" in lines[0], lines
    with pytest.raises(ConfigError, match="precision"):
        make_engine("vectorized", net, x, y, cfg, precision="fp8")


def test_vectorized_stacks_any_model_with_batchnorm() -> None:
    from fedlearn.sim.functional import FunctionalEngine

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8),
                              torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = toy_data(40)
    lines: list[str] = []
    cfg = TrainConfig(optimizer="sgd", lr=0.05, batch_size=8)
    eng = make_engine("vectorized", net, x, y, cfg, log=lines.append)
    assert isinstance(eng, FunctionalEngine), lines
    seq = make_engine("sequential", net, x, y, cfg)
    tasks = [ClientTask("a", np.arange(0, 20), 1), ClientTask("b", np.arange(20, 33), 2)]
    start = get_weights(net)
    for got, want in zip(eng.train_round(start, tasks, cfg), seq.train_round(start, tasks, cfg),
                         strict=True):
        for k in want.delta:
            np.testing.assert_allclose(got.delta[k], want.delta[k], atol=1e-5, err_msg=k)


def test_vectorized_takes_the_mlp_with_either_optimizer() -> None:
    mlp = build_model("mlp", SHAPE, CLASSES)
    x, y = toy_data(10)
    for opt in ("sgd", "adam"):
        lines: list[str] = []
        eng = make_engine("vectorized", mlp, x, y, TrainConfig(optimizer=opt), log=lines.append)
        assert isinstance(eng, VectorizedEngine) and lines == []
