"""Helpers shared by the benchmark scripts: machine facts, JSON output, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Core count and library versions, stored beside every result."""
    import numpy
    import torch

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def kept_cells(name: str, setup: dict[str, Any]) -> dict[str, Any]:
    """The ``cells`` of ``benchmarks/results/<name>.json`` if it was made with ``setup``.

    Lets a long table be filled over several runs (``--merge``): cells already
    measured under the very same settings are kept, the rest are run.
    """
    path = RESULTS / f"{name}.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if old.get("setup") != setup:
        return {}
    return dict(old.get("cells", {}))


def run_rounds(sim: Any, rounds: int,
               progress: Callable[[int, float, float], None] | None = None) -> dict[str, Any]:
    """Rounds 1..``rounds`` of a ``Simulation``: ``curve`` (test accuracy after each),
    ``final_accuracy``, ``best_accuracy``, ``failed_rounds``, ``round_seconds``,
    ``seconds`` (all of it) and ``engine``; ``progress(round, accuracy, seconds)`` after each."""
    started = time.perf_counter()
    curve: list[float] = []
    failed: list[int] = []
    seconds: list[float] = []
    for rnd in range(1, rounds + 1):
        rec = sim.run_round(rnd)
        curve.append(float(rec["accuracy"]))
        seconds.append(float(rec["seconds"]))
        if "failed" in rec:
            failed.append(rnd)
        if progress is not None:
            progress(rnd, curve[-1], seconds[-1])
    return {"final_accuracy": curve[-1], "best_accuracy": max(curve), "curve": curve,
            "failed_rounds": failed, "engine": type(sim.engine).__name__,
            "seconds": time.perf_counter() - started, "round_seconds": seconds}


def median(xs: list[float]) -> float:
    """The median (nan for an empty list)."""
    return statistics.median(xs) if xs else float("nan")


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text (markdown) table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in cells
    ]
    return "\n".join([line, sep, *body])
