"""SyncCoordinator driven directly: a fake clock, a real Store in tmp, toy two-number weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlearn.config import ServerConfig, TrainConfig, build_strategy
from fedlearn.errors import AuthError, ConflictError, PayloadError
from fedlearn.seeding import task_seed
from fedlearn.server.coordinator import DONE, WAIT, SyncCoordinator, Task
from fedlearn.server.store import Store
from fedlearn.types import EvalResult, Weights


def train_task(round_: int, version: int, cid: str, attempt: int = 0) -> Task:
    """The train task a client gets in round ``round_`` (seed of run seed 7)."""
    return Task("train", round_, version, task_seed(7, round_, cid), f"r{round_}.{attempt}.{cid}",
                TrainConfig().as_dict())


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Evaluator:
    """accuracy = w[0], loss = w[1] of the weights evaluated; remembers every call."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def __call__(self, weights: Weights) -> EvalResult:
        values = [float(x) for x in weights["w"]]
        self.seen.append(values)
        return EvalResult({"accuracy": values[0], "loss": values[1]}, 1)


def vec(a: float, b: float) -> Weights:
    return {"w": np.array([a, b], np.float32)}


INITIAL = vec(1.0, -1.0)


class Harness:
    """One coordinator with its store, clock and evaluator."""

    def __init__(
        self, run_dir: Path, stores: list[Store], clock: FakeClock | None = None, **config: Any
    ) -> None:
        # pickup_timeout: these tests move the clock without polls; test_hardening covers it.
        settings: dict[str, Any] = {"rounds": 3, "min_clients": 2, "round_timeout": 10.0,
                                    "seed": 7, "pickup_timeout": 1e9}
        settings.update(config)
        self.config = ServerConfig(**settings)
        self.store = Store(run_dir)
        stores.append(self.store)
        self.clock = clock or FakeClock()
        self.evaluator = Evaluator()
        self.records: list[dict[str, Any]] = []
        self.coord = SyncCoordinator(
            self.config, INITIAL, strategy=build_strategy(self.config), store=self.store,
            evaluator=self.evaluator,
            clock=self.clock, on_round=self.records.append,
        )

    def register(self, *ids: str) -> dict[str, str]:
        return {cid: self.coord.register(cid, 10) for cid in ids}

    def sampled(self) -> list[str]:
        return list(self.coord.status()["sampled"])

    def finish_round(self, delta: float = 1.0) -> None:
        """Every sampled client sends ``delta`` everywhere with one example; then step."""
        number = self.coord.status()["round"]
        for cid in self.sampled():
            assert self.coord.poll(cid).action == "train"
            self.coord.submit(cid, number, vec(delta, delta), 1)
        assert self.coord.step()


def global_w(coord: SyncCoordinator) -> list[float]:
    return [float(x) for x in coord.weights["w"]]


def snapshot(coord: SyncCoordinator) -> tuple[Any, ...]:
    s = coord.status()
    return (global_w(coord), s["state"], s["round"], s["version"], s["received"], s["sampled"],
            len(coord.history))


# -- starting rounds, tasks and seeds -----------------------------------------------


def test_no_round_before_min_clients_then_step_starts_round_one(
    tmp_path: Path, stores: list[Store]
) -> None:
    h = Harness(tmp_path, stores, min_clients=2)
    assert h.coord.step() is False  # nobody there
    h.register("a")
    assert h.coord.step() is False
    assert h.coord.poll("a") == WAIT
    assert h.coord.status()["state"] == "waiting"
    assert h.coord.seconds_to_deadline() is None
    h.register("b")
    assert h.coord.poll("a") == WAIT  # registered, but nothing starts without step()
    assert h.coord.step() is True
    assert h.coord.status()["state"] == "training"
    assert h.coord.status()["round"] == 1
    assert h.coord.seconds_to_deadline() == pytest.approx(10.0)
    task_a, task_b = h.coord.poll("a"), h.coord.poll("b")
    assert task_a == train_task(1, 0, "a")
    assert task_b == train_task(1, 0, "b")
    assert task_a.to_json() == {"action": "train", "round": 1, "version": 0,
                                "seed": task_seed(7, 1, "a"), "task_id": "r1.0.a",
                                "config": TrainConfig().as_dict()}
    assert WAIT.to_json() == {"action": "wait"}
    assert task_a.seed != task_b.seed
    assert h.coord.step() is False  # nothing more is due


