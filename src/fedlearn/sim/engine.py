"""The simulator's round loop, shared by every engine.

Each round does what the HTTP server's :class:`~fedlearn.server.coordinator.SyncCoordinator`
does with the same flags, so a simulated run and a ``fedlearn run`` reach
the same model: the same initial state (the task's model under the run
seed), the same client ids (``client-{i}`` holding what the task's data
function gives client ``i`` of N), the same sample (``sample_clients`` with
fraction K/N), the same data seeds (``task_seed(seed, round, client_id)``), the
same round config, and FedAvg over a :class:`~fedlearn.weights.RunningSum` of
deltas weighted by example counts. Only the training differs, and that is
the engine's business.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlearn.attacks import Attackers, check_attack_config
from fedlearn.config import TrainConfig
from fedlearn.data import parse_partition
from fedlearn.errors import ConfigError, PartitionError
from fedlearn.metrics import weighted_means
from fedlearn.privacy.dpsgd import DPSGD, parse_dp_sgd
from fedlearn.runs import RunDir, final_metrics
from fedlearn.seeding import task_seed
from fedlearn.sim.base import ENGINES, PRECISIONS, ClientTask, ClientUpdate, Engine
from fedlearn.sim.modes import check_modes
from fedlearn.sim.sequential import ScriptEngine, SequentialEngine
from fedlearn.sim.vectorized import VectorizedEngine, unsupported_reason
from fedlearn.strategies import make_strategy, sample_clients
from fedlearn.tasks.base import ClientData, Task
from fedlearn.types import Weights
from fedlearn.weights import RunningSum

RoundHook = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SimConfig:
    """What a simulated run is: N clients, K of them sampled per round, R rounds."""

    clients: int = 100
    per_round: int = 10
    partition: str = "iid"
    rounds: int = 10
    engine: str = "vectorized"
    dataset: str = "fashion-mnist"
    model: str = "mlp"
    task: str = ""
    data: str | None = None
    label: str | None = None
    test_fraction: float = 0.0
    eval_every: int = 1
    eval_fraction: float | None = None
    attack: str = ""
    attackers: float | None = None
    strategy: str = "fedavg"
    server_lr: float = 1.0
    seed: int = 0
    max_parallel: int | None = None
    precision: str = "fp32"
    dp_sgd: str | None = None
    dp_delta: float = 1e-5
    train: TrainConfig = field(default_factory=TrainConfig)
    # Simulated time (fedlearn.sim.virtual): async merging and sync round deadlines.
    mode: str = "sync"
    async_policy: str = "fedasync"
    async_alpha: float = 0.6
    staleness_fn: str = "polynomial"
    max_staleness: int | None = None
    client_speeds: str = "constant"
    round_timeout: float | None = None
    updates: int | None = None
    concurrency: int | None = None
    max_virtual_time: float | None = None

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError(f"--clients must be at least 1, got {self.clients}.")
        if not 1 <= self.per_round <= self.clients:
            raise ConfigError(
                f"--per-round must be between 1 and --clients ({self.clients}), "
                f"got {self.per_round}."
            )
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}.")
        if self.engine not in ENGINES:
            raise ConfigError(
                f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}."
            )
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}.")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ConfigError(f"--max-parallel must be at least 1, got {self.max_parallel}.")
        check_precision(self.precision)
        from fedlearn.privacy.dpsgd import parse_dp_sgd

        parse_dp_sgd(self.dp_sgd, self.dp_delta)
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every must be at least 1, got {self.eval_every}.")
        if self.eval_fraction is not None and not 0 < self.eval_fraction <= 1:
            raise ConfigError(f"--eval-fraction must be in (0, 1], got {self.eval_fraction}.")
        try:
            spec = parse_partition(self.partition)
        except PartitionError as exc:
            raise ConfigError(f"--partition: {exc}") from None
        if spec.part is not None:
            raise ConfigError(
                f"--partition {self.partition} names one part; give the whole split "
                "(iid, dirichlet:A or shards:K) and the simulator hands out the parts."
            )
        make_strategy(self.strategy, server_lr=self.server_lr)
        # --attack without --attackers: the default share, written down as resolved.
        object.__setattr__(self, "attackers",
                           check_attack_config(self.attack, self.attackers, self.clients))
        if _sample_size(self.clients, self.per_round) != self.per_round:
            raise ConfigError(  # pragma: no cover - ceil(K/N * N) is K for any sane N
                f"--per-round {self.per_round} of {self.clients} clients cannot be "
                "expressed as a sampling fraction; pick another --per-round."
            )
        check_modes(self)

    @property
    def fraction(self) -> float:
        """The share of clients sampled per round, as the HTTP server's --fraction."""
        return self.per_round / self.clients

    @property
    def in_flight(self) -> int:
        """Async: clients training at once (``concurrency``, by default ``per_round``)."""
        return self.concurrency if self.concurrency is not None else self.per_round

    @property
    def virtual(self) -> bool:
        """Whether the run needs the virtual clock (async, a round deadline or speeds)."""
        return (self.mode == "async" or self.round_timeout is not None
                or self.client_speeds != "constant" or self.max_virtual_time is not None)


