"""What every simulator engine takes and returns, and the protocol it follows.

An engine trains the sampled clients of one round, starting from the same
global weights, and hands back each client's delta and example count; the
round loop in :mod:`fedlearn.sim.engine` does the rest (sampling, the
strategy, evaluation, the run directory). Client data is never copied up front: a
:class:`ClientTask` holds an index array into the one shared training set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedlearn.config import TrainConfig
from fedlearn.errors import ConfigError
from fedlearn.types import ControlVariates, Weights

ENGINES: tuple[str, ...] = ("vectorized", "sequential")
#: Arithmetic the engines train in: float32, or bfloat16 autocast (``torch.autocast``).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    """Raise ConfigError unless ``precision`` is one the engines know."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {precision!r}; choose one of "
                          f"{', '.join(PRECISIONS)}.")


@dataclass(frozen=True)
class ClientTask:
    """One client's work in a round: its id, its rows of the training set, its data seed,
    and SCAFFOLD's control variates when the strategy uses them."""

    client_id: str
    indices: npt.NDArray[np.int64]
    seed: int
    control: ControlVariates | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """One client's result: weights after training minus the weights it started from.

    With SCAFFOLD, ``extra["delta_c"]`` goes to the server and ``control`` is the
    client's new control variate (kept for its next round).
    """

    client_id: str
    delta: Weights
    num_examples: int
    extra: dict[str, Weights] = field(default_factory=dict)
    control: Weights | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    """Trains the clients of one round in-process."""

    name: str

    def train_round(
        self, weights: Weights, clients: list[ClientTask], config: TrainConfig
    ) -> list[ClientUpdate]:
        """Train every client in ``clients`` from ``weights``; one update per client, in order.

        Each client must end exactly where ``fedlearn.training.local_update``
        would take it for the same weights, rows, seed and ``config``.
        """
        ...
