"""The HTTP side of a client: :class:`RemoteServer` speaks ``docs/protocol.md``.

This is the only client module that uses httpx, and it imports httpx only
when a :class:`RemoteServer` is made, so the training loop in
:mod:`fedlearn.client.worker` (which needs the message types, the
:class:`ServerUnavailable` error and :func:`with_retries` from here) never
loads it.

Status codes map onto the exception tree: ``401`` is :class:`AuthError`,
``409`` is :class:`ConflictError`, any other ``4xx`` is :class:`RemoteError`
carrying the server's ``detail`` sentence, and a refused connection, a
timeout or a ``5xx`` is :class:`ServerUnavailable`, the one error that
:func:`with_retries` retries.
"""

from __future__ import annotations

import json
import math
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedlearn.errors import AuthError, ConfigError, ConflictError, RemoteError
from fedlearn.types import Weights
from fedlearn.weights import decode, encode

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

#: Longest long-poll the protocol allows (``GET /api/task?wait=S``, S at most 60).
MAX_POLL_WAIT = 60.0
#: Seconds allowed to open a connection.
CONNECT_TIMEOUT = 5.0
#: Seconds added to the long-poll wait before a read counts as timed out.
READ_MARGIN = 30.0
ACTIONS = ("train", "evaluate", "wait", "done")


class ServerUnavailable(RemoteError):
    """The server could not be reached, timed out, or answered with a 5xx status.

    ``url`` is the server's base URL; :func:`with_retries` names it when it gives up.
    """

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class PayloadRefused(RemoteError):
    """The server refused an update as malformed, too large or over its norm limit (HTTP 400
    or 413 to ``POST /api/update``)."""


class RetriesExhausted(RemoteError):
    """The server stayed unreachable through every retry of :func:`with_retries`."""


@dataclass(frozen=True)
class Registration:
    """The answer to ``POST /api/register``: our credential and what the run is."""

    client_id: str
    credential: str = field(repr=False)
    run_id: str
    mode: str
    dataset: str
    model: str
    rounds: int
    task: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    #: groups of arrays ``GET /api/model`` sends beside the model (SCAFFOLD: ``("c",)``)
    model_extras: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """The answer to ``GET /api/task``: ``train`` (round, version, seed, the round's
    config; under secure aggregation ``secagg``, what the client needs to mask its
    update), ``evaluate`` (round, version), ``wait`` or ``done``."""

    action: str
    round: int = 0
    version: int = 0
    seed: int = 0
    task_id: str = ""
    config: dict[str, Any] | None = None
    secagg: dict[str, Any] | None = None


def backoff_delay(k: int, *, base: float, max_wait: float) -> float:
    """The longest sleep before retry ``k`` (0-based): ``min(max_wait, base * 2**k)``."""
    return min(max_wait, base * 2.0 ** min(k, 64))


def with_retries(
    fn: Callable[[], T],
    *,
    max_retries: int,
    max_wait: float,
    base: float = 0.5,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, float, ServerUnavailable], None] | None = None,
) -> T:
    """Call ``fn`` and retry it with jittered exponential backoff while the server is down.

    Only :class:`ServerUnavailable` is retried; every other error propagates at
    once. Before retry ``k`` (0-based) it sleeps a uniform time in
    ``[d_k / 2, d_k]`` with ``d_k = min(max_wait, base * 2**k)``, and calls
    ``on_retry(k + 1, seconds, error)`` first. ``fn`` is tried at most
    ``max_retries + 1`` times; if every try fails it raises :class:`RetriesExhausted`
    (a :class:`RemoteError`) saying the server could not be reached. Each call
    starts again from ``d_0``.

    With the defaults (``max_retries=30``, ``max_wait=10``, ``base=0.5``) the 30
    sleeps are 0.5, 1, 2, 4, 8 and then 25 x 10 seconds at most: a client gives
    up after between 132.75 s (best case, every sleep at its lower bound) and
    265.5 s (worst case, every sleep at its upper bound) of sleeping, plus the
    time the failed tries themselves took; so a server restart of a minute or
    two is ridden out.
    """
    if max_retries < 0:
        raise ConfigError(f"max retries must be >= 0, got {max_retries}.")
    if not max_wait > 0 or not base > 0:
        raise ConfigError(f"backoff waits must be positive, got max_wait={max_wait}, "
                          f"base={base}.")
    rand = rng if rng is not None else random.Random()
    k = 0
    while True:
        try:
            return fn()
        except ServerUnavailable as exc:
            if k >= max_retries:
                where = exc.url or "the given URL"
                raise RetriesExhausted(
                    f"could not reach the server at {where} after {k + 1} tries; check that "
                    "`fedlearn server` is running and --server is right."
                ) from exc
            delay = backoff_delay(k, base=base, max_wait=max_wait)
            seconds = rand.uniform(delay / 2.0, delay)
            if on_retry is not None:
                on_retry(k + 1, seconds, exc)
            sleep(seconds)
            k += 1


