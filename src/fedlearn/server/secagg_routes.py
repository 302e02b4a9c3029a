"""The HTTP routes of secure aggregation (``--secagg``), added by ``create_app``.

``POST /api/secagg/{advert,shares,masked,unmask}?task_id=T`` carry a client's
message for a stage (JSON; ``masked`` is the vector as little-endian uint64
bytes); ``GET /api/secagg/{keys,inbox,unmask}?task_id=T&wait=S`` long-poll for
what a client needs before a stage: ``{"ready": false}`` until the stage
opens, then ``{"ready": true, ...}``. Every request carries the client's
credential and names its train task; see docs/protocol.md.

(No ``from __future__ import annotations``: FastAPI reads the handlers'
annotations at run time.)
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from fedlearn.server.coordinator_base import Coordinator
from fedlearn.server.secagg_round import FETCHES, POSTS
from fedlearn.server.wire import ERRORS, MAX_EXAMPLES, read_body

MAX_POLL_SECONDS = 60.0
#: Bytes of a JSON stage message: room for one share (about 230 bytes) per client and more.
JSON_BASE_BYTES = 64 * 1024
JSON_BYTES_PER_CLIENT = 512

_BINARY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
_JSON = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object"}}}}}
_WHAT = {
    "advert": "Stage 0: the client's two X25519 public keys (its training is over).",
    "shares": "Stage 1: the client's encrypted shares, one per neighbour.",
    "masked": "Stage 2: the client's masked, quantised update (little-endian uint64).",
    "unmask": "Stage 3: the shares the unmask request asks this client to reveal.",
    "keys": "Before stage 1: every advertised public key, once training is over.",
    "inbox": "Before stage 2: the encrypted shares addressed to this client.",
}


def add_secagg_routes(app: FastAPI, coordinator: Coordinator, *, wake: Callable[[], Any],
                      client_auth: Callable[..., str]) -> None:
    """Add the secure aggregation routes for ``coordinator`` to ``app``.

    ``wake()`` returns the asyncio event set at the coordinator's next change
    (the app's hub), ``client_auth`` the dependency that authenticates a
    client's credential.
    """
    plan = coordinator.secagg
    if plan is None:
        return
    json_limit = JSON_BASE_BYTES + JSON_BYTES_PER_CLIENT * coordinator.config.max_clients
    masked_limit = 8 * plan.layout.dimension + 1024

    def poster(name: str) -> Callable[..., Awaitable[dict[str, Any]]]:
        async def post(
            request: Request,
            client_id: Annotated[str, Depends(client_auth)],
            task_id: Annotated[str, Query(max_length=300, description="the train task's id")],
            num_examples: Annotated[int | None, Query(
                ge=1, le=MAX_EXAMPLES, description="advert: the examples the client trained on"
            )] = None,
        ) -> dict[str, Any]:
            if name == "advert" and num_examples is None:
                raise RequestValidationError([{"loc": ("query", "num_examples"),
                                               "msg": "Field required"}])
            body = await read_body(request, masked_limit if name == "masked" else json_limit)
            return await run_in_threadpool(coordinator.secagg_post, client_id, task_id, name,
                                           body, num_examples)

        post.__doc__ = _WHAT[name]
        return post

    def fetcher(name: str) -> Callable[..., Awaitable[dict[str, Any]]]:
        async def fetch(
            client_id: Annotated[str, Depends(client_auth)],
            task_id: Annotated[str, Query(max_length=300, description="the train task's id")],
            wait: Annotated[float, Query(ge=0, le=MAX_POLL_SECONDS)] = 30.0,
        ) -> dict[str, Any]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while True:
                event = wake()
                answer = coordinator.secagg_fetch(client_id, task_id, name)
                if answer is not None:
                    return {"ready": True, **answer}
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return {"ready": False}
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await event.wait()

        fetch.__doc__ = _WHAT.get(name, "Before stage 3: who survived and who dropped.")
        return fetch

    for name in POSTS:
        app.post(f"/api/secagg/{name}", responses=ERRORS, name=f"secagg_post_{name}",
                 openapi_extra=_BINARY if name == "masked" else _JSON)(poster(name))
    for name in FETCHES:
        app.get(f"/api/secagg/{name}", responses=ERRORS, name=f"secagg_fetch_{name}")(
            fetcher(name))
