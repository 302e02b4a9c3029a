"""The Ray backend: the round's clients trained by in-process engines on Ray actors.

The driver (this process) keeps everything else of a simulated run exactly as
in-process: sampling, the strategy, evaluation, checkpoints. Each round,
:class:`RayEngine` cuts the sampled clients into one chunk per actor
(balanced by training steps) and every :class:`EngineWorker` actor trains
its chunk with an engine that :func:`~fedlearn.sim.engine.make_engine` built
once, when the actor started -- the vectorized one where the task stacks, so
the many-clients-at-once speed is kept on every node. The pooled training
rows go into Ray's object store once per run (``ray.put``; actors on one node
share one copy); the global weights once per round. Each actor returns its
clients' deltas as numpy arrays and the driver aggregates them with the same
code as in-process, so for the same seed both backends reach the same model.

Faults: when an actor's process dies (or its node leaves, or a chunk takes
longer than ``--ray-timeout`` and the actor is killed), a new actor takes its
place and its chunk runs again on another actor -- the same clients from the
same weights with the same seeds, so the round's result is unchanged. Every
wait on Ray has a deadline and the retries are bounded, so a run never hangs.

Ray is optional (``pip install 'fedlearn[ray]'``): nothing here imports it
until a Ray run starts, and :func:`require_ray` says how to install it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlearn.config import TrainConfig
from fedlearn.errors import BackendError, ConfigError, FedlearnError
from fedlearn.sim.base import ClientTask, ClientUpdate
from fedlearn.types import Weights

if TYPE_CHECKING:
    from fedlearn.sim.config import SimConfig
    from fedlearn.tasks.base import Task

BACKENDS: tuple[str, ...] = ("local", "ray")
INSTALL_HINT = "pip install 'fedlearn[ray]'"
#: Seconds a chunk may take before its actor is replaced (--ray-timeout).
DEFAULT_TIMEOUT = 600.0
#: Seconds more an actor may take to start (import torch, fetch the rows, build its engine).
START_TIMEOUT = 600.0
#: Times one chunk may move to another actor after its own was lost.
MAX_MOVES = 2
#: Replacement actors a run may start, per worker.
MAX_REPLACEMENTS = 3
RAY_FIELDS = ("ray_address", "ray_workers", "ray_cpus_per_worker", "ray_gpus_per_worker",
              "ray_timeout")


def check_backend(config: SimConfig) -> None:
    """Raise ConfigError for an unknown backend or a bad (or misplaced) ``--ray-*`` value."""
    if config.backend not in BACKENDS:
        raise ConfigError(f"unknown --backend {config.backend!r}; choose local or ray.")
    if config.backend == "local":
        given = [f"--{f.replace('_', '-')}" for f in RAY_FIELDS if getattr(config, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} applies to --backend ray; add --backend ray "
                              "or drop it.")
        return
    if config.ray_workers is not None and config.ray_workers < 1:
        raise ConfigError(f"--ray-workers must be at least 1, got {config.ray_workers}.")
    if config.ray_cpus_per_worker is not None and not config.ray_cpus_per_worker > 0:
        raise ConfigError("--ray-cpus-per-worker must be positive, got "
                          f"{config.ray_cpus_per_worker}.")
    if config.ray_gpus_per_worker is not None and not config.ray_gpus_per_worker >= 0:
        raise ConfigError("--ray-gpus-per-worker must be 0 or more, got "
                          f"{config.ray_gpus_per_worker}.")
    if config.ray_timeout is not None and not config.ray_timeout > 0:
        raise ConfigError(f"--ray-timeout must be positive, got {config.ray_timeout}.")
    if getattr(config, "dp_sgd", None):
        raise ConfigError("--dp-sgd keeps each client's privacy ledger in the engine that "
                          "trains it, which Ray workers do not share; run it with --backend "
                          "local.")


def require_ray() -> ModuleType:
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--backend ray needs Ray, which is not installed here; install it "
                          f"with {INSTALL_HINT}.") from None
    module: ModuleType = ray
    return module


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (``auto``: the one this machine is part of;
    ``local``: a new one for this process); None does what ``ray.init()`` does: the
    cluster this machine runs, else a new local one. True when this call started Ray.

    An already connected process (a test's or a notebook's ``ray.init``) is left as it is.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address}" if address else "on this machine"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"cannot reach a Ray cluster {where} ({first}); start one with "
                           "`ray start --head`, check --ray-address, or pass --ray-address "
                           "local for a Ray of this run's own.") from exc
    return True


def ship_by_value(ray: ModuleType) -> None:
    """Let workers unpickle tasks loaded from a file (``--task file.py:NAME``).

    Such a module exists only in this process (``fedlearn_task_<hash>``), so
    its functions travel by value instead of by module name.
    """
    for name, module in list(sys.modules.items()):
        if name.startswith("fedlearn_task_") and module is not None:
            ray.cloudpickle.register_pickle_by_value(module)


def remote_error(exc: BaseException) -> BaseException:
    """A task's own exception when a Ray task raised one (our errors stay one sentence)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, FedlearnError):
        return cause
    return exc


