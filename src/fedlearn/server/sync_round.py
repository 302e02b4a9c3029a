"""Pieces of a sync run apart from the coordinator's flow: one open round and the pickup
rule for its sampled clients, and what a strategy adds to the wire.

Not thread-safe: the :class:`~fedlearn.server.coordinator.SyncCoordinator`
calls these under its lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedlearn.errors import ConfigError
from fedlearn.rounds import RoundUpdates
from fedlearn.seeding import rng_for
from fedlearn.server.clients import ClientRegistry
from fedlearn.strategies import Strategy
from fedlearn.types import Weights
from fedlearn.weights import Spec, pack, spec_of

if TYPE_CHECKING:
    from fedlearn.server.secagg_round import SecAggRound

log = logging.getLogger("fedlearn.server")


@dataclass
class OpenRound:
    """A round being trained: its sample, deadline, config and the updates so far."""

    number: int
    attempt: int
    sampled: frozenset[str]
    deadline: float
    started: float
    updates: RoundUpdates
    config: dict[str, Any]
    received: dict[str, int] = field(default_factory=dict)
    train_loss: float = 0.0
    picked: set[str] = field(default_factory=set)  # sampled clients that took their task
    withdrawn: set[str] = field(default_factory=set)  # sampled, then gave their task up
    #: under --secagg: the stages after training (``received`` then means "advertised keys")
    secagg: SecAggRound | None = None

    def waiting_for_pickup(self) -> set[str]:
        """Sampled clients that have neither taken their task nor sent an update."""
        return set(self.sampled - self.picked - self.received.keys())

    def pickup_by(self, clients: ClientRegistry, client_id: str, seconds: float) -> float:
        """When ``client_id`` must have picked up its task: ``seconds`` after the round
        started or after it (re-)registered, whichever is later."""
        return max(self.started, clients[client_id].registered_at) + seconds

    def replace_absent(self, clients: ClientRegistry, now: float, seconds: float,
                       seed: int) -> bool:
        """Swap sampled clients that never picked up their task for others (True if any).

        A client that registered and went silent must not make the round wait for
        its whole deadline; it takes part again once it polls.
        """
        absent = {cid for cid in self.waiting_for_pickup()
                  if self.pickup_by(clients, cid, seconds) <= now}
        if not absent:
            return False
        spare = sorted(c.client_id for c in clients
                       if c.online and not c.dropped and c.client_id not in self.sampled)
        for cid in absent:
            clients[cid].dropped = True
        rng = rng_for("replace", seed, self.number, self.attempt, len(self.picked))
        chosen = ([spare[i] for i in rng.choice(len(spare), size=min(len(absent), len(spare)),
                                                 replace=False)] if spare else [])
        self.sampled = frozenset((self.sampled - absent) | set(chosen))
        log.warning("round %d: %d sampled client(s) never picked up their task; replaced by "
                    "%d other(s)", self.number, len(absent), len(chosen))
        return True


@dataclass(frozen=True)
class Wire:
    """What a strategy adds to the payloads: groups of arrays sent beside the model
    (SCAFFOLD's ``c``) and beside each delta (``delta_c``), as ``GROUP/NAME`` entries.

    ``update_spec`` is what an update body must hold.
    """

    model_extras: tuple[str, ...]
    update_extras: tuple[str, ...]
    update_spec: Spec


def wire_for(strategy: Strategy, initial: Weights) -> Wire:
    """The :class:`Wire` of ``strategy`` for a model like ``initial``; ConfigError when a
    name of the model's state would clash with an extra entry."""
    model_extras = tuple(sorted(strategy.client_arrays(strategy.init(initial))))
    update_extras = ("delta_c",) if strategy.scaffold else ()
    floats = {k: v for k, v in initial.items() if v.dtype.kind == "f"}
    clash = sorted(k for k in initial for g in (*model_extras, *update_extras)
                   if k.startswith(g + "/"))
    if clash:
        raise ConfigError(f"strategy {strategy.name!r} sends arrays named GROUP/NAME beside "
                          f"the model, which {clash[0]!r} of the task's state would clash "
                          "with; rename it or choose another strategy.")
    return Wire(model_extras, update_extras,
                spec_of(pack(initial, {g: floats for g in update_extras})))
