"""The round-closing code the sync server and the simulator share (fedlearn.rounds)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from fedlearn.config import TrainConfig
from fedlearn.errors import RunStateError
from fedlearn.rounds import (
    STATE_KEY,
    RoundFailed,
    RoundUpdates,
    checkpoint_of,
    close_round,
    restore,
    round_config,
)
from fedlearn.strategies import ServerState, Strategy, Update, parse_strategy
from fedlearn.types import Weights
from fedlearn.weights import spec_of


def vec(*values: float) -> Weights:
    return {"w": np.array(values, np.float32), "n": np.array(4, np.int64)}


START = vec(1.0, -1.0)


def up(cid: str, a: float, b: float, n: int, count: int = 2) -> Update:
    return Update({"w": np.array([a, b], np.float32), "n": np.array(count, np.int64)}, n,
                  client_id=cid)


def closed(strategy: Strategy, updates: list[Update], state: ServerState | None = None,
           num_clients: int = 10) -> ServerState:
    collected = RoundUpdates(strategy)
    for u in updates:
        collected.add(u)
    return close_round(strategy, state or strategy.init(START), collected,
                       num_clients=num_clients)


def test_fedavg_streams_and_is_the_weighted_mean_by_hand() -> None:
    s = parse_strategy("fedavg")
    collected = RoundUpdates(s)
    assert collected.streaming
    collected.add(up("a", 2, 2, 1))
    collected.add(up("b", 4, 0, 3))
    assert len(collected) == 2 and collected.kept == []
    new = close_round(s, s.init(START), collected, num_clients=2)
    # (1*[2, 2] + 3*[4, 0]) / 4 = [3.5, 0.5] added to [1, -1]; counter 4 + 2
    assert new.weights["w"].tolist() == [4.5, -0.5] and int(new.weights["n"]) == 6
    assert new.version == 1


def test_median_buffers_the_updates_and_takes_the_middle_by_hand() -> None:
    s = parse_strategy("median")
    ups = [up("a", 1, 10, 1), up("b", 2, -5, 1), up("c", 100, 0, 1)]
    collected = RoundUpdates(s)
    for u in ups:
        collected.add(u)
    assert not collected.streaming and len(collected) == 3
    new = close_round(s, s.init(START), collected, num_clients=3)
    assert new.weights["w"].tolist() == [3.0, -1.0]  # [1, -1] + median [2, 0]


@pytest.mark.parametrize("spec", ["trimmed-mean:0.2", "krum:0", "scaffold",
                                  "median+fedadam", "fedavg"])
def test_arrival_order_never_changes_the_result(spec: str) -> None:
    s = parse_strategy(spec)
    rng = np.random.default_rng(3)
    ups = []
    for i in range(5):
        w = rng.normal(size=2).astype(np.float32)
        dc = {"w": rng.normal(size=2).astype(np.float32)}
        ups.append(Update({"w": w, "n": np.array(i, np.int64)}, int(10 + i),
                          extra={"delta_c": dc}, client_id=f"c{i}"))
    results = [closed(s, list(order), num_clients=5)
               for order in itertools.islice(itertools.permutations(ups), 0, 120, 17)]
    for r in results[1:]:
        np.testing.assert_array_equal(r.weights["w"], results[0].weights["w"])
        for g in r.arrays:
            for k in r.arrays[g]:
                np.testing.assert_array_equal(r.arrays[g][k], results[0].arrays[g][k])


def test_too_few_updates_for_the_rule_fail_the_round() -> None:
    s = parse_strategy("krum:1")
    assert s.min_updates == 5
    with pytest.raises(RoundFailed, match=r"krum \(f=1\) needs at least 5 updates"):
        closed(s, [up("a", 1, 1, 1), up("b", 2, 2, 1)])


def test_an_unusable_aggregate_fails_the_round() -> None:
    s = parse_strategy("fedavg")
    with pytest.raises(RoundFailed, match=r"unusable \(w reaches 2e\+13"):
        closed(s, [up("a", 2e13, 0, 1)])
    # The strategy's own state is held to the same bound (here FedAvgM's momentum).
    m = parse_strategy("fedavgm", server_lr=1e-3)
    with pytest.raises(RoundFailed, match=r"strategy state opt/m: w reaches 2e\+13"):
        closed(m, [up("a", 2e13, 0, 1)])


def test_a_round_without_scaffold_deltas_fails_with_the_reason() -> None:
    s = parse_strategy("scaffold")
    with pytest.raises(RoundFailed, match="control-variate delta"):
        closed(s, [up("a", 1, 1, 1)])


def test_round_config_adds_the_strategy_keys() -> None:
    base = TrainConfig(lr=0.1, extra={"user": 3})
    state = parse_strategy("fedavg").init(START)
    assert round_config(parse_strategy("fedavg"), state, base, 1) is base
    prox = round_config(parse_strategy("fedprox", prox_mu=0.3), state, base, 1)
    assert prox.prox_mu == 0.3 and prox.extra["user"] == 3 and prox.lr == 0.1
    assert not prox.scaffold
    scaffold = round_config(parse_strategy("scaffold"), state, base, 2)
    assert scaffold.scaffold and scaffold.prox_mu == 0.0
    assert scaffold.as_dict()["scaffold"] == 1


@pytest.mark.parametrize("spec", ["fedadam", "scaffold", "median+fedavgm", "fedavg"])
def test_checkpoint_round_trip_is_exact(spec: str) -> None:
    s = parse_strategy(spec)
    state = s.init(START)
    for r in range(3):
        ups = [Update({"w": np.array([0.1 * r + i, -0.2], np.float32), "n": np.array(1)},
                      i + 1, extra={"delta_c": {"w": np.array([0.5, i], np.float32)}},
                      client_id=f"c{i}") for i in range(3)]
        state = closed(s, ups, state, num_clients=4)
    arrays, meta = checkpoint_of(state)
    assert set(meta) == {STATE_KEY}
    back = restore(s, arrays, meta, key=3, spec=spec_of(START))
    assert back.version == 3 and dict(back.scalars) == dict(state.scalars)
    np.testing.assert_array_equal(back.weights["w"], state.weights["w"])
    assert set(back.arrays) == set(state.arrays)
    for g, group in state.arrays.items():
        for k, v in group.items():
            assert back.arrays[g][k].dtype == v.dtype
            np.testing.assert_array_equal(back.arrays[g][k], v)
    # ...and the next round from the restored state is the same bit for bit.
    nxt = [up("a", 0.3, 0.1, 2), up("b", -0.1, 0.7, 5)]
    nxt = [dataclasses.replace(u, extra={"delta_c": {"w": np.array([1, 2], np.float32)}})
           for u in nxt]
    a, b = closed(s, nxt, state, num_clients=4), closed(s, nxt, back, num_clients=4)
    np.testing.assert_array_equal(a.weights["w"], b.weights["w"])


def test_restore_reads_a_model_only_checkpoint_and_refuses_a_foreign_state() -> None:
    s = parse_strategy("fedavgm")
    old = restore(s, START, {}, key=4, spec=spec_of(START))  # written before strategies had state
    assert old.version == 4 and set(old.arrays) == {"opt/m"}
    np.testing.assert_array_equal(old.weights["w"], START["w"])
    arrays, meta = checkpoint_of(parse_strategy("fedadam").init(START))
    with pytest.raises(RunStateError, match="another strategy than 'fedavgm'"):
        restore(s, arrays, meta, key=0, spec=spec_of(START))
    arrays, meta = checkpoint_of(s.init(START))
    with pytest.raises(RunStateError, match="or another round"):
        restore(s, arrays, meta, key=7, spec=spec_of(START))
    with pytest.raises(RunStateError, match="does not hold a usable run state"):
        restore(s, arrays, {STATE_KEY: "{}"}, key=0, spec=spec_of(START))
    with pytest.raises(RunStateError, match="does not hold a usable run state"):
        restore(s, arrays, meta, key=0, spec=spec_of({"other": START["w"]}))
