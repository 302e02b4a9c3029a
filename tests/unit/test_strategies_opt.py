"""Server optimizers and SCAFFOLD, one or two steps worked out by hand."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from fedlearn.strategies import Update, parse_strategy
from fedlearn.strategies.scaffold import (
    control_update,
    corrected_gradient,
    init_control,
    server_control_update,
)
from fedlearn.strategies.server_opt import (
    OptState,
    ServerOptimizer,
    adagrad,
    adam,
    avgm,
    sgd,
    yogi,
)
from fedlearn.types import Weights


def one(x: float) -> Weights:
    return {"w": np.array([x], np.float64)}


def run(opt: ServerOptimizer, x: float, deltas: list[float]) -> tuple[float, OptState]:
    weights, state = one(x), opt.init(one(x))
    for d in deltas:
        weights, state = opt.step(weights, one(d), state)
    return float(weights["w"][0]), state


def test_sgd() -> None:
    assert run(sgd(0.5), 1.0, [0.4])[0] == pytest.approx(1.2)


def test_fedavgm_two_steps() -> None:
    # m1 = 0.5, x1 = 1 + 0.5 = 1.5; m2 = 0.9*0.5 - 0.2 = 0.25, x2 = 1.5 + 0.25 = 1.75
    x, state = run(avgm(lr=1.0, momentum=0.9), 1.0, [0.5, -0.2])
    assert x == pytest.approx(1.75)
    assert state.moments["m"]["w"][0] == pytest.approx(0.25)
    assert state.step == 2
    # with lr 0.5: x1 = 1.25, x2 = 1.25 + 0.125
    assert run(avgm(lr=0.5, momentum=0.9), 1.0, [0.5, -0.2])[0] == pytest.approx(1.375)


def test_fedadam_one_step() -> None:
    # m = 0.1*0.2 = 0.02; v = 0.99*tau^2 + 0.01*0.04 = 0.00040099
    x, state = run(adam(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3), 1.0, [0.2])
    assert state.moments["v"]["w"][0] == pytest.approx(0.00040099)
    assert x == pytest.approx(1.0 + 0.01 * 0.02 / (math.sqrt(0.00040099) + 1e-3))


def test_fedyogi_two_steps() -> None:
    # step 1: v0 = 1e-6 < 0.04, sign -1: v1 = 1e-6 + 0.01*0.04 = 0.000401, m1 = 0.02
    # step 2: d = 0.01, v1 > 1e-4, sign +1: v2 = 0.000401 - 0.01*1e-4 = 0.0004,
    #         m2 = 0.9*0.02 + 0.1*0.01 = 0.019
    opt = yogi(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    x1, s1 = run(opt, 1.0, [0.2])
    assert s1.moments["v"]["w"][0] == pytest.approx(0.000401)
    assert x1 == pytest.approx(1.0 + 0.01 * 0.02 / (math.sqrt(0.000401) + 1e-3))
    x2, s2 = run(opt, 1.0, [0.2, 0.01])
    assert s2.moments["v"]["w"][0] == pytest.approx(0.0004)
    assert s2.moments["m"]["w"][0] == pytest.approx(0.019)
    assert x2 == pytest.approx(x1 + 0.01 * 0.019 / (0.02 + 1e-3))


def test_fedadagrad_two_steps() -> None:
    # v1 = 1e-6 + 0.04; v2 = v1 + 0.01; m1 = 0.02, m2 = 0.9*0.02 - 0.1*0.1 = 0.008
    opt = adagrad(lr=0.1, beta1=0.9, tau=1e-3)
    x, state = run(opt, 1.0, [0.2, -0.1])
    x1 = 1.0 + 0.1 * 0.02 / (math.sqrt(0.040001) + 1e-3)
    assert x == pytest.approx(x1 + 0.1 * 0.008 / (math.sqrt(0.050001) + 1e-3))
    assert state.moments["v"]["w"][0] == pytest.approx(0.050001)


def test_defaults() -> None:
    assert (sgd().lr, avgm().lr, avgm().momentum) == (1.0, 1.0, 0.9)
    for opt in (adam(), yogi(), adagrad()):
        assert (opt.lr, opt.beta1, opt.tau) == (0.01, 0.9, 1e-3)
    assert adam().beta2 == yogi().beta2 == 0.99


@pytest.mark.parametrize("opt", [sgd(), avgm(), adam(), yogi(), adagrad()], ids=lambda o: o.kind)
def test_dtypes_kept_moments_float64_integers_untouched(opt: ServerOptimizer) -> None:
    weights: Weights = {"w": np.array([1.0, 2.0], np.float32), "s": np.array(0.5, np.float32),
                        "n": np.array(3, np.int64)}
    delta: Weights = {"w": np.array([0.1, -0.1], np.float32), "s": np.array(0.2, np.float32),
                      "n": np.array(5, np.int64)}
    state = opt.init(weights)
    before = copy.deepcopy((weights, delta, state))
    new, after = opt.step(weights, delta, state)
    assert new["w"].dtype == np.float32 and new["s"].dtype == np.float32
    assert isinstance(new["s"], np.ndarray) and new["s"].shape == ()
    assert int(new["n"]) == 3  # the optimizer leaves integer arrays to the strategy
    assert all(m.dtype == np.float64 for ms in after.moments.values() for m in ms.values())
    assert all("n" not in ms for ms in after.moments.values())
    assert after.step == 1
    # nothing given was changed
    for got, want in zip((weights, delta), before[:2], strict=True):
        assert all(np.array_equal(got[k], want[k]) for k in want)
    for name, ms in before[2].moments.items():
        assert all(np.array_equal(state.moments[name][k], ms[k]) for k in ms)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "lamb"}, "unknown optimizer"),
    ({"lr": 0.0}, "learning rate must be positive"),
    ({"kind": "avgm", "momentum": 1.0}, "momentum must be in [0, 1)"),
    ({"beta2": -0.1}, "beta2 must be in [0, 1)"),
    ({"tau": 0.0}, "tau must be positive"),
])
def test_optimizer_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        ServerOptimizer(**kwargs)  # type: ignore[arg-type]


# -- SCAFFOLD ---------------------------------------------------------------------------


def test_scaffold_client_helpers() -> None:
    g = {"w": np.array([1.0, 2.0], np.float32)}
    c_i = {"w": np.array([0.5, 0.5], np.float32)}
    c = {"w": np.array([0.1, -0.1], np.float32)}
    assert corrected_gradient(g, c_i, c)["w"].tolist() == pytest.approx([0.6, 1.4])
    assert corrected_gradient(g, c_i, c)["w"].dtype == np.float32
    # c_i+ = c_i - c + (x - y)/(K lr) = 0.5 - 0.1 + 0.2/(4*0.1) = 0.9; dc = 0.4
    new, dc = control_update({"w": np.array([0.5])}, {"w": np.array([0.1])},
                             {"w": np.array([1.0])}, {"w": np.array([0.8])}, steps=4, lr=0.1)
    assert new["w"][0] == pytest.approx(0.9)
    assert dc["w"][0] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="at least 1 local step"):
        control_update(c_i, c, g, g, steps=0, lr=0.1)
    # With SGD momentum beta and last buffer m_K: ((1 - beta)(x - y)/lr + beta m_K)/K
    # = (0.5 * 0.2 / 0.1 + 0.5 * 0.3) / 4 = 0.2875, so c_i+ = 0.5 - 0.1 + 0.2875.
    new, dc = control_update({"w": np.array([0.5])}, {"w": np.array([0.1])},
                             {"w": np.array([1.0])}, {"w": np.array([0.8])}, steps=4, lr=0.1,
                             momentum=0.5, last_momentum={"w": np.array([0.3])})
    assert new["w"][0] == pytest.approx(0.6875)
    assert dc["w"][0] == pytest.approx(0.1875)
    with pytest.raises(ValueError, match="momentum in"):
        control_update(c_i, c, g, g, steps=1, lr=0.1, momentum=1.0)


def test_scaffold_server_control_update() -> None:
    c = {"w": np.zeros(2, np.float32)}
    dcs = [{"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([3.0, 2.0], np.float32)}]
    # c + |S|/N * mean = 0 + 2/4 * [2, 1]
    assert server_control_update(c, dcs, num_clients=4)["w"].tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="num_clients"):
        server_control_update(c, dcs, num_clients=1)


def test_one_scaffold_round_by_hand() -> None:
    strategy = parse_strategy("scaffold")
    weights: Weights = {"w": np.array([1.0, 1.0], np.float32), "n": np.array(2, np.int64)}
    state = strategy.init(weights)
    assert strategy.client_config(state, 1) == {"scaffold": 1}
    assert strategy.client_arrays(state)["c"]["w"].tolist() == [0.0, 0.0]
    assert "n" not in init_control(weights)

    def u(dy: list[float], dc: list[float], n: int, dn: int) -> Update:
        return Update({"w": np.array(dy, np.float32), "n": np.array(dn, np.int64)}, n,
                      extra={"delta_c": {"w": np.array(dc, np.float32)}})

    updates = [u([0.2, 0.0], [1.0, 0.0], 1, 1), u([0.4, -0.2], [3.0, 2.0], 3, 5)]
    after = strategy.aggregate(state, updates, num_clients=4)
    # x + mean(dy) with a plain mean: [1.3, 0.9]; c = 2/4 * mean(dc) = [1.0, 0.5]
    assert after.weights["w"].tolist() == pytest.approx([1.3, 0.9])
    assert strategy.client_arrays(after)["c"]["w"].tolist() == [1.0, 0.5]
    # integer arrays still take the example-weighted rounded mean: (1*1 + 3*5)/4 = 4
    assert int(after.weights["n"]) == 6
    assert after.version == 1
    # a second round moves c by |S|/N * mean(dc) again
    again = strategy.aggregate(after, updates[:1], num_clients=4)
    assert strategy.client_arrays(again)["c"]["w"].tolist() == [1.25, 0.5]


def test_scaffold_server_lr_scales_the_model_step_only() -> None:
    strategy = parse_strategy("scaffold", server_lr=0.5)
    state = strategy.init({"w": np.array([1.0], np.float64)})
    update = Update({"w": np.array([0.4])}, 1, extra={"delta_c": {"w": np.array([2.0])}})
    after = strategy.aggregate(state, [update], num_clients=2)
    assert after.weights["w"].tolist() == pytest.approx([1.2])
    assert after.arrays["scaffold/c"]["w"].tolist() == [1.0]


def test_scaffold_update_without_delta_c_is_refused() -> None:
    strategy = parse_strategy("scaffold")
    state = strategy.init({"w": np.array([1.0])})
    with pytest.raises(ValueError, match="extra\\['delta_c'\\]"):
        strategy.aggregate(state, [Update({"w": np.array([0.1])}, 1, client_id="c1")],
                           num_clients=2)
