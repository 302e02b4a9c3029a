"""The composable :class:`Strategy`: norm bounding, then a rule, then a server optimizer.

A strategy is a frozen configuration; everything that changes between rounds
lives in the :class:`~fedlearn.strategies.base.ServerState` it is given and
returns. One round is::

    deltas --clip_norm (optional)--> rule --> D --optimizer--> new weights
                                                   (SCAFFOLD also moves c)

Integer arrays skip the clip, the rule and the optimizer and move by the
integer rule of the package docstring. Build strategies with
:func:`fedlearn.strategies.spec.parse_strategy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from fedlearn.strategies.base import (
    ServerState,
    Update,
    cast,
    check_like,
    check_updates,
    copy_weights,
    is_float,
)
from fedlearn.strategies.robust import AggregationRule, Rule, clip_norm
from fedlearn.strategies.scaffold import CONTROL, DELTA_C, init_control, server_control_update
from fedlearn.strategies.server_opt import OptState, ServerOptimizer
from fedlearn.types import Weights
from fedlearn.weights import RunningSum

#: Scalar key of the optimizer's step count in :attr:`ServerState.scalars`.
OPT_STEP = "opt/step"
#: Array group of SCAFFOLD's server control variate in :attr:`ServerState.arrays`.
SCAFFOLD_C = "scaffold/c"
ClientConfig = dict[str, float | int | str]


@dataclass(frozen=True)
class ClippedSum:
    """The sum of a round's clipped deltas, summed with equal weight, as secure
    aggregation hands it over: ``sums`` (float arrays in float64, integer ones in
    int64), how many deltas (``count``) and how many were not shortened by the
    clip (``unclipped``, for adaptive clipping)."""

    sums: Weights
    count: int
    unclipped: int


class PrivateMean(Protocol):
    """A private mean that replaces the rule (user-level DP-FedAvg:
    :class:`fedlearn.privacy.dpfedavg.DPFedAvg`). Its state is scalars in the
    strategy state (e.g. an adaptive clip norm), so every checkpoint holds it."""

    def init_scalars(self) -> dict[str, float]:
        """Its scalars before round 1."""
        ...

    def client_config(self, scalars: Mapping[str, float | int]) -> dict[str, float]:
        """Keys for the clients' round config (e.g. the clip norm when clients clip)."""
        ...

    def clip_norm(self, scalars: Mapping[str, float | int]) -> float:
        """The clip norm of the round about to be aggregated."""
        ...

    def mean(self, scalars: Mapping[str, float | int], deltas: Sequence[Weights],
             round_number: int, like: Weights) -> tuple[Weights, dict[str, float]]:
        """The private mean of ``deltas`` for round ``round_number``, and the next scalars."""
        ...

    def mean_of_sum(self, scalars: Mapping[str, float | int], clipped: ClippedSum,
                    round_number: int, like: Weights) -> tuple[Weights, dict[str, float]]:
        """Like :meth:`mean`, from the sum of deltas the clients clipped themselves."""
        ...


def _opt_group(moment: str) -> str:
    return f"opt/{moment}"


