"""SyncCoordinator with strategies other than FedAvg: config, extra arrays, state, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlearn.errors import ConfigError, PayloadError
from fedlearn.rounds import RoundUpdates, close_round
from fedlearn.server.store import Store
from fedlearn.strategies import Update, parse_strategy
from fedlearn.weights import decode, pack, unpack
from tests.unit.test_coordinator import INITIAL, Harness, global_w, vec


def run_round(h: Harness, deltas: dict[str, tuple[float, float]], examples: int = 1,
              extra: dict[str, tuple[float, float]] | None = None) -> None:
    number = h.coord.status()["round"]
    for cid, (a, b) in deltas.items():
        assert h.coord.poll(cid).action == "train"
        payload = vec(a, b)
        if extra is not None:
            payload = pack(payload, {"delta_c": vec(*extra[cid])})
        h.coord.submit(cid, number, payload, examples)
    assert h.coord.step() is True


def test_fedadam_state_is_checkpointed_and_resumed_exactly(
    tmp_path: Path, stores: list[Store]
) -> None:
    h = Harness(tmp_path, stores, rounds=4, strategy="fedadam", server_lr=0.1)
    h.register("a", "b")
    h.coord.step()
    s = parse_strategy("fedadam", server_lr=0.1)
    state = s.init(INITIAL)
    for r, deltas in enumerate(({"a": (1.0, 2.0), "b": (3.0, -2.0)},
                                {"a": (0.5, 0.5), "b": (-1.0, 0.0)}), start=1):
        run_round(h, deltas)
        # The same round by hand: the strategy on the same updates.
        collected = RoundUpdates(s)
        for cid, (a, b) in sorted(deltas.items()):
            collected.add(Update(vec(a, b), 1, client_id=cid))
        state = close_round(s, state, collected, num_clients=2)
        assert h.coord.state.version == r
        np.testing.assert_array_equal(h.coord.weights["w"], state.weights["w"])
    assert h.coord.status()["strategy"] == "fedadam"
    saved = h.store.load_checkpoint()
    assert saved is not None and saved.key == 2
    assert {"model/w", "opt/m/w", "opt/v/w"} <= set(saved.arrays)
    np.testing.assert_array_equal(saved.arrays["opt/v/w"], state.arrays["opt/v"]["w"])

    # A new server process on the same run directory carries on from that state.
    again = Harness(tmp_path, stores, rounds=4, strategy="fedadam", server_lr=0.1)
    assert again.coord.state.version == 2
    assert dict(again.coord.state.scalars) == dict(state.scalars)
    for g in ("opt/m", "opt/v"):
        np.testing.assert_array_equal(again.coord.state.arrays[g]["w"], state.arrays[g]["w"])


def test_fedprox_sends_prox_mu_with_every_task(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, strategy="fedprox", prox_mu=0.25)
    h.register("a", "b")
    h.coord.step()
    task = h.coord.poll("a")
    assert task.config is not None and task.config["prox_mu"] == 0.25
    assert task.config["lr"] == 0.001  # the run's own training config is still there
    run_round(h, {"a": (2.0, 2.0), "b": (4.0, 4.0)})
    assert global_w(h.coord) == [4.0, 2.0]  # plain FedAvg on the server


def test_scaffold_sends_c_takes_delta_c_and_moves_c(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, strategy="scaffold", min_clients=2)
    h.register("a", "b", "c")  # N = 3 registered, 2 sampled... all three here (fraction 1)
    h.coord.step()
    assert h.coord.model_extras == ("c",)
    assert h.coord.poll("a").config["scaffold"] == 1  # type: ignore[index]
    data, _ = h.coord.model_bytes()
    model, extras = unpack(decode(data), ("c",))
    assert model["w"].tolist() == [1.0, -1.0] and extras["c"]["w"].tolist() == [0.0, 0.0]
    # An update without its control delta is refused; the round is untouched.
    with pytest.raises(PayloadError, match="missing delta_c/w"):
        h.coord.submit("a", 1, vec(1, 1), 5)
    assert h.coord.status()["received"] == 0
    run_round(h, {"a": (1.0, 1.0), "b": (2.0, 0.0), "c": (3.0, 2.0)}, examples=7,
              extra={"a": (3.0, 0.0), "b": (0.0, 3.0), "c": (3.0, 3.0)})
    # x: plain mean of the deltas [2, 1]; c: (3/3) * mean of delta_c [2, 2]
    assert global_w(h.coord) == [3.0, 0.0]
    data, version = h.coord.model_bytes()
    assert version == 1
    assert unpack(decode(data), ("c",))[1]["c"]["w"].tolist() == [2.0, 2.0]
    saved = h.store.load_checkpoint()
    assert saved is not None and saved.arrays["scaffold/c/w"].tolist() == [2.0, 2.0]


def test_scaffold_refuses_a_model_whose_names_clash(tmp_path: Path, stores: list[Store]) -> None:
    from fedlearn.config import ServerConfig
    from fedlearn.server.coordinator import SyncCoordinator

    cfg = ServerConfig(strategy="scaffold")
    with pytest.raises(ConfigError, match="'c/x' of the task's state would clash"):
        SyncCoordinator(cfg, {"c/x": np.zeros(2, np.float32)},
                        strategy=parse_strategy("scaffold"), store=Store(tmp_path),
                        evaluator=None)


def test_a_robust_rule_raises_the_fewest_results(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, strategy="krum:0", min_clients=2, min_results=1)
    assert h.coord.min_results == 3 and h.coord.status()["min_results"] == 3
    h.register("a", "b")
    assert h.coord.step() is False  # two clients cannot make a Krum round
    h.register("c")
    assert h.coord.step() is True
    # Krum (f=0) scores each delta by its squared distance to its nearest other:
    # a 2, b 0.5, c 0.5; the tie goes to the earlier client id, b.
    run_round(h, {"a": (0.0, 0.0), "b": (1.0, 1.0), "c": (1.5, 1.5)})
    assert global_w(h.coord) == [2.0, 0.0]


def test_trimmed_mean_shrugs_off_one_huge_delta(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, strategy="trimmed-mean:0.2", min_clients=5, rounds=1,
                max_update_norm=0.0)
    h.register("a", "b", "c", "d", "e")
    h.coord.step()
    run_round(h, {"a": (1.0, 1.0), "b": (1.0, 2.0), "c": (2.0, 1.0), "d": (2.0, 2.0),
                  "e": (1e6, -1e6)})
    # one cut from each end: the mean of the middle three per coordinate
    np.testing.assert_allclose(global_w(h.coord), [1.0 + 5 / 3, -1.0 + 4 / 3], rtol=1e-6)


def test_a_failed_aggregate_keeps_the_model_and_reruns(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, strategy="fedavgm", server_lr=1e-3, max_update_norm=0.0)
    h.register("a", "b")
    h.coord.step()
    run_round(h, {"a": (2e13, 0.0), "b": (2e13, 0.0)})  # momentum beyond 1e12
    assert global_w(h.coord) == [1.0, -1.0] and h.coord.state.version == 0
    failure = h.coord.status()["failures"][0]
    assert failure["round"] == 1 and "strategy state opt/m" in failure["reason"]
    assert h.coord.status()["round"] == 1  # round 1 again, with the old state
    run_round(h, {"a": (1.0, 1.0), "b": (1.0, 1.0)})
    assert h.coord.state.version == 1
