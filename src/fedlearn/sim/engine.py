"""The simulator's round loop, shared by every engine.

Each round does what the HTTP server's :class:`~fedlearn.server.coordinator.SyncCoordinator`
does with the same flags, so a simulated run and a ``fedlearn run`` reach
the same model: the same initial model (``build_model(..., seed=seed)``), the
same client ids (``client-{i}`` holding part ``i`` of ``partition(labels, N,
spec, seed)``), the same sample (``sample_clients`` with fraction K/N), the
same data seeds (``task_seed(seed, round, client_id)``), and FedAvg over a
:class:`~fedlearn.weights.RunningSum` of deltas weighted by example counts.
Only the training differs, and that is the engine's business.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fedlearn.config import TrainConfig
from fedlearn.data import Dataset, load_dataset, parse_partition, partition
from fedlearn.errors import ConfigError, PartitionError
from fedlearn.models import build_model, get_weights
from fedlearn.runs import RunDir
from fedlearn.seeding import task_seed
from fedlearn.sim.base import ENGINES, ClientTask, ClientUpdate, Engine
from fedlearn.sim.sequential import SequentialEngine
from fedlearn.sim.vectorized import VectorizedEngine, unsupported_reason
from fedlearn.strategies import make_strategy, sample_clients
from fedlearn.training import Shard, evaluate
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
    strategy: str = "fedavg"
    server_lr: float = 1.0
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

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
        if _sample_size(self.clients, self.per_round) != self.per_round:
            raise ConfigError(  # pragma: no cover - ceil(K/N * N) is K for any sane N
                f"--per-round {self.per_round} of {self.clients} clients cannot be "
                "expressed as a sampling fraction; pick another --per-round."
            )

    @property
    def fraction(self) -> float:
        """The share of clients sampled per round, as the HTTP server's --fraction."""
        return self.per_round / self.clients


def _sample_size(clients: int, per_round: int) -> int:
    """How many clients ``sample_clients`` picks for fraction K/N (as it computes it)."""
    return min(clients, max(1, math.ceil(per_round / clients * clients - 1e-9)))


def make_engine(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    log: Callable[[str], None] = print,
) -> Engine:
    """The engine ``name`` for ``model`` on the training set ``(x, y)``.

    ``vectorized`` falls back to ``sequential`` (saying so in one line through
    ``log``) for a model or optimizer it cannot stack.
    """
    if name == "sequential":
        return SequentialEngine(model, x, y)
    if name == "vectorized":
        why = unsupported_reason(model, config)
        if why is None:
            return VectorizedEngine(model, x, y)
        log(f"note: the vectorized engine cannot run this ({why}); using the sequential engine.")
        return SequentialEngine(model, x, y)
    raise ConfigError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}.")


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
    """A simulated run held in memory: data, clients, engine and global model, round by round.

    ``data`` replaces ``load_dataset(config.dataset)`` (tests); ``log`` hears
    the one-line notice of an engine fallback.
    """

    def __init__(
        self,
        config: SimConfig,
        *,
        data: Dataset | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.config = config
        ds = data if data is not None else load_dataset(config.dataset)
        self.model = build_model(config.model, ds.input_shape, ds.num_classes, seed=config.seed)
        try:
            parts = partition(ds.y_train, config.clients, config.partition, config.seed)
        except PartitionError as exc:
            raise ConfigError(f"--partition: {exc}") from None
        self.ids = client_ids(config.clients)
        self.rows = dict(zip(self.ids, parts, strict=True))
        train = Shard.from_numpy(ds.x_train, ds.y_train)
        self.test = Shard.from_numpy(ds.x_test, ds.y_test)
        self.engine = make_engine(
            config.engine, self.model, train.x, train.y, config.train, log=log
        )
        self.strategy = make_strategy(config.strategy, server_lr=config.server_lr)
        self.state = self.strategy.init(get_weights(self.model))

    @property
    def weights(self) -> Weights:
        """The current global model."""
        return self.state.weights

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Round ``rnd`` (1-based): sample, train, FedAvg, evaluate; its metrics record."""
        config = self.config
        t0 = time.perf_counter()
        sampled = sample_clients(
            self.ids, config.fraction, seed=config.seed, round_number=rnd, attempt=0, minimum=1
        )
        tasks = [
            ClientTask(cid, self.rows[cid], task_seed(config.seed, rnd, cid)) for cid in sampled
        ]
        t1 = time.perf_counter()
        updates = self.engine.train_round(self.state.weights, tasks, config.train)
        train_seconds = time.perf_counter() - t1
        self.state = self.strategy.apply(self.state, aggregate(updates))
        result = evaluate(self.model, self.test, self.state.weights)
        return {
            "round": rnd,
            "accuracy": result.accuracy,
            "loss": result.loss,
            "seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,
            "clients": len(updates),
            "examples": sum(u.num_examples for u in updates),
        }


def run_simulation(
    config: SimConfig,
    run: RunDir,
    *,
    data: Dataset | None = None,
    on_round: RoundHook | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Simulate ``config.rounds`` rounds in this process, writing the run directory ``run``.

    ``data`` replaces ``load_dataset(config.dataset)`` (tests). Each round
    appends {round, accuracy, loss, seconds, train_seconds, clients, examples}
    to ``metrics.jsonl`` (``train_seconds``: the engine's share of ``seconds``)
    and calls ``on_round`` with it; the end writes ``model.safetensors``,
    ``summary.json`` and ``report.png``. Returns the summary.
    """
    started = time.perf_counter()
    sim = Simulation(config, data=data, log=log)
    history: list[dict[str, Any]] = []
    for rnd in range(1, config.rounds + 1):
        record = sim.run_round(rnd)
        history.append(record)
        run.append_metrics(record)
        if on_round is not None:
            on_round(record)
    return _finish(run, config, sim.engine.name, sim.weights, history, started)


def _finish(
    run: RunDir, config: SimConfig, engine: str, weights: Weights,
    history: list[dict[str, Any]], started: float,
) -> dict[str, Any]:
    run.save_model(weights)
    later = [h["seconds"] for h in history[1:]]
    summary = {
        "mode": "sim",
        "engine": engine,
        "engine_requested": config.engine,
        "dataset": config.dataset,
        "model": config.model,
        "strategy": config.strategy,
        "clients": config.clients,
        "per_round": config.per_round,
        "partition": config.partition,
        "rounds": len(history),
        "final_accuracy": history[-1]["accuracy"],
        "final_loss": history[-1]["loss"],
        "wall_seconds": time.perf_counter() - started,
        "median_round_seconds": statistics.median(later) if later else None,
    }
    run.write_summary(summary)
    run.write_report(
        f"simulated ({config.engine}, {config.per_round}/{config.clients} per round): "
        f"{config.model} on {config.dataset}"
    )
    return summary


def config_record(config: SimConfig) -> dict[str, Any]:
    """``config`` as the mapping written to ``config.toml``."""
    values = asdict(config)
    train = values.pop("train")
    return {"mode": "sim", "sim": values, "train": train}
