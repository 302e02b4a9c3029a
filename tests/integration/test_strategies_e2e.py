"""Strategies end to end: real `fedlearn run`, server and client processes on digits.

Each HTTP run is compared with the same run simulated in this process (the
sequential engine trains exactly as an HTTP client does), which checks that
the server applied the strategy and the clients trained as it asked; the
kill -9 tests check that a resumed run reaches the uninterrupted run's model
bit for bit, strategy state (FedAdam's moments, SCAFFOLD's control variates on
the server and on each client's disk) included.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest

import fedlearn
from fedlearn.runs import load_model_file
from fedlearn.types import Weights
from tests.conftest import cli_env, run_cli
from tests.integration.procs import Procs, endpoint, metrics, wait_until
from tests.integration.test_federation_e2e import client_args, committed_round

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CLIENTS = 3
TRAIN = ["--optimizer", "sgd", "--lr", "0.05", "--batch-size", "32", "--local-epochs", "1"]


def http_run(tmp_path: Path, name: str, flags: list[str], rounds: int, seed: int) -> Path:
    """``fedlearn run`` with 3 clients to the end; its run directory."""
    out = tmp_path / name
    res = run_cli(["run", "--dataset", "digits", "--clients", str(CLIENTS), "--rounds",
                   str(rounds), "--seed", str(seed), *TRAIN, *flags, "--out", str(out)],
                  cli_env(tmp_path), timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def simulated(tmp_path: Path, spec: str, rounds: int, seed: int, **options: float) -> Weights:
    """The same run in the simulator (sequential engine), in this process."""
    history = fedlearn.simulate(
        fedlearn.builtin_task("digits", "mlp"), clients=CLIENTS, rounds=rounds, seed=seed,
        engine="sequential", strategy=spec, out=tmp_path / f"sim-{spec}",
        config={"optimizer": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 1}, **options)
    return history.weights


def assert_close(a: Weights, b: Weights, atol: float) -> float:
    assert set(a) == set(b)
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert diff <= atol, f"models differ by {diff}"
    return diff


def test_robust_rule_under_fedprox_over_http(tmp_path: Path) -> None:
    """trimmed-mean:0.34 (3 clients: the coordinate-wise middle one) under FedProx's server
    step, with mu sent to every client and used in its local training."""
    spec = "trimmed-mean:0.34+fedprox"
    out = http_run(tmp_path, "http", ["--strategy", spec, "--prox-mu", "0.5"], 2, 0)
    saved = (out / "config.toml").read_text()
    assert 'strategy = "trimmed-mean:0.34+fedprox"' in saved and "prox_mu = 0.5" in saved
    got = load_model_file(out / "model.safetensors")
    assert_close(got, simulated(tmp_path, spec, 2, 0, prox_mu=0.5), 1e-6)
    # Not the same as without the proximal term, nor as plain FedAvg.
    with pytest.raises(AssertionError, match="models differ"):
        assert_close(got, simulated(tmp_path, "trimmed-mean:0.34", 2, 0), 1e-6)
    with pytest.raises(AssertionError, match="models differ"):
        assert_close(got, simulated(tmp_path, "fedavg", 2, 0), 1e-6)


DP = ["--dp-noise-multiplier", "0.7", "--dp-clip", "1.0"]


# FedAdam under DP-FedAvg: one kill -9 checks the optimizer's moments and step, the DP
# noise (drawn from the seed and round) and the accountant's ε all come back exactly.
@pytest.mark.parametrize(("spec", "extra"), [("fedadam", DP), ("scaffold", [])],
                         ids=["fedadam-dp", "scaffold"])
def test_kill9_and_resume_reach_the_uninterrupted_model(tmp_path: Path, procs: Procs,
                                                        spec: str, extra: list[str]) -> None:
    rounds, seed = 4, 3
    ref = http_run(tmp_path, "ref", ["--strategy", spec, *extra], rounds, seed)
    expected = load_model_file(ref / "model.safetensors")
    if not extra:
        # The HTTP run is the simulated one: the server ran the strategy, the clients
        # its steps. (A DP simulation samples by Poisson, so it is another run.)
        assert_close(expected, simulated(tmp_path, spec, rounds, seed), 1e-6)
    if spec == "scaffold":
        assert len(list((ref / "clients").glob("*.scaffold.safetensors"))) == CLIENTS

    run_dir = tmp_path / "run"
    server = ["server", "--dataset", "digits", "--rounds", str(rounds), "--min-clients",
              str(CLIENTS), "--seed", str(seed), "--strategy", spec, *extra, *TRAIN]
    procs.start("server", [*server, "--port", "0", "--out", str(run_dir)])
    url = endpoint(run_dir)["url"]
    for i in range(CLIENTS):
        # Slow enough that the kill lands mid-run; the same data, data order and client
        # ids as `fedlearn run` gives its clients.
        procs.start(f"c{i}", client_args(
            url, run_dir, i, CLIENTS, "--slowdown", "20", "--partition-seed", str(seed),
            "--credential-file", str(tmp_path / "ids" / f"client-{i}.json"),
            prefix="client-"))
    wait_until(lambda: len(metrics(run_dir)) >= 1, 120, "round 1")
    procs.kill("server", signal.SIGKILL)
    committed = committed_round(run_dir)
    assert 1 <= committed < rounds
    procs.start("server2", ["server", "--port", url.rsplit(":", 1)[1], "--resume",
                            str(run_dir)])
    assert procs.wait("server2", 240) == 0, procs.log("server2")
    assert re.findall(r"\(resuming after round (\d+)\)", procs.log("server2")) == [
        str(committed)]
    assert [r["round"] for r in metrics(run_dir)] == list(range(1, rounds + 1))
    model = load_model_file(run_dir / "model.safetensors")
    for key in expected:
        np.testing.assert_array_equal(model[key], expected[key], err_msg=key)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["strategy"] == spec
    if extra:
        # The same noise (drawn from the seed and the round) and the same (ε, δ).
        want = json.loads((ref / "summary.json").read_text())
        assert summary["final_dp_epsilon"] == want["final_dp_epsilon"] > 0
        assert summary["final_dp_delta"] == want["final_dp_delta"] == 1 / CLIENTS
    for i in range(CLIENTS):
        assert procs.wait(f"c{i}", 60) == 0, procs.log(f"c{i}")
        kept = tmp_path / "ids" / f"client-{i}.scaffold.safetensors"
        assert kept.exists() == (spec == "scaffold")
