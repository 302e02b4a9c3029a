"""Asynchronous federation with no web code: clock, evaluator and store are passed in.

No rounds: a client polls, gets ``train`` with the current version at once,
pulls the model, trains and pushes its delta with the version it started
from; :meth:`AsyncCoordinator.submit` merges it with the run's policy
(:mod:`fedlearn.strategies.async_policies`) as it arrives.

Many readers, one writer: merges are serialised by one lock, held only to
check the update and fold it in. Every version's weights are an immutable
:class:`Snapshot`, so :meth:`~AsyncCoordinator.model_bytes` reads a reference
and never waits for a merge. Evaluation and checkpoints run outside the lock,
in :meth:`~AsyncCoordinator.step`, which the app's driver calls from a worker
thread: due ones are queued (with a snapshot of the state) as updates arrive.

The run waits for ``min_clients`` clients before the first task (as a sync
run waits before round 1, so a run's clock starts when its clients are
there; an update that arrives first is merged and starts it), then stops
after ``max_updates`` merged updates or ``max_seconds`` of training,
whichever comes first. The last state is always evaluated and
checkpointed. A fedbuff buffer not yet applied is lost in a crash; nothing
checkpointed is.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

from fedlearn.config import ServerConfig, TrainConfig
from fedlearn.errors import ConflictError, PayloadError
from fedlearn.seeding import derive_seed
from fedlearn.server.async_types import (
    DONE,
    WAIT,
    AsyncTask,
    Due,
    Merged,
    Snapshot,
)
from fedlearn.server.coordinator_base import Coordinator
from fedlearn.server.store import Store
from fedlearn.server.sync_types import Evaluator, eval_record
from fedlearn.strategies import sample_clients
from fedlearn.strategies.async_policies import AsyncState, make_policy
from fedlearn.types import Weights
from fedlearn.weights import check, check_delta, unusable

log = logging.getLogger("fedlearn.server")

__all__ = ["DONE", "WAIT", "AsyncCoordinator", "AsyncTask", "Merged", "Snapshot"]

#: The meta key of the counters saved with each checkpoint.
META_KEY = "async_state"


class AsyncCoordinator(Coordinator):
    """Merges updates as they arrive until ``max_updates`` or ``max_seconds`` (see module doc)."""

    mode: ClassVar[str] = "async"
    update_query: ClassVar[str] = "version"
    update_requires: ClassVar[tuple[str, ...]] = ("task_id",)
    _answers: OrderedDict[str, Merged]
    #: clients are mid-training when the run stops; each hears "done" at its next poll
    done_grace_seconds: ClassVar[float] = 45.0

    def __init__(
        self,
        config: ServerConfig,
        initial: Weights,
        *,
        store: Store,
        evaluator: Evaluator | None,
        train_config: TrainConfig | None = None,
        task_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        on_merge: Callable[[Merged], None] | None = None,
    ) -> None:
        super().__init__(config, initial, store=store, evaluator=evaluator,
                         train_config=train_config, task_name=task_name, clock=clock,
                         on_change=on_change, on_round=on_round,
                         eval_timeout=min(config.round_timeout, 120.0))
        #: Called under the writer lock with each accepted update, in order; keep it quick.
        self.on_merge = on_merge or (lambda merged: None)
        self.policy = make_policy(config.async_policy, alpha=config.async_alpha,
                                  staleness_fn=config.staleness_fn,
                                  server_lr=config.async_server_lr)
        self._open: dict[str, AsyncTask] = {}  # each client's one open train task
        self._tasks: dict[str, int] = {}  # train tasks handed to each client (seeds)
        self._staleness_sum = 0
        self._last_staleness = 0
        self._elapsed = 0.0  # seconds of training before this process
        resumed = store.latest_checkpoint()
        # The counters saved with that very checkpoint (an older one may be used
        # when the newest is damaged).
        saved = None if resumed is None else store.get_meta(f"{META_KEY}:{resumed[0]}",
                                                             store.get_meta(META_KEY))
        if isinstance(saved, dict) and resumed is not None and saved.get("updates") not in (
                None, resumed[0]):
            saved = None
        restored = resumed is not None and isinstance(saved, dict)
        if resumed is not None and isinstance(saved, dict):
            key, weights = resumed
            check(weights, self.spec)
            store.truncate_rounds(key)
            self.state = AsyncState(
                weights=weights, version=int(saved["version"]), updates=key,
                absorbed_examples=int(saved["absorbed_examples"]),
            )
            self._staleness_sum = int(saved["staleness_sum"])
            self._elapsed = float(saved["seconds"])
            self._tasks = {str(k): int(v) for k, v in saved["tasks"].items()}
        else:
            store.truncate_rounds(0)  # records before the first checkpoint are redone
            self.state = AsyncState(weights={k: v.copy() for k, v in initial.items()})
        self._snapshot = Snapshot(self.state.version, self.state.weights)
        self.history: list[dict[str, Any]] = store.rounds()
        self.phase = "waiting"  # -> training -> stopping -> done
        self._started: float | None = None
        self._due: list[Due] = []
        self._committing = False
        self._save_due = False
        # (updates, version) last queued for evaluation and for a checkpoint
        here = (self.state.updates, self.state.version)
        last = self.history[-1] if self.history else {}
        self._evaluated = (last.get("update", -1), last.get("version", -1))
        self._saved = here if restored else (-1, -1)
        if self._limit_reached_locked():
            self.phase = "done"

    # -- clients ----------------------------------------------------------------
    def _registered_locked(self) -> None:
        self._maybe_start_locked()

    # -- tasks and model --------------------------------------------------------
    def poll(self, client_id: str) -> AsyncTask:
        """``train`` at once while the run goes on; ``wait`` before it starts; then ``done``."""
        with self._lock:
            before = self.phase
            client = self._clients[client_id]
            changed = not client.online
            client.online, client.last_seen = True, self.clock()
            self._maybe_start_locked()
            self._check_time_locked()
            owed = self.fed_eval.task_for(client_id)
            if owed is not None and self.phase != "done":
                # Evaluate the model current now (it may have moved on since the
                # evaluation was asked for: asynchronous runs never stand still).
                task = AsyncTask("evaluate", self.state.version, 0, f"e{owed[0]}.{client_id}",
                                 round=owed[0])
            elif self.phase in ("stopping", "done"):
                task = DONE
            elif self.phase == "waiting":
                task = WAIT
            elif client_id in self._open:
                # At most one open task per client: asking again gets the same one.
                task = replace(self._open[client_id], version=self.state.version)
            else:
                count = self._tasks.get(client_id, 0) + 1
                self._tasks[client_id] = count
                seed = derive_seed("async-task", self.config.seed, client_id, count)
                task = AsyncTask("train", self.state.version, seed,
                                 f"u{count}.{client_id}", self.train_config.as_dict())
                self._open[client_id] = task
            changed = changed or self.phase != before
        if changed:
            self.on_change()
        return task

    def model_bytes(self) -> tuple[bytes, int]:
        """The current global model as safetensors bytes and its version (never waits)."""
        snap = self._snapshot
        return snap.encoded(), snap.version

    # -- updates ----------------------------------------------------------------
    def submit(
        self,
        client_id: str,
        version: int,
        delta: Weights,
        num_examples: int,
        metrics: dict[str, float] | None = None,
        task_id: str | None = None,
    ) -> Merged:
        """Merge one delta trained from ``version``; ConflictError if it cannot be taken.

        With ``task_id`` the update must answer the client's open task; a replay of an
        accepted one gets the original answer and changes nothing (exactly once).
        """
        key = f"{client_id}/{task_id}"
        with self._lock:
            if task_id is not None and key in self._answers:
                return self._answers[key]
        check(delta, self.spec)
        if num_examples < 1:
            raise PayloadError(f"num_examples must be at least 1, got {num_examples}.")
        if version < 0:
            raise PayloadError(f"version must be 0 or more, got {version}.")
        check_delta(delta, self.state.weights, self.norm_limit)
        with self._lock:
            if task_id is not None and key in self._answers:
                return self._answers[key]
            open_task = self._open.get(client_id)
            if task_id is not None and (open_task is None or open_task.task_id != task_id):
                raise ConflictError(f"task {task_id} is not this client's open task; fetch a "
                                    "new task.")
            self._clients[client_id].online = True
            self._maybe_start_locked()
            self._check_time_locked()
            if self.phase in ("stopping", "done"):
                raise ConflictError("the run is over; no more updates are taken.")
            if self.phase == "waiting":
                # Only tasks wait for min_clients: a client still holding a valid
                # base (after a server restart) is not turned away.
                self.phase, self._started = "training", self.clock()
            state = self.state
            if version > state.version:
                raise ConflictError(
                    f"the update claims version {version} but the global model is at version "
                    f"{state.version}; fetch the model again."
                )
            staleness = state.version - version
            limit = self.config.max_staleness
            if limit is not None and staleness > limit:
                raise ConflictError(
                    f"the update from version {version} is {staleness} versions stale, over "
                    f"--max-staleness {limit}; fetch the model again."
                )
            new = self.policy.merge(state, delta, num_examples, staleness)
            problem = unusable(new.weights)
            if problem is not None:
                log.warning("an update from %s was refused: merging it makes the model "
                            "unusable (%s)", client_id, problem)
                raise ConflictError(f"merging this update would make the global model unusable "
                                    f"({problem}); it was refused and the model kept.")
            self._open.pop(client_id, None)  # the update answers the client's open task
            self._staleness_sum += staleness
            self._last_staleness = staleness
            self._set_state_locked(new)
            merged = Merged(new.updates, client_id, version, staleness, num_examples,
                            new.version)
            if task_id is not None:
                self._remember(key, merged)
            self.on_merge(merged)
            self._schedule_locked()
            if self._limit_reached_locked():
                self._stop_locked()
        self.on_change()
        return merged

    def receive_update(self, client_id: str, number: int, delta: Weights, num_examples: int,
                       metrics: dict[str, float], task_id: str | None) -> dict[str, Any]:
        """:meth:`submit` of a delta trained from version ``number``; the answer."""
        merged = self.submit(client_id, number, delta, num_examples, metrics, task_id)
        return {"accepted": True, "version": number, "update": merged.update,
                "staleness": merged.staleness, "server_version": merged.version}

    def withdraw(self, client_id: str, task_id: str, reason: str = "") -> None:
        """The client gives up its open task (its next poll gets a new one)."""
        with self._lock:
            open_task = self._open.get(client_id)
            if open_task is None or open_task.task_id != task_id:
                raise ConflictError(f"task {task_id} is not this client's open task; fetch a "
                                    "new task.")
            del self._open[client_id]
        log.info("client %s withdrew task %s%s", client_id, task_id,
                 f" ({reason})" if reason else "")
        self.on_change()

    def _set_state_locked(self, new: AsyncState) -> None:
        if new.version != self.state.version:
            self._snapshot = Snapshot(new.version, new.weights)
        self.state = new

    # -- the stop rule, evaluation and checkpoints ------------------------------
    def seconds(self) -> float:
        """Seconds of training so far (across resumes)."""
        started = self._started
        return self._elapsed + (0.0 if started is None else self.clock() - started)

    def _maybe_start_locked(self) -> None:
        if self.phase != "waiting":
            return
        online = sum(1 for c in self._clients if c.online)
        if online >= self.config.min_clients:
            self.phase = "training"
            self._started = self.clock()

    def _limit_reached_locked(self) -> bool:
        cfg = self.config
        if cfg.max_updates is not None and self.state.updates >= cfg.max_updates:
            return True
        return cfg.max_seconds is not None and self.seconds() >= cfg.max_seconds

    def _check_time_locked(self) -> None:
        if self.phase == "training" and self._limit_reached_locked():
            self._stop_locked()

    def _schedule_locked(self, final: bool = False) -> None:
        """Queue the evaluation and checkpoint due at the current state, if any.

        ``final``: the run stopped, so the state is evaluated and saved unless
        that was already queued for this very state.
        """
        state = self.state
        cfg = self.config
        if state.updates % cfg.save_every == 0:
            self._save_due = True
        here = (state.updates, state.version)
        evaluate = (final or state.updates % cfg.eval_every == 0) and here != self._evaluated
        # A checkpoint holds the model only: wait until fedbuff's buffer is empty.
        save = ((final or self._save_due) and state.buffered == 0 and here != self._saved)
        if not (evaluate or save):
            return
        if evaluate:
            self._evaluated = here
            self._start_evaluation_locked(state.updates)
        if save:
            self._saved, self._save_due = here, False
        seconds = self.seconds()
        meta = {
            "version": state.version, "updates": state.updates,
            "absorbed_examples": state.absorbed_examples, "staleness_sum": self._staleness_sum,
            "seconds": seconds, "tasks": dict(self._tasks),
        }
        self._due.append(Due(
            state, evaluate, save, seconds, self._last_staleness,
            self._staleness_sum / state.updates if state.updates else 0.0, meta,
        ))

    def _start_evaluation_locked(self, key: int) -> None:
        """Ask online clients with test data (an ``--eval-fraction`` of them) to evaluate."""
        cfg = self.config
        able = [c.client_id for c in self._clients
                if c.online and (c.num_test_examples or 0) > 0]
        if not able:
            return
        fraction = cfg.eval_fraction if cfg.eval_fraction is not None else cfg.fraction
        chosen = sample_clients(able, fraction, seed=cfg.seed ^ 0x5EED, round_number=key)
        self.fed_eval.start(key, self.state.version, chosen)

    def _stop_locked(self) -> None:
        if self.phase in ("stopping", "done"):
            return
        if self._started is not None:
            self._elapsed, self._started = self.seconds(), None
        self._set_state_locked(self.policy.flush(self.state))
        self.phase = "stopping"
        self._schedule_locked(final=True)

    def seconds_to_deadline(self) -> float | None:
        """Seconds until ``max_seconds`` is up or an evaluation's deadline (None if neither)."""
        with self._lock:
            waits = [self.fed_eval.seconds_to_deadline()]
            if self.phase == "training" and self.config.max_seconds is not None:
                waits.append(max(0.0, self.config.max_seconds - self.seconds()))
            found = [w for w in waits if w is not None]
            return min(found) if found else None

    def step(self) -> bool:
        """Start, stop, evaluate or checkpoint whatever is due. True if it did something."""
        with self._lock:
            before = self.phase
            self._maybe_start_locked()
            self._check_time_locked()
            changed = self.phase != before
        if changed:
            self.on_change()
        did = self._commit_due() or changed
        with self._lock:
            changed_records = self.fed_eval.merge_finished()
        for record in changed_records:
            self.store.update_round(record, key=record["update"])
        did = self._emit_ready() or did
        with self._lock:
            finished = (self.phase == "stopping" and not self._due and not self._committing
                        and not self.fed_eval.holding and not len(self.fed_eval))
            if finished:
                self.phase = "done"
        if finished:
            self.on_change()
        return did or finished

    def _commit_due(self) -> bool:
        """Evaluate and commit queued states, oldest first; True if any was committed."""
        did = False
        while True:
            with self._lock:
                if not self._due or self._committing:
                    return did
                self._committing = True
                due = self._due[0]
            try:
                self._commit_one(due)
                did = True
            finally:
                with self._lock:
                    self._committing = False

    def _commit_one(self, due: Due) -> None:
        state = due.state
        record: dict[str, Any] | None = None
        if due.evaluate:
            result = self.evaluator(state.weights) if self.evaluator is not None else None
            record = {
                "update": state.updates, "version": state.version,
                **eval_record(result), "seconds": due.seconds,
                "staleness": due.staleness, "mean_staleness": due.mean_staleness,
                "examples": state.absorbed_examples, "buffered": state.buffered,
                "clients": len(self._clients),
            }
        self.store.commit_round(
            record, state.weights if due.save else None,
            {META_KEY: due.meta, f"{META_KEY}:{state.updates}": due.meta} if due.save else {},
            key=state.updates,
        )
        with self._lock:
            self._due.pop(0)
            if record is not None:
                self.fed_eval.hold(state.updates, record)
        self._emit_ready()
        self.on_change()

    def _emit_ready(self) -> bool:
        """Hand records whose federated evaluation is over to ``on_round``, in order."""
        with self._lock:
            ready = self.fed_eval.ready()
            for record in ready:
                # A final fedbuff flush re-evaluates the last update's number.
                if self.history and self.history[-1].get("update") == record["update"]:
                    self.history[-1] = record
                else:
                    self.history.append(record)
        for record in ready:
            self.on_round(record)
        return bool(ready)

    # -- status -----------------------------------------------------------------
    def status(self, viewer: str | None = None) -> dict[str, Any]:
        """A JSON-able snapshot for ``GET /api/status`` (no client ids are listed)."""
        with self._lock:
            state = self.state
            return {
                "mode": "async",
                "state": self.phase,
                "policy": self.config.async_policy,
                "version": state.version,
                "updates": state.updates,
                "buffered": state.buffered,
                "max_updates": self.config.max_updates,
                "max_seconds": self.config.max_seconds,
                "seconds": self.seconds(),
                "mean_staleness": self.mean_staleness,
                "registered": len(self._clients),
                "active": sum(1 for c in self._clients if c.online),
                "history": [
                    {k: h.get(k) for k in ("update", "version", "accuracy", "loss")}
                    for h in self.history
                ],
            }

    @property
    def mean_staleness(self) -> float:
        """Mean staleness of the updates merged so far (0 before the first)."""
        updates = self.state.updates
        return self._staleness_sum / updates if updates else 0.0

    def run_length(self) -> dict[str, Any]:
        """No rounds; the stop rule and the policy."""
        cfg = self.config
        return {"rounds": 0, "max_updates": cfg.max_updates, "max_seconds": cfg.max_seconds,
                "policy": cfg.async_policy}

    def summary_fields(self) -> dict[str, Any]:
        """The policy, updates and versions, clients, mean staleness, training time."""
        return {"policy": self.config.async_policy, "updates": self.state.updates,
                "versions": self.state.version, "clients": len(self._clients),
                "mean_staleness": self.mean_staleness, "training_seconds": self.seconds()}

    def report_title(self) -> str:
        """``federated async (POLICY): TASK``."""
        return f"federated async ({self.config.async_policy}): {self.task_name}"

    def resume_point(self) -> str:
        """``update U, version V``."""
        return f"update {self.state.updates}, version {self.state.version}"

    @property
    def weights(self) -> Weights:
        """The current global model (read-only arrays)."""
        return self._snapshot.weights
