"""Asynchronous federation in virtual time, and the entry point of every timed run.

``--mode async`` keeps ``--concurrency`` C clients training at once. A task
starts from the global model current when it is handed out and finishes
``steps / speed`` virtual seconds later; completions come out of an
:class:`~fedlearn.sim.clock.EventQueue` in virtual-time order. Each finished
delta is merged by the run's policy (:func:`fedlearn.strategies.async_policies.make_policy`,
the very rules of ``fedlearn server --mode async``) with staleness = the
current version minus the version the task started from; an update staler
than ``--max-staleness`` is refused, as the server refuses it.

Whoever finishes, a *newly sampled* client gets the next task: uniformly
among the clients not training right now (the one that just finished
included), drawn from a generator seeded by ``(run seed, "async-sample")``.
Re-tasking the same client instead would let the first C sampled clients do
all the training. A client's n-th task trains with the data seed the HTTP
async server would give it (``derive_seed("async-task", seed, client, n)``).

Training is exact and lazy: a client's result depends only on its start
weights, rows and seed, so tasks are trained when their completion comes up,
all the tasks that started from the same version in one engine call (the C
first tasks; the ones between two ``fedbuff`` flushes).

Attackers (``--attack``) poison their deltas before the merge and DP-SGD
clients' largest ε is recorded, as in sync rounds.

The run stops after ``--updates`` merged updates or at ``--max-virtual-time``
(whichever comes first); held-back ``fedbuff`` updates are then applied and
the last model evaluated. Every ``--eval-every`` merged updates the model is
evaluated and a record written.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedlearn.runs import RunDir, final_metrics
from fedlearn.seeding import derive_seed, rng_for
from fedlearn.sim.base import ClientTask, ClientUpdate
from fedlearn.sim.clock import EventQueue
from fedlearn.sim.config import SimConfig
from fedlearn.sim.deadline import ClientClock, TimedSimulation, require_rows
from fedlearn.sim.engine import Simulation, _finish, announce_attackers
from fedlearn.sim.modes import async_policy
from fedlearn.strategies import Strategy
from fedlearn.strategies.async_policies import AsyncState
from fedlearn.tasks.base import Task
from fedlearn.types import Weights

Hook = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Flight:
    """One task in flight: whose, from which version, with which data seed, when it ends."""

    number: int
    index: int
    client_id: str
    version: int
    seed: int
    end: float


def staleness_summary(values: list[int]) -> dict[str, Any]:
    """Count, mean, max, quantiles and the full histogram ``{staleness: updates}``."""
    if not values:
        return {"count": 0}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.quantile(arr, [0.5, 0.9, 0.99])
    return {
        "count": len(values), "mean": float(arr.mean()), "max": int(arr.max()),
        "p50": float(p50), "p90": float(p90), "p99": float(p99),
        "histogram": {str(k): v for k, v in sorted(Counter(values).items())},
    }


class AsyncSimulation:
    """An asynchronous run over a :class:`Simulation`'s clients, data, engine and evaluator."""

    def __init__(self, config: SimConfig, task: Task, *, device: str = "cpu",
                 log: Callable[[str], None] = print) -> None:
        self.config = config
        self.sim = Simulation(config, task, device=device, log=log)
        require_rows(self.sim)
        self.clock = ClientClock(self.sim)
        self.policy = async_policy(config)
        self.state = AsyncState(weights={k: v.copy() for k, v in self.sim.weights.items()})
        self.now = 0.0
        self.staleness: list[int] = []
        self.refused = 0
        self.train_seconds = 0.0
        self.dp_sgd_epsilon = 0.0
        self.history: list[dict[str, Any]] = []
        self._queue: EventQueue[Flight] = EventQueue()
        self._busy = np.zeros(config.clients, dtype=bool)
        self._rng = rng_for("async-sample", config.seed)
        self._given: dict[str, int] = {}
        self._untrained: dict[int, tuple[Weights, list[Flight]]] = {}
        self._results: dict[int, ClientUpdate] = {}
        self._flights = 0
        self._since_eval: list[int] = []
        self._contributors: set[str] = set()
        self._started = time.perf_counter()

    # -- tasks ------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Hand the next task (from the current model) to a client not training now."""
        idle = np.flatnonzero(~self._busy)
        index = int(idle[self._rng.integers(len(idle))])
        cid = self.sim.ids[index]
        self._busy[index] = True
        self._given[cid] = count = self._given.get(cid, 0) + 1
        self._flights += 1
        flight = Flight(self._flights, index, cid, self.state.version,
                        derive_seed("async-task", self.config.seed, cid, count),
                        self.now + self.clock.seconds(cid))
        self._untrained.setdefault(flight.version, (self.state.weights, []))[1].append(flight)
        self._queue.push(flight.end, flight)

    def _result(self, flight: Flight) -> ClientUpdate:
        """The flight's update, training every untrained task of its start version at once."""
        if flight.number not in self._results:
            weights, group = self._untrained.pop(flight.version)
            tasks = [ClientTask(f.client_id, self.sim.rows[f.client_id], f.seed) for f in group]
            t0 = time.perf_counter()
            updates = self.sim.engine.train_round(weights, tasks, self.sim.train_config)
            self.train_seconds += time.perf_counter() - t0
            attackers = self.sim.attackers
            for f, u in zip(group, updates, strict=True):
                if attackers.active:
                    u = replace(u, delta=attackers.delta(f.client_id, u.delta, f.seed))
                self._results[f.number] = u
                self.dp_sgd_epsilon = max(self.dp_sgd_epsilon, u.metrics.get("dp_epsilon", 0.0))
        return self._results.pop(flight.number)

    # -- the loop ---------------------------------------------------------------
    def _done(self) -> bool:
        return self.config.updates is not None and self.state.updates >= self.config.updates

    def run(self, on_record: Hook | None = None,
            on_progress: Callable[[AsyncSimulation], None] | None = None) -> None:
        """Merge completions in virtual-time order until a stop rule holds (module doc)."""
        cfg = self.config
        for _ in range(cfg.in_flight):
            self._dispatch()
        limit = cfg.max_virtual_time
        evaluated = (-1, -1)
        while not self._done():
            upcoming = self._queue.peek_time()
            if upcoming is None or (limit is not None and upcoming > limit):
                self.now = limit if limit is not None else self.now
                break
            self.now, flight = self._queue.pop()
            update = self._result(flight)
            self._busy[flight.index] = False
            if self._merge(update, self.state.version - flight.version):
                if self.state.updates % cfg.eval_every == 0:
                    evaluated = self._record(on_record)
                if on_progress is not None:
                    on_progress(self)
            if not self._done():
                self._dispatch()
        self.state = self.policy.flush(self.state)
        if (self.state.updates, self.state.version) != evaluated:
            self._record(on_record)

    def _merge(self, update: ClientUpdate, staleness: int) -> bool:
        """Merge one update by the policy; False when it is too stale and refused."""
        limit = self.config.max_staleness
        if limit is not None and staleness > limit:
            self.refused += 1
            return False
        self.state = self.policy.merge(self.state, update.delta, update.num_examples, staleness)
        self.staleness.append(staleness)
        self._since_eval.append(staleness)
        self._contributors.add(update.client_id)
        return True

    def _record(self, on_record: Hook | None) -> tuple[int, int]:
        """Evaluate the current model and append its record; the (updates, version) seen."""
        state, sim = self.state, self.sim
        record: dict[str, Any] = {"update": state.updates, "version": state.version,
                                  "virtual_time": self.now}
        if sim.test is not None and sim.evaluator is not None:
            record.update(sim.evaluator.evaluate(state.weights, sim.test).metrics)
        record.update(sim.federated_eval(state.updates, state.weights))
        if self.dp_sgd_epsilon > 0:
            record["dp_sgd_epsilon_max"] = self.dp_sgd_epsilon
        recent = self._since_eval
        record.update({
            "staleness_mean": float(np.mean(recent)) if recent else 0.0,
            "staleness_max": max(recent, default=0),
            "mean_staleness": float(np.mean(self.staleness)) if self.staleness else 0.0,
            "refused": self.refused,
            "buffered": state.buffered,
            "examples": state.absorbed_examples,
            "distinct_clients": len(self._contributors),
            "seconds": time.perf_counter() - self._started,
            "train_seconds": self.train_seconds,
        })
        self._since_eval = []
        self.history.append(record)
        if on_record is not None:
            on_record(record)
        return state.updates, state.version