def _ssl_context(ca_file: str | Path) -> ssl.SSLContext:
    path = Path(ca_file)
    try:
        if path.is_dir():
            return ssl.create_default_context(capath=str(path))
        return ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot use CA file {path} ({exc}); pass the PEM certificate the server uses "
            "with --ca-file."
        ) from exc


def _detail(response: httpx.Response) -> str:
    """The server's one-sentence ``detail``, or the start of the body when there is none."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI's validation errors: [{"loc": [...], "msg": ...}]
        parts = [
            f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg', d)}"
            if isinstance(d, dict) else str(d)
            for d in detail
        ]
        return "; ".join(parts) + "."
    if detail is not None:
        return str(detail)
    text = response.text.strip()
    return text[:200] if text else f"HTTP {response.status_code} {response.reason_phrase}"


def _metrics_json(metrics: Mapping[str, float]) -> str:
    """The finite metrics as a compact JSON object (at most 64, short names)."""
    clean = {str(k)[:64]: float(v) for k, v in list(metrics.items())[:64]
             if v is not None and math.isfinite(float(v))}
    return json.dumps(clean, separators=(",", ":"))


def _number(text: float) -> str:
    """A query value: integral floats without a fractional part (``30`` not ``30.0``)."""
    return str(int(text)) if float(text).is_integer() else repr(float(text))


class RemoteServer:
    """One fedlearn server, reached over HTTP(S) with one ``httpx.Client``.

    ``token`` is the join token, sent to ``/api/register``; every later call
    carries the credential that registration returned. ``ca_file`` is a PEM
    file (or directory) of certificates to trust for an https server.
    ``transport`` replaces the network (``httpx.MockTransport`` in tests).
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        ca_file: str | Path | None = None,
        client_cert: tuple[str, str] | None = None,
        poll_wait: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import httpx

        self._httpx = httpx
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ConfigError(f"server URL {url!r} is not valid ({exc}); pass e.g. "
                              "--server http://10.0.0.5:8000.") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"server URL {url!r} must start with http:// or https:// and "
                              "name a host; pass e.g. --server http://10.0.0.5:8000.")
        if not token:
            raise ConfigError("the join token is empty; pass the token `fedlearn server` "
                              "printed with --token or --token-file.")
        self.url = url.rstrip("/")
        self._token = token
        self.credential: str | None = None
        self.run_id: str | None = None
        verify: ssl.SSLContext | bool = True if ca_file is None else _ssl_context(ca_file)
        if client_cert is not None:  # mutual TLS: present our certificate to the server
            if not isinstance(verify, ssl.SSLContext):
                verify = ssl.create_default_context()
            try:
                verify.load_cert_chain(*client_cert)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot use the client certificate {client_cert[0]} ({exc}); "
                                  "check --tls-client-cert and --tls-client-key.") from exc
        self._client = httpx.Client(
            base_url=self.url,
            verify=verify,
            timeout=httpx.Timeout(max(poll_wait, 0.0) + READ_MARGIN, connect=CONNECT_TIMEOUT),
            transport=transport,
            headers={"Accept": "application/json"},
        )

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        bearer: str,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        httpx = self._httpx
        all_headers = {"Authorization": f"Bearer {bearer}", **(headers or {})}
        try:
            response = self._client.request(
                method, path, params=params, content=content, headers=all_headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            kind = type(exc).__name__
            raise ServerUnavailable(
                f"the server at {self.url} did not answer {method} {path} ({kind}: {exc}).",
                self.url,
            ) from exc
        code = response.status_code
        if code < 400:
            return response
        detail = _detail(response)
        if code >= 500 or code == 429:  # busy: retried with backoff like a restart
            raise ServerUnavailable(
                f"the server at {self.url} answered {code} to {method} {path}: {detail}",
                self.url,
            )
        if code == 401:
            raise AuthError(detail)
        if code == 409:
            raise ConflictError(detail)
        if code in (400, 413) and path == "/api/update":
            raise PayloadRefused(f"the server refused {method} {path} ({code}): {detail}")
        raise RemoteError(f"the server refused {method} {path} ({code}): {detail}")

    def _json(self, response: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise RemoteError(f"the server's answer to {what} is not a JSON object; check that "
                              f"{self.url} is a fedlearn server.")
        return body

    def _bearer(self) -> str:
        return self.credential if self.credential is not None else self._token

    def register(
        self, client_id: str, num_examples: int | None, *,
        num_test_examples: int | None = None, task: Mapping[str, Any] | None = None,
        credential: str | None = None, claim: str | None = None,
    ) -> Registration:
        """``POST /api/register`` with the join token; keeps and returns the credential.

        ``task`` is ``{"name", "spec"}``: the server refuses a different task.
        ``credential`` is this id's current credential, needed to register an id again.
        """
        payload: dict[str, Any] = {"client_id": client_id}
        if credential is not None:
            payload["credential"] = credential
        if claim is not None:  # this client's own secret: a retried registration is ours
            payload["claim"] = claim
        if num_examples is not None:
            payload["num_examples"] = int(num_examples)
        if num_test_examples is not None:
            payload["num_test_examples"] = int(num_test_examples)
        if task is not None:
            payload["task"] = dict(task)
        body = self._json(self._request(
            "POST", "/api/register", bearer=self._token, content=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        ), "register")
        try:
            reg = Registration(
                client_id=str(body.get("client_id", client_id)),
                credential=str(body["credential"]),
                run_id=str(body["run_id"]),
                mode=str(body["mode"]),
                dataset=str(body["dataset"]),
                model=str(body["model"]),
                rounds=int(body["rounds"]),
                task=str(body.get("task") or ""),
                config=dict(body.get("config") or {}),
                model_extras=tuple(str(g) for g in body.get("model_extras") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"the server's registration answer lacks a valid {exc}; check "
                              "that the server runs the same fedlearn version.") from exc
        self.credential = reg.credential
        self.run_id = reg.run_id
        return reg

    def next_task(self, wait: float) -> Task:
        """``GET /api/task?wait=S``: long-poll up to ``wait`` seconds (at most 60) for work."""
        httpx = self._httpx
        seconds = min(max(float(wait), 0.0), MAX_POLL_WAIT)
        body = self._json(self._request(
            "GET", "/api/task", bearer=self._bearer(), params={"wait": _number(seconds)},
            timeout=httpx.Timeout(seconds + READ_MARGIN, connect=CONNECT_TIMEOUT),
        ), "task")
        action = body.get("action")
        if action not in ACTIONS:
            raise RemoteError(f"the server sent an unknown task action {action!r}; use the same "
                              "fedlearn version on server and clients.")
        if action not in ("train", "evaluate"):
            return Task(action=str(action))
        try:
            # An async run's tasks have no round.
            config = body.get("config")
            secagg = body.get("secagg")
            return Task(action=str(action), round=int(body.get("round", 0)),
                        version=int(body["version"]), seed=int(body.get("seed", 0)),
                        task_id=str(body.get("task_id") or ""),
                        config=dict(config) if isinstance(config, dict) else None,
                        secagg=dict(secagg) if isinstance(secagg, dict) else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"the server sent a train task without a valid {exc}; use the "
                              "same fedlearn version on server and clients.") from exc

    def get_model(self, max_bytes: int = 1 << 40) -> tuple[Weights, int]:
        """``GET /api/model``: the global weights and their version (``X-Fedlearn-Version``)."""
        response = self._request("GET", "/api/model", bearer=self._bearer(),
                                 headers={"Accept": "application/octet-stream"})
        raw = response.headers.get("X-Fedlearn-Version")
        try:
            version = int(raw) if raw is not None else -1
        except ValueError:
            version = -1
        if version < 0:
            raise RemoteError(f"the server's model has no valid X-Fedlearn-Version header "
                              f"(got {raw!r}); use the same fedlearn version on server and "
                              "clients.")
        return decode(response.content, max_bytes=max_bytes), version

    def submit_update(
        self, round: int, delta: Weights, num_examples: int, metrics: Mapping[str, float],
        task_id: str | None = None,
    ) -> None:
        """``POST /api/update`` (sync): the delta as safetensors, with round, count and metrics.

        Only finite metrics are sent (as a JSON object in ``metrics``).
        """
        self._post_update({"round": str(int(round))}, delta, num_examples, metrics, task_id)

    def withdraw(self, task_id: str, reason: str = "") -> None:
        """``POST /api/withdraw``: give up train task ``task_id`` (no update will come)."""
        self._request("POST", "/api/withdraw", bearer=self._bearer(),
                      params={"task_id": task_id, "reason": reason[:300]})

    def submit_evaluation(
        self, round: int, metrics: Mapping[str, float], num_examples: int
    ) -> None:
        """``POST /api/evaluate``: this client's metrics of the global model on its test data."""
        self._request("POST", "/api/evaluate", bearer=self._bearer(), params={
            "round": str(int(round)), "num_examples": str(int(num_examples)),
            "metrics": _metrics_json(metrics)})

    def push_update(
        self, version: int, delta: Weights, num_examples: int, metrics: Mapping[str, float],
        task_id: str | None = None,
    ) -> dict[str, Any]:
        """``POST /api/update?version=V`` (async): a delta trained from model version ``V``.

        Returns the server's answer (``update``, ``staleness``, ``server_version``).
        """
        return self._json(
            self._post_update({"version": str(int(version))}, delta, num_examples, metrics,
                              task_id),
            "update",
        )

    def _post_update(
        self, params: dict[str, str], delta: Weights, num_examples: int,
        metrics: Mapping[str, float], task_id: str | None = None,
    ) -> httpx.Response:
        params = {**params, "num_examples": str(int(num_examples)),
                  "metrics": _metrics_json(metrics)}
        if task_id:
            params["task_id"] = task_id
        headers = {"Content-Type": "application/octet-stream"}
        if self.run_id is not None:
            headers["X-Fedlearn-Run"] = self.run_id
        return self._request("POST", "/api/update", bearer=self._bearer(), params=params,
                             content=encode(delta), headers=headers)

    def secagg_post(self, name: str, task_id: str, body: bytes | Mapping[str, Any],
                    num_examples: int | None = None) -> None:
        """``POST /api/secagg/<name>?task_id=T``: this client's message for a stage of
        secure aggregation (JSON; bytes for ``masked``); ``num_examples`` goes with its keys
        (``advert``)."""
        if isinstance(body, bytes):
            content, kind = body, "application/octet-stream"
        else:
            content, kind = json.dumps(body, separators=(",", ":")).encode(), "application/json"
        params = {"task_id": task_id}
        if num_examples is not None:
            params["num_examples"] = str(int(num_examples))
        self._request("POST", f"/api/secagg/{name}", bearer=self._bearer(),
                      params=params, content=content,
                      headers={"Content-Type": kind})

    def secagg_fetch(self, name: str, task_id: str, wait: float) -> dict[str, Any] | None:
        """``GET /api/secagg/<name>?task_id=T&wait=S``: what this client needs before a
        stage, or None when the stage did not open within ``wait`` seconds (at most 60)."""
        httpx = self._httpx
        seconds = min(max(float(wait), 0.0), MAX_POLL_WAIT)
        body = self._json(self._request(
            "GET", f"/api/secagg/{name}", bearer=self._bearer(),
            params={"task_id": task_id, "wait": _number(seconds)},
            timeout=httpx.Timeout(seconds + READ_MARGIN, connect=CONNECT_TIMEOUT),
        ), f"secagg {name}")
        return body if body.get("ready") is True else None

    def status(self) -> dict[str, Any]:
        """``GET /api/status``: the run's state, round and accuracy history."""
        return self._json(self._request("GET", "/api/status", bearer=self._bearer()), "status")

