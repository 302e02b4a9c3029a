"""The public Python API: simulate, serve, run a client, or train the centralized baseline.

Each function takes a :class:`~fedlearn.tasks.base.Task` (or a ``--task``-style
reference string), writes the usual run directory and returns a
:class:`History`. All are plain blocking functions that work from a script and
from inside a running asyncio loop (a notebook): the server then runs its own
loop in a separate thread.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlearn.config import ServerConfig, TrainConfig, build_strategy, strategy_settings
from fedlearn.strategies import Strategy
from fedlearn.tasks.base import Task
from fedlearn.types import Weights


@dataclass(frozen=True)
class History:
    """What a run produced: one metrics record per round (or epoch), the summary,
    the final model and the run directory."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    weights: Weights
    run_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> list[float | None]:
        """The values of metric ``name`` (e.g. ``accuracy``, ``fed_auc``) round by round."""
        return [r.get(name) for r in self.records]

    @property
    def final(self) -> dict[str, Any]:
        """The last record."""
        return dict(self.records[-1]) if self.records else {}


def _task(task: Task | str) -> Task:
    if isinstance(task, Task):
        return task
    from fedlearn.tasks.loading import load_task

    return load_task(task)


def _train_config(task: Task, config: Mapping[str, Any] | TrainConfig | None) -> TrainConfig:
    base = dict(task.config)
    if isinstance(config, TrainConfig):
        base.update(config.as_dict())
    elif config is not None:
        base.update(config)
    return TrainConfig.from_dict(base)


def _out(out: str | Path | None, prefix: str) -> Path:
    if out is not None:
        return Path(out)
    from fedlearn.runs import default_run_dir

    return default_run_dir(prefix, Path(tempfile.gettempdir()) / "fedlearn-runs")


def _history(run_dir: Path) -> History:
    from fedlearn.runs import MODEL, RunDir, load_model_file

    run = RunDir(run_dir)
    return History(run.read_metrics(), run.read_summary(),
                   load_model_file(run_dir / MODEL), run_dir)


def simulate(
    task: Task | str, *, clients: int = 10, per_round: int | None = None, rounds: int = 5,
    partition: str = "iid", engine: str = "sequential", data: str | Path | None = None,
    label: str | None = None, test_fraction: float = 0.0,
    config: Mapping[str, Any] | TrainConfig | None = None, seed: int = 0, eval_every: int = 1,
    eval_fraction: float | None = None, strategy: str | Strategy = "fedavg",
    out: str | Path | None = None, device: str = "cpu", max_parallel: int | None = None,
    precision: str = "fp32", attack: str | None = None, attackers: float | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = lambda line: None,
    backend: str = "local", ray_address: str | None = None, ray_workers: int | None = None,
    ray_cpus_per_worker: float | None = None, ray_gpus_per_worker: float | None = None,
    ray_timeout: float | None = None, **options: Any,
) -> History:
    """Simulate ``clients`` clients of ``task`` in this process (``fedlearn sim``).

    ``per_round`` clients (default all) train each round; ``data`` may contain
    ``{i}`` for the client index; ``config`` is the round's training config.
    ``max_parallel`` and ``precision`` are ``fedlearn sim``'s flags of those names.
    ``backend="ray"`` trains each round's clients on Ray workers (the ``ray_*``
    arguments are ``fedlearn sim``'s ``--ray-*`` flags; a ``ray.init`` made
    before is used as it is); the model is the same as in-process.
    ``attack`` (``"sign-flip"``, ``"scale:F"``, ``"gaussian:SIGMA"``, ``"label-flip"``,
    ``"same-value:V"``) makes an ``attackers`` share of the clients (default 0.2)
    malicious, for robustness evaluation.
    ``strategy`` is a spec (``"trimmed-mean:0.2+fedadam"``) tuned by
    ``options`` (``server_lr``, ``server_momentum``, ``beta1``, ``beta2``,
    ``tau``, ``prox_mu``, ``clip_norm``), or a
    :class:`~fedlearn.strategies.Strategy` object (your own, see the README).
    The other ``options`` run in simulated time: ``mode`` ("async"),
    ``async_policy``, ``client_speeds``, ``round_timeout``, ``updates``,
    ``concurrency``, ``max_virtual_time``, ... (the fields of
    :class:`~fedlearn.sim.SimConfig` that ``fedlearn sim``'s flags of those names set).
    """
    from fedlearn.config import STRATEGY_OPTIONS
    from fedlearn.errors import ConfigError
    from fedlearn.runs import RunDir
    from fedlearn.sim import SimConfig, config_record, run_simulation
    from fedlearn.sim.modes import TIME_OPTIONS
    from fedlearn.training import resolve_device

    unknown = sorted(set(options) - set(STRATEGY_OPTIONS) - set(TIME_OPTIONS))
    if unknown:
        raise ConfigError(f"simulate() got unknown option(s) {', '.join(unknown)}; the "
                          f"strategy options are {', '.join(STRATEGY_OPTIONS)} and the "
                          f"simulated-time ones {', '.join(TIME_OPTIONS)}.")
    if backend == "ray":
        from fedlearn.sim.ray_backend import require_ray

        require_ray()
    the_task = _task(task)
    settings = _strategy_settings(
        strategy, {k: v for k, v in options.items() if k in STRATEGY_OPTIONS})
    settings.update({k: v for k, v in options.items() if k in TIME_OPTIONS})
    sim = SimConfig(
        clients=clients, per_round=per_round or clients, partition=partition, rounds=rounds,
        engine=engine, task=the_task.name, data=None if data is None else str(data),
        label=label, test_fraction=test_fraction, eval_every=eval_every,
        eval_fraction=eval_fraction, seed=seed, max_parallel=max_parallel,
        precision=precision, attack=attack or "", attackers=attackers,
        train=_train_config(the_task, config), **settings,
        backend=backend, ray_address=ray_address, ray_workers=ray_workers,
        ray_cpus_per_worker=ray_cpus_per_worker, ray_gpus_per_worker=ray_gpus_per_worker,
        ray_timeout=ray_timeout,
    )
    the_strategy = strategy if isinstance(strategy, Strategy) else build_strategy(sim)
    run = RunDir.create(_out(out, "sim"), config_record(sim))
    summary = run_simulation(sim, the_task, run, on_round=on_round, log=log,
                             device=resolve_device(device), strategy=the_strategy)
    history = _history(run.path)
    return dataclasses.replace(history, summary=summary)


