"""``fedlearn sweep CONFIG.toml``: a grid of independent simulations and their comparison.

The file has a ``[grid]`` table of lists (every combination is one point), the
fixed ``[sim]`` settings (any ``fedlearn sim`` setting: ``SimConfig`` fields),
the ``[train]`` config (``epochs``, ``lr``, ... and user keys), and a
``[sweep]`` table saying where the points run::

    [sweep]
    out = "runs/sweep-demo"     # default runs/sweep-<timestamp>
    backend = "ray"             # "local" (default): one point after another here
    ray_address = "auto"        # default: start Ray on this machine
    ray_cpus_per_point = 1      # each point is one Ray task with these resources
    threads = 1                 # torch threads of a point

    [sim]
    dataset = "digits"
    clients = 20
    per_round = 5
    rounds = 10

    [train]
    optimizer = "sgd"
    lr = 0.05

    [grid]
    strategy = ["fedavg", "fedavgm"]
    seed = [0, 1]
    partition = ["dirichlet:0.5", "iid"]

Grid keys are ``SimConfig`` fields or training keys. Every point is checked
before any runs (an unknown key or a bad value is one sentence naming it).
Each point writes its own run directory under the sweep's folder (a point
whose directory already holds a finished run is not run again); the sweep
then writes ``comparison.csv`` and ``comparison.md`` (final metrics and
seconds per point) and ``comparison.png`` (accuracy per round, one line per
point). On Ray, each point runs as one Ray task wherever the cluster places
it and sends its run directory's files back to this machine.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlearn.config import TRAIN_KEYS, TrainConfig, load_toml
from fedlearn.errors import BackendError, ConfigError, FedlearnError
from fedlearn.runs import SUMMARY, RunDir
from fedlearn.sweep_compare import point_row, write_comparison

if TYPE_CHECKING:
    from fedlearn.sim.config import SimConfig
    from fedlearn.tasks.base import Task

#: Settings of the ``[sweep]`` table and their types.
SWEEP_KEYS: dict[str, type] = {
    "out": str, "backend": str, "ray_address": str, "ray_cpus_per_point": float,
    "ray_gpus_per_point": float, "threads": int, "device": str, "timeout": float,
}
#: ``SimConfig`` fields a sweep sets itself (where a point runs is the sweep's business).
PLACEMENT = ("backend", "ray_address", "ray_workers", "ray_cpus_per_worker",
             "ray_gpus_per_worker", "ray_timeout", "train")
DEFAULT_THREADS = 2


@dataclass(frozen=True)
class SweepConfig:
    """A parsed sweep file: the grid, the fixed settings and where the points run."""

    grid: dict[str, list[Any]]
    sim: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    backend: str = "local"
    ray_address: str | None = None
    ray_cpus_per_point: float = 1.0
    ray_gpus_per_point: float = 0.0
    threads: int | None = None
    device: str = "cpu"
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"backend in [sweep] must be local or ray, got {self.backend!r}.")
        if not self.ray_cpus_per_point > 0 or not self.ray_gpus_per_point >= 0:
            raise ConfigError("ray_cpus_per_point must be positive and ray_gpus_per_point 0 or "
                              "more in [sweep].")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads in [sweep] must be at least 1, got {self.threads}.")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout in [sweep] must be positive, got {self.timeout}.")

    @property
    def point_threads(self) -> int:
        """Torch threads of one point: ``threads``, else the CPUs of a Ray task, else 2."""
        if self.threads is not None:
            return self.threads
        return max(1, int(self.ray_cpus_per_point)) if self.backend == "ray" else DEFAULT_THREADS


@dataclass(frozen=True)
class Point:
    """One combination of the grid: its number, folder name, grid values and config."""

    index: int
    name: str
    values: dict[str, Any]
    config: SimConfig


def load_sweep(path: Path, **overrides: Any) -> SweepConfig:
    """Read a sweep file; ``overrides`` (not None) replace keys of its ``[sweep]`` table."""
    data = load_toml(Path(path))
    where = str(path)
    unknown = sorted(set(data) - {"sweep", "sim", "train", "grid"})
    if unknown:
        raise ConfigError(f"unknown table(s) {', '.join(unknown)} in {where}; a sweep file has "
                          "[sweep], [sim], [train] and [grid].")
    tables = {}
    for name in ("sweep", "sim", "train", "grid"):
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{name} in {where} must be a table ([{name}]).")
        tables[name] = value
    settings = dict(tables["sweep"])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in settings.items():
        kind = SWEEP_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"unknown key {key} in [sweep] of {where}; known keys are "
                              f"{', '.join(sorted(SWEEP_KEYS))}.")
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or isinstance(value, bool):
            raise ConfigError(f"{key} in [sweep] of {where} must be "
                              f"{'a number' if kind in (int, float) else 'text'}, got {value!r}.")
    for key, values in tables["grid"].items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{key} in [grid] of {where} must be a non-empty list of values, "
                              f"got {values!r}.")
    return SweepConfig(grid=dict(tables["grid"]), sim=dict(tables["sim"]),
                       train=dict(tables["train"]), **settings)


def sim_keys() -> list[str]:
    """The ``SimConfig`` fields a sweep's ``[sim]`` and ``[grid]`` may set."""
    from fedlearn.sim.config import SimConfig

    return [f.name for f in dataclasses.fields(SimConfig) if f.name not in PLACEMENT]


