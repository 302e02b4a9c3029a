"""The sync coordinator's side of secure aggregation: taking the stages' messages and
closing the stages on time (the stages themselves live in
:mod:`fedlearn.server.secagg_round`).

:class:`SecAggDriver` is a part of :class:`~fedlearn.server.coordinator.SyncCoordinator`
(a base class of it), kept apart so that the round engine reads without it; it works on
the coordinator's open round, lock and client registry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from fedlearn.errors import ConflictError, PayloadError, SecAggAbortedError
from fedlearn.rounds import RoundFailed
from fedlearn.server.clients import ClientRegistry
from fedlearn.server.sync_round import OpenRound

log = logging.getLogger("fedlearn.server")


class SecAggDriver:
    """The ``/api/secagg`` half of a sync coordinator (see the module doc)."""

    _lock: threading.Lock
    _round: OpenRound | None
    _clients: ClientRegistry
    _closing: bool
    clock: Callable[[], float]
    on_change: Callable[[], None]

    def _fail_round(self, rnd: OpenRound, reason: str) -> None:
        """Record ``rnd`` as failed and run it again (the coordinator's)."""
        raise NotImplementedError

    def secagg_post(self, client_id: str, task_id: str, name: str, body: bytes,
                    num_examples: int | None = None) -> dict[str, Any]:
        """One client's message for a stage of its round's secure aggregation (its
        ``num_examples`` with its keys)."""
        with self._lock:
            rnd = self._secagg_round(client_id, task_id)
            agg = rnd.secagg
            if agg is None:  # pragma: no cover - _secagg_round checks it
                raise ConflictError("this round has no secure aggregation.")
            agg.receive(client_id, name, body, num_examples)
            if name == "advert":  # the client's training is over
                rnd.received.setdefault(client_id, 0)
                complete = len(rnd.received) == len(rnd.sampled)
            else:
                complete = agg.stage_complete()
        if complete:
            self.on_change()
        return {"accepted": True, "round": rnd.number}

    def secagg_fetch(self, client_id: str, task_id: str, name: str) -> dict[str, Any] | None:
        """What a client needs before the stage ``name`` opens, or None until it opens."""
        with self._lock:
            agg = self._secagg_round(client_id, task_id).secagg
            return None if agg is None else agg.fetch(client_id, name)

    def _secagg_round(self, client_id: str, task_id: str) -> OpenRound:
        rnd = self._round
        if rnd is None or rnd.secagg is None or task_id != (
                f"r{rnd.number}.{rnd.attempt}.{client_id}") or client_id not in rnd.sampled:
            raise ConflictError(f"task {task_id} has no open secure aggregation (its round "
                                "closed, failed or was never this client's); fetch a new task.")
        return rnd

    def _secagg_step(self, rnd: OpenRound, now: float, training: bool) -> str:
        """Under the lock: close the training stage or a later one when due; ``wait``,
        ``moved``, ``sum`` or ``abort: REASON``."""
        agg = rnd.secagg
        if agg is None:  # pragma: no cover
            return "wait"
        try:
            if training:
                agg.close_training(now)
                outcome = "moved"
            else:
                outcome = agg.advance(now)
        except SecAggAbortedError as exc:
            outcome = f"abort: secure aggregation aborted: {str(exc).rstrip('.')}"
        if outcome != "wait":
            for cid in agg.missing():
                self._clients[cid].dropped = True
        if outcome == "moved":
            self.on_change()
        elif outcome != "wait":
            self._closing = True
        return outcome

    def _finish_secagg(self, rnd: OpenRound) -> dict[str, Any] | None:
        """Unmask the round's sum (outside the lock) into ``rnd.updates``; the record's
        fields, or None when the round failed (recorded and run again)."""
        if rnd.secagg is None:  # pragma: no cover
            return None
        try:
            rnd.updates, fields = rnd.secagg.finish(self.clock)
        except (SecAggAbortedError, RoundFailed, PayloadError) as exc:
            reason = str(exc).rstrip(".")
            if isinstance(exc, SecAggAbortedError):
                reason = f"secure aggregation aborted: {reason}"
            self._fail_round(rnd, reason)
            return None
        except Exception as exc:  # the stages are spent: this attempt cannot be retried
            log.exception("round %d: unmasking the sum failed", rnd.number)
            self._fail_round(rnd, f"unmasking the sum failed ({type(exc).__name__}: {exc})")
            return None
        except BaseException:
            with self._lock:
                self._closing = False
            raise
        return fields
