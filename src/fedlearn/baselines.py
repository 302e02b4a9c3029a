"""The two baselines federation is judged against, for any task.

* centralized: one model trained on all the training data;
* local: each client trains alone on its own data (no federation).

Both train through :class:`~fedlearn.training.Trainer` (the built-in loop keeps
one optimizer across epochs) and write a run directory. Each is evaluated
on the task's test data when it has some, else on the local test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fedlearn.config import TrainConfig
from fedlearn.models import get_weights
from fedlearn.runs import RunDir, final_metrics
from fedlearn.tasks.base import ClientData, Data, Task
from fedlearn.training import Shard, Trainer, initial_state, make_optimizer, train_epochs
from fedlearn.types import Weights

if TYPE_CHECKING:
    from fedlearn.privacy.dpsgd import DPSGD

EpochHook = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ClientRow:
    """One row of the local-only table."""

    client: int
    examples: int
    train_accuracy: float
    test_accuracy: float
    test_loss: float
    metrics: dict[str, float]


class _Learner:
    """One model trained epoch by epoch (one optimizer across epochs in the built-in loop)."""

    def __init__(self, task: Task, config: TrainConfig, seed: int, device: str,
                 dp_sgd: DPSGD | None = None) -> None:
        self.trainer = Trainer(task, seed=seed, device=device, dp_sgd=dp_sgd)
        self.config = config
        self.task = task
        self.weights: Weights = initial_state(task, seed)
        self.opt = None
        # DP-SGD makes its private optimizer each epoch (the ledger composes across them).
        if task.train is None and self.trainer.model is not None and dp_sgd is None:
            self.opt = make_optimizer(self.trainer.model, config, task)

    def epoch(self, data: Shard, seed: int) -> dict[str, float]:
        one = replace(self.config, epochs=1)
        model = self.trainer.model
        if self.opt is not None and model is not None:
            loss, acc = train_epochs(model, data, one, seed=seed, optimizer=self.opt,
                                     loss=self.trainer.loss,
                                     classification=self.task.kind == "classification",
                                     device=self.trainer.device)
            self.weights = get_weights(model)
            out = {"train_loss": loss}
            if self.task.kind == "classification":
                out["train_accuracy"] = acc
            return out
        result = self.trainer.fit(self.weights, data, one, seed=seed)
        self.weights = {k: v + result.delta[k] for k, v in self.weights.items()}
        return {k: v for k, v in result.metrics.items() if k != "seconds"}

    def evaluate(self, test: Shard | None) -> dict[str, float]:
        return {} if test is None else dict(self.trainer.evaluate(self.weights, test).metrics)


def _test_of(test: Data | None, local: ClientData) -> Shard | None:
    data = test if test is not None else local.test
    return Shard.of(data) if data is not None and len(data) else None


def run_centralized(
    task: Task, data: ClientData, test: Data | None, config: TrainConfig, run: RunDir, *,
    seed: int = 0, device: str = "cpu", on_epoch: EpochHook | None = None,
    describe: dict[str, Any] | None = None, dp_sgd: DPSGD | None = None,
) -> dict[str, Any]:
    """Train one model on ``data.train``; evaluate each epoch on ``test`` (else ``data.test``).

    ``describe`` adds fields to the summary (e.g. the dataset and model names);
    ``dp_sgd`` trains with DP-SGD and records ε per epoch.
    """
    started = time.perf_counter()
    learner = _Learner(task, config, seed, device, dp_sgd)
    train = Shard.of(data.train)
    test_shard = _test_of(test, data)
    history: list[dict[str, Any]] = []
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        trained = learner.epoch(train, seed * 100_003 + epoch)
        record = {"round": epoch, "epoch": epoch, **learner.evaluate(test_shard), **trained,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        run.append_metrics(record)
        if on_epoch is not None:
            on_epoch(record)
    run.save_model(learner.weights)
    summary = {
        "mode": "centralized", "task": task.name, **(describe or {}), "rounds": config.epochs,
        **final_metrics(history), "wall_seconds": time.perf_counter() - started,
        "train_examples": len(data.train),
    }
    run.write_summary(summary)
    run.write_report(f"centralized: {task.name}")
    return summary


def run_local(
    task: Task, clients: list[ClientData], test: Data | None, config: TrainConfig,
    run: RunDir, *, seed: int = 0, device: str = "cpu", on_epoch: EpochHook | None = None,
    describe: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[ClientRow]]:
    """Each client trains alone on its own data; one row per client."""
    started = time.perf_counter()
    rows: list[ClientRow] = []
    for cid, local in enumerate(clients):
        learner = _Learner(task, config, seed, device)
        shard = Shard.of(local.train)
        test_shard = _test_of(test, local)
        trained: dict[str, float] = {}
        metrics: dict[str, float] = {}
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            trained = learner.epoch(shard, (seed * 1_000 + cid) * 100_003 + epoch)
            metrics = learner.evaluate(test_shard)
            record = {"client": cid, "round": epoch, "epoch": epoch, **metrics, **trained,
                      "examples": len(shard), "seconds": time.perf_counter() - t0}
            run.append_metrics(record)
            if on_epoch is not None:
                on_epoch(record)
        rows.append(ClientRow(cid, len(shard), trained.get("train_accuracy", float("nan")),
                              metrics.get("accuracy", float("nan")),
                              metrics.get("loss", float("nan")), metrics))
        run.save_model(learner.weights, name=f"client-{cid}.safetensors")
        if cid == 0:
            run.save_model(learner.weights)
    means = {f"final_{k}": sum(r.metrics.get(k, 0.0) for r in rows) / len(rows)
             for k in rows[0].metrics} if rows else {}
    summary = {
        "mode": "local", "task": task.name, **(describe or {}), "clients": len(clients),
        "rounds": config.epochs, **means, "wall_seconds": time.perf_counter() - started,
        "per_client": [{"client": r.client, "examples": r.examples, **r.metrics}
                       for r in rows],
    }
    run.write_summary(summary)
    run.write_report(f"local only: {len(clients)} clients, {task.name}")
    return summary, rows
