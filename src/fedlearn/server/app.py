"""The thin web layer: ``create_app(coordinator)`` wraps a coordinator in FastAPI.

Long-polls hold no thread (they wait on an asyncio event); decoding,
validation, aggregation and evaluation run in the thread pool so the event
loop keeps serving other clients.

(No ``from __future__ import annotations`` here: FastAPI reads the handlers'
annotations at run time, and they name dependencies local to ``create_app``.)
"""

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fedlearn.errors import (
    AuthError,
    ConflictError,
    FedlearnError,
    PayloadError,
)
from fedlearn.server.coordinator_base import Coordinator
from fedlearn.server.store import hash_secret
from fedlearn.server.wire import (
    ERRORS,
    MAX_EXAMPLES,
    REGISTER_BURST,
    REGISTER_RATE,
    REGISTER_SCHEMA,
    RateLimit,
    count,
    metrics_json,
    read_body,
)
from fedlearn.weights import decode, spec_from_json

log = logging.getLogger("fedlearn.server")

MAX_POLL_SECONDS = 60.0
#: Update bodies read and decoded at once (the rest wait: memory does not grow with N).
UPLOADS_AT_ONCE = 16

class Hub:
    """Wakes every long-poll and the driver when the coordinator's state changes.

    ``notify`` may be called from any thread.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event = asyncio.Event()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the running loop (events must be made inside it)."""
        self.loop = loop
        self.event = asyncio.Event()

    def notify(self) -> None:
        """Thread-safe: wake everything waiting on the current event."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        old, self.event = self.event, asyncio.Event()
        old.set()


def _bearer(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise AuthError("missing 'Authorization: Bearer <token>' header; pass the run's token.")
    return authorization[len("Bearer ") :].strip()


def create_app(
    coordinator: Coordinator,
    *,
    join_token: str,
    run_id: str,
    info: dict[str, Any] | None = None,
    max_update_bytes: int | None = None,
    on_done: Any = None,
    docs: bool = True,
    allowed: dict[str, str] | None = None,
) -> FastAPI:
    """A FastAPI app serving the protocol of docs/protocol.md for ``coordinator``.

    The coordinator decides what ``POST /api/update`` takes
    (:attr:`~fedlearn.server.coordinator_base.Coordinator.update_query`): ``round=R``
    (sync) or ``version=V``, the version the delta was trained from (async).
    ``allowed`` (client id -> SHA-256 of its token, from ``--clients-file``) replaces
    the join token: only those clients, each with its own token, may register.
    """
    hub = Hub()
    limiter = RateLimit(REGISTER_BURST, REGISTER_RATE)
    uploads = asyncio.Semaphore(UPLOADS_AT_ONCE)
    previous = coordinator.on_change

    def on_change() -> None:
        previous()
        hub.notify()

    coordinator.on_change = on_change
    token_digest = hash_secret(join_token)
    limit = max_update_bytes or coordinator.config.max_update_bytes(64 * 1024 * 1024)
    details = dict(info or {})
    acknowledged: set[str] = set()
    done_event = asyncio.Event()

    async def drive() -> None:
        """Run the coordinator's steps whenever something changed or a deadline passed."""
        failing = 0
        while not coordinator.done:
            event = hub.event
            try:
                while await run_in_threadpool(coordinator.step):
                    pass
                if failing:
                    log.warning("the server works again after %d failed tries", failing)
                failing = 0
            except Exception as exc:  # a disk fault: keep serving, retry until it clears
                failing += 1
                if failing == 1 or failing % 30 == 0:
                    log.error("could not save the run (%s: %s); retrying every few seconds "
                              "(free disk space or fix permissions)", type(exc).__name__, exc)
            if coordinator.done:
                break
            wait = coordinator.seconds_to_deadline()
            if failing:
                wait = min(wait if wait is not None else 2.0, 2.0)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
            # cancellation that arrives just as the event is set, and the driver
            # (and so the app's shutdown) would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0 if wait is None else wait + 0.01):
                    await event.wait()
        done_event.set()
        if on_done is not None:
            await run_in_threadpool(on_done)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.bind(asyncio.get_running_loop())
        nonlocal done_event
        done_event = asyncio.Event()
        app.state.done_event = done_event
        driver = asyncio.create_task(drive())
        try:
            yield
        finally:
            driver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await driver

    app = FastAPI(
        title="fedlearn server",
        version="1",
        description="Federated averaging over HTTP. See docs/protocol.md.",
        lifespan=lifespan,
        # The browser views load third-party assets; the schema itself is always served.
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
    )
    app.state.coordinator = coordinator
    app.state.acknowledged = acknowledged

    @app.exception_handler(FedlearnError)
    async def fedlearn_error(request: Request, exc: FedlearnError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(
            {"detail": f"bad request ({'; '.join(parts)}); see docs/protocol.md."},
            status_code=422,
        )

    def join_auth(authorization: Annotated[str | None, Header()] = None) -> str:
        """The bearer token of a registration (checked once the client id is known)."""
        secret = _bearer(authorization)
        if allowed is None and not hmac.compare_digest(hash_secret(secret), token_digest):
            raise AuthError("wrong join token; use the token the server printed.")
        return secret

    def check_admission(client_id: str, secret: str) -> None:
        """With a clients file, only a listed client with its own token may register."""
        if allowed is None:
            return
        digest = allowed.get(client_id)
        if digest is None or not hmac.compare_digest(hash_secret(secret), digest):
            raise AuthError(f"client {client_id!r} is not in this run's clients file, or its "
                            "token is wrong; ask the operator for yours.")

    def client_auth(authorization: Annotated[str | None, Header()] = None) -> str:
        return coordinator.authenticate(_bearer(authorization))

    def any_auth(authorization: Annotated[str | None, Header()] = None) -> str | None:
        """None for the join token (the operator's full view), else the client's id."""
        secret = _bearer(authorization)
        if hmac.compare_digest(hash_secret(secret), token_digest):
            return None
        return coordinator.authenticate(secret)

    @app.post("/api/register", responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": REGISTER_SCHEMA}}}})
    async def register(
        request: Request, secret: Annotated[str, Depends(join_auth)]
    ) -> dict[str, Any]:
        """Register a client with the join token (or its own token from the run's clients
        file); returns its credential."""
        limiter.take(request.client.host if request.client else "?")
        body = await read_body(request, 64 * 1024)
        try:
            import json

            payload = json.loads(body or b"{}")
        except (ValueError, RecursionError) as exc:
            raise PayloadError("register body must be JSON like {\"client_id\": \"a\"}.") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("client_id"), str):
            raise PayloadError("register body must be JSON with a string client_id.")
        check_admission(payload["client_id"], secret)
        n = count(payload.get("num_examples"), "num_examples")
        n_test = count(payload.get("num_test_examples"), "num_test_examples")
        task_info = payload.get("task")
        identity, task_name = None, None
        if task_info is not None:
            if not isinstance(task_info, dict) or not isinstance(task_info.get("name", ""), str):
                raise PayloadError("task must be an object {name, spec}.")
            task_name = task_info.get("name")
            if task_info.get("spec") is not None:
                identity = spec_from_json(task_info["spec"])
        old, claim = payload.get("credential"), payload.get("claim")
        if any(v is not None and not isinstance(v, str) for v in (old, claim)):
            raise PayloadError("credential and claim must be strings.")
        credential = await run_in_threadpool(
            lambda: coordinator.register(payload["client_id"], n, num_test_examples=n_test,
                                         identity=identity, task_name=task_name,
                                         credential=old, claim=claim))
        return {
            "client_id": payload["client_id"],
            "credential": credential,
            "run_id": run_id,
            "mode": coordinator.mode,
            **coordinator.run_length(),
            "dataset": coordinator.config.dataset,
            "model": coordinator.config.model,
            "task": coordinator.task_name,
            "config": coordinator.train_config.as_dict(),
            # groups of arrays GET /api/model sends beside the model (SCAFFOLD: ["c"])
            "model_extras": list(coordinator.model_extras),
            **details,
        }

    @app.get("/api/task", responses=ERRORS)
    async def task(
        client_id: Annotated[str, Depends(client_auth)],
        wait: Annotated[float, Query(ge=0, le=MAX_POLL_SECONDS)] = 30.0,
    ) -> dict[str, Any]:
        """Long-poll for the next task: train, wait or done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait, MAX_POLL_SECONDS)
        while True:
            event = hub.event
            current = coordinator.poll(client_id)
            if current.action == "done":
                acknowledged.add(client_id)
            remaining = deadline - loop.time()
            if current.action != "wait" or remaining <= 0:
                return current.to_json()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await event.wait()

    @app.get("/api/model", dependencies=[Depends(client_auth)], response_class=Response,
             responses={**ERRORS, 200: {"description": "the global model (safetensors)",
                                        "content": {"application/octet-stream": {"schema": {
                                            "type": "string", "format": "binary"}}}}})
    async def model() -> Response:
        """The global model as safetensors bytes."""
        data, version = await run_in_threadpool(coordinator.model_bytes)
        return Response(
            content=data,
            media_type="application/octet-stream",
            headers={"X-Fedlearn-Version": str(version), "X-Fedlearn-Run": run_id},
        )

    @app.post("/api/update", responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string",
                                                          "format": "binary"}}}}})
    async def update(
        request: Request,
        client_id: Annotated[str, Depends(client_auth)],
        num_examples: Annotated[int, Query(ge=1, le=MAX_EXAMPLES)],
        round: Annotated[int | None, Query(ge=1, description="sync: the round trained for")]
        = None,
        version: Annotated[int | None, Query(
            ge=0, description="async: the model version the delta was trained from")] = None,
        train_loss: float | None = None,
        train_accuracy: float | None = None,
        seconds: float | None = None,
        task_id: Annotated[str | None, Query(max_length=300)] = None,
        metrics: Annotated[str | None, Query(max_length=4096,
                                             description="JSON object of name -> number")] = None,
        x_fedlearn_run: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """Upload one delta (safetensors body): for ``round`` (sync) or from ``version`` (async)."""
        name = coordinator.update_query
        number = version if name == "version" else round
        given = {name: number, "task_id": task_id}
        missing = [k for k in (name, *coordinator.update_requires) if given.get(k) is None]
        if number is None or missing:  # (number is None only when its name is missing)
            raise RequestValidationError([{"loc": ("query", k), "msg": "Field required"}
                                          for k in missing])
        if x_fedlearn_run is not None and x_fedlearn_run != run_id:
            raise ConflictError(
                f"this update is for run {x_fedlearn_run!r} but this server runs {run_id!r}; "
                "register with this server again."
            )
        coordinator.precheck(client_id, number, task_id)
        # At most UPLOADS_AT_ONCE bodies are read and decoded at a time: memory stays
        # flat however many clients upload together (the others wait their turn).
        async with uploads:
            body = await read_body(request, limit)
            delta = await run_in_threadpool(decode, body, coordinator.update_spec,
                                            max_bytes=limit)
            del body
        values = metrics_json(metrics)
        values.update({
            k: float(v)
            for k, v in (("train_loss", train_loss), ("train_accuracy", train_accuracy),
                         ("seconds", seconds))
            if v is not None
        })
        return await run_in_threadpool(
            coordinator.receive_update, client_id, number, delta, num_examples, values, task_id
        )

    @app.post("/api/withdraw", responses=ERRORS)
    async def withdraw(
        client_id: Annotated[str, Depends(client_auth)],
        task_id: Annotated[str, Query(max_length=300, description="the train task given up")],
        reason: Annotated[str, Query(max_length=300, description="why, for the server's "
                                     "log")] = "",
    ) -> dict[str, Any]:
        """Give up an open train task (the client will send no update for it, e.g. its own
        checks refused the update): the round stops waiting for this client."""
        await run_in_threadpool(coordinator.withdraw, client_id, task_id, reason)
        return {"withdrawn": True, "task_id": task_id}

    @app.post("/api/evaluate", responses=ERRORS)
    async def evaluate(
        client_id: Annotated[str, Depends(client_auth)],
        round: Annotated[int, Query(ge=0, le=2**62, description="the evaluation's key (the "
                                    "task's round)")],
        num_examples: Annotated[int, Query(ge=0, le=MAX_EXAMPLES)],
        metrics: Annotated[str, Query(max_length=4096,
                                      description="JSON object of name -> number")] = "{}",
    ) -> dict[str, Any]:
        """A federated-evaluation answer: the client's metrics on its own test data."""
        values = metrics_json(metrics)
        await run_in_threadpool(
            coordinator.submit_evaluation, client_id, round, values, num_examples)
        return {"accepted": True, "round": round}

    @app.get("/api/status", responses=ERRORS)
    async def status(viewer: Annotated[str | None, Depends(any_auth)]) -> dict[str, Any]:
        """Run id, state, round or version, clients and metrics history (a client sees
        counts and its own record; the join token sees every client id)."""
        return {"run_id": run_id, **coordinator.status(viewer)}

    if coordinator.secagg is not None:
        from fedlearn.server.secagg_routes import add_secagg_routes

        add_secagg_routes(app, coordinator, wake=lambda: hub.event, client_auth=client_auth)
    return app


