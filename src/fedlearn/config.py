"""Frozen, validated configuration dataclasses, loadable from TOML.

Flags override file values; an unknown key is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fedlearn.errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
MODES = ("sync", "async")
STRATEGIES = ("fedavg",)

T = TypeVar("T")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained locally: the arguments of ``local_update``."""

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}.")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}."
            )
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}.")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}.")


def from_mapping(cls: type[T], values: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {where}; known keys are "
            f"{', '.join(sorted(names))}."
        )
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"bad value in {where}: {exc}.") from exc


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning a missing or malformed file into a ConfigError."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist; check the path.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}.") from exc


@dataclass(frozen=True)
class ServerConfig:
    """What a federated run is: saved in ``config.toml`` and reused on ``--resume``.

    ``mode`` "sync" runs ``rounds`` rounds; "async" merges updates as they arrive
    with ``async_policy`` until ``max_updates`` updates or ``max_seconds`` seconds,
    evaluating every ``eval_every`` and checkpointing every ``save_every`` updates
    (in sync mode ``save_every`` counts rounds).
    """

    dataset: str = "fashion-mnist"
    model: str = "mlp"
    rounds: int = 10
    min_clients: int = 2
    fraction: float = 1.0
    min_results: int = 1
    round_timeout: float = 600.0
    strategy: str = "fedavg"
    server_lr: float = 1.0
    seed: int = 0
    save_every: int = 1
    max_update_mb: float = 64.0
    mode: str = "sync"
    async_policy: str = "fedasync"
    async_alpha: float = 0.6
    staleness_fn: str = "polynomial"
    max_staleness: int | None = None
    max_updates: int | None = None
    max_seconds: float | None = None
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}.")
        if self.min_clients < 1:
            raise ConfigError(f"--min-clients must be at least 1, got {self.min_clients}.")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}.")
        if self.min_results < 1:
            raise ConfigError(f"--min-results must be at least 1, got {self.min_results}.")
        if not self.round_timeout > 0:
            raise ConfigError(f"--round-timeout must be positive, got {self.round_timeout}.")
        if self.save_every < 1:
            raise ConfigError(f"--save-every must be at least 1, got {self.save_every}.")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}."
            )
        if not self.server_lr > 0:
            raise ConfigError(f"--server-lr must be positive, got {self.server_lr}.")
        if not self.max_update_mb > 0:
            raise ConfigError(f"max_update_mb must be positive, got {self.max_update_mb}.")
        if self.mode not in MODES:
            raise ConfigError(f"unknown --mode {self.mode!r}; choose sync or async.")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every must be at least 1, got {self.eval_every}.")
        if self.mode == "sync":
            given = [flag for flag, value in (("--max-updates", self.max_updates),
                                              ("--max-seconds", self.max_seconds),
                                              ("--max-staleness", self.max_staleness))
                     if value is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} applies to --mode async; sync runs stop "
                                  "after --rounds.")
        else:
            self._check_async()

    def _check_async(self) -> None:
        from fedlearn.strategies.async_policies import make_policy

        if self.max_updates is None and self.max_seconds is None:
            raise ConfigError("--mode async needs a stop rule; pass --max-updates N or "
                              "--max-seconds S.")
        if self.max_updates is not None and self.max_updates < 1:
            raise ConfigError(f"--max-updates must be at least 1, got {self.max_updates}.")
        if self.max_seconds is not None and not (
            self.max_seconds > 0 and math.isfinite(self.max_seconds)
        ):
            raise ConfigError(f"--max-seconds must be a positive number, got {self.max_seconds}.")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError(f"--max-staleness must be 0 or more, got {self.max_staleness}.")
        make_policy(self.async_policy, alpha=self.async_alpha, staleness_fn=self.staleness_fn,
                    server_lr=self.server_lr)

    @property
    def max_update_bytes(self) -> int:
        """The largest update body accepted, in bytes."""
        return int(self.max_update_mb * 1024 * 1024)
