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
from fedlearn.data import Dataset, client_indices
from fedlearn.errors import AuthError, ConfigError, ConflictError
from fedlearn.models import build_model, get_weights
from fedlearn.training import Shard, local_update
from fedlearn.types import Weights

SHAPE = (1, 4, 4)
CLASSES = 3
TRAIN = TrainConfig(epochs=1, batch_size=8, optimizer="sgd", lr=0.05)


def synthetic(name: str = "synthetic") -> Dataset:
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, 48).astype(np.int64)
    x = (rng.normal(0, 0.3, (48, *SHAPE)) + y[:, None, None, None]).astype(np.float32)
    return Dataset(name=name, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8],
                   num_classes=CLASSES, input_shape=SHAPE, source="test")


def config(**overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = dict(
        server="http://fl.test", client_id="c1", dataset="synthetic", partition="iid:2:0",
        train=TRAIN, token="join", poll_wait=1.0, max_retries=3, max_wait=0.01,
    )
    values.update(overrides)
    return WorkerConfig(**values)


def train(round_: int, version: int, seed: int = 7) -> Task:
    return Task("train", round=round_, version=version, seed=seed)


class FakeServer:
    """Hands out scripted tasks; the model advances one version per accepted update.

    ``errors[method]`` is a list of exceptions raised (one per call) before the
    method behaves normally.
    """

    def __init__(self, tasks: list[Task], *, advance: bool = True) -> None:
        self.tasks = list(tasks)
        self.advance = advance
        self.version = 0
        self.weights = get_weights(build_model("mlp", SHAPE, CLASSES, seed=1))
        self.errors: dict[str, list[Exception]] = {}
        self.calls: list[str] = []
        self.updates: list[tuple[int, Weights, int, dict[str, float]]] = []
        self.model_versions: list[int] = []

    def _enter(self, method: str) -> None:
        self.calls.append(method)
        queued = self.errors.get(method)
        if queued:
            raise queued.pop(0)

    def register(self, client_id: str, num_examples: int) -> Registration:
        self._enter("register")
        return Registration(client_id=client_id, credential=f"cred-{len(self.calls)}",
                            run_id="run-1", mode="sync", dataset="synthetic", model="mlp",
                            rounds=3)

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
        self, round: int, delta: Weights, num_examples: int, metrics: Mapping[str, float]
    ) -> None:
        self._enter("submit_update")
        self.updates.append((round, delta, num_examples, dict(metrics)))
        if self.advance:
            self.weights = {k: self.weights[k] + delta[k] for k in delta}
            self.version += 1

    def status(self) -> dict[str, Any]:
        return {"state": "running"}

    def close(self) -> None:
        pass


def run(fake: FakeServer, **overrides: Any) -> tuple[WorkerSummary, list[str], list[float]]:
    lines: list[str] = []
    slept: list[float] = []
    summary = run_worker(config(**overrides), fake, data=synthetic(), log=lines.append,
                         sleep=slept.append)
    return summary, lines, slept


def test_trains_each_round_and_submits_matching_deltas() -> None:
    fake = FakeServer([train(1, 0), Task("wait"), train(2, 1), Task("wait"), train(3, 2)])
    summary, lines, _ = run(fake)
    assert summary == WorkerSummary(rounds_trained=3, updates_refused=0, last_round=3)
    assert [u[0] for u in fake.updates] == [1, 2, 3]
    expected = get_weights(build_model("mlp", SHAPE, CLASSES))
    for _, delta, n, metrics in fake.updates:
        assert n == 24  # half of the 48 examples (iid:2:0)
        assert {k: v.shape for k, v in delta.items()} == {k: v.shape for k, v in expected.items()}
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in delta.values())
        assert set(metrics) >= {"train_loss", "train_accuracy", "seconds"}
    assert fake.model_versions == [0, 1, 2]
    assert sum(line.startswith("round ") for line in lines) == 3
    assert fake.calls[0] == "register" and fake.calls[-1] == "next_task"


def test_delta_is_local_update_from_the_global_weights_with_the_task_seed() -> None:
    fake = FakeServer([train(1, 0, seed=123)])
    start = {k: v.copy() for k, v in fake.weights.items()}
    run(fake)
    ds = synthetic()
    shard = Shard.from_numpy(ds.x_train, ds.y_train, client_indices(ds.y_train, "iid:2:0", 0))
    want = local_update(build_model("mlp", SHAPE, CLASSES), start, shard, TRAIN, seed=123)
    for k, v in want.delta.items():
        np.testing.assert_allclose(fake.updates[0][1][k], v, rtol=1e-6, atol=1e-7)


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


def test_reregisters_once_on_auth_error() -> None:
    # The restarted server (no --resume) forgot us and starts round 1 again.
    fake = FakeServer([train(1, 0), train(1, 0)])
    fake.errors["submit_update"] = [AuthError("unknown credential; register again.")]
    summary, lines, _ = run(fake)
    assert fake.calls.count("register") == 2
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


def test_dataset_mismatch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--dataset synthetic"):
        run_worker(config(), FakeServer([]), data=synthetic("digits"), log=lambda s: None)


def test_partition_without_a_part_is_refused() -> None:
    with pytest.raises(Exception, match="part"):
        run(FakeServer([]), partition="iid")


@pytest.mark.parametrize("bad", [{"poll_wait": 0.0}, {"poll_wait": 61.0}, {"max_retries": -1},
                                 {"max_wait": 0.0}, {"slowdown": 0.5}, {"client_id": " "}])
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
