"""Options and output helpers shared by the CLI commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
err_console = Console(stderr=True)

DatasetOpt = Annotated[
    str, typer.Option("--dataset", "-d", help="fashion-mnist, mnist, cifar10 or digits.")
]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="mlp, cnn or cifar-cnn.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", "-e", help="Passes over the training data.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Mini-batch size.")]
OptimizerOpt = Annotated[str, typer.Option("--optimizer", help="sgd or adam.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Learning rate.")]
MomentumOpt = Annotated[float, typer.Option("--momentum", help="SGD momentum.")]
WdOpt = Annotated[float, typer.Option("--weight-decay", help="L2 weight decay.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for initialisation and data order.")]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Run directory (default runs/<command>-<timestamp>)."),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="CPU threads for torch (default: all cores).")
]


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op thread count when asked."""
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))


class Bar:
    """One rich progress task: ``advance`` by one, or ``set`` the count; with a status text."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress = progress
        self.task = task

    def advance(self, status: str = "") -> None:
        """One more step done."""
        self.progress.update(self.task, advance=1, status=status)

    def set(self, completed: int, status: str = "") -> None:
        """``completed`` steps done."""
        self.progress.update(self.task, completed=completed, status=status)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Bar]:
    """A rich progress bar with a free-text status field."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield Bar(progress, progress.add_task(description, total=total, status=""))


def pct(x: Any) -> str:
    """A fraction as a percentage with two decimals ('-' when missing)."""
    return "-" if x is None else f"{100.0 * float(x):.2f}%"
