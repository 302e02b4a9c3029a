"""Same seed, same model: ``fedlearn run`` over HTTP and ``fedlearn sim`` with each engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedlearn.models import build_model, get_weights
from fedlearn.runs import load_model_file
from fedlearn.sim import ENGINES
from tests.conftest import cli_env, run_cli

pytestmark = pytest.mark.slow

# `fedlearn run`'s defaults, spelled out so both commands surely train alike; the
# simulator uses one torch thread, as each HTTP client does.
TRAIN = ["--optimizer", "adam", "--lr", "0.001", "--batch-size", "32", "--local-epochs", "1"]


def run_sim(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``fedlearn sim ARGS``, the real command as a user would run it."""
    return run_cli(["sim", *args], env)


def test_http_run_and_both_engines_reach_the_same_model(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    http = tmp_path / "http"
    res = run_cli(["run", "--dataset", "digits", "--clients", "3", "--rounds", "3", "--seed", "0",
                   *TRAIN, "--out", str(http)], env, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    models = {"http": load_model_file(http / "model.safetensors")}
    accuracy = {"http": json.loads((http / "summary.json").read_text())["final_accuracy"]}
    for engine in ENGINES:
        out = tmp_path / engine
        res = run_sim(["--dataset", "digits", "--clients", "3", "--per-round", "3",
                       "--rounds", "3", "--seed", "0", "--engine", engine, *TRAIN,
                       "--threads", "1", "--out", str(out)], env)
        assert res.returncode == 0, res.stdout + res.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["engine"] == engine and summary["rounds"] == 3
        models[engine] = load_model_file(out / "model.safetensors")
        accuracy[engine] = summary["final_accuracy"]
    ref = models["http"]
    for name, weights in models.items():
        assert set(weights) == set(ref)
        diff = max(float(np.abs(weights[k] - ref[k]).max()) for k in ref)
        print(f"{name}: max |difference| from the HTTP run {diff:.2e}")
        assert diff < 1e-4, f"{name} differs from the HTTP run by {diff}"
        assert abs(accuracy[name] - accuracy["http"]) <= 1 / 360 + 1e-9  # one test image
    # The runs trained: the model moved well beyond the tolerance, and learned.
    start = get_weights(build_model("mlp", (1, 8, 8), 10, seed=0))
    assert min(float(np.abs(ref[k] - start[k]).max()) for k in ref) > 1e-3
    assert accuracy["http"] > 0.5
