"""The values an :class:`~fedlearn.server.async_coordinator.AsyncCoordinator` hands out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedlearn.strategies.async_policies import AsyncState
from fedlearn.types import Weights
from fedlearn.weights import encode


@dataclass(frozen=True)
class AsyncTask:
    """A client's next step: ``train`` from ``version`` with ``seed``, ``wait`` or ``done``.

    ``config`` is the training configuration the client should use.
    """

    action: str
    version: int = 0
    seed: int = 0
    task_id: str = ""
    config: dict[str, Any] | None = None
    round: int = 0  # evaluate tasks: the evaluation's key (the update it was asked at)

    def to_json(self) -> dict[str, Any]:
        """The JSON body sent to the client."""
        if self.action == "evaluate":
            return {"action": "evaluate", "round": self.round, "version": self.version,
                    "task_id": self.task_id}
        if self.action != "train":
            return {"action": self.action}
        return {"action": "train", "version": self.version, "seed": self.seed,
                "task_id": self.task_id, "config": self.config or {}}


WAIT = AsyncTask("wait")
DONE = AsyncTask("done")


@dataclass(frozen=True)
class Merged:
    """One accepted update: what :meth:`AsyncCoordinator.submit` returns and ``on_merge`` gets.

    ``update`` is its number (1-based, in the order accepted) and ``version``
    the global model's version after it.
    """

    update: int
    client_id: str
    base_version: int
    staleness: int
    num_examples: int
    version: int


class Snapshot:
    """One version of the global model: read-only arrays, encoded on first read."""

    __slots__ = ("_data", "version", "weights")

    def __init__(self, version: int, weights: Weights) -> None:
        for v in weights.values():
            v.flags.writeable = False
        self.version = version
        self.weights = weights
        self._data: bytes | None = None

    def encoded(self) -> bytes:
        """The weights as safetensors bytes (two readers racing both encode; no harm)."""
        data = self._data
        if data is None:
            data = self._data = encode(self.weights)
        return data


@dataclass(frozen=True)
class Due:
    """An evaluation and/or checkpoint to do outside the lock, of this state."""

    state: AsyncState
    evaluate: bool
    save: bool
    seconds: float
    staleness: int
    mean_staleness: float
    meta: dict[str, Any]
