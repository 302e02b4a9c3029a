"""``fedlearn sim`` as a typer command: flags, errors and the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from fedlearn.cli.sim_cmd import sim
from fedlearn.errors import ConfigError
from fedlearn.runs import load_model_file
from fedlearn.sim import ENGINES
from tests.tiny_data import write_tiny_idx


def app() -> typer.Typer:
    """A throwaway app holding only ``sim`` (fedlearn's own app registers it as well)."""
    a = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    a.command()(sim)
    return a


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"clients": 5, "per_round": 6}, "--per-round"),
        ({"engine": "gpu"}, "engine"),
        ({"partition": "dirichlet:-1"}, "--partition"),
        ({"threads": 0}, "--threads"),
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"local_epochs": 0}, "epochs"),
    ],
)
def test_bad_flags_raise_one_config_error(flags: dict[str, object], words: str,
                                          tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=words):
        sim(out=tmp_path / "run", **flags)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_sim_on_digits_writes_the_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    res = CliRunner().invoke(app(), [
        "--dataset", "digits", "--clients", "6", "--per-round", "3", "--rounds", "2",
        "--partition", "iid", "--optimizer", "sgd", "--lr", "0.05", "--seed", "1",
        "--threads", str(threads), "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    assert "final test accuracy" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "sim" and summary["engine"] == "vectorized"
    assert summary["clients"] == 6 and summary["per_round"] == 3 and summary["rounds"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 3 for r in rows)
    assert {"round", "accuracy", "loss", "seconds", "clients", "examples"} <= set(rows[0])
    assert (out / "model.safetensors").exists() and (out / "report.png").exists()
    assert "engine = \"vectorized\"" in (out / "config.toml").read_text()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"mode": "async", "rounds": 5, "updates": 10}, "--rounds is for --mode sync"),
        ({"mode": "async"}, "needs a stop rule; pass --updates N"),
        ({"async_policy": "fedbuff:3"}, "--async-policy applies to --mode async"),
        ({"staleness_fn": "constant", "async_alpha": 0.5},
         "--async-alpha, --staleness-fn applies to --mode async"),
        ({"updates": 10}, "--updates applies to --mode async"),
        ({"mode": "async", "updates": 10, "round_timeout": 5.0}, "--round-timeout applies"),
        ({"mode": "async", "updates": 10, "async_policy": "fedbuff"}, "fedbuff:3"),
        ({"client_speeds": "lognormal"}, "--client-speeds 'lognormal'"),
        ({"client_speeds": "speeds-that-are-not-here.csv"}, "not a speed spec or a readable"),
        ({"round_timeout": -1.0}, "--round-timeout must be a positive"),
    ],
)
def test_bad_time_flags_raise_one_config_error(flags: dict[str, object], words: str,
                                               tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        sim(out=tmp_path / "run", **flags)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_sim_async_on_digits_writes_virtual_time_columns(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(app(), [
        "--dataset", "digits", "--mode", "async", "--clients", "20", "--per-round", "4",
        "--client-speeds", "lognormal:1.0", "--updates", "12", "--eval-every", "4",
        "--async-policy", "fedbuff:2", "--optimizer", "sgd", "--lr", "0.05", "--threads", "1",
        "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    assert "after 12 updates (6 versions" in res.output and "virtual time" in res.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [4, 8, 12]
    assert {"virtual_time", "staleness_mean", "staleness_max", "accuracy"} <= set(rows[0])
    times = [r["virtual_time"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sim_mode"] == "async" and summary["updates"] == 12
    assert summary["staleness"]["count"] == 12 and summary["concurrency"] == 4
    assert (out / "report.png").exists() and (out / "model.safetensors").exists()
    config = (out / "config.toml").read_text()
    assert 'mode = "async"' in config and 'async_policy = "fedbuff:2"' in config


def test_sim_sync_with_a_round_timeout_reports_dropped_stragglers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(app(), [
        "--dataset", "digits", "--clients", "20", "--per-round", "5", "--rounds", "3",
        "--client-speeds", "lognormal:1.0", "--round-timeout", "4", "--threads", "1",
        "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    assert "stragglers dropped" in res.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["clients"] + r["dropped"] == 5 for r in rows)
    assert all(r["round_virtual_seconds"] <= 4 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped"] == sum(r["dropped"] for r in rows)
    assert summary["virtual_time"] == pytest.approx(rows[-1]["virtual_time"])


def test_cnn_vectorized_and_sequential_reach_the_same_accuracy_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Issue #10: `fedlearn sim --model cnn` on both engines, small data of the cnn's
    # shape (digits written as Fashion-MNIST's 28x28 IDX files), uneven clients.
    write_tiny_idx(tmp_path / "data", train=240, test=200)
    monkeypatch.setenv("FEDLEARN_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FEDLEARN_SYSTEM_DATA", str(tmp_path / "no-system-data"))
    monkeypatch.setenv("FEDLEARN_OFFLINE", "1")
    results = {}
    before = torch.get_num_threads()
    try:
        for engine in ENGINES:
            out = tmp_path / engine
            # One thread: toy tensors train fastest (and steadiest on a busy machine) so.
            res = CliRunner().invoke(app(), [
                "--dataset", "fashion-mnist", "--model", "cnn", "--clients", "4",
                "--per-round", "2", "--rounds", "3", "--partition", "dirichlet:0.5",
                "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--local-epochs",
                "2", "--batch-size", "16", "--engine", engine, "--threads", "1",
                "--out", str(out),
            ])
            assert res.exit_code == 0, res.output
            summary = json.loads((out / "summary.json").read_text())
            assert summary["engine"] == engine and summary["rounds"] == 3
            results[engine] = (summary["final_accuracy"],
                               load_model_file(out / "model.safetensors"))
    finally:
        torch.set_num_threads(before)
    (acc_v, vec), (acc_s, seq) = results["vectorized"], results["sequential"]
    assert abs(acc_v - acc_s) <= 0.005  # 0.5 points (one test image is 0.5 points here)
    for key in seq:
        np.testing.assert_allclose(vec[key], seq[key], rtol=0, atol=1e-4, err_msg=key)
    assert acc_s > 0.2  # it learned (chance is 10%)
