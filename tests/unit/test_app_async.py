"""The app in async mode (and the run-id check in both modes), in-process through
httpx.ASGITransport with its lifespan running; every scenario is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from fedlearn.config import ServerConfig, TrainConfig
from fedlearn.seeding import derive_seed
from fedlearn.server.app import create_app
from fedlearn.server.async_coordinator import AsyncCoordinator, Merged
from fedlearn.server.store import Store
from fedlearn.strategies.async_policies import AsyncState, make_policy
from fedlearn.weights import decode, encode
from tests.unit.test_app import (
    INITIAL_W,
    RUN_ID,
    TOKEN,
    bearer,
    evaluator,
    model,
    one_sentence,
    post_update,
    register,
    run,
    serving,
    status,
    until,
    vec,
)
from tests.unit.test_app import build as build_sync


def build(
    tmp_path: Path, stores: list[Store], *, on_done: Callable[[], None] | None = None,
    **config: Any,
) -> tuple[FastAPI, AsyncCoordinator, list[Merged]]:
    settings: dict[str, Any] = {"mode": "async", "async_policy": "samples", "min_clients": 2,
                                "max_updates": 6, "seed": 3, "dataset": "toy",
                                "model": "pair"}
    settings.update(config)
    store = Store(tmp_path)
    stores.append(store)
    merged: list[Merged] = []
    coord = AsyncCoordinator(ServerConfig(**settings), vec(*INITIAL_W), store=store,
                             evaluator=evaluator, on_merge=merged.append)
    app = create_app(coord, join_token=TOKEN, run_id=RUN_ID, on_done=on_done)
    return app, coord, merged


async def task(client: httpx.AsyncClient, cred: str, wait: float = 5) -> dict[str, Any]:
    response = await client.get("/api/task", params={"wait": wait}, headers=bearer(cred))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_register_task_model_and_update_in_async_mode(
    tmp_path: Path, stores: list[Store]
) -> None:
    app, coord, _ = build(tmp_path, stores)

    async def scenario() -> None:
        async with serving(app) as client:
            response = await client.post("/api/register", json={"client_id": "a"},
                                         headers=bearer(TOKEN))
            reg = response.json()
            assert (reg["mode"], reg["policy"], reg["max_updates"], reg["rounds"]) == (
                "async", "samples", 6, 0)
            cred_a = reg["credential"]
            assert await task(client, cred_a, wait=0.1) == {"action": "wait"}
            cred_b = await register(client, "b")
            assert await task(client, cred_a) == {
                "action": "train", "version": 0, "seed": derive_seed("async-task", 3, "a", 1),
                "task_id": "u1.a", "config": TrainConfig().as_dict()}
            response = await post_update(client, cred_a, encode(vec(2, 2)), version=0,
                                         num_examples=10, task_id="u1.a")
            assert response.status_code == 200, response.text
            assert response.json() == {"accepted": True, "version": 0, "update": 1,
                                       "staleness": 0, "server_version": 1}
            # A replay (a retry after a timeout) gets the same answer and merges nothing.
            again = await post_update(client, cred_a, encode(vec(2, 2)), version=0,
                                      num_examples=10, task_id="u1.a")
            assert again.json() == response.json() and coord.state.updates == 1
            data, version = await model(client, cred_b)
            assert version == "1" and decode(data)["w"].tolist() == [3.0, 1.0]
            tb = await task(client, cred_b)
            assert await task(client, cred_b) == {**tb, "version": 1}  # one open task each
            response = await post_update(client, cred_b, encode(vec(4, 4)), version=0,
                                         num_examples=30, train_loss=0.5,
                                         task_id=tb["task_id"])
            assert response.json()["staleness"] == 1
            assert coord.weights["w"].tolist() == [6.0, 4.0]
            await until(lambda: len(coord.history) == 2)
            body = await status(client)
            assert (body["mode"], body["state"], body["version"], body["updates"]) == (
                "async", "training", 2, 2)
            assert body["mean_staleness"] == 0.5
            assert body["history"][-1] == {"update": 2, "version": 2, "accuracy": 6.0,
                                           "loss": 4.0}

    run(scenario)


def test_refused_async_updates_change_nothing(
    tmp_path: Path, stores: list[Store]
) -> None:
    app, coord, _ = build(tmp_path, stores, max_staleness=1)
    good = encode(vec(1, 1))

    async def scenario() -> None:
        async with serving(app) as client:
            cred = await register(client, "a")
            await register(client, "b")
            for _ in range(3):
                tid = (await task(client, cred))["task_id"]
                response = await post_update(client, cred, good, version=coord.state.version,
                                             num_examples=1, task_id=tid)
                assert response.status_code == 200, response.text
            before = await model(client, cred)
            assert before[1] == "3"
            tid = (await task(client, cred))["task_id"]
            refusals = [
                (422, "version", {"num_examples": 1}),
                (422, "version", {"round": 1, "num_examples": 1}),  # a sync-mode update
                (422, "version", {"version": -1, "num_examples": 1}),
                (422, "num_examples", {"version": 3}),
                (422, "num_examples", {"version": 3, "num_examples": 2**63}),
                (422, "num_examples", {"version": 3, "num_examples": 10**400}),
                (409, "claims version 4", {"version": 4, "num_examples": 1}),
                (409, "stale", {"version": 1, "num_examples": 1}),
                (409, "not this client's open task", {"version": 3, "num_examples": 1,
                                                      "task_id": "u1.b"}),
            ]
            for code, words, params in refusals:
                params = {"task_id": tid, **params}
                detail = one_sentence(await post_update(client, cred, good, **params), code)
                assert words in detail, detail
                assert await model(client, cred) == before
            one_sentence(await post_update(client, cred, good, version=3, num_examples=1), 422)
            headers = {**bearer(cred), "X-Fedlearn-Run": "another-run"}
            response = await client.post("/api/update", params={
                "version": 3, "num_examples": 1, "task_id": tid}, content=good, headers=headers)
            assert "another-run" in one_sentence(response, 409)
            bad = encode({"w": np.array([np.nan, 1], np.float32)})
            one_sentence(await post_update(client, cred, bad, version=3, num_examples=1,
                                           task_id=tid), 400)
            assert await model(client, cred) == before
            assert (coord.state.version, coord.state.updates) == (3, 3)
            headers = {**bearer(cred), "X-Fedlearn-Run": RUN_ID}
            response = await client.post("/api/update", params={
                "version": 2, "num_examples": 1, "task_id": tid}, content=good, headers=headers)
            assert response.status_code == 200, response.text

    run(scenario)


def test_a_whole_async_run_with_concurrent_clients(
    tmp_path: Path, stores: list[Store]
) -> None:
    finished: list[bool] = []
    app, coord, merged = build(tmp_path, stores, async_policy="fedbuff:2", max_updates=12,
                               on_done=lambda: finished.append(True))
    deltas = {"a": 1.0, "b": -0.5, "c": 2.0}

    async def client_loop(client: httpx.AsyncClient, cid: str) -> int:
        cred = await register(client, cid)
        pushed = 0
        for _ in range(200):
            t = await task(client, cred)
            if t["action"] == "done":
                return pushed
            if t["action"] == "wait":
                continue
            data, version = await model(client, cred)
            decode(data, coord.spec)
            response = await post_update(client, cred, encode(vec(deltas[cid], 1)),
                                         version=int(version), num_examples=2,
                                         task_id=t["task_id"])
            if response.status_code == 200:
                pushed += 1
            else:
                assert "run is over" in one_sentence(response, 409)
        raise AssertionError(f"{cid} never heard 'done'")

    async def scenario() -> None:
        async with serving(app) as client:
            counts = await asyncio.gather(*(client_loop(client, cid) for cid in deltas))
            assert sum(counts) == 12
            await until(lambda: bool(finished))
            body = await status(client)
            assert body["state"] == "done" and body["updates"] == 12

    run(scenario)
    assert [m.update for m in merged] == list(range(1, 13))
    replay = make_policy("fedbuff:2")
    state = AsyncState(weights=vec(*INITIAL_W))
    for m in merged:
        state = replay.merge(state, vec(deltas[m.client_id], 1), m.num_examples, m.staleness)
    np.testing.assert_array_equal(coord.weights["w"], state.weights["w"])
    assert [r["update"] for r in coord.store.rounds()] == list(range(1, 13))


def test_an_update_for_another_run_is_refused_in_sync_mode_too(
    tmp_path: Path, stores: list[Store]
) -> None:
    app, coord = build_sync(tmp_path, stores, min_clients=1, rounds=1)

    async def scenario() -> None:
        async with serving(app) as client:
            cred = await register(client, "a")
            await until(lambda: coord.status()["state"] == "training")
            for run_header in ("another-run", ""):
                headers = {**bearer(cred), "X-Fedlearn-Run": run_header}
                response = await client.post(
                    "/api/update", params={"round": 1, "num_examples": 1},
                    content=encode(vec(1, 1)), headers=headers)
                one_sentence(response, 409)
            assert coord.status()["received"] == 0
            headers = {**bearer(cred), "X-Fedlearn-Run": RUN_ID}
            response = await client.post("/api/update", params={"round": 1, "num_examples": 1},
                                         content=encode(vec(1, 1)), headers=headers)
            assert response.json() == {"accepted": True, "round": 1}

    run(scenario)


@pytest.mark.parametrize("bad", [{"max_updates": None}, {"max_updates": 0},
                                 {"max_seconds": -1.0}, {"async_policy": "fedbuff"},
                                 {"eval_every": 0}, {"max_staleness": -1},
                                 {"staleness_fn": "sqrt"}, {"async_alpha": 2.0}])
def test_bad_async_configs_are_refused(bad: dict[str, Any]) -> None:
    from fedlearn.errors import ConfigError

    settings: dict[str, Any] = {"mode": "async", "max_updates": 5, **bad}
    with pytest.raises(ConfigError):
        ServerConfig(**settings)