def _sample_size(clients: int, per_round: int) -> int:
    """How many clients ``sample_clients`` picks for fraction K/N (as it computes it)."""
    return min(clients, max(1, math.ceil(per_round / clients * clients - 1e-9)))


def model_task(model: nn.Module) -> Task:
    """A cross-entropy classification task around a bare model (each trainer gets a copy)."""
    return Task(name=type(model).__name__, model=lambda: copy.deepcopy(model))


def make_engine(
    name: str,
    task: Task | nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    seed: int = 0,
    device: str = "cpu",
    max_parallel: int | None = None,
    precision: str = "fp32",
    dp_sgd: DPSGD | None = None,
    log: Callable[[str], None] = print,
) -> Engine:
    """The engine ``name`` for ``task`` on the pooled training rows ``(x, y)``.

    ``vectorized`` stacks the sampled clients: the hand-written ``mlp`` engine
    where it applies (measurably the fastest), else the general
    :class:`~fedlearn.sim.functional.FunctionalEngine` for any torch model it
    can stack; otherwise it falls back to ``sequential``, saying why in one
    line through ``log``. ``max_parallel`` caps the clients stacked at once
    (None: as many as memory holds); ``precision`` is ``fp32`` or ``bf16``
    (autocast). The rows move to ``device`` once, here. ``dp_sgd`` trains
    each client with Opacus's DP-SGD, one client after another.
    """
    from fedlearn.training import Trainer

    if isinstance(task, nn.Module):
        task = model_task(task)
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}.")
    check_precision(precision)
    trainer = Trainer(task, seed=seed, device=device, precision=precision, dp_sgd=dp_sgd)
    if dp_sgd is not None and trainer.model is not None:
        from fedlearn.training_dp import check_private_model

        check_private_model(trainer.model)
    if name == "vectorized":
        why = _vectorized_reason(task, trainer)
        if why is None and trainer.model is not None and task.loss_name == "cross_entropy" \
                and precision == "fp32" and trainer.device == "cpu" \
                and unsupported_reason(trainer.model, config) is None:
            return VectorizedEngine(trainer.model, x, y, max_parallel=max_parallel)
        if why is None and trainer.model is not None:
            from fedlearn.sim.functional import FunctionalEngine, functional_unsupported_reason
            from fedlearn.training import per_sample_loss

            loss = per_sample_loss(task)
            xd, yd = x.to(trainer.device), y.to(trainer.device)
            why = functional_unsupported_reason(trainer.model, config, x=xd[:4], y=yd[:4],
                                                loss=loss, precision=precision)
            if why is None:
                return FunctionalEngine(trainer.model, xd, yd, loss=loss,
                                        max_parallel=max_parallel, precision=precision,
                                        log=log)
        log(f"note: the vectorized engine cannot run this ({why}); using the sequential engine.")
    return SequentialEngine(trainer, x, y)


