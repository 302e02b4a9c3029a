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

# Text is printed literally: a path with "[/]" or a spec like "dirichlet:-1:3:0" is not
# markup or an emoji code.
console = Console(markup=False, emoji=False)
err_console = Console(stderr=True, markup=False, emoji=False)

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
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}", markup=False),
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

TaskOpt = Annotated[
    str | None,
    typer.Option("--task", "-t", help="Your task: path/to/file.py:NAME or package.module:NAME "
                 "(default: the built-in --dataset/--model)."),
]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", help="Local data: a folder with one sub-folder of images per class, "
                 "a CSV or Parquet file (with --label), or an .npz with x and y. `run` and "
                 "`sim` replace {i} with the client index."),
]
LabelOpt = Annotated[
    str | None, typer.Option("--label", help="The label column of a CSV or Parquet --data.")
]
TestFractionOpt = Annotated[
    float, typer.Option("--test-fraction", help="Share of the local data held out as a local "
                        "test set (federated evaluation), split with the seed.")
]
DPSGDOpt = Annotated[
    str | None, typer.Option("--dp-sgd", metavar="NOISE:MAX_GRAD_NORM",
                             help="Sample-level DP-SGD with Opacus: per-example clipping to "
                             "MAX_GRAD_NORM, Gaussian noise NOISE x MAX_GRAD_NORM, Poisson "
                             "batches; the client's epsilon is reported.")
]
#: δ at which DP-SGD's ε is reported (kept equal to fedlearn.privacy.dpsgd.DEFAULT_DELTA).
DEFAULT_DELTA = 1e-5
DPDeltaOpt = Annotated[
    float, typer.Option("--dp-delta", help="The delta at which DP-SGD's epsilon is reported.")
]
DPNoiseOpt = Annotated[
    float | None, typer.Option("--dp-noise-multiplier", metavar="Z", help="User-level "
                               "DP-FedAvg: Gaussian noise Z x clip norm on the sum of clipped "
                               "client updates; (epsilon, delta) reported every round.",
                               rich_help_panel="Differential privacy")
]
DPClipOpt = Annotated[
    str | None, typer.Option("--dp-clip", metavar="C|adaptive:QUANTILE", help="DP-FedAvg's "
                             "clip norm C, or adaptive clipping towards a quantile of the "
                             "update norms.", rich_help_panel="Differential privacy")
]
DPClipOnOpt = Annotated[
    str | None, typer.Option("--dp-clip-on", help="Where DP-FedAvg clips: server or client. "
                             "[default: server; client with --secagg]",
                             rich_help_panel="Differential privacy")
]
DPTargetOpt = Annotated[
    float | None, typer.Option("--dp-target-epsilon", help="Stop the run before a round "
                               "would take epsilon above this.",
                               rich_help_panel="Differential privacy")
]
RunDPDeltaOpt = Annotated[
    float | None, typer.Option("--dp-delta", help="delta of the reported epsilon (DP-FedAvg: "
                               "default 1/N clients; DP-SGD: default 1e-5).",
                               rich_help_panel="Differential privacy")
]
AttackOpt = Annotated[
    str | None,
    typer.Option("--attack", help="For robustness evaluation: the attackers send sign-flip[:F] "
                 "(-F x delta), scale:F, gaussian:SIGMA (noise instead of the delta) or "
                 "same-value:V, or train on flipped labels (label-flip).",
                 rich_help_panel="Robustness evaluation"),
]
AttackersOpt = Annotated[
    float | None,
    typer.Option("--attackers", help="Share of the clients that attack, chosen with the seed "
                 "and listed in the run's attackers.json. [default: 0.2 with --attack]",
                 rich_help_panel="Robustness evaluation"),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda or mps (auto: cuda when present).")
]


def resolve_task(task: str | None, dataset: str, model: str) -> tuple[Any, dict[str, Any]]:
    """The Task named by ``--task`` (or the built-in ``--dataset/--model``), and how to
    name it again in a ``config.toml`` (an absolute file path, so ``--resume`` finds it)."""
    from fedlearn.tasks import builtin_task, load_task
    from fedlearn.tasks.loading import split_ref
    from fedlearn.training import initial_state

    if task is None:
        return builtin_task(dataset, model), {"dataset": dataset, "model": model}
    found = load_task(task)
    initial_state(found, 0)  # a model factory or init that raises fails here, first
    where, name = split_ref(task)
    if where.endswith(".py") or "/" in where:
        where = str(Path(where).resolve())
    return found, {"task": f"{where}:{name}"}


def device_name(device: str) -> str:
    """``--device`` checked and resolved (auto picks cuda when present)."""
    from fedlearn.training import resolve_device

    return resolve_device(device)


SKIP_METRICS = ("round", "update", "version", "seconds", "train_seconds", "clients",
                "sampled", "examples", "attempts", "staleness", "mean_staleness", "buffered",
                "fed_clients", "fed_examples", "train_loss", "epoch", "client",
                "train_accuracy", "dp_epsilon", "dp_delta", "dp_sgd_epsilon_max", "dp_rounds",
                "virtual_time", "round_virtual_seconds", "dropped", "refused", "staleness_mean",
                "staleness_max", "distinct_clients")


def metrics_text(record: dict[str, Any], limit: int = 4) -> str:
    """``accuracy 87.10%  loss 0.3610  fed_auc 0.9812`` from a metrics record."""
    parts = []
    ordered = sorted(record.items(), key=lambda kv: (not kv[0].endswith("accuracy"),
                                                     kv[0].startswith("fed_")))
    for key, value in ordered:
        if (key in SKIP_METRICS or key.startswith("secagg_")
                or not isinstance(value, int | float) or isinstance(value, bool)):
            continue
        shown = pct(value) if key.endswith("accuracy") else f"{float(value):.4f}"
        parts.append(f"{key} {shown}")
    parts = parts[:limit]
    if isinstance(record.get("dp_epsilon"), int | float):
        parts.append(f"ε {record['dp_epsilon']:.3g} (δ {record.get('dp_delta', 0):.2g})")
    return "  ".join(parts) if parts else "no evaluation"


def final_text(summary: dict[str, Any]) -> str:
    """``final test accuracy 87.10%`` (or the final federated metrics) from a summary."""
    if summary.get("final_accuracy") is not None:
        return f"final test accuracy {pct(summary['final_accuracy'])}"
    finals = {k[len("final_"):]: v for k, v in summary.items()
              if k.startswith("final_") and v is not None}
    return "final " + metrics_text(finals) if finals else "finished"


def check_seed(seed: int) -> None:
    """A seed must be 0 or more (numpy refuses negative ones)."""
    from fedlearn.errors import ConfigError

    if seed < 0:
        raise ConfigError(f"--seed must be 0 or more, got {seed}.")
