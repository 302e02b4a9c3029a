"""The FastAPI app in-process through httpx.ASGITransport, with its lifespan (the driver) running.

No sockets and no starlette TestClient: each test is one ``asyncio.run`` of a
scenario bounded by ``asyncio.wait_for``; the coordinator is real, with a real
Store in tmp and toy two-number weights.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI

from fedlearn.config import ServerConfig, TrainConfig, build_strategy
from fedlearn.seeding import task_seed
from fedlearn.server.app import create_app
from fedlearn.server.coordinator import SyncCoordinator
from fedlearn.server.store import Store
from fedlearn.types import EvalResult, Weights
from fedlearn.weights import decode, encode

TOKEN = "join-token-for-tests"
RUN_ID = "run-test"
INITIAL_W = [1.0, -1.0]
SCENARIO_TIMEOUT = 60.0

Request = Callable[[], Awaitable[httpx.Response]]


def vec(a: float, b: float) -> Weights:
    return {"w": np.array([a, b], np.float32)}


def evaluator(weights: Weights) -> EvalResult:
    values = [float(x) for x in weights["w"]]
    return EvalResult({"accuracy": values[0], "loss": values[1]}, 1)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def one_sentence(response: httpx.Response, status: int) -> str:
    """The response's ``detail``, checked to be the protocol's one-sentence error."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail.endswith(".") and "\n" not in detail and len(detail) < 300, detail
    return detail


def build(
    tmp_path: Path, stores: list[Store], *, max_update_bytes: int | None = None,
    on_done: Callable[[], None] | None = None, allowed: dict[str, str] | None = None,
    **config: Any,
) -> tuple[FastAPI, SyncCoordinator]:
    settings: dict[str, Any] = {"rounds": 2, "min_clients": 2, "round_timeout": 120.0, "seed": 3,
                                "dataset": "toy", "model": "pair"}
    settings.update(config)
    store = Store(tmp_path)
    stores.append(store)
    cfg = ServerConfig(**settings)
    coord = SyncCoordinator(
        cfg, vec(*INITIAL_W), strategy=build_strategy(cfg), store=store, evaluator=evaluator
    )
    app = create_app(coord, join_token=TOKEN, run_id=RUN_ID, max_update_bytes=max_update_bytes,
                     on_done=on_done, allowed=allowed)
    return app, coord


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan entered (so the driver runs) and a client for it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout=SCENARIO_TIMEOUT)

    started = time.monotonic()
    asyncio.run(bounded())
    # On Python 3.11 wait_for can return instead of raising when the scenario
    # swallows the cancellation, so check the time too.
    assert time.monotonic() - started < SCENARIO_TIMEOUT, "the scenario hit its time limit"


async def register(client: httpx.AsyncClient, cid: str, n: int | None = 10) -> str:
    body: dict[str, Any] = {"client_id": cid}
    if n is not None:
        body["num_examples"] = n
    response = await client.post("/api/register", json=body, headers=bearer(TOKEN))
    assert response.status_code == 200, response.text
    return str(response.json()["credential"])


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(loop(), timeout=timeout)


async def status(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/api/status", headers=bearer(TOKEN))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def post_update(
    client: httpx.AsyncClient, cred: str | None, body: bytes, **params: Any
) -> httpx.Response:
    headers = {"Content-Type": "application/octet-stream"}
    if cred is not None:
        headers.update(bearer(cred))
    return await client.post("/api/update", params=params, content=body, headers=headers)


async def model(client: httpx.AsyncClient, cred: str) -> tuple[bytes, str]:
    response = await client.get("/api/model", headers=bearer(cred))
    assert response.status_code == 200, response.text
    return response.content, response.headers["X-Fedlearn-Version"]


# -- register -------------------------------------------------------------------------


