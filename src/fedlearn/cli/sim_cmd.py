"""``fedlearn sim``: simulate N clients in this process, with a progress bar."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fedlearn.cli.common import (
    BatchOpt,
    DatasetOpt,
    LrOpt,
    ModelOpt,
    MomentumOpt,
    OptimizerOpt,
    OutOpt,
    WdOpt,
    console,
    pct,
    progress_bar,
)
from fedlearn.errors import ConfigError

DEFAULT_THREADS = 2


def sim(
    clients: Annotated[int, typer.Option("--clients", "-n", help="Simulated clients.")] = 100,
    per_round: Annotated[int, typer.Option("--per-round", "-k",
                         help="Clients sampled per round.")] = 10,
    partition: Annotated[str, typer.Option("--partition", "-p",
                         help="iid, dirichlet:A or shards:K, split among the clients.")] = "iid",
    rounds: Annotated[int, typer.Option("--rounds", help="Rounds to run.")] = 10,
    engine: Annotated[str, typer.Option("--engine", help="vectorized (all sampled clients at "
                      "once; mlp) or sequential (one after another; any model).")]
    = "vectorized",
    dataset: DatasetOpt = "fashion-mnist",
    model: ModelOpt = "mlp",
    local_epochs: Annotated[int, typer.Option("--local-epochs", help="Epochs per round.")] = 1,
    batch_size: BatchOpt = 32,
    optimizer: OptimizerOpt = "adam",
    lr: LrOpt = 1e-3,
    momentum: MomentumOpt = 0.0,
    weight_decay: WdOpt = 0.0,
    strategy: Annotated[str, typer.Option("--strategy", help="Aggregation strategy.")]
    = "fedavg",
    server_lr: Annotated[float, typer.Option("--server-lr", help="Server learning rate.")]
    = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Run seed (model, partition, "
                    "sampling, data order).")] = 0,
    out: OutOpt = None,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch.")]
    = DEFAULT_THREADS,
) -> None:
    """Simulate a federated run of N clients in this process (same model as `fedlearn run`)."""
    import torch

    from fedlearn.config import TrainConfig
    from fedlearn.data import load_dataset
    from fedlearn.models import build_model
    from fedlearn.runs import RunDir, default_run_dir
    from fedlearn.sim import SimConfig, config_record, run_simulation

    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}.")
    config = SimConfig(
        clients=clients, per_round=per_round, partition=partition, rounds=rounds,
        engine=engine, dataset=dataset, model=model, strategy=strategy,
        server_lr=server_lr, seed=seed,
        train=TrainConfig(epochs=local_epochs, batch_size=batch_size, optimizer=optimizer,
                          lr=lr, momentum=momentum, weight_decay=weight_decay),
    )
    torch.set_num_threads(threads)
    ds = load_dataset(dataset)
    build_model(model, ds.input_shape, ds.num_classes)  # fail fast on a misfit
    run = RunDir.create(out or default_run_dir("sim"), config_record(config))
    console.print(f"fedlearn sim: {clients} clients, {per_round} per round, {model} on "
                  f"{dataset}, partition {partition}, {engine} engine, {rounds} rounds "
                  f"-> {run.path}")
    with progress_bar("rounds", rounds) as bar:
        def on_round(r: dict[str, Any]) -> None:
            bar.advance(f"acc {pct(r['accuracy'])}  loss {r['loss']:.4f}  "
                        f"{r['seconds']:.2f}s/round")

        summary = run_simulation(config, run, data=ds, on_round=on_round,
                                 log=console.print)
    per = summary["median_round_seconds"]
    per_text = f"; median {per:.3f}s per round" if per is not None else ""
    console.print(
        f"final test accuracy {pct(summary['final_accuracy'])} after {summary['rounds']} "
        f"rounds ({summary['engine']} engine{per_text}); run directory {run.path}"
    )
