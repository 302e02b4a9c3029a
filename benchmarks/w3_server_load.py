"""W3 of BENCHMARKS.md: the server under load, with and without misbehaving clients.

A real ``fedlearn server`` process (digits, mlp, one round) and N HTTP clients
on 127.0.0.1 in one asyncio process, each with its own httpx connection pool
(one pool shared by a thousand clients spends most of this process's CPU in
httpcore's pool bookkeeping). An honest client registers, long-polls for its
train task, downloads the model and uploads a precomputed valid delta (0.001
for every float value); nobody trains. The server's resident memory and CPU
time are sampled every 50 ms; the table shows both processes' CPU seconds, so a
run where the clients, not the server, were the bottleneck is visible.

Modes:

- ``honest``: N honest clients (``--min-clients N``).
- ``bad``: 10% of the clients (at least one of each kind) misbehave, round-robin:
  garbage bytes, a tensor of the wrong shape, a NaN, a made-up credential, a
  replay of an honest client's task id, a body a few MB over the limit (with a
  Content-Length, or chunked), and a slowloris connection that sends a partial
  request header a byte a second (opened before anyone registers, held until
  every honest client heard "done"). All but the wrong-token ones register and are
  sampled, so their uploads reach the server's checks; ``--min-clients`` counts
  every client that registers, and the round closes at ``--round-timeout``
  without the bad ones.
- ``bad-late``: the same clients, but ``--min-clients`` is the honest count and
  the bad ones register once round 1 is open, so they are outside the sample
  (the server refuses their uploads before reading the body) unless the server
  swaps them in for sampled clients that did not pick up their task in time.

Checks, each a FAILED line and a non-zero exit: a 5xx anywhere, a bad request
not answered 4xx, an honest client refused, a wait past its timeout, a final
model (the server's model.safetensors) other than initial + 0.001 on every
float value, a round that did not aggregate exactly the honest clients.

    nice -n 10 python benchmarks/w3_server_load.py                  # N = 50, 200, 1000
    nice -n 10 python benchmarks/w3_server_load.py --sizes 50,200
    nice -n 10 python benchmarks/w3_server_load.py --quick          # N = 20, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_json

from fedlearn.weights import decode, encode, nbytes

KINDS = ("garbage", "wrong-shape", "nan", "wrong-token", "replay", "oversized",
         "oversized-chunked", "slowloris")
MODES = ("honest", "bad", "bad-late")
EXAMPLES = 10
STEP = np.float32(0.001)
OVER_LIMIT = 3 * 1024 * 1024  # bytes beyond the server's update limit
START_TIMEOUT = 120.0  # seconds for the server to listen
EXIT_TIMEOUT = 60.0  # seconds for the server to exit after the round


def n_bad(n: int) -> int:
    """How many of ``n`` clients misbehave: 10%, but at least one of each kind."""
    return min(n - 1, max(n // 10, len(KINDS)))


# -- the server process -----------------------------------------------------------
def start_server(run: Path, min_clients: int, max_clients: int, round_timeout: float,
                 log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start ``fedlearn server`` on a free port; (process, url, join token) once it answers."""
    cmd = [sys.executable, "-m", "fedlearn.cli.main", "server", "--host", "127.0.0.1",
           "--port", "0", "--dataset", "digits", "--model", "mlp", "--rounds", "1",
           "--min-clients", str(min_clients), "--round-timeout", str(round_timeout),
           "--max-clients", str(max_clients), "--out", str(run)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before listening; "
                               f"see {log}")
        endpoint, token_file = run / "server.json", run / "join-token"
        if endpoint.exists() and token_file.exists():
            url = json.loads(endpoint.read_text())["url"]
            token = token_file.read_text().strip()
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{url}/api/status", timeout=5.0,
                              headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    return proc, url, token
        time.sleep(0.1)
    stop_server(proc)
    raise RuntimeError(f"the server did not answer within {START_TIMEOUT:.0f} s; see {log}")


def stop_server(proc: subprocess.Popen[bytes]) -> str:
    """Wait for the server to exit on its own, else stop it (by its pid); how it ended."""
    try:
        proc.wait(timeout=EXIT_TIMEOUT)
        return f"exited {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        proc.wait(timeout=10)
        return f"did not exit within {EXIT_TIMEOUT:.0f} s; terminated"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return f"did not exit within {EXIT_TIMEOUT:.0f} s; killed"