class EngineWorker:
    """A Ray actor's body: one in-process engine over the pooled rows, built once.

    ``refs`` are the object-store references of (task, x, y): the rows arrive
    read-only and are shared by the actors of a node. (Inside a tuple, Ray
    hands them over unresolved; a restarted actor fetches them again.) The
    engine is built here, in the actor's process. An error while building is
    kept and raised by :meth:`ready`, so the driver sees the task's own error
    rather than a dead actor.
    """

    def __init__(self, refs: tuple[Any, Any, Any], spec: WorkerSpec) -> None:
        self.notes: list[str] = []
        self.error: BaseException | None = None
        self.engine: Any = None
        try:
            import ray
            import torch

            from fedlearn.sim.engine import make_engine
            from fedlearn.training import Shard

            torch.set_num_threads(spec.threads)
            task, x, y = ray.get(list(refs))
            pool = Shard.from_numpy(x, y)
            self.engine = make_engine(spec.engine, task, pool.x, pool.y, spec.train,
                                      seed=spec.seed, device=spec.device,
                                      max_parallel=spec.max_parallel,
                                      precision=spec.precision, log=self.notes.append)
        except Exception as exc:
            self.error = exc

    def ready(self) -> tuple[str, list[str], int]:
        """(the engine's name, its notices, this process id) once built; else its error."""
        if self.error is not None:
            raise self.error
        return str(self.engine.name), list(self.notes), os.getpid()

    def pid(self) -> int:
        """This actor's process id."""
        return os.getpid()

    def train(self, weights: Weights, clients: list[ClientTask],
              config: TrainConfig) -> tuple[list[ClientUpdate], float]:
        """The engine's ``train_round`` for this chunk of the round's clients, and its seconds."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        updates = list(self.engine.train_round(weights, clients, config))
        return updates, time.perf_counter() - t0


@dataclass(frozen=True)
class WorkerSpec:
    """How each actor builds its engine."""

    engine: str
    train: TrainConfig
    seed: int
    device: str
    max_parallel: int | None
    precision: str
    threads: int


def balanced_chunks(clients: Sequence[ClientTask], parts: int, batch_size: int,
                    epochs: int = 1) -> list[list[int]]:
    """Client positions cut into at most ``parts`` chunks of about equal training steps.

    Longest first onto the least-loaded chunk; each chunk keeps round order.
    """
    steps = [epochs * -(-len(c.indices) // batch_size) for c in clients]
    loads = [0] * max(1, min(parts, len(clients)))
    chunks: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(clients)), key=lambda j: (-steps[j], j)):
        k = min(range(len(loads)), key=lambda c: (loads[c], c))
        chunks[k].append(i)
        loads[k] += max(1, steps[i])
    return [sorted(c) for c in chunks if c]


@dataclass
class _Job:
    """A chunk in flight: its client positions, its actor slot, its deadline."""

    positions: list[int]
    slot: int
    deadline: float = 0.0
    moves: int = 0
    actor: Any = None


class RayEngine:
    """An engine whose ``train_round`` spreads the clients over Ray actors.

    ``config`` gives the engine, training and ``--ray-*`` settings; ``x``/``y``
    are the pooled training rows every :class:`ClientTask` indexes; ``train``
    is the round config the engines are chosen for (default ``config.train``).
    ``log`` hears one-line notices (an engine fallback, a lost worker).

    A lost actor (its process died, its node left, or it overran the timeout
    and was killed) is replaced by a new one in its slot, and its chunk runs
    again on the next slot's actor: the chunk's clients train from the same
    weights with the same seeds, so the round's result is the same.
    """

    def __init__(self, config: SimConfig, task: Task, x: np.ndarray, y: np.ndarray, *,
                 train: TrainConfig | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.ray = require_ray()
        self.log = log
        self.timeout = config.ray_timeout or DEFAULT_TIMEOUT
        self.actors: list[Any] = []
        self.fresh: set[int] = set()  # slots whose replacement has not answered yet
        self.replaced = 0
        #: Seconds the slowest actor spent training in the last round (the rest of
        #: ``train_round``'s time is Ray's: moving weights and deltas, scheduling).
        self.last_worker_seconds = 0.0
        self.started = connect(config.ray_address)
        try:
            self._start(config, task, x, y, train or config.train)
        except BaseException:
            self.close()
            raise

    def _start(self, config: SimConfig, task: Task, x: np.ndarray, y: np.ndarray,
               train: TrainConfig) -> None:
        ray = self.ray
        cpus = config.ray_cpus_per_worker or 1.0
        gpus = config.ray_gpus_per_worker or 0.0
        total = ray.cluster_resources()
        workers = config.ray_workers or max(1, int(total.get("CPU", 1) // cpus))
        if gpus > 0 and config.ray_workers is None:
            workers = min(workers, max(1, int(total.get("GPU", 0) // gpus)))
        workers = min(workers, config.per_round)
        self.spec = WorkerSpec(engine=config.engine, train=train, seed=config.seed,
                               device="cuda" if gpus > 0 else "cpu",
                               max_parallel=config.max_parallel, precision=config.precision,
                               threads=max(1, int(cpus)))
        ship_by_value(ray)
        self._make = ray.remote(EngineWorker).options(num_cpus=cpus, num_gpus=gpus)
        # Held for the whole run: a replacement actor fetches the same objects.
        self._refs = (ray.put(task), ray.put(x), ray.put(y))
        self.actors = [self._make.remote(self._refs, self.spec) for _ in range(workers)]
        try:
            got = ray.get([a.ready.remote() for a in self.actors], timeout=START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise BackendError(
                f"the Ray cluster did not start {workers} workers of {cpus:g} CPUs"
                f"{f' and {gpus:g} GPUs' if gpus else ''} each within {START_TIMEOUT:g} s; "
                "check `ray status`, or lower --ray-workers or --ray-cpus-per-worker."
            ) from None
        except ray.exceptions.RayError as exc:
            raise remote_error(exc) from None
        self.name = str(got[0][0])
        for note in dict.fromkeys(n for _, notes, _ in got for n in notes):
            self.log(note)

    def pids(self) -> list[int]:
        """The process id of every actor, by slot (for tests and diagnostics)."""
        refs = [a.pid.remote() for a in self.actors]
        return [int(p) for p in self.ray.get(refs, timeout=self.timeout)]

    def train_round(self, weights: Weights, clients: list[ClientTask],
                    config: TrainConfig) -> list[ClientUpdate]:
        """Train ``clients`` from ``weights`` on the actors; one update per client, in order."""
        if not clients:
            return []
        ray = self.ray
        weights_ref = ray.put(weights)
        chunks = balanced_chunks(clients, len(self.actors), config.batch_size, config.epochs)
        jobs: dict[Any, _Job] = {}

        def submit(job: _Job) -> None:
            start = START_TIMEOUT if job.slot in self.fresh else 0.0
            job.deadline = time.monotonic() + self.timeout + start
            job.actor = self.actors[job.slot]
            chunk = [clients[i] for i in job.positions]
            jobs[job.actor.train.remote(weights_ref, chunk, config)] = job

        for slot, positions in enumerate(chunks):
            submit(_Job(positions, slot))
        out: dict[int, ClientUpdate] = {}
        self.last_worker_seconds = 0.0
        while jobs:
            wait = max(0.0, min(j.deadline for j in jobs.values()) - time.monotonic())
            done, _ = ray.wait(list(jobs), num_returns=1, timeout=wait)
            if not done:
                now = time.monotonic()
                for ref, job in [(r, j) for r, j in jobs.items() if j.deadline <= now]:
                    del jobs[ref]
                    self._move(job, f"it took over {self.timeout:g} s (--ray-timeout)")
                    submit(job)
                continue
            job = jobs.pop(done[0])
            try:
                got = ray.get(done[0], timeout=self.timeout)
            except ray.exceptions.RayTaskError as exc:
                raise remote_error(exc) from None
            except ray.exceptions.RayError as exc:
                self._move(job, f"{type(exc).__name__}: {str(exc).strip()[:160]}")
                submit(job)
                continue
            if self.actors[job.slot] is job.actor:
                self.fresh.discard(job.slot)
            updates, seconds = got if isinstance(got, tuple) and len(got) == 2 else (got, 0.0)
            self.last_worker_seconds = max(self.last_worker_seconds, float(seconds))
            out.update(zip(job.positions, self._check(updates, job, clients, weights),
                           strict=True))
        return [out[i] for i in range(len(clients))]

    def _move(self, job: _Job, why: str) -> None:
        """Replace ``job``'s actor and give its chunk to the next slot (within limits)."""
        if job.moves >= MAX_MOVES or self.replaced >= MAX_REPLACEMENTS * len(self.actors):
            raise BackendError(f"Ray workers kept failing ({why}); check the cluster with "
                               "`ray status`, or raise --ray-timeout.")
        self.log(f"note: a Ray worker was lost ({why}); a new one replaces it and its "
                 f"{len(job.positions)} clients train again.")
        if self.actors[job.slot] is job.actor:  # not replaced yet (for another of its chunks)
            self._replace(job.slot)
        job.slot = (job.slot + 1) % len(self.actors)
        job.moves += 1

    def _replace(self, slot: int) -> None:
        """A new actor in ``slot``; the old one is killed if it still runs."""
        with contextlib.suppress(Exception):
            self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._make.remote(self._refs, self.spec)
        self.fresh.add(slot)
        self.replaced += 1

    def _check(self, got: Any, job: _Job, clients: list[ClientTask],
               weights: Weights) -> list[ClientUpdate]:
        """The chunk's updates, after checking they answer its clients with the model's arrays."""
        want = [clients[i].client_id for i in job.positions]
        if not isinstance(got, list) or [getattr(u, "client_id", None) for u in got] != want:
            raise BackendError("a Ray worker answered for other clients than it was given; "
                               "every node must run the same fedlearn version.")
        for update in got:
            if set(update.delta) != set(weights) or any(
                    update.delta[k].shape != v.shape or update.delta[k].dtype != v.dtype
                    for k, v in weights.items()):
                raise BackendError(f"a Ray worker returned a delta for {update.client_id} "
                                   "that does not fit the model; every node must run the "
                                   "same fedlearn version and task.")
        return list(got)

    def close(self) -> None:
        """Stop the actors (and Ray itself when this engine started it)."""
        ray = self.ray
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self.started and ray.is_initialized():
            ray.shutdown()
            self.started = False