def test_seeds_are_stable_and_differ_per_client_and_round(
    tmp_path: Path, stores: list[Store]
) -> None:
    one = Harness(tmp_path / "one", stores)
    two = Harness(tmp_path / "two", stores)
    for h in (one, two):
        h.register("a", "b")
        h.coord.step()
    assert one.coord.poll("a") == two.coord.poll("a")
    assert one.coord.poll("a").seed == one.coord.poll("a").seed
    assert one.coord.poll("a").seed == task_seed(7, 1, "a")
    assert task_seed(7, 1, "a") != task_seed(7, 2, "a") != task_seed(8, 2, "a")
    one.finish_round()
    assert one.coord.poll("a") == train_task(2, 1, "a")


def test_resumed_run_waits_for_min_clients_to_poll(tmp_path: Path, stores: list[Store]) -> None:
    first = Harness(tmp_path, stores)
    first.register("a", "b")
    first.coord.step()
    first.finish_round()
    again = Harness(tmp_path, stores)  # a new process: a and b known but not yet seen
    assert again.coord.status()["registered"] == 2
    assert again.coord.status()["active"] == 0
    assert again.coord.step() is False
    assert again.coord.poll("a") == WAIT
    assert again.coord.step() is False  # only one of min_clients=2 polled
    assert again.coord.poll("b") == WAIT
    assert again.coord.step() is True
    assert again.coord.poll("a") == train_task(2, 1, "a")


def test_only_sampled_clients_get_train(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, min_clients=4, fraction=0.5)
    h.register("a", "b", "c", "d")
    h.coord.step()
    sampled = h.sampled()
    assert len(sampled) == 2  # ceil(0.5 * 4)
    for cid in "abcd":
        task = h.coord.poll(cid)
        if cid in sampled:
            assert task == train_task(1, 0, cid)
        else:
            assert task == WAIT


def run_sampling(run_dir: Path, stores: list[Store], rounds: int, **config: Any) -> list[list[str]]:
    h = Harness(run_dir, stores, rounds=rounds, min_clients=4, **config)
    h.register("a", "b", "c", "d")
    h.coord.step()
    seen = []
    for _ in range(rounds):
        seen.append(h.sampled())
        h.finish_round()
    assert h.coord.done
    return seen


def test_sampling_is_deterministic_per_seed_and_round(tmp_path: Path, stores: list[Store]) -> None:
    first = run_sampling(tmp_path / "1", stores, 6, fraction=0.5)
    second = run_sampling(tmp_path / "2", stores, 6, fraction=0.5)
    assert first == second
    assert all(len(s) == 2 for s in first)
    assert len({tuple(s) for s in first}) > 1  # not the same pair every round
    other_seed = run_sampling(tmp_path / "3", stores, 6, fraction=0.5, seed=8)
    assert other_seed != first


def test_min_results_raises_the_sample(tmp_path: Path, stores: list[Store]) -> None:
    seen = run_sampling(tmp_path, stores, 2, fraction=0.25, min_results=3)
    assert [len(s) for s in seen] == [3, 3]  # ceil(0.25 * 4) = 1, raised to 3


# -- aggregation ----------------------------------------------------------------------