def check_precision(precision: str) -> None:
    """Raise ConfigError unless ``precision`` is one the engines know."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; choose one of "
                          f"{', '.join(PRECISIONS)}.")


def _vectorized_reason(task: Task, trainer: Any) -> str | None:
    """Why the stacked engines cannot train ``task`` (None when they can try)."""
    if task.train is not None or task.optimizer is not None:
        return "the task trains with its own function or optimizer"
    if trainer.model is None:
        return "the task has no torch model"
    if task.loss_name is None:
        return "the task's loss is its own function"
    if trainer.dp_sgd is not None:
        return "DP-SGD trains through Opacus, one client at a time"
    return None


def client_ids(clients: int) -> list[str]:
    """The ids of ``clients`` simulated clients, as ``fedlearn run`` names its processes."""
    return [f"client-{i}" for i in range(clients)]


def aggregate(updates: list[ClientUpdate]) -> RunningSum:
    """The deltas of a round folded into a RunningSum weighted by examples, by sorted id."""
    sums = RunningSum()
    for update in sorted(updates, key=lambda u: u.client_id):
        sums.add(update.delta, float(update.num_examples))
    return sums


class Simulation:
    """A simulated run held in memory: clients' data, engine and global model, round by round.

    ``log`` hears the one-line notice of an engine fallback.
    """

    def __init__(
        self,
        config: SimConfig,
        task: Task,
        *,
        device: str = "cpu",
        log: Callable[[str], None] = print,
    ) -> None:
        from fedlearn.tasks.runtime import server_test_data
        from fedlearn.training import Shard, Trainer, initial_state

        self.config = config
        self.task = task
        self.ids = client_ids(config.clients)
        self.train_config = config.train
        self.state = make_strategy(config.strategy, server_lr=config.server_lr).init(
            initial_state(task, config.seed))
        self.strategy = make_strategy(config.strategy, server_lr=config.server_lr)
        self.test_shards: dict[str, Shard] = {}
        #: The largest DP-SGD ε any client has spent so far (0 without --dp-sgd).
        self.dp_sgd_epsilon = 0.0
        self.contexts = self._contexts()
        self.attackers = Attackers.of(config.attack, config.attackers or 0.0, self.ids,
                                      config.seed, task)
        if task.script is not None:
            self.engine: Engine = ScriptEngine(task, self.contexts, seed=config.seed,
                                               device=device)
            self.rows: dict[str, np.ndarray] = {cid: np.zeros(0, np.int64) for cid in self.ids}
        else:
            parts = [self._load(i) for i in range(config.clients)]
            xs = np.concatenate([p.train.x for p in parts])
            ys = np.concatenate([self.attackers.labels(cid, p.train.y)
                                 for cid, p in zip(self.ids, parts, strict=True)])
            ends = np.cumsum([len(p.train) for p in parts])
            self.rows = {cid: np.arange(end - len(p.train), end, dtype=np.int64)
                         for cid, p, end in zip(self.ids, parts, ends, strict=True)}
            for cid, p in zip(self.ids, parts, strict=True):
                if p.test is not None and len(p.test):
                    self.test_shards[cid] = Shard.of(p.test)
            pool = Shard.from_numpy(xs, ys)
            self.engine = make_engine(config.engine, task, pool.x, pool.y, config.train,
                                      seed=config.seed, device=device,
                                      max_parallel=config.max_parallel,
                                      precision=config.precision,
                                      dp_sgd=parse_dp_sgd(config.dp_sgd, config.dp_delta),
                                      log=log)
        evaluable = task.model is not None or task.evaluate is not None
        self.evaluator = Trainer(task, seed=config.seed, device=device) if evaluable else None
        test = server_test_data(task) if evaluable else None
        self.test = Shard.of(test) if test is not None and len(test) else None

    def _contexts(self) -> list[Any]:
        from fedlearn.tasks.runtime import context

        spec = self.config.partition
        return [context(index=i, num_clients=self.config.clients, client_id=cid,
                        data=self.config.data, label=self.config.label,
                        partition=None if self.config.data else f"{spec}:{self.config.clients}:{i}",
                        seed=self.config.seed, test_fraction=self.config.test_fraction)
                for i, cid in enumerate(self.ids)]

    def _load(self, index: int) -> ClientData:
        from fedlearn.tasks.runtime import load_client_data

        try:
            data = load_client_data(self.task, self.contexts[index])
        except PartitionError as exc:
            raise ConfigError(f"--partition: {exc}") from None
        if len(data.train) == 0:
            raise ConfigError(f"client {index} has no training data; use fewer clients.")
        return data

    @property
    def weights(self) -> Weights:
        """The current global model."""
        return self.state.weights

    def round_tasks(self, rnd: int) -> list[ClientTask]:
        """The tasks of round ``rnd``: the sampled clients, their rows and data seeds."""
        config = self.config
        sampled = sample_clients(
            self.ids, config.fraction, seed=config.seed, round_number=rnd, attempt=0, minimum=1
        )
        return [
            ClientTask(cid, self.rows[cid], task_seed(config.seed, rnd, cid)) for cid in sampled
        ]

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Round ``rnd`` (1-based): sample, train, FedAvg, evaluate; its metrics record."""
        t0 = time.perf_counter()
        tasks = self.round_tasks(rnd)
        t1 = time.perf_counter()
        updates = self.engine.train_round(self.state.weights, tasks, self.train_config)
        train_seconds = time.perf_counter() - t1
        if self.attackers.active:
            seeds = {t.client_id: t.seed for t in tasks}
            updates = [replace(u, delta=self.attackers.delta(u.client_id, u.delta,
                                                             seeds[u.client_id]))
                       for u in updates]
        self.state = self.strategy.apply(self.state, aggregate(updates))
        record: dict[str, Any] = {"round": rnd}
        if self.test is not None and self.evaluator is not None:
            record.update(self.evaluator.evaluate(self.state.weights, self.test).metrics)
        record.update(self._federated_eval(rnd))
        spent = [u.metrics["dp_epsilon"] for u in updates if "dp_epsilon" in u.metrics]
        if spent:
            self.dp_sgd_epsilon = max(self.dp_sgd_epsilon, *spent)
            record["dp_sgd_epsilon_max"] = self.dp_sgd_epsilon
        record.update({
            "seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,
            "clients": len(updates),
            "examples": sum(u.num_examples for u in updates),
        })
        return record

    def _federated_eval(self, version: int) -> dict[str, Any]:
        """Clients evaluate the new model on their own test data, as the HTTP server asks."""
        cfg = self.config
        if version % cfg.eval_every and version < cfg.rounds:
            return {}
        return self.federated_eval(version)

    def federated_eval(self, version: int, weights: Weights | None = None) -> dict[str, Any]:
        """``fed_*`` means of a sample of clients evaluating ``weights`` (by default the
        global model) on their own test data; ``version`` seeds the sample."""
        cfg = self.config
        weights = self.state.weights if weights is None else weights
        scripts = isinstance(self.engine, ScriptEngine)
        able = list(self.ids) if scripts else sorted(self.test_shards)
        if not able:
            return {}
        fraction = cfg.eval_fraction if cfg.eval_fraction is not None else cfg.fraction
        chosen = sample_clients(able, fraction, seed=cfg.seed ^ 0x5EED, round_number=version)
        results = []
        for cid in chosen:
            if isinstance(self.engine, ScriptEngine):
                res = self.engine.evaluate(cid, weights, version)
            elif self.evaluator is not None:
                res = self.evaluator.evaluate(weights, self.test_shards[cid])
            else:  # pragma: no cover
                continue
            results.append((res.metrics, res.num_examples))
        fed: dict[str, Any] = {f"fed_{k}": v for k, v in weighted_means(results).items()}
        fed["fed_clients"] = sum(1 for _, n in results if n > 0)
        fed["fed_examples"] = sum(n for _, n in results)
        return fed

    def close(self) -> None:
        """Stop client scripts, if any."""
        if isinstance(self.engine, ScriptEngine):
            self.engine.close()