def test_register_checks_the_join_token_and_the_body(tmp_path: Path, stores: list[Store]) -> None:
    app, coord = build(tmp_path, stores)

    async def scenario() -> None:
        async with serving(app) as client:
            good = {"client_id": "a", "num_examples": 5}
            for headers in ({}, bearer("wrong-token"), {"Authorization": TOKEN},
                            {"Authorization": "Basic abc"}, bearer("")):
                response = await client.post("/api/register", json=good, headers=headers)
                one_sentence(response, 401)
            assert coord.status()["registered"] == 0

            for body in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"client_id": 7}', b"{}",
                         b'{"client_id": "a", "num_examples": -1}',
                         b'{"client_id": "a", "num_examples": "many"}',
                         b'{"client_id": ""}'):
                response = await client.post(
                    "/api/register", content=body, headers=bearer(TOKEN)
                )
                one_sentence(response, 400)
            response = await client.post(
                "/api/register", content=b" " * (64 * 1024 + 1), headers=bearer(TOKEN)
            )
            one_sentence(response, 413)
            assert coord.status()["registered"] == 0

            response = await client.post("/api/register", json=good, headers=bearer(TOKEN))
            assert response.status_code == 200
            reg = response.json()
            assert reg["client_id"] == "a"
            assert (reg["run_id"], reg["mode"], reg["dataset"], reg["model"], reg["rounds"]) == (
                RUN_ID, "sync", "toy", "pair", 2)
            assert isinstance(reg["credential"], str) and len(reg["credential"]) >= 32
            assert coord.authenticate(reg["credential"]) == "a"
            # the credential is not the join token, and the join token is not a credential
            response = await client.get("/api/task?wait=0", headers=bearer(TOKEN))
            one_sentence(response, 401)
            response = await client.get("/api/task?wait=0", headers=bearer(reg["credential"]))
            assert response.json() == {"action": "wait"}
            response = await client.post(
                "/api/register", json={"client_id": "b"}, headers=bearer(reg["credential"])
            )
            one_sentence(response, 401)

    run(scenario)


# -- task long-poll and model ------------------------------------------------------------


def test_task_long_poll_waits_then_wakes_when_the_round_starts(
    tmp_path: Path, stores: list[Store]
) -> None:
    app, coord = build(tmp_path, stores, min_clients=2)

    async def scenario() -> None:
        async with serving(app) as client:
            cred_a = await register(client, "a")
            started = time.monotonic()
            response = await client.get("/api/task", params={"wait": 0.2},
                                        headers=bearer(cred_a))
            elapsed = time.monotonic() - started
            assert response.status_code == 200
            assert response.json() == {"action": "wait"}
            assert 0.2 <= elapsed < 3.0

            for bad in ("-1", "soon"):
                response = await client.get("/api/task", params={"wait": bad},
                                            headers=bearer(cred_a))
                one_sentence(response, 422)
            for headers in ({}, bearer("nope"), bearer(TOKEN)):
                one_sentence(await client.get("/api/task", headers=headers), 401)

            # a poll already waiting wakes up as soon as the second client registers
            waiting = asyncio.create_task(
                client.get("/api/task", params={"wait": 30}, headers=bearer(cred_a))
            )
            await asyncio.sleep(0.3)
            assert not waiting.done()
            started = time.monotonic()
            await register(client, "b")
            response = await asyncio.wait_for(waiting, timeout=10)
            assert time.monotonic() - started < 5.0
            assert response.json() == {"action": "train", "round": 1, "version": 0,
                                       "seed": task_seed(3, 1, "a"), "task_id": "r1.0.a",
                                       "config": TrainConfig().as_dict()}
            assert coord.status()["state"] == "training"

    run(scenario)


def test_model_is_the_global_weights_as_safetensors(tmp_path: Path, stores: list[Store]) -> None:
    app, coord = build(tmp_path, stores)

    async def scenario() -> None:
        async with serving(app) as client:
            cred = await register(client, "a")
            response = await client.get("/api/model", headers=bearer(cred))
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/octet-stream"
            assert response.headers["X-Fedlearn-Version"] == "0"
            assert response.headers["X-Fedlearn-Run"] == RUN_ID
            weights = decode(response.content, coord.spec)
            assert weights["w"].tolist() == INITIAL_W
            assert weights["w"].dtype == np.float32
            for headers in ({}, bearer("nope"), bearer(TOKEN)):
                one_sentence(await client.get("/api/model", headers=headers), 401)

    run(scenario)


# -- updates and their refusals -------------------------------------------------------


