"""``fedlearn sim --mode async`` as a real process: the run directory, and a bad flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli

pytestmark = pytest.mark.slow


def test_sim_async_writes_a_run_directory_in_virtual_time(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run_cli(["sim", "--mode", "async", "--dataset", "digits", "--clients", "50",
                   "--client-speeds", "lognormal:1.0", "--updates", "100", "--concurrency", "5",
                   "--eval-every", "50", "--optimizer", "sgd", "--lr", "0.1", "--threads", "1",
                   "--out", str(out)],
                  cli_env(tmp_path), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "after 100 updates" in res.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [50, 100]
    assert all(r["virtual_time"] > 0 and r["staleness_max"] >= 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sim_mode"] == "async" and summary["staleness"]["count"] == 100
    assert summary["final_accuracy"] == rows[-1]["accuracy"] > 0.5
    for name in ("config.toml", "model.safetensors", "report.png"):
        assert (out / name).exists(), name


def test_a_bad_speed_spec_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run_cli(["sim", "--mode", "async", "--dataset", "digits", "--updates", "5",
                   "--client-speeds", "lognormal:fast", "--out", str(out)], cli_env(tmp_path),
                  timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    stderr = res.stderr.strip()
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1
    assert stderr.startswith("error: --client-speeds 'lognormal:fast' has a non-number SIGMA")
    assert not out.exists()
