"""``fedlearn sweep``: the grid, its checks, one run directory per point and the comparison."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from fedlearn.cli.sweep_cmd import sweep
from fedlearn.errors import ConfigError
from fedlearn.runs import load_model_file
from fedlearn.sim import SimConfig
from fedlearn.sweep import load_sweep, make_points, point_name, run_sweep

# Toy-sized tensors train fastest (and steadiest on a busy machine) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = """
[sim]
dataset = "digits"
clients = 4
per_round = 2
rounds = 2

[train]
optimizer = "sgd"
lr = 0.05
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def app() -> typer.Typer:
    a = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    a.command()(sweep)
    return a


def test_grid_of_seeds_and_partitions_writes_four_runs_and_a_comparison(
        tmp_path: Path) -> None:
    path = write(tmp_path, BASE + """
[sweep]
threads = 1

[grid]
seed = [0, 1]
partition = ["dirichlet:0.5", "iid"]
""")
    out = tmp_path / "out"
    res = CliRunner().invoke(app(), [str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["00-seed=0_partition=dirichlet-0.5", "01-seed=0_partition=iid",
                     "02-seed=1_partition=dirichlet-0.5", "03-seed=1_partition=iid"]
    for name in names:
        run = out / name
        assert {"config.toml", "metrics.jsonl", "summary.json", "model.safetensors"} <= {
            p.name for p in run.iterdir()}
    config = (out / names[1] / "config.toml").read_text()
    assert 'partition = "iid"' in config and "seed = 0" in config and "lr = 0.05" in config
    with (out / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["point"] for r in rows] == names
    assert [(r["seed"], r["partition"]) for r in rows] == [
        ("0", "dirichlet:0.5"), ("0", "iid"), ("1", "dirichlet:0.5"), ("1", "iid")]
    for row, name in zip(rows, names, strict=True):
        summary = json.loads((out / name / "summary.json").read_text())
        assert float(row["final_accuracy"]) == pytest.approx(summary["final_accuracy"])
        assert float(row["seconds"]) > 0 and row["error"] == ""
    md = (out / "comparison.md").read_text()
    assert md.count("\n") == 2 + 4 and "final accuracy" in md
    assert (out / "comparison.png").stat().st_size > 1000
    assert "final accuracy" in res.output


def test_a_point_equals_the_same_simulation_run_alone(tmp_path: Path) -> None:
    """A sweep point is exactly ``fedlearn sim`` with those settings."""
    from fedlearn.runs import RunDir
    from fedlearn.sim import config_record, run_simulation
    from fedlearn.tasks import builtin_task

    sweep_cfg = load_sweep(write(tmp_path, BASE + "[grid]\nseed = [5]\n"), threads=1)
    points = make_points(sweep_cfg)
    run_sweep(sweep_cfg, points, tmp_path / "out", log=lambda s: None)
    cfg = points[0].config
    assert cfg.seed == 5 and cfg.clients == 4 and cfg.train.lr == 0.05
    alone = RunDir.create(tmp_path / "alone", config_record(cfg))
    run_simulation(cfg, builtin_task("digits", "mlp"), alone, log=lambda s: None)
    a = load_model_file(alone.path / "model.safetensors")
    b = load_model_file(tmp_path / "out" / points[0].name / "model.safetensors")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)


def test_finished_points_are_kept_when_the_sweep_runs_again(tmp_path: Path) -> None:
    sweep_cfg = load_sweep(write(tmp_path, BASE + "[grid]\nseed = [0, 1]\n"), threads=1)
    points = make_points(sweep_cfg)
    out = tmp_path / "out"
    run_sweep(sweep_cfg, points, out, log=lambda s: None)
    before = (out / points[0].name / "summary.json").stat().st_mtime_ns
    (out / points[1].name / "summary.json").unlink()  # as if stopped before it ended
    lines: list[str] = []
    run_sweep(sweep_cfg, points, out, log=lines.append)
    assert (out / points[0].name / "summary.json").stat().st_mtime_ns == before
    assert any("finished before" in line for line in lines)
    assert (out / points[1].name / "summary.json").is_file()


def test_two_strategies_times_two_seeds(tmp_path: Path) -> None:
    try:
        SimConfig(dataset="digits", strategy="fedavgm")
    except ConfigError:
        pytest.skip("this build's SimConfig knows only the fedavg strategy")
    sweep_cfg = load_sweep(write(tmp_path, BASE + """
[grid]
strategy = ["fedavg", "fedavgm"]
seed = [0, 1]
"""), threads=1)
    rows = run_sweep(sweep_cfg, make_points(sweep_cfg), tmp_path / "out", log=lambda s: None)
    assert [(r["strategy"], r["seed"]) for r in rows] == [
        ("fedavg", 0), ("fedavg", 1), ("fedavgm", 0), ("fedavgm", 1)]
    assert all(not r["error"] for r in rows)


@pytest.mark.parametrize(("text", "words"), [
    ("[grid\nseed = [0]", "not valid TOML"),
    (BASE + "[grid]\nsed = [0, 1]\n", "unknown key sed in \\[grid\\]"),
    (BASE + "[grid]\nseed = 3\n", "seed in \\[grid\\] of .* must be a non-empty list"),
    (BASE + "[grid]\nseed = []\n", "non-empty list"),
    (BASE + "[sweep]\nbackend = \"spark\"\n[grid]\nseed = [0]\n", "local or ray"),
    (BASE + "[sweep]\nworkers = 3\n[grid]\nseed = [0]\n", "unknown key workers in \\[sweep\\]"),
    (BASE + "[sweep]\nthreads = \"two\"\n[grid]\nseed = [0]\n", "threads in .* a number"),
    (BASE + "[grid]\nbackend = [\"ray\"]\n", "set in \\[sweep\\]"),
    (BASE + "[extra]\na = 1\n[grid]\nseed = [0]\n", "unknown table"),
    (BASE + "[grid]\nclients = [4, 0]\n", "sweep point 01-clients=0: --clients"),
    (BASE + "[grid]\nlr = [0.1, -1.0]\n", "point 01-lr=-1.0: learning rate must be positive"),
    (BASE + "[grid]\nstrategy = [\"fedavg\", \"nope\"]\n", "point 01-strategy=nope"),
])
def test_bad_sweep_files_are_one_config_error(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=words):
        make_points(load_sweep(path), where=str(path))


def test_cli_prints_one_sentence_for_a_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "[grid]\nsed = [0, 1]\n")
    res = subprocess.run([sys.executable, "-m", "fedlearn.cli.main", "sweep", str(path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error: unknown key sed in [grid]")
    assert not (tmp_path / "runs").exists()


def test_point_names_are_safe_folder_names() -> None:
    assert point_name(3, {"partition": "dirichlet:0.5", "task": "a b/c.py:t"}) == (
        "03-partition=dirichlet-0.5_task=a-b-c.py-t")
    assert point_name(0, {}) == "00"


def test_a_point_that_fails_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "[sweep]\nthreads = 1\n[grid]\nclients = [4, 2000]\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app(), [str(path), "--out", str(out)])
    assert res.exit_code == 1
    assert "1 of 2 points did not finish (01-clients=2000)" in str(res.exception)
    assert (out / "00-clients=4" / "summary.json").is_file()
    error = (out / "01-clients=2000" / "error.txt").read_text()
    assert "2000 clients cannot share a training set" in error
    assert "failed: --partition: 2000 clients" in (out / "comparison.md").read_text()


def test_the_readme_sweep_file_is_a_valid_sweep(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("### Sweeps")
    toml = re.findall(r"```toml\n(.*?)```", readme[start:], flags=re.S)[0]
    points = make_points(load_sweep(write(tmp_path, toml)))
    assert len(points) == 8
    assert {(p.values["strategy"], p.values["partition"], p.values["seed"]) for p in points} == {
        (st, a, s) for st in ("fedavg", "fedavgm") for a in ("dirichlet:0.5", "iid")
        for s in (0, 1)}
    assert all(p.config.clients == 100 and p.config.train.lr == 0.05 for p in points)