def test_fedavg_by_hand_and_the_round_record(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores)
    h.register("a", "b")
    assert h.coord.step()
    h.clock.advance(2.0)
    h.coord.submit("a", 1, vec(1, 1), 1, {"train_loss": 0.5})
    assert h.coord.step() is False  # b has not reported and the deadline is far
    assert h.evaluator.seen == []
    h.clock.advance(3.0)
    h.coord.submit("b", 1, vec(4, 4), 3, {"train_loss": 0.1})
    assert global_w(h.coord) == [1.0, -1.0]  # nothing applied before step()
    assert h.coord.step() is True  # closes as soon as all sampled clients reported
    # (1*1 + 4*3) / 4 = 3.25 added to [1, -1]
    assert global_w(h.coord) == [4.25, 2.25]
    assert h.evaluator.seen == [[4.25, 2.25]]
    record = h.coord.history[0]
    assert record["round"] == 1
    assert record["accuracy"] == pytest.approx(4.25)
    assert record["loss"] == pytest.approx(2.25)
    assert record["seconds"] == pytest.approx(5.0)
    assert (record["clients"], record["sampled"], record["examples"], record["attempts"]) == (
        2, 2, 4, 1)
    assert record["train_loss"] == pytest.approx((0.5 * 1 + 0.1 * 3) / 4)
    assert h.records == [record]
    assert h.store.rounds() == [record]
    latest = h.store.latest_checkpoint()
    assert latest is not None
    assert latest[0] == 1
    np.testing.assert_array_equal(latest[1]["model/w"], np.array([4.25, 2.25], np.float32))
    status = h.coord.status()
    assert status["version"] == 1
    assert status["round"] == 2  # the next round started at once
    assert status["history"] == [{"round": 1, "accuracy": 4.25, "loss": 2.25}]
    assert h.coord.poll("a") == train_task(2, 1, "a")
    data, version = h.coord.model_bytes()
    assert version == 1
    from fedlearn.weights import decode

    assert decode(data)["w"].tolist() == [4.25, 2.25]


def test_timeout_drops_silent_client_and_aggregates_what_arrived(
    tmp_path: Path, stores: list[Store]
) -> None:
    h = Harness(tmp_path, stores, min_clients=3, min_results=2)
    h.register("a", "b", "c")
    h.coord.step()
    h.coord.submit("a", 1, vec(2, 2), 1)
    h.coord.submit("b", 1, vec(4, 4), 1)
    h.clock.advance(9.9)
    assert h.coord.step() is False
    assert h.coord.seconds_to_deadline() == pytest.approx(0.1)
    h.clock.advance(0.1)  # the deadline: c never reported
    assert h.coord.step() is True
    assert global_w(h.coord) == [4.0, 2.0]  # [1, -1] + (2 + 4) / 2
    record = h.coord.history[0]
    assert (record["clients"], record["sampled"], record["examples"]) == (2, 3, 2)
    assert record["seconds"] == pytest.approx(10.0)
    status = h.coord.status()
    assert status["active"] == 2
    assert status["sampled"] == ["a", "b"]  # round 2 goes on without the dropped client
    assert h.coord.poll("c") == WAIT  # c is back, for the next round
    assert h.coord.status()["active"] == 3


def test_a_client_that_withdraws_is_not_waited_for(tmp_path: Path, stores: list[Store]) -> None:
    """A client whose update will not come (its own checks refused it) withdraws its task:
    the round closes as soon as the others have sent, not at the deadline."""
    h = Harness(tmp_path, stores, min_clients=3, min_results=2)
    h.register("a", "b", "c")
    h.coord.step()
    for cid in "abc":
        assert h.coord.poll(cid).action == "train"
    with pytest.raises(ConflictError, match="not this client's open task"):
        h.coord.withdraw("c", "r1.0.a")  # another client's task
    h.coord.submit("a", 1, vec(2, 2), 1)
    with pytest.raises(ConflictError, match="can no longer withdraw"):
        h.coord.withdraw("a", "r1.0.a")  # it took part already
    h.coord.withdraw("c", "r1.0.c", "NaN in its update")
    h.coord.withdraw("c", "r1.0.c")  # a retry changes nothing
    assert h.coord.poll("c") == WAIT
    h.coord.submit("b", 1, vec(4, 4), 1)
    assert h.coord.step() is True  # no clock movement: the round is complete
    record = h.coord.history[0]
    assert (record["clients"], record["sampled"], record["withdrawn"]) == (2, 3, 1)
    assert record["seconds"] == pytest.approx(0.0)
    assert global_w(h.coord) == [4.0, 2.0]
    assert not h.coord.clients["c"].dropped  # it is sampled again next round
    assert h.coord.poll("c").action in ("train", "wait")