def make_points(sweep: SweepConfig, where: str = "the sweep file") -> list[Point]:
    """Every point of the grid, each checked (an error names the point and the problem)."""
    from fedlearn.config import from_mapping
    from fedlearn.sim.config import SimConfig

    allowed = sim_keys()
    for table, given in (("[sim]", list(sweep.sim)), ("[grid]", list(sweep.grid))):
        for key in given:
            if key in PLACEMENT and key != "train":
                raise ConfigError(f"{key} in {table} of {where}: where points run is set in "
                                  "[sweep] (backend, ray_address, ray_cpus_per_point).")
            if key not in allowed and (table == "[sim]" or key not in TRAIN_KEYS):
                known = ", ".join(sorted(allowed)) + (
                    "; or a training key: " + ", ".join(TRAIN_KEYS) if table == "[grid]" else "")
                raise ConfigError(f"unknown key {key} in {table} of {where}; known keys are "
                                  f"{known}.")
    keys = list(sweep.grid)
    out = []
    for index, combo in enumerate(itertools.product(*(sweep.grid[k] for k in keys))):
        values = dict(zip(keys, combo, strict=True))
        name = point_name(index, values)
        sim = {**sweep.sim, **{k: v for k, v in values.items() if k in allowed}}
        train = {**sweep.train, **{k: v for k, v in values.items() if k not in allowed}}
        try:
            config = from_mapping(SimConfig, _absolute_task(sim), where=f"point {name}")
            config = dataclasses.replace(
                config, train=TrainConfig.from_dict(train, where=f"[train] of point {name}"))
        except FedlearnError as exc:
            raise ConfigError(f"sweep point {name}: {exc}") from None
        out.append(Point(index, name, values, config))
    return out


def point_name(index: int, values: Mapping[str, Any]) -> str:
    """``03-strategy=fedavg_seed=1``: the point's number and values, safe as a folder name."""
    text = "_".join(f"{k}={v}" for k, v in values.items())
    safe = re.sub(r"[^A-Za-z0-9._=+-]+", "-", text)[:120]
    return f"{index:02d}" + (f"-{safe}" if safe else "")


def _absolute_task(sim: dict[str, Any]) -> dict[str, Any]:
    """``task = "file.py:NAME"`` made absolute, so each run's config.toml can be resumed."""
    ref = sim.get("task")
    if not isinstance(ref, str) or not ref:
        return sim
    from fedlearn.tasks.loading import split_ref

    where, name = split_ref(ref)
    if where.endswith(".py") or "/" in where:
        where = str(Path(where).resolve())
    return {**sim, "task": f"{where}:{name}"}


class TaskCache:
    """Tasks resolved once per distinct (task, dataset, model) of the grid."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str, str], Task] = {}

    def get(self, config: SimConfig) -> Task:
        """The task ``config`` names."""
        from fedlearn.tasks import builtin_task, load_task

        key = (config.task, config.dataset, config.model)
        if key not in self._tasks:
            self._tasks[key] = (load_task(config.task) if config.task
                                else builtin_task(config.dataset, config.model))
        return self._tasks[key]


def run_sweep(sweep: SweepConfig, points: list[Point], out: Path, *,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every point not finished yet and write the comparison; one row per point."""
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for point in points:
        folder = out / point.name
        if (folder / SUMMARY).is_file():
            log(f"point {point.name}: finished before; kept")
            continue
        if folder.exists():
            shutil.rmtree(folder)
        todo.append(point)
    if sweep.backend == "ray":
        _run_on_ray(sweep, todo, out, log)
    else:
        _run_here(sweep, todo, out, log)
    rows = [point_row(point.name, point.values, out / point.name) for point in points]
    write_comparison(out, rows, list(sweep.grid))
    return rows


