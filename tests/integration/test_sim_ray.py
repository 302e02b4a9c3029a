"""The Ray backend on a local 2-CPU Ray: the same model, a killed worker, resume, sweeps.

Ray starts once for the module (``num_cpus=2``, no dashboard) and stops at
its end; every test builds its own actors on it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fedlearn[ray]')")

import fedlearn  # noqa: E402
from fedlearn.config import TrainConfig  # noqa: E402
from fedlearn.runs import RunDir, load_model_file  # noqa: E402
from fedlearn.sim import SimConfig, Simulation, config_record, run_simulation  # noqa: E402
from fedlearn.tasks import Task, builtin_task  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

BACKENDS = ("local", "ray")
STRATEGIES = ("fedavg", "scaffold")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """A local Ray of 2 CPUs for the whole module."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="error",
             object_store_memory=200 * 1024 * 1024)
    try:
        yield
    finally:
        ray.shutdown()


def train() -> TrainConfig:
    return TrainConfig(optimizer="sgd", lr=0.05, momentum=0.5, batch_size=16)


def config(**overrides: Any) -> SimConfig:
    values: dict[str, Any] = {"clients": 4, "per_round": 3, "rounds": 3, "dataset": "digits",
                              "partition": "dirichlet:1.0", "seed": 7, "train": train()}
    values.update(overrides)
    return SimConfig(**values)


def assert_same_model(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, np.ndarray]]:
    """The in-process sequential engine's model per strategy: the reference semantics."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for strategy in STRATEGIES:
        history = fedlearn.simulate(builtin_task("digits", "mlp"), clients=4, per_round=3,
                                    rounds=3, partition="dirichlet:1.0", seed=7,
                                    config=train().as_dict(), engine="sequential",
                                    strategy=strategy,
                                    out=tmp_path_factory.mktemp("reference") / strategy)
        out[strategy] = history.weights
    torch.set_num_threads(before)
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_reaches_the_same_model(
        backend: str, strategy: str, tmp_path: Path,
        references: dict[str, dict[str, np.ndarray]]) -> None:
    """One body for both backends; SCAFFOLD's control variates travel to and from the workers."""
    lines: list[str] = []
    history = fedlearn.simulate(builtin_task("digits", "mlp"), clients=4, per_round=3,
                                rounds=3, partition="dirichlet:1.0", seed=7,
                                config=train().as_dict(), engine="vectorized",
                                strategy=strategy, backend=backend, out=tmp_path / "run",
                                log=lines.append)
    assert_same_model(references[strategy], history.weights)
    assert history.summary["backend"] == backend
    assert history.summary["engine"] == "vectorized"
    assert [r["clients"] for r in history.records] == [3, 3, 3]
    assert ray.is_initialized()  # a Ray started by someone else is left running


def gated(folder: Path, *, first_only: bool = False) -> Task:
    """digits/mlp whose optimizer factory, once ``armed`` exists, waits for ``release``.

    It runs where a client trains (here: in a Ray actor), says so with a file named
    after its process id, and holds that client mid-round until the test lets go
    (``first_only``: only the first client to get there is held).
    """
    def optimizer(params: Any, config: dict[str, Any]) -> torch.optim.Optimizer:
        if (folder / "armed").exists() and _hold(folder, first_only):
            (folder / f"started-{os.getpid()}").touch()
            deadline = time.monotonic() + 120
            while not (folder / "release").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("the test never released the gate")
                time.sleep(0.02)
        return torch.optim.SGD(params, lr=float(config["lr"]), momentum=float(
            config["momentum"]))

    return dataclasses.replace(builtin_task("digits", "mlp"), optimizer=optimizer)


