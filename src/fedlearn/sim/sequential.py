"""The reference engine: one client after another, through ``local_update``.

Works with any model and optimizer, and is exactly what an HTTP client does
with its task, minus the network.
"""

from __future__ import annotations

import torch
from torch import nn

from fedlearn.config import TrainConfig
from fedlearn.sim.base import ClientTask, ClientUpdate
from fedlearn.training import Shard, local_update
from fedlearn.types import Weights


class SequentialEngine:
    """Trains each client in turn with :func:`fedlearn.training.local_update`.

    ``model`` is a workspace (its weights are overwritten); ``x`` and ``y`` are
    the whole training set, shared by every client's :class:`Shard`.
    """

    name = "sequential"

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model = model
        self.x = x
        self.y = y

    def train_round(
        self, weights: Weights, clients: list[ClientTask], config: TrainConfig
    ) -> list[ClientUpdate]:
        """Train every client in ``clients`` from ``weights``, one after another."""
        out = []
        for task in clients:
            shard = Shard(self.x, self.y, task.indices)
            result = local_update(self.model, weights, shard, config, seed=task.seed)
            out.append(ClientUpdate(task.client_id, result.delta, result.num_examples))
        return out
