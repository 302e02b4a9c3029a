"""Simulated time: async merging in virtual-time order, and sync rounds with a deadline."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlearn.config import TrainConfig
from fedlearn.data import partition
from fedlearn.errors import ConfigError
from fedlearn.models import build_model
from fedlearn.runs import RunDir, load_model_file
from fedlearn.seeding import derive_seed, rng_for, task_seed
from fedlearn.sim import ENGINES, SimConfig, config_record, run_simulation
from fedlearn.sim.base import ClientTask, ClientUpdate
from fedlearn.sim.deadline import time_round
from fedlearn.sim.virtual import AsyncSimulation, staleness_summary
from fedlearn.training import Shard, initial_state, local_update
from fedlearn.types import Weights
from tests.unit.test_sim_loop import toy_dataset, toy_task

# Toy-sized tensors train fastest (and steadiest on a busy machine) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SGD = TrainConfig(optimizer="sgd", lr=0.1, batch_size=16)


def config(**overrides: Any) -> SimConfig:
    values: dict[str, Any] = {"clients": 3, "per_round": 1, "partition": "iid", "seed": 4,
                              "dataset": "toy", "train": SGD, "mode": "async"}
    values.update(overrides)
    return SimConfig(**values)


def simulate(tmp: Path, cfg: SimConfig, name: str = "run") -> tuple[dict[str, Any], RunDir]:
    run = RunDir.create(tmp / name, config_record(cfg))
    return run_simulation(cfg, toy_task(), run, log=lambda line: None), run


def speeds_file(tmp: Path, speeds: list[float]) -> str:
    path = tmp / "speeds.txt"
    path.write_text("\n".join(str(s) for s in speeds) + "\n")
    return str(path)


def shards(clients: int, seed: int = 4) -> list[Shard]:
    ds = toy_dataset()
    return [Shard.from_numpy(ds.x_train, ds.y_train, rows)
            for rows in partition(ds.y_train, clients, "iid", seed)]


def without_wall_clock(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in rows]


@pytest.mark.parametrize("engine", ENGINES)
def test_async_with_one_client_at_a_time_is_a_sequential_fedasync_merge(
        tmp_path: Path, engine: str) -> None:
    """Constant speeds, concurrency 1: every update is fresh and merged as w + 0.6 * delta."""
    summary, run = simulate(tmp_path, config(engine=engine, updates=5))
    parts = shards(3)
    model = build_model("mlp", (1, 4, 4), 3, seed=None)
    w: Weights = initial_state(toy_task(), 4)
    rng = rng_for("async-sample", 4)
    given: dict[str, int] = {}
    for _ in range(5):
        index = int(rng.integers(3))  # the one finished client is free again: all 3 idle
        cid = f"client-{index}"
        given[cid] = given.get(cid, 0) + 1
        res = local_update(model, w, parts[index], SGD,
                           seed=derive_seed("async-task", 4, cid, given[cid]))
        w = {k: (v.astype(np.float64) + 0.6 * res.delta[k].astype(np.float64)).astype(v.dtype)
             for k, v in w.items()}
    got = load_model_file(run.path / "model.safetensors")
    for k in w:
        np.testing.assert_allclose(got[k], w[k], rtol=0, atol=1e-5, err_msg=k)
    rows = run.read_metrics()
    steps = len(parts[0]) // 16  # 160 rows, batch 16: 10 steps = 10 virtual seconds
    assert [r["update"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["virtual_time"] for r in rows] == [steps * n for n in range(1, 6)]
    assert all(r["staleness_max"] == 0 and r["staleness_mean"] == 0 for r in rows)
    assert summary["updates"] == 5 and summary["versions"] == 5
    assert summary["staleness"]["histogram"] == {"0": 5}
    assert summary["final_accuracy"] == rows[-1]["accuracy"]


def test_async_attackers_poison_their_deltas_before_the_merge(tmp_path: Path) -> None:
    """Every client flips its sign: the sequential merge with -delta, and attackers.json."""
    summary, run = simulate(tmp_path, config(updates=3, attack="sign-flip", attackers=1.0))
    parts = shards(3)
    model = build_model("mlp", (1, 4, 4), 3, seed=None)
    w: Weights = initial_state(toy_task(), 4)
    rng = rng_for("async-sample", 4)
    given: dict[str, int] = {}
    for _ in range(3):
        index = int(rng.integers(3))
        cid = f"client-{index}"
        given[cid] = given.get(cid, 0) + 1
        res = local_update(model, w, parts[index], SGD,
                           seed=derive_seed("async-task", 4, cid, given[cid]))
        w = {k: (v.astype(np.float64) - 0.6 * res.delta[k].astype(np.float64)).astype(v.dtype)
             for k, v in w.items()}
    got = load_model_file(run.path / "model.safetensors")
    for k in w:
        np.testing.assert_allclose(got[k], w[k], rtol=0, atol=1e-5, err_msg=k)
    assert (run.path / "attackers.json").exists() and summary["updates"] == 3


def test_staleness_counts_the_versions_merged_since_a_task_started(tmp_path: Path) -> None:
    """Two clients always busy; client-1 is 1/0.3 times slower than client-0."""
    parts = shards(2)
    assert [len(p) for p in parts] == [240, 240]  # 15 steps each
    speeds = speeds_file(tmp_path, [1.0, 0.3])
    summary, run = simulate(tmp_path, config(clients=2, per_round=2, updates=8,
                                             client_speeds=speeds))
    rows = run.read_metrics()
    # client-0 finishes at 15, 30, 45, 60, 75, 90; client-1 (50 s a task) at 50 and 100.
    # At 50 client-1's task from version 0 meets version 3; client-0's task handed out at 45
    # (version 3) meets version 4 at 60; client-1's second task (version 4) meets 7 at 100.
    assert [r["virtual_time"] for r in rows] == pytest.approx([15, 30, 45, 50, 60, 75, 90, 100])
    assert [r["staleness_max"] for r in rows] == [0, 0, 0, 3, 1, 0, 0, 3]
    assert [r["version"] for r in rows] == list(range(1, 9))
    assert summary["staleness"]["histogram"] == {"0": 5, "1": 1, "3": 2}
    assert summary["staleness"]["max"] == 3
    assert summary["mean_staleness"] == pytest.approx(7 / 8)
    assert rows[-1]["mean_staleness"] == pytest.approx(7 / 8)
    assert summary["virtual_time"] == pytest.approx(100)


def test_max_staleness_refuses_old_updates_and_the_run_goes_on(tmp_path: Path) -> None:
    speeds = speeds_file(tmp_path, [1.0, 0.3])
    summary, run = simulate(tmp_path, config(clients=2, per_round=2, updates=8,
                                             client_speeds=speeds, max_staleness=2))
    # client-1's tasks end at 50 (from version 0, now 3) and 100 (from 3, now 6): refused.
    assert summary["refused"] == 2 and summary["updates"] == 8
    assert summary["staleness"]["histogram"] == {"0": 8}
    rows = run.read_metrics()
    assert [r["virtual_time"] for r in rows] == pytest.approx([15 * n for n in range(1, 9)])
    assert rows[-1]["refused"] == 2


def test_fedbuff_trains_the_tasks_of_one_version_in_one_engine_call(tmp_path: Path) -> None:
    cfg = config(clients=6, per_round=3, updates=6, async_policy="fedbuff:2",
                 client_speeds="lognormal:1.0", eval_every=2)
    asim = AsyncSimulation(cfg, toy_task(), log=lambda line: None)
    engine = asim.sim.engine
    calls: list[int] = []

    class Counting:
        name = engine.name

        def train_round(self, weights: Weights, clients: list[ClientTask],
                        train: TrainConfig) -> list[ClientUpdate]:
            calls.append(len(clients))
            return engine.train_round(weights, clients, train)

    asim.sim.engine = Counting()
    asim.run()
    assert asim.state.updates == 6 and asim.state.version == 3  # one version per flush
    assert calls[0] == 3  # the first three tasks all start from version 0
    assert sum(calls) >= 6 and len(calls) < sum(calls)
    assert [r["update"] for r in asim.history] == [2, 4, 6]
    assert all(r["buffered"] == 0 for r in asim.history)


def test_a_seed_reproduces_an_async_run(tmp_path: Path) -> None:
    cfg = config(clients=8, per_round=3, updates=12, client_speeds="lognormal:1.0",
                 async_policy="samples", eval_every=4)
    _, a = simulate(tmp_path, cfg, "a")
    _, b = simulate(tmp_path, cfg, "b")
    _, c = simulate(tmp_path, config(clients=8, per_round=3, updates=12, seed=5,
                                     client_speeds="lognormal:1.0", async_policy="samples",
                                     eval_every=4), "c")
    assert without_wall_clock(a.read_metrics()) == without_wall_clock(b.read_metrics())
    wa, wb = (load_model_file(r.path / "model.safetensors") for r in (a, b))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert [r["virtual_time"] for r in a.read_metrics()] != [
        r["virtual_time"] for r in c.read_metrics()]


def test_max_virtual_time_stops_with_the_model_current_then(tmp_path: Path) -> None:
    summary, run = simulate(tmp_path, config(max_virtual_time=35.0))
    rows = run.read_metrics()
    assert [r["update"] for r in rows] == [1, 2, 3]  # 10 virtual seconds a task
    # The last record is the model of the last merge; the run ends at the limit.
    assert rows[-1]["virtual_time"] == 30.0 and summary["virtual_time"] == 35.0


def test_time_round_splits_at_the_deadline() -> None:
    tasks = [ClientTask(f"c{i}", np.zeros(0, np.int64), i) for i in range(4)]
    timing = time_round(tasks, [8.0, 8.0, 80.0, 20.0], 20.0)
    assert [t.client_id for t in timing.made] == ["c0", "c1", "c3"]
    assert [t.client_id for t in timing.dropped] == ["c2"] and timing.seconds == 20.0
    everybody = time_round(tasks, [8.0, 8.0, 18.0, 20.0], 20.0)
    assert not everybody.dropped and everybody.seconds == 20.0
    early = time_round(tasks, [8.0, 8.0, 18.0, 9.0], 20.0)
    assert not early.dropped and early.seconds == 18.0  # closes when the last one is done
    assert time_round(tasks, [8.0, 8.0, 80.0, 9.0], None).seconds == 80.0


def test_a_sync_deadline_drops_exactly_the_slow_clients(tmp_path: Path) -> None:
    """client-2 needs 80 virtual seconds, the others 8: a 20 s deadline leaves it out."""
    speeds = speeds_file(tmp_path, [1.0, 1.0, 0.1, 1.0])
    cfg = config(mode="sync", clients=4, per_round=4, rounds=1, client_speeds=speeds,
                 round_timeout=20.0)
    summary, run = simulate(tmp_path, cfg)
    (row,) = run.read_metrics()
    assert row["clients"] == 3 and row["dropped"] == 1 and row["sampled"] == 4
    assert row["virtual_time"] == 20.0 and row["round_virtual_seconds"] == 20.0
    assert summary["dropped"] == 1 and summary["virtual_time"] == 20.0
    # The model is FedAvg of clients 0, 1 and 3 alone.
    parts = shards(4)
    model = build_model("mlp", (1, 4, 4), 3, seed=None)
    start = initial_state(toy_task(), 4)
    acc = {k: np.zeros_like(v, dtype=np.float64) for k, v in start.items()}
    total = 0
    for i in (0, 1, 3):
        res = local_update(model, start, parts[i], SGD, seed=task_seed(4, 1, f"client-{i}"))
        total += res.num_examples
        for k in acc:
            acc[k] += res.num_examples * res.delta[k].astype(np.float64)
    got = load_model_file(run.path / "model.safetensors")
    for k in start:
        np.testing.assert_allclose(got[k], start[k] + (acc[k] / total).astype(np.float32),
                                   rtol=0, atol=1e-5, err_msg=k)
    assert row["examples"] == total


def test_without_a_deadline_a_sync_round_waits_for_its_slowest_client(tmp_path: Path) -> None:
    speeds = speeds_file(tmp_path, [1.0, 1.0, 0.1, 1.0])
    summary, run = simulate(tmp_path, config(mode="sync", clients=4, per_round=4, rounds=2,
                                             client_speeds=speeds))
    rows = run.read_metrics()
    assert [r["virtual_time"] for r in rows] == pytest.approx([80.0, 160.0])
    assert all(r["clients"] == 4 and r["dropped"] == 0 for r in rows)
    assert summary["dropped"] == 0 and summary["rounds"] == 2


def test_a_round_nobody_finishes_in_time_keeps_the_model(tmp_path: Path) -> None:
    summary, run = simulate(tmp_path, config(mode="sync", clients=4, per_round=4, rounds=2,
                                             round_timeout=5.0))
    rows = run.read_metrics()
    assert [(r["clients"], r["dropped"], r["examples"]) for r in rows] == [(0, 4, 0)] * 2
    assert [r["virtual_time"] for r in rows] == [5.0, 10.0]
    assert rows[0]["accuracy"] == rows[1]["accuracy"]
    assert summary["empty_rounds"] == 2 and summary["dropped"] == 8
    got = load_model_file(run.path / "model.safetensors")
    start = initial_state(toy_task(), 4)
    assert all(np.array_equal(got[k], start[k]) for k in start)


def test_dp_fedavg_with_a_deadline_is_the_private_mean_of_the_clients_in_time(
        tmp_path: Path) -> None:
    """Poisson sampling as the accountant assumes, then the deadline drops the slow sampled
    clients: the private mean of those in time (fixed denominator qN), every round accounted
    (a round nobody finished is the noise alone, and is released too)."""
    from fedlearn.config import build_strategy, privacy_budget
    from fedlearn.strategies import Update, poisson_sample

    speeds = speeds_file(tmp_path, [1.0, 1.0, 0.1, 1.0, 1.0, 0.1])
    cfg = config(mode="sync", clients=6, per_round=3, rounds=3, client_speeds=speeds,
                 round_timeout=20.0, dp_noise_multiplier=0.8, dp_clip="0.5", engine="sequential")
    summary, run = simulate(tmp_path, cfg)
    rows = run.read_metrics()
    budget = privacy_budget(cfg, "poisson")
    assert [r["dp_epsilon"] for r in rows] == pytest.approx([budget.epsilon(r) for r in (1, 2, 3)])
    assert summary["final_dp_epsilon"] == pytest.approx(budget.epsilon(3))
    _, run2 = simulate(tmp_path, cfg, "again")  # reproducible
    first = load_model_file(run.path / "model.safetensors")
    assert all(np.array_equal(first[k], v) for k, v in
               load_model_file(run2.path / "model.safetensors").items())
    # Round 1 by hand: the Poisson sample, minus clients 2 and 5 (80 virtual s each).
    _, run1 = simulate(tmp_path, dataclasses.replace(cfg, rounds=1), "one")
    ids = [f"client-{i}" for i in range(6)]
    sampled = poisson_sample(ids, 0.5, seed=4, round_number=1)
    made = [c for c in sampled if c not in ("client-2", "client-5")]
    (row,) = run1.read_metrics()
    assert row["sampled"] == len(sampled) and row["clients"] == len(made)
    assert row["dropped"] == len(sampled) - len(made) >= 1 and made
    parts = dict(zip(ids, shards(6), strict=True))
    model = build_model("mlp", (1, 4, 4), 3, seed=None)
    start = initial_state(toy_task(), 4)
    updates = [Update(local_update(model, start, parts[c], SGD, seed=task_seed(4, 1, c)).delta,
                      1, {}, c) for c in made]
    strategy = build_strategy(cfg)
    want = strategy.aggregate(strategy.init(start), updates, num_clients=6).weights
    got = load_model_file(run1.path / "model.safetensors")
    for k in start:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)


def test_sync_max_virtual_time_runs_only_rounds_that_end_in_time(tmp_path: Path) -> None:
    summary, run = simulate(tmp_path, config(mode="sync", clients=4, per_round=2, rounds=50,
                                             max_virtual_time=25.0))
    assert [r["virtual_time"] for r in run.read_metrics()] == [8.0, 16.0, 24.0]
    assert summary["rounds"] == 3


def test_staleness_summary() -> None:
    out = staleness_summary([0, 0, 1, 3, 3, 3])
    assert out["count"] == 6 and out["max"] == 3 and out["mean"] == pytest.approx(10 / 6)
    assert out["histogram"] == {"0": 2, "1": 1, "3": 3} and out["p50"] == 2.0
    assert staleness_summary([]) == {"count": 0}


@pytest.mark.parametrize(("overrides", "words"), [
    ({"mode": "semi"}, "unknown --mode 'semi'"),
    ({"mode": "async"}, "needs a stop rule"),
    ({"updates": 0}, "--updates must be at least 1"),
    ({"updates": 5, "concurrency": 4}, "--concurrency must be between 1 and --clients (3)"),
    ({"updates": 5, "concurrency": 0}, "--concurrency must be between 1"),
    ({"updates": 5, "async_policy": "fedbuff"}, "needs a buffer size"),
    ({"updates": 5, "async_policy": "fedsgd"}, "unknown --async-policy"),
    ({"updates": 5, "staleness_fn": "cubic"}, "unknown --staleness-fn"),
    ({"updates": 5, "async_alpha": 1.5}, "--async-alpha"),
    ({"updates": 5, "max_staleness": -1}, "--max-staleness must be 0 or more"),
    ({"updates": 5, "round_timeout": 10.0}, "--round-timeout applies to --mode sync"),
    ({"updates": 5, "strategy": "fedavgm"}, "--strategy fedavgm applies to --mode sync"),
    ({"updates": 5, "prox_mu": 0.1}, "--prox-mu applies to --mode sync"),
    ({"updates": 5, "client_speeds": "lognormal:x"}, "--client-speeds"),
    ({"updates": 5, "dp_noise_multiplier": 1.0, "dp_clip": "1.0"},
     "private mean of a sync round's updates; drop --mode async"),
    ({"updates": 5, "max_virtual_time": -1.0}, "--max-virtual-time"),
    ({"mode": "sync", "updates": 5}, "--updates applies to --mode async"),
    ({"mode": "sync", "concurrency": 2}, "--concurrency applies to --mode async"),
    ({"mode": "sync", "max_staleness": 2}, "--max-staleness applies to --mode async"),
    ({"mode": "sync", "round_timeout": 0.0}, "--round-timeout must be a positive number"),
    ({"mode": "sync", "round_timeout": float("inf")}, "--round-timeout must be a positive"),
])
def test_bad_time_settings_are_one_config_error(overrides: dict[str, Any], words: str) -> None:
    values: dict[str, Any] = {"clients": 3, "per_round": 1, "mode": "async"}
    values.update(overrides)
    with pytest.raises(ConfigError) as info:
        SimConfig(**values)
    message = str(info.value)
    assert words in message and "\n" not in message and message.endswith(".")


def test_only_time_settings_turn_the_virtual_clock_on() -> None:
    assert not SimConfig().virtual
    assert SimConfig(client_speeds="uniform:1:2").virtual
    assert SimConfig(round_timeout=3.0).virtual
    assert SimConfig(mode="async", updates=3).virtual
    assert SimConfig(mode="async", updates=3).in_flight == 10
    assert SimConfig(mode="async", updates=3, concurrency=4).in_flight == 4


def test_the_public_simulate_takes_the_time_settings(tmp_path: Path) -> None:
    import fedlearn

    history = fedlearn.simulate(toy_task(), clients=4, per_round=2, config=SGD, seed=1,
                                out=tmp_path / "api", mode="async", updates=6,
                                async_policy="fedbuff:3", client_speeds="uniform:0.5:2")
    assert history.summary["sim_mode"] == "async" and history.summary["versions"] == 2
    assert [r["update"] for r in history.records][-1] == 6
