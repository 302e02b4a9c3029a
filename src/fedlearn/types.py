"""Core value types shared by every layer (numpy only, no torch, no web code)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

#: A model's state (parameters and buffers, any dtype, 0-d included) or a delta between
#: two states: ``state_dict`` names to arrays.
Weights = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class ClientResult:
    """What one client's local training produces.

    ``delta`` is the client's weights minus the weights it started from,
    ``num_examples`` the number of examples it trained on (one pass counts each
    example once), ``base_version`` the round or model version it started from.
    ``extra`` holds further named deltas sent with ``delta`` (SCAFFOLD:
    ``{"delta_c": ...}``); ``control`` is SCAFFOLD's new client control
    variate, which the client keeps (never sent).
    """

    delta: Weights
    num_examples: int
    base_version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Weights] = field(default_factory=dict)
    control: Weights | None = None


@dataclass(frozen=True)
class ControlVariates:
    """SCAFFOLD's two control variates for one client's local training.

    ``server`` is the server's ``c`` (sent with the task), ``client`` the
    client's own ``c_i`` (kept by the client; zeros before its first round).
    Both cover the model's float arrays.
    """

    server: Weights
    client: Weights


@dataclass(frozen=True)
class EvalResult:
    """A model's metrics on a set of examples: ``loss`` and the task's metrics."""

    metrics: dict[str, float]
    num_examples: int

    @property
    def loss(self) -> float:
        """The mean loss."""
        return float(self.metrics.get("loss", float("nan")))

    @property
    def accuracy(self) -> float | None:
        """The accuracy, when the task measures it."""
        value = self.metrics.get("accuracy")
        return None if value is None else float(value)