def serve(
    task: Task | str, *, rounds: int = 10, min_clients: int = 2, host: str = "127.0.0.1",
    port: int = 8080, out: str | Path | None = None,
    config: Mapping[str, Any] | TrainConfig | None = None, token: str | None = None,
    ready: Callable[[str, str], None] | None = None, device: str = "cpu",
    announce: Callable[[str], None] = lambda line: None, strategy: str | Strategy = "fedavg",
    **settings: Any,
) -> History:
    """Serve a federated run of ``task`` until it ends (``fedlearn server``).

    ``settings`` are any other :class:`~fedlearn.config.ServerConfig` fields
    (``mode``, ``fraction``, ``round_timeout``, ``eval_every``, ``server_lr``,
    ``prox_mu``, ...); ``config`` is the training config sent to clients;
    ``strategy`` a spec or a :class:`~fedlearn.strategies.Strategy` object;
    ``ready(url, join_token)`` is called once the server listens (``port=0``
    picks a free port).
    """
    from fedlearn.server.runner import ServeOptions, prepare_run
    from fedlearn.server.runner import serve as serve_run

    the_task = _task(task)
    client = _train_config(the_task, config).as_dict()
    server_config = ServerConfig(rounds=rounds, min_clients=min_clients, client=client,
                                 task=the_task.name, **_strategy_settings(strategy, settings))
    run, cfg, resumed = prepare_run(server_config, _out(out, "server"), None)
    token_file = None
    if token is not None:
        token_file = run.path / ".given-token"
        token_file.write_text(token)
        token_file.chmod(0o600)
    options = ServeOptions(host=host, port=port, token_file=token_file)
    serve_run(run, cfg, options, task=the_task, resumed=resumed, announce=announce,
              ready=ready, device=device,
              strategy=strategy if isinstance(strategy, Strategy) else None)
    if token_file is not None:
        token_file.unlink(missing_ok=True)
    return _history(run.path)


def _strategy_settings(strategy: str | Strategy, options: Mapping[str, Any]) -> dict[str, Any]:
    """The run settings for ``strategy``: a spec with its ``options``, or how an object is
    recorded (its own options then; passing more is an error)."""
    if isinstance(strategy, str):
        return {**options, "strategy": strategy}
    from fedlearn.config import STRATEGY_OPTIONS
    from fedlearn.errors import ConfigError

    tuned = sorted(set(options) & set(STRATEGY_OPTIONS))
    if tuned:
        raise ConfigError(f"{', '.join(tuned)} tune a strategy spec; a Strategy object "
                          "carries its own settings, so set them on the object.")
    return {**options, **strategy_settings(strategy)}


def run_client(
    task: Task | str, *, server: str, token: str, client_id: str | None = None,
    data: str | Path | None = None, label: str | None = None, partition: str | None = None,
    test_fraction: float = 0.0, device: str = "cpu", ca_file: str | None = None,
    overrides: Mapping[str, Any] | None = None, log: Callable[[str], None] = lambda s: None,
) -> Any:
    """Take part in a server's run as one client until it ends (``fedlearn client``).

    Returns the client's :class:`~fedlearn.client.worker.WorkerSummary`.
    """
    import os
    import socket

    from fedlearn.client.identity import default_credential_file
    from fedlearn.client.remote import RemoteServer
    from fedlearn.client.worker import WorkerConfig, run_worker
    from fedlearn.training import resolve_device

    the_task = _task(task)
    cid = client_id or f"{socket.gethostname()}-{os.getpid()}"
    worker = WorkerConfig(
        server=server, token=token, client_id=cid,
        credential_file=default_credential_file(server, cid),
        task=the_task, partition=partition, data=None if data is None else str(data),
        label=label, test_fraction=test_fraction, overrides=dict(overrides or {}),
        device=resolve_device(device), ca_file=ca_file,
    )
    with RemoteServer(server, token, ca_file=ca_file, poll_wait=worker.poll_wait) as remote:
        return run_worker(worker, remote, log=log)


def centralized(
    task: Task | str, *, data: str | Path | None = None, label: str | None = None,
    test_fraction: float = 0.0, config: Mapping[str, Any] | TrainConfig | None = None,
    seed: int = 0, out: str | Path | None = None, device: str = "cpu",
) -> History:
    """Train ``task`` on all its data in one place (``fedlearn centralized``)."""
    from fedlearn.baselines import run_centralized
    from fedlearn.runs import RunDir
    from fedlearn.tasks.runtime import context, load_client_data, server_test_data
    from fedlearn.training import resolve_device

    the_task = _task(task)
    train = _train_config(the_task, config)
    local = load_client_data(the_task, context(data=data, label=label, seed=seed,
                                               test_fraction=test_fraction))
    run = RunDir.create(_out(out, "centralized"), {
        "mode": "centralized", "task": the_task.name, "seed": seed, "train": train.as_dict()})
    run_centralized(the_task, local, server_test_data(the_task), train, run, seed=seed,
                    device=resolve_device(device))
    return _history(run.path)
