"""Synchronous rounds on the virtual clock: stragglers and a round deadline.

Every sampled client starts its task when the round starts and finishes
``steps / speed`` virtual seconds later (:mod:`fedlearn.sim.clock`). Without
``--round-timeout`` the round closes when the slowest client is done. With it,
clients that would finish after the deadline are dropped stragglers: the
round closes at the deadline and aggregates the clients that made it, as the
HTTP server's round deadline does. If none made it, the round records zero
clients, the model stays as it was and the clock still moves on by the
timeout (the HTTP server would resample and run the round again instead; in
virtual time that could loop forever when no client can ever make it).

Training, aggregation and evaluation are :class:`~fedlearn.sim.engine.Simulation`'s
own; this module only decides who made it and when the round closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedlearn.errors import ConfigError
from fedlearn.sim.base import ClientTask
from fedlearn.sim.clock import client_speeds, task_steps
from fedlearn.sim.config import SimConfig
from fedlearn.sim.engine import Simulation
from fedlearn.sim.sequential import ScriptEngine
from fedlearn.strategies import Strategy
from fedlearn.tasks.base import Task


@dataclass(frozen=True)
class RoundTiming:
    """Who of a round's sampled clients made the deadline, and how long the round took."""

    made: list[ClientTask]
    dropped: list[ClientTask]
    seconds: float


def time_round(tasks: list[ClientTask], durations: list[float],
               timeout: float | None) -> RoundTiming:
    """Split ``tasks`` (taking ``durations`` virtual seconds each) at the ``timeout``.

    The round lasts until its slowest client is done, or until the deadline
    when somebody misses it (or when nobody was sampled).
    """
    if timeout is None:
        return RoundTiming(list(tasks), [], max(durations, default=0.0))
    made = [t for t, d in zip(tasks, durations, strict=True) if d <= timeout]
    dropped = [t for t, d in zip(tasks, durations, strict=True) if d > timeout]
    seconds = max(durations) if tasks and not dropped else timeout
    return RoundTiming(made, dropped, seconds)


def require_rows(sim: Simulation) -> None:
    """Refuse a client-API script task: its steps are unknown, so are its durations."""
    if isinstance(sim.engine, ScriptEngine):
        sim.close()
        raise ConfigError("simulated time counts each client's steps on data the simulator "
                          "loads; a client-API script task cannot run with --mode async, "
                          "--round-timeout, --client-speeds or --max-virtual-time.")


class ClientClock:
    """Each client's speed and the virtual seconds its task takes (see fedlearn.sim.clock)."""

    def __init__(self, sim: Simulation) -> None:
        cfg = sim.config
        self.speeds: npt.NDArray[np.float64] = client_speeds(cfg.client_speeds, cfg.clients,
                                                             cfg.seed)
        train = sim.train_config
        self.steps = {cid: task_steps(len(sim.rows[cid]), train.epochs, train.batch_size)
                      for cid in sim.ids}
        self.index = {cid: i for i, cid in enumerate(sim.ids)}

    def seconds(self, client_id: str) -> float:
        """Virtual seconds of one task of ``client_id``: its steps over its speed."""
        return self.steps[client_id] / float(self.speeds[self.index[client_id]])


class TimedSimulation(Simulation):
    """A :class:`Simulation` whose rounds run on the virtual clock (see the module doc)."""

    def __init__(self, config: SimConfig, task: Task, *, strategy: Strategy | None = None,
                 device: str = "cpu", log: Callable[[str], None] = print) -> None:
        super().__init__(config, task, strategy=strategy, device=device, log=log)
        require_rows(self)
        self.clock = ClientClock(self)
        self.now = 0.0
        self.dropped_total = 0
        self.empty_rounds = 0
        self._plans: dict[int, tuple[list[ClientTask], RoundTiming]] = {}

    def plan(self, rnd: int) -> RoundTiming:
        """Round ``rnd``'s sample split at the deadline (computed once per round)."""
        if rnd not in self._plans:
            sampled = super().round_tasks(rnd)
            timing = time_round(sampled, [self.clock.seconds(t.client_id) for t in sampled],
                                self.config.round_timeout)
            self._plans = {rnd: (sampled, timing)}
        return self._plans[rnd][1]

    def round_tasks(self, rnd: int) -> list[ClientTask]:
        """Only the sampled clients that finish by the deadline train and are aggregated."""
        return self.plan(rnd).made

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Round ``rnd`` in virtual time; its record adds ``virtual_time`` (when the round
        closed), ``round_virtual_seconds``, ``sampled`` and ``dropped``."""
        timing = self.plan(rnd)
        if timing.made or self.budget is not None:  # a private round is released anyway
            record = super().run_round(rnd)
        else:
            record = self._empty_round(rnd)
            self.empty_rounds += 1
        self.now += timing.seconds
        self.dropped_total += len(timing.dropped)
        record.update({
            "virtual_time": self.now,
            "round_virtual_seconds": timing.seconds,
            "sampled": len(timing.made) + len(timing.dropped),
            "dropped": len(timing.dropped),
        })
        return record

    def _empty_round(self, rnd: int) -> dict[str, Any]:
        """The record of a round nobody finished in time: the model is unchanged."""
        t0 = time.perf_counter()
        record: dict[str, Any] = {"round": rnd}
        if self.test is not None and self.evaluator is not None:
            record.update(self.evaluator.evaluate(self.weights, self.test).metrics)
        record.update(self._federated_eval(rnd))
        record.update({"seconds": time.perf_counter() - t0, "train_seconds": 0.0,
                       "clients": 0, "examples": 0})
        return record