def _hold(folder: Path, first_only: bool) -> bool:
    if not first_only:
        return True
    try:
        os.close(os.open(folder / "first", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def wait_for(predicate: Any, what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_worker_killed_mid_round_is_replaced_and_the_run_finishes(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    task = gated(gate)
    local = Simulation(config(rounds=2), task, log=lambda s: None)
    for rnd in (1, 2):
        local.run_round(rnd)

    (gate / "armed").touch()
    lines: list[str] = []
    sim = Simulation(config(rounds=2, backend="ray", ray_workers=2, ray_timeout=120.0), task,
                     log=lines.append)
    errors: list[BaseException] = []

    def rounds() -> None:
        try:
            for rnd in (1, 2):
                sim.run_round(rnd)
        except BaseException as exc:
            errors.append(exc)

    try:
        pids = sim.engine.pids()  # type: ignore[attr-defined]
        worker = threading.Thread(target=rounds, daemon=True)
        worker.start()
        started = wait_for(lambda: sorted(gate.glob("started-*")), "a client to start")
        victim = int(started[0].name.split("-")[1])
        assert victim in pids
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not _alive(victim), f"process {victim} to end")
        (gate / "release").touch()
        worker.join(timeout=240)
        assert not worker.is_alive(), "the round never finished"
        assert not errors, errors
        assert any("Ray worker was lost" in line for line in lines), lines
        assert victim not in sim.engine.pids()  # type: ignore[attr-defined]
    finally:
        sim.close()
    assert_same_model(local.weights, sim.weights)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split(")")[-1].split()[0] == "Z")


class Stop(Exception):
    pass


def test_a_ray_run_stopped_after_round_2_resumes_to_the_same_model(tmp_path: Path) -> None:
    task = builtin_task("digits", "mlp")
    cfg = config(rounds=4, backend="ray", ray_workers=2)
    whole = RunDir.create(tmp_path / "whole", config_record(config(rounds=4)))
    run_simulation(config(rounds=4), task, whole, log=lambda s: None)

    def stop(record: dict[str, Any]) -> None:
        if record["round"] == 2:
            raise Stop

    cut = RunDir.create(tmp_path / "cut", config_record(cfg))
    with pytest.raises(Stop):
        run_simulation(cfg, task, cut, log=lambda s: None, on_round=stop)
    run_simulation(cfg, task, cut, log=lambda s: None, resume=True)
    assert [r["round"] for r in cut.read_metrics()] == [1, 2, 3, 4]
    assert_same_model(load_model_file(whole.path / "model.safetensors"),
                      load_model_file(cut.path / "model.safetensors"))


def test_a_sweep_on_ray_runs_one_task_per_point(tmp_path: Path) -> None:
    from fedlearn.sweep import load_sweep, make_points, run_sweep

    path = tmp_path / "sweep.toml"
    path.write_text("""
[sweep]
backend = "ray"
threads = 1

[sim]
dataset = "digits"
clients = 4
per_round = 2
rounds = 2

[train]
optimizer = "sgd"
lr = 0.05

[grid]
seed = [0, 1]
partition = ["dirichlet:0.5", "iid"]
""")
    sweep = load_sweep(path)
    points = make_points(sweep)
    lines: list[str] = []
    rows = run_sweep(sweep, points, tmp_path / "out", log=lines.append)
    assert len(rows) == 4 and not any(r["error"] for r in rows)
    assert len(lines) == 4 and all("accuracy" in line for line in lines)
    for point in points:
        folder = tmp_path / "out" / point.name
        assert {"config.toml", "metrics.jsonl", "summary.json", "model.safetensors",
                "report.png"} <= {p.name for p in folder.iterdir()}
    assert (tmp_path / "out" / "comparison.csv").read_text().count("\n") == 5
    # A point run on Ray equals the same simulation here.
    here = RunDir.create(tmp_path / "here", config_record(points[3].config))
    run_simulation(points[3].config, builtin_task("digits", "mlp"), here, log=lambda s: None)
    assert_same_model(load_model_file(here.path / "model.safetensors"),
                      load_model_file(tmp_path / "out" / points[3].name / "model.safetensors"))


def test_a_worker_that_hangs_past_the_timeout_is_replaced(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    task = gated(gate, first_only=True)
    local = Simulation(config(rounds=2), task, log=lambda s: None)
    for rnd in (1, 2):
        local.run_round(rnd)

    (gate / "armed").touch()  # and never released: the first client hangs
    lines: list[str] = []
    sim = Simulation(config(rounds=2, backend="ray", ray_workers=2, ray_timeout=5.0), task,
                     log=lines.append)
    try:
        pids = sim.engine.pids()  # type: ignore[attr-defined]
        for rnd in (1, 2):
            sim.run_round(rnd)
        hung = int(next(gate.glob("started-*")).name.split("-")[1])
        assert hung in pids
        assert any("took over 5 s" in line for line in lines), lines
        wait_for(lambda: not _alive(hung), f"the hung process {hung} to be stopped")
    finally:
        sim.close()
    assert_same_model(local.weights, sim.weights)


def test_a_sweep_on_ray_past_its_timeout_stops_with_one_sentence(tmp_path: Path) -> None:
    from fedlearn.errors import BackendError
    from fedlearn.sweep import load_sweep, make_points, run_sweep

    path = tmp_path / "sweep.toml"
    path.write_text("""
[sweep]
backend = "ray"
threads = 1
timeout = 0.5

[sim]
dataset = "digits"
clients = 4
per_round = 2
rounds = 200

[grid]
seed = [0, 1]
""")
    sweep = load_sweep(path)
    with pytest.raises(BackendError, match=r"ran past its timeout of 0.5 s with points 00-seed=0"):
        run_sweep(sweep, make_points(sweep), tmp_path / "out", log=lambda s: None)
