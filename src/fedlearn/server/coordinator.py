"""Synchronous rounds, with no web code: strategy, clock, evaluator and store are passed in.

The strategy (a :class:`~fedlearn.strategies.Strategy`, resolved at the edge)
decides each round's client config and the next state; its whole state
(model, optimizer moments, SCAFFOLD's control variate) is in every checkpoint
and comes back on resume. Closing a round is :mod:`fedlearn.rounds`, shared
with the simulator.

Thread-safe: HTTP handlers call :meth:`register`, :meth:`poll` and
:meth:`submit` from many threads or an event loop, and a driver calls
:meth:`step` whenever something changed or a deadline may have passed. Locks
are held only for bookkeeping and for folding one delta into the running sum;
evaluation and checkpointing run outside them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

from fedlearn.config import ServerConfig, TrainConfig, privacy_budget
from fedlearn.errors import ConflictError, PayloadError
from fedlearn.rounds import (
    RoundFailed,
    RoundUpdates,
    checkpoint_of,
    close_round,
    restore,
    round_config,
)
from fedlearn.seeding import task_seed
from fedlearn.server.coordinator_base import REPLAY_MEMORY, Coordinator, median
from fedlearn.server.secagg_round import SecAggPlan, SecAggSettings
from fedlearn.server.store import Store
from fedlearn.server.sync_round import OpenRound, wire_for
from fedlearn.server.sync_secagg import SecAggDriver
from fedlearn.server.sync_types import DONE, WAIT, Evaluator, Task, eval_record
from fedlearn.strategies import ServerState, Strategy, Update, sample_clients
from fedlearn.types import Weights
from fedlearn.weights import check, check_delta, encode, pack, unpack

__all__ = ["DONE", "REPLAY_MEMORY", "WAIT", "Evaluator", "SyncCoordinator", "Task",
           "eval_record"]

log = logging.getLogger("fedlearn.server")
#: Seconds a sampled client has to pick up its task before another takes its place.
PICKUP_SECONDS = 15.0
#: Longest a resumed run waits for the clients it knew before its first round.
RETURN_WAIT_SECONDS = 60.0


class SyncCoordinator(SecAggDriver, Coordinator):
    """Runs ``config.rounds`` rounds of sampling, local training and ``strategy``.

    Clients get the extra arrays the strategy sends (SCAFFOLD's ``c``) with the
    model as safetensors entries ``GROUP/NAME`` (``c/fc1.weight``), and send the
    extra deltas it asks for (``delta_c/fc1.weight``) with their delta.
    """

    mode: ClassVar[str] = "sync"
    update_query: ClassVar[str] = "round"
    _answers: OrderedDict[str, dict[str, Any]]

    def __init__(
        self,
        config: ServerConfig,
        initial: Weights,
        *,
        strategy: Strategy,
        store: Store,
        evaluator: Evaluator | None,
        train_config: TrainConfig | None = None,
        task_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(config, initial, store=store, evaluator=evaluator,
                         train_config=train_config, task_name=task_name, clock=clock,
                         on_change=on_change, on_round=on_round,
                         eval_timeout=config.round_timeout)
        self.strategy = strategy
        wire = wire_for(strategy, initial)
        #: groups of arrays sent beside the model, and of deltas sent beside a delta
        self.model_extras, self.update_extras = wire.model_extras, wire.update_extras
        self.update_spec = wire.update_spec
        #: the fewest updates that make a round: --min-results, or more if the rule needs it
        self.min_results = max(config.min_results, strategy.min_updates)
        #: secure aggregation (--secagg): clients send masked vectors through /api/secagg
        settings = SecAggSettings.of(config)
        self.secagg = None if settings is None else SecAggPlan(
            settings, strategy, initial, self.norm_limit, config.seed)
        if settings is not None:
            self.min_results = max(self.min_results, settings.min_clients)
        self.failures: list[dict[str, Any]] = list(store.get_meta("failures", []))
        self.short_rounds = 0
        self._known_before = len(self._clients)
        #: until then a resumed run waits for the clients it knew (see _start_round_locked)
        self._returning_until = clock() + min(config.round_timeout, RETURN_WAIT_SECONDS)
        #: DP-FedAvg's (ε, δ) accounting (None without it); the rounds it lets the run have.
        self.budget = privacy_budget(config, "fixed")
        self.rounds = config.rounds
        if self.budget is not None:
            self.rounds = min(config.rounds, self.budget.max_rounds(config.rounds))
            log.info("DP-FedAvg: %s", self.budget.describe())
        resumed = store.load_checkpoint()
        if resumed is not None:
            self.state = restore(strategy, resumed.arrays, resumed.metadata, key=resumed.key,
                                 spec=self.spec)
            store.truncate_rounds(resumed.key)
        else:
            # Rounds recorded before the first checkpoint are redone from the start.
            store.truncate_rounds(0)
            self.state = strategy.init(initial)
        self.history: list[dict[str, Any]] = store.rounds()
        self.phase = "done" if self.state.version >= self.rounds else "waiting"
        self._round: OpenRound | None = None
        self._attempt = 0  # of the next round to start (a rerun that had to wait keeps its count)
        self._closing = False
        self._pending: list[tuple[ServerState, dict[str, Any]]] = []
        self._committing = False
        self._started_once = False
        self._model_cache: tuple[int, bytes] | None = None

    # -- clients ----------------------------------------------------------------
    def client_limit(self) -> tuple[int, str]:
        """``--max-clients``; a DP run's population is fixed at ``--min-clients``, the
        accountant's N."""
        if self.budget is None:
            return super().client_limit()
        return (self.config.min_clients, "--min-clients: a DP run's population is fixed, as "
                "its accountant assumes")

    # -- polling and model ------------------------------------------------------
    def poll(self, client_id: str) -> Task:
        """The client's next task now (``wait`` when there is none yet)."""
        changed = False
        with self._lock:
            client = self._clients[client_id]
            changed = not client.online or client.dropped
            client.online, client.dropped, client.last_seen = True, False, self.clock()
            task = self._task_for(client_id)
        if changed:
            self.on_change()
        return task

    def _task_for(self, client_id: str) -> Task:
        if self.phase == "done":
            return DONE
        owed = self.fed_eval.task_for(client_id)
        if owed is not None:
            key, version = owed
            return Task("evaluate", key, version, 0, f"e{key}.{client_id}")
        rnd = self._round
        if (
            rnd is None
            or self._closing
            or client_id not in rnd.sampled
            or client_id in rnd.received
            or (rnd.secagg is not None and not rnd.secagg.training_open)
        ):
            return WAIT
        rnd.picked.add(client_id)
        task = Task(
            "train", rnd.number, self.state.version,
            task_seed(self.config.seed, rnd.number, client_id),
            f"r{rnd.number}.{rnd.attempt}.{client_id}", rnd.config,
        )
        if rnd.secagg is not None:
            task = dataclasses.replace(task, secagg=rnd.secagg.block(
                client_id, rnd.deadline - self.clock()))
        return task

    def model_bytes(self) -> tuple[bytes, int]:
        """The global model (with the strategy's extra arrays, see the class doc) as
        safetensors bytes, and its version (encoded once per version)."""
        with self._lock:
            state = self.state
            cached = self._model_cache
        if cached is None or cached[0] != state.version:
            cached = (state.version, encode(pack(state.weights,
                                                 self.strategy.client_arrays(state))))
            with self._lock:
                self._model_cache = cached
        return cached[1], cached[0]

    # -- updates ----------------------------------------------------------------
    def submit(
        self,
        client_id: str,
        round_number: int,
        delta: Weights,
        num_examples: int,
        metrics: dict[str, float] | None = None,
        task_id: str | None = None,
    ) -> dict[str, Any]:
        """Fold one client's delta into the round; its answer. ConflictError if it does not
        belong; a replay of an accepted task gets the original answer and changes nothing.

        ``delta`` holds the extra deltas the strategy asks for as ``GROUP/NAME``
        entries (:attr:`update_spec`)."""
        key = f"{client_id}/{task_id}"
        self._refuse_plain_update()
        with self._lock:
            if task_id is not None and key in self._answers:
                return self._answers[key]
        check(delta, self.update_spec)
        delta, extra = unpack(delta, self.update_extras)
        if num_examples < 1:
            raise PayloadError(f"num_examples must be at least 1, got {num_examples}.")
        check_delta(delta, self.state.weights, self.norm_limit)
        with self._lock:
            if task_id is not None and key in self._answers:
                return self._answers[key]
            rnd = self._round
            if self.phase == "done":
                raise ConflictError("the run is over; no more updates are taken.")
            if (task_id is not None and rnd is not None
                    and task_id != f"r{rnd.number}.{rnd.attempt}.{client_id}"):
                raise ConflictError(f"task {task_id} is not this client's open task; fetch a "
                                    "new task.")
            if rnd is None or self._closing or rnd.number != round_number:
                current = "none" if rnd is None or self._closing else str(rnd.number)
                raise ConflictError(
                    f"round {round_number} is not open (the open round is {current}); "
                    "fetch a new task."
                )
            if client_id not in rnd.sampled:
                raise ConflictError(
                    f"client {client_id} was not sampled for round {round_number}; "
                    "wait for a task."
                )
            if client_id in rnd.received:
                raise ConflictError(
                    f"client {client_id} already sent its update for round {round_number}."
                )
            rnd.updates.add(Update(delta, num_examples, extra, client_id))
            rnd.received[client_id] = num_examples
            if metrics and "train_loss" in metrics:
                rnd.train_loss += float(metrics["train_loss"]) * num_examples
            complete = len(rnd.received) == len(rnd.sampled)
            answer = {"accepted": True, "round": round_number}
            self._remember(f"{client_id}/r{rnd.number}.{rnd.attempt}.{client_id}", answer)
        if complete:
            self.on_change()
        return answer

    def receive_update(self, client_id: str, number: int, delta: Weights, num_examples: int,
                       metrics: dict[str, float], task_id: str | None) -> dict[str, Any]:
        """:meth:`submit` for round ``number``."""
        return self.submit(client_id, number, delta, num_examples, metrics, task_id)

    def precheck(self, client_id: str, round_number: int, task_id: str | None) -> None:
        """Refuse an update that cannot be taken before its body is read (409)."""
        self._refuse_plain_update()
        with self._lock:
            if task_id is not None and f"{client_id}/{task_id}" in self._answers:
                return
            rnd = self._round
            if self.phase == "done":
                raise ConflictError("the run is over; no more updates are taken.")
            if rnd is None or self._closing or rnd.number != round_number:
                raise ConflictError(f"round {round_number} is not open; fetch a new task.")
            if client_id not in rnd.sampled:
                raise ConflictError(f"client {client_id} was not sampled for round "
                                    f"{round_number}; wait for a task.")

    def withdraw(self, client_id: str, task_id: str, reason: str = "") -> None:
        """The client gives up its task in the open round: the round stops waiting for it
        (under ``--secagg`` only while the round still trains)."""
        with self._lock:
            rnd = self._round
            if (rnd is None or self._closing
                    or task_id != f"r{rnd.number}.{rnd.attempt}.{client_id}"):
                raise ConflictError(f"task {task_id} is not this client's open task; fetch a "
                                    "new task.")
            if client_id in rnd.received or (rnd.secagg is not None
                                             and not rnd.secagg.training_open):
                raise ConflictError(f"client {client_id} already took part in round "
                                    f"{rnd.number}; it can no longer withdraw.")
            if client_id not in rnd.sampled:
                return  # withdrawn already
            rnd.sampled = rnd.sampled - {client_id}
            rnd.withdrawn.add(client_id)
        log.warning("round %d: client %s withdrew%s", rnd.number, client_id,
                    f" ({reason})" if reason else "")
        self.on_change()

    def _refuse_plain_update(self) -> None:
        if self.secagg is not None:
            raise ConflictError("this run uses secure aggregation: send the masked update "
                                "through /api/secagg (see docs/protocol.md), not /api/update.")

    def seconds_to_deadline(self) -> float | None:
        """Seconds until the next deadline: the open round's or an evaluation's (or None)."""
        with self._lock:
            waits = [self.fed_eval.seconds_to_deadline()]
            now = self.clock()
            if not self._started_once and self._known_before and now < self._returning_until:
                waits.append(self._returning_until - now + 0.01)
            rnd = self._round
            if rnd is not None and rnd.secagg is not None and not rnd.secagg.training_open:
                if not self._closing:  # a stage of secure aggregation after training
                    waits.append(max(0.0, rnd.secagg.deadline - now) + 0.01)
                rnd = None
            due = self._pickup_due_locked(rnd) if rnd is not None and not self._closing else []
            if due:
                waits.append(max(0.0, min(due) - now) + 0.01)
            if rnd is not None and not self._closing:
                waits.append(max(0.0, rnd.deadline - self.clock()))
            found = [w for w in waits if w is not None]
            return min(found) if found else None

    def step(self) -> bool:
        """Do whatever is due: start a round, close one, or rerun one. True if it did."""
        if self._commit_pending():
            return True
        if self._finish_evaluations():
            return True
        secagg = ""
        with self._lock:
            if self.phase == "done" or self._closing:
                return False
            now = self.clock()
            rnd = self._round
            if rnd is None:
                if self.state.version >= self.rounds:
                    return False
                return self._start_round_locked(self.state.version + 1, attempt=self._attempt)
            if rnd.secagg is not None and not rnd.secagg.training_open:
                # After training: a stage of secure aggregation closes when it is due.
                secagg = self._secagg_step(rnd, now, training=False)
                if secagg in ("wait", "moved"):
                    return secagg == "moved"
            else:
                if rnd.replace_absent(self._clients, now, self._pickup_seconds(),
                                      self.config.seed):
                    self.on_change()
                    return True
                complete = len(rnd.received) == len(rnd.sampled)
                expired = now >= rnd.deadline
                if not complete and not expired:
                    return False
                if not complete:
                    for cid in rnd.sampled - rnd.received.keys():
                        self._clients[cid].dropped = True
                if len(rnd.received) < self.min_results:
                    log.warning("round %d: %d update(s) by the deadline, fewer than the %d "
                                "needed (--min-results, or the strategy's minimum); running it "
                                "again with a new sample", rnd.number, len(rnd.received),
                                self.min_results)
                    self.short_rounds += 1
                    self._round = None
                    self._start_round_locked(rnd.number, attempt=rnd.attempt + 1)
                    self.on_change()
                    return True
                if rnd.secagg is not None:  # training is over: the clients share their keys
                    secagg = self._secagg_step(rnd, now, training=True)
                    if secagg == "moved":
                        return True
            self._closing = True
        if secagg.startswith("abort: "):
            self._fail_round(rnd, secagg[len("abort: "):])
            return True
        fields = self._finish_secagg(rnd) if secagg == "sum" else {}
        if fields is not None:
            self._close_round(rnd, now, fields)
        return True

    def _pickup_seconds(self) -> float:
        """Seconds a sampled client has to pick up its task before it is replaced."""
        if self.config.pickup_timeout is not None:
            return self.config.pickup_timeout
        return min(PICKUP_SECONDS, self.config.round_timeout / 3)

    def _pickup_due_locked(self, rnd: OpenRound) -> list[float]:
        return [rnd.pickup_by(self._clients, cid, self._pickup_seconds())
                for cid in rnd.waiting_for_pickup()]

    def _start_round_locked(self, number: int, attempt: int) -> bool:
        self._attempt = attempt
        candidates = [c.client_id for c in self._clients if c.online and not c.dropped]
        # Each server process waits for --min-clients before its first round (so a
        # resumed run samples as the uninterrupted one would); later rounds go on
        # with whoever is still there, but never with fewer than --min-results
        # clients: such a round could only be thrown away.
        needed = 1 if self._started_once else self.config.min_clients
        if not self._started_once and self.clock() < self._returning_until:
            # A resumed run waits (a while) for every client it knew, so its first
            # round samples from the same clients as the uninterrupted run would.
            needed = max(needed, self._known_before)
        needed = max(needed, self.min_results)
        if len(candidates) < needed:
            self.phase = "waiting"
            return False
        sampled = sample_clients(
            candidates, self.config.fraction, seed=self.config.seed,
            round_number=number, attempt=attempt, minimum=self.min_results,
        )
        now = self.clock()
        config = round_config(self.strategy, self.state, self.train_config, number).as_dict()
        self._round = OpenRound(number, attempt, frozenset(sampled),
                                now + self.config.round_timeout, now,
                                RoundUpdates(self.strategy), config)
        if self.secagg is not None:
            dp_clip = config.get("dp_clip")  # DP-FedAvg: under --secagg the clients clip
            self._round.secagg = self.secagg.open(number, attempt, frozenset(sampled),
                                                  None if dp_clip is None else float(dp_clip))
        self.phase = "training"
        self._started_once = True
        self.on_change()
        return True

    def _close_round(self, rnd: OpenRound, now: float,
                     fields: dict[str, Any] | None = None) -> None:
        try:
            new_state = close_round(self.strategy, self.state, rnd.updates,
                                    num_clients=len(self._clients))
        except RoundFailed as exc:
            self._fail_round(rnd, str(exc))
            return
        except BaseException:
            with self._lock:
                self._closing = False
            raise
        examples = sum(rnd.received.values())
        record: dict[str, Any] = {
            "round": rnd.number,
            "seconds": self.clock() - rnd.started,
            "clients": len(rnd.received),
            "sampled": len(rnd.sampled) + len(rnd.withdrawn),
            **({"withdrawn": len(rnd.withdrawn)} if rnd.withdrawn else {}),
            "examples": examples,
            "attempts": rnd.attempt + 1,
            "train_loss": rnd.train_loss / examples if examples else None,
            **(fields or {}),  # secure aggregation: what the unmasked sum says
        }
        if self.budget is not None:
            record.update(self.budget.record(new_state.version))
        with self._lock:
            self.state = new_state
            self._round = None
            self._closing = False
            self._pending.append((new_state, record))
            self._start_evaluation_locked(new_state.version)
            # The next round starts at once and this one is evaluated and committed
            # while the clients train: the server's work is off the critical path.
            # A crash before the commit resumes from the previous checkpoint and
            # redoes this round, which gives the same model.
            if new_state.version < self.rounds:
                self._start_round_locked(new_state.version + 1, attempt=0)
        self.on_change()
        self._commit_pending()

    def _fail_round(self, rnd: OpenRound, reason: str) -> None:
        """Keep the previous model, record why, and run the round again with a new sample."""
        failure = {"round": rnd.number, "attempt": rnd.attempt + 1, "reason": reason}
        log.warning("round %d (attempt %d) failed: %s; the previous model stays and the "
                    "round runs again", rnd.number, rnd.attempt + 1, reason)
        with self._lock:
            self.failures.append(failure)
            self._round = None
            self._closing = False
            self._start_round_locked(rnd.number, attempt=rnd.attempt + 1)
        self.store.set_meta("failures", self.failures[-100:])
        self.on_change()

    def _commit_pending(self) -> bool:
        """Evaluate and commit closed rounds, oldest first; True if any was committed."""
        did = False
        while True:
            with self._lock:
                if not self._pending or self._committing:
                    return did
                self._committing = True
                state, partial = self._pending[0]
            try:
                did = self._commit_one(state, partial) or did
            finally:
                with self._lock:
                    self._committing = False

    def _commit_one(self, state: ServerState, partial: dict[str, Any]) -> bool:
        result = self.evaluator(state.weights) if self.evaluator is not None else None
        record = {"round": partial["round"], **eval_record(result),
                  **{k: v for k, v in partial.items() if k != "round"}}
        version = state.version
        save = version % self.config.save_every == 0 or version >= self.rounds
        arrays, metadata = checkpoint_of(state) if save else (None, None)
        self.store.commit_round(record, arrays, {}, metadata=metadata)
        with self._lock:
            self._pending.pop(0)
            self.fed_eval.hold(version, record)
        self._emit_ready()
        return True

    def _start_evaluation_locked(self, version: int) -> None:
        """Open federated evaluation of ``version`` when it is due and clients can do it."""
        cfg = self.config
        if version % cfg.eval_every and version < self.rounds:
            return
        able = [c.client_id for c in self._clients if c.online and not c.dropped
                and (c.num_test_examples or 0) > 0]
        if not able:
            return
        fraction = cfg.eval_fraction if cfg.eval_fraction is not None else cfg.fraction
        chosen = sample_clients(able, fraction, seed=cfg.seed ^ 0x5EED, round_number=version)
        self.fed_eval.start(version, version, chosen)

    def _finish_evaluations(self) -> bool:
        with self._lock:
            changed = self.fed_eval.merge_finished()
        for record in changed:
            self.store.update_round(record)
        if changed:
            self._emit_ready()
        return bool(changed)

    def _emit_ready(self) -> None:
        """Hand committed rounds whose federated evaluation is over to ``on_round``, in order."""
        with self._lock:
            ready = self.fed_eval.ready()
            self.history.extend(ready)
            if (self.history and self.history[-1]["round"] >= self.rounds
                    and not self.fed_eval.holding and not self._pending):
                self.phase = "done"
        for record in ready:
            self.on_round(record)
        if ready:
            self.on_change()

    # -- status -----------------------------------------------------------------
    def status(self, viewer: str | None = None) -> dict[str, Any]:
        """A JSON-able snapshot for ``GET /api/status``.

        ``viewer`` None is the operator's full view (join token); a client id sees
        counts and its own record only, never other clients' ids.
        """
        with self._lock:
            rnd = self._round
            if viewer is not None:
                sampled: Any = len(rnd.sampled) if rnd is not None else 0
                mine = {"client_id": viewer,
                        "sampled": rnd is not None and viewer in rnd.sampled,
                        "sent": rnd is not None and viewer in rnd.received}
            else:
                sampled = sorted(rnd.sampled) if rnd is not None else []
                mine = None
            out = {
                "mode": "sync",
                "state": self.phase,
                "round": rnd.number if rnd is not None else self.state.version,
                "version": self.state.version,
                "rounds": self.rounds,
                "registered": len(self._clients),
                "active": sum(1 for c in self._clients if c.online and not c.dropped),
                "sampled": sampled,
                "received": len(rnd.received) if rnd is not None else 0,
                "failures": self.failures[-10:],
                "short_rounds": self.short_rounds,
                "min_results": self.min_results,
                "strategy": self.strategy.name,
                **({} if self.budget is None else {
                    **self.budget.record(self.state.version),
                    "dp_accountant": self.budget.describe()}),
                "history": [
                    {k: v for k, v in h.items()
                     if k in ("round", "accuracy", "loss") or k.startswith("fed_")}
                    for h in self.history
                ],
            }
            if rnd is not None and rnd.secagg is not None:
                out["secagg"] = rnd.secagg.describe()
            if mine is not None:
                out["you"] = mine
            return out

    def run_length(self) -> dict[str, Any]:
        """``{"rounds": R}``."""
        return {"rounds": self.config.rounds}

    def summary_fields(self) -> dict[str, Any]:
        """The strategy, the rounds run, the most clients in one, the median round time."""
        history = self.history
        return {"strategy": self.config.strategy, "rounds": len(history),
                "clients": max((h.get("clients", 0) for h in history), default=0),
                "median_round_seconds": median([h["seconds"] for h in history[1:]
                                                if h.get("seconds")])}

    def report_title(self) -> str:
        """``federated (STRATEGY): TASK``."""
        return f"federated ({self.config.strategy}): {self.task_name}"

    def resume_point(self) -> str:
        """``round N``."""
        return f"round {self.state.version}"

    @property
    def weights(self) -> Weights:
        """The current global model."""
        with self._lock:
            return self.state.weights
