"""What a simulated run is (:class:`SimConfig`), validated before anything runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedlearn.attacks import check_attack_config
from fedlearn.config import (
    OBJECT_PREFIX,
    AggregationSettings,
    TrainConfig,
    build_strategy,
    privacy_budget,
)
from fedlearn.data import parse_partition
from fedlearn.errors import ConfigError, PartitionError
from fedlearn.privacy.dpsgd import DEFAULT_DELTA, parse_dp_sgd
from fedlearn.sim.base import ENGINES, check_precision
from fedlearn.sim.modes import check_modes
from fedlearn.sim.ray_backend import check_backend
from fedlearn.strategies import Strategy


@dataclass(frozen=True)
class SimConfig(AggregationSettings):
    """What a simulated run is: N clients, K of them sampled per round, R rounds (and how
    its rounds aggregate: the fields of :class:`~fedlearn.config.AggregationSettings`)."""

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
    seed: int = 0
    max_parallel: int | None = None
    precision: str = "fp32"
    dp_sgd: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    # Where the engines run (sim/ray_backend.py); none of these change the model.
    backend: str = "local"
    ray_address: str | None = None
    ray_workers: int | None = None
    ray_cpus_per_worker: float | None = None
    ray_gpus_per_worker: float | None = None
    ray_timeout: float | None = None
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
        parse_dp_sgd(self.dp_sgd, self.sgd_delta)
        check_backend(self)
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
        if not self.strategy.startswith(OBJECT_PREFIX):
            check_per_round(build_strategy(self), self.per_round)
        privacy_budget(self, "poisson")
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
    def sgd_delta(self) -> float:
        """The δ at which DP-SGD's ε is reported (``dp_delta``, else 1e-5)."""
        return self.dp_delta if self.dp_delta is not None else DEFAULT_DELTA

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


def check_per_round(strategy: Strategy, per_round: int) -> None:
    """Refuse a strategy whose rule needs more updates a round than ``per_round``."""
    if per_round < strategy.min_updates:
        raise ConfigError(f"strategy {strategy.name} needs at least {strategy.min_updates} "
                          f"updates a round but --per-round is {per_round}; sample more "
                          "clients or choose a smaller F.")
