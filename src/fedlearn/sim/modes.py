"""Validation of the simulator's time settings: ``--mode``, policies, speeds, stop rules.

Kept apart from :class:`~fedlearn.sim.engine.SimConfig` so the round loop's
module stays about rounds; ``SimConfig.__post_init__`` calls :func:`check_modes`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedlearn.config import MODES, refuse_strategy_flags
from fedlearn.errors import ConfigError
from fedlearn.sim.clock import client_speeds
from fedlearn.strategies.async_policies import AsyncPolicy, make_policy

if TYPE_CHECKING:
    from fedlearn.sim.config import SimConfig

#: The SimConfig fields of simulated time (``fedlearn sim``'s flags of those names).
TIME_OPTIONS = ("mode", "async_policy", "async_alpha", "staleness_fn", "max_staleness",
                "client_speeds", "round_timeout", "updates", "concurrency", "max_virtual_time")


def check_modes(cfg: SimConfig) -> None:
    """Raise one ConfigError for a time setting that is wrong or does not fit ``cfg.mode``."""
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown --mode {cfg.mode!r}; choose sync or async.")
    client_speeds(cfg.client_speeds, cfg.clients, cfg.seed)
    if cfg.mode == "async" and cfg.dp_noise_multiplier is not None:
        raise ConfigError("--dp-noise-multiplier (DP-FedAvg) is a private mean of a sync "
                          "round's updates; drop --mode async or the DP flags.")
    if cfg.max_virtual_time is not None and not (
            cfg.max_virtual_time > 0 and math.isfinite(cfg.max_virtual_time)):
        raise ConfigError(f"--max-virtual-time must be a positive number, got "
                          f"{cfg.max_virtual_time}.")
    if cfg.mode == "sync":
        named = [flag for flag, value in (("--updates", cfg.updates),
                                          ("--concurrency", cfg.concurrency),
                                          ("--max-staleness", cfg.max_staleness))
                 if value is not None]
        if named:
            raise ConfigError(f"{', '.join(named)} applies to --mode async; sync runs stop "
                              "after --rounds.")
        if cfg.round_timeout is not None and not (
                cfg.round_timeout > 0 and math.isfinite(cfg.round_timeout)):
            raise ConfigError(f"--round-timeout must be a positive number of virtual seconds, "
                              f"got {cfg.round_timeout}.")
        return
    if cfg.round_timeout is not None:
        raise ConfigError("--round-timeout applies to --mode sync; an async run never waits "
                          "for a round (use --max-staleness to refuse old updates).")
    refuse_strategy_flags(cfg, "an async run merges with --async-policy")
    if cfg.updates is None and cfg.max_virtual_time is None:
        raise ConfigError("--mode async needs a stop rule; pass --updates N or "
                          "--max-virtual-time T.")
    if cfg.updates is not None and cfg.updates < 1:
        raise ConfigError(f"--updates must be at least 1, got {cfg.updates}.")
    if not 1 <= cfg.in_flight <= cfg.clients:
        raise ConfigError(f"--concurrency must be between 1 and --clients ({cfg.clients}), "
                          f"got {cfg.concurrency}.")
    if cfg.max_staleness is not None and cfg.max_staleness < 0:
        raise ConfigError(f"--max-staleness must be 0 or more, got {cfg.max_staleness}.")
    async_policy(cfg)


def async_policy(cfg: SimConfig) -> AsyncPolicy:
    """The run's merge policy, built as ``fedlearn server --mode async`` builds it
    (``--server-lr``, fedbuff's step, defaults to 1)."""
    return make_policy(cfg.async_policy, alpha=cfg.async_alpha, staleness_fn=cfg.staleness_fn,
                       server_lr=cfg.server_lr if cfg.server_lr is not None else 1.0)
