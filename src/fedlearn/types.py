"""Core value types shared by every layer (numpy only, no torch, no web code)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

#: Model weights or a delta between two sets of weights: ``state_dict`` names to arrays.
Weights = dict[str, npt.NDArray[np.floating]]


@dataclass(frozen=True)
class ClientResult:
    """What one client's local training produces.

    ``delta`` is the client's weights minus the weights it started from,
    ``num_examples`` the number of examples it trained on (one pass counts each
    example once), ``base_version`` the round or model version it started from.
    """

    delta: Weights
    num_examples: int
    base_version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and mean cross-entropy loss of a model on a set of examples."""

    accuracy: float
    loss: float
    num_examples: int
