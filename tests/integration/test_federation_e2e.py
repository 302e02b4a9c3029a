"""Real server and client processes on 127.0.0.1 (port 0), on the digits dataset."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedlearn.runs import load_model_file
from tests.conftest import cli_env, run_cli
from tests.integration.procs import Procs, endpoint, metrics, wait_until

pytestmark = pytest.mark.slow


def client_args(url: str, run_dir: Path, i: int, n: int, *extra: str,
                prefix: str = "c") -> list[str]:
    return ["client", "--server", url, "--client-id", f"{prefix}{i}", "--token-file",
            str(run_dir / "join-token"), "--dataset", "digits", "--partition", f"iid:{n}:{i}",
            "--max-wait", "1", *extra]


def test_run_three_clients_on_digits(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run_cli(["run", "--dataset", "digits", "--clients", "3", "--rounds", "8",
                   "--seed", "0", "--out", str(out)], cli_env(tmp_path), timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 8 and summary["mode"] == "sync"
    assert summary["final_accuracy"] >= 0.90
    rows = metrics(out)
    assert [r["round"] for r in rows] == list(range(1, 9))
    assert all(r["clients"] == 3 for r in rows)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert (out / "model.safetensors").exists() and (out / "report.png").exists()
    assert (out / "run.sqlite").exists()
    for i in range(3):
        assert "finished: 8 updates accepted" in (out / "logs" / f"client-{i}.log").read_text()


def test_client_killed_mid_round_is_dropped(tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    procs.start("server", ["server", "--port", "0", "--dataset", "digits", "--rounds", "4",
                           "--min-clients", "3", "--min-results", "2", "--round-timeout", "20",
                           "--out", str(run_dir)])
    url = endpoint(run_dir)["url"]
    procs.start("c0", client_args(url, run_dir, 0, 3))
    procs.start("c1", client_args(url, run_dir, 1, 3))
    # c2 trains very slowly, so it is still mid-round when it is killed.
    procs.start("c2", client_args(url, run_dir, 2, 3, "--slowdown", "2000"))
    wait_until(lambda: "round 1" in procs.log("c0"), 60, "c0 to train round 1")
    procs.kill("c2")
    assert procs.wait("server", 120) == 0, procs.log("server")
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    # Round 1 sampled all three; on a machine so loaded that c0 or c1 missed the
    # deadline too, the round ran again with the two that are left.
    assert rows[0]["clients"] == 2
    assert rows[0]["sampled"] == (3 if rows[0]["attempts"] == 1 else 2), rows[0]
    assert all(r["clients"] == 2 for r in rows)
    assert procs.wait("c0", 30) == 0 and procs.wait("c1", 30) == 0


def test_server_sigkill_and_resume(tmp_path: Path, procs: Procs) -> None:
    # The uninterrupted reference run.
    ref = tmp_path / "ref"
    res = run_cli(["run", "--dataset", "digits", "--clients", "3", "--rounds", "10",
                   "--seed", "3", "--out", str(ref)], cli_env(tmp_path), timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    expected = json.loads((ref / "summary.json").read_text())["final_accuracy"]

    run_dir = tmp_path / "run"
    server_args = ["server", "--dataset", "digits", "--rounds", "10", "--min-clients", "3",
                   "--seed", "3"]
    procs.start("server", [*server_args, "--port", "0", "--out", str(run_dir)])
    url = endpoint(run_dir)["url"]
    port = url.rsplit(":", 1)[1]
    for i in range(3):
        # Slow enough that the kill lands mid-run; same data and data order as the
        # reference run (the task seeds derive from the run seed and the client ids).
        procs.start(f"c{i}", client_args(url, run_dir, i, 3, "--slowdown", "20",
                                         "--partition-seed", "3", prefix="client-"))
    wait_until(lambda: len(metrics(run_dir)) >= 3, 120, "three rounds")
    procs.kill("server", signal.SIGKILL)
    # The round the server committed (SQLite row and checkpoint) before it died; the
    # metrics.jsonl line follows the commit, so it may lag by one round.
    committed = committed_round(run_dir)
    assert committed in (len(metrics(run_dir)), len(metrics(run_dir)) + 1)
    assert 3 <= committed < 10
    procs.start("server2", ["server", "--port", port, "--resume", str(run_dir)])
    assert procs.wait("server2", 240) == 0, procs.log("server2")
    resumed = re.findall(r"\(resuming after round (\d+)\)", procs.log("server2"))
    assert resumed == [str(committed)], procs.log("server2")
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 11)), "a round was lost or duplicated"
    # Same seeds, one torch thread per client: the resumed run ends with the very same
    # weights as the uninterrupted one (README: "identical weights").
    expected_model = load_model_file(ref / "model.safetensors")
    model = load_model_file(run_dir / "model.safetensors")
    assert set(model) == set(expected_model)
    for key in expected_model:
        np.testing.assert_array_equal(model[key], expected_model[key], err_msg=key)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_accuracy"] == expected
    for i in range(3):
        assert procs.wait(f"c{i}", 60) == 0, procs.log(f"c{i}")


def committed_round(run_dir: Path) -> int:
    """The last round in the run's SQLite ``rounds`` table (what a resume continues after)."""
    with contextlib.closing(sqlite3.connect(run_dir / "run.sqlite")) as db:
        (last,) = db.execute("SELECT MAX(round) FROM rounds").fetchone()
        (checkpoint,) = db.execute("SELECT value FROM meta WHERE key = 'checkpoint'").fetchone()
    assert last == json.loads(checkpoint), "the last round row and the checkpoint disagree"
    return int(last)


def test_tls_with_test_certificate(tmp_path: Path, procs: Procs) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_pem, key_pem, ca_pem = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    run_dir = tmp_path / "run"
    procs.start("server", ["server", "--port", "0", "--dataset", "digits", "--rounds", "2",
                           "--min-clients", "2", "--out", str(run_dir),
                           "--tls-cert", str(cert_pem), "--tls-key", str(key_pem)])
    url = endpoint(run_dir)["url"]
    assert url.startswith("https://")
    # Without the CA the client refuses the server's certificate.
    bad = run_cli(client_args(url, run_dir, 0, 2, "--max-retries", "0"), procs.env, timeout=60)
    assert bad.returncode != 0
    for i in range(2):
        procs.start(f"c{i}", client_args(url, run_dir, i, 2, "--ca-file", str(ca_pem)))
    assert procs.wait("server", 120) == 0, procs.log("server")
    assert [r["round"] for r in metrics(run_dir)] == [1, 2]
