"""centralized, local, evaluate and datasets commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedlearn.cli.common import (
    BatchOpt,
    DatasetOpt,
    EpochsOpt,
    LrOpt,
    ModelOpt,
    MomentumOpt,
    OptimizerOpt,
    OutOpt,
    SeedOpt,
    ThreadsOpt,
    WdOpt,
    console,
    pct,
    progress_bar,
    set_threads,
)
from fedlearn.config import TrainConfig


def _train_config(
    epochs: int, batch_size: int, optimizer: str, lr: float, momentum: float, weight_decay: float
) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
        momentum=momentum, weight_decay=weight_decay,
    )


def centralized(
    dataset: DatasetOpt = "fashion-mnist",
    model: ModelOpt = "mlp",
    epochs: EpochsOpt = 5,
    batch_size: BatchOpt = 32,
    optimizer: OptimizerOpt = "adam",
    lr: LrOpt = 1e-3,
    momentum: MomentumOpt = 0.0,
    weight_decay: WdOpt = 0.0,
    seed: SeedOpt = 0,
    out: OutOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Train one model on the whole training set (the centralized baseline)."""
    from fedlearn.baselines import run_centralized
    from fedlearn.data import load_dataset
    from fedlearn.models import build_model
    from fedlearn.runs import RunDir, default_run_dir

    set_threads(threads)
    config = _train_config(epochs, batch_size, optimizer, lr, momentum, weight_decay)
    ds = load_dataset(dataset)
    build_model(model, ds.input_shape, ds.num_classes)  # fail fast on a misfit
    run = RunDir.create(
        out or default_run_dir("centralized"),
        {"mode": "centralized", "dataset": dataset, "model": model, "seed": seed,
         "train": config.__dict__},
    )
    console.print(f"centralized: {model} on {dataset} ({ds.train_size} train, "
                  f"{ds.test_size} test) -> {run.path}")
    with progress_bar("epochs", epochs) as bar:
        def on_epoch(r: dict[str, Any]) -> None:
            bar.advance(f"acc {pct(r['accuracy'])} loss {r['loss']:.4f}")
            console.print(f"epoch {r['epoch']:>3}  test accuracy {pct(r['accuracy'])}  "
                          f"loss {r['loss']:.4f}  ({r['seconds']:.1f}s)")

        summary = run_centralized(ds, model, config, run, seed=seed, on_epoch=on_epoch)
    console.print(f"final test accuracy {pct(summary['final_accuracy'])}, "
                  f"loss {summary['final_loss']:.4f}; run directory {run.path}")


def local(
    dataset: DatasetOpt = "fashion-mnist",
    model: ModelOpt = "mlp",
    clients: Annotated[int, typer.Option("--clients", "-n", help="Number of clients.")] = 6,
    partition: Annotated[
        str, typer.Option("--partition", "-p", help="iid, dirichlet:A, shards:K or range:L-R.")
    ] = "iid",
    epochs: EpochsOpt = 5,
    batch_size: BatchOpt = 32,
    optimizer: OptimizerOpt = "adam",
    lr: LrOpt = 1e-3,
    momentum: MomentumOpt = 0.0,
    weight_decay: WdOpt = 0.0,
    seed: SeedOpt = 0,
    out: OutOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Each client trains alone on its own partition: the no-federation baseline."""
    from fedlearn.baselines import run_local
    from fedlearn.data import load_dataset, parse_partition
    from fedlearn.errors import ConfigError
    from fedlearn.models import build_model
    from fedlearn.runs import RunDir, default_run_dir

    set_threads(threads)
    if clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {clients}.")
    config = _train_config(epochs, batch_size, optimizer, lr, momentum, weight_decay)
    parse_partition(partition)
    ds = load_dataset(dataset)
    build_model(model, ds.input_shape, ds.num_classes)
    run = RunDir.create(
        out or default_run_dir("local"),
        {"mode": "local", "dataset": dataset, "model": model, "seed": seed,
         "clients": clients, "partition": partition, "train": config.__dict__},
    )
    console.print(f"local only: {clients} clients, {model} on {dataset}, "
                  f"partition {partition} -> {run.path}")
    with progress_bar("client epochs", clients * epochs) as bar:
        def on_epoch(r: dict[str, Any]) -> None:
            bar.advance(f"client {r['client']} epoch {r['epoch']} "
                       f"acc {pct(r['accuracy'])}")

        summary, rows = run_local(
            ds, model, config, run, clients=clients, partition_spec=partition,
            seed=seed, on_epoch=on_epoch,
        )
    table = Table(title=f"Each client alone ({epochs} epochs on its own data)")
    table.add_column("client", justify="right")
    table.add_column("examples", justify="right")
    table.add_column("train accuracy", justify="right")
    table.add_column("test accuracy", justify="right")
    for r in rows:
        table.add_row(str(r.client + 1), str(r.examples), pct(r.train_accuracy),
                      pct(r.test_accuracy))
    console.print(table)
    console.print(f"mean test accuracy {pct(summary['final_accuracy'])}; "
                  f"run directory {run.path}")


def evaluate(
    model_file: Annotated[Path, typer.Option("--model-file", "-f", help="A .safetensors file.")],
    dataset: DatasetOpt = "fashion-mnist",
    model: ModelOpt = "mlp",
) -> None:
    """Test accuracy and loss of a saved model."""
    from fedlearn.data import load_dataset
    from fedlearn.models import build_model
    from fedlearn.runs import load_model_file
    from fedlearn.training import Shard
    from fedlearn.training import evaluate as evaluate_model

    ds = load_dataset(dataset)
    net = build_model(model, ds.input_shape, ds.num_classes)
    weights = load_model_file(model_file)
    result = evaluate_model(net, Shard.from_numpy(ds.x_test, ds.y_test), weights)
    console.print(f"{model_file}: test accuracy {pct(result.accuracy)}, loss {result.loss:.4f} "
                  f"on {result.num_examples} {dataset} test images")


datasets_app = typer.Typer(help="List datasets, or fetch one.", no_args_is_help=False)


@datasets_app.callback(invoke_without_command=True)
def datasets_list(ctx: typer.Context) -> None:
    """List each dataset, where it was found (or that it is missing), and its sizes."""
    if ctx.invoked_subcommand is not None:
        return
    from fedlearn.data import DATASETS, status

    table = Table(title="Datasets")
    for col in ("name", "status", "train", "test", "shape", "classes"):
        table.add_column(col, overflow="fold")
    for name in DATASETS:
        s = status(name)
        where = f"[green]{s.found_at}[/]" if s.found_at else "[red]missing[/]"
        table.add_row(name, where, str(s.train_size), str(s.test_size),
                      "x".join(map(str, s.input_shape)), str(s.num_classes))
    console.print(table)


@datasets_app.command("fetch")
def datasets_fetch(name: Annotated[str, typer.Argument(help="Dataset name.")]) -> None:
    """Download a dataset from its official mirror and verify its checksums."""
    from fedlearn.data import fetch

    path = fetch(name, progress=True)
    console.print(f"{name} is ready in {path}")