class PeakRss:
    """Polls a process's resident memory every 50 ms in a thread; keeps the max and its CPU."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.baseline = self.proc.memory_info().rss
        self.peak = self.baseline
        self.cpu_start = sum(self.proc.cpu_times()[:2])
        self.cpu = self.cpu_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                self.cpu = sum(self.proc.cpu_times()[:2])
            except psutil.Error:
                return

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        self._thread.join(timeout=5)


# -- payloads ---------------------------------------------------------------------
@dataclass
class Payloads:
    """The model as first downloaded and every body the clients send."""

    initial: dict[str, np.ndarray]
    delta: bytes
    garbage: bytes
    wrong_shape: bytes
    nan: bytes
    oversized: bytes
    limit: int

    @classmethod
    def from_model(cls, initial: dict[str, np.ndarray], seed: int) -> Payloads:
        """Bodies for a model: the honest delta and one body for each bad kind."""
        delta = {k: np.full_like(v, STEP) if v.dtype.kind == "f" else np.zeros_like(v)
                 for k, v in initial.items()}
        first = next(k for k, v in delta.items() if v.dtype.kind == "f")
        shape = dict(delta)
        shape[first] = np.full((delta[first].shape[0] + 1, *delta[first].shape[1:]), STEP,
                               dtype=delta[first].dtype)
        nan = {k: v.copy() for k, v in delta.items()}
        nan[first].flat[0] = np.nan
        good = encode(delta)
        # The server's rule (ServerConfig.max_update_bytes): model bytes * 1.25 + 64 KiB.
        limit = int(nbytes(initial) * 1.25) + 64 * 1024
        rng = np.random.default_rng(seed)
        return cls(initial=initial, delta=good, garbage=rng.bytes(len(good)),
                   wrong_shape=encode(shape), nan=encode(nan),
                   oversized=rng.bytes(limit + OVER_LIMIT), limit=limit)


# -- one run ----------------------------------------------------------------------
@dataclass
class Run:
    """What the clients of one run share and record."""

    url: str
    token: str
    tls: ssl.SSLContext
    seed: int
    late: bool
    payloads: asyncio.Future[Payloads]
    round_open: asyncio.Event = field(default_factory=asyncio.Event)
    accepted_task: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    uploads: list[tuple[float, float]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    bad: list[dict[str, Any]] = field(default_factory=list)
    slow: list[dict[str, Any]] = field(default_factory=list)
    stage: dict[str, str] = field(default_factory=dict)
    honest_done: asyncio.Event = field(default_factory=asyncio.Event)
    honest_unfinished: int = 0
    sessions: dict[str, httpx.AsyncClient] = field(default_factory=dict)
    upload_slots: asyncio.Semaphore | None = None  # None: every upload at once

    def http(self, who: str) -> httpx.AsyncClient:
        """The client's own connection pool.

        One pool per client, as on separate machines: a single pool shared by a
        thousand clients costs O(connections) of CPU per request in httpcore, and
        this process, not the server, would be what is measured.
        """
        if who not in self.sessions:
            self.sessions[who] = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=2), verify=self.tls,
                timeout=httpx.Timeout(90.0, connect=60.0, pool=60.0))
        return self.sessions[who]

    async def call(self, who: str, method: str, path: str, secret: str,
                   **kw: Any) -> httpx.Response | None:
        """One request; a 5xx is recorded, a transport error is None (and recorded)."""
        what = f"{method} {path} (client {who})"
        try:
            r = await self.http(who).request(method, self.url + path,
                                        headers={"Authorization": f"Bearer {secret}"}, **kw)
        except httpx.HTTPError as exc:
            self.refused.append(f"{what}: no answer ({type(exc).__name__}: {exc})")
            return None
        if r.status_code >= 500:
            self.server_errors.append(f"{what}: {r.status_code} {r.text[:300]}")
        return r

    async def poll(self, who: str, secret: str, want: tuple[str, ...]) -> dict[str, Any] | None:
        """Long-poll ``GET /api/task`` until its action is one of ``want``."""
        while True:
            r = await self.call(who, "GET", "/api/task?wait=60", secret)
            if r is None or r.status_code != 200:
                return None
            task: dict[str, Any] = r.json()
            if task.get("action") in want:
                return task

    async def register(self, who: str) -> str | None:
        """``POST /api/register``; the credential."""
        self.stage[who] = "register"
        r = await self.call(who, "POST", "/api/register", self.token,
                            json={"client_id": who, "num_examples": EXAMPLES})
        if r is None or r.status_code != 200:
            return None
        return str(r.json()["credential"])

    async def honest(self, i: int) -> None:
        """Register, wait for the train task, pull the model, upload the delta, wait for done."""
        who = f"c{i}"
        try:
            await self._honest(who)
        finally:
            self.honest_unfinished -= 1
            if self.honest_unfinished == 0:
                self.honest_done.set()

    async def _honest(self, who: str) -> None:
        secret = await self.register(who)
        if secret is None:
            self.refused.append(f"POST /api/register (client {who}) was refused")
            return
        self.stage[who] = "task"
        task = await self.poll(who, secret, ("train", "done"))
        if task is None or task["action"] != "train":
            self.refused.append(f"client {who} got no train task ({task})")
            return
        self.round_open.set()
        self.stage[who] = "model"
        r = await self.call(who, "GET", "/api/model", secret)
        if r is None or r.status_code != 200:
            self.refused.append(f"GET /api/model (client {who}) was refused")
            return
        model = decode(r.content)
        if not self.payloads.done():
            self.payloads.set_result(Payloads.from_model(model, self.seed))
        body = self.payloads.result().delta
        self.stage[who] = "upload"
        path = (f"/api/update?round={task['round']}&num_examples={EXAMPLES}"
                f"&task_id={task['task_id']}")
        async with self.upload_slots or contextlib.nullcontext():
            t0 = time.perf_counter()
            r = await self.call(who, "POST", path, secret, content=body)
            t1 = time.perf_counter()
        if r is None or r.status_code != 200 or not r.json().get("accepted"):
            code = None if r is None else f"{r.status_code} {r.text[:200]}"
            self.refused.append(f"POST {path} (client {who}) was refused: {code}")
            return
        self.uploads.append((t0, t1))
        if not self.accepted_task.done():
            self.accepted_task.set_result(str(task["task_id"]))
        self.stage[who] = "done-poll"
        if await self.poll(who, secret, ("done",)) is None:
            self.refused.append(f"client {who} never heard 'done'")
        self.stage[who] = "finished"

    async def misbehave(self, j: int, kind: str) -> None:
        """One bad client of ``kind``; its answers go to ``self.bad`` / ``self.slow``."""
        who = f"b{j}"
        if kind == "slowloris":  # open before anyone registers, to span the whole run
            slow = asyncio.create_task(self.slowloris(who))
        if self.late:
            self.stage[who] = "wait-round"
            await self.round_open.wait()
        if kind == "wrong-token":
            payloads = await self.payloads
            path = f"/api/update?round=1&num_examples={EXAMPLES}&task_id=r1.0.{who}"
            await self.record(who, kind, "POST", path, secrets.token_urlsafe(32),
                              content=payloads.delta)
            return
        secret = await self.register(who)
        if secret is None:
            self.bad.append({"client": who, "kind": kind, "request": "POST /api/register",
                             "status": None, "detail": "register refused"})
            if kind == "slowloris":
                await slow
            return
        if kind == "slowloris":
            await slow
        else:
            await self.bad_upload(who, kind, secret)
        # A sampled client that has not sent an update is answered "train" at once
        # until the round closes: wait for the honest clients to hear "done" rather
        # than spin on /api/task (the server waits for this client's "done" too).
        self.stage[who] = "wait-honest"
        await self.honest_done.wait()
        self.stage[who] = "done-poll"
        await self.poll(who, secret, ("done",))
        self.stage[who] = "finished"

    async def bad_upload(self, who: str, kind: str, secret: str) -> None:
        """Send one bad update for this client's task (or the task it would have had)."""
        round_number, task_id = 1, f"r1.0.{who}"
        if not self.late:
            self.stage[who] = "task"
            task = await self.poll(who, secret, ("train", "done"))
            if task is not None and task["action"] == "train":
                round_number, task_id = task["round"], task["task_id"]
        self.stage[who] = "payload"
        payloads = await self.payloads
        body: Any = {"garbage": payloads.garbage, "wrong-shape": payloads.wrong_shape,
                     "nan": payloads.nan, "replay": payloads.delta,
                     "oversized": payloads.oversized}.get(kind)
        if kind == "oversized-chunked":
            body = chunks(payloads.oversized)
        if kind == "replay":
            self.stage[who] = "wait-accepted"
            task_id = await self.accepted_task
        path = f"/api/update?round={round_number}&num_examples={EXAMPLES}&task_id={task_id}"
        self.stage[who] = "upload"
        await self.record(who, kind, "POST", path, secret, content=body)

    async def record(self, who: str, kind: str, method: str, path: str, secret: str,
                     **kw: Any) -> None:
        """Send one bad request and keep its answer."""
        try:
            r = await self.http(who).request(method, self.url + path,
                                        headers={"Authorization": f"Bearer {secret}"}, **kw)
            status, detail = r.status_code, r.text[:200]
        except httpx.HTTPError as exc:
            status, detail = None, f"no answer ({type(exc).__name__}: {exc})"
        self.bad.append({"client": who, "kind": kind, "request": f"{method} {path}",
                         "status": status, "detail": detail})
        if status is not None and status >= 500:
            self.server_errors.append(f"{method} {path} (client {who}, {kind}): {status} "
                                      f"{detail}")

    async def slowloris(self, who: str) -> None:
        """A partial request header, one byte a second, until every honest client heard done."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.stage[who] = "slowloris"
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (f"POST /api/update?round=1&num_examples={EXAMPLES} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\nX-Slow: ").encode()
        writer.write(head)
        sent, answer, closed_after = len(head), b"", None
        try:
            await writer.drain()
            while not self.honest_done.is_set():
                try:
                    async with asyncio.timeout(1.0):
                        data = await reader.read(4096)
                    if not data:
                        closed_after = time.perf_counter() - t0
                        break
                    answer += data
                except TimeoutError:
                    pass
                writer.write(b"a")
                await writer.drain()
                sent += 1
        except (ConnectionError, OSError):
            closed_after = time.perf_counter() - t0
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        first = answer.split(b"\r\n", 1)[0].decode("latin-1")
        self.slow.append({"client": who, "held_seconds": round(time.perf_counter() - t0, 2),
                          "bytes_sent": sent, "server_closed_after_s": closed_after,
                          "answer": first or None})


async def chunks(data: bytes, size: int = 256 * 1024) -> Any:
    """``data`` as a chunked body (no Content-Length)."""
    for k in range(0, len(data), size):
        yield data[k:k + size]


async def drive(url: str, token: str, n: int, mode: str, seed: int,
                deadline: float, in_flight: int = 0) -> Run:
    """All N clients of one run, at once."""
    bad = 0 if mode == "honest" else n_bad(n)
    loop = asyncio.get_running_loop()
    run = Run(url=url, token=token, tls=ssl.create_default_context(), seed=seed,
              late=mode == "bad-late", payloads=loop.create_future(),
              honest_unfinished=n - bad,
              upload_slots=asyncio.Semaphore(in_flight) if in_flight else None)
    jobs = [run.honest(i) for i in range(n - bad)]
    jobs += [run.misbehave(j, KINDS[j % len(KINDS)]) for j in range(bad)]
    try:
        async with asyncio.timeout(deadline):
            await asyncio.gather(*jobs)
    except TimeoutError:
        stuck = Counter(s for s in run.stage.values() if s != "finished")
        run.refused.append(f"clients still waiting after {deadline:.0f} s, by stage: "
                           f"{dict(stuck)}")
    finally:
        for session in run.sessions.values():
            await session.aclose()
    return run


def check_model(run_dir: Path, initial: dict[str, np.ndarray] | None) -> tuple[bool, float, str]:
    """Does the server's final model equal initial + 0.001 on every float value?"""
    path = run_dir / "model.safetensors"
    if initial is None or not path.exists():
        return False, float("nan"), f"no {'initial model' if initial is None else path}"
    final = decode(path.read_bytes())
    worst = 0.0
    for k, v in initial.items():
        want = v + STEP if v.dtype.kind == "f" else v
        err = float(np.max(np.abs(final[k].astype(np.float64) - want.astype(np.float64))))
        worst = max(worst, err)
        if final[k].dtype != v.dtype or not np.allclose(final[k], want, rtol=1e-6, atol=1e-6):
            return False, worst, f"{k} differs from initial + mean honest delta (max {err:.3g})"
    return True, worst, ""


