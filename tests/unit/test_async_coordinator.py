"""AsyncCoordinator driven directly: a fake clock, a real Store in tmp, toy two-number weights."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlearn.config import ServerConfig, TrainConfig
from fedlearn.errors import ConflictError, PayloadError
from fedlearn.seeding import derive_seed
from fedlearn.server.async_coordinator import DONE, WAIT, AsyncCoordinator, AsyncTask, Merged
from fedlearn.server.store import Store
from fedlearn.strategies.async_policies import AsyncState, make_policy
from fedlearn.types import Weights
from fedlearn.weights import decode
from tests.unit.test_coordinator import INITIAL, Evaluator, FakeClock, vec

THREAD_TIMEOUT = 30.0


class Harness:
    """One async coordinator with its store, clock, evaluator and a log of merges."""

    def __init__(self, run_dir: Path, stores: list[Store], **config: Any) -> None:
        settings: dict[str, Any] = {"mode": "async", "async_policy": "samples",
                                    "min_clients": 2, "max_updates": 10, "seed": 7}
        settings.update(config)
        self.config = ServerConfig(**settings)
        self.store = Store(run_dir)
        stores.append(self.store)
        self.clock = FakeClock()
        self.evaluator = Evaluator()
        self.records: list[dict[str, Any]] = []
        self.merged: list[Merged] = []
        self.coord = AsyncCoordinator(
            self.config, INITIAL, store=self.store, evaluator=self.evaluator,
            clock=self.clock, on_round=self.records.append, on_merge=self.merged.append,
        )

    def start(self, *ids: str) -> None:
        for cid in ids:
            self.coord.register(cid, 10)

    def push(self, cid: str, value: float, n: int = 1, version: int | None = None) -> Merged:
        base = self.coord.state.version if version is None else version
        return self.coord.submit(cid, base, vec(value, value), n)

    def drain(self) -> None:
        while self.coord.step():
            pass


def global_w(coord: AsyncCoordinator) -> list[float]:
    return [float(x) for x in coord.weights["w"]]


def snapshot(h: Harness) -> tuple[Any, ...]:
    c = h.coord
    data, version = c.model_bytes()
    return (global_w(c), c.state.version, c.state.updates, c.state.buffered, version,
            decode(data)["w"].tolist(), len(c.history), len(h.merged), c.mean_staleness,
            c.status()["state"])


# -- tasks ------------------------------------------------------------------------------


def test_waits_for_min_clients_then_hands_out_train_at_once(
    tmp_path: Path, stores: list[Store]
) -> None:
    h = Harness(tmp_path, stores)
    h.start("a")
    assert h.coord.poll("a") == WAIT
    assert h.coord.poll("a") == WAIT
    assert h.coord.seconds_to_deadline() is None
    assert h.coord.status()["state"] == "waiting"
    h.start("b")
    first = h.coord.poll("a")
    assert first == AsyncTask("train", 0, derive_seed("async-task", 7, "a", 1), "u1.a",
                              TrainConfig().as_dict())
    assert first.to_json() == {"action": "train", "version": 0, "seed": first.seed,
                               "task_id": "u1.a", "config": TrainConfig().as_dict()}
    assert h.coord.poll("a") == first  # one open task per client: asking again gets it again
    assert h.coord.poll("b").seed == derive_seed("async-task", 7, "b", 1)
    assert h.coord.status()["state"] == "training"
    h.push("a", 1.0)
    second = h.coord.poll("a")  # the next local training gets another seed
    assert second.seed == derive_seed("async-task", 7, "a", 2) != first.seed
    assert second.task_id == "u2.a"
    assert h.coord.poll("b").version == 1  # the current version, at once
    assert WAIT.to_json() == {"action": "wait"} and DONE.to_json() == {"action": "done"}


def test_a_withdrawn_task_is_replaced_by_a_new_one(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores)
    h.start("a", "b")
    first = h.coord.poll("a")
    with pytest.raises(ConflictError, match="not this client's open task"):
        h.coord.withdraw("a", "u9.a")
    h.coord.withdraw("a", first.task_id, "its update failed its checks")
    second = h.coord.poll("a")
    assert second.task_id == "u2.a" and second.seed != first.seed
    with pytest.raises(ConflictError):
        h.coord.submit("a", 0, vec(1, 1), 1, task_id=first.task_id)  # given up


# -- merging ----------------------------------------------------------------------------


def test_an_update_before_the_start_is_merged_and_starts_the_clock(
    tmp_path: Path, stores: list[Store]
) -> None:
    h = Harness(tmp_path, stores, max_updates=None, max_seconds=10.0)
    h.start("a")
    h.clock.advance(5.0)
    assert h.push("a", 1.0).update == 1  # e.g. a client that held a base over a restart
    assert h.coord.status()["state"] == "training"
    assert h.coord.seconds_to_deadline() == pytest.approx(10.0)


def test_samples_merges_by_hand_and_records_each_update(
    tmp_path: Path, stores: list[Store]
) -> None:
    h = Harness(tmp_path, stores)
    h.start("a", "b")
    h.clock.advance(2.0)
    first = h.push("a", 2.0, n=10)
    assert first == Merged(update=1, client_id="a", base_version=0, staleness=0,
                           num_examples=10, version=1)
    assert global_w(h.coord) == [3.0, 1.0]  # merged at once, before any step()
    assert h.coord.model_bytes()[1] == 1
    second = h.push("b", 4.0, n=30, version=0)  # trained from version 0: staleness 1
    assert (second.update, second.staleness, second.version) == (2, 1, 2)
    assert global_w(h.coord) == [6.0, 4.0]  # [3, 1] + 30/40 * [4, 4]
    assert h.evaluator.seen == []  # evaluation waits for step()
    h.drain()
    assert h.evaluator.seen == [[3.0, 1.0], [6.0, 4.0]]
    assert [r["update"] for r in h.coord.history] == [1, 2]
    record = h.coord.history[1]
    assert (record["version"], record["accuracy"], record["loss"]) == (2, 6.0, 4.0)
    assert (record["staleness"], record["mean_staleness"], record["examples"]) == (1, 0.5, 40)
    assert record["seconds"] == pytest.approx(2.0)
    assert h.records == h.coord.history == h.store.rounds()
    assert h.coord.mean_staleness == 0.5
    status = h.coord.status()
    assert (status["version"], status["updates"], status["policy"]) == (2, 2, "samples")
    assert status["history"][-1] == {"update": 2, "version": 2, "accuracy": 6.0, "loss": 4.0}


def test_fedbuff_changes_the_model_only_when_the_buffer_flushes(
    tmp_path: Path, stores: list[Store]
) -> None:
    h = Harness(tmp_path, stores, async_policy="fedbuff:2", staleness_fn="constant")
    h.start("a", "b")
    h.push("a", 2.0, n=1)
    assert (h.coord.state.version, h.coord.state.buffered) == (0, 1)
    assert h.coord.model_bytes()[1] == 0 and global_w(h.coord) == [1.0, -1.0]
    h.push("b", 5.0, n=2, version=0)
    assert global_w(h.coord) == [5.0, 3.0]  # + (2 + 10) / 3
    assert (h.coord.state.version, h.coord.state.updates) == (1, 2)


# -- refusals ---------------------------------------------------------------------------


def test_refused_updates_change_nothing(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, max_staleness=2)
    h.start("a", "b")
    for _ in range(4):
        h.push("a", 1.0)
    h.drain()
    before = snapshot(h)
    assert before[1] == 4
    refusals: list[tuple[type[Exception], str, tuple[Any, ...]]] = [
        (ConflictError, "claims version 5", ("b", 5, vec(1, 1), 1)),  # from the future
        (ConflictError, "claims version 99", ("b", 99, vec(1, 1), 1)),
        (ConflictError, "3 versions stale", ("b", 1, vec(1, 1), 1)),  # over max_staleness
        (ConflictError, "4 versions stale", ("b", 0, vec(1, 1), 1)),
        (PayloadError, "shape", ("b", 4, {"w": np.zeros(3, np.float32)}, 1)),
        (PayloadError, "dtype", ("b", 4, {"w": np.zeros(2, np.float64)}, 1)),
        (PayloadError, "NaN", ("b", 4, {"w": np.array([np.nan, 0], np.float32)}, 1)),
        (PayloadError, "NaN", ("b", 4, {"w": np.array([0, -np.inf], np.float32)}, 1)),
        (PayloadError, "missing w", ("b", 4, {}, 1)),
        (PayloadError, "num_examples", ("b", 4, vec(1, 1), 0)),
        (PayloadError, "version", ("b", -1, vec(1, 1), 1)),
    ]
    for error, match, args in refusals:
        with pytest.raises(error, match=match):
            h.coord.submit(*args)
        assert snapshot(h) == before, match
        assert h.coord.step() is False
    assert h.push("b", 1.0, version=2).staleness == 2  # exactly max_staleness is taken


def test_concurrent_pushes_lose_nothing_and_equal_merging_in_the_accepted_order(
    tmp_path: Path, stores: list[Store]
) -> None:
    for policy in ("samples", "fedasync", "fedbuff:3"):
        check_concurrent_pushes(tmp_path / policy.replace(":", "-"), stores, policy)


def check_concurrent_pushes(run_dir: Path, stores: list[Store], policy: str) -> None:
    threads_n, per_thread = 8, 6
    h = Harness(run_dir, stores, async_policy=policy, max_updates=threads_n * per_thread)
    ids = [f"c{i}" for i in range(threads_n)]
    h.start(*ids)
    deltas = {(cid, k): vec(i + 0.25 * k, -(i + 1) / (k + 1))
              for i, cid in enumerate(ids) for k in range(per_thread)}
    barrier = threading.Barrier(threads_n + 2)
    errors: list[BaseException] = []
    reads: list[tuple[int, list[float]]] = []
    stop_reading = threading.Event()

    def pusher(cid: str) -> None:
        try:
            barrier.wait(timeout=THREAD_TIMEOUT)
            for k in range(per_thread):
                base = h.coord.poll(cid).version
                h.coord.submit(cid, base, deltas[cid, k], 1 + k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def reader() -> None:
        barrier.wait(timeout=THREAD_TIMEOUT)
        while not stop_reading.is_set():
            data, version = h.coord.model_bytes()
            reads.append((version, decode(data)["w"].tolist()))

    workers = [threading.Thread(target=pusher, args=(cid,)) for cid in ids]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in workers + readers:
        t.start()
    for t in workers:
        t.join(timeout=THREAD_TIMEOUT)
    stop_reading.set()
    for t in readers:
        t.join(timeout=THREAD_TIMEOUT)
    assert not errors, errors
    assert not any(t.is_alive() for t in workers + readers)

    merged = h.merged
    assert [m.update for m in merged] == list(range(1, threads_n * per_thread + 1))
    assert sorted((m.client_id, m.num_examples) for m in merged) == sorted(
        (cid, 1 + k) for cid in ids for k in range(per_thread))
    # Replay: merging one by one in the accepted order gives exactly the same model.
    replay = make_policy(policy)
    state = AsyncState(weights={k: v.copy() for k, v in INITIAL.items()})
    seen: dict[int, list[float]] = {0: state.weights["w"].tolist()}
    next_k = dict.fromkeys(ids, 0)
    for m in merged:
        assert m.staleness == state.version - m.base_version
        delta = deltas[m.client_id, next_k[m.client_id]]
        next_k[m.client_id] += 1
        state = replay.merge(state, delta, m.num_examples, m.staleness)
        assert m.version == state.version
        seen[state.version] = state.weights["w"].tolist()
    state = replay.flush(state)  # the stop rule flushes a partial fedbuff buffer
    seen[state.version] = state.weights["w"].tolist()
    np.testing.assert_array_equal(h.coord.weights["w"], state.weights["w"])
    assert h.coord.state.updates == threads_n * per_thread
    # Readers only ever saw whole versions, and never went backwards.
    assert reads
    for version, values in reads:
        assert values == seen[version]
    h.drain()
    assert h.coord.done


# -- stop rules, cadence ----------------------------------------------------------------


def test_max_updates_stops_the_run_and_flushes_fedbuff(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, async_policy="fedbuff:2", staleness_fn="constant",
                max_updates=3)
    h.start("a", "b")
    h.push("a", 2.0)
    h.push("b", 4.0, version=0)  # flush: + 3
    assert global_w(h.coord) == [4.0, 2.0]
    h.push("a", 6.0)  # the third: the run stops and the partial buffer is applied
    assert global_w(h.coord) == [10.0, 8.0]
    assert h.coord.state.version == 2
    assert h.coord.poll("a") == DONE
    with pytest.raises(ConflictError, match="run is over"):
        h.push("b", 1.0)
    assert not h.coord.done  # not before the last state is evaluated and saved
    h.drain()
    assert h.coord.done and h.coord.status()["state"] == "done"
    assert [(r["update"], r["version"]) for r in h.coord.history] == [(1, 0), (2, 1), (3, 2)]
    latest = h.store.latest_checkpoint()
    assert latest is not None and latest[0] == 3
    assert latest[1]["w"].tolist() == [10.0, 8.0]


def test_max_seconds_stops_the_run_on_the_fake_clock(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, max_updates=None, max_seconds=30.0)
    h.start("a")
    h.clock.advance(100.0)  # waiting for the second client does not count
    h.start("b")
    assert h.coord.seconds_to_deadline() == pytest.approx(30.0)
    h.push("a", 1.0)
    h.clock.advance(29.0)
    assert h.coord.seconds_to_deadline() == pytest.approx(1.0)
    assert h.coord.step() is True  # evaluates update 1
    assert h.coord.step() is False
    h.clock.advance(1.0)
    assert h.coord.step() is True
    assert h.coord.done
    assert h.coord.poll("a") == DONE
    assert h.coord.seconds_to_deadline() is None
    assert len(h.coord.history) == 1  # update 1 was evaluated already: not twice
    assert h.coord.seconds() == pytest.approx(30.0)
    latest = h.store.latest_checkpoint()
    assert latest is not None and latest[0] == 1


def test_eval_and_checkpoint_cadence(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, eval_every=2, save_every=3, max_updates=7)
    h.start("a", "b")
    saved: list[int] = []
    for _ in range(7):
        h.push("a", 1.0)
        h.drain()
        latest = h.store.latest_checkpoint()
        if latest is not None and latest[0] not in saved:
            saved.append(latest[0])
    assert [r["update"] for r in h.coord.history] == [2, 4, 6, 7]  # 7: the last state
    assert saved == [3, 6, 7]
    meta = h.store.get_meta("async_state")
    assert (meta["updates"], meta["version"], meta["absorbed_examples"]) == (7, 7, 7)


def test_fedbuff_checkpoints_wait_for_an_empty_buffer(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, async_policy="fedbuff:2", save_every=3, max_updates=20)
    h.start("a", "b")
    for _ in range(3):
        h.push("a", 1.0)
    h.drain()
    assert h.store.latest_checkpoint() is None  # update 3 sits in the buffer
    h.push("a", 1.0)  # the flush at update 4
    h.drain()
    latest = h.store.latest_checkpoint()
    assert latest is not None and latest[0] == 4


def test_evaluation_runs_outside_the_lock(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores)
    h.start("a", "b")
    seen: list[Any] = []
    evaluate = h.coord.evaluator

    def evaluator_that_looks(weights: Weights) -> Any:
        if not seen:  # update 1 is evaluated while b polls, pushes and pulls
            seen.append(h.coord.poll("b").action)
            seen.append(h.push("b", 1.0).update)
            seen.append(h.coord.model_bytes()[1])
        return evaluate(weights)

    h.coord.evaluator = evaluator_that_looks
    h.push("a", 1.0)
    assert h.coord.step() is True
    assert seen == ["train", 2, 2]
    assert [r["update"] for r in h.coord.history] == [1, 2]


# -- resume -----------------------------------------------------------------------------


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path, stores: list[Store]) -> None:
    # A process that checkpoints every 2 updates is killed after update 5.
    crashed = Harness(tmp_path, stores, save_every=2, max_updates=6)
    crashed.start("a", "b")
    crashed.clock.advance(1.0)
    for value in (1.0, 2.0, 3.0, 4.0, 5.0):
        crashed.coord.poll("a")  # a's task counter is 4 at checkpoint 4
        crashed.push("a", value, n=10)
        crashed.drain()
    history = list(crashed.coord.history)
    assert [r["update"] for r in history] == [1, 2, 3, 4, 5]
    at_four = next(r for r in history if r["update"] == 4)
    weights_at_four = decode(crashed.store._checkpoint_path(4).read_bytes())["w"].tolist()
    del crashed

    again = Harness(tmp_path, stores, save_every=2, max_updates=6)
    assert (again.coord.state.updates, again.coord.state.version) == (4, 4)
    assert again.coord.state.absorbed_examples == 40
    assert global_w(again.coord) == weights_at_four
    assert [r["update"] for r in again.coord.history] == [1, 2, 3, 4]  # update 5 redone
    assert again.coord.history[-1] == at_four
    assert again.coord.seconds() == pytest.approx(1.0)
    assert again.coord.poll("a") == WAIT  # waits for min_clients again
    again.coord.poll("b")
    # Task counters continue from the checkpoint: the fifth task is handed out again.
    assert again.coord.poll("a") == AsyncTask("train", 4, derive_seed("async-task", 7, "a", 5),
                                              "u5.a", TrainConfig().as_dict())
    again.push("a", 9.0, n=10)
    again.push("a", 9.0, n=10)
    again.drain()
    assert again.coord.done
    assert [r["update"] for r in again.coord.history] == [1, 2, 3, 4, 5, 6]
    assert [r["update"] for r in again.store.rounds()] == [1, 2, 3, 4, 5, 6]

    done = Harness(tmp_path, stores, save_every=2, max_updates=6)
    assert done.coord.done and done.coord.poll("a") == DONE
    assert done.coord.step() is False