def run_virtual(
    config: SimConfig,
    task: Task,
    run: RunDir,
    *,
    on_round: Hook | None = None,
    on_progress: Callable[[int, float], None] | None = None,
    log: Callable[[str], None] = print,
    device: str = "cpu",
    strategy: Strategy | None = None,
) -> dict[str, Any]:
    """Simulate ``task`` in virtual time (async, or sync with speeds and a deadline).

    Writes ``run`` like :func:`~fedlearn.sim.engine.run_simulation` (records
    with ``virtual_time`` and, async, ``staleness_*``; sync, ``dropped``);
    ``report.png`` plots accuracy against virtual time. ``on_round`` hears each
    record, ``on_progress`` (updates or rounds done, virtual time) each step;
    ``strategy`` is a sync run's strategy object (None: the one ``config`` names).
    Returns the summary.
    """
    if config.mode == "async":
        return _run_async(config, task, run, on_round, on_progress, log, device)
    return _run_sync(config, task, run, on_round, on_progress, log, device, strategy)


def _run_async(config: SimConfig, task: Task, run: RunDir, on_round: Hook | None,
               on_progress: Callable[[int, float], None] | None,
               log: Callable[[str], None], device: str) -> dict[str, Any]:
    started = time.perf_counter()
    asim = AsyncSimulation(config, task, device=device, log=log)
    announce_attackers(asim.sim, run, log)

    def on_record(record: dict[str, Any]) -> None:
        run.append_metrics(record)
        if on_round is not None:
            on_round(record)

    try:
        asim.run(on_record, None if on_progress is None
                 else lambda a: on_progress(a.state.updates, a.now))
    finally:
        asim.sim.close()
    run.save_model(asim.state.weights)
    summary = {
        "mode": "sim", "sim_mode": "async", "engine": asim.sim.engine.name,
        "engine_requested": config.engine, "task": task.name, "dataset": config.dataset,
        "model": config.model, "async_policy": config.async_policy,
        "staleness_fn": config.staleness_fn, "clients": config.clients,
        "concurrency": config.in_flight, "client_speeds": config.client_speeds,
        "updates": asim.state.updates, "versions": asim.state.version,
        "refused": asim.refused, "virtual_time": asim.now,
        "mean_staleness": float(np.mean(asim.staleness)) if asim.staleness else 0.0,
        "staleness": staleness_summary(asim.staleness),
        **final_metrics(asim.history),
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": asim.train_seconds,
    }
    run.write_summary(summary)
    run.write_report(f"simulated async ({config.async_policy}, {config.in_flight} of "
                     f"{config.clients} clients at once): {task.name}")
    return summary


