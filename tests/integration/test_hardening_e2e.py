"""Hardening against a real `fedlearn server`: mutual TLS, slowloris, a second server on the
same run, a damaged checkpoint, and a finished run that still says done."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli
from tests.integration.procs import Procs, endpoint, metrics, wait_until

pytestmark = pytest.mark.slow


def client_args(url: str, run_dir: Path, i: int, n: int, *extra: str) -> list[str]:
    return ["client", "--server", url, "--client-id", f"c{i}", "--token-file",
            str(run_dir / "join-token"), "--dataset", "digits", "--partition", f"iid:{n}:{i}",
            "--max-wait", "1", *extra]


def test_mutual_tls_admits_only_clients_with_a_certificate(tmp_path: Path, procs: Procs) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("c0.clients.example")
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca", "ccert", "ckey")}
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(files["cert"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["ccert"]))
    client_cert.private_key_pem.write_to_path(str(files["ckey"]))
    run_dir = tmp_path / "run"
    procs.start("server", ["server", "--port", "0", "--dataset", "digits", "--rounds", "1",
                           "--min-clients", "1", "--out", str(run_dir),
                           "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
                           "--tls-client-ca", str(files["ca"])])
    url = endpoint(run_dir)["url"]
    bare = run_cli(client_args(url, run_dir, 0, 1, "--ca-file", str(files["ca"]),
                               "--max-retries", "0"), procs.env, timeout=120)
    assert bare.returncode != 0 and "Traceback" not in bare.stderr
    procs.start("c0", client_args(url, run_dir, 0, 1, "--ca-file", str(files["ca"]),
                                  "--tls-client-cert", str(files["ccert"]),
                                  "--tls-client-key", str(files["ckey"])))
    assert procs.wait("server", 120) == 0, procs.log("server")
    assert [r["round"] for r in metrics(run_dir)] == [1]


def test_slowloris_is_cut_off_and_honest_clients_are_served(
    tmp_path: Path, procs: Procs,
) -> None:
    run_dir = tmp_path / "run"
    procs.start("server", ["server", "--port", "0", "--dataset", "digits", "--rounds", "2",
                           "--min-clients", "2", "--out", str(run_dir)])
    url = endpoint(run_dir)["url"]
    host, port = url.removeprefix("http://").split(":")
    slow = [socket.create_connection((host, int(port)), timeout=5) for _ in range(50)]
    for s in slow:
        s.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    for i in range(2):
        procs.start(f"c{i}", client_args(url, run_dir, i, 2))
    assert procs.wait("server", 180) == 0, procs.log("server")
    assert [r["round"] for r in metrics(run_dir)] == [1, 2]
    closed = 0
    for s in slow:
        s.settimeout(20)
        try:
            closed += s.recv(1) == b""
        except OSError:
            closed += 1
        s.close()
    assert closed == len(slow)  # the server hung up on every one of them


def test_a_second_server_on_a_live_run_is_refused_and_files_are_private(
    tmp_path: Path, procs: Procs,
) -> None:
    run_dir = tmp_path / "run"
    procs.start("server", ["server", "--port", "0", "--dataset", "digits", "--rounds", "1",
                           "--min-clients", "2", "--out", str(run_dir)])
    endpoint(run_dir)
    second = run_cli(["server", "--port", "0", "--resume", str(run_dir)], procs.env)
    assert second.returncode == 4
    assert "in use by a server" in second.stderr and "Traceback" not in second.stderr
    for name in ("run.sqlite", "join-token"):
        mode = stat.S_IMODE(os.stat(run_dir / name).st_mode)
        assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
    token = (run_dir / "join-token").read_text().strip()
    assert token not in procs.log("server")  # never printed into a log


def test_damaged_checkpoint_falls_back_and_finished_run_answers_done(
    tmp_path: Path, procs: Procs,
) -> None:
    env = cli_env(tmp_path)
    run_dir = tmp_path / "run"
    res = run_cli(["run", "--dataset", "digits", "--clients", "2", "--rounds", "3", "--out",
                   str(run_dir)], env, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (run_dir / "summary.json").read_text()
    # A finished run, resumed, keeps its summary and tells returning clients "done".
    procs.start("server", ["server", "--port", "0", "--resume", str(run_dir)])
    url = endpoint(run_dir)["url"]
    for i in range(2):
        procs.start(f"c{i}", ["client", "--server", url, "--client-id", f"client-{i}",
                              "--token-file", str(run_dir / "join-token"), "--dataset",
                              "digits", "--partition", f"iid:2:{i}",
                              "--credential-file", str(run_dir / "clients" /
                                                       f"client-{i}.json")])
    for i in range(2):
        assert procs.wait(f"c{i}", 120) == 0, procs.log(f"c{i}")
    assert procs.wait("server", 120) == 0, procs.log("server")
    assert (run_dir / "summary.json").read_text() == summary
    # Flip bytes in the newest checkpoint: the resume names it and uses the older one.
    newest = sorted((run_dir / "checkpoints").glob("global-*.safetensors"))[-1]
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF
    newest.write_bytes(bytes(data))
    (run_dir / "checkpoints" / ".global-000009.safetensors.abc.tmp").write_bytes(b"x")
    procs.start("server2", ["server", "--port", "0", "--resume", str(run_dir)])
    wait_until(lambda: "resuming after round 2" in procs.log("server2"), 60, "the resume")
    assert "damaged" in procs.log("server2")
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert [r["round"] for r in metrics(run_dir)] == [1, 2]
