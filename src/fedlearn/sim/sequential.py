"""The reference engines: one client after another.

:class:`SequentialEngine` trains each client through the task's
:class:`~fedlearn.training.Trainer` (any model, loss, optimizer or custom
``train``): exactly what an HTTP client does with its task, minus the network.
:class:`ScriptEngine` runs a client-API script per virtual client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedlearn.config import TrainConfig
from fedlearn.sim.base import ClientTask, ClientUpdate
from fedlearn.tasks.base import DataContext, Task
from fedlearn.types import EvalResult, Weights

if TYPE_CHECKING:
    from fedlearn.client.local import LocalClient
    from fedlearn.privacy.dpsgd import DPLedger
    from fedlearn.training import Trainer


class SequentialEngine:
    """Trains each client in turn with the task's trainer on its rows of ``(x, y)``."""

    name = "sequential"

    def __init__(self, trainer: Trainer | nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        from fedlearn.training import Trainer

        if isinstance(trainer, nn.Module):
            from fedlearn.sim.engine import model_task

            trainer = Trainer(model_task(trainer))
        self.trainer = trainer
        self.x = x
        self.y = y
        #: Each virtual client's DP-SGD ledger (with --dp-sgd), kept across rounds.
        self.ledgers: dict[str, DPLedger] = {}

    def train_round(
        self, weights: Weights, clients: list[ClientTask], config: TrainConfig
    ) -> list[ClientUpdate]:
        """Train every client in ``clients`` from ``weights``, one after another."""
        from fedlearn.training import Shard

        out = []
        for task in clients:
            shard = Shard(self.x, self.y, task.indices)
            ledger = None
            if self.trainer.dp_sgd is not None:
                from fedlearn.privacy.dpsgd import DPLedger

                ledger = self.ledgers.setdefault(task.client_id, DPLedger())
            result = self.trainer.fit(weights, shard, config, seed=task.seed,
                                      control=task.control, ledger=ledger)
            out.append(ClientUpdate(task.client_id, result.delta, result.num_examples,
                                    result.extra, result.control, result.metrics))
        return out


class ScriptEngine:
    """Runs the task's client-API script once per virtual client (started when first sampled)."""

    name = "script"

    def __init__(self, task: Task, contexts: Sequence[DataContext], *, seed: int = 0,
                 device: str = "cpu") -> None:
        self.task = task
        self.contexts = {c.client_id: c for c in contexts}
        self.seed = seed
        self.device = device
        self.clients: dict[str, LocalClient] = {}

    def _client(self, client_id: str) -> LocalClient:
        from fedlearn.client.local import LocalClient

        if client_id not in self.clients:
            self.clients[client_id] = LocalClient(self.task, self.contexts[client_id],
                                                  seed=self.seed, device=self.device)
        return self.clients[client_id]

    def train_round(
        self, weights: Weights, clients: list[ClientTask], config: TrainConfig
    ) -> list[ClientUpdate]:
        """Each sampled client's script trains from ``weights``, one after another."""
        out = []
        for task in clients:
            result = self._client(task.client_id).fit(weights, config, seed=task.seed,
                                                      control=task.control)
            out.append(ClientUpdate(task.client_id, result.delta, result.num_examples))
        return out

    def evaluate(self, client_id: str, weights: Weights, version: int) -> EvalResult:
        """One client's script evaluates ``weights`` on its own test data."""
        return self._client(client_id).evaluate(weights, version=version)

    def close(self) -> None:
        """Stop every script."""
        for client in self.clients.values():
            client.close()
