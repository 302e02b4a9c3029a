"""The client's loop: register, poll for tasks, train locally, send deltas, until done.

Everything the loop says to the server goes through a :class:`Remote` (in
production a :class:`~fedlearn.client.remote.RemoteServer`; in tests a fake),
so this module never touches HTTP. Training is :class:`~fedlearn.client.local.LocalClient`,
the same code the simulator uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fedlearn.attacks import Attackers, label_flip_classes, parse_attack
from fedlearn.client.control import ControlStore, control_path
from fedlearn.client.identity import load_identity, save_identity
from fedlearn.client.local import LocalClient
from fedlearn.client.remote import (
    MAX_POLL_WAIT,
    PayloadRefused,
    Registration,
    RetriesExhausted,
    Task,
    with_retries,
)
from fedlearn.config import TrainConfig
from fedlearn.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    FedlearnError,
    PayloadError,
    RemoteError,
    SecAggAbortedError,
)
from fedlearn.tasks.base import ClientData, Data, DataContext
from fedlearn.tasks.base import Task as TaskDef
from fedlearn.types import ClientResult, ControlVariates, Weights
from fedlearn.weights import pack, unpack

T = TypeVar("T")

#: Retries before the first answer: sleeps of 0.5, 1, 2, 4, 5, 5, 5 s at most (~30 s in all).
FIRST_CONTACT_RETRIES = 7


class Remote(Protocol):
    """What the loop needs from a server: the methods of ``RemoteServer``."""

    def register(
        self, client_id: str, num_examples: int | None, *,
        num_test_examples: int | None = None, task: Mapping[str, Any] | None = None,
        credential: str | None = None, claim: str | None = None,
    ) -> Registration:
        """Register (``credential``: this id's current one; ``claim``: its own secret) and
        keep the new credential."""
        ...

    def next_task(self, wait: float) -> Task:
        """Long-poll up to ``wait`` seconds for the next task."""
        ...

    def get_model(self) -> tuple[Weights, int]:
        """The current global weights and their version."""
        ...

    def submit_update(
        self, round: int, delta: Weights, num_examples: int, metrics: Mapping[str, float],
        task_id: str | None = None,
    ) -> None:
        """Send the delta trained for ``round`` (sync runs)."""
        ...

    def submit_evaluation(
        self, round: int, metrics: Mapping[str, float], num_examples: int
    ) -> None:
        """Send a federated-evaluation answer for the evaluation ``round``."""
        ...

    def withdraw(self, task_id: str, reason: str = "") -> None:
        """Give up train task ``task_id``: no update will come for it."""
        ...

    def push_update(
        self, version: int, delta: Weights, num_examples: int, metrics: Mapping[str, float],
        task_id: str | None = None,
    ) -> dict[str, Any]:
        """Send a delta trained from model ``version`` (async runs); the server's answer."""
        ...

    def status(self) -> dict[str, Any]:
        """The run's status."""
        ...

    def secagg_post(self, name: str, task_id: str, body: bytes | Mapping[str, Any],
                    num_examples: int | None = None) -> None:
        """Send this client's message for a stage of secure aggregation."""
        ...

    def secagg_fetch(self, name: str, task_id: str, wait: float) -> dict[str, Any] | None:
        """What this client needs before a stage of secure aggregation (None: not open yet)."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one client process needs (the ``fedlearn client`` flags).

    ``task`` is what to train (None: the built-in model the server names, on
    built-in ``dataset``). ``partition`` names this client's share of a built-in
    training set (``iid:N:I``, ``dirichlet:A:N:I``, ``shards:K:N:I`` or
    ``range:L-R``), cut with ``partition_seed`` (the same on every client);
    ``data`` is a local path instead (``--data``; ``label`` for tables);
    ``test_fraction`` holds out a local test set for federated evaluation.
    ``overrides`` are training settings this client's own flags set: they win
    over the config the server sends with each task.
    ``slowdown`` > 1 stretches local training time (benchmarks only).
    ``cpu_slot`` names a lock file held while training, so clients sharing a
    host take turns on its cores instead of thrashing them. ``max_offline``
    (async runs) is how many times in a row the client goes on training when
    the server stays unreachable through every retry, before it gives up.
    ``attack`` (robustness benchmarks only) makes this client an attacker
    (:mod:`fedlearn.attacks`): it poisons its delta or its training labels, and
    goes on when the server refuses what it sends. ``pause_after_masked`` (tests
    only) sleeps that long after the masked upload of a secure aggregation round,
    before the unmask stage, so a test can kill the client there.
    """

    server: str
    client_id: str
    token: str = field(repr=False)
    task: TaskDef | None = None
    dataset: str = "fashion-mnist"
    partition: str | None = "iid:1:0"
    data: str | None = None
    label: str | None = None
    test_fraction: float = 0.0
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    credential_file: str | None = None
    partition_seed: int = 0
    poll_wait: float = 30.0
    max_retries: int = 30
    max_wait: float = 10.0
    slowdown: float = 1.0
    ca_file: str | None = None
    cpu_slot: str | None = None
    max_offline: int = 10
    dp_sgd: str | None = None
    dp_delta: float = 1e-5
    attack: str = ""
    pause_after_masked: float = 0.0

    def __post_init__(self) -> None:
        from fedlearn.privacy.dpsgd import parse_dp_sgd

        parse_dp_sgd(self.dp_sgd, self.dp_delta)
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
        if self.attack:
            parse_attack(self.attack)
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
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> WorkerSummary:
    """Take part in the server's run until it says ``done``; return what happened.

    The task's data is loaded (and checked) before anything is sent. Calls that
    find the server unreachable are retried with backoff (``sleep`` and ``rng``
    drive it); a 401 after registering (a server restarted without
    ``--resume``) makes the client register again once; a 409 on an update is
    logged and the loop goes on. Every other error propagates.
    """
    worker = _Worker(config, remote, log, sleep, rng)
    try:
        return worker.run()
    finally:
        if worker.local is not None:
            worker.local.close()


def data_context(config: WorkerConfig) -> Any:
    """The :class:`~fedlearn.tasks.base.DataContext` of this client process."""
    from fedlearn.data import parse_partition
    from fedlearn.tasks.runtime import context

    index = num = None
    if config.partition is not None:
        part = parse_partition(config.partition).part
        if part is not None:
            num, index = part
    return context(index=index, num_clients=num, client_id=config.client_id,
                   data=config.data, label=config.label,
                   partition=None if config.data is not None else config.partition,
                   seed=config.partition_seed, test_fraction=config.test_fraction)


class _Worker:
    """The loop's state: registration, model workspace, cached global weights, counts."""

    def __init__(
        self,
        config: WorkerConfig,
        remote: Remote,
        log: Callable[[str], None],
        sleep: Callable[[float], None],
        rng: random.Random | None,
    ) -> None:
        self.config = config
        self.remote = remote
        self.log = log
        self.sleep = sleep
        self.rng = rng if rng is not None else random.Random()
        self.task: TaskDef | None = config.task
        self.local: LocalClient | None = None
        self.server_config: dict[str, Any] = {}
        self.cached: tuple[Weights, int] | None = None
        #: groups of arrays the server sends beside the model, and those of the cached model
        self.model_extras: tuple[str, ...] = ()
        self.extras: dict[str, Weights] = {}
        self.controls = ControlStore(None, "")
        self.reregistered = False
        self.reached = False  # has the server ever answered?
        self.mode = "sync"
        self.trained = 0
        self.refused = 0
        self.last_round = 0
        self.attackers = Attackers()
        self.refused_task = ""  # an attacker's task whose update the server refused

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` retried while the server is unreachable.

        Until the server has answered once, the client gives up after about 30 s
        (a wrong URL should not take minutes to report); after that it rides out
        restarts with the full ``max_retries``/``max_wait`` budget.
        """
        first = not self.reached
        retries = min(FIRST_CONTACT_RETRIES, self.config.max_retries) if first else (
            self.config.max_retries)
        try:
            result = with_retries(
                fn, max_retries=retries, max_wait=min(self.config.max_wait, 5.0) if first
                else self.config.max_wait, rng=self.rng, sleep=self.sleep,
                on_retry=lambda n, sec, exc: self.log(f"retry {n}/{retries} in {sec:.1f}s: "
                                                      f"{exc}"),
            )
        except RetriesExhausted as exc:
            if not first:
                raise
            raise RetriesExhausted(
                f"could not reach a fedlearn server at {self.config.server}; check http vs "
                "https, the host and the port, and that `fedlearn server` is running there."
            ) from exc
        self.reached = True
        self.reregistered = False
        return result

    def prepare(self) -> None:
        """Load this client's data for its task (before anything is sent)."""
        if self.local is None and self.task is not None:
            from fedlearn.privacy.dpsgd import parse_dp_sgd

            dp_sgd = parse_dp_sgd(self.config.dp_sgd, self.config.dp_delta)
            ledger = (None if self.config.credential_file is None
                      else self.config.credential_file.removesuffix(".json") + ".dpsgd.json")
            if dp_sgd is not None:
                self.log(f"{dp_sgd.describe()}; ε reported at δ = {dp_sgd.delta:g}")
            ctx = data_context(self.config)
            data = None
            if self.config.attack:
                attack = parse_attack(self.config.attack)
                classes = label_flip_classes(self.task) if attack.poisons_data else None
                self.attackers = Attackers(attack, frozenset({self.config.client_id}), classes)
                self.log(f"attacking ({attack}) for a robustness benchmark")
                if attack.poisons_data:
                    data = self.poisoned(ctx)
            self.local = LocalClient(self.task, ctx, seed=self.config.partition_seed,
                                     device=self.config.device, data=data, dp_sgd=dp_sgd,
                                     ledger_file=ledger)

    def poisoned(self, ctx: DataContext) -> ClientData:
        """This client's data with the training labels flipped (``label-flip``)."""
        from fedlearn.tasks.runtime import load_client_data

        if self.task is None:  # pragma: no cover - prepare() checks it
            raise ConfigError("no task to train.")
        data = load_client_data(self.task, ctx)
        flipped = self.attackers.labels(self.config.client_id, data.train.y)
        return ClientData(Data(data.train.x, flipped), data.test)

    def register(self) -> None:
        """Register (with retries), refusing a server whose task is not ours."""
        from fedlearn.weights import spec_to_json

        identity = load_identity(self.config.credential_file, self.config.client_id)
        claim = identity["claim"]
        if self.task is None:
            # The built-in model the server names, on our --dataset.
            first = self.call(lambda: self.remote.register(
                self.config.client_id, None, credential=identity.get("credential"),
                claim=claim))
            identity["credential"] = first.credential
            from fedlearn.tasks.builtin import builtin_task

            if first.dataset.lower() != self.config.dataset.lower():
                raise ConfigError(
                    f"the server's run uses dataset {first.dataset!r} but this client loaded "
                    f"{self.config.dataset!r}; pass --dataset {first.dataset}."
                )
            self.task = builtin_task(self.config.dataset, first.model)
        self.prepare()
        local = self.local
        if local is None:  # pragma: no cover - prepare() sets it
            raise ConfigError("no task to train.")
        spec = None if local.trainer is None else {
            "name": self.task.name, "spec": spec_to_json(local.trainer.spec)}
        reg = self.call(lambda: self.remote.register(
            self.config.client_id, local.num_examples,
            num_test_examples=local.num_test_examples, task=spec, credential=identity.get(
                "credential"), claim=claim))
        save_identity(self.config.credential_file, {**identity, "credential": reg.credential,
                                                     "run_id": reg.run_id})
        self.server_config = dict(reg.config)
        self.cached = None
        self.model_extras = reg.model_extras
        if "c" in reg.model_extras:
            self.controls = ControlStore(control_path(self.config.credential_file), reg.run_id)
        self.mode = reg.mode
        length = "async" if reg.mode == "async" else f"{reg.rounds} rounds"
        examples = "" if local.num_examples is None else f" with {local.num_examples} examples"
        self.log(f"registered as {reg.client_id} in run {reg.run_id} ({reg.mode}, task "
                 f"{reg.task or self.task.name}, {length}){examples}")

    def round_config(self, sent: dict[str, Any] | None) -> TrainConfig:
        """The server's config for this task, with this client's own flags on top."""
        return TrainConfig.from_dict({**self.server_config, **(sent or {})}).merged(
            self.config.overrides)

    def fit(self, weights: Weights, task: Task) -> ClientResult:
        """Train from ``weights`` for ``task`` with the round's config (SCAFFOLD's
        control variates when the round asks for them)."""
        if self.local is None:  # pragma: no cover
            raise ConfigError("no task to train.")
        config = self.round_config(task.config)
        control = None
        if config.scaffold:
            c = self.extras.get("c")
            if not c:
                raise RemoteError("the server asks for SCAFFOLD but sent no control variate "
                                  "with the model; use the same fedlearn version on server "
                                  "and clients.")
            control = ControlVariates(c, self.controls.for_version(task.version, c))
        result = self.local.fit(weights, config, seed=task.seed, round_number=task.round,
                                version=task.version, slowdown=self.config.slowdown,
                                control=control)
        bound = config.extra.get("dp_clip")
        if bound is not None and task.secagg is None:  # (under --secagg: in send_masked)
            # DP-FedAvg with --dp-clip-on client: the delta is clipped before it leaves.
            from fedlearn.privacy.dp import clip

            # A non-finite delta cannot be clipped: the server refuses it with a sentence.
            with contextlib.suppress(PayloadError):
                result = dataclasses.replace(result, delta=clip(result.delta, float(bound))[0])
        if not self.attackers.active:
            return result
        return dataclasses.replace(result, delta=self.attackers.delta(
            self.config.client_id, result.delta, task.seed))

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
        if task.action == "evaluate":
            self.evaluate(task)
            return False
        if task.action != "train":
            raise RemoteError(f"the server sent an unknown task action {task.action!r}; use "
                              "the same fedlearn version on server and clients.")
        if task.task_id and task.task_id == self.refused_task:
            # The server keeps a refused attacker's task open until the round's deadline:
            # wait for the next one instead of training and sending it again and again.
            self.sleep(min(self.config.poll_wait, 2.0))
            return False
        self.train(task)
        return False

    def weights_for(self, task: Task) -> Weights | None:
        """The global weights of ``task.version``: cached, or fetched once per version."""
        if self.cached is None or self.cached[1] != task.version:
            self.fetch_model()
        if self.cached is None:  # pragma: no cover - fetch_model sets it
            return None
        weights, version = self.cached
        if version != task.version:
            self.log(f"round {task.round}: the server's model is at version {version}, not "
                     f"{task.version}; skipping this round")
            return None
        return weights

    def fetch_model(self) -> Weights:
        """Fetch the server's model; cache it (and the arrays sent beside it)."""
        arrays, version = self.call(self.remote.get_model)
        weights, self.extras = unpack(arrays, self.model_extras)
        self.cached = (weights, version)
        return weights

    def evaluate(self, task: Task, *, any_version: bool = False) -> None:
        """Evaluate the task's global weights on the local test data and send the metrics.

        ``any_version`` (async runs): evaluate the model the server has now, which may
        be newer than the one the task named.
        """
        if any_version:
            weights: Weights | None = self.fetch_model()
        else:
            weights = self.weights_for(task)
        if weights is None or self.local is None:
            return
        with cpu_slot(self.config.cpu_slot):
            result = self.local.evaluate(weights, round_number=task.round, version=task.version)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        self.log(f"evaluated version {task.version} on {result.num_examples} local test "
                 f"examples: {shown or 'no test data'}")
        try:
            self.call(lambda: self.remote.submit_evaluation(
                task.round, result.metrics, result.num_examples))
        except ConflictError as exc:
            self.log(f"evaluation refused: {exc}")

    def train(self, task: Task) -> None:
        """Train from the task's global weights and send the delta."""
        weights = self.weights_for(task)
        if weights is None or self.local is None:
            return
        with cpu_slot(self.config.cpu_slot):
            result = self.fit(weights, task)
        if result.control is not None:  # kept before sending: a crash cannot lose it
            self.controls.keep(task.version, result.control)
        line = f"round {task.round}: {result.num_examples} examples, " + describe(result.metrics)
        self.last_round = task.round
        if task.secagg is not None:
            self.send_masked(task, weights, result, line)
            return
        payload = pack(result.delta, result.extra)
        try:
            self.call(lambda: self.remote.submit_update(
                task.round, payload, result.num_examples, result.metrics,
                task.task_id or None))
        except ConflictError as exc:
            self.refused += 1
            self.controls.forget(task.version)
            self.log(f"{line}; update refused: {exc}")
            return
        except PayloadRefused as exc:
            self.withdraw(task, f"update refused: {exc}")
            if not self.attackers.active:
                raise
            self.refused += 1  # the server's checks caught the attack: that is their job
            self.refused_task = task.task_id
            self.log(f"{line}; attacked update refused: {exc}")
            return
        self.trained += 1
        self.log(line)


    def withdraw(self, task: Task, reason: str) -> None:
        """Tell the server no update will come for ``task``, so its round does not wait for
        one (one try: a server that does not hear it waits until the round's deadline)."""
        if not task.task_id:
            return
        try:
            self.remote.withdraw(task.task_id, reason)
        except FedlearnError as exc:
            self.log(f"round {task.round}: could not withdraw from the round ({exc})")

    def send_masked(self, task: Task, weights: Weights, result: ClientResult,
                    line: str) -> None:
        """Secure aggregation: check the update here (the server cannot), then mask it and
        take part in the round's stages."""
        from fedlearn.client.secagg import SecAggTask, check_update, run_stages

        secagg = SecAggTask.from_json(task.secagg or {})
        try:
            update = check_update(secagg, weights, result.delta, result.num_examples)
        except PayloadError as exc:
            self.refused += 1
            self.refused_task = task.task_id  # not trained and refused again this round
            self.log(f"{line}; update not sent, it fails this client's own checks: {exc}")
            self.withdraw(task, "its update fails the client's own checks")
            return
        pause = self.config.pause_after_masked

        def paused() -> None:
            self.log(f"round {task.round}: masked update sent; pausing {pause:g}s")
            self.sleep(pause)

        try:
            run_stages(self.remote, task.task_id, secagg, update,
                       num_examples=result.num_examples,
                       train_loss=result.metrics.get("train_loss"), call=self.call,
                       wait=self.config.poll_wait, after_masked=paused if pause > 0 else None)
        except (ConflictError, SecAggAbortedError, PayloadError) as exc:
            self.refused += 1
            self.log(f"{line}; secure aggregation did not finish for this client: {exc}")
            return
        self.trained += 1
        self.log(f"{line} (sent masked)")


def describe(metrics: Mapping[str, float]) -> str:
    """``train loss 0.1234, accuracy 91.20%, 1.2s`` from whichever metrics there are."""
    parts = []
    if "train_loss" in metrics:
        parts.append(f"train loss {metrics['train_loss']:.4f}")
    if "train_accuracy" in metrics:
        parts.append(f"accuracy {100.0 * metrics['train_accuracy']:.2f}%")
    if "dp_epsilon" in metrics:
        parts.append(f"DP-SGD ε {metrics['dp_epsilon']:.3f} at δ {metrics.get('dp_delta', 0):g} "
                     "so far")
    parts += [f"{k} {v:.4f}" for k, v in metrics.items()
              if k not in ("train_loss", "train_accuracy", "seconds", "dp_epsilon", "dp_delta",
                           "dp_steps")]
    if "seconds" in metrics:
        parts.append(f"{metrics['seconds']:.1f}s")
    return ", ".join(parts)