def run_simulation(
    config: SimConfig,
    task: Task,
    run: RunDir,
    *,
    on_round: RoundHook | None = None,
    log: Callable[[str], None] = print,
    device: str = "cpu",
) -> dict[str, Any]:
    """Simulate ``config.rounds`` rounds of ``task`` in this process, writing ``run``.

    Each round appends {round, loss and the task's metrics (server test data),
    fed_* (clients' own test data), seconds, train_seconds, clients, examples}
    to ``metrics.jsonl`` and calls ``on_round`` with it; the end writes
    ``model.safetensors``, ``summary.json`` and ``report.png``. Returns the summary.
    A run in virtual time (``config.virtual``) goes to :func:`fedlearn.sim.virtual.run_virtual`.
    """
    if config.virtual:
        from fedlearn.sim.virtual import run_virtual

        return run_virtual(config, task, run, on_round=on_round, log=log, device=device)
    started = time.perf_counter()
    sim = Simulation(config, task, device=device, log=log)
    announce_attackers(sim, run, log)
    history: list[dict[str, Any]] = []
    try:
        for rnd in range(1, config.rounds + 1):
            record = sim.run_round(rnd)
            history.append(record)
            run.append_metrics(record)
            if on_round is not None:
                on_round(record)
    finally:
        sim.close()
    return _finish(run, config, task, sim.engine.name, sim.weights, history, started)


def announce_attackers(sim: Simulation, run: RunDir, log: Callable[[str], None]) -> None:
    """Write ``attackers.json`` and say who attacks, when the run has attackers."""
    if sim.attackers.attack is not None:
        run.write_attackers(sim.attackers.record())
        log(f"attack {sim.attackers.attack}: {len(sim.attackers.ids)} of {sim.config.clients} "
            f"clients attack (listed in {run.path / 'attackers.json'})")


def _finish(
    run: RunDir, config: SimConfig, task: Task, engine: str, weights: Weights,
    history: list[dict[str, Any]], started: float,
) -> dict[str, Any]:
    run.save_model(weights)
    later = [h["seconds"] for h in history[1:]]
    summary = {
        "mode": "sim",
        "engine": engine,
        "engine_requested": config.engine,
        "task": task.name,
        "dataset": config.dataset,
        "model": config.model,
        "strategy": config.strategy,
        "clients": config.clients,
        "per_round": config.per_round,
        "partition": config.partition,
        "rounds": len(history),
        **final_metrics(history),
        "wall_seconds": time.perf_counter() - started,
        "median_round_seconds": statistics.median(later) if later else None,
    }
    run.write_summary(summary)
    run.write_report(
        f"simulated ({engine}, {config.per_round}/{config.clients} per round): {task.name}"
    )
    return summary


def config_record(config: SimConfig) -> dict[str, Any]:
    """``config`` as the mapping written to ``config.toml``."""
    values = asdict(config)
    train = values.pop("train")
    extra = train.pop("extra", {})
    return {"mode": "sim", "sim": values, "train": {**train, **extra}}
