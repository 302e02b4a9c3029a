"""Strategy specs (``fedadam``, ``krum:1``, ``trimmed-mean:0.2+fedadam``) to :class:`Strategy`.

Resolve a spec once, at the edge, with :func:`parse_strategy`; pass the
resulting :class:`~fedlearn.strategies.strategy.Strategy` on. Every bad spec or
option is a :class:`~fedlearn.errors.ConfigError` of one sentence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from fedlearn.errors import ConfigError
from fedlearn.strategies import server_opt
from fedlearn.strategies.robust import AggregationRule, Rule
from fedlearn.strategies.server_opt import ServerOptimizer
from fedlearn.strategies.strategy import Strategy

#: FedProx's default proximal coefficient (Li et al. 2020 tune mu in {0.001, 0.01, 0.1, 1}).
PROX_MU = 0.01

#: Server optimizers a spec can end in, with the optimizer kind behind each.
OPTIMIZER_PRESETS = {
    "fedavg": "sgd", "fedprox": "sgd", "fedavgm": "avgm",
    "fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad",
}
ROBUST_RULES = ("median", "trimmed-mean:BETA", "krum:F", "multi-krum:F:M", "bulyan:F")

#: Every spec form, for help text.
STRATEGIES: tuple[str, ...] = (
    "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold",
    *ROBUST_RULES, "norm-bounding", "RULE+OPT",
)


class StrategyRow(NamedTuple):
    """One row of :data:`STRATEGY_TABLE`."""

    name: str
    paper: str
    defaults: str
    needs_all: str


_ADAPTIVE = "server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3"
_ROBUST = "server_lr=1.0; n >= "

#: One row per spec form: name, paper, defaults, whether the engine buffers all K updates.
STRATEGY_TABLE: list[StrategyRow] = [
    StrategyRow("fedavg", "McMahan et al. 2017", "server_lr=1.0", "no"),
    StrategyRow("fedavgm", "Hsu et al. 2019", "server_lr=1.0, server_momentum=0.9", "no"),
    StrategyRow("fedadam", "Reddi et al. 2021", _ADAPTIVE, "no"),
    StrategyRow("fedyogi", "Reddi et al. 2021", _ADAPTIVE, "no"),
    StrategyRow("fedadagrad", "Reddi et al. 2021", "server_lr=0.01, beta1=0.9, tau=1e-3", "no"),
    StrategyRow("fedprox", "Li et al. 2020", f"prox_mu={PROX_MU}, server_lr=1.0", "no"),
    StrategyRow("scaffold", "Karimireddy et al. 2020", "server_lr=1.0, plain means", "yes"),
    StrategyRow("median", "Yin et al. 2018", _ROBUST + "1", "yes"),
    StrategyRow("trimmed-mean:BETA", "Yin et al. 2018", _ROBUST + "1, 0 <= BETA < 0.5", "yes"),
    StrategyRow("krum:F", "Blanchard et al. 2017", _ROBUST + "2F+3", "yes"),
    StrategyRow("multi-krum:F:M", "Blanchard et al. 2017", _ROBUST + "2F+3, 1 <= M <= n", "yes"),
    StrategyRow("bulyan:F", "El Mhamdi et al. 2018", _ROBUST + "4F+3", "yes"),
    StrategyRow("norm-bounding", "Sun et al. 2019", "clip_norm required, server_lr=1.0", "yes"),
    StrategyRow("RULE+OPT", "-", "RULE's needs, OPT's defaults", "yes"),
]

_OPT_FLAGS = {  # which optimizer kinds each option applies to
    "--server-momentum": ("avgm",),
    "--beta1": ("adam", "yogi", "adagrad"),
    "--beta2": ("adam", "yogi"),
    "--tau": ("adam", "yogi", "adagrad"),
}
_FLAG_PRESETS = {
    "--server-momentum": "fedavgm", "--beta1": "fedadam, fedyogi or fedadagrad",
    "--beta2": "fedadam or fedyogi", "--tau": "fedadam, fedyogi or fedadagrad",
}


def _median(args: list[str], spec: str) -> Rule:
    if args:
        raise ConfigError(f"median takes no parameter in {spec!r}; write median.")
    return Rule("median")


def _trimmed_mean(args: list[str], spec: str) -> Rule:
    beta = _number(args[0]) if len(args) == 1 else None
    if beta is None or not 0.0 <= beta < 0.5:
        raise ConfigError(f"trimmed-mean in {spec!r} needs the fraction BETA in [0, 0.5) "
                          "to cut from each end, e.g. trimmed-mean:0.1.")
    return Rule("trimmed-mean", beta=beta)


def _byzantine(name: str) -> Callable[[list[str], str], Rule]:
    def parse(args: list[str], spec: str) -> Rule:
        f = _count(args[0]) if len(args) == 1 else None
        if f is None:
            raise ConfigError(f"{name} in {spec!r} needs F, the whole number of Byzantine "
                              f"clients to tolerate (0 or more), e.g. {name}:1.")
        return Rule(name, f=f)
    return parse


def _multi_krum(args: list[str], spec: str) -> Rule:
    f, m = (_count(args[0]), _count(args[1])) if len(args) == 2 else (None, None)
    if f is None or m is None or m < 1:
        raise ConfigError(f"multi-krum in {spec!r} needs F (Byzantine clients, 0 or more) "
                          "and M (updates to average, 1 or more), e.g. multi-krum:1:3.")
    return Rule("multi-krum", f=f, m=m)


#: The registry of robust rules: spec name -> parser of its ``:``-separated parameters.
#: A new rule is one module (an object with the members of ``AggregationRule``) plus
#: one line here (and a row in :data:`STRATEGY_TABLE`).
RULE_PARSERS: dict[str, Callable[[list[str], str], AggregationRule]] = {
    "median": _median,
    "trimmed-mean": _trimmed_mean,
    "krum": _byzantine("krum"),
    "multi-krum": _multi_krum,
    "bulyan": _byzantine("bulyan"),
}


def _rule(text: str, spec: str) -> AggregationRule:
    name, *args = text.split(":")
    parser = RULE_PARSERS.get(name)
    if parser is None:
        raise ConfigError(f"unknown robust rule {text!r} in {spec!r}; choose one of "
                          f"{', '.join(ROBUST_RULES)}.")
    return parser(args, spec)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _count(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _optimizer(kind: str, *, server_lr: float | None, server_momentum: float | None,
               beta1: float | None, beta2: float | None, tau: float | None) -> ServerOptimizer:
    given = {"--server-momentum": server_momentum, "--beta1": beta1, "--beta2": beta2,
             "--tau": tau}
    for flag, value in given.items():
        if value is not None and kind not in _OPT_FLAGS[flag]:
            raise ConfigError(f"{flag} applies only to {_FLAG_PRESETS[flag]} (alone or after "
                              "RULE+); drop it or choose one of those.")
    if server_lr is not None and not (math.isfinite(server_lr) and server_lr > 0):
        raise ConfigError(f"--server-lr must be a positive number, got {server_lr}.")
    for flag, value in given.items():
        if value is not None and flag != "--tau" and not 0.0 <= value < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {value}.")
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"--tau must be a positive number, got {tau}.")
    if kind == "sgd":
        return server_opt.sgd(server_lr if server_lr is not None else server_opt.SGD_LR)
    if kind == "avgm":
        return server_opt.avgm(
            server_lr if server_lr is not None else server_opt.AVGM_LR,
            server_momentum if server_momentum is not None else server_opt.AVGM_MOMENTUM)
    return ServerOptimizer(
        kind,
        lr=server_lr if server_lr is not None else server_opt.ADAPTIVE_LR,
        beta1=beta1 if beta1 is not None else server_opt.BETA1,
        beta2=beta2 if beta2 is not None else server_opt.BETA2,
        tau=tau if tau is not None else server_opt.TAU,
    )


def parse_strategy(spec: str, *, server_lr: float | None = None,
                   server_momentum: float | None = None, beta1: float | None = None,
                   beta2: float | None = None, tau: float | None = None,
                   prox_mu: float | None = None, clip_norm: float | None = None) -> Strategy:
    """The :class:`Strategy` a spec names, with the given options (None: the default).

    Forms: a preset (``fedavg``, ``fedavgm``, ``fedadam``, ``fedyogi``,
    ``fedadagrad``, ``fedprox``, ``scaffold``), a robust rule under plain
    FedAvg's server step (``median``, ``trimmed-mean:BETA``, ``krum:F``,
    ``multi-krum:F:M``, ``bulyan:F``), ``norm-bounding`` (clip + mean, needs
    ``clip_norm``), or ``RULE+OPT`` with OPT one of the optimizer presets
    (``median+fedavgm``). ``clip_norm`` bounds every delta's L2 norm before the
    rule of any strategy; ``prox_mu`` (FedProx's mu, default 0.01 for
    ``fedprox``) may be given to any strategy. Raises ConfigError.
    """
    text = spec.strip().lower()
    if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"--clip-norm must be a positive number, got {clip_norm}.")
    if prox_mu is not None and not (math.isfinite(prox_mu) and prox_mu >= 0):
        raise ConfigError(f"--prox-mu must be a number 0 or more, got {prox_mu}.")
    opts = {"server_lr": server_lr, "server_momentum": server_momentum, "beta1": beta1,
            "beta2": beta2, "tau": tau}
    if text.count("+") > 1:
        raise ConfigError(f"strategy {spec!r} has more than one '+'; write RULE+OPT, e.g. "
                          "trimmed-mean:0.1+fedadam.")
    if "+" in text:
        rule_text, opt_name = (part.strip() for part in text.split("+"))
        if opt_name not in OPTIMIZER_PRESETS:
            raise ConfigError(f"unknown server optimizer {opt_name!r} after '+' in {spec!r}; "
                              f"choose one of {', '.join(OPTIMIZER_PRESETS)}.")
        rule = _rule(rule_text, spec)
        return Strategy(name=f"{rule.spec}+{opt_name}", rule=rule,
                        optimizer=_optimizer(OPTIMIZER_PRESETS[opt_name], **opts), clip=clip_norm,
                        prox_mu=_mu(opt_name, prox_mu))
    if text in OPTIMIZER_PRESETS:
        return Strategy(name=text, optimizer=_optimizer(OPTIMIZER_PRESETS[text], **opts),
                        clip=clip_norm, prox_mu=_mu(text, prox_mu))
    if text == "scaffold":
        return Strategy(name=text, rule=Rule("mean", weighted=False),
                        optimizer=_optimizer("sgd", **opts), clip=clip_norm, prox_mu=prox_mu,
                        scaffold=True)
    if text == "norm-bounding":
        if clip_norm is None:
            raise ConfigError("norm-bounding needs --clip-norm C, the largest L2 norm a client "
                              "delta may have, e.g. --clip-norm 1.0.")
        return Strategy(name=text, optimizer=_optimizer("sgd", **opts), clip=clip_norm,
                        prox_mu=prox_mu)
    if text.split(":")[0] in RULE_PARSERS:
        rule = _rule(text, spec)
        return Strategy(name=rule.spec, rule=rule, optimizer=_optimizer("sgd", **opts),
                        clip=clip_norm, prox_mu=prox_mu)
    raise ConfigError(f"unknown strategy {spec!r}; choose one of {', '.join(STRATEGIES)}.")


def _mu(preset: str, prox_mu: float | None) -> float | None:
    if prox_mu is None and preset == "fedprox":
        return PROX_MU
    return prox_mu


def spec_options(strategy: Strategy) -> dict[str, float] | None:
    """The options that, with ``strategy.name`` as the spec, make :func:`parse_strategy`
    build an equal strategy; None when no spec describes it (a user's own rule or class).

    Used to record a strategy given as a Python object in a run's ``config.toml``.
    """
    if type(strategy) is not Strategy:
        return None
    opt = strategy.optimizer
    options: dict[str, float | None] = {"server_lr": opt.lr, "clip_norm": strategy.clip,
                                        "prox_mu": strategy.prox_mu}
    if opt.kind == "avgm":
        options["server_momentum"] = opt.momentum
    if opt.kind in ("adam", "yogi", "adagrad"):
        options.update(beta1=opt.beta1, tau=opt.tau)
    if opt.kind in ("adam", "yogi"):
        options["beta2"] = opt.beta2
    try:
        again = parse_strategy(strategy.name, **options)
    except ConfigError:
        return None
    if again != strategy:
        return None
    return {k: v for k, v in options.items() if v is not None}
