"""The two baselines federation is judged against.

* centralized: one model trained on the whole training set;
* local: each client trains alone on its own partition (no federation).

Both call :func:`fedlearn.training.train_epochs`, the routine under
:func:`~fedlearn.training.local_update`, and write a run directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fedlearn.config import TrainConfig
from fedlearn.data import Dataset, partition
from fedlearn.models import build_model, get_weights
from fedlearn.runs import RunDir
from fedlearn.training import Shard, evaluate, make_optimizer, train_epochs

EpochHook = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ClientRow:
    """One row of the local-only table."""

    client: int
    examples: int
    train_accuracy: float
    test_accuracy: float
    test_loss: float


def run_centralized(
    ds: Dataset,
    model_name: str,
    config: TrainConfig,
    run: RunDir,
    *,
    seed: int = 0,
    on_epoch: EpochHook | None = None,
) -> dict[str, Any]:
    """Train one model on all of ``ds``'s training set; evaluate on the test set each epoch."""
    started = time.perf_counter()
    model = build_model(model_name, ds.input_shape, ds.num_classes, seed=seed)
    train = Shard.from_numpy(ds.x_train, ds.y_train)
    test = Shard.from_numpy(ds.x_test, ds.y_test)
    opt = make_optimizer(model, config)
    one = TrainConfig(**{**asdict(config), "epochs": 1})
    last: dict[str, Any] = {}
    # One optimizer across epochs, and one seeded data order per epoch.
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        loss, acc = train_epochs(model, train, one, seed=seed * 100_003 + epoch, optimizer=opt)
        result = evaluate(model, test)
        last = {
            "round": epoch,
            "epoch": epoch,
            "accuracy": result.accuracy,
            "loss": result.loss,
            "train_accuracy": acc,
            "train_loss": loss,
            "seconds": time.perf_counter() - t0,
        }
        run.append_metrics(last)
        if on_epoch is not None:
            on_epoch(last)
    run.save_model(get_weights(model))
    summary = {
        "mode": "centralized",
        "dataset": ds.name,
        "model": model_name,
        "rounds": config.epochs,
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "wall_seconds": time.perf_counter() - started,
        "train_examples": ds.train_size,
    }
    run.write_summary(summary)
    run.write_report(f"centralized: {model_name} on {ds.name}")
    return summary


def run_local(
    ds: Dataset,
    model_name: str,
    config: TrainConfig,
    run: RunDir,
    *,
    clients: int,
    partition_spec: str,
    seed: int = 0,
    on_epoch: EpochHook | None = None,
) -> tuple[dict[str, Any], list[ClientRow]]:
    """Each client trains alone on its own partition; one row per client."""
    started = time.perf_counter()
    parts = partition(ds.y_train, clients, partition_spec, seed)
    test = Shard.from_numpy(ds.x_test, ds.y_test)
    rows: list[ClientRow] = []
    for cid, idx in enumerate(parts):
        model = build_model(model_name, ds.input_shape, ds.num_classes, seed=seed)
        shard = Shard.from_numpy(ds.x_train, ds.y_train, idx)
        opt = make_optimizer(model, config)
        one = TrainConfig(**{**asdict(config), "epochs": 1})
        train_acc = float("nan")
        result = None
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            loss, train_acc = train_epochs(
                model, shard, one, seed=(seed * 1_000 + cid) * 100_003 + epoch, optimizer=opt
            )
            result = evaluate(model, test)
            record = {
                "client": cid,
                "round": epoch,
                "epoch": epoch,
                "accuracy": result.accuracy,
                "loss": result.loss,
                "train_accuracy": train_acc,
                "train_loss": loss,
                "examples": len(shard),
                "seconds": time.perf_counter() - t0,
            }
            run.append_metrics(record)
            if on_epoch is not None:
                on_epoch(record)
        if result is None:  # pragma: no cover - epochs >= 1 is validated
            raise RuntimeError("no epoch ran")
        rows.append(ClientRow(cid, len(shard), train_acc, result.accuracy, result.loss))
        run.save_model(get_weights(model), name=f"client-{cid}.safetensors")
        if cid == 0:
            run.save_model(get_weights(model))
    mean_acc = sum(r.test_accuracy for r in rows) / len(rows)
    mean_loss = sum(r.test_loss for r in rows) / len(rows)
    summary = {
        "mode": "local",
        "dataset": ds.name,
        "model": model_name,
        "clients": clients,
        "partition": partition_spec,
        "rounds": config.epochs,
        "final_accuracy": mean_acc,
        "final_loss": mean_loss,
        "wall_seconds": time.perf_counter() - started,
        "per_client": [asdict(r) for r in rows],
    }
    run.write_summary(summary)
    run.write_report(f"local only: {clients} clients, {model_name} on {ds.name}")
    return summary, rows
