"""Simulated runs checkpoint every round and ``--resume`` reaches the uninterrupted model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from fedlearn.cli.sim_cmd import sim
from fedlearn.config import TrainConfig
from fedlearn.errors import ConfigError, RunStateError
from fedlearn.runs import RunDir, load_model_file
from fedlearn.sim import SimConfig, config_record, run_simulation
from fedlearn.sim.checkpoint import CHECKPOINTS, STATE_FILE, load_checkpoint
from fedlearn.tasks import builtin_task

# Toy-sized tensors train fastest (and steadiest on a busy machine) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Stop(Exception):
    """Stands in for Ctrl-C or a kill after some round."""


def config(**overrides: Any) -> SimConfig:
    values: dict[str, Any] = {
        "clients": 4, "per_round": 3, "rounds": 4, "dataset": "digits", "seed": 3,
        "partition": "iid", "train": TrainConfig(optimizer="sgd", lr=0.05, momentum=0.5)}
    values.update(overrides)
    return SimConfig(**values)


def stop_after(rnd: int) -> Any:
    def hook(record: dict[str, Any]) -> None:
        if record["round"] == rnd:
            raise Stop

    return hook


def assert_same_model(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "scaffold"])
def test_stopped_after_round_2_and_resumed_reaches_the_same_model(tmp_path: Path,
                                                                  strategy: str) -> None:
    """Strategy state (Adam's moments, SCAFFOLD's server and client controls) comes back."""
    task = builtin_task("digits", "mlp")
    cfg = config(strategy=strategy)
    whole = RunDir.create(tmp_path / "whole", config_record(cfg))
    run_simulation(cfg, task, whole, log=lambda s: None)

    cut = RunDir.create(tmp_path / "cut", config_record(cfg))
    with pytest.raises(Stop):
        run_simulation(cfg, task, cut, log=lambda s: None, on_round=stop_after(2))
    assert load_checkpoint(cut.path, seed=cfg.seed).round == 2
    assert not (cut.path / "summary.json").exists()
    seen: list[int] = []
    summary = run_simulation(cfg, task, cut, log=lambda s: None, resume=True,
                             on_round=lambda r: seen.append(r["round"]))
    assert seen == [3, 4] and summary["rounds"] == 4
    assert_same_model(load_model_file(whole.path / "model.safetensors"),
                      load_model_file(cut.path / "model.safetensors"))
    rows = [r["round"] for r in cut.read_metrics()]
    assert rows == [1, 2, 3, 4]
    kept = sorted(p.name for p in (cut.path / CHECKPOINTS).glob("sim-*.safetensors"))
    assert kept == ["sim-000003.safetensors", "sim-000004.safetensors"]


def test_a_round_recorded_after_the_checkpoint_is_redone(tmp_path: Path) -> None:
    """Killed between the metrics row and the checkpoint: the row goes, the round is redone."""
    task = builtin_task("digits", "mlp")
    cfg = config(rounds=3)
    run = RunDir.create(tmp_path / "run", config_record(cfg))
    with pytest.raises(Stop):
        run_simulation(cfg, task, run, log=lambda s: None, on_round=stop_after(2))
    run.append_metrics({"round": 3, "accuracy": 0.0})  # a row with no checkpoint behind it
    run_simulation(cfg, task, run, log=lambda s: None, resume=True)
    assert [r["round"] for r in run.read_metrics()] == [1, 2, 3]
    assert run.read_metrics()[-1]["accuracy"] > 0


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    task = builtin_task("digits", "mlp")
    cfg = config(rounds=3)
    whole = RunDir.create(tmp_path / "whole", config_record(cfg))
    run_simulation(cfg, task, whole, log=lambda s: None)
    run = RunDir.create(tmp_path / "run", config_record(cfg))
    with pytest.raises(Stop):
        run_simulation(cfg, task, run, log=lambda s: None, on_round=stop_after(2))
    newest = run.path / CHECKPOINTS / "sim-000002.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7] + b"garbage")
    assert load_checkpoint(run.path, seed=cfg.seed).round == 1
    run_simulation(cfg, task, run, log=lambda s: None, resume=True)
    assert_same_model(load_model_file(whole.path / "model.safetensors"),
                      load_model_file(run.path / "model.safetensors"))


def test_resume_without_a_checkpoint_or_with_another_seed_is_one_clear_error(
        tmp_path: Path) -> None:
    task = builtin_task("digits", "mlp")
    cfg = config(rounds=2)
    run = RunDir.create(tmp_path / "run", config_record(cfg))
    with pytest.raises(RunStateError, match="no simulator checkpoint"):
        run_simulation(cfg, task, run, log=lambda s: None, resume=True)
    with pytest.raises(Stop):
        run_simulation(cfg, task, run, log=lambda s: None, on_round=stop_after(1))
    with pytest.raises(RunStateError, match="seed 3, not 4"):
        load_checkpoint(run.path, seed=4)
    pointer = json.loads((run.path / CHECKPOINTS / STATE_FILE).read_text())
    assert pointer["round"] == 1 and pointer["seed"] == 3


def app() -> typer.Typer:
    a = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    a.command()(sim)
    return a


def test_cli_resume_continues_a_stopped_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            ) -> None:
    flags = ["--dataset", "digits", "--clients", "4", "--per-round", "2", "--rounds", "3",
             "--optimizer", "sgd", "--lr", "0.05", "--seed", "2", "--threads", "1"]
    runner = CliRunner()
    whole = tmp_path / "whole"
    res = runner.invoke(app(), [*flags, "--out", str(whole)])
    assert res.exit_code == 0, res.output

    import fedlearn.sim.engine as engine

    real = engine.Simulation.run_round

    def stop_in_round_3(self: Any, rnd: int) -> dict[str, Any]:
        if rnd == 3:
            raise KeyboardInterrupt
        return real(self, rnd)

    cut = tmp_path / "cut"
    monkeypatch.setattr(engine.Simulation, "run_round", stop_in_round_3)
    res = runner.invoke(app(), [*flags, "--out", str(cut)])
    assert res.exit_code != 0 and not (cut / "summary.json").exists()
    monkeypatch.setattr(engine.Simulation, "run_round", real)

    res = runner.invoke(app(), ["--resume", str(cut), "--lr", "0.1"])
    assert isinstance(res.exception, ConfigError) and "drop --lr" in str(res.exception)
    res = runner.invoke(app(), ["--resume", str(cut), "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "resuming" in res.output and "after round 2" in res.output
    assert_same_model(load_model_file(whole / "model.safetensors"),
                      load_model_file(cut / "model.safetensors"))
    assert json.loads((cut / "summary.json").read_text())["rounds"] == 3


def test_dp_sgd_ledgers_come_back_so_epsilon_keeps_composing(tmp_path: Path) -> None:
    task = builtin_task("digits", "mlp")
    cfg = config(rounds=3, dp_sgd="1.1:1.0", engine="sequential")
    whole = RunDir.create(tmp_path / "whole", config_record(cfg))
    run_simulation(cfg, task, whole, log=lambda s: None)
    cut = RunDir.create(tmp_path / "cut", config_record(cfg))
    with pytest.raises(Stop):
        run_simulation(cfg, task, cut, log=lambda s: None, on_round=stop_after(2))
    run_simulation(cfg, task, cut, log=lambda s: None, resume=True)
    want, got = whole.read_metrics()[-1], cut.read_metrics()[-1]
    assert got["dp_sgd_epsilon_max"] == pytest.approx(want["dp_sgd_epsilon_max"])
    assert_same_model(load_model_file(whole.path / "model.safetensors"),
                      load_model_file(cut.path / "model.safetensors"))


def test_dp_fedavg_resumes_with_its_accountant_where_it_was(tmp_path: Path) -> None:
    task = builtin_task("digits", "mlp")
    cfg = config(rounds=3, dp_noise_multiplier=0.5, dp_clip="1.0")
    whole = RunDir.create(tmp_path / "whole", config_record(cfg))
    run_simulation(cfg, task, whole, log=lambda s: None)
    cut = RunDir.create(tmp_path / "cut", config_record(cfg))
    with pytest.raises(Stop):
        run_simulation(cfg, task, cut, log=lambda s: None, on_round=stop_after(2))
    summary = run_simulation(cfg, task, cut, log=lambda s: None, resume=True)
    assert summary["dp_rounds"] == json.loads((whole.path / "summary.json").read_text())[
        "dp_rounds"]
    want, got = whole.read_metrics()[-1], cut.read_metrics()[-1]
    eps = [k for k in want if "epsilon" in k]
    assert eps and all(got[k] == pytest.approx(want[k]) for k in eps)
    assert_same_model(load_model_file(whole.path / "model.safetensors"),
                      load_model_file(cut.path / "model.safetensors"))
