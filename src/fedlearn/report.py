"""Accuracy and loss curves of a run, drawn with matplotlib to a PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

X_KEYS = ("round", "update", "epoch")


def plot_metrics(records: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> None:
    """Plot test accuracy and loss against round (or update) to ``path``.

    Records with a ``client`` field are drawn as one line per client.
    """
    series: dict[str, tuple[list[float], list[float], list[float]]] = {}
    xlabel = "round"
    for r in records:
        xkey = next((k for k in X_KEYS if k in r), None)
        if xkey is None or r.get("accuracy") is None:
            continue
        xlabel = xkey
        label = f"client {r['client']}" if "client" in r else "global"
        xs, accs, losses = series.setdefault(label, ([], [], []))
        xs.append(float(r[xkey]))
        accs.append(100.0 * float(r["accuracy"]))
        losses.append(float(r["loss"]) if r.get("loss") is not None else float("nan"))
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for label, (xs, accs, losses) in series.items():
        ax_acc.plot(xs, accs, marker="o", markersize=3, label=label)
        ax_loss.plot(xs, losses, marker="o", markersize=3, label=label)
    ax_acc.set_xlabel(xlabel)
    ax_acc.set_ylabel("test accuracy (%)")
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
