"""Every example under examples/ runs as its README says: over HTTP and in the simulator."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlearn.runs import load_model_file
from tests.conftest import cli_env, run_cli
from tests.integration.procs import Procs, endpoint, metrics, wait_until

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: example -> flags after its data is made in DIR ({d} is replaced by DIR)
FLAGS = {
    "image_folder": ["--data", "{d}/client-{i}", "--test-fraction", "0.2"],
    "tabular_csv": ["--data", "{d}/client-{i}.csv", "--label", "diagnosis",
                    "--test-fraction", "0.25"],
    "regression": ["--data", "{d}/client-{i}.npz", "--test-fraction", "0.2"],
    "pytorch_script": [],
    "numpy_client": [],
}


def prepare(name: str, tmp: Path) -> list[str]:
    """Run the example's make_data.py into ``tmp`` (if it has one); its flags."""
    maker = EXAMPLES / name / "make_data.py"
    data = tmp / f"{name}-data"
    if maker.exists():
        subprocess.run([sys.executable, str(maker), str(data)], check=True, timeout=120,
                       capture_output=True)
    return [f.replace("{d}", str(data)) for f in FLAGS[name]]


def task(name: str) -> str:
    return f"{EXAMPLES / name / 'task.py'}:task"


def scores(row: dict[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()  # type: ignore[arg-type]
            if k in ("accuracy", "loss", "fed_accuracy", "fed_loss", "fed_mse", "fed_auc")}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_example_runs_over_http_and_in_the_simulator(tmp_path: Path, name: str) -> None:
    flags = prepare(name, tmp_path)
    env = cli_env(tmp_path)
    run = run_cli(["run", "--task", task(name), "--clients", "3", "--rounds", "5",
                   "--out", str(tmp_path / "run"), *flags], env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr + "".join(
        p.read_text() for p in (tmp_path / "run" / "logs").glob("*.log"))
    sim = run_cli(["sim", "--task", task(name), "--clients", "3", "--per-round", "3",
                   "--rounds", "5", "--out", str(tmp_path / "sim"), "--threads", "1", *flags],
                  env, timeout=300)
    assert sim.returncode == 0, sim.stdout + sim.stderr
    for out in (tmp_path / "run", tmp_path / "sim"):
        rows = metrics(out)
        assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
        last = scores(rows[-1])
        assert last and all(np.isfinite(v) for v in last.values()), rows[-1]
        assert (out / "model.safetensors").exists() and (out / "report.png").exists()
    a, b = scores(metrics(tmp_path / "run")[-1]), scores(metrics(tmp_path / "sim")[-1])
    for key in a.keys() & b.keys():
        assert a[key] == pytest.approx(b[key], abs=0.05), key


def test_batchnorm_task_reaches_the_same_model_over_http_and_in_the_simulator(
    tmp_path: Path,
) -> None:
    flags = prepare("image_folder", tmp_path)
    env = cli_env(tmp_path)
    common = ["--task", task("image_folder"), "--clients", "3", "--rounds", "3", "--seed", "2",
              *flags]
    run = run_cli(["run", *common, "--out", str(tmp_path / "run")], env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    sim = run_cli(["sim", *common, "--per-round", "3", "--engine", "sequential", "--threads",
                   "1", "--out", str(tmp_path / "sim")], env, timeout=300)
    assert sim.returncode == 0, sim.stdout + sim.stderr
    http = load_model_file(tmp_path / "run" / "model.safetensors")
    simulated = load_model_file(tmp_path / "sim" / "model.safetensors")
    assert http.keys() == simulated.keys()
    assert http["features.1.num_batches_tracked"].dtype == np.int64
    assert http["features.1.num_batches_tracked"].shape == ()
    for key in http:
        np.testing.assert_allclose(http[key], simulated[key], rtol=0, atol=1e-5, err_msg=key)


def test_breast_cancer_with_federated_evaluation_only_reaches_auc_095(tmp_path: Path) -> None:
    flags = prepare("tabular_csv", tmp_path)
    out = tmp_path / "run"
    res = run_cli(["run", "--task", task("tabular_csv"), "--clients", "3", "--rounds", "10",
                   "--out", str(out), *flags], cli_env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = metrics(out)
    assert len(rows) == 10
    assert "accuracy" not in rows[-1]  # the server holds no data at all
    assert rows[-1]["fed_clients"] == 3
    assert rows[-1]["fed_auc"] >= 0.95
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_fed_auc"] == rows[-1]["fed_auc"]


def test_batchnorm_image_run_killed_and_resumed_ends_with_the_same_model(
    tmp_path: Path, procs: Procs,
) -> None:
    flags = prepare("image_folder", tmp_path)
    ref = tmp_path / "ref"
    res = run_cli(["run", "--task", task("image_folder"), "--clients", "3", "--rounds", "6",
                   "--out", str(ref), *flags], cli_env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr

    run_dir = tmp_path / "run"
    procs.start("server", ["server", "--task", task("image_folder"), "--rounds", "6",
                           "--min-clients", "3", "--port", "0", "--out", str(run_dir)])
    url = endpoint(run_dir)["url"]
    port = url.rsplit(":", 1)[1]
    data = flags[1]
    for i in range(3):
        procs.start(f"c{i}", [
            "client", "--server", url, "--client-id", f"client-{i}", "--token-file",
            str(run_dir / "join-token"), "--task", task("image_folder"),
            "--data", data.replace("{i}", str(i)), "--test-fraction", "0.2",
            "--partition", f"iid:3:{i}", "--max-wait", "1", "--slowdown", "8"])
    wait_until(lambda: len(metrics(run_dir)) >= 2, 180, "two rounds")
    procs.kill("server", signal.SIGKILL)
    assert len(metrics(run_dir)) < 6
    procs.start("server2", ["server", "--port", port, "--resume", str(run_dir)])
    assert procs.wait("server2", 300) == 0, procs.log("server2")
    assert [r["round"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    got = load_model_file(run_dir / "model.safetensors")
    want = load_model_file(ref / "model.safetensors")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for i in range(3):
        assert procs.wait(f"c{i}", 60) == 0, procs.log(f"c{i}")


def test_async_run_with_federated_evaluation_only(tmp_path: Path) -> None:
    flags = prepare("tabular_csv", tmp_path)
    out = tmp_path / "run"
    res = run_cli(["run", "--mode", "async", "--task", task("tabular_csv"), "--clients", "3",
                   "--max-updates", "9", "--eval-every", "3", "--out", str(out), *flags],
                  cli_env(tmp_path), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = metrics(out)
    assert [r["update"] for r in rows] == [3, 6, 9]
    assert all(r["fed_clients"] >= 1 and 0.5 < r["fed_auc"] <= 1.0 for r in rows)
    assert "accuracy" not in rows[-1]
