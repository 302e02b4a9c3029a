"""The /api/secagg routes in-process (httpx.ASGITransport, the driver running): three
clients mask and sum a round over HTTP; bad requests get one sentence and a 4xx."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedlearn.client.secagg import SecAggTask, check_update
from fedlearn.privacy.secagg import SecAggClient
from fedlearn.privacy.secagg_messages import KeyAdvert, ShareInbox, UnmaskRequest
from fedlearn.privacy.secagg_update import EXTRA, client_vector
from fedlearn.server.store import Store
from tests.unit.test_app import (
    INITIAL_W,
    bearer,
    build,
    one_sentence,
    post_update,
    register,
    run,
    serving,
    status,
    until,
    vec,
)

DELTAS = {"a": ((0.1, -0.2), 10), "b": ((-0.3, 0.4), 30), "c": ((0.05, 0.05), 60)}


async def task_of(client: httpx.AsyncClient, cred: str) -> dict[str, Any]:
    response = await client.get("/api/task", params={"wait": 5}, headers=bearer(cred))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["action"] == "train" and "secagg" in body
    return body


async def stages(client: httpx.AsyncClient, cred: str, task: dict[str, Any],
                 d: tuple[float, float], n: int) -> None:
    """One client's four stages over HTTP, long-polling for each."""
    block = SecAggTask.from_json(task["secagg"])
    sa = SecAggClient(block.index, block.params())
    params = {"task_id": task["task_id"]}
    values = check_update(block, vec(*INITIAL_W), vec(*d), n)

    async def post(name: str, **extra: Any) -> None:
        body = extra.pop("body")
        kind = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        content = body if isinstance(body, bytes) else None
        response = await client.post(f"/api/secagg/{name}", params={**params, **extra},
                                     json=None if content is not None else body,
                                     content=content,
                                     headers={**bearer(cred), "Content-Type": kind})
        assert response.status_code == 200, response.text

    async def fetch(name: str) -> dict[str, Any]:
        while True:
            response = await client.get(f"/api/secagg/{name}", params={**params, "wait": 5},
                                        headers=bearer(cred))
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["ready"]:
                return body

    await post("advert", body=sa.advertise().to_json(), num_examples=n)
    published = await fetch("keys")
    vector = client_vector(values.values, num_examples=n, example_scale=published["example_scale"],
                           train_loss=0.5, clip=block.clip_range)
    keys = [KeyAdvert.from_json(k) for k in published["keys"]]
    await post("shares", body=sa.share_keys(keys).to_json())
    inbox = ShareInbox.from_json((await fetch("inbox"))["inbox"])
    await post("masked", body=sa.masked_input(vector, inbox).masked)
    request = UnmaskRequest.from_json((await fetch("unmask"))["request"])
    await post("unmask", body=sa.unmask(request).to_json())


def test_three_clients_sum_a_round_over_http(tmp_path: Path, stores: list[Store]) -> None:
    app, coord = build(tmp_path, stores, min_clients=3, rounds=1, secagg=True,
                       secagg_timeout=5.0)

    async def scenario() -> None:
        async with serving(app) as client:
            creds = {cid: await register(client, cid) for cid in DELTAS}
            tasks = {cid: await task_of(client, creds[cid]) for cid in DELTAS}
            a, task_id = creds["a"], tasks["a"]["task_id"]
            # Keys are for clients that advertised theirs; a plain update is refused.
            response = await client.get("/api/secagg/keys", headers=bearer(a),
                                        params={"task_id": task_id, "wait": 0})
            one_sentence(response, 409)
            response = await post_update(client, a, b"x", round=1, num_examples=1)
            assert "/api/secagg" in one_sentence(response, 409)
            await asyncio.gather(*(stages(client, creds[cid], tasks[cid], *DELTAS[cid])
                                   for cid in DELTAS))
            await until(lambda: coord.state.version == 1 and bool(coord.history))
            record = coord.history[0]
            assert record["clients"] == 3 and record["examples"] == 100
            assert (await status(client))["version"] == 1

    run(scenario)
    total = sum(n for _, n in DELTAS.values())
    mean = sum(np.array(d) * n for d, n in DELTAS.values()) / total
    np.testing.assert_allclose(coord.weights["w"], np.array(INITIAL_W) + mean, atol=1e-6)


def test_bad_secagg_requests_get_one_sentence(tmp_path: Path, stores: list[Store]) -> None:
    app, coord = build(tmp_path, stores, min_clients=2, secagg=True)

    async def scenario() -> None:
        async with serving(app) as client:
            creds = {cid: await register(client, cid) for cid in ("a", "b")}
            task = await task_of(client, creds["a"])
            a, params = creds["a"], {"task_id": task["task_id"]}
            advert = SecAggClient(task["secagg"]["index"],
                                  SecAggTask.from_json(task["secagg"]).params()).advertise()
            for headers in ({}, bearer("nope")):
                response = await client.post("/api/secagg/advert", params=params,
                                             json=advert.to_json(), headers=headers)
                one_sentence(response, 401)
            response = await client.post("/api/secagg/advert", params=params,
                                         json=advert.to_json(), headers=bearer(a))
            assert "num_examples" in one_sentence(response, 422)
            response = await client.post("/api/secagg/advert",
                                         params={**params, "num_examples": 10},
                                         content=b"{not json", headers=bearer(a))
            one_sentence(response, 400)
            response = await client.post("/api/secagg/advert",
                                         params={"task_id": "r1.0.b", "num_examples": 10},
                                         json=advert.to_json(), headers=bearer(a))
            one_sentence(response, 409)
            limit = 8 * (2 + EXTRA) + 1024
            response = await client.post("/api/secagg/masked", params=params,
                                         content=b"\0" * (limit + 1),
                                         headers={**bearer(a),
                                                  "Content-Type": "application/octet-stream"})
            one_sentence(response, 413)
            response = await client.post("/api/secagg/advert",
                                         params={**params, "num_examples": 10},
                                         json=advert.to_json(), headers=bearer(a))
            assert response.json() == {"accepted": True, "round": 1}
            response = await client.get("/api/secagg/keys", headers=bearer(a),
                                        params={**params, "wait": 0.1})
            assert response.json() == {"ready": False}  # b is still training
            assert coord.status()["secagg"]["advertised"] == 1
            schema = (await client.get("/openapi.json")).json()
            assert {"/api/secagg/advert", "/api/secagg/keys", "/api/secagg/shares",
                    "/api/secagg/inbox", "/api/secagg/masked",
                    "/api/secagg/unmask"} <= set(schema["paths"])

    run(scenario)