def test_too_few_results_runs_the_round_again(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, min_clients=3, min_results=2)
    h.register("a", "b", "c")
    h.coord.step()
    h.coord.submit("a", 1, vec(2, 2), 1)
    h.clock.advance(10.0)
    assert h.coord.step() is True
    # only one result of the two needed: nothing applied, round 1 again
    assert global_w(h.coord) == [1.0, -1.0]
    assert h.coord.history == [] and h.store.rounds() == []
    assert h.evaluator.seen == []
    assert h.store.latest_checkpoint() is None
    status = h.coord.status()
    assert status["version"] == 0
    # b and c were dropped, so one client is left: not enough to make a round of two
    assert status["state"] == "waiting"
    assert status["sampled"] == []
    assert h.coord.poll("a") == WAIT
    h.clock.advance(100.0)
    assert h.coord.step() is False
    assert h.coord.poll("b") == WAIT  # b is back: a second attempt at round 1 starts
    assert h.coord.step() is True
    assert h.coord.status()["round"] == 1
    assert h.coord.status()["state"] == "training"
    assert sorted(h.sampled()) == ["a", "b"]
    h.coord.submit("a", 1, vec(2, 2), 1)
    h.coord.submit("b", 1, vec(4, 4), 3)
    assert h.coord.step() is True
    assert global_w(h.coord) == [4.5, 2.5]  # [1, -1] + (2 + 12) / 4
    assert h.coord.history[0]["round"] == 1
    assert h.coord.history[0]["attempts"] == 2


def test_rerun_with_enough_clients_left_samples_again(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, min_clients=3, min_results=1, fraction=1.0)
    h.register("a", "b", "c")
    h.coord.step()
    h.clock.advance(10.0)  # nobody reported: 0 < min_results
    assert h.coord.step() is True
    status = h.coord.status()
    assert (status["version"], status["state"], status["sampled"]) == (0, "waiting", [])
    assert h.coord.poll("c") == WAIT
    assert h.coord.step() is True
    assert h.sampled() == ["c"]
    h.coord.submit("c", 1, vec(1, 1), 1)
    assert h.coord.step() is True
    assert global_w(h.coord) == [2.0, 0.0]
    assert h.coord.history[0]["attempts"] == 2


def test_rerun_starts_at_once_when_enough_clients_are_left(
    tmp_path: Path, stores: list[Store]
) -> None:
    h = Harness(tmp_path, stores, min_clients=4, fraction=0.5, min_results=1)
    h.register("a", "b", "c", "d")
    h.coord.step()
    silent = h.sampled()
    h.clock.advance(10.0)  # neither sampled client reported
    assert h.coord.step() is True
    status = h.coord.status()
    assert (status["round"], status["version"], status["state"]) == (1, 0, "training")
    assert status["active"] == 2
    rerun = h.sampled()
    # sampled anew among the two left: ceil(0.5 * 2) = 1
    assert len(rerun) == 1 and not set(rerun) & set(silent)
    assert h.coord.seconds_to_deadline() == pytest.approx(10.0)  # a fresh deadline
    for cid in silent:
        assert h.coord.poll(cid) == WAIT
        with pytest.raises(ConflictError, match="not sampled"):
            h.coord.submit(cid, 1, vec(1, 1), 1)
    for cid in rerun:
        assert h.coord.poll(cid) == train_task(1, 0, cid, attempt=1)
        h.coord.submit(cid, 1, vec(1, 1), 1)
    assert h.coord.step() is True
    assert global_w(h.coord) == [2.0, 0.0]
    assert h.coord.history[0]["attempts"] == 2
    assert h.coord.history[0]["round"] == 1


# -- refusals -------------------------------------------------------------------------


