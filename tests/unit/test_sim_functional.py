"""The functional (torch.func) engine against the sequential engine, client by client.

Every client must end where the one-by-one loop takes it: same deltas to float
tolerance, integer buffers (BatchNorm's ``num_batches_tracked``) exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedlearn.config import TrainConfig
from fedlearn.models import build_model, get_weights, set_weights
from fedlearn.sim import ClientTask, SequentialEngine
from fedlearn.sim.functional import FunctionalEngine, functional_unsupported_reason
from fedlearn.training import epoch_orders
from fedlearn.types import Weights

# Toy-sized tensors train fastest (and steadiest on a busy machine) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = 3
ROWS = 160
# Uneven clients with short last batches (batch 8), one of a single row.
SIZES = (37, 20, 5, 16, 1)


class BatchNormCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> pool -> Linear, for 1x8x8 inputs.

    The conv has no bias, as usual before BatchNorm: a bias there has a gradient
    of exactly zero, so Adam would scale pure rounding noise up to full steps.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(torch.flatten(x, 1))  # type: ignore[no-any-return]


class Tied(nn.Module):
    """16 -> 16 -> 16 with the second layer sharing the first one's weight, then a frozen head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.head = nn.Linear(16, CLASSES)
        self.head.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.a(torch.flatten(x, 1)))
        return self.head(torch.tanh(self.b(x)))  # type: ignore[no-any-return]


