"""Configuring and closing a round, the same way on the sync server and in the simulator.

Both round engines (:class:`~fedlearn.server.coordinator.SyncCoordinator` and
:class:`~fedlearn.sim.engine.Simulation`) are given a
:class:`~fedlearn.strategies.Strategy` and its
:class:`~fedlearn.strategies.ServerState`, and use this module for the parts
that decide the model:

- :func:`round_config`: the training config every client of a round gets
  (the run's config plus the strategy's keys, e.g. FedProx's ``prox_mu``).
- :class:`RoundUpdates`: the round's updates folded as the strategy needs:
  into one :class:`~fedlearn.weights.RunningSum` as they arrive when the
  strategy streams (memory: one model), else kept until the round closes
  (memory: K deltas; ordered by client id at the close, so arrival order never
  changes the result). Under secure aggregation the server gets the round's
  sum instead: a RunningSum for the example-weighted mean, or a
  :class:`~fedlearn.strategies.ClippedSum` for DP-FedAvg.
- :func:`close_round`: the strategy's next state, or :class:`RoundFailed` when
  the round cannot be aggregated (too few updates for the rule) or its result
  cannot be a global model (non-finite or beyond 1e12); the caller then keeps
  the previous state.
- :func:`checkpoint_of` and :func:`restore`: the whole state (model, optimizer
  moments and step, SCAFFOLD's control variate) as one checkpoint and back.

Pure numpy: no torch, no I/O.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np

from fedlearn.config import TrainConfig
from fedlearn.errors import FedlearnError, RunStateError
from fedlearn.strategies import (
    ClippedSum,
    ServerState,
    Strategy,
    Update,
    state_from_arrays,
    state_to_arrays,
)
from fedlearn.types import Weights
from fedlearn.weights import RunningSum, Spec, check, unusable

#: Checkpoint header key holding the strategy state's metadata (JSON).
STATE_KEY = "fedlearn.state"


class RoundFailed(Exception):
    """A round whose updates give no usable next state; ``str(exc)`` says why."""


def round_config(strategy: Strategy, state: ServerState, base: TrainConfig,
                 round_number: int) -> TrainConfig:
    """The config sent with every task of round ``round_number``: ``base`` plus the
    strategy's keys (``prox_mu``, ``scaffold``), which win."""
    extra = strategy.client_config(state, round_number)
    return base.merged(extra) if extra else base


class RoundUpdates:
    """One round's updates, held as ``strategy`` needs them (see the module doc)."""

    def __init__(self, strategy: Strategy) -> None:
        self.streaming = not strategy.needs_all
        self.total = RunningSum()
        self.kept: list[Update] = []
        #: DP-FedAvg under secure aggregation: the clients' clipped deltas, already summed
        self.clipped: ClippedSum | None = None

    def add(self, update: Update) -> None:
        """Fold in one client's update (its arrays are not copied)."""
        if self.streaming:
            self.total.add(update.delta, float(update.num_examples))
        else:
            self.kept.append(update)

    def __len__(self) -> int:
        if self.clipped is not None:
            return self.clipped.count
        return self.total.count if self.streaming else len(self.kept)


def close_round(strategy: Strategy, state: ServerState, updates: RoundUpdates, *,
                num_clients: int) -> ServerState:
    """The state after the round; RoundFailed when it has none (keep ``state`` then).

    ``num_clients`` is every client of the run (SCAFFOLD's N).
    """
    try:
        if updates.clipped is not None:
            new = strategy.aggregate_clipped_sum(state, updates.clipped)
        elif updates.streaming:
            new = strategy.aggregate_sum(state, updates.total, num_clients=num_clients,
                                         count=len(updates))
        else:
            ordered = sorted(updates.kept, key=lambda u: u.client_id)
            new = strategy.aggregate(state, ordered, num_clients=num_clients)
    except ValueError as exc:  # NotEnoughUpdatesError included
        raise RoundFailed(str(exc)) from None
    problem = unusable(new.weights)
    for group, arrays in new.arrays.items():
        if problem is None:
            found = unusable(arrays)
            problem = None if found is None else f"strategy state {group}: {found}"
    if problem is not None:
        raise RoundFailed(f"the aggregate is unusable ({problem})")
    return new


def checkpoint_of(state: ServerState) -> tuple[Weights, dict[str, str]]:
    """The arrays and header metadata of a checkpoint holding ``state`` exactly."""
    arrays, meta = state_to_arrays(state)
    return arrays, {STATE_KEY: json.dumps(meta, sort_keys=True)}


def restore(strategy: Strategy, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str],
            *, key: int, spec: Spec) -> ServerState:
    """The state saved by :func:`checkpoint_of` under ``key`` (the round), checked
    against the model's ``spec`` and ``strategy``; RunStateError if it does not fit.

    A checkpoint without state metadata (written before strategies kept state)
    holds the model alone: its state is ``strategy.init`` of it at version ``key``.
    """
    text = metadata.get(STATE_KEY)
    try:
        if text is None:
            weights = dict(arrays)
            check(weights, spec)
            return dataclasses.replace(strategy.init(weights), version=key)
        state = state_from_arrays(arrays, json.loads(text))
        check(state.weights, spec)
    except (ValueError, FedlearnError) as exc:
        raise RunStateError(f"checkpoint {key} does not hold a usable run state ({exc}); "
                            "the run directory is damaged.") from None
    fresh = strategy.init(state.weights)
    shape = {g: {k: np.shape(v) for k, v in a.items()} for g, a in state.arrays.items()}
    if state.version != key or shape != {g: {k: np.shape(v) for k, v in a.items()}
                                         for g, a in fresh.arrays.items()}:
        raise RunStateError(f"checkpoint {key} holds state for another strategy than "
                            f"{strategy.name!r} (or another round); resume with the run's own "
                            "settings.")
    return state
