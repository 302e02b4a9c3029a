"""The client's side of secure aggregation: its stages against a scripted server that holds
two other real clients, its own checks in the worker loop, and a stage that never opens."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from fedlearn.client.remote import Task
from fedlearn.client.secagg import SecAggTask, check_update, run_stages
from fedlearn.errors import RemoteError, SecAggAbortedError
from fedlearn.privacy.secagg import SecAggClient, SecAggParams
from fedlearn.privacy.secagg_messages import (
    KeyAdvert,
    MaskedInput,
    ShareBundle,
    UnmaskResponse,
)
from fedlearn.privacy.secagg_server import SecAggServer
from fedlearn.privacy.secagg_update import (
    EXTRA,
    UpdateLayout,
    client_vector,
    clip_range,
    decode_sum,
)
from fedlearn.types import Weights
from fedlearn.weights import spec_of
from tests.unit.test_client_worker import FakeServer, run, train

CURRENT: Weights = {"w": np.array([0.5, -0.5, 1.0], np.float32)}
LAYOUT = UpdateLayout.of(spec_of(CURRENT))
NORM = 10.0


def block(index: int = 0, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "index": index, "threshold": 2, "bits": 48, "range": clip_range(NORM),
        "max_clients": 3, "neighbours": None, "graph_seed": 5, "max_update_norm": NORM,
        "dimension": LAYOUT.dimension, "stage_timeout": 5.0, "seconds_left": 10.0}
    values.update(changes)
    return values


class ScriptedServer:
    """A server for client 0 with clients 1 and 2 played in lockstep by the test."""

    def __init__(self, others: dict[int, tuple[Weights, int]], *, silent_after: str = "") -> None:
        self.task = SecAggTask.from_json(block())
        params: SecAggParams = self.task.params()
        self.server = SecAggServer(params, LAYOUT.dimension)
        self.others = {u: SecAggClient(u, params) for u in others}
        self.inputs = others
        self.scale = float(max([n for _, n in others.values()] + [30]))
        self.silent_after = silent_after
        self.posts: list[str] = []
        self.waiting = 0  # fetches answered "not ready" before each real answer

    def secagg_post(self, name: str, task_id: str, body: bytes | Mapping[str, Any],
                    num_examples: int | None = None) -> None:
        assert task_id == "r1.0.c1"
        self.posts.append(name)
        data = body if isinstance(body, bytes) else json.loads(json.dumps(body))
        s = self.server
        if name == "advert":
            assert num_examples == 30
            s.receive_advert(KeyAdvert.from_json(data))
            for c in self.others.values():
                s.receive_advert(c.advertise())
        elif name == "shares":
            s.receive_shares(ShareBundle.from_json(data))
            keys = s.public_keys()
            for c in self.others.values():
                s.receive_shares(c.share_keys(keys))
        elif name == "masked":
            assert isinstance(data, bytes)
            s.receive_masked(MaskedInput(0, data))
            for u, c in self.others.items():
                d, n = self.inputs[u]
                values = LAYOUT.flatten(d)
                vector = client_vector(values, num_examples=n, example_scale=self.scale,
                                       train_loss=None, clip=clip_range(NORM))
                s.receive_masked(c.masked_input(vector, s.inbox(u)))
        else:
            request = s.unmask_request()
            s.receive_unmask(UnmaskResponse.from_json(data))
            for c in self.others.values():
                s.receive_unmask(c.unmask(request))

    def secagg_fetch(self, name: str, task_id: str, wait: float) -> dict[str, Any] | None:
        if name == self.silent_after:
            return None
        self.waiting += 1
        if self.waiting % 2:
            return None  # "not open yet" once before every answer
        s = self.server
        if name == "keys":
            return {"keys": [a.to_json() for a in s.public_keys()],
                    "example_scale": self.scale}
        if name == "inbox":
            return {"inbox": s.inbox(0).to_json()}
        return {"request": s.unmask_request().to_json()}


def test_the_stages_put_this_clients_update_into_the_sum() -> None:
    mine = {"w": np.array([0.1, 0.2, -0.3], np.float32)}
    others = {1: ({"w": np.array([-0.2, 0.0, 0.1], np.float32)}, 10),
              2: ({"w": np.array([0.3, 0.1, 0.0], np.float32)}, 20)}
    fake = ScriptedServer(others)
    values = check_update(fake.task, CURRENT, mine, 30)
    calls: list[int] = []

    def call(fn: Any) -> Any:
        calls.append(1)
        return fn()

    run_stages(fake, "r1.0.c1", fake.task, values, num_examples=30, train_loss=0.7,
               call=call, wait=1.0)
    assert fake.posts == ["advert", "shares", "masked", "unmask"]
    total, count = fake.server.result()
    summed = decode_sum(LAYOUT, total, count)
    expected = (mine["w"] * 30 + others[1][0]["w"] * 10 + others[2][0]["w"] * 20) / 60
    np.testing.assert_allclose(summed.sums["w"] / summed.weight, expected, atol=1e-7)
    assert summed.examples(fake.scale) == 60 and summed.train_loss() == pytest.approx(0.7)


def test_a_stage_that_never_opens_is_given_up_on() -> None:
    fake = ScriptedServer({1: (CURRENT, 10), 2: (CURRENT, 10)}, silent_after="inbox")
    now = [0.0]

    def call(fn: Any) -> Any:
        now[0] += 20.0  # every long-poll takes a while
        return fn()

    values = check_update(fake.task, CURRENT, {"w": np.zeros(3, np.float32)}, 30)
    with pytest.raises(SecAggAbortedError, match="did not open"):
        run_stages(fake, "r1.0.c1", fake.task, values, num_examples=30, train_loss=None,
                   call=call, wait=1.0, clock=lambda: now[0])
    assert fake.posts == ["advert", "shares"]


def test_settings_that_do_not_fit_are_refused() -> None:
    with pytest.raises(RemoteError, match="not valid"):
        SecAggTask.from_json(block(threshold=1))
    with pytest.raises(RemoteError, match="not valid"):
        SecAggTask.from_json({k: v for k, v in block().items() if k != "bits"})
    with pytest.raises(RemoteError, match="range"):
        SecAggTask.from_json(block(range=3.0))
    with pytest.raises(RemoteError, match="values in a masked update"):
        check_update(SecAggTask.from_json(block(dimension=99)), CURRENT, CURRENT, 10)


class MaskingFakeServer(FakeServer):
    """The worker tests' fake server, handing out masked rounds; records stage calls."""

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.stage_calls: list[str] = []

    def secagg_post(self, name: str, task_id: str, body: bytes | Mapping[str, Any],
                    num_examples: int | None = None) -> None:
        self.stage_calls.append(name)

    def secagg_fetch(self, name: str, task_id: str, wait: float) -> dict[str, Any] | None:
        raise AssertionError("not reached")


def test_the_worker_refuses_to_send_an_update_that_fails_its_own_checks() -> None:
    spec = {k: v.shape for k, v in FakeServer([]).weights.items()}
    dimension = sum(int(np.prod(s)) for s in spec.values()) + EXTRA
    tiny = block(max_update_norm=1e-9, range=clip_range(1e-9), dimension=dimension)
    task = train(1, 0)
    masked = Task(task.action, task.round, task.version, task.seed, task.task_id,
                  task.config, tiny)
    fake = MaskingFakeServer([masked, Task("wait")])
    summary, lines, _ = run(fake)
    assert fake.stage_calls == [] and not fake.updates  # nothing left the client
    # ... but it told the server, so the round does not wait for it until its deadline.
    assert [t for t, _ in fake.withdrawn] == [task.task_id]
    assert summary.rounds_trained == 0 and summary.updates_refused == 1
    assert any("fails this client's own checks" in line and "--max-update-norm" in line
               for line in lines), lines
