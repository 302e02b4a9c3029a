"""What the HTTP layer reads and answers, without FastAPI: bounded numbers, metrics JSON,
bodies with a size limit and a deadline, the error schema, and a registration rate limit.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request

from fedlearn.errors import PayloadError, PayloadTooLargeError, RateLimitedError

#: The most examples one client may claim (at registration, per update or evaluation).
MAX_EXAMPLES = 10**12
#: Seconds a request body may take to arrive (a slow upload is refused, not waited on).
BODY_SECONDS = 120.0
#: Registrations one address may make at once, then per second.
REGISTER_BURST = 1000.0
REGISTER_RATE = 100.0

#: Every error is ``{"detail": "<one sentence>"}``; the schema says so for each code.
_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": what, **_ERROR} for code, what in (
        (400, "a malformed request or payload"), (401, "a missing or wrong token"),
        (409, "not the right moment or task for it"), (413, "a body over the limit"),
        (422, "a missing or bad parameter"), (429, "too many registrations at once"))}
_SPEC_ENTRY = {"type": "object", "required": ["shape", "dtype"], "properties": {
    "shape": {"type": "array", "maxItems": 32,
              "items": {"type": "integer", "minimum": 0, "maximum": 2**40 - 1}},
    "dtype": {"type": "string"}}}
REGISTER_SCHEMA = {
    "type": "object", "required": ["client_id"],
    "properties": {
        "client_id": {"type": "string", "pattern": "^[ -~]{1,128}$"},
        "num_examples": {"type": "integer", "minimum": 0, "maximum": 10**12},
        "num_test_examples": {"type": "integer", "minimum": 0, "maximum": 10**12},
        "credential": {"type": "string"},
        "claim": {"type": "string"},
        "task": {"type": "object", "properties": {
            "name": {"type": "string"},
            "spec": {"type": "object", "additionalProperties": _SPEC_ENTRY}}},
    },
}
#: The most examples one client may claim (at registration, per update or evaluation).
MAX_EXAMPLES = 10**12


class RateLimit:
    """A token bucket per peer address: ``burst`` at once, then ``rate`` per second."""

    def __init__(self, burst: float, rate: float) -> None:
        self.burst = burst
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, peer: str) -> None:
        """Spend one token of ``peer``'s bucket, or refuse with 429."""
        now = time.monotonic()
        tokens, then = self._buckets.get(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            raise RateLimitedError(f"too many registrations from {peer}; retry in a second.")
        if len(self._buckets) > 100_000:
            self._buckets.clear()
        self._buckets[peer] = (tokens - 1, now)


def count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXAMPLES:
        value = int(value)  # JSON has one number type: 10.0 is the integer 10
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_EXAMPLES:
        raise PayloadError(f"{name} must be an integer from 0 to {MAX_EXAMPLES}.")
    return value


def metrics_json(text: str | None) -> dict[str, float]:
    """A JSON object of metric name -> finite number (at most 64 of them)."""
    if not text:
        return {}
    try:
        import json

        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PayloadError("metrics must be a JSON object of name -> number.") from exc
    if not isinstance(data, dict) or len(data) > 64:
        raise PayloadError("metrics must be a JSON object of at most 64 name -> number.")
    out: dict[str, float] = {}
    for k, v in data.items():
        if (not isinstance(k, str) or len(k) > 64 or isinstance(v, bool)
                or not isinstance(v, int | float)):
            raise PayloadError("metrics must map short names to numbers.")
        try:
            f = float(v)
        except OverflowError:
            continue
        if f == f and abs(f) != float("inf"):
            out[k] = f
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing it as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"body of {declared} bytes is over the limit of {limit}; send the run's model only."
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(
                        f"body is over the limit of {limit} bytes; send the run's model only."
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise PayloadError(f"the body did not arrive within {BODY_SECONDS:.0f} seconds; "
                           "send it at once.") from None
    return b"".join(chunks)
