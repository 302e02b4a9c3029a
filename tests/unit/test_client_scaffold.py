"""A client's SCAFFOLD control variate: kept on its disk, used by the round it belongs to."""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.client.control import KEEP, ControlStore, control_path
from fedlearn.client.remote import Registration, Task
from fedlearn.config import TrainConfig
from fedlearn.training import Shard, Trainer
from fedlearn.types import ControlVariates, Weights
from fedlearn.weights import pack, unpack
from tests.unit.test_client_worker import TASK, TRAIN, FakeServer, client_part, run, train


def arrays(value: float) -> Weights:
    return {"w": np.full(3, value, np.float32)}


def test_store_uses_the_newest_variate_made_before_the_version(tmp_path: Path) -> None:
    path = control_path(str(tmp_path / "ids" / "c1.json"))
    assert path == tmp_path / "ids" / "c1.scaffold.safetensors"
    store = ControlStore(path, "run-1")
    assert store.for_version(5, arrays(9))["w"].tolist() == [0, 0, 0]  # none yet: zeros
    store.keep(2, arrays(2))
    store.keep(4, arrays(4))
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.for_version(5, arrays(0))["w"].tolist() == [4, 4, 4]
    # a round run again from version 4 (the server resumed) starts from what version 2 made
    assert store.for_version(4, arrays(0))["w"].tolist() == [2, 2, 2]
    assert store.for_version(2, arrays(0))["w"].tolist() == [0, 0, 0]
    # A restarted client reads the same; another run's client starts from zeros.
    again = ControlStore(path, "run-1")
    np.testing.assert_array_equal(again.for_version(5, arrays(0))["w"], arrays(4)["w"])
    assert ControlStore(path, "run-2").for_version(5, arrays(0))["w"].tolist() == [0, 0, 0]
    again.forget(4)
    assert ControlStore(path, "run-1").for_version(5, arrays(0))["w"].tolist() == [2, 2, 2]
    for v in range(10, 10 + KEEP + 3):
        again.keep(v, arrays(v))
    assert len(ControlStore(path, "run-1").entries) == KEEP
    # A variate of another shape (another model) is not used.
    assert again.for_version(99, {"w": np.zeros(2, np.float32)})["w"].tolist() == [0, 0]


def test_store_ignores_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "c.scaffold.safetensors"
    path.write_bytes(b"garbage")
    assert ControlStore(path, "r").entries == {}
    assert ControlStore(None, "r").for_version(1, arrays(1))["w"].tolist() == [0, 0, 0]


class ScaffoldServer(FakeServer):
    """A fake sync server running SCAFFOLD: sends ``c/...`` with the model, takes
    ``delta_c/...`` with each delta."""

    def __init__(self, tasks: list[Task], c: Weights) -> None:
        super().__init__(tasks, config={**TRAIN.as_dict(), "scaffold": 1})
        self.c = c
        self.delta_cs: list[Weights] = []

    def register(self, *args: Any, **kwargs: Any) -> Registration:
        return dataclasses.replace(super().register(*args, **kwargs), model_extras=("c",))

    def get_model(self) -> tuple[Weights, int]:
        weights, version = super().get_model()
        return pack(weights, {"c": self.c}), version

    def submit_update(self, round: int, delta: Weights, num_examples: int,
                      metrics: Mapping[str, float], task_id: str | None = None) -> None:
        model, extra = unpack(delta, ("delta_c",))
        self.delta_cs.append(extra["delta_c"])
        super().submit_update(round, model, num_examples, metrics, task_id)


def test_worker_trains_with_its_kept_variate_across_a_restart(tmp_path: Path) -> None:
    identity = str(tmp_path / "c1.json")
    start = FakeServer([]).weights
    c = {k: np.full(v.shape, 0.01, v.dtype) for k, v in start.items() if v.dtype.kind == "f"}
    fake = ScaffoldServer([train(1, 0), train(2, 1)], c)
    summary, _, _ = run(fake, credential_file=identity)
    assert summary.rounds_trained == 2 and len(fake.delta_cs) == 2

    # The same two rounds by hand: c_i starts at zero, then is the one round 1 made.
    trainer = Trainer(TASK, seed=0)
    shard = Shard.of(client_part(0, 2))
    cfg = TrainConfig.from_dict({**TRAIN.as_dict(), "scaffold": 1})
    weights, c_i = dict(start), {k: np.zeros_like(v) for k, v in c.items()}
    for (_, delta, _, _, _), dc in zip(fake.updates, fake.delta_cs, strict=True):
        want = trainer.fit(weights, shard, cfg, seed=7, control=ControlVariates(c, c_i))
        for k in delta:
            np.testing.assert_array_equal(delta[k], want.delta[k])
        for k in dc:
            np.testing.assert_array_equal(dc[k], want.extra["delta_c"][k])
        assert want.control is not None
        weights, c_i = {k: weights[k] + delta[k] for k in weights}, want.control

    # A restarted client (same identity file) trains round 3 from the c_i of round 2.
    later = ScaffoldServer([train(3, 2)], c)
    later.weights, later.version = weights, 2
    run(later, credential_file=identity)
    want = trainer.fit(weights, shard, cfg, seed=7, control=ControlVariates(c, c_i))
    for k in want.delta:
        np.testing.assert_array_equal(later.updates[0][1][k], want.delta[k])
