"""The values a :class:`~fedlearn.server.coordinator.SyncCoordinator` hands out and takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedlearn.types import EvalResult, Weights

#: Evaluates a state on the server's test data (None: the server has none).
Evaluator = Callable[[Weights], EvalResult]


def eval_record(result: EvalResult | None) -> dict[str, Any]:
    """A server evaluation as record fields (``accuracy``, ``loss``, other metrics)."""
    return {} if result is None else dict(result.metrics)


@dataclass(frozen=True)
class Task:
    """What a client should do next: ``train``, ``evaluate``, ``wait`` or ``done``.

    ``task_id`` names the task; an update or evaluation names it back.
    ``config`` is the round's training configuration (train tasks only);
    ``secagg`` what a client needs to mask its update under secure aggregation.
    """

    action: str
    round: int = 0
    version: int = 0
    seed: int = 0
    task_id: str = ""
    config: dict[str, Any] | None = None
    secagg: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON body sent to the client."""
        if self.action not in ("train", "evaluate"):
            return {"action": self.action}
        body: dict[str, Any] = {"action": self.action, "round": self.round,
                                "version": self.version, "task_id": self.task_id}
        if self.action == "train":
            body["seed"] = self.seed
            body["config"] = self.config or {}
            if self.secagg is not None:
                body["secagg"] = self.secagg
        return body


WAIT = Task("wait")
DONE = Task("done")
