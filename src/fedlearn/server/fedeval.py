"""Federated evaluation: clients evaluate a global model on their own test data.

Shared by the sync and async coordinators (which lock around every call). An
evaluation is opened for a model version with the clients asked to take
part; each gets an ``evaluate`` task when it next polls, answers with its
metrics and example count, and the evaluation is complete when all have
answered or its deadline passed. The result is the example-weighted mean of
each metric, prefixed ``fed_`` (``fed_loss``, ``fed_accuracy``, ...), with
``fed_clients`` and ``fed_examples``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedlearn.errors import ConflictError
from fedlearn.metrics import weighted_means


@dataclass
class _Evaluation:
    key: int
    version: int
    clients: frozenset[str]
    deadline: float
    results: dict[str, tuple[dict[str, float], int]] = field(default_factory=dict)


class FedEval:
    """Open federated evaluations, by key (the round, or the async update number)."""

    def __init__(self, clock: Callable[[], float], timeout: float) -> None:
        self.clock = clock
        self.timeout = timeout
        self._open: dict[int, _Evaluation] = {}
        self._held: dict[int, dict[str, Any]] = {}  # committed records waiting for results
        self._early: dict[int, dict[str, Any]] = {}  # results that came before their record

    def start(self, key: int, version: int, clients: list[str]) -> None:
        """Ask ``clients`` to evaluate model ``version``; the result is filed under ``key``."""
        self._open[key] = _Evaluation(key, version, frozenset(clients),
                                      self.clock() + self.timeout)

    def is_open(self, key: int) -> bool:
        """True while evaluation ``key`` waits for answers."""
        return key in self._open

    def task_for(self, client_id: str) -> tuple[int, int] | None:
        """(key, version) of an evaluation this client owes, oldest first; None if none."""
        for ev in sorted(self._open.values(), key=lambda e: e.key):
            if client_id in ev.clients and client_id not in ev.results:
                return ev.key, ev.version
        return None

    def submit(self, client_id: str, key: int, metrics: dict[str, float], examples: int) -> None:
        """One client's answer to evaluation ``key``."""
        ev = self._open.get(key)
        if ev is None or client_id not in ev.clients:
            raise ConflictError(f"no evaluation {key} is open for client {client_id}; fetch a "
                                "new task.")
        if client_id in ev.results:
            return  # a replay: the first answer stands
        ev.results[client_id] = (dict(metrics), int(examples))

    def forget(self, client_id: str) -> None:
        """Stop waiting for ``client_id`` (it dropped out)."""
        for ev in self._open.values():
            if client_id in ev.clients and client_id not in ev.results:
                ev.clients = ev.clients - {client_id}

    def finished(self) -> list[tuple[int, dict[str, Any]]]:
        """Close every evaluation that is complete or past its deadline: (key, fed metrics)."""
        now = self.clock()
        done = [ev for ev in self._open.values()
                if len(ev.results) >= len(ev.clients) or now >= ev.deadline]
        out = []
        for ev in sorted(done, key=lambda e: e.key):
            del self._open[ev.key]
            means = weighted_means(list(ev.results.values()))
            record: dict[str, Any] = {f"fed_{k}": v for k, v in means.items()}
            record["fed_clients"] = sum(1 for _, n in ev.results.values() if n > 0)
            record["fed_examples"] = sum(n for _, n in ev.results.values())
            out.append((ev.key, record))
        return out

    def hold(self, key: int, record: dict[str, Any]) -> None:
        """Keep a committed record until its evaluation (if any is open) is over."""
        self._held[key] = {**record, **self._early.pop(key, {})}

    def merge_finished(self) -> list[dict[str, Any]]:
        """Close finished evaluations into their held records; the records that changed."""
        changed = []
        for key, fed in self.finished():
            if key in self._held:
                self._held[key] = {**self._held[key], **fed}
                changed.append(self._held[key])
            else:  # the record is not committed yet: hold() merges these
                self._early[key] = fed
        return changed

    def ready(self) -> list[dict[str, Any]]:
        """Held records whose evaluation is over, oldest first (none past an open one)."""
        out = []
        while self._held:
            key = min(self._held)
            if key in self._open:
                break
            out.append(self._held.pop(key))
        return out

    @property
    def holding(self) -> bool:
        """True while a committed record waits for its evaluation."""
        return bool(self._held)

    def seconds_to_deadline(self) -> float | None:
        """Seconds until the earliest open evaluation's deadline (None when none is open)."""
        if not self._open:
            return None
        return max(0.0, min(ev.deadline for ev in self._open.values()) - self.clock())

    def __len__(self) -> int:
        return len(self._open)
