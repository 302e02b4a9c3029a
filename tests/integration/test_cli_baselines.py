"""The baseline commands end to end, as a user runs them (real processes, real data)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import cli_env, run_cli


def test_centralized_digits_offline_writes_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = run_cli(["centralized", "--dataset", "digits", "--epochs", "5", "--out", str(out)],
                  cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] >= 0.90
    assert summary["mode"] == "centralized" and summary["rounds"] == 5
    assert {"dataset", "model", "final_loss", "wall_seconds"} <= summary.keys()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3, 4, 5]
    assert all({"accuracy", "loss", "seconds"} <= r.keys() for r in lines)
    assert (out / "config.toml").read_text().count("digits") == 1
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # evaluate the saved model: the same accuracy as the run's last epoch
    ev = run_cli(["evaluate", "--model-file", str(out / "model.safetensors"),
                  "--dataset", "digits", "--model", "mlp"], cli_env(tmp_path))
    assert ev.returncode == 0, ev.stderr
    assert f"{100 * summary['final_accuracy']:.2f}%" in ev.stdout
    # the same --out again is refused, and the first run is intact
    again = run_cli(["centralized", "--dataset", "digits", "--out", str(out)], cli_env(tmp_path))
    assert again.returncode != 0 and "already holds a run" in again.stderr
    assert json.loads((out / "summary.json").read_text()) == summary


def test_local_prints_one_row_per_client(tmp_path: Path) -> None:
    out = tmp_path / "local"
    res = run_cli(["local", "--dataset", "digits", "--clients", "3", "--partition", "iid",
                   "--epochs", "2", "--out", str(out)], cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("│")]
    assert len(rows) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert [c["client"] for c in summary["per_client"]] == [0, 1, 2]
    assert sum(c["examples"] for c in summary["per_client"]) == 1437


def test_missing_dataset_is_one_clear_line(tmp_path: Path) -> None:
    res = run_cli(["centralized", "--dataset", "mnist", "--epochs", "1"], cli_env(tmp_path))
    assert res.returncode == 3
    assert "Traceback" not in res.stderr
    assert "mnist" in res.stderr and "fedlearn datasets fetch mnist" in res.stderr


def test_bad_inputs_are_refused_without_traceback(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    cases = [
        (["centralized", "--dataset", "digits", "--model", "cnn"], "cnn"),
        (["centralized", "--dataset", "digits", "--optimizer", "rmsprop"], "rmsprop"),
        (["centralized", "--dataset", "nope"], "nope"),
        (["local", "--dataset", "digits", "--partition", "dirichlet:0"], "dirichlet:0"),
        (["local", "--dataset", "digits", "--clients", "5000"], "5000"),
        (["evaluate", "--model-file", str(tmp_path / "missing.safetensors"),
          "--dataset", "digits"], "missing.safetensors"),
    ]
    for args, word in cases:
        res = run_cli(args, env)
        assert res.returncode != 0, args
        assert "Traceback" not in res.stderr, args
        assert word in res.stderr, (args, res.stderr)


def test_datasets_lists_all_four(tmp_path: Path) -> None:
    res = run_cli(["datasets"], cli_env(tmp_path))
    assert res.returncode == 0, res.stderr
    for name in ("fashion-mnist", "mnist", "cifar10", "digits"):
        assert name in res.stdout
    assert "missing" in res.stdout
