"""``fedlearn client --attack``: an attacking client against in-memory fake servers."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from fedlearn.attacks import attack_delta, attack_rng, parse_attack
from fedlearn.cli.run_cmd import run
from fedlearn.client.remote import PayloadRefused
from fedlearn.client.worker import WorkerSummary
from fedlearn.errors import ConfigError
from fedlearn.tasks import Data
from fedlearn.weights import scale
from tests.unit.test_client_async import FakeAsyncServer, go
from tests.unit.test_client_remote import registered, weights
from tests.unit.test_client_worker import (
    TASK,
    TRAIN,
    FakeServer,
    client_part,
    close,
    config,
    train,
    trained,
)
from tests.unit.test_client_worker import run as run_client

REFUSED = PayloadRefused("the server refused POST /api/update (400): the update's norm 1e9 "
                         "is over the server's --max-update-norm 100.")


def test_sign_flip_client_sends_minus_its_honest_delta() -> None:
    fake = FakeServer([train(1, 0, seed=11)])
    start = {k: v.copy() for k, v in fake.weights.items()}
    summary, lines, _ = run_client(fake, attack="sign-flip")
    assert summary.rounds_trained == 1
    close(fake.updates[0][1], scale(trained(TASK, start, client_part(0, 2), TRAIN, 11), -1.0))
    assert any("attacking (sign-flip)" in line for line in lines)


def test_gaussian_client_sends_noise_seeded_by_its_task() -> None:
    fake = FakeServer([train(1, 0, seed=11)])
    start = {k: v.copy() for k, v in fake.weights.items()}
    run_client(fake, attack="gaussian:0.3")
    want = attack_delta(start, parse_attack("gaussian:0.3"), attack_rng(11))
    close(fake.updates[0][1], want)


def test_label_flip_client_trains_on_flipped_labels() -> None:
    fake = FakeServer([train(1, 0, seed=11)])
    start = {k: v.copy() for k, v in fake.weights.items()}
    run_client(fake, attack="label-flip")
    part = client_part(0, 2)
    flipped = Data(part.x, (2 - part.y).astype(part.y.dtype))  # 3 classes
    close(fake.updates[0][1], trained(TASK, start, flipped, TRAIN, 11))
    honest = trained(TASK, start, part, TRAIN, 11)
    assert not np.allclose(fake.updates[0][1]["fc1.weight"], honest["fc1.weight"])


def test_an_attacker_goes_on_when_the_server_refuses_its_update() -> None:
    # The server keeps the refused task open: the attacker waits for the next one.
    fake = FakeServer([train(1, 0), train(1, 0), train(2, 0)], advance=False)
    fake.errors["submit_update"] = [REFUSED]
    summary, lines, slept = run_client(fake, attack="scale:1e9")
    assert summary == WorkerSummary(rounds_trained=1, updates_refused=1, last_round=2)
    assert fake.calls.count("submit_update") == 2 and slept == [1.0]  # poll_wait 1 s
    assert any("attacked update refused" in line for line in lines)


def test_an_honest_client_still_stops_on_a_refused_update() -> None:
    fake = FakeServer([train(1, 0)])
    fake.errors["submit_update"] = [REFUSED]
    with pytest.raises(PayloadRefused, match="max-update-norm"):
        run_client(fake)


def test_an_async_attacker_goes_on_when_its_push_is_refused() -> None:
    fake = FakeAsyncServer(tasks=2)
    fake.errors["push_update"] = [REFUSED]
    summary, lines = go(fake, attack="sign-flip")
    assert summary == WorkerSummary(1, 1, 0, "async", 0)
    assert any("refused" in line for line in lines)


def test_a_bad_attack_spec_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ConfigError, match="unknown --attack"):
        config(attack="poison")


def test_label_flip_with_a_script_task_is_refused() -> None:
    fake = FakeServer([train(1, 0)])
    script_task = TASK.__class__(name="synthetic", init=lambda seed: {}, script="train.py",
                                 num_classes=3)
    with pytest.raises(ConfigError, match="client script"):
        run_client(fake, task=script_task, attack="label-flip")
    assert "submit_update" not in fake.calls


def test_the_server_refusing_a_body_is_a_payload_refused() -> None:
    remote = registered(lambda r: httpx.Response(400, json={"detail": "the update has NaN."}))
    with pytest.raises(PayloadRefused, match="400"):
        remote.submit_update(1, weights(), 1, {})
    remote = registered(lambda r: httpx.Response(413, json={"detail": "too large."}))
    with pytest.raises(PayloadRefused, match="413"):
        remote.push_update(1, weights(), 1, {})


def test_fedlearn_run_refuses_bad_attack_flags_before_starting(tmp_path: Path) -> None:
    for flags, words in (({"attack": "boost"}, "unknown --attack"),
                         ({"attackers": 0.5}, "--attack"),
                         ({"attack": "sign-flip", "attackers": 0.1}, "no client at all")):
        with pytest.raises(ConfigError, match=words):
            run(clients=3, dataset="digits", model="mlp", out=tmp_path / "run",
                **flags)  # type: ignore[arg-type]
        assert not (tmp_path / "run").exists()

