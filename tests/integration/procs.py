"""Start and stop real server and client processes for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "fedlearn.cli.main"]


class Procs:
    """Processes this test started; every one is stopped by PID at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Run ``fedlearn ARGS`` in the background, output to logs/NAME.log."""
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen([*CLI, *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        self.started[name] = proc
        return proc

    def log(self, name: str) -> str:
        """What process ``name`` printed so far."""
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait(self, name: str, timeout: float) -> int:
        """Wait for ``name`` to exit; its exit code."""
        return self.started[name].wait(timeout=timeout)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to process ``name`` and reap it."""
        proc = self.started[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        """Terminate, then kill, whatever is still running."""
        for proc in self.started.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.started.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_until(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def endpoint(run_dir: Path, timeout: float = 60) -> dict[str, Any]:
    """The server.json a listening server writes."""
    path = run_dir / "server.json"

    def read() -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(path.read_text()))
        return None

    return dict(wait_until(read, timeout, f"{path}"))


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl so far."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows
