"""Frozen, validated configuration dataclasses, loadable from TOML.

Flags override file values; an unknown key is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedlearn.errors import ConfigError

if TYPE_CHECKING:
    from fedlearn.strategies import Strategy

OPTIMIZERS = ("sgd", "adam")
MODES = ("sync", "async")
#: The run settings that tune a strategy spec (None: the strategy's default).
STRATEGY_OPTIONS = ("server_lr", "server_momentum", "beta1", "beta2", "tau", "prox_mu",
                    "clip_norm")
#: The secure aggregation settings that only apply with ``secagg = true``.
SECAGG_OPTIONS = ("secagg_threshold", "secagg_bits", "secagg_neighbours", "secagg_timeout")
#: How config.toml records a strategy given as a Python object no spec describes.
OBJECT_PREFIX = "object:"
#: Client config keys a strategy sets (from its own flags, never from [client]).
STRATEGY_KEYS = ("prox_mu", "scaffold", "dp_clip")

T = TypeVar("T")


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained locally in a round: what a server sends its clients.

    ``extra`` holds any other keys (JSON numbers, strings or booleans) a server
    sends from its ``[client]`` table; a task's own ``train`` function sees them
    all in ``ctx.config``.
    """

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.extra.items():
            if not isinstance(key, str) or isinstance(value, dict | list) or not isinstance(
                value, str | int | float | bool
            ):
                raise ConfigError(f"client config key {key!r} must be a number, string or "
                                  f"boolean, got {type(value).__name__}.")
            if key in TRAIN_KEYS:
                raise ConfigError(f"client config key {key!r} is a training setting; set it "
                                  "directly, not under extra.")
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
        mu = self.extra.get("prox_mu", 0.0)
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not (
                math.isfinite(mu) and mu >= 0):
            raise ConfigError(f"prox_mu must be a number 0 or more, got {mu!r}.")

    @property
    def prox_mu(self) -> float:
        """FedProx's ``mu`` (0: no proximal term), from the strategy's round config."""
        return float(self.extra.get("prox_mu", 0.0))

    @property
    def scaffold(self) -> bool:
        """Whether the round asks for SCAFFOLD's corrected local training."""
        return bool(self.extra.get("scaffold", False))

    def as_dict(self) -> dict[str, Any]:
        """Every setting as one flat mapping (what travels to clients in a task)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in TRAIN_KEYS}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str = "client config") -> TrainConfig:
        """A TrainConfig from a flat mapping: known keys typed and checked, the rest ``extra``."""
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in values.items():
            if key == "extra" and isinstance(value, Mapping):
                extra.update(value)
            elif key in TRAIN_KEYS:
                known[key] = _typed(key, value, TRAIN_TYPES[key], where)
            else:
                extra[key] = value
        return cls(**known, extra=extra)

    def merged(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """This config with ``overrides`` (None values ignored) applied on top."""
        values = self.as_dict()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig.from_dict(values)


TRAIN_KEYS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay")
TRAIN_TYPES: dict[str, type] = {"epochs": int, "batch_size": int, "optimizer": str,
                                "lr": float, "momentum": float, "weight_decay": float}


def _typed(key: str, value: Any, kind: type, where: str) -> Any:
    """``value`` as ``kind`` (an int is a fine float); otherwise a ConfigError naming ``key``."""
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} in {where} must be {'a number' if kind is not str else 'text'}"
                      f"{' (a whole number)' if kind is int else ''}, got {value!r}.")


def from_mapping(cls: type[T], values: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {where}; known keys are "
            f"{', '.join(sorted(names))}."
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        problem = _type_problem(value, hints.get(key))
        if problem is not None:
            raise ConfigError(f"{key} in {where} must be {problem}, got {value!r}.")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"bad value in {where}: {exc}.") from exc


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` should be for the annotation ``hint`` (None when it fits)."""
    if hint is None:
        return None
    options = typing.get_args(hint) if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if base is float and isinstance(value, int | float) and not isinstance(value, bool):
            return None
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if base in (str, dict, list, bool) and isinstance(value, base):
            return None
    names = {float: "a number", int: "a whole number", str: "text", dict: "a table",
             bool: "true or false", list: "a list"}
    wanted = [names.get(typing.get_origin(o) or o, "") for o in options if o is not type(None)]
    return " or ".join(w for w in wanted if w) or "another type"


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
class AggregationSettings:
    """How a round's updates become the next model: the strategy and its options, and
    user-level DP-FedAvg. :class:`ServerConfig` and the simulator's
    :class:`~fedlearn.sim.SimConfig` both are one, so a strategy or DP setting means
    the same everywhere (:func:`build_strategy`, :func:`private_mean`,
    :func:`privacy_budget` read these fields).
    """

    strategy: str = "fedavg"
    server_lr: float | None = None
    server_momentum: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None
    prox_mu: float | None = None
    clip_norm: float | None = None
    dp_noise_multiplier: float | None = None
    dp_clip: str | None = None
    dp_clip_on: str | None = None  # server; client under --secagg
    dp_delta: float | None = None
    dp_target_epsilon: float | None = None


@dataclass(frozen=True)
class ServerConfig(AggregationSettings):
    """What a federated run is: saved in ``config.toml`` and reused on ``--resume``.

    ``mode`` "sync" runs ``rounds`` rounds; "async" merges updates as they arrive
    with ``async_policy`` until ``max_updates`` updates or ``max_seconds`` seconds,
    evaluating every ``eval_every`` and checkpointing every ``save_every`` updates
    (in sync mode ``save_every`` counts rounds).
    """

    dataset: str = "fashion-mnist"
    model: str = "mlp"
    task: str = ""
    client: dict[str, Any] = field(default_factory=dict)
    eval_fraction: float | None = None
    rounds: int = 10
    min_clients: int = 2
    fraction: float = 1.0
    min_results: int = 1
    round_timeout: float = 600.0
    seed: int = 0
    save_every: int = 1
    max_update_mb: float | None = None
    max_update_norm: float | None = None
    max_clients: int = 10_000
    pickup_timeout: float | None = None
    clients_file: str | None = None
    mode: str = "sync"
    async_policy: str = "fedasync"
    async_alpha: float = 0.6
    staleness_fn: str = "polynomial"
    max_staleness: int | None = None
    max_updates: int | None = None
    max_seconds: float | None = None
    eval_every: int = 1
    secagg: bool = False
    secagg_threshold: int | None = None
    secagg_bits: int | None = None
    secagg_neighbours: int | None = None
    secagg_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}.")
        if self.min_clients < 1:
            raise ConfigError(f"--min-clients must be at least 1, got {self.min_clients}.")
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}.")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}.")
        if self.min_results < 1:
            raise ConfigError(f"--min-results must be at least 1, got {self.min_results}.")
        if not self.round_timeout > 0:
            raise ConfigError(f"--round-timeout must be positive, got {self.round_timeout}.")
        if self.save_every < 1:
            raise ConfigError(f"--save-every must be at least 1, got {self.save_every}.")
        check_strategy(self)
        if self.dp_noise_multiplier is not None and self.mode != "sync":
            raise ConfigError("--dp-noise-multiplier (DP-FedAvg) applies to --mode sync.")
        privacy_budget(self, "fixed")
        if self.max_update_mb is not None and not self.max_update_mb > 0:
            raise ConfigError(f"max_update_mb must be positive, got {self.max_update_mb}.")
        if self.max_update_norm is not None and not (
                self.max_update_norm >= 0 and math.isfinite(self.max_update_norm)):
            raise ConfigError(f"--max-update-norm must be 0 (off) or a positive number, got "
                              f"{self.max_update_norm}.")
        if self.pickup_timeout is not None and not self.pickup_timeout > 0:
            raise ConfigError(f"--pickup-timeout must be positive, got {self.pickup_timeout}.")
        if self.max_clients < 1:
            raise ConfigError(f"--max-clients must be at least 1, got {self.max_clients}.")
        if self.eval_fraction is not None and not 0 < self.eval_fraction <= 1:
            raise ConfigError(f"--eval-fraction must be in (0, 1], got {self.eval_fraction}.")
        TrainConfig.from_dict(self.client, where="[client]")
        taken = sorted(set(STRATEGY_KEYS) & set(self.client))
        if taken:
            raise ConfigError(f"{', '.join(taken)} in [client] is set by the strategy; use "
                              "--strategy fedprox --prox-mu MU (prox_mu under [server]).")
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
        self._check_secagg()

    def _check_secagg(self) -> None:
        given = [f"--{name.replace('_', '-')}" for name in SECAGG_OPTIONS
                 if getattr(self, name) is not None]
        if not self.secagg:
            if given:
                raise ConfigError(f"{', '.join(given)} applies with --secagg; add --secagg or "
                                  "drop it.")
            return
        if self.mode != "sync":
            raise ConfigError("--secagg runs in --mode sync (a round's clients mask their "
                              "updates together); drop --mode async.")
        if self.max_update_norm == 0:
            raise ConfigError("--secagg needs a norm bound to size its quantisation range; "
                              "give --max-update-norm a positive value or leave its default.")
        t, k, bits = self.secagg_threshold, self.secagg_neighbours, self.secagg_bits
        if t is not None and t < 2:
            raise ConfigError(f"--secagg-threshold must be at least 2, got {t}.")
        if bits is not None and not 8 <= bits <= 62:
            raise ConfigError(f"--secagg-bits must be from 8 to 62, got {bits}.")
        if k is not None and (k < 2 or k % 2):
            raise ConfigError(f"--secagg-neighbours must be an even number of at least 2, "
                              f"got {k}.")
        if k is not None and t is not None and t > k + 1:
            raise ConfigError(f"--secagg-threshold {t} is more than a client's {k} neighbours "
                              "and itself hold shares; lower it or raise --secagg-neighbours.")
        if self.secagg_timeout is not None and not (
                self.secagg_timeout > 0 and math.isfinite(self.secagg_timeout)):
            raise ConfigError(f"--secagg-timeout must be a positive number of seconds, got "
                              f"{self.secagg_timeout}.")
        if self.dp_noise_multiplier is not None and self.dp_clip_on == "server":
            raise ConfigError("--secagg hides each update from the server, so DP-FedAvg's "
                              "clipping happens on the clients; drop --dp-clip-on server.")
        named = None if str(self.strategy).startswith(OBJECT_PREFIX) else build_strategy(self)
        if named is not None and named.needs_all and named.dp is None:
            raise ConfigError(f"--secagg lets the server see only the sum of the updates, but "
                              f"--strategy {self.strategy}"
                              f"{' with --clip-norm' if self.clip_norm is not None else ''} "
                              "needs every client's own update; use fedavg, fedavgm, fedadam, "
                              "fedyogi, fedadagrad or fedprox.")

    def _check_async(self) -> None:
        from fedlearn.strategies.async_policies import make_policy

        refuse_strategy_flags(self, "async runs merge with --async-policy")
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
                    server_lr=self.async_server_lr)

    @property
    def async_server_lr(self) -> float:
        """The server learning rate of the async fedbuff policy (default 1)."""
        return 1.0 if self.server_lr is None else self.server_lr

    def train_config(self, task_defaults: Mapping[str, Any] | None = None) -> TrainConfig:
        """The round config clients get: defaults < the task's ``config`` < ``[client]``."""
        values = dict(task_defaults or {})
        values.update(self.client)
        return TrainConfig.from_dict(values, where="[client]")

    def update_norm_limit(self, model_norm: float) -> float | None:
        """The largest delta norm taken: ``max_update_norm`` (0: no limit), else derived:
        100 times the initial model's norm (at least 100)."""
        if self.max_update_norm is not None:
            return None if self.max_update_norm == 0 else self.max_update_norm
        return 100.0 * max(1.0, model_norm)

    def max_update_bytes(self, model_bytes: int) -> int:
        """The largest update body accepted: ``max_update_mb``, else derived from the model.

        Derived: the encoded model's size plus 25% and 64 KiB (a delta has the
        model's names, shapes and dtypes, so it is never larger).
        """
        if self.max_update_mb is not None:
            return int(self.max_update_mb * 1024 * 1024)
        return int(model_bytes * 1.25) + 64 * 1024


def refuse_strategy_flags(config: AggregationSettings, instead: str) -> None:
    """Raise ConfigError naming the strategy flags an async run was given (``instead``
    says how async runs merge)."""
    tuned = [o for o in STRATEGY_OPTIONS if o != "server_lr" and getattr(config, o) is not None]
    if config.strategy != "fedavg" or tuned:
        given = ", ".join([f"--strategy {config.strategy}"] * (config.strategy != "fedavg")
                          + ["--" + o.replace("_", "-") for o in tuned])
        raise ConfigError(f"{given} applies to --mode sync; {instead}.")


def build_strategy(config: AggregationSettings) -> Strategy:
    """The :class:`~fedlearn.strategies.Strategy` a run's settings name.

    ``config`` is a :class:`ServerConfig` or a simulator config: its
    ``strategy`` spec and the :data:`STRATEGY_OPTIONS`. Raises ConfigError for a
    bad spec, and for a strategy that was given as a Python object (it cannot
    be rebuilt from the settings).
    """
    from fedlearn.strategies import parse_strategy

    spec = str(config.strategy)
    if spec.startswith(OBJECT_PREFIX):
        raise ConfigError(f"the strategy {spec[len(OBJECT_PREFIX):]!r} of this run was a "
                          "Python object; pass it again through the Python API "
                          "(strategy=...), as it cannot be rebuilt from config.toml.")
    strategy = parse_strategy(spec, **{k: getattr(config, k) for k in STRATEGY_OPTIONS})
    dp = private_mean(config)
    if dp is None:
        return strategy
    try:
        return dataclasses.replace(strategy, dp=dp)
    except ValueError as exc:
        raise ConfigError(f"--dp-noise-multiplier with --strategy {spec}: {exc}.") from None


def _population(config: Any) -> tuple[int, int]:
    """(N, K): the run's clients and those sampled per round, as DP-FedAvg counts them.

    The simulator's N and K are its --clients and --per-round (K is then the
    *expected* number under Poisson sampling); the server's N is --min-clients
    (a DP run admits no more) and K what ``sample_clients`` picks of N.
    """
    if hasattr(config, "per_round"):
        return int(config.clients), int(config.per_round)
    n = int(config.min_clients)
    k = min(n, max(int(config.min_results), math.ceil(config.fraction * n - 1e-9)))
    return n, k


def private_mean(config: Any) -> Any:
    """The DP-FedAvg layer (:class:`~fedlearn.privacy.dpfedavg.DPFedAvg`) the settings ask
    for, or None without ``--dp-noise-multiplier``."""
    z = getattr(config, "dp_noise_multiplier", None)
    if z is None:
        if getattr(config, "dp_clip", None) is not None or getattr(
                config, "dp_target_epsilon", None) is not None:
            raise ConfigError("--dp-clip and --dp-target-epsilon need --dp-noise-multiplier Z "
                              "(user-level DP-FedAvg).")
        return None
    from fedlearn.privacy.dpfedavg import DPFedAvg, parse_dp_clip

    if config.dp_clip is None:
        raise ConfigError("--dp-noise-multiplier needs --dp-clip C (a clip norm) or --dp-clip "
                          "adaptive:QUANTILE.")
    clip, adaptive = parse_dp_clip(str(config.dp_clip))
    _, k = _population(config)
    clip_on = getattr(config, "dp_clip_on", None) or (
        "client" if getattr(config, "secagg", False) else "server")
    return DPFedAvg(noise_multiplier=float(z), expected_clients=float(k), seed=int(config.seed),
                    clip=clip, adaptive=adaptive, clip_on=str(clip_on))


def privacy_budget(config: Any, sampling: str) -> Any:
    """The :class:`~fedlearn.privacy.dpfedavg.PrivacyBudget` of a DP-FedAvg run, or None."""
    dp = private_mean(config)
    if dp is None:
        return None
    from fedlearn.privacy.dpfedavg import PrivacyBudget

    n, k = _population(config)
    delta = config.dp_delta if config.dp_delta is not None else 1.0 / max(n, 2)
    return PrivacyBudget(noise_multiplier=dp.noise_multiplier, sampling_rate=k / n,
                         delta=float(delta), sampling=sampling, num_clients=n,
                         target_epsilon=config.dp_target_epsilon)


def check_strategy(config: AggregationSettings) -> None:
    """Raise ConfigError unless ``config``'s strategy spec and options make a strategy."""
    if not str(config.strategy).startswith(OBJECT_PREFIX):
        build_strategy(config)


def strategy_settings(strategy: str | Strategy) -> dict[str, Any]:
    """Run settings (``strategy`` and options) that record ``strategy``.

    A spec is kept as it is; an object is recorded as its spec and options when
    one describes it, else as ``object:NAME``.
    """
    if isinstance(strategy, str):
        return {"strategy": strategy}
    from fedlearn.strategies import spec_options

    options = spec_options(strategy)
    if options is None:
        return {"strategy": OBJECT_PREFIX + strategy.name}
    return {"strategy": strategy.name, **options}
