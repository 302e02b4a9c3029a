"""The composable Strategy: specs, rounds, streaming, resume and every ConfigError."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import fedlearn.strategies as strategies_pkg
from fedlearn.errors import ConfigError
from fedlearn.strategies import (
    STRATEGIES,
    STRATEGY_TABLE,
    NotEnoughUpdatesError,
    ServerState,
    Strategy,
    Update,
    parse_strategy,
    state_from_arrays,
    state_to_arrays,
)
from fedlearn.types import Weights
from fedlearn.weights import RunningSum

SPECS = ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold",
         "median", "trimmed-mean:0.2", "krum:1", "multi-krum:1:3", "bulyan:1",
         "median+fedavgm", "trimmed-mean:0.2+fedadam", "krum:1+fedyogi", "bulyan:1+fedadagrad"]


def model() -> Weights:
    return {"fc1.weight": np.array([[1.0, -1.0], [0.5, 2.0]], np.float32),
            "fc1.bias": np.array([0.1, -0.2], np.float32),
            "bn.scale": np.array(1.5, np.float32),
            "bn.num_batches_tracked": np.array(10, np.int64)}


def updates(round_number: int, n: int = 7) -> list[Update]:
    """Seven deterministic client updates for a round; the last is an outlier."""
    rng = np.random.default_rng(round_number)
    out = []
    for i in range(n):
        scale = 50.0 if i == n - 1 else 0.1
        delta: Weights = {k: (rng.normal(size=v.shape) * scale).astype(v.dtype)
                          for k, v in model().items() if v.dtype.kind == "f"}
        delta["bn.num_batches_tracked"] = np.array(i + 1, np.int64)
        dc = {k: (rng.normal(size=v.shape)).astype(v.dtype) for k, v in delta.items()
              if v.dtype.kind == "f"}
        out.append(Update(delta, 10 * (i + 1), extra={"delta_c": dc}, client_id=f"c{i}"))
    return out


def same(a: ServerState, b: ServerState) -> bool:
    def eq(x: Weights, y: Weights) -> bool:
        return x.keys() == y.keys() and all(
            np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype
            and np.shape(x[k]) == np.shape(y[k]) for k in x)
    return (eq(a.weights, b.weights) and a.version == b.version
            and a.arrays.keys() == b.arrays.keys()
            and all(eq(a.arrays[g], b.arrays[g]) for g in a.arrays)
            and dict(a.scalars) == dict(b.scalars))


# -- presets and composition ------------------------------------------------------------


@pytest.mark.parametrize(("spec", "needs_all", "rule", "opt"), [
    ("fedavg", False, "mean", "sgd"), ("fedavgm", False, "mean", "avgm"),
    ("fedadam", False, "mean", "adam"), ("fedyogi", False, "mean", "yogi"),
    ("fedadagrad", False, "mean", "adagrad"), ("fedprox", False, "mean", "sgd"),
    ("scaffold", True, "mean", "sgd"), ("median", True, "median", "sgd"),
    ("trimmed-mean:0.2", True, "trimmed-mean", "sgd"), ("krum:1", True, "krum", "sgd"),
    ("multi-krum:1:3", True, "multi-krum", "sgd"), ("bulyan:1", True, "bulyan", "sgd"),
    (" Median+FedAvgM ", True, "median", "avgm"),
    ("trimmed-mean:0.2+fedadam", True, "trimmed-mean", "adam"),
])
def test_presets(spec: str, needs_all: bool, rule: str, opt: str) -> None:
    s = parse_strategy(spec)
    assert (s.needs_all, s.rule.kind, s.optimizer.kind) == (needs_all, rule, opt)
    assert s.name == spec.strip().lower()


def test_defaults_and_options() -> None:
    assert parse_strategy("fedavg").optimizer.lr == 1.0
    assert parse_strategy("fedavgm").optimizer.momentum == 0.9
    adam = parse_strategy("fedadam", server_lr=0.1, beta1=0.8, beta2=0.9, tau=1e-4).optimizer
    assert (adam.lr, adam.beta1, adam.beta2, adam.tau) == (0.1, 0.8, 0.9, 1e-4)
    assert parse_strategy("median+fedavgm", server_momentum=0.5).optimizer.momentum == 0.5
    assert parse_strategy("fedadagrad").optimizer.lr == 0.01
    assert parse_strategy("krum:2").rule.f == 2
    assert parse_strategy("multi-krum:1:4").rule.m == 4


def test_client_config() -> None:
    state = parse_strategy("fedavg").init(model())
    assert parse_strategy("fedavg").client_config(state, 1) == {}
    assert parse_strategy("fedprox").client_config(state, 1) == {"prox_mu": 0.01}
    assert parse_strategy("fedprox", prox_mu=0.1).client_config(state, 3) == {"prox_mu": 0.1}
    assert parse_strategy("fedadam", prox_mu=0.5).client_config(state, 1) == {"prox_mu": 0.5}
    assert parse_strategy("median+fedprox").client_config(state, 1) == {"prox_mu": 0.01}
    assert parse_strategy("fedavg").client_arrays(state) == {}


def test_clipping_turns_off_streaming() -> None:
    assert parse_strategy("fedavg", clip_norm=1.0).needs_all
    assert parse_strategy("norm-bounding", clip_norm=1.0).needs_all
    assert parse_strategy("norm-bounding", clip_norm=1.0).clip == 1.0


def test_norm_bounding_clips_every_delta_before_the_mean() -> None:
    s = parse_strategy("norm-bounding", clip_norm=1.0)
    state = s.init({"w": np.zeros(2, np.float64)})
    ups = [Update({"w": np.array([3.0, 4.0])}, 1), Update({"w": np.array([0.3, 0.0])}, 1)]
    # [3,4] -> [0.6, 0.8]; [0.3, 0] is inside the bound; mean = [0.45, 0.4]
    assert s.aggregate(state, ups, num_clients=2).weights["w"].tolist() == pytest.approx(
        [0.45, 0.4])


def test_table_matches_the_parser_and_the_docstring() -> None:
    examples = {"trimmed-mean:BETA": "trimmed-mean:0.1", "krum:F": "krum:1",
                "multi-krum:F:M": "multi-krum:1:2", "bulyan:F": "bulyan:1",
                "RULE+OPT": "median+fedadam"}
    assert [row.name for row in STRATEGY_TABLE] == list(STRATEGIES)
    doc = strategies_pkg.__doc__ or ""
    for row in STRATEGY_TABLE:
        line = next(line for line in doc.splitlines() if line.startswith(row.name + " "))
        assert row.paper in line and line.rstrip().endswith(row.needs_all)
        s = parse_strategy(examples.get(row.name, row.name), clip_norm=(
            1.0 if row.name == "norm-bounding" else None))
        assert s.needs_all == (row.needs_all == "yes"), row.name


# -- rounds -----------------------------------------------------------------------------


def test_fedavg_is_the_weighted_mean_step_bit_for_bit() -> None:
    """FedAvg as the round engine always did it: ``w + lr * mean`` in float64, cast back."""
    for lr in (1.0, 0.7):
        new = parse_strategy("fedavg", server_lr=lr)
        total = RunningSum()
        for u in updates(1):
            total.add(u.delta, u.num_examples)
        mean = total.mean()
        got = new.aggregate(new.init(model()), updates(1), num_clients=7)
        for k, v in model().items():
            if v.dtype.kind == "f":
                want = (v + lr * mean[k].astype(np.float64)).astype(v.dtype)
                assert np.array_equal(got.weights[k], want) and got.weights[k].dtype == v.dtype
        # Integer counters move by the rounded mean delta, never scaled by the server lr.
        assert int(got.weights["bn.num_batches_tracked"]) == 10 + int(
            mean["bn.num_batches_tracked"])


@pytest.mark.parametrize("spec", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                                  "fedprox"])
def test_aggregate_sum_equals_aggregate(spec: str) -> None:
    s = parse_strategy(spec)
    state = s.init(model())
    a = b = state
    for r in range(1, 4):
        total = RunningSum()
        for u in updates(r):
            total.add(u.delta, u.num_examples)
        a = s.aggregate(a, updates(r), num_clients=10)
        b = s.aggregate_sum(b, total, num_clients=10, count=7)
    assert same(a, b)


def test_aggregate_sum_is_refused_when_all_updates_are_needed() -> None:
    s = parse_strategy("median")
    total = RunningSum()
    total.add(updates(1)[0].delta, 1)
    with pytest.raises(ValueError, match="needs every update"):
        s.aggregate_sum(s.init(model()), total, num_clients=1, count=1)
    f = parse_strategy("fedavg")
    with pytest.raises(ValueError, match="holds 1 updates but count is 2"):
        f.aggregate_sum(f.init(model()), total, num_clients=2, count=2)


@pytest.mark.parametrize("spec", SPECS)
def test_integer_arrays_take_the_rounded_weighted_mean(spec: str) -> None:
    s = parse_strategy(spec)
    after = s.aggregate(s.init(model()), updates(1), num_clients=7)
    # 10 + the deltas 1..7 weighted by examples 10..70: sum(i*10i)/sum(10i) = 140/28 = 5
    n = after.weights["bn.num_batches_tracked"]
    assert isinstance(n, np.ndarray) and n.shape == () and n.dtype == np.int64
    assert int(n) == 15
    assert after.weights["bn.scale"].shape == () and after.weights["bn.scale"].dtype == np.float32


@pytest.mark.parametrize("spec", SPECS)
def test_a_round_changes_nothing_it_is_given(spec: str) -> None:
    s = parse_strategy(spec)
    state = s.aggregate(s.init(model()), updates(1), num_clients=7)
    ups = updates(2)
    before_state, before_updates = copy.deepcopy(state), copy.deepcopy(ups)
    after = s.aggregate(state, ups, num_clients=7)
    assert same(state, before_state)
    for u, b in zip(ups, before_updates, strict=True):
        assert all(np.array_equal(u.delta[k], b.delta[k]) for k in b.delta)
        assert all(np.array_equal(u.extra["delta_c"][k], b.extra["delta_c"][k])
                   for k in b.extra["delta_c"])
    assert after.version == state.version + 1
    for k, v in after.weights.items():
        assert not np.shares_memory(v, state.weights[k])


def test_init_copies_the_weights() -> None:
    w = model()
    state = parse_strategy("fedadam").init(w)
    w["fc1.bias"][0] = 99.0
    assert state.weights["fc1.bias"][0] == np.float32(0.1)
    assert set(state.arrays) == {"opt/m", "opt/v"} and state.scalars == {"opt/step": 0}


@pytest.mark.parametrize("spec", ["krum:1", "bulyan:1", "median+fedadam"])
def test_robust_rules_keep_the_outlier_out(spec: str) -> None:
    s = parse_strategy(spec)
    after = s.aggregate(s.init(model()), updates(1), num_clients=7)
    assert np.abs(after.weights["fc1.weight"] - model()["fc1.weight"]).max() < 1.0


def test_too_few_updates_for_the_rule() -> None:
    s = parse_strategy("krum:1")
    with pytest.raises(NotEnoughUpdatesError, match="needs at least 5 updates"):
        s.aggregate(s.init(model()), updates(1, n=4), num_clients=10)


@pytest.mark.parametrize(("bad", "message"), [
    ([], "at least 1 update"),
    ([Update({"fc1.bias": np.zeros(2, np.float32)}, 1)], "does not match the model"),
    ([Update({**model(), "fc1.bias": np.zeros(3, np.float32)}, 1)], "has shape"),
    ([Update(model(), 0, client_id="c9")], "update from 'c9' has num_examples 0"),
])
def test_malformed_rounds_are_value_errors(bad: list[Update], message: str) -> None:
    s = parse_strategy("fedavg")
    with pytest.raises(ValueError, match=message):
        s.aggregate(s.init(model()), bad, num_clients=10)


def test_num_clients_below_the_updates_is_refused() -> None:
    s = parse_strategy("fedavg")
    with pytest.raises(ValueError, match="num_clients"):
        s.aggregate(s.init(model()), updates(1), num_clients=3)


# -- checkpoint and resume --------------------------------------------------------------


def test_state_to_arrays_names_and_meta_are_flat_and_json() -> None:
    s = parse_strategy("fedadam")
    state = s.aggregate(s.init(model()), updates(1), num_clients=7)
    arrays, meta = state_to_arrays(state)
    assert "model/fc1.weight" in arrays and "opt/m/fc1.weight" in arrays
    assert "opt/v/bn.scale" in arrays and "opt/m/bn.num_batches_tracked" not in arrays
    assert arrays["model/bn.num_batches_tracked"].shape == ()
    assert json.loads(json.dumps(meta)) == meta
    assert same(state_from_arrays(arrays, meta), state)


@pytest.mark.parametrize("spec", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                                  "scaffold", "median+fedadagrad", "bulyan:1+fedavgm"])
def test_resume_is_bit_identical(spec: str) -> None:
    s = parse_strategy(spec)
    straight = s.init(model())
    for r in range(1, 5):
        straight = s.aggregate(straight, updates(r), num_clients=9)
    resumed = s.init(model())
    for r in range(1, 3):
        resumed = s.aggregate(resumed, updates(r), num_clients=9)
    arrays, meta = state_to_arrays(resumed)
    arrays = {k: np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape) for k, v in arrays.items()}
    resumed = state_from_arrays(arrays, json.loads(json.dumps(meta)))
    for r in range(3, 5):
        resumed = s.aggregate(resumed, updates(r), num_clients=9)
    assert same(straight, resumed)


@pytest.mark.parametrize(("change", "message"), [
    (lambda a, m: m.update(format=9), "format 9"),
    (lambda a, m: a.pop("model/fc1.bias"), "missing"),
    (lambda a, m: m.pop("scalars"), "malformed"),
    (lambda a, m: m["names"].update({"model/fc1.bias": ["opt/x", "fc1.bias"]}), "malformed"),
])
def test_state_from_arrays_refuses_inconsistent_input(change: object, message: str) -> None:
    s = parse_strategy("fedadam")
    arrays, meta = state_to_arrays(s.init(model()))
    change(arrays, meta)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        state_from_arrays(arrays, meta)


def test_a_state_without_the_strategys_arrays_is_refused() -> None:
    state = parse_strategy("fedavg").init(model())
    s = parse_strategy("fedadam")
    with pytest.raises(ValueError, match="no 'opt/m' arrays"):
        s.aggregate(state, updates(1), num_clients=7)


# -- ConfigError ------------------------------------------------------------------------


def one_sentence(message: str) -> bool:
    body = message.replace("e.g. ", "e.g.~")
    return message.endswith(".") and "\n" not in message and ". " not in body


@pytest.mark.parametrize(("spec", "kwargs", "expected"), [
    ("fedsgd", {}, "unknown strategy 'fedsgd'; choose one of fedavg, fedavgm"),
    ("", {}, "unknown strategy ''; choose one of"),
    ("median:3", {}, "median takes no parameter in 'median:3'; write median."),
    ("trimmed-mean", {}, "needs the fraction BETA in [0, 0.5)"),
    ("trimmed-mean:0.5", {}, "e.g. trimmed-mean:0.1."),
    ("trimmed-mean:x", {}, "needs the fraction BETA"),
    ("trimmed-mean:nan", {}, "needs the fraction BETA"),
    ("krum", {}, "krum in 'krum' needs F, the whole number of Byzantine clients"),
    ("krum:-1", {}, "e.g. krum:1."),
    ("bulyan:1.5", {}, "e.g. bulyan:1."),
    ("multi-krum:1", {}, "needs F (Byzantine clients, 0 or more) and M"),
    ("multi-krum:1:0", {}, "e.g. multi-krum:1:3."),
    ("mean+fedadam", {}, "unknown robust rule 'mean' in 'mean+fedadam'; choose one of median, "
                         "trimmed-mean:BETA, krum:F, multi-krum:F:M, bulyan:F."),
    ("median+sgd", {}, "unknown server optimizer 'sgd' after '+' in 'median+sgd'; choose one "
                       "of fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad."),
    ("median+scaffold", {}, "unknown server optimizer 'scaffold'"),
    ("median+fedavg+fedadam", {}, "more than one '+'"),
    ("norm-bounding", {}, "norm-bounding needs --clip-norm C"),
    ("fedavg", {"clip_norm": 0.0}, "--clip-norm must be a positive number, got 0.0."),
    ("fedavg", {"clip_norm": float("inf")}, "--clip-norm must be a positive number"),
    ("fedprox", {"prox_mu": -0.1}, "--prox-mu must be a number 0 or more, got -0.1."),
    ("fedavg", {"server_lr": 0.0}, "--server-lr must be a positive number, got 0.0."),
    ("fedadam", {"server_lr": float("nan")}, "--server-lr must be a positive number"),
    ("fedavg", {"server_momentum": 0.9}, "--server-momentum applies only to fedavgm"),
    ("fedavgm", {"server_momentum": 1.0}, "--server-momentum must be in [0, 1), got 1.0."),
    ("fedavgm", {"beta1": 0.9}, "--beta1 applies only to fedadam, fedyogi or fedadagrad"),
    ("fedadagrad", {"beta2": 0.9}, "--beta2 applies only to fedadam or fedyogi"),
    ("median", {"tau": 0.1}, "--tau applies only to fedadam, fedyogi or fedadagrad"),
    ("fedadam", {"beta1": 1.0}, "--beta1 must be in [0, 1), got 1.0."),
    ("fedyogi", {"beta2": -0.5}, "--beta2 must be in [0, 1), got -0.5."),
    ("fedadam", {"tau": 0.0}, "--tau must be a positive number, got 0.0."),
])
def test_config_errors(spec: str, kwargs: dict[str, float], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_strategy(spec, **kwargs)
    assert expected in str(err.value)
    assert one_sentence(str(err.value)), str(err.value)


def test_unknown_strategy_lists_every_form() -> None:
    with pytest.raises(ConfigError) as err:
        parse_strategy("nope")
    assert all(name in str(err.value) for name in STRATEGIES)


def test_strategy_is_a_frozen_configuration() -> None:
    s = parse_strategy("fedadam")
    with pytest.raises(AttributeError):
        s.name = "x"  # type: ignore[misc]
    assert isinstance(s, Strategy) and s.optimizer.kind == "adam"
    with pytest.raises(ValueError, match="plain mean and sgd"):
        Strategy("x", optimizer=parse_strategy("fedadam").optimizer, scaffold=True)
