"""FedAvg: the example-weighted mean of client deltas, applied with a server learning rate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlearn.config import STRATEGIES
from fedlearn.errors import ConfigError
from fedlearn.types import Weights
from fedlearn.weights import RunningSum


@dataclass(frozen=True)
class StrategyState:
    """What a strategy carries from one round to the next: here, the global model."""

    weights: Weights
    version: int = 0


class FedAvg:
    """McMahan et al. 2017: new = global + server_lr * sum(n_i * delta_i) / sum(n_i).

    The caller folds each client's delta into a :class:`~fedlearn.weights.RunningSum`
    weighted by its example count as it arrives, so the server holds one model,
    not one per client.
    """

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ConfigError(f"server learning rate must be positive, got {server_lr}.")
        self.server_lr = server_lr

    def init(self, weights: Weights) -> StrategyState:
        """The state before round 1."""
        return StrategyState(weights={k: v.copy() for k, v in weights.items()}, version=0)

    def apply(self, state: StrategyState, deltas: RunningSum) -> StrategyState:
        """The state after one round whose deltas were summed into ``deltas``."""
        mean = deltas.mean()
        new = {}
        for k, v in state.weights.items():
            step = self.server_lr * mean[k].astype(np.float64)
            # Integer buffers (BatchNorm's counters) move by the rounded mean delta.
            new[k] = (v + (np.rint(step) if v.dtype.kind in "iub" else step)).astype(v.dtype)
        return StrategyState(weights=new, version=state.version + 1)


def make_strategy(name: str, *, server_lr: float = 1.0) -> FedAvg:
    """A strategy by name."""
    if name != "fedavg":
        raise ConfigError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    return FedAvg(server_lr=server_lr)