def one_run(n: int, mode: str, seed: int, round_timeout: float, work: Path,
            in_flight: int = 0) -> dict[str, Any]:
    """Start a server, drive N clients, stop it, and check everything."""
    bad = 0 if mode == "honest" else n_bad(n)
    honest = n - bad
    wrong_token = sum(1 for j in range(bad) if KINDS[j % len(KINDS)] == "wrong-token")
    min_clients = n - wrong_token if mode == "bad" else honest
    run_dir = work / f"{mode}-{n}"
    log = work / f"{mode}-{n}.log"
    proc, url, token = start_server(run_dir, min_clients, n + 1000, round_timeout, log)
    rss = PeakRss(proc.pid)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        run = asyncio.run(drive(url, token, n, mode, seed, deadline=round_timeout + 180.0,
                                in_flight=in_flight))
    finally:
        ended = stop_server(proc)
        rss.stop()
    wall, client_cpu = time.perf_counter() - t0, time.process_time() - c0
    problems = [f"5xx: {e}" for e in run.server_errors]
    problems += [f"honest client refused or stuck: {e}" for e in run.refused]
    if "exited 0" not in ended:
        problems.append(f"server {ended}")
    text = log.read_text(errors="replace")
    if "Traceback" in text:
        at = text.index("Traceback")
        problems.append(f"the server logged a traceback: {text[at:at + 600]!r}")
    answered = [b for b in run.bad if b["status"] is not None and 400 <= b["status"] < 500]
    problems += [f"bad request not answered 4xx: {b['request']} ({b['client']}, {b['kind']}) "
                 f"-> {b['status']} {b['detail']}" for b in run.bad if b not in answered]
    initial = run.payloads.result().initial if run.payloads.done() else None
    same, worst, why = check_model(run_dir, initial)
    if not same:
        problems.append(f"model mismatch: {why}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    aggregated = rows[-1].get("clients") if rows else None
    if aggregated != honest:
        problems.append(f"round 1 aggregated {aggregated} clients, not the {honest} honest ones")
    lat = np.array([b - a for a, b in run.uploads]) * 1000
    window = (max(b for _, b in run.uploads) - min(a for a, _ in run.uploads)
              if run.uploads else float("nan"))
    return {
        "n": n, "mode": mode, "uploads_in_flight": in_flight or None, "honest": honest,
        "bad": bad, "min_clients": min_clients,
        "accepted": len(run.uploads),
        "updates_per_second": len(run.uploads) / window if run.uploads else 0.0,
        "upload_window_seconds": window,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "server_baseline_mb": rss.baseline / 2**20, "server_peak_mb": rss.peak / 2**20,
        "bad_4xx": len(answered), "bad_requests": len(run.bad),
        "bad_codes": dict(Counter(f"{b['kind']}:{b['status']}" for b in run.bad)),
        "bad_answers": run.bad, "slowloris": run.slow,
        "model_equal": same, "model_max_abs_error": worst,
        "update_limit_bytes": run.payloads.result().limit if run.payloads.done() else None,
        "model_bytes": len(run.payloads.result().delta) if run.payloads.done() else None,
        "wall_seconds": wall, "server_cpu_seconds": rss.cpu - rss.cpu_start,
        "client_cpu_seconds": client_cpu, "server": ended, "server_log": str(log),
        "problems": problems,
    }


def slowloris_summary(slow: list[dict[str, Any]]) -> str:
    """One line for a run's slowloris connections: how long held, who closed them."""
    if not slow:
        return ""
    closed = [s["server_closed_after_s"] for s in slow if s["server_closed_after_s"] is not None]
    answers = sorted({s["answer"] for s in slow if s["answer"]})
    held = max(s["held_seconds"] for s in slow)
    text = f"{len(slow)} connection(s), held up to {held:.1f} s; "
    text += (f"{len(closed)} closed by the server after {min(closed):.1f}-{max(closed):.1f} s"
             if closed else "none closed by the server")
    return text + (f"; answered {answers}" if answers else "; no answer")


def grouped(problems: list[str]) -> dict[str, tuple[int, str]]:
    """Problems that differ only in client or task ids, counted: pattern -> (count, first)."""
    out: dict[str, tuple[int, str]] = {}
    for p in problems:
        key = re.sub(r"\b([cb])\d+\b", r"\1<i>", p)
        key = re.sub(r"r1\.\d+\.[cb]\d+", "<task>", key)
        count, first = out.get(key, (0, p))
        out[key] = (count + 1, first)
    return out


def git_state() -> dict[str, Any]:
    """The commit measured, and whether src/ had changes not yet committed."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"commit": head, "src_uncommitted_changes": bool(dirty)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,200,1000", help="comma-separated N")
    parser.add_argument("--modes", default=",".join(MODES), help="honest, bad, bad-late")
    parser.add_argument("--quick", action="store_true", help="a smoke run: N = 20")
    parser.add_argument("--round-timeout", type=float, default=120.0,
                        help="the server's --round-timeout (mode bad waits it out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--uploads-in-flight", type=int, default=0,
                        help="at most this many honest uploads at once (0: all at once); "
                             "shows how much of the peak memory is in-flight bodies")
    args = parser.parse_args()
    sizes = [20] if args.quick else [int(s) for s in args.sizes.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    work = Path(tempfile.mkdtemp(prefix="w3-"))
    print(f"run directories and server logs under {work}", flush=True)

    results = []
    for n in sizes:
        for mode in modes:
            print(f"N={n} {mode} ...", flush=True)
            results.append(one_run(n, mode, args.seed, args.round_timeout, work,
                                   args.uploads_in_flight))
            r = results[-1]
            print(f"  {r['accepted']} accepted, {r['updates_per_second']:.0f} updates/s, "
                  f"peak {r['server_peak_mb']:.0f} MB, {r['wall_seconds']:.0f} s, "
                  f"{len(r['problems'])} problem(s)", flush=True)

    print()
    print(table(
        ["N", "mode", "honest/bad", "accepted", "updates/s", "p50 ms", "p99 ms",
         "server MB (start -> peak)", "bad -> 4xx / total", "model", "CPU s server/clients"],
        [[r["n"], r["mode"], f"{r['honest']}/{r['bad']}", r["accepted"],
          f"{r['updates_per_second']:.0f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
          f"{r['server_baseline_mb']:.0f} -> {r['server_peak_mb']:.0f}",
          f"{r['bad_4xx']}/{r['bad_requests']}" if r["bad"] else "-",
          "equal" if r["model_equal"] else "MISMATCH",
          f"{r['server_cpu_seconds']:.1f}/{r['client_cpu_seconds']:.1f}"] for r in results]))
    bad_runs = [r for r in results if r["bad"]]
    if bad_runs:
        print("\nAnswers to the bad requests (kind: status x count), and the slowloris:")
        for r in bad_runs:
            codes = ", ".join(f"{k} x{c}" for k, c in sorted(r["bad_codes"].items()))
            slow = slowloris_summary(r["slowloris"])
            print(f"  N={r['n']} {r['mode']}: {codes}")
            print(f"    slowloris: {slow or '-'}")
    honest_runs = sorted((r for r in results if r["mode"] == "honest"), key=lambda r: r["n"])
    growth = None
    if len(honest_runs) >= 2:
        lo, hi = honest_runs[0], honest_runs[-1]
        growth = ((hi["server_peak_mb"] - lo["server_peak_mb"]) * 1024
                  / (hi["n"] - lo["n"]))
        print(f"\nserver peak memory grows {growth:.1f} KB per extra client from N={lo['n']} "
              f"to N={hi['n']} (the encoded model is {hi['model_bytes'] / 1024:.0f} KB)")

    path = write_json("w3_server_load", {
        "git": git_state(),
        "dataset": "digits", "model": "mlp", "rounds": 1, "round_timeout": args.round_timeout,
        "seed": args.seed, "uploads_in_flight": args.uploads_in_flight or None,
        "sizes": sizes, "modes": modes, "kinds": list(KINDS),
        "library": {"httpx": httpx.__version__, "psutil": psutil.__version__},
        "peak_memory_growth_kb_per_client": growth,
        "runs": results,
    })
    print(f"\nwrote {path}")
    failed = False
    for r in results:
        for pattern, (count, example) in grouped(r["problems"]).items():
            failed = True
            times = f" (x{count}; e.g. {example})" if count > 1 else ""
            print(f"FAILED N={r['n']} {r['mode']}: {pattern if count > 1 else example}{times}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
