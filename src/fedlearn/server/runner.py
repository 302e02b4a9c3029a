"""Build and serve a run: data, model, store, coordinator, app, uvicorn on a socket.

Writes ``server.json`` (URL, pid) and ``join-token`` (mode 600) into the run
directory once listening, so scripts and ``fedlearn run`` can find the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlearn.config import ServerConfig, build_strategy, from_mapping
from fedlearn.errors import ConfigError, RunStateError
from fedlearn.fsutil import atomic_write_text
from fedlearn.runs import RunDir, final_metrics
from fedlearn.server.store import DB_NAME, Store
from fedlearn.tasks.base import Task
from fedlearn.weights import spec_nbytes

if TYPE_CHECKING:
    from fedlearn.server.coordinator_base import Coordinator
    from fedlearn.strategies import Strategy

log = logging.getLogger("fedlearn.server")

TOKEN_FILE = "join-token"
ENDPOINT_FILE = "server.json"
DONE_GRACE_SECONDS = 15.0
RESUMED_DONE_SECONDS = 60.0


@dataclass(frozen=True)
class ServeOptions:
    """How to serve (not part of the run: may change on resume)."""

    host: str = "127.0.0.1"
    port: int = 8080
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    docs: bool = True
    show_token: bool = True
    max_connections: int | None = 4096


def prepare_run(
    config: ServerConfig | None, out: Path | None, resume: Path | None
) -> tuple[RunDir, ServerConfig, bool]:
    """A new run directory for ``config``, or the existing one to resume."""
    if resume is not None:
        run = RunDir.open(resume)
        saved = run.read_config()
        if saved.get("mode") not in ("sync", "async") or "server" not in saved:
            raise RunStateError(f"{resume} is not a federated server run; cannot resume it.")
        if not (run.path / DB_NAME).exists() and (run.path / "metrics.jsonl").exists():
            raise RunStateError(f"{resume} has rounds but no {DB_NAME}; its records are gone, "
                                "so it cannot be resumed (start a new run with --out).")
        return run, from_mapping(ServerConfig, saved["server"], where=str(resume)), True
    if config is None:
        raise ConfigError("no configuration given.")
    if out is None:
        from fedlearn.runs import default_run_dir

        out = default_run_dir("server")
    if (Path(out) / DB_NAME).exists():
        raise RunStateError(f"{out} already holds a run; choose another --out, or --resume it.")
    run = RunDir.create(
        out, {"mode": config.mode, "run_id": uuid.uuid4().hex[:12],
              "server": dataclasses.asdict(config)}
    )
    return run, config, False


def join_token_for(run: RunDir, token_file: Path | None) -> str:
    """The run's join token: from --token-file, else the run's saved one, else a new one."""
    saved = run.path / TOKEN_FILE
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {token_file}: {exc.strerror}.") from exc
        if len(token) < 8:
            raise ConfigError(f"the token in {token_file} is shorter than 8 characters.")
    elif saved.exists():
        token = saved.read_text(encoding="utf-8").strip()
    else:
        token = secrets.token_urlsafe(24)
    atomic_write_text(saved, token + "\n")
    os.chmod(saved, 0o600)
    return token


def serve(
    run: RunDir,
    config: ServerConfig,
    options: ServeOptions,
    *,
    task: Task,
    resumed: bool,
    announce: Callable[[str], None] = print,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    device: str = "cpu",
    ready: Callable[[str, str], None] | None = None,
    strategy: Strategy | None = None,
) -> dict[str, Any]:
    """Serve the run until every round is done; returns the summary.

    ``strategy`` is the sync run's strategy object (None: the one the run's
    settings name). Safe to call from a thread that runs an asyncio loop (a
    notebook): the server then runs its own loop in a separate thread.
    """
    import uvicorn

    from fedlearn.server.app import create_app
    from fedlearn.server.async_coordinator import AsyncCoordinator
    from fedlearn.server.coordinator import SyncCoordinator
    from fedlearn.server.transport import GuardedH11Protocol
    from fedlearn.tasks.runtime import server_test_data
    from fedlearn.training import Shard, Trainer, initial_state

    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together; pass both or neither.")
    started = time.perf_counter()
    if config.mode != "sync":
        strategy = None
    elif strategy is None:
        strategy = build_strategy(config)
    trainer = Trainer(task, seed=config.seed, device=device)
    initial = initial_state(task, config.seed)
    evaluable = task.model is not None or task.evaluate is not None
    test_data = server_test_data(task) if evaluable else None
    test = Shard.of(test_data) if test_data is not None and len(test_data) else None
    eval_lock = threading.Lock()

    def evaluate_on_server(weights: Any) -> Any:
        with eval_lock:
            return trainer.evaluate(weights, test) if test is not None else None

    evaluator = evaluate_on_server if test is not None else None
    train_config = config.train_config(task.config)
    lock = lock_run(run.path)
    store = Store(run.path)
    store.remove_leftovers()
    # wall_seconds counts every server process of the run, not only this one.
    started -= float(store.get_meta("wall_seconds", 0.0) or 0.0)
    run_id = str(run.read_config().get("run_id", "run"))
    token = join_token_for(run, options.token_file)

    lost_rows: list[bool] = []

    def record_round(record: dict[str, Any]) -> None:
        try:
            if lost_rows:  # an earlier append failed: rebuild the file from the database
                run.rewrite_metrics(coordinator.history)
                lost_rows.clear()
            else:
                run.append_metrics(record)
        except OSError as exc:
            lost_rows.append(True)
            log.error("could not write %s (%s); it is rebuilt from run.sqlite once the disk "
                      "works again", run.path / "metrics.jsonl", exc.strerror)
        with contextlib.suppress(Exception):
            store.set_meta("wall_seconds", time.perf_counter() - started)
        if on_round is not None:
            on_round(record)

    coordinator: Coordinator
    if strategy is None:
        coordinator = AsyncCoordinator(config, initial, store=store, evaluator=evaluator,
                                       train_config=train_config, task_name=task.name,
                                       on_round=record_round)
    else:
        coordinator = SyncCoordinator(config, initial, strategy=strategy, store=store,
                                      evaluator=evaluator, train_config=train_config,
                                      task_name=task.name, on_round=record_round)
    finished_before = resumed and coordinator.done and (run.path / "summary.json").exists()
    if resumed:
        # metrics.jsonl follows the database: rounds (updates) after the checkpoint are
        # redone, and a row a failed write lost is written again.
        try:
            run.rewrite_metrics(coordinator.history)
        except OSError as exc:
            raise RunStateError(f"cannot write to the run directory {run.path} "
                                f"({exc.strerror}); free disk space or fix its permissions, "
                                "then resume again.") from exc

    server_box: list[uvicorn.Server] = []

    def finish() -> None:
        if finished_before:
            return  # a finished run keeps its summary; the server only says "done"
        # The database is the truth (a final fedbuff flush may have replaced the last row).
        run.rewrite_metrics(coordinator.history)
        save_outputs(run, coordinator, started)

    limit = config.max_update_bytes(spec_nbytes(coordinator.update_spec))
    allowed = read_clients_file(Path(config.clients_file)) if config.clients_file else None
    app = create_app(coordinator, join_token=token, run_id=run_id, on_done=finish,
                     max_update_bytes=limit, docs=options.docs, allowed=allowed)
    sock = _bind(options.host, options.port)
    port = sock.getsockname()[1]
    scheme = "https" if options.tls_cert else "http"
    url = f"{scheme}://{options.host}:{port}"
    uv_config = uvicorn.Config(
        app,
        log_level="warning",
        ssl_certfile=str(options.tls_cert) if options.tls_cert else None,
        ssl_keyfile=str(options.tls_key) if options.tls_key else None,
        ssl_ca_certs=str(options.tls_client_ca) if options.tls_client_ca else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if options.tls_client_ca else ssl.CERT_NONE,
        timeout_keep_alive=75,
        http=GuardedH11Protocol,
        limit_concurrency=options.max_connections,
        backlog=4096,
    )
    server = uvicorn.Server(uv_config)
    server_box.append(server)
    atomic_write_text(
        run.path / ENDPOINT_FILE,
        json.dumps({"url": url, "pid": os.getpid(), "run_id": run_id}) + "\n",
    )
    announce(f"fedlearn server listening on {url}")
    if options.show_token:
        announce(f"join token: {token}")
    else:  # never into a log file
        announce(f"join token in {run.path / TOKEN_FILE} (mode 600)")
    where = f"resuming after {coordinator.resume_point()}" if resumed else "new run"
    if config.mode == "async":
        where += f", async {config.async_policy}"
    if finished_before:
        where = "finished already: answering 'done' to returning clients for a while"
    announce(f"run directory {run.path} ({where}); waiting for {config.min_clients} clients")

    async def main() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if ready is not None and server.started:
            ready(url, token)
        done_event: asyncio.Event | None = getattr(app.state, "done_event", None)
        if done_event is not None and not serving.done():
            stop = asyncio.create_task(done_event.wait())
            await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not serving.done():
                await _grace(app, coordinator, finished_before)
                server.should_exit = True
        await serving

    try:
        run_loop(main)
    finally:
        sock.close()
        store.close()
        (run.path / ENDPOINT_FILE).unlink(missing_ok=True)
        lock.close()
    if not coordinator.done:
        end = "its stop rule" if config.mode == "async" else f"round {config.rounds}"
        raise RunStateError(
            f"the server stopped before {end}; resume with "
            f"`fedlearn server --resume {run.path}`."
        )
    return run.read_summary()


def run_loop(main: Callable[[], Any]) -> None:
    """``asyncio.run(main())``, in a fresh thread when this one already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(main())
        return
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="fedlearn-server", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


