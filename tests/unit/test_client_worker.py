"""The client loop against an in-memory fake server, on tiny synthetic data."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlearn.cli.client_cmd import read_token
from fedlearn.client.remote import Registration, ServerUnavailable, Task
from fedlearn.client.worker import WorkerConfig, WorkerSummary, run_worker
from fedlearn.config import TrainConfig
from fedlearn.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    DatasetError,
    PartitionError,
    RemoteError,
)
from fedlearn.models import build_model, get_weights
from fedlearn.tasks import ClientData, Data, DataContext
from fedlearn.tasks import Task as TaskDef
from fedlearn.training import Shard, Trainer
from fedlearn.types import Weights
from fedlearn.weights import spec_of, spec_to_json

SHAPE = (1, 4, 4)
CLASSES = 3
EXAMPLES = 48
TRAIN = TrainConfig(epochs=1, batch_size=8, optimizer="sgd", lr=0.05)


def arrays() -> tuple[np.ndarray, np.ndarray]:
    """48 easy examples of 3 classes (the class shifts the inputs)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, EXAMPLES).astype(np.int64)
    x = (rng.normal(0, 0.3, (EXAMPLES, *SHAPE)) + y[:, None, None, None]).astype(np.float32)
    return x, y


def local_test_set() -> Data:
    """A fixed local test set, apart from the training data."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, CLASSES, 10).astype(np.int64)
    x = (rng.normal(0, 0.3, (10, *SHAPE)) + y[:, None, None, None]).astype(np.float32)
    return Data(x, y)


def client_part(index: int | None, num: int | None) -> Data:
    """Client ``index`` of ``num`` gets every ``num``-th example from ``index`` (all: None)."""
    x, y = arrays()
    if index is None or num is None:
        return Data(x, y)
    return Data(x[index::num], y[index::num])


def synthetic_data(ctx: DataContext) -> Data:
    return client_part(ctx.client_index, ctx.num_clients)


def make_task(*, test: bool = False, **options: Any) -> TaskDef:
    """The synthetic task; ``test`` gives every client the fixed local test set."""

    def data(ctx: DataContext) -> ClientData | Data:
        part = synthetic_data(ctx)
        return ClientData(part, local_test_set()) if test else part

    return TaskDef(name="synthetic", model=lambda: build_model("mlp", SHAPE, CLASSES, seed=None),
                   data=data, num_classes=CLASSES, **options)


TASK = make_task()


def config(**overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = dict(
        server="http://fl.test", client_id="c1", task=TASK, partition="iid:2:0",
        token="join", poll_wait=1.0, max_retries=3, max_wait=0.01,
    )
    values.update(overrides)
    return WorkerConfig(**values)


def train(round_: int, version: int, seed: int = 7, config: dict[str, Any] | None = None) -> Task:
    return Task("train", round=round_, version=version, seed=seed,
                task_id=f"r{round_}.0.c1", config=config)


def trained(task: TaskDef, start: Weights, data: Data, cfg: TrainConfig, seed: int) -> Weights:
    """The delta of local training from ``start`` on ``data`` (the expectation)."""
    return Trainer(task, seed=0).fit(start, Shard.of(data), cfg, seed=seed).delta


def close(a: Weights, b: Weights) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


class FakeServer:
    """Hands out scripted tasks; the model advances one version per accepted update.

    ``errors[method]`` is a list of exceptions raised (one per call) before the
    method behaves normally. ``registrations`` holds what each register call sent.
    """

    def __init__(
        self, tasks: list[Task], *, advance: bool = True, dataset: str = "synthetic",
        weights: Weights | None = None, task_name: str = "synthetic",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.tasks = list(tasks)
        self.withdrawn: list[tuple[str, str]] = []
        self.advance = advance
        self.dataset = dataset
        self.task_name = task_name
        self.config = TRAIN.as_dict() if config is None else config
        self.version = 0
        self.weights = (weights if weights is not None
                        else get_weights(build_model("mlp", SHAPE, CLASSES, seed=1)))
        self.errors: dict[str, list[Exception]] = {}
        self.calls: list[str] = []
        self.registrations: list[tuple[str, int | None, int | None, Any]] = []
        self.updates: list[tuple[int, Weights, int, dict[str, float], str | None]] = []
        self.evaluations: list[tuple[int, dict[str, float], int]] = []
        self.model_versions: list[int] = []

    def _enter(self, method: str) -> None:
        self.calls.append(method)
        queued = self.errors.get(method)
        if queued:
            raise queued.pop(0)

    def register(
        self, client_id: str, num_examples: int | None, *,
        num_test_examples: int | None = None, task: Mapping[str, Any] | None = None,
        credential: str | None = None, claim: str | None = None,
    ) -> Registration:
        self._enter("register")
        self.registrations.append((client_id, num_examples, num_test_examples,
                                   None if task is None else dict(task)))
        return Registration(client_id=client_id, credential=f"cred-{len(self.calls)}",
                            run_id="run-1", mode="sync", dataset=self.dataset, model="mlp",
                            rounds=3, task=self.task_name, config=dict(self.config))

    def next_task(self, wait: float) -> Task:
        self._enter("next_task")
        if not 0 < wait <= 60:
            raise AssertionError(f"bad wait {wait}")
        return self.tasks.pop(0) if self.tasks else Task("done")

    def get_model(self) -> tuple[Weights, int]:
        self._enter("get_model")
        self.model_versions.append(self.version)
        return {k: v.copy() for k, v in self.weights.items()}, self.version

    def submit_update(
        self, round: int, delta: Weights, num_examples: int, metrics: Mapping[str, float],
        task_id: str | None = None,
    ) -> None:
        self._enter("submit_update")
        self.updates.append((round, delta, num_examples, dict(metrics), task_id))
        if self.advance:
            self.weights = {k: self.weights[k] + delta[k] for k in delta}
            self.version += 1

    def withdraw(self, task_id: str, reason: str = "") -> None:
        self._enter("withdraw")
        self.withdrawn.append((task_id, reason))

    def submit_evaluation(
        self, round: int, metrics: Mapping[str, float], num_examples: int
    ) -> None:
        self._enter("submit_evaluation")
        self.evaluations.append((round, dict(metrics), num_examples))

    def push_update(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("a sync client must not push async updates")

    def status(self) -> dict[str, Any]:
        return {"state": "running"}

    def close(self) -> None:
        pass


def run(fake: FakeServer, **overrides: Any) -> tuple[WorkerSummary, list[str], list[float]]:
    lines: list[str] = []
    slept: list[float] = []
    summary = run_worker(config(**overrides), fake, log=lines.append, sleep=slept.append)
    return summary, lines, slept


def identity(task: TaskDef, weights: Weights) -> dict[str, Any]:
    return {"name": task.name, "spec": spec_to_json(spec_of(weights))}


def test_trains_each_round_and_submits_matching_deltas() -> None:
    fake = FakeServer([train(1, 0), Task("wait"), train(2, 1), Task("wait"), train(3, 2)])
    summary, lines, _ = run(fake)
    assert summary == WorkerSummary(rounds_trained=3, updates_refused=0, last_round=3)
    assert [u[0] for u in fake.updates] == [1, 2, 3]
    assert [u[4] for u in fake.updates] == ["r1.0.c1", "r2.0.c1", "r3.0.c1"]  # named back
    expected = get_weights(build_model("mlp", SHAPE, CLASSES))
    for _, delta, n, metrics, _ in fake.updates:
        assert n == 24  # half of the 48 examples (client 0 of 2)
        assert {k: v.shape for k, v in delta.items()} == {k: v.shape for k, v in expected.items()}
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in delta.values())
        assert any(np.abs(v).max() > 0 for v in delta.values())  # it did train
        assert set(metrics) >= {"train_loss", "train_accuracy", "seconds"}
    assert fake.model_versions == [0, 1, 2]
    assert sum(line.startswith("round ") for line in lines) == 3
    assert fake.calls[0] == "register" and fake.calls[-1] == "next_task"
    assert fake.calls.count("register") == 1


def test_registers_once_with_the_task_identity_and_its_example_counts() -> None:
    fake = FakeServer([])
    run(fake)
    assert fake.registrations == [("c1", 24, 0, identity(TASK, fake.weights))]
    held_out = FakeServer([])
    run(held_out, test_fraction=0.25)  # a quarter of the 24 is the local test set
    assert held_out.registrations == [("c1", 18, 6, identity(TASK, held_out.weights))]
    second = FakeServer([])
    run(second, partition="iid:3:2", client_id="c3")  # the task is told which part is ours
    assert second.registrations[0][:3] == ("c3", 16, 0)


def test_the_data_is_checked_before_anything_is_sent() -> None:
    bad = TaskDef(name="synthetic", model=lambda: build_model("mlp", SHAPE, CLASSES, seed=None),
                  data=lambda ctx: Data(*arrays()), num_classes=CLASSES - 1)  # label 2 is out
    fake = FakeServer([train(1, 0)])
    with pytest.raises(DatasetError, match="outside the task's classes"):
        run(fake, task=bad)
    assert fake.calls == []


def test_delta_is_local_update_from_the_global_weights_with_the_task_seed() -> None:
    fake = FakeServer([train(1, 0, seed=123)])
    start = {k: v.copy() for k, v in fake.weights.items()}
    run(fake)
    want = trained(TASK, start, client_part(0, 2), TRAIN, seed=123)
    close(fake.updates[0][1], want)
    other_seed = trained(TASK, start, client_part(0, 2), TRAIN, seed=124)
    assert not np.allclose(fake.updates[0][1]["fc1.weight"], other_seed["fc1.weight"])


def test_round_config_is_the_servers_then_the_tasks_then_the_clients_flags() -> None:
    seen: list[dict[str, Any]] = []

    def record(ctx: Any) -> None:
        seen.append(dict(ctx.config))  # the model is left as it is: a zero delta

    recording = make_task(train=record)
    server = {**TRAIN.as_dict(), "mu": 0.1, "note": "server"}
    fake = FakeServer([train(1, 0), train(2, 0, config={"epochs": 3, "lr": 0.02, "mu": 0.5})],
                      advance=False, config=server)
    summary, _, _ = run(fake, task=recording, overrides={"lr": 0.2, "batch_size": 4})
    assert summary.rounds_trained == 2
    base = {**TRAIN.as_dict(), "lr": 0.2, "batch_size": 4, "note": "server"}
    assert seen == [{**base, "mu": 0.1}, {**base, "epochs": 3, "mu": 0.5}]


def test_training_uses_the_merged_config() -> None:
    fake = FakeServer([train(1, 0, seed=5, config={"epochs": 2})])
    start = {k: v.copy() for k, v in fake.weights.items()}
    run(fake, overrides={"lr": 0.1})
    used = TrainConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.1)
    close(fake.updates[0][1], trained(TASK, start, client_part(0, 2), used, seed=5))
    # ... and not the server's config alone
    plain = trained(TASK, start, client_part(0, 2), TRAIN, seed=5)
    assert not np.allclose(fake.updates[0][1]["fc1.weight"], plain["fc1.weight"])


def test_reuses_the_cached_model_while_the_version_is_unchanged() -> None:
    fake = FakeServer([train(1, 0), train(2, 0), train(3, 0)], advance=False)
    summary, _, _ = run(fake)
    assert fake.calls.count("get_model") == 1
    assert summary.rounds_trained == 3


def test_skips_a_round_when_the_model_has_moved_on() -> None:
    fake = FakeServer([train(1, 0)])
    fake.version = 1  # the server's model is already newer than the task says
    summary, lines, _ = run(fake)
    assert fake.updates == [] and summary.rounds_trained == 0
    assert any("skipping" in line for line in lines)


def test_evaluates_the_global_model_on_the_local_test_data() -> None:
    task = make_task(test=True)
    fake = FakeServer([Task("evaluate", round=4, version=0, task_id="e4.c1")])
    summary, lines, _ = run(fake, task=task)
    assert fake.registrations[0][1:3] == (24, 10)
    want = Trainer(task, seed=0).evaluate(fake.weights, local_test_set())
    assert len(fake.evaluations) == 1
    round_, metrics, n = fake.evaluations[0]
    assert (round_, n) == (4, 10)
    assert set(metrics) == {"loss", "accuracy"}
    for k, v in want.metrics.items():
        assert metrics[k] == pytest.approx(v, rel=1e-6)
    assert fake.updates == [] and summary == WorkerSummary(0, 0, 0)  # not a training
    assert any("evaluated version 0 on 10 local test examples" in line for line in lines)


def test_evaluation_without_test_data_or_refused_or_for_an_old_model() -> None:
    fake = FakeServer([Task("evaluate", round=1, version=0), train(1, 0)])
    run(fake)  # no local test data: it says so with 0 examples
    assert fake.evaluations == [(1, {}, 0)]
    assert [u[0] for u in fake.updates] == [1]

    refused = FakeServer([Task("evaluate", round=1, version=0), train(1, 0)])
    refused.errors["submit_evaluation"] = [ConflictError("no evaluation is open.")]
    summary, lines, _ = run(refused, task=make_task(test=True))
    assert any("evaluation refused" in line and "no evaluation is open" in line
               for line in lines)
    assert summary.rounds_trained == 1  # the loop went on

    old = FakeServer([Task("evaluate", round=1, version=0)])
    old.version = 2
    _, lines, _ = run(old, task=make_task(test=True))
    assert old.evaluations == [] and any("skipping" in line for line in lines)


def test_an_unknown_action_is_an_error() -> None:
    fake = FakeServer([Task("explode")])
    with pytest.raises(RemoteError, match="unknown task action 'explode'"):
        run(fake)


def test_reregisters_once_on_auth_error() -> None:
    # The restarted server (no --resume) forgot us and starts round 1 again.
    fake = FakeServer([train(1, 0), train(1, 0)])
    fake.errors["submit_update"] = [AuthError("unknown credential; register again.")]
    summary, lines, _ = run(fake)
    assert fake.calls.count("register") == 2
    assert fake.registrations[0] == fake.registrations[1]  # the same task and counts
    assert [u[0] for u in fake.updates] == [1]
    assert summary == WorkerSummary(rounds_trained=1, updates_refused=0, last_round=1)
    assert any("registering again" in line for line in lines)
    assert fake.calls.count("get_model") == 2  # the cache is dropped on re-registration


def test_auth_error_right_after_reregistering_is_fatal() -> None:
    fake = FakeServer([train(1, 0)])
    fake.errors["next_task"] = [AuthError("bad credential."), AuthError("bad credential.")]
    with pytest.raises(AuthError):
        run(fake)
    assert fake.calls.count("register") == 2


def test_bad_join_token_is_fatal() -> None:
    fake = FakeServer([])
    fake.errors["register"] = [AuthError("wrong join token.")]
    with pytest.raises(AuthError, match="wrong join token"):
        run(fake)
    assert fake.calls == ["register"]


def test_keeps_going_after_a_conflict() -> None:
    fake = FakeServer([train(1, 0), train(2, 0)], advance=False)
    fake.errors["submit_update"] = [ConflictError("round 1 is closed.")]
    summary, lines, _ = run(fake)
    assert summary == WorkerSummary(rounds_trained=1, updates_refused=1, last_round=2)
    assert any("refused" in line and "round 1 is closed" in line for line in lines)


def test_exits_on_done_without_training() -> None:
    fake = FakeServer([Task("done"), train(1, 0)])
    summary, _, _ = run(fake)
    assert summary == WorkerSummary(0, 0, 0)
    assert fake.calls == ["register", "next_task"]


def test_retries_while_the_server_is_unreachable() -> None:
    fake = FakeServer([train(1, 0)])
    down = ServerUnavailable("connection refused.", url="http://fl.test")
    fake.errors["register"] = [down]
    fake.errors["next_task"] = [down, down]
    fake.errors["get_model"] = [down]
    summary, _, slept = run(fake)
    assert summary.rounds_trained == 1
    assert len(slept) == 4 and all(0 < s <= 0.01 for s in slept)


# -- the built-in task (no --task): the server names the model ---------------------


def digits_weights() -> Weights:
    return get_weights(build_model("mlp", (1, 8, 8), 10, seed=1))


DIGITS = {**TRAIN.as_dict(), "batch_size": 256}  # few steps: these tests are about wiring


def test_without_a_task_trains_the_servers_builtin_model_on_our_dataset() -> None:
    from fedlearn.tasks import builtin_task

    fake = FakeServer([train(1, 0)], dataset="digits", weights=digits_weights(),
                      task_name="digits/mlp", config=DIGITS)
    summary, _, _ = run(fake, task=None, dataset="digits", partition="iid:2:0")
    assert summary.rounds_trained == 1
    # First without identity (to learn the model), then as the built-in task.
    assert fake.calls[:3] == ["register", "register", "next_task"]
    assert fake.registrations[0] == ("c1", None, None, None)
    builtin = builtin_task("digits", "mlp")
    assert fake.registrations[1] == ("c1", 719, 0, identity(builtin, fake.weights))
    _, delta, n, _, _ = fake.updates[0]
    assert n == 719  # half of digits' 1437 training examples
    assert set(delta) == set(fake.weights)


def test_dataset_mismatch_is_a_config_error() -> None:
    fake = FakeServer([], dataset="fashion-mnist")
    with pytest.raises(ConfigError, match="--dataset fashion-mnist"):
        run(fake, task=None, dataset="digits")
    assert fake.calls == ["register"]  # refused before it loads or registers for real


def test_partition_without_a_part_is_refused() -> None:
    fake = FakeServer([train(1, 0)], dataset="digits", weights=digits_weights(), config=DIGITS)
    try:
        run(fake, task=None, dataset="digits", partition="iid")
    except (PartitionError, ConfigError) as exc:
        assert "part" in str(exc)
    else:
        raise AssertionError(f"partition 'iid' was taken; registered {fake.registrations}")
    assert fake.calls == ["register"]  # nothing trained, no second registration


@pytest.mark.parametrize("bad", [{"poll_wait": 0.0}, {"poll_wait": 61.0}, {"max_retries": -1},
                                 {"max_wait": 0.0}, {"slowdown": 0.5}, {"client_id": " "},
                                 {"max_offline": -1}])
def test_bad_config_values_are_config_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        config(**bad)


def test_token_repr_is_hidden() -> None:
    assert "join" not in repr(config(token="join-secret"))


def test_read_token(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text("  abc123\n")
    assert read_token(None, f) == "abc123"
    assert read_token("xyz", None) == "xyz"
    for args in [(None, None), ("xyz", f), (None, tmp_path / "missing")]:
        with pytest.raises(ConfigError):
            read_token(*args)
    f.write_text("\n")
    with pytest.raises(ConfigError):
        read_token(None, f)


def test_worker_module_does_not_load_httpx() -> None:
    code = ("import sys, fedlearn.client.worker\n"
            "print(','.join(m for m in ('httpx', 'fastapi') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == ""
