"""Accuracy and loss curves of a run, drawn with matplotlib to a PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

#: The x axis: the first of these a record has (virtual time for simulated-time runs).
X_KEYS = ("virtual_time", "round", "update", "epoch")
X_LABELS = {"virtual_time": "virtual time (s)"}


def _score_key(records: Sequence[Mapping[str, Any]], prefix: str) -> str | None:
    """The metric to plot on the left: accuracy when measured, else the first other one."""
    keys = [k for r in records for k in r if k.startswith(prefix)
            and k not in (f"{prefix}loss", f"{prefix}clients", f"{prefix}examples")]
    names = [k[len(prefix):] for k in dict.fromkeys(keys)]
    if prefix == "":
        names = [n for n in names if n in ("accuracy", "mse", "mae", "rmse", "auc")]
    if not names:
        return None
    return prefix + ("accuracy" if "accuracy" in names else names[0])


def plot_metrics(records: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> None:
    """Plot the test score (accuracy, or the task's first metric) and loss against virtual
    time, round or update (the first a record has) to ``path``: the server's own
    evaluation ("global") and the clients' federated evaluation ("federated"). Records
    with a ``client`` field are drawn as one line per client.
    """
    series: dict[str, tuple[list[float], list[float], list[float]]] = {}
    xlabel = "round"
    ylabel = "test accuracy (%)"
    for prefix, name in (("", "global"), ("fed_", "federated")):
        key = _score_key(records, prefix)
        if key is None:
            continue
        scale = 100.0 if key.endswith("accuracy") else 1.0
        if prefix == "" or not series:
            ylabel = f"test {key.removeprefix(prefix)}{' (%)' if scale == 100.0 else ''}"
        for r in records:
            xkey = next((k for k in X_KEYS if k in r), None)
            if xkey is None or r.get(key) is None:
                continue
            xlabel = X_LABELS.get(xkey, xkey)
            label = f"client {r['client']}" if "client" in r else name
            xs, accs, losses = series.setdefault(label, ([], [], []))
            xs.append(float(r[xkey]))
            accs.append(scale * float(r[key]))
            loss = r.get(f"{prefix}loss")
            losses.append(float(loss) if loss is not None else float("nan"))
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for label, (xs, accs, losses) in series.items():
        ax_acc.plot(xs, accs, marker="o", markersize=3, label=label)
        ax_loss.plot(xs, losses, marker="o", markersize=3, label=label)
    ax_acc.set_xlabel(xlabel)
    ax_acc.set_ylabel(ylabel)
    ax_loss.set_xlabel(xlabel)
    ax_loss.set_ylabel("test loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        if 1 < len(series) <= 12:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, *, title: str,
                ylabel: str, xlabel: str = "round", scale: float = 1.0) -> None:
    """One line per named curve of (x, y) points (y times ``scale``) to ``path``."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in curves.items():
        if points:
            ax.plot([x for x, _ in points], [scale * y for _, y in points], marker="o",
                    markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if 1 <= len(curves) <= 24:
        ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
