"""centralized, local, evaluate and datasets commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedlearn.cli.common import (
    DEFAULT_DELTA,
    BatchOpt,
    DataOpt,
    DatasetOpt,
    DeviceOpt,
    DPDeltaOpt,
    DPSGDOpt,
    EpochsOpt,
    LabelOpt,
    LrOpt,
    ModelOpt,
    MomentumOpt,
    OptimizerOpt,
    OutOpt,
    SeedOpt,
    TaskOpt,
    TestFractionOpt,
    ThreadsOpt,
    WdOpt,
    check_seed,
    console,
    device_name,
    final_text,
    metrics_text,
    pct,
    progress_bar,
    resolve_task,
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
    task: TaskOpt = None,
    dataset: DatasetOpt = "fashion-mnist",
    model: ModelOpt = "mlp",
    data: DataOpt = None,
    label: LabelOpt = None,
    test_fraction: TestFractionOpt = 0.0,
    epochs: EpochsOpt = 5,
    batch_size: BatchOpt = 32,
    optimizer: OptimizerOpt = "adam",
    lr: LrOpt = 1e-3,
    momentum: MomentumOpt = 0.0,
    weight_decay: WdOpt = 0.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    out: OutOpt = None,
    threads: ThreadsOpt = None,
    dp_sgd: DPSGDOpt = None,
    dp_delta: DPDeltaOpt = DEFAULT_DELTA,
) -> None:
    """Train one model on all the training data (the centralized baseline)."""
    from fedlearn.baselines import run_centralized
    from fedlearn.privacy.dpsgd import parse_dp_sgd
    from fedlearn.runs import RunDir, default_run_dir
    from fedlearn.tasks.runtime import context, load_client_data, server_test_data

    set_threads(threads)
    check_seed(seed)
    private = parse_dp_sgd(dp_sgd, dp_delta)
    config = _train_config(epochs, batch_size, optimizer, lr, momentum, weight_decay)
    the_task, ref = resolve_task(task, dataset, model)
    device = device_name(device)
    local = load_client_data(the_task, context(data=data, label=label, seed=seed,
                                               test_fraction=test_fraction))
    test = server_test_data(the_task)
    run = RunDir.create(
        out or default_run_dir("centralized"),
        {"mode": "centralized", **ref, "seed": seed, "data": data, "label": label,
         "test_fraction": test_fraction, "train": config.as_dict(),
         **({"dp_sgd": dp_sgd, "dp_delta": dp_delta} if private else {})},
    )
    where = data if data is not None else dataset
    console.print(f"centralized: {the_task.name} ({len(local.train)} train examples from "
                  f"{where}) -> {run.path}", markup=False, highlight=False)
    with progress_bar("epochs", epochs) as bar:
        def on_epoch(r: dict[str, Any]) -> None:
            bar.advance(metrics_text(r, 2))
            console.print(f"epoch {r['epoch']:>3}  {metrics_text(r)}  ({r['seconds']:.1f}s)",
                          markup=False, highlight=False)

        summary = run_centralized(the_task, local, test, config, run, seed=seed, device=device,
                                  on_epoch=on_epoch, describe=ref, dp_sgd=private)
    console.print(f"{final_text(summary)}; run directory {run.path}", markup=False,
                  highlight=False)


def local(
    task: TaskOpt = None,
    dataset: DatasetOpt = "fashion-mnist",
    model: ModelOpt = "mlp",
    data: DataOpt = None,
    label: LabelOpt = None,
    test_fraction: TestFractionOpt = 0.0,
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
    device: DeviceOpt = "cpu",
    out: OutOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Each client trains alone on its own data: the no-federation baseline."""
    from fedlearn.baselines import run_local
    from fedlearn.data import parse_partition
    from fedlearn.errors import ConfigError
    from fedlearn.runs import RunDir, default_run_dir
    from fedlearn.tasks.runtime import context, load_client_data, server_test_data

    set_threads(threads)
    check_seed(seed)
    if clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {clients}.")
    config = _train_config(epochs, batch_size, optimizer, lr, momentum, weight_decay)
    parse_partition(partition)
    the_task, ref = resolve_task(task, dataset, model)
    device = device_name(device)
    parts = [load_client_data(the_task, context(
        index=i, num_clients=clients, client_id=f"client-{i}", data=data, label=label,
        partition=None if data is not None else f"{partition}:{clients}:{i}", seed=seed,
        test_fraction=test_fraction)) for i in range(clients)]
    test = server_test_data(the_task)
    run = RunDir.create(
        out or default_run_dir("local"),
        {"mode": "local", **ref, "seed": seed, "clients": clients, "partition": partition,
         "data": data, "label": label, "test_fraction": test_fraction,
         "train": config.as_dict()},
    )
    console.print(f"local only: {clients} clients, {the_task.name} -> {run.path}",
                  markup=False, highlight=False)
    with progress_bar("client epochs", clients * epochs) as bar:
        def on_epoch(r: dict[str, Any]) -> None:
            bar.advance(f"client {r['client']} epoch {r['epoch']} {metrics_text(r, 1)}")

        summary, rows = run_local(the_task, parts, test, config, run, seed=seed, device=device,
                                  on_epoch=on_epoch, describe={**ref, "partition": partition})
    table = Table(title=f"Each client alone ({epochs} epochs on its own data)")
    names = list(rows[0].metrics) if rows else []
    for col in ("client", "examples", "train accuracy", *names):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r.client + 1), str(r.examples), pct(r.train_accuracy)
                      if r.train_accuracy == r.train_accuracy else "-",
                      *[pct(r.metrics[k]) if k.endswith("accuracy") else f"{r.metrics[k]:.4f}"
                        for k in names])
    console.print(table)
    console.print(f"mean {final_text(summary)}; run directory {run.path}", markup=False,
                  highlight=False)


def evaluate(
    model_file: Annotated[Path, typer.Option("--model-file", "-f", help="A .safetensors file.")],
    task: TaskOpt = None,
    dataset: DatasetOpt = "fashion-mnist",
    model: ModelOpt = "mlp",
    data: DataOpt = None,
    label: LabelOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Loss and metrics of a saved model on the task's test data (or on --data)."""
    from fedlearn.errors import ConfigError
    from fedlearn.runs import load_model_file
    from fedlearn.tasks.runtime import context, load_client_data, server_test_data
    from fedlearn.training import Trainer

    the_task, _ = resolve_task(task, dataset, model)
    if data is not None:
        test = load_client_data(the_task, context(data=data, label=label)).train
    else:
        found = server_test_data(the_task)
        if found is None:
            raise ConfigError(f"task {the_task.name!r} has no test data; pass --data PATH to "
                              "evaluate on.")
        test = found
    weights = load_model_file(model_file)
    trainer = Trainer(the_task, device=device_name(device))
    from fedlearn.weights import check

    check(weights, trainer.spec)
    result = trainer.evaluate(weights, test)
    console.print(f"{model_file}: {metrics_text(result.metrics, 8)} on {result.num_examples} "
                  f"test examples", markup=False, highlight=False)


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
        from rich.text import Text

        where = Text(str(s.found_at), style="green") if s.found_at else Text("missing",
                                                                             style="red")
        table.add_row(name, where, str(s.train_size), str(s.test_size),
                      "x".join(map(str, s.input_shape)), str(s.num_classes))
    console.print(table)


@datasets_app.command("fetch")
def datasets_fetch(name: Annotated[str, typer.Argument(help="Dataset name.")]) -> None:
    """Download a dataset from its official mirror and verify its checksums."""
    from fedlearn.data import fetch

    path = fetch(name, progress=True)
    console.print(f"{name} is ready in {path}")
