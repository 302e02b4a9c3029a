"""Secure aggregation end to end: real server and client processes on 127.0.0.1, digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlearn.runs import load_model_file
from tests.conftest import cli_env, run_cli
from tests.integration.procs import Procs, endpoint, metrics, wait_until

pytestmark = pytest.mark.slow


def test_secagg_run_reaches_the_model_of_the_plain_run(tmp_path: Path) -> None:
    """`fedlearn run --secagg --clients 5 --rounds 3` works and, to quantisation error,
    trains the model the same run without --secagg trains."""
    env = cli_env(tmp_path)
    common = ["run", "--dataset", "digits", "--clients", "5", "--rounds", "3", "--seed", "0"]
    plain, masked = tmp_path / "plain", tmp_path / "masked"
    res = run_cli([*common, "--out", str(masked), "--secagg"], env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run_cli([*common, "--out", str(plain)], env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    a = load_model_file(masked / "model.safetensors")
    b = load_model_file(plain / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    rows, ref = metrics(masked), metrics(plain)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r, p in zip(rows, ref, strict=True):
        assert r["clients"] == 5 and r["examples"] == p["examples"]
        assert r["secagg_dropped"] == 0 and r["secagg_recovered"] == 0
        assert r["train_loss"] == pytest.approx(p["train_loss"], abs=1e-6)
    config = (masked / "config.toml").read_text()
    assert "secagg = true" in config
    for i in range(5):
        log = (masked / "logs" / f"client-{i}.log").read_text()
        assert log.count("(sent masked)") == 3, log


def test_dp_fedavg_with_secagg_is_accounted_and_matches_client_clipping_in_the_clear(
        tmp_path: Path) -> None:
    """`fedlearn run --secagg --dp-noise-multiplier Z --dp-clip C`: the clients clip, the
    server adds the noise to the unmasked sum; the model is the one plain DP-FedAvg with
    client-side clipping trains (to quantisation error), and ε is reported each round."""
    from fedlearn.config import ServerConfig, privacy_budget

    env = cli_env(tmp_path)
    common = ["run", "--dataset", "digits", "--clients", "4", "--rounds", "2", "--seed", "3",
              "--dp-noise-multiplier", "0.7", "--dp-clip", "0.5"]
    plain, masked = tmp_path / "plain", tmp_path / "masked"
    res = run_cli([*common, "--out", str(masked), "--secagg"], env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run_cli([*common, "--out", str(plain), "--dp-clip-on", "client"], env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    a = load_model_file(masked / "model.safetensors")
    b = load_model_file(plain / "model.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    budget = privacy_budget(ServerConfig(min_clients=4, dp_noise_multiplier=0.7, dp_clip="0.5",
                                         secagg=True), "fixed")
    rows = metrics(masked)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["clients"] == 4 and r["dp_epsilon"] == pytest.approx(budget.epsilon(r["round"]))
    summary = json.loads((masked / "summary.json").read_text())
    assert summary["final_dp_epsilon"] == pytest.approx(budget.epsilon(2))


def test_a_client_killed_after_its_masked_upload_does_not_stop_the_round(
        tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    procs.start("server", ["server", "--port", "0", "--dataset", "digits", "--rounds", "2",
                           "--min-clients", "4", "--secagg", "--secagg-timeout", "4",
                           "--out", str(run_dir)])
    url = endpoint(run_dir)["url"]
    for i in range(4):
        pause = ["--pause-after-masked", "300"] if i == 3 else []
        procs.start(f"c{i}", ["client", "--server", url, "--client-id", f"c{i}", "--token-file",
                              str(run_dir / "join-token"), "--dataset", "digits", "--partition",
                              f"iid:4:{i}", "--max-wait", "1", *pause])
    wait_until(lambda: "round 1: masked update sent" in procs.log("c3"), 120,
               "c3 to upload its masked update")
    procs.kill("c3")  # kill -9 by its PID, before it can answer the unmask stage
    assert procs.wait("server", 120) == 0, procs.log("server")
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    first, second = rows
    # Round 1 sums all four inputs: c3's self-mask came off through the others' shares.
    assert first["clients"] == 4 and first["sampled"] == 4 and first["examples"] == 1437
    assert first["secagg_recovered"] == 1 and first["attempts"] == 1
    # Round 2 goes on without c3.
    assert second["clients"] == 3 and second["examples"] < 1437
    for i in range(3):
        assert procs.wait(f"c{i}", 60) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2


@pytest.mark.parametrize(("args", "words"), [
    (["run", "--secagg", "--strategy", "median"], "needs every client's own update"),
    (["run", "--secagg", "--clients", "1"], "at least 2 clients a round"),
    (["server", "--secagg", "--mode", "async", "--max-updates", "5"], "--mode sync"),
    (["server", "--secagg-bits", "32"], "applies with --secagg"),
    (["run", "--secagg", "--dp-noise-multiplier", "1", "--dp-clip", "1", "--dp-clip-on",
      "server"], "drop --dp-clip-on server"),
])
def test_secagg_mistakes_are_one_sentence(tmp_path: Path, args: list[str], words: str) -> None:
    out = tmp_path / "out"
    res = run_cli([*args, "--dataset", "digits", "--out", str(out)], cli_env(tmp_path),
                  timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert words in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())
