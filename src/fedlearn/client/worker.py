"""The client's loop: register, poll for tasks, train locally, send deltas, until done.

Everything the loop says to the server goes through a :class:`Remote` (in
production a :class:`~fedlearn.client.remote.RemoteServer`; in tests a fake),
so this module never touches HTTP. Training is :func:`fedlearn.training.local_update`,
the same routine the simulator uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from torch import nn

from fedlearn.client.remote import (
    MAX_POLL_WAIT,
    Registration,
    ServerUnavailable,
    Task,
    with_retries,
)
from fedlearn.config import TrainConfig
from fedlearn.data import Dataset, client_indices, load_dataset
from fedlearn.errors import AuthError, ConfigError, ConflictError, RemoteError
from fedlearn.models import build_model
from fedlearn.training import Shard, local_update
from fedlearn.types import Weights

T = TypeVar("T")


class Remote(Protocol):
    """What the loop needs from a server: the methods of ``RemoteServer``."""

    def register(self, client_id: str, num_examples: int) -> Registration:
        """Register and keep the returned credential for later calls."""
        ...

    def next_task(self, wait: float) -> Task:
        """Long-poll up to ``wait`` seconds for the next task."""
        ...

    def get_model(self) -> tuple[Weights, int]:
        """The current global weights and their version."""
        ...

    def submit_update(
        self, round: int, delta: Weights, num_examples: int, metrics: Mapping[str, float]
    ) -> None:
        """Send the delta trained for ``round`` (sync runs)."""
        ...

    def push_update(
        self, version: int, delta: Weights, num_examples: int, metrics: Mapping[str, float]
    ) -> dict[str, Any]:
        """Send a delta trained from model ``version`` (async runs); the server's answer."""
        ...

    def status(self) -> dict[str, Any]:
        """The run's status."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one client process needs (the ``fedlearn client`` flags).

    ``partition`` names this client's share of the training set (``iid:N:I``,
    ``dirichlet:A:N:I``, ``shards:K:N:I`` or ``range:L-R``), cut with
    ``partition_seed``; every client of a run must use the same seed.
    ``slowdown`` > 1 stretches local training time (benchmarks only).
    ``cpu_slot`` names a lock file held while training, so clients sharing a
    host take turns on its cores instead of thrashing them. ``max_offline``
    (async runs) is how many times in a row the client goes on training when
    the server stays unreachable through every retry, before it gives up.
    """

    server: str
    client_id: str
    dataset: str
    partition: str
    train: TrainConfig
    token: str = field(repr=False)
    partition_seed: int = 0
    poll_wait: float = 30.0
    max_retries: int = 30
    max_wait: float = 10.0
    slowdown: float = 1.0
    ca_file: str | None = None
    cpu_slot: str | None = None
    max_offline: int = 10

    def __post_init__(self) -> None:
        if not self.client_id.strip():
            raise ConfigError("the client id is empty; pass --client-id NAME.")
        if not 0 < self.poll_wait <= MAX_POLL_WAIT:
            raise ConfigError(
                f"--poll-wait must be more than 0 and at most {MAX_POLL_WAIT:g} seconds, "
                f"got {self.poll_wait}."
            )
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be 0 or more, got {self.max_retries}.")
        if not (self.max_wait > 0 and math.isfinite(self.max_wait)):
            raise ConfigError(f"--max-wait must be a positive number of seconds, "
                              f"got {self.max_wait}.")
        if self.max_offline < 0:
            raise ConfigError(f"--max-offline must be 0 or more, got {self.max_offline}.")
        if not (self.slowdown >= 1.0 and math.isfinite(self.slowdown)):
            raise ConfigError(f"--slowdown must be a finite factor of at least 1, "
                              f"got {self.slowdown}.")


@dataclass(frozen=True)
class WorkerSummary:
    """How a client's run went.

    ``rounds_trained`` counts updates the server accepted, ``updates_refused``
    those it refused with 409 (round closed, not sampled, already sent; in an
    async run: too stale, from the future, run over); ``last_round`` is the
    last round this client trained for (0 if none; in an async run the base
    version of its last accepted update). ``went_offline`` (async) counts the
    times the server stayed unreachable and the client trained on regardless.
    """

    rounds_trained: int
    updates_refused: int
    last_round: int
    mode: str = "sync"
    went_offline: int = 0


