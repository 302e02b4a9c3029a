"""The client's async loop against an in-memory fake server, on tiny synthetic data;
and the async side of RemoteServer against httpx.MockTransport."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np
import pytest

from fedlearn.client.remote import (
    Registration,
    RemoteServer,
    RetriesExhausted,
    ServerUnavailable,
    Task,
)
from fedlearn.client.worker import WorkerSummary, run_worker
from fedlearn.config import TrainConfig
from fedlearn.errors import ConflictError, RemoteError
from fedlearn.models import build_model, get_weights
from fedlearn.training import Shard, Trainer
from fedlearn.types import Weights
from fedlearn.weights import add, decode
from tests.unit.test_client_remote import registered, weights
from tests.unit.test_client_worker import CLASSES, SHAPE, TASK, TRAIN, client_part, config

DOWN = ServerUnavailable("connection refused.", url="http://fl.test")


class FakeAsyncServer:
    """An async server: train tasks with fresh seeds, and every push merged whole.

    ``errors[method]`` lists exceptions raised (one per call; None: that call
    goes through) before the method behaves normally; ``tasks`` is how many
    train tasks to hand out before done.
    """

    def __init__(self, tasks: int, *, config: dict[str, Any] | None = None) -> None:
        self.tasks = tasks
        self.config = config  # sent with each task (as an async server does)
        self.version = 0
        self.weights = get_weights(build_model("mlp", SHAPE, CLASSES, seed=1))
        self.errors: dict[str, list[Exception | None]] = {}
        self.calls: list[str] = []
        self.seeds: list[int] = []
        self.pushes: list[tuple[int, Weights, int]] = []
        self.task_ids: list[str | None] = []
        self.metrics: list[dict[str, float]] = []

    def _enter(self, method: str) -> None:
        self.calls.append(method)
        queued = self.errors.get(method)
        if queued:
            exc = queued.pop(0)
            if exc is not None:
                raise exc

    def register(
        self, client_id: str, num_examples: int | None, *,
        num_test_examples: int | None = None, task: Mapping[str, Any] | None = None,
        credential: str | None = None, claim: str | None = None,
    ) -> Registration:
        self._enter("register")
        return Registration(client_id=client_id, credential="cred", run_id="run-1",
                            mode="async", dataset="synthetic", model="mlp", rounds=0,
                            task="synthetic", config=TRAIN.as_dict())

    def next_task(self, wait: float) -> Task:
        self._enter("next_task")
        if self.tasks <= 0:
            return Task("done")
        self.tasks -= 1
        self.seeds.append(100 + len(self.seeds))
        return Task("train", version=self.version, seed=self.seeds[-1],
                    task_id=f"u{len(self.seeds)}.c1", config=self.config)

    def get_model(self) -> tuple[Weights, int]:
        self._enter("get_model")
        return {k: v.copy() for k, v in self.weights.items()}, self.version

    def push_update(
        self, version: int, delta: Weights, num_examples: int, metrics: Mapping[str, float],
        task_id: str | None = None,
    ) -> dict[str, Any]:
        self._enter("push_update")
        self.pushes.append((version, delta, num_examples))
        self.task_ids.append(task_id)
        self.metrics.append(dict(metrics))
        self.weights = add(self.weights, delta)
        self.version += 1
        return {"accepted": True, "update": len(self.pushes),
                "staleness": self.version - 1 - version}

    def submit_update(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("an async client must not send sync updates")

    def submit_evaluation(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("an async run hands out no evaluations")

    def status(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def train(start: Weights, seed: int, cfg: TrainConfig = TRAIN) -> Weights:
    """The weights after one local training of client 0 of 2 from ``start`` with ``seed``."""
    result = Trainer(TASK, seed=0).fit(start, Shard.of(client_part(0, 2)), cfg, seed=seed)
    return add(start, result.delta)


def go(fake: FakeAsyncServer, **overrides: Any) -> tuple[WorkerSummary, list[str]]:
    lines: list[str] = []
    values = {"max_retries": 1, **overrides}
    summary = run_worker(config(**values), fake, log=lines.append, sleep=lambda s: None)
    return summary, lines


def close(a: Weights, b: Weights) -> None:
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_pulls_trains_and_pushes_with_the_base_version_until_done() -> None:
    fake = FakeAsyncServer(tasks=3)
    start = {k: v.copy() for k, v in fake.weights.items()}
    summary, lines = go(fake)
    assert summary == WorkerSummary(3, 0, 2, "async", 0)
    assert [(v, n) for v, _, n in fake.pushes] == [(0, 24), (1, 24), (2, 24)]
    assert len(set(fake.seeds)) == 3  # each local training has its own seed
    close(fake.pushes[0][1], {k: train(start, 100)[k] - start[k] for k in start})
    assert fake.calls.count("get_model") == 3
    assert fake.task_ids == ["u1.c1", "u2.c1", "u3.c1"]  # each push names its task
    assert all(set(m) >= {"train_loss", "train_accuracy", "seconds"} for m in fake.metrics)
    assert sum("merged as update" in line for line in lines) == 3


def test_trains_with_the_tasks_config_under_the_clients_flags() -> None:
    fake = FakeAsyncServer(tasks=1, config={"epochs": 2, "lr": 0.01})
    start = {k: v.copy() for k, v in fake.weights.items()}
    go(fake, overrides={"lr": 0.1})
    used = TrainConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.1)
    close(fake.pushes[0][1], {k: train(start, 100, used)[k] - start[k] for k in start})


def test_cannot_pull_so_trains_on_the_weights_it_has_with_the_same_base() -> None:
    fake = FakeAsyncServer(tasks=2)
    start = {k: v.copy() for k, v in fake.weights.items()}
    fake.errors["get_model"] = [None, DOWN, DOWN]  # max_retries=1: the second pull gives up
    summary, lines = go(fake)
    assert summary.rounds_trained == 2 and summary.went_offline == 1
    first = train(start, 100)
    second = train(first, 101)  # from its own weights, not the server's
    assert [v for v, _, _ in fake.pushes] == [0, 0]  # the same base version
    close(fake.pushes[1][1], {k: second[k] - first[k] for k in start})
    assert any("cannot fetch the model" in line for line in lines)


def test_cannot_push_so_keeps_training_and_sends_the_accumulated_delta() -> None:
    fake = FakeAsyncServer(tasks=2)
    start = {k: v.copy() for k, v in fake.weights.items()}
    fake.errors["push_update"] = [DOWN, DOWN]  # max_retries=1: the first push gives up
    summary, lines = go(fake)
    assert summary.rounds_trained == 1 and summary.went_offline == 1
    assert fake.calls.count("get_model") == 1  # no pull while work is unsent
    assert len(fake.pushes) == 1
    version, delta, n = fake.pushes[0]
    assert (version, n) == (0, 48)  # the true base version, both trainings' examples
    both = train(train(start, 100), 101)
    close(delta, {k: both[k] - start[k] for k in start})
    assert any("cannot send our update" in line for line in lines)


def test_cannot_poll_so_trains_offline_with_a_new_seed() -> None:
    fake = FakeAsyncServer(tasks=2)
    fake.errors["next_task"] = [None, DOWN, DOWN]  # the second poll gives up
    summary, _ = go(fake)
    assert summary.went_offline == 1
    assert len(fake.pushes) == 3  # two tasks and one offline training
    # The offline one is measured from its own weights, with its old base version.
    assert [v for v, _, _ in fake.pushes] == [0, 0, 2]
    # It had no new task, so it names the last task it was given.
    assert fake.task_ids == ["u1.c1", "u1.c1", "u2.c1"]
    deltas = [d for _, d, _ in fake.pushes]
    assert not np.allclose(deltas[0]["fc1.weight"], deltas[1]["fc1.weight"])


def test_gives_up_after_max_offline_or_without_any_model() -> None:
    fake = FakeAsyncServer(tasks=10)
    fake.errors["push_update"] = [DOWN] * 20
    with pytest.raises(RetriesExhausted):
        go(fake, max_offline=2)
    assert fake.calls.count("push_update") == 6  # 3 pushes of 2 tries each
    never = FakeAsyncServer(tasks=1)
    never.errors["get_model"] = [DOWN, DOWN]
    with pytest.raises(RemoteError, match="reach"):
        go(never)


def test_a_refused_update_is_dropped_and_the_model_pulled_again() -> None:
    fake = FakeAsyncServer(tasks=2)
    fake.errors["push_update"] = [ConflictError("the update is 9 versions stale.")]
    summary, lines = go(fake)
    assert summary == WorkerSummary(1, 1, 0, "async", 0)
    assert fake.calls.count("get_model") == 2
    assert fake.pushes[0][2] == 24  # the refused examples are not sent again
    assert any("refused" in line and "stale" in line for line in lines)


# -- RemoteServer ---------------------------------------------------------------------


def test_push_update_sends_the_version_and_the_run_id() -> None:
    seen: list[httpx.Request] = []
    answer = {"accepted": True, "version": 4, "update": 9, "staleness": 2}
    remote = registered(lambda r: httpx.Response(200, json=answer), seen)
    assert remote.push_update(4, weights(), 64, {"train_loss": 0.5}, "u3.c1") == answer
    req = seen[-1]
    assert req.method == "POST" and req.url.path == "/api/update"
    assert dict(req.url.params) == {"version": "4", "num_examples": "64",
                                    "metrics": '{"train_loss":0.5}', "task_id": "u3.c1"}
    assert req.headers["x-fedlearn-run"] == "run-7"
    assert set(decode(req.content)) == set(weights())
    remote.push_update(5, weights(), 1, {"train_loss": float("inf")})  # no task id: none sent
    assert dict(seen[-1].url.params) == {"version": "5", "num_examples": "1", "metrics": "{}"}
    remote.submit_update(2, weights(), 1, {})  # sync updates carry the run id too
    assert seen[-1].headers["x-fedlearn-run"] == "run-7"


def test_async_train_tasks_have_no_round() -> None:
    body = {"action": "train", "version": 5, "seed": 11, "task_id": "u1.c1",
            "config": {"lr": 0.1}}
    remote = registered(lambda r: httpx.Response(200, json=body))
    assert remote.next_task(1) == Task("train", round=0, version=5, seed=11, task_id="u1.c1",
                                       config={"lr": 0.1})
    assert isinstance(RemoteServer, type)
