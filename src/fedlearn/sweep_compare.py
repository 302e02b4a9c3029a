"""The comparison a sweep writes: ``comparison.csv``, ``comparison.md``, ``comparison.png``.

One row per point, read back from the point's run directory: its grid values,
final accuracy and loss, rounds, seconds (``wall_seconds`` of the run) and,
for a point that did not finish, why (its ``error.txt``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlearn.runs import METRICS, SUMMARY, RunDir

COMPARISON = "comparison"


def point_row(name: str, values: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """The comparison row of point ``name`` with grid ``values``, from its run directory."""
    row: dict[str, Any] = {"point": name, **values}
    run = RunDir(folder)
    if (folder / SUMMARY).is_file():
        summary = run.read_summary()
        row.update(final_accuracy=summary.get("final_accuracy"),
                   final_loss=summary.get("final_loss"), rounds=summary.get("rounds"),
                   seconds=summary.get("wall_seconds"), error="")
    else:
        error = folder / "error.txt"
        row.update(final_accuracy=None, final_loss=None, rounds=None, seconds=None,
                   error=error.read_text().strip() if error.is_file() else "did not finish")
    row["run_dir"] = folder.name
    row["curve"] = _curve(run) if (folder / METRICS).is_file() else []
    return row


def _curve(run: RunDir) -> list[tuple[float, float]]:
    """(round, accuracy) of a run: the server's test accuracy, else the federated one."""
    records = run.read_metrics()
    for key in ("accuracy", "fed_accuracy"):
        points = [(float(r["round"]), float(r[key])) for r in records
                  if r.get(key) is not None and "round" in r]
        if points:
            return points
    return []


def write_comparison(out: Path, rows: list[dict[str, Any]], grid_keys: list[str]) -> list[Path]:
    """``comparison.csv``, ``comparison.md`` and ``comparison.png`` in ``out``."""
    from fedlearn.report import plot_curves

    columns = ["point", *grid_keys, "final_accuracy", "final_loss", "rounds", "seconds",
               "run_dir", "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    paths = [out / f"{COMPARISON}.csv", out / f"{COMPARISON}.md", out / f"{COMPARISON}.png"]
    paths[0].write_text(buf.getvalue(), encoding="utf-8")
    paths[1].write_text(comparison_table(rows, grid_keys) + "\n", encoding="utf-8")
    plot_curves({row["point"]: row["curve"] for row in rows}, paths[2],
                title=f"sweep: test accuracy per round, {len(rows)} points",
                ylabel="test accuracy (%)", scale=100.0)
    return paths


def comparison_table(rows: list[dict[str, Any]], grid_keys: list[str]) -> str:
    """The comparison as a markdown table, best final accuracy first."""
    def pct(x: Any) -> str:
        return "-" if x is None else f"{100 * float(x):.2f}%"

    ordered = sorted(rows, key=lambda r: -(r.get("final_accuracy") or -1.0))
    header = ["point", *grid_keys, "final accuracy", "final loss", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in ordered:
        loss = "-" if r.get("final_loss") is None else f"{float(r['final_loss']):.4f}"
        secs = "-" if r.get("seconds") is None else f"{float(r['seconds']):.1f}"
        acc = pct(r.get("final_accuracy")) if not r.get("error") else f"failed: {r['error']}"
        cells = [r["point"], *(str(r.get(k, "")) for k in grid_keys), acc, loss, secs]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def failed(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the points that did not finish."""
    return [r["point"] for r in rows if r.get("error")]