def _run_sync(config: SimConfig, task: Task, run: RunDir, on_round: Hook | None,
              on_progress: Callable[[int, float], None] | None,
              log: Callable[[str], None], device: str,
              strategy: Strategy | None) -> dict[str, Any]:
    started = time.perf_counter()
    sim = TimedSimulation(config, task, strategy=strategy, device=device, log=log)
    announce_attackers(sim, run, log)
    history: list[dict[str, Any]] = []
    limit = config.max_virtual_time
    try:
        for rnd in range(1, config.rounds + 1):
            if limit is not None and sim.now + sim.plan(rnd).seconds > limit:
                break
            record = sim.run_round(rnd)
            history.append(record)
            run.append_metrics(record)
            if on_round is not None:
                on_round(record)
            if on_progress is not None:
                on_progress(rnd, sim.now)
    finally:
        sim.close()
    summary = _finish(run, config, task, sim.engine.name, sim.weights, history, started)
    lasted = [float(h["round_virtual_seconds"]) for h in history]
    summary.update({
        "sim_mode": "sync", "client_speeds": config.client_speeds,
        "round_timeout": config.round_timeout, "virtual_time": sim.now,
        "dropped": sim.dropped_total, "empty_rounds": sim.empty_rounds,
        "median_round_virtual_seconds": float(np.median(lasted)) if lasted else None,
    })
    run.write_summary(summary)
    return summary