class Branchy(nn.Module):
    """A forward that branches on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x)  # type: ignore[no-any-return]


def make_model(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    """A seeded model and its input shape."""
    if name.startswith("bn-cnn"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = BatchNormCNN()
        if name == "bn-cnn-no-stats":
            model.bn = nn.BatchNorm2d(4, track_running_stats=False)
        return model, (1, 8, 8)
    if name == "tied-frozen":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return Tied(), (1, 4, 4)
    shape = (1, 28, 28) if name == "cnn" else (1, 4, 4)
    return build_model(name, shape, CLASSES, seed=1), shape


def toy_data(shape: tuple[int, ...], n: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Three noisy, learnable classes."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    x = rng.normal(0, 1.0, (n, *shape)).astype(np.float32)
    x[:, 0, 0, :] += y[:, None].astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def tasks_of(sizes: tuple[int, ...]) -> list[ClientTask]:
    """Disjoint clients with scattered rows and their own seeds."""
    rows = np.random.default_rng(7).permutation(ROWS)
    out, start = [], 0
    for i, n in enumerate(sizes):
        out.append(ClientTask(f"client-{i}", rows[start : start + n].astype(np.int64), 100 + i))
        start += n
    return out


CONFIGS = {
    "sgd": TrainConfig(optimizer="sgd", lr=0.1, batch_size=8, epochs=2),
    "sgd-momentum-wd": TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3,
                                   batch_size=8, epochs=2),
    # Adam at its usual rate: it divides by the gradient's size, so a larger rate
    # also scales up the rounding of gradients that are nearly zero.
    "adam": TrainConfig(optimizer="adam", lr=1e-3, batch_size=8, epochs=2),
}


def assert_same(got: Weights, want: Weights, atol: float = 1e-5) -> None:
    """Same keys, shapes and dtypes; floats within ``atol``, integers exactly."""
    assert set(got) == set(want)
    for k, v in want.items():
        assert isinstance(got[k], np.ndarray), k
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
        if np.issubdtype(v.dtype, np.integer):
            np.testing.assert_array_equal(got[k], v, err_msg=k)
        else:
            np.testing.assert_allclose(got[k], v, rtol=0, atol=atol, err_msg=k)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", ["mlp", "cnn", "bn-cnn", "bn-cnn-no-stats"])
def test_matches_sequential_engine(name: str, config: str) -> None:
    model, shape = make_model(name)
    x, y = toy_data(shape)
    cfg = CONFIGS[config]
    weights = get_weights(model)
    tasks = tasks_of(SIZES)
    got = FunctionalEngine(model, x, y, log=lambda _: None).train_round(weights, tasks, cfg)
    want = SequentialEngine(model, x, y).train_round(weights, tasks, cfg)
    assert [u.client_id for u in got] == [t.client_id for t in tasks]
    for g, w in zip(got, want, strict=True):
        assert g.num_examples == w.num_examples
        assert_same(g.delta, w.delta)
        assert max(float(np.abs(v).max()) for v in g.delta.values()) > 1e-3
    if name == "bn-cnn":
        # Two epochs of ceil(n / 8) steps each, counted per client.
        counts = [int(u.delta["bn.num_batches_tracked"]) for u in got]
        assert counts == [2 * -(-n // 8) for n in SIZES]
        assert got[0].delta["bn.num_batches_tracked"].shape == ()


def prox_reference(model: nn.Module, weights: Weights, x: torch.Tensor, y: torch.Tensor,
                   task: ClientTask, cfg: TrainConfig, mu: float) -> Weights:
    """FedProx by hand: SGD on mean cross-entropy + mu/2 ||w - w_start||^2."""
    model = copy.deepcopy(model)
    set_weights(model, weights)
    model.train()
    anchor = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    rows = torch.from_numpy(task.indices)
    for order in epoch_orders(len(rows), cfg.epochs, task.seed):
        shuffled = rows[torch.from_numpy(order)]
        for start in range(0, len(rows), cfg.batch_size):
            idx = shuffled[start : start + cfg.batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            prox = sum(torch.sum(torch.square(p - a))
                       for p, a in zip(model.parameters(), anchor, strict=True))
            (loss + mu / 2 * prox).backward()
            opt.step()
    after = get_weights(model)
    return {k: after[k] - weights[k] for k in weights}


def test_tied_and_frozen_parameters() -> None:
    model, shape = make_model("tied-frozen")
    x, y = toy_data(shape)
    cfg = CONFIGS["sgd-momentum-wd"]
    weights = get_weights(model)
    assert "b.weight" in weights
    tasks = tasks_of(SIZES)
    got = FunctionalEngine(model, x, y, log=lambda _: None).train_round(weights, tasks, cfg)
    want = SequentialEngine(model, x, y).train_round(weights, tasks, cfg)
    for g, w in zip(got, want, strict=True):
        assert_same(g.delta, w.delta)
        np.testing.assert_array_equal(g.delta["a.weight"], g.delta["b.weight"])
        assert not g.delta["head.weight"].any() and g.delta["head.bias"].any()


def test_prox_term_matches_a_plain_loop() -> None:
    model, shape = make_model("bn-cnn")
    x, y = toy_data(shape)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=8, epochs=2,
                      extra={"prox_mu": 0.5})
    weights = get_weights(model)
    tasks = tasks_of(SIZES[:3])
    got = FunctionalEngine(model, x, y, log=lambda _: None).train_round(weights, tasks, cfg)
    plain = FunctionalEngine(model, x, y, log=lambda _: None).train_round(
        weights, tasks, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, batch_size=8,
                                    epochs=2))
    for g, p, task in zip(got, plain, tasks, strict=True):
        assert_same(g.delta, prox_reference(model, weights, x, y, task, cfg, 0.5))
        # The term pulls toward the start: the prox run moved less.
        assert np.abs(g.delta["fc.weight"]).sum() < np.abs(p.delta["fc.weight"]).sum()


@pytest.mark.parametrize("name", ["mlp", "bn-cnn"])
def test_max_parallel_gives_the_same_result(name: str) -> None:
    model, shape = make_model(name)
    x, y = toy_data(shape)
    cfg = CONFIGS["sgd-momentum-wd"]
    weights = get_weights(model)
    tasks = tasks_of(SIZES)
    said: list[str] = []
    whole = FunctionalEngine(model, x, y, log=said.append)
    got = whole.train_round(weights, tasks, cfg)
    whole.train_round(weights, tasks, cfg)
    assert len(said) == 1 and "clients at once" in said[0]
    pairs = FunctionalEngine(model, x, y, max_parallel=2, log=said.append).train_round(
        weights, tasks, cfg)
    assert len(said) == 1
    for g, p in zip(got, pairs, strict=True):
        assert g.client_id == p.client_id
        assert_same(g.delta, p.delta, atol=1e-6)


def test_grouped_steps_match_too() -> None:
    """A model without batch statistics is padded; the grouped steps BatchNorm needs also fit it."""
    model, shape = make_model("mlp")
    x, y = toy_data(shape)
    cfg = CONFIGS["adam"]
    weights = get_weights(model)
    tasks = tasks_of((*SIZES, 0))
    engine = FunctionalEngine(model, x, y, log=lambda _: None)
    assert engine.pad
    engine.pad = False
    got = engine.train_round(weights, tasks, cfg)
    want = SequentialEngine(model, x, y).train_round(weights, tasks, cfg)
    for g, w in zip(got, want, strict=True):
        assert g.num_examples == w.num_examples
        assert_same(g.delta, w.delta)
    assert all(not v.any() for v in got[-1].delta.values())


def test_only_row_independent_models_are_padded() -> None:
    x, y = toy_data((1, 8, 8), n=16)
    assert FunctionalEngine(make_model("cnn")[0], *toy_data((1, 28, 28), 8)).pad
    mean_loss = FunctionalEngine(make_model("mlp")[0], *toy_data((1, 4, 4), 8),
                                 loss=nn.functional.cross_entropy)
    assert not mean_loss.pad
    assert not FunctionalEngine(make_model("bn-cnn")[0], x, y).pad
    assert not FunctionalEngine(make_model("bn-cnn-no-stats")[0], x, y).pad


def test_unsupported_reasons() -> None:
    cfg = CONFIGS["sgd"]
    x, y = toy_data((1, 4, 4), n=8)
    why = functional_unsupported_reason(Branchy(), cfg, x=x, y=y)
    assert why is not None and "data-dependent control flow" in why
    dropout = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, CLASSES))
    why = functional_unsupported_reason(dropout, cfg, x=x, y=y)
    assert why is not None and "random" in why
    half = nn.Linear(16, CLASSES)
    half.weight = nn.Parameter(torch.zeros(CLASSES, 16, dtype=torch.int32), requires_grad=False)
    assert "not a float" in str(functional_unsupported_reason(half, cfg))
    assert functional_unsupported_reason(make_model("mlp")[0], cfg, x=x, y=y) is None
    x8, y8 = toy_data((1, 8, 8), n=8)
    assert functional_unsupported_reason(make_model("bn-cnn")[0], cfg, x=x8, y=y8) is None


def test_does_not_change_its_inputs() -> None:
    model, shape = make_model("bn-cnn")
    x, y = toy_data(shape)
    x0, before = x.clone(), get_weights(model)
    weights = get_weights(model)
    for v in weights.values():
        v.setflags(write=False)
    FunctionalEngine(model, x, y, log=lambda _: None).train_round(
        weights, tasks_of((20, 9)), CONFIGS["adam"])
    assert torch.equal(x, x0)
    assert all(np.array_equal(before[k], weights[k]) for k in weights)
    assert all(np.array_equal(before[k], v) for k, v in get_weights(model).items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_trains_on_the_device_of_x() -> None:
    model, shape = make_model("bn-cnn")
    x, y = toy_data(shape)
    weights = get_weights(model)
    tasks = tasks_of(SIZES)
    cfg = CONFIGS["sgd-momentum-wd"]
    cpu = FunctionalEngine(model, x, y, log=lambda _: None).train_round(weights, tasks, cfg)
    gpu = FunctionalEngine(model, x.to("cuda"), y.to("cuda"), log=lambda _: None).train_round(
        weights, tasks, cfg)
    for c, g in zip(cpu, gpu, strict=True):
        assert_same(g.delta, c.delta, atol=1e-4)


@pytest.mark.parametrize("config", ["adam", "sgd-momentum-wd"])
@pytest.mark.parametrize("name", ["cnn", "bn-cnn"])
def test_conv_nets_match_the_sequential_engine_in_float64(name: str, config: str) -> None:
    # In float32 the stacked convolutions add in another order than one client's, and
    # Adam and BatchNorm magnify that rounding (up to 1e-5 here). In float64 the worst
    # element measured 2e-9: the difference shrinks with the rounding, so it is rounding.
    model, shape = make_model(name)
    model = model.double()
    x, y = toy_data(shape)
    x = x.double()
    weights = get_weights(model)
    tasks = tasks_of(SIZES)
    got = FunctionalEngine(model, x, y, log=lambda _: None).train_round(weights, tasks,
                                                                          CONFIGS[config])
    want = SequentialEngine(model, x, y).train_round(weights, tasks, CONFIGS[config])
    for g, w in zip(got, want, strict=True):
        assert g.delta["fc.weight" if name == "bn-cnn" else "fc2.weight"].dtype == np.float64
        assert_same(g.delta, w.delta, atol=1e-7)