def test_update_is_accepted_and_every_refusal_changes_nothing(
    tmp_path: Path, stores: list[Store]
) -> None:
    good = encode(vec(1, 1))
    limit = len(good) + 16
    app, coord = build(tmp_path, stores, max_update_bytes=limit, min_clients=3, fraction=0.5,
                       rounds=3)

    async def scenario() -> None:
        async with serving(app) as client:
            creds = {cid: await register(client, cid) for cid in "abc"}
            await until(lambda: coord.status()["state"] == "training")
            first = (await status(client))["sampled"]
            assert len(first) == 2  # ceil(0.5 * 3)
            for cid, delta in zip(first, (1.0, 3.0), strict=True):
                task = (await client.get("/api/task", params={"wait": 5},
                                         headers=bearer(creds[cid]))).json()
                assert task["action"] == "train" and task["round"] == 1
                response = await post_update(client, creds[cid], encode(vec(delta, delta)),
                                             round=1, num_examples=1, train_loss=0.5)
                assert response.status_code == 200, response.text
                assert response.json() == {"accepted": True, "round": 1}
            await until(lambda: coord.status()["round"] == 2)
            assert coord.weights["w"].tolist() == [3.0, 1.0]  # [1, -1] + (1 + 3) / 2

            sampled = (await status(client))["sampled"]
            assert len(sampled) == 2
            sender, other = sampled
            outsider = next(cid for cid in "abc" if cid not in sampled)
            response = await post_update(client, creds[sender], good, round=2, num_examples=2)
            assert response.status_code == 200, response.text
            before = await model(client, creds[sender])
            assert before[1] == "1"
            state_before = coord.status()
            assert state_before["received"] == 1

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(limit // 8 + 2):
                    yield b"\x00" * 8

            def send(cred: str | None, body: bytes, **params: Any) -> Request:
                return lambda: post_update(client, cred, body, **params)

            def f32(*values: float) -> bytes:
                return encode({"w": np.array(values, np.float32)})

            mine, theirs = creds[other], creds[outsider]
            refusals: list[tuple[int, str, Request]] = [
                (401, "credential", send("wrong", good, round=2, num_examples=1)),
                (401, "Authorization", send(None, good, round=2, num_examples=1)),
                (401, "credential", send(TOKEN, good, round=2, num_examples=1)),
                (400, "shape", send(mine, f32(0, 0, 0), round=2, num_examples=1)),
                (400, "dtype", send(mine, encode({"w": np.zeros(2, np.float64)}),
                                    round=2, num_examples=1)),
                (400, "missing w", send(mine, encode({"v": np.zeros(2, np.float32)}),
                                        round=2, num_examples=1)),
                (400, "NaN", send(mine, f32(np.nan, 1), round=2, num_examples=1)),
                (400, "NaN", send(mine, f32(1, -np.inf), round=2, num_examples=1)),
                (400, "safetensors", send(mine, b"certainly not safetensors bytes",
                                          round=2, num_examples=1)),
                (400, "safetensors", send(mine, b"", round=2, num_examples=1)),
                (413, "limit", send(mine, b"\x00" * (limit + 1), round=2, num_examples=1)),
                (413, "limit", lambda: client.post(
                    "/api/update", params={"round": 2, "num_examples": 1}, content=chunks(),
                    headers=bearer(mine))),
                (422, "round", send(mine, good, num_examples=1)),
                (422, "round", send(mine, good, round=0, num_examples=1)),
                (422, "round", send(mine, good, round="two", num_examples=1)),
                (422, "num_examples", send(mine, good, round=2)),
                (422, "num_examples", send(mine, good, round=2, num_examples=0)),
                (409, "not open", send(mine, good, round=1, num_examples=1)),  # closed
                (409, "not open", send(mine, good, round=3, num_examples=1)),  # future
                (409, "not sampled", send(theirs, good, round=2, num_examples=1)),
                (409, "already sent", send(creds[sender], good, round=2, num_examples=1)),
            ]
            for code, words, request in refusals:
                response = await request()
                detail = one_sentence(response, code)
                assert words in detail, (code, detail)
                assert await model(client, creds[sender]) == before, detail
                after = coord.status()
                assert (after["round"], after["version"], after["received"]) == (2, 1, 1)

            assert decode(before[0])["w"].tolist() == [3.0, 1.0]
            response = await post_update(client, creds[other], encode(vec(4, 4)),
                                         round=2, num_examples=2)
            assert response.status_code == 200, response.text
            await until(lambda: coord.status()["version"] == 2)
            assert coord.weights["w"].tolist() == [5.5, 3.5]  # [3, 1] + (2*1 + 2*4) / 4

    run(scenario)


# -- status and the schema -------------------------------------------------------------


def test_status_needs_a_token_or_credential_and_openapi_is_public(
    tmp_path: Path, stores: list[Store]
) -> None:
    app, _ = build(tmp_path, stores)

    async def scenario() -> None:
        async with serving(app) as client:
            cred = await register(client, "a")
            for headers in (bearer(TOKEN), bearer(cred)):
                response = await client.get("/api/status", headers=headers)
                assert response.status_code == 200
                body = response.json()
                assert body["run_id"] == RUN_ID
                assert (body["mode"], body["state"], body["round"], body["rounds"]) == (
                    "sync", "waiting", 0, 2)
                assert (body["registered"], body["active"], body["history"]) == (1, 1, [])
            for headers in ({}, bearer("nope"), {"Authorization": "Token x"}):
                one_sentence(await client.get("/api/status", headers=headers), 401)

            response = await client.get("/openapi.json")
            assert response.status_code == 200
            paths = response.json()["paths"]
            for path in ("/api/register", "/api/task", "/api/model", "/api/update",
                         "/api/status"):
                assert path in paths
            response = await client.get("/docs")
            assert response.status_code == 200
            assert "text/html" in response.headers["content-type"]

    run(scenario)


# -- a whole run --------------------------------------------------------------------------


def test_a_whole_two_round_run(tmp_path: Path, stores: list[Store]) -> None:
    finished: list[bool] = []
    app, coord = build(tmp_path, stores, rounds=2, on_done=lambda: finished.append(True))
    deltas = {"a": (1.0, 1), "b": (4.0, 3)}

    async def client_loop(client: httpx.AsyncClient, cid: str) -> list[int]:
        cred = await register(client, cid, 5)
        trained: list[int] = []
        for _ in range(50):
            response = await client.get("/api/task", params={"wait": 5}, headers=bearer(cred))
            assert response.status_code == 200, response.text
            task = response.json()
            if task["action"] == "done":
                return trained
            if task["action"] == "wait":
                continue
            assert task["action"] == "train"
            assert task["seed"] == task_seed(3, task["round"], cid)
            data, version = await model(client, cred)
            assert int(version) == task["version"] == task["round"] - 1
            decode(data, coord.spec)
            value, n = deltas[cid]
            response = await post_update(client, cred, encode(vec(value, value)),
                                         round=task["round"], num_examples=n,
                                         train_loss=0.25, train_accuracy=0.5, seconds=0.01)
            assert response.status_code == 200, response.text
            trained.append(task["round"])
        raise AssertionError(f"{cid} never heard 'done'")

    async def scenario() -> None:
        async with serving(app) as client:
            results = await asyncio.gather(client_loop(client, "a"), client_loop(client, "b"))
            assert results == [[1, 2], [1, 2]]
            body = await status(client)
            assert body["state"] == "done"
            assert body["round"] == 2
            # each round: + (1*1 + 4*3) / 4 = 3.25
            assert body["history"] == [
                {"round": 1, "accuracy": 4.25, "loss": 2.25},
                {"round": 2, "accuracy": 7.5, "loss": 5.5},
            ]
            for cid in ("late-a", "late-b"):
                cred = await register(client, cid)  # a late registration hears done too
                response = await client.get("/api/task", params={"wait": 5},
                                            headers=bearer(cred))
                assert response.json() == {"action": "done"}
            data, version = await model(client, cred)
            assert version == "2"
            assert decode(data)["w"].tolist() == [7.5, 5.5]
            await until(lambda: bool(finished))
            assert app.state.done_event.is_set()
            assert app.state.acknowledged == {"a", "b", "late-a", "late-b"}

    run(scenario)
    assert coord.done
    assert [r["round"] for r in coord.store.rounds()] == [1, 2]


def test_the_driver_closes_a_round_at_its_deadline(tmp_path: Path, stores: list[Store]) -> None:
    app, coord = build(tmp_path, stores, rounds=1, round_timeout=0.5, min_results=1)

    async def scenario() -> None:
        async with serving(app) as client:
            cred_a = await register(client, "a")
            await register(client, "b")  # b is sampled but never answers
            task = (await client.get("/api/task", params={"wait": 5},
                                     headers=bearer(cred_a))).json()
            assert task["action"] == "train"
            started = time.monotonic()
            response = await post_update(client, cred_a, encode(vec(2, 2)), round=1,
                                         num_examples=1)
            assert response.status_code == 200
            response = await client.get("/api/task", params={"wait": 10}, headers=bearer(cred_a))
            assert response.json() == {"action": "done"}  # woken when the deadline closed it
            assert time.monotonic() - started < 5.0
            body = await status(client)
            assert body["history"] == [{"round": 1, "accuracy": 3.0, "loss": 1.0}]
            assert body["active"] == 1  # b was dropped

    run(scenario)
    record = coord.history[0]
    # b never picked up its task, so it was swapped out (nobody was left to take its place)
    assert (record["clients"], record["sampled"]) == (1, 1)


def test_a_withdrawn_task_closes_the_round_without_its_update(
        tmp_path: Path, stores: list[Store]) -> None:
    app, coord = build(tmp_path, stores, rounds=1, round_timeout=60.0, min_results=1)

    async def scenario() -> None:
        async with serving(app) as client:
            cred = {cid: await register(client, cid) for cid in ("a", "b")}
            tasks = {cid: (await client.get("/api/task", params={"wait": 5},
                                            headers=bearer(c))).json() for cid, c in cred.items()}
            assert all(t["action"] == "train" for t in tasks.values())
            response = await client.post("/api/withdraw", params={"task_id": "r1.0.b"})
            one_sentence(response, 401)
            response = await client.post("/api/withdraw", params={"task_id": "r1.0.a"},
                                         headers=bearer(cred["b"]))
            assert "not this client's open task" in one_sentence(response, 409)
            response = await client.post("/api/withdraw", headers=bearer(cred["b"]),
                                         params={"task_id": tasks["b"]["task_id"],
                                                 "reason": "NaN in the update"})
            assert response.json() == {"withdrawn": True, "task_id": tasks["b"]["task_id"]}
            response = await post_update(client, cred["a"], encode(vec(2, 2)), round=1,
                                         num_examples=1)
            assert response.status_code == 200
            response = await client.get("/api/task", params={"wait": 10},
                                        headers=bearer(cred["a"]))
            assert response.json() == {"action": "done"}  # long before the 60 s deadline

    run(scenario)
    record = coord.history[0]
    assert (record["clients"], record["sampled"], record["withdrawn"]) == (1, 2, 1)


def test_credentials_survive_a_restart(tmp_path: Path, stores: list[Store]) -> None:
    first, _ = build(tmp_path, stores)
    creds: dict[str, str] = {}

    async def before() -> None:
        async with serving(first) as client:
            for cid in "ab":
                creds[cid] = await register(client, cid)

    run(before)
    second, coord = build(tmp_path, stores)  # a new coordinator and app on the same store

    async def after() -> None:
        async with serving(second) as client:
            assert coord.status()["registered"] == 2
            response = await client.get("/api/task", params={"wait": 0.2},
                                        headers=bearer(creds["a"]))
            assert response.json() == {"action": "wait"}  # b has not been seen yet
            response = await client.get("/api/task", params={"wait": 5},
                                        headers=bearer(creds["b"]))
            assert response.json()["action"] == "train"
            one_sentence(await client.get("/api/task", headers=bearer("stale")), 401)

    run(after)


def test_shutdown_stops_the_driver_even_just_after_a_wake_up(
    tmp_path: Path, stores: list[Store]
) -> None:
    """The lifespan's exit cancels the driver; a cancel landing as it wakes must not be lost."""

    async def cycle(k: int) -> bool:
        app, coord = build(tmp_path / str(k), stores)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        await asyncio.sleep(0.05)  # the driver is waiting for a change
        coord.on_change()  # a change wakes it ...
        for _ in range(k):
            await asyncio.sleep(0)
        exiting = asyncio.create_task(lifespan.__aexit__(None, None, None))  # ... and we stop
        done, _ = await asyncio.wait({exiting}, timeout=2.0)
        if not done:  # the driver lost its cancel: end the run so it exits, then fail
            coord.phase = "done"
            coord.on_change()
            await asyncio.wait_for(exiting, timeout=10.0)
        return bool(done)

    async def scenario() -> None:
        stopped = [await cycle(k) for k in range(6)]
        assert stopped == [True] * 6

    run(scenario)
