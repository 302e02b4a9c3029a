"""Async federation with real server and client processes on 127.0.0.1 (port 0), on digits."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from fedlearn.server.store import Store
from tests.conftest import cli_env, run_cli
from tests.integration.procs import Procs, endpoint, metrics, wait_until

pytestmark = pytest.mark.slow


# samples and fedasync differ only in the merge weight (unit-tested by hand); fedbuff
# also changes when the model moves.
@pytest.mark.parametrize("policy", ["fedasync", "fedbuff:3"])
def test_run_async_on_digits(tmp_path: Path, policy: str) -> None:
    out = tmp_path / "run"
    res = run_cli(["run", "--mode", "async", "--async-policy", policy, "--dataset", "digits",
                   "--clients", "3", "--max-updates", "24", "--seed", "0", "--out", str(out)],
                  cli_env(tmp_path), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["mode"], summary["policy"], summary["updates"]) == ("async", policy, 24)
    assert summary["versions"] == (8 if policy == "fedbuff:3" else 24)
    assert summary["final_accuracy"] >= 0.85
    rows = metrics(out)
    assert [r["update"] for r in rows] == list(range(1, 25))
    assert all({"update", "version", "accuracy", "loss", "seconds", "staleness"} <= set(r)
               for r in rows)
    assert [r["seconds"] for r in rows] == sorted(r["seconds"] for r in rows)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert (out / "model.safetensors").exists() and (out / "report.png").exists()
    accepted = 0
    for i in range(3):
        log = (out / "logs" / f"client-{i}.log").read_text()
        assert "finished:" in log
        accepted += int(log.split("finished: ")[1].split(" updates accepted")[0])
    assert accepted == 24


def test_async_server_sigkill_and_resume(tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    procs.start("server", ["server", "--port", "0", "--dataset", "digits", "--mode", "async",
                           "--async-policy", "fedasync", "--max-updates", "40",
                           "--save-every", "4", "--min-clients", "2", "--seed", "1",
                           "--out", str(run_dir)])
    url = endpoint(run_dir)["url"]
    port = url.rsplit(":", 1)[1]
    for i in range(2):
        # Slow enough that the kill lands mid-run; the clients ride out the restart.
        procs.start(f"c{i}", ["client", "--server", url, "--client-id", f"c{i}",
                              "--token-file", str(run_dir / "join-token"), "--dataset",
                              "digits", "--partition", f"iid:2:{i}", "--max-wait", "1",
                              "--slowdown", "15"])
    wait_until(lambda: len(metrics(run_dir)) >= 10, 120, "ten merged updates")
    procs.kill("server", signal.SIGKILL)
    before = metrics(run_dir)
    assert len(before) < 40
    store = Store(run_dir)
    try:
        latest = store.latest_checkpoint()
    finally:
        store.close()
    assert latest is not None
    saved = latest[0]
    assert saved >= 8 and saved % 4 == 0

    procs.start("server2", ["server", "--port", port, "--resume", str(run_dir)])
    assert procs.wait("server2", 180) == 0, procs.log("server2")
    assert f"resuming after update {saved}" in procs.log("server2")
    rows = metrics(run_dir)
    assert [r["update"] for r in rows] == list(range(1, 41)), "an update was lost or doubled"
    # Everything checkpointed survived as it was; the counter went on from there.
    assert rows[:saved] == before[:saved]
    assert rows[saved]["seconds"] >= before[saved - 1]["seconds"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["updates"], summary["versions"]) == (40, 40)
    for i in range(2):
        assert procs.wait(f"c{i}", 90) == 0, procs.log(f"c{i}")