@dataclass(frozen=True)
class Strategy:
    """A strategy configuration; all state lives in :class:`ServerState`.

    ``rule`` is a :class:`~fedlearn.strategies.robust.Rule` or any object
    with the members of :class:`~fedlearn.strategies.robust.AggregationRule`;
    ``clip`` bounds each client delta's global L2 norm before the rule;
    ``prox_mu`` is sent to clients as FedProx's proximal coefficient;
    ``scaffold`` adds SCAFFOLD's control variates (the rule must then be the
    plain mean).
    """

    name: str
    rule: AggregationRule = field(default_factory=Rule)
    optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    clip: float | None = None
    prox_mu: float | None = None
    scaffold: bool = False
    dp: PrivateMean | None = None

    def __post_init__(self) -> None:
        if self.clip is not None and not (np.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip norm must be positive, got {self.clip}")
        if self.prox_mu is not None and not (np.isfinite(self.prox_mu) and self.prox_mu >= 0):
            raise ValueError(f"prox_mu must be 0 or more, got {self.prox_mu}")
        plain_mean = isinstance(self.rule, Rule) and self.rule.kind == "mean"
        if self.scaffold and (not plain_mean or self.optimizer.kind != "sgd"):
            raise ValueError("scaffold combines with the plain mean and sgd only")
        if self.dp is not None and (not plain_mean or self.scaffold or self.clip is not None):
            raise ValueError("DP-FedAvg's private mean replaces the aggregation rule, its "
                             "clipping and SCAFFOLD; combine it with a server optimizer only "
                             "(e.g. fedadam)")
        if not isinstance(self.rule, AggregationRule):
            raise ValueError(f"strategy {self.name!r}: its rule needs spec, streams, "
                             "min_updates and apply(updates)")

    @property
    def needs_all(self) -> bool:
        """True when the engine must buffer the round's K updates (memory: K deltas).

        False only for the example-weighted mean without clipping or SCAFFOLD:
        then the engine folds each delta into a RunningSum as it arrives
        (memory: one model) and calls :meth:`aggregate_sum`.
        """
        return (not self.rule.streams or self.clip is not None or self.scaffold
                or self.dp is not None)

    @property
    def min_updates(self) -> int:
        """The fewest updates a round needs (Krum's ``2f+3``, Bulyan's ``4f+3``; else 1)."""
        return max(1, int(self.rule.min_updates))

    def init(self, weights: Weights) -> ServerState:
        """The state before round 1: a copy of ``weights`` and fresh optimizer/SCAFFOLD state."""
        opt = self.optimizer.init(weights)
        arrays = {_opt_group(n): m for n, m in opt.moments.items()}
        if self.scaffold:
            arrays[SCAFFOLD_C] = init_control(weights)
        scalars: dict[str, float | int] = {OPT_STEP: opt.step}
        if self.dp is not None:
            scalars.update(self.dp.init_scalars())
        return ServerState(weights=copy_weights(weights), version=0, arrays=arrays,
                           scalars=scalars)

    def client_config(self, state: ServerState, round_number: int) -> ClientConfig:
        """Settings for the clients' local training this round.

        ``{"prox_mu": mu}`` adds FedProx's ``mu/2 ||w - w_global||^2`` to the
        local loss; ``{"scaffold": 1}`` asks for SCAFFOLD's corrected gradient
        and an ``extra["delta_c"]`` in the update.
        """
        config: ClientConfig = {}
        if self.prox_mu is not None:
            config["prox_mu"] = self.prox_mu
        if self.scaffold:
            config["scaffold"] = 1
        if self.dp is not None:
            config.update(self.dp.client_config(state.scalars))
        return config

    def client_arrays(self, state: ServerState) -> dict[str, Weights]:
        """Extra arrays sent to clients with the model: SCAFFOLD's ``{"c": c}``, else none."""
        if not self.scaffold:
            return {}
        return {CONTROL: copy_weights(self._arrays(state, SCAFFOLD_C))}

    def aggregate(self, state: ServerState, updates: Sequence[Update], *,
                  num_clients: int) -> ServerState:
        """The state after a round with these ``updates`` from ``num_clients`` clients in all.

        Clips each delta (when ``clip`` is set), aggregates the float arrays
        with the rule and steps the optimizer; ``version`` goes up by one.
        Raises ValueError (a :class:`~fedlearn.strategies.robust.NotEnoughUpdatesError`
        for too few updates) for a round that cannot be aggregated.
        """
        if self.dp is not None:
            # A Poisson-sampled private round may have no updates: its mean is the noise.
            if updates:
                check_updates(state.weights, updates)
            delta, scalars = self.dp.mean(state.scalars, [u.delta for u in updates],
                                          state.version + 1, state.weights)
            return self._advance(replace(state, scalars={**state.scalars, **scalars}), delta,
                                 None)
        check_updates(state.weights, updates)
        if num_clients < len(updates):
            raise ValueError(f"num_clients ({num_clients}) is less than the {len(updates)} "
                             "updates of the round")
        if self.clip is not None:
            clip = self.clip
            updates = [Update(clip_norm(u.delta, clip)[0], u.num_examples, u.extra, u.client_id)
                       for u in updates]
        control = None
        if self.scaffold:
            control = server_control_update(
                self._arrays(state, SCAFFOLD_C), [_delta_c(u) for u in updates],
                num_clients=num_clients)
        return self._advance(state, self.rule.apply(updates), control)

    def aggregate_clipped_sum(self, state: ServerState, clipped: ClippedSum) -> ServerState:
        """Like :meth:`aggregate` for a DP strategy, from the sum of the round's deltas
        clipped by their clients (secure aggregation's unmasked sum): the private mean
        of that sum, then the optimizer. ValueError without ``dp``."""
        if self.dp is None:
            raise ValueError(f"strategy {self.name!r} has no private mean to take a clipped "
                             "sum; call aggregate_sum")
        check_like(state.weights, clipped.sums, "the clipped sum")
        delta, scalars = self.dp.mean_of_sum(state.scalars, clipped, state.version + 1,
                                             state.weights)
        return self._advance(replace(state, scalars={**state.scalars, **scalars}), delta, None)

    def aggregate_sum(self, state: ServerState, total: RunningSum, *, num_clients: int,
                      count: int) -> ServerState:
        """Like :meth:`aggregate`, from a RunningSum of the round's deltas.

        ``total`` must hold each of the ``count`` deltas added with its
        ``num_examples`` as the factor. Only for strategies whose
        ``needs_all`` is False; the result equals :meth:`aggregate` on the same
        updates bit for bit.
        """
        if self.needs_all:
            raise ValueError(f"strategy {self.name!r} needs every update of the round; "
                             "call aggregate with the buffered updates")
        if count < 1 or total.count != count:
            raise ValueError(f"the running sum holds {total.count} updates but count is {count}")
        if num_clients < count:
            raise ValueError(f"num_clients ({num_clients}) is less than the {count} updates "
                             "of the round")
        delta = total.mean()
        check_like(state.weights, delta, "the running sum")
        return self._advance(state, delta, None)

    def _arrays(self, state: ServerState, group: str) -> Weights:
        try:
            return state.arrays[group]
        except KeyError:
            raise ValueError(f"the state has no {group!r} arrays; strategy {self.name!r} needs "
                             "a state from its own init") from None

    def _advance(self, state: ServerState, delta: Weights, control: Weights | None) -> ServerState:
        moments = {n: self._arrays(state, _opt_group(n)) for n in self.optimizer.moment_names}
        opt = OptState(moments=moments, step=int(state.scalars.get(OPT_STEP, 0)))
        weights, opt = self.optimizer.step(state.weights, delta, opt)
        for k, w in state.weights.items():
            if not is_float(w):
                weights[k] = cast(w + delta[k], w.dtype)
        arrays = {g: a for g, a in state.arrays.items() if not g.startswith("opt/")}
        arrays.update({_opt_group(n): m for n, m in opt.moments.items()})
        if control is not None:
            arrays[SCAFFOLD_C] = control
        return ServerState(weights=weights, version=state.version + 1, arrays=arrays,
                           scalars={**state.scalars, OPT_STEP: opt.step})


def _delta_c(update: Update) -> Weights:
    try:
        return update.extra[DELTA_C]
    except KeyError:
        who = f"update from {update.client_id!r}" if update.client_id else "an update"
        raise ValueError(f"{who} has no extra[{DELTA_C!r}]; scaffold clients must send their "
                         "control-variate delta") from None