def _run_here(sweep: SweepConfig, todo: list[Point], out: Path,
              log: Callable[[str], None]) -> None:
    import torch

    from fedlearn.sim.engine import config_record, run_simulation
    from fedlearn.training import resolve_device

    tasks = TaskCache()
    torch.set_num_threads(sweep.point_threads)
    device = resolve_device(sweep.device)
    for n, point in enumerate(todo, 1):
        run = RunDir.create(out / point.name, config_record(point.config))
        try:
            summary = run_simulation(point.config, tasks.get(point.config), run,
                                     log=lambda line: None, device=device)
        except FedlearnError as exc:
            _fail(run.path, str(exc))
            log(f"point {n}/{len(todo)} {point.name}: failed: {exc}")
            continue
        log(f"point {n}/{len(todo)} {point.name}: {_result_text(summary)}")


def _run_on_ray(sweep: SweepConfig, todo: list[Point], out: Path,
                log: Callable[[str], None]) -> None:
    from fedlearn.sim.engine import config_record
    from fedlearn.sim.ray_backend import connect, remote_error, require_ray, ship_by_value

    if not todo:
        return
    ray = require_ray()
    tasks = TaskCache()
    for point in todo:  # resolve (and check) every task before Ray starts
        tasks.get(point.config)
    started = connect(sweep.ray_address)
    try:
        ship_by_value(ray)
        task_refs: dict[int, Any] = {}
        remote = ray.remote(run_point).options(
            num_cpus=sweep.ray_cpus_per_point, num_gpus=sweep.ray_gpus_per_point, max_retries=2)
        device = "cuda" if sweep.ray_gpus_per_point > 0 else sweep.device
        pending: dict[Any, Point] = {}
        for point in todo:
            task = tasks.get(point.config)
            if id(task) not in task_refs:
                task_refs[id(task)] = ray.put(task)
            ref = remote.remote(config_record(point.config), task_refs[id(task)],
                                sweep.point_threads, device)
            pending[ref] = point
        deadline = None if sweep.timeout is None else time.monotonic() + sweep.timeout
        finished = 0
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1,
                               timeout=min(left, 60.0) if left is not None else 60.0)
            if not done:
                if deadline is not None and time.monotonic() >= deadline:
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    names = ", ".join(p.name for p in pending.values())
                    raise BackendError(f"the sweep ran past its timeout of {sweep.timeout:g} s "
                                       f"with points {names} unfinished; raise timeout in "
                                       "[sweep] or give Ray more CPUs.")
                continue
            point = pending.pop(done[0])
            finished += 1
            folder = out / point.name
            try:
                files = ray.get(done[0], timeout=60.0)
            except ray.exceptions.RayError as exc:
                err = remote_error(exc)
                message = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
                RunDir.create(folder, config_record(point.config))
                _fail(folder, message)
                log(f"point {finished}/{len(todo)} {point.name}: failed: {message}")
                continue
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / Path(name).name).write_bytes(data)
            log(f"point {finished}/{len(todo)} {point.name}: "
                f"{_result_text(RunDir(folder).read_summary())}")
    finally:
        if started:
            ray.shutdown()


def run_point(record: dict[str, Any], task: Task, threads: int, device: str) -> dict[str, bytes]:
    """One point, run where Ray placed it: its run directory's files, by name."""
    import torch

    from fedlearn.sim.checkpoint import sim_config_from_record
    from fedlearn.sim.engine import run_simulation
    from fedlearn.training import resolve_device

    torch.set_num_threads(threads)
    config = sim_config_from_record(record)
    with tempfile.TemporaryDirectory(prefix="fedlearn-sweep-") as tmp:
        run = RunDir.create(Path(tmp) / "run", record)
        run_simulation(config, task, run, log=lambda line: None, device=resolve_device(device))
        return {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()}


def _fail(folder: Path, message: str) -> None:
    """Mark a point's run directory as failed (no summary; ``error.txt`` says why)."""
    (folder / "error.txt").write_text(message + "\n", encoding="utf-8")


def _result_text(summary: Mapping[str, Any]) -> str:
    acc = summary.get("final_accuracy")
    shown = f"accuracy {100 * float(acc):.2f}%" if acc is not None else "finished"
    return f"{shown} in {float(summary.get('wall_seconds') or 0):.1f} s"