@contextlib.contextmanager
def cpu_slot(path: str | None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (no-op for None) for the duration."""
    if path is None:
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def run_worker(
    config: WorkerConfig,
    remote: Remote,
    *,
    data: Dataset | None = None,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> WorkerSummary:
    """Take part in the server's run until it says ``done``; return what happened.

    ``data`` replaces ``load_dataset(config.dataset)`` (tests). Calls that find
    the server unreachable are retried with backoff (``sleep`` and ``rng`` drive
    it); a 401 after registering (a server restarted without ``--resume``)
    makes the client register again once; a 409 on an update is logged and
    the loop goes on. Every other error propagates.
    """
    ds = data if data is not None else load_dataset(config.dataset)
    indices = client_indices(ds.y_train, config.partition, config.partition_seed)
    shard = Shard.from_numpy(ds.x_train, ds.y_train, indices)
    if len(shard) == 0:
        raise ConfigError(f"partition {config.partition!r} gives this client no training "
                          "examples; pick a partition with data for it.")
    return _Worker(config, remote, ds, shard, log, sleep, rng).run()


class _Worker:
    """The loop's state: registration, model workspace, cached global weights, counts."""

    def __init__(
        self,
        config: WorkerConfig,
        remote: Remote,
        ds: Dataset,
        shard: Shard,
        log: Callable[[str], None],
        sleep: Callable[[float], None],
        rng: random.Random | None,
    ) -> None:
        self.config = config
        self.remote = remote
        self.ds = ds
        self.shard = shard
        self.log = log
        self.sleep = sleep
        self.rng = rng if rng is not None else random.Random()
        self.model: nn.Module | None = None
        self.cached: tuple[Weights, int] | None = None
        self.reregistered = False
        self.mode = "sync"
        self.trained = 0
        self.refused = 0
        self.last_round = 0

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` retried while the server is unreachable."""
        result = with_retries(
            fn, max_retries=self.config.max_retries, max_wait=self.config.max_wait,
            rng=self.rng, sleep=self.sleep, on_retry=self._on_retry,
        )
        self.reregistered = False
        return result

    def _on_retry(self, n: int, seconds: float, exc: ServerUnavailable) -> None:
        self.log(f"retry {n}/{self.config.max_retries} in {seconds:.1f}s: {exc}")

    def register(self) -> None:
        """Register (with retries), check the run fits our data, and build the model."""
        reg = self.call(lambda: self.remote.register(self.config.client_id, len(self.shard)))
        if reg.dataset.lower() != self.ds.name.lower():
            raise ConfigError(
                f"the server's run uses dataset {reg.dataset!r} but this client loaded "
                f"{self.ds.name!r}; pass --dataset {reg.dataset}."
            )
        self.model = build_model(reg.model, self.ds.input_shape, self.ds.num_classes)
        self.cached = None
        self.mode = reg.mode
        length = "async" if reg.mode == "async" else f"{reg.rounds} rounds"
        self.log(f"registered as {reg.client_id} in run {reg.run_id} ({reg.mode}, {reg.model} "
                 f"on {reg.dataset}, {length}) with {len(self.shard)} examples")

    def run(self) -> WorkerSummary:
        """Loop until the server says ``done``."""
        from fedlearn.client.async_loop import AsyncLoop

        self.register()
        loop = AsyncLoop(self)
        while True:
            try:
                if loop.step() if self.mode == "async" else self.step():
                    break
            except AuthError as exc:
                if self.reregistered:
                    raise
                self.log(f"the server no longer accepts our credential ({exc}); "
                         "registering again")
                self.register()
                loop.reset()
                self.reregistered = True
        if self.mode == "async":
            return WorkerSummary(loop.accepted, loop.refused, loop.last_version, "async",
                                 loop.went_on)
        return WorkerSummary(self.trained, self.refused, self.last_round)

    def step(self) -> bool:
        """One task: train and submit, or wait; True when the run is done."""
        task = self.call(lambda: self.remote.next_task(self.config.poll_wait))
        if task.action == "done":
            return True
        if task.action == "wait":
            return False
        if task.action != "train":
            raise RemoteError(f"the server sent an unknown task action {task.action!r}; use "
                              "the same fedlearn version on server and clients.")
        self.train(task)
        return False

    def weights_for(self, task: Task) -> Weights | None:
        """The global weights of ``task.version``: cached, or fetched once per version."""
        if self.cached is None or self.cached[1] != task.version:
            self.cached = self.call(self.remote.get_model)
        weights, version = self.cached
        if version != task.version:
            self.log(f"round {task.round}: the server's model is at version {version}, not "
                     f"{task.version}; skipping this round")
            return None
        return weights

    def train(self, task: Task) -> None:
        """Train from the task's global weights and send the delta."""
        weights = self.weights_for(task)
        if weights is None or self.model is None:
            return
        with cpu_slot(self.config.cpu_slot):
            result = local_update(
                self.model, weights, self.shard, self.config.train, seed=task.seed,
                base_version=task.version, slowdown=self.config.slowdown,
            )
        m = result.metrics
        line = (f"round {task.round}: {result.num_examples} examples, train loss "
                f"{m['train_loss']:.4f}, accuracy {100.0 * m['train_accuracy']:.2f}%, "
                f"{m['seconds']:.1f}s")
        self.last_round = task.round
        try:
            self.call(lambda: self.remote.submit_update(
                task.round, result.delta, result.num_examples, result.metrics))
        except ConflictError as exc:
            self.refused += 1
            self.log(f"{line}; update refused: {exc}")
            return
        self.trained += 1
        self.log(line)