def test_refused_updates_change_nothing(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, min_clients=4, fraction=0.5)
    h.register("a", "b", "c", "d")
    h.coord.step()
    h.finish_round(delta=1.0)  # round 1 closed: global [2, 0]
    sampled = h.sampled()
    assert h.coord.status()["round"] == 2
    outsider = next(cid for cid in "abcd" if cid not in sampled)
    first = sampled[0]
    h.coord.submit(first, 2, vec(3, 3), 1)  # accepted
    before = snapshot(h.coord)
    assert before[0] == [2.0, 0.0]

    refusals: list[tuple[type[Exception], str, tuple[Any, ...]]] = [
        (ConflictError, "not open", (first, 1, vec(1, 1), 1)),  # closed round
        (ConflictError, "not open", (sampled[1], 1, vec(1, 1), 1)),
        (ConflictError, "not open", (sampled[1], 3, vec(1, 1), 1)),  # future round
        (ConflictError, "not sampled", (outsider, 2, vec(1, 1), 1)),
        (ConflictError, "already sent", (first, 2, vec(1, 1), 1)),  # duplicate
        (PayloadError, "shape", (sampled[1], 2, {"w": np.zeros(3, np.float32)}, 1)),
        (PayloadError, "dtype", (sampled[1], 2, {"w": np.zeros(2, np.float64)}, 1)),
        (PayloadError, "NaN", (sampled[1], 2, {"w": np.array([np.nan, 0], np.float32)}, 1)),
        (PayloadError, "NaN", (sampled[1], 2, {"w": np.array([np.inf, 0], np.float32)}, 1)),
        (PayloadError, "missing w", (sampled[1], 2, {}, 1)),
        (PayloadError, "unexpected v", (sampled[1], 2, {**vec(1, 1), "v": vec(1, 1)["w"]}, 1)),
        (PayloadError, "num_examples", (sampled[1], 2, vec(1, 1), 0)),
        (PayloadError, "num_examples", (sampled[1], 2, vec(1, 1), -5)),
    ]
    for error, match, args in refusals:
        with pytest.raises(error, match=match):
            h.coord.submit(*args)
        assert snapshot(h.coord) == before, (error, match)
        assert h.coord.step() is False
    # the sampled client whose updates were all refused can still send its real one
    h.coord.submit(sampled[1], 2, vec(5, 5), 1)
    assert h.coord.step() is True
    assert global_w(h.coord) == [6.0, 4.0]  # [2, 0] + (3 + 5) / 2


def test_updates_and_polls_while_a_round_closes(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, rounds=2)
    h.register("a", "b")
    h.coord.step()
    seen: list[Any] = []
    evaluate = h.coord.evaluator

    def evaluator_that_looks(weights: Weights) -> EvalResult:
        # round 1 is evaluated outside the lock while round 2 is already open
        seen.append(h.coord.poll("a"))
        with pytest.raises(ConflictError, match="open round is 2"):
            h.coord.submit("a", 1, vec(1, 1), 1)
        seen.append(h.coord.step())
        seen.append(h.coord.seconds_to_deadline() is not None)
        seen.append(len(h.coord.history))
        return evaluate(weights)

    h.coord.evaluator = evaluator_that_looks
    h.coord.submit("a", 1, vec(1, 1), 1)
    h.coord.submit("b", 1, vec(3, 3), 1)
    assert h.coord.step() is True
    assert seen == [train_task(2, 1, "a"), False, True, 0]
    assert global_w(h.coord) == [3.0, 1.0]
    assert [r["round"] for r in h.coord.history] == [1]
    assert h.coord.poll("a") == train_task(2, 1, "a")


def test_unknown_credential_is_refused(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores)
    creds = h.register("a")
    assert h.coord.authenticate(creds["a"]) == "a"
    with pytest.raises(AuthError, match="register again"):
        h.coord.authenticate("not-a-credential")
    with pytest.raises(AuthError):
        h.coord.authenticate("")
    # The join token alone cannot take over a registered id ...
    with pytest.raises(ConflictError, match="already registered"):
        h.coord.register("a")
    with pytest.raises(ConflictError, match="already registered"):
        h.coord.register("a", credential="guessed")
    assert h.coord.authenticate(creds["a"]) == "a"
    # ... its own credential can: re-registering replaces the old credential.
    new = h.coord.register("a", credential=creds["a"])
    assert h.coord.authenticate(new) == "a"
    with pytest.raises(AuthError):
        h.coord.authenticate(creds["a"])
    with pytest.raises(PayloadError):
        h.coord.register("")


def test_run_ends_after_rounds_and_refuses_later_updates(
    tmp_path: Path, stores: list[Store]
) -> None:
    h = Harness(tmp_path, stores, rounds=2)
    h.register("a", "b")
    h.coord.step()
    h.finish_round(1.0)
    h.finish_round(2.0)
    assert h.coord.done
    assert h.coord.status()["state"] == "done"
    assert [r["round"] for r in h.coord.history] == [1, 2]
    assert global_w(h.coord) == [4.0, 2.0]
    assert h.coord.poll("a") == DONE and h.coord.poll("b") == DONE
    assert DONE.to_json() == {"action": "done"}
    assert h.coord.step() is False
    assert h.coord.seconds_to_deadline() is None
    before = snapshot(h.coord)
    for number in (2, 3):
        with pytest.raises(ConflictError, match="run is over"):
            h.coord.submit("a", number, vec(1, 1), 1)
    assert snapshot(h.coord) == before
    latest = h.store.latest_checkpoint()
    assert latest is not None and latest[0] == 2  # the last round is always saved
    assert h.evaluator.seen == [[2.0, 0.0], [4.0, 2.0]]