async def _grace(app: Any, coordinator: Coordinator, finished_before: bool = False) -> None:
    """Give online clients a moment to hear 'done' before the server goes away.

    In async mode clients are mid-training when the run stops; each hears
    'done' when it next polls, after its update is refused, so they get longer.
    A server resumed after its last round waits for every registered client
    (they come back after the restart) up to :data:`RESUMED_DONE_SECONDS`.
    """
    wait = (RESUMED_DONE_SECONDS if finished_before
            else DONE_GRACE_SECONDS + coordinator.done_grace_seconds)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        expected = (coordinator.clients.ids() if finished_before
                    else coordinator.clients.online())
        if expected <= app.state.acknowledged:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


def read_clients_file(path: Path) -> dict[str, str]:
    """``--clients-file``: one ``CLIENT_ID SHA256_OF_ITS_TOKEN`` per line (``#`` comments).

    Make a line with ``printf %s "$TOKEN" | sha256sum``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --clients-file {path} ({exc}); check the path.") from exc
    allowed: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[1]) != 64 or not all(
                c in "0123456789abcdef" for c in parts[1].lower()):
            raise ConfigError(f"line {number} of {path} is not 'CLIENT_ID SHA256_HEX'; make the "
                              "hash with: printf %s \"$TOKEN\" | sha256sum.")
        allowed[parts[0]] = parts[1].lower()
    if not allowed:
        raise ConfigError(f"--clients-file {path} lists no clients; add 'CLIENT_ID SHA256' "
                          "lines.")
    return allowed


def lock_run(path: Path) -> Any:
    """Hold an exclusive lock on the run directory while this server owns it.

    A second server on the same run directory is refused with one sentence.
    """
    import fcntl

    lock_path = Path(path) / ".lock"
    try:
        fh = open(lock_path, "a+")  # noqa: SIM115 - held for the server's life
        os.chmod(lock_path, 0o600)
    except OSError as exc:
        raise RunStateError(f"cannot use the run directory {path} ({exc.strerror}); check its "
                            "permissions and free space.") from exc
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "another process"
        fh.close()
        raise RunStateError(f"the run directory {path} is in use by a server (pid {owner}); "
                            "stop that server first.") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def save_outputs(run: RunDir, coordinator: Coordinator, started: float) -> None:
    """Write model.safetensors, summary.json and report.png at the end of a run."""
    config = coordinator.config
    run.save_model(coordinator.weights)
    run.write_summary({
        "mode": coordinator.mode,
        "task": coordinator.task_name,
        "dataset": config.dataset,
        "model": config.model,
        **coordinator.summary_fields(),
        **final_metrics(coordinator.history),
        "wall_seconds": time.perf_counter() - started,
    })
    run.write_report(coordinator.report_title())


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}; 0 picks a free "
                          "port.")
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(4096)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or 0."
        ) from exc
    sock.set_inheritable(True)
    return sock