# -- resume ---------------------------------------------------------------------------


def test_resume_continues_from_the_checkpoint(tmp_path: Path, stores: list[Store]) -> None:
    first = Harness(tmp_path, stores, rounds=4)
    creds = first.register("a", "b")
    first.coord.step()
    first.finish_round(1.0)
    first.finish_round(1.0)
    history = list(first.coord.history)
    del first

    again = Harness(tmp_path, stores, rounds=4)
    assert again.coord.state.version == 2
    assert global_w(again.coord) == [3.0, 1.0]
    assert again.coord.history == history
    assert [r["round"] for r in again.coord.history] == [1, 2]
    assert again.coord.status()["state"] == "waiting"
    assert again.coord.authenticate(creds["a"]) == "a"  # credentials survive the restart
    assert again.coord.authenticate(creds["b"]) == "b"
    for cid in "ab":
        again.coord.poll(cid)
    assert again.coord.step()
    assert again.coord.poll("a") == train_task(3, 2, "a")
    again.finish_round(1.0)
    again.finish_round(1.0)
    assert again.coord.done
    assert [r["round"] for r in again.coord.history] == [1, 2, 3, 4]
    assert [r["round"] for r in again.store.rounds()] == [1, 2, 3, 4]
    assert global_w(again.coord) == [5.0, 3.0]


def test_resume_redoes_rounds_after_the_last_checkpoint(
    tmp_path: Path, stores: list[Store]
) -> None:
    first = Harness(tmp_path, stores, rounds=4, save_every=2)
    first.register("a", "b")
    first.coord.step()
    for _ in range(3):
        first.finish_round(1.0)
    assert [r["round"] for r in first.store.rounds()] == [1, 2, 3]
    assert global_w(first.coord) == [4.0, 2.0]

    again = Harness(tmp_path, stores, rounds=4, save_every=2)
    assert again.coord.state.version == 2
    assert global_w(again.coord) == [3.0, 1.0]  # the checkpoint of round 2
    assert [r["round"] for r in again.coord.history] == [1, 2]
    assert [r["round"] for r in again.store.rounds()] == [1, 2]  # round 3 forgotten
    for cid in "ab":
        again.coord.poll(cid)
    again.coord.step()
    assert again.coord.status()["round"] == 3
    again.finish_round(2.0)  # round 3 redone, with other deltas
    assert [r["round"] for r in again.coord.history] == [1, 2, 3]
    assert [r["round"] for r in again.store.rounds()] == [1, 2, 3]
    assert again.coord.history[2]["accuracy"] == pytest.approx(5.0)
    assert global_w(again.coord) == [5.0, 3.0]


def test_resume_before_any_checkpoint_starts_over(tmp_path: Path, stores: list[Store]) -> None:
    first = Harness(tmp_path, stores, rounds=4, save_every=2)
    first.register("a", "b")
    first.coord.step()
    first.finish_round(1.0)  # round 1 recorded, not checkpointed
    assert first.store.latest_checkpoint() is None
    again = Harness(tmp_path, stores, rounds=4, save_every=2)
    assert again.coord.state.version == 0
    assert global_w(again.coord) == [1.0, -1.0]
    assert again.coord.history == []
    assert again.store.rounds() == []
    for cid in "ab":
        again.coord.poll(cid)
    again.coord.step()
    again.finish_round(1.0)
    assert [r["round"] for r in again.coord.history] == [1]


def test_resume_of_a_finished_run_is_done(tmp_path: Path, stores: list[Store]) -> None:
    first = Harness(tmp_path, stores, rounds=1)
    first.register("a", "b")
    first.coord.step()
    first.finish_round(1.0)
    assert first.coord.done
    again = Harness(tmp_path, stores, rounds=1)
    assert again.coord.done
    assert again.coord.poll("a") == DONE
    assert again.coord.step() is False
    assert global_w(again.coord) == [2.0, 0.0]
