"""W4 of BENCHMARKS.md: stragglers, synchronous vs asynchronous federation.

Fashion-MNIST split IID among 6 client processes (seed 0), two of which train
5x slower (``--slowdown``, benchmarks only). First ``fedlearn run`` in sync
mode for N rounds; its training time is the budget. Then each async policy
runs with ``--max-seconds`` equal to that budget. Every run is real HTTP on
127.0.0.1; ``fedlearn run`` lets all six clients train at once when
slowdowns are given (no CPU slots), in both modes.

Wall time is training time: from the first round (first task) to the end,
without process start-up. For sync it is the sum of the round times (a
round starts as the previous one closes); async rows carry it directly.

    python benchmarks/w4_stragglers.py                 # the full workload (about 9 minutes)
    python benchmarks/w4_stragglers.py --rounds 20     # a longer budget
    python benchmarks/w4_stragglers.py --rounds 4      # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_json

CLIENTS = 6
COMMON = ["--dataset", "fashion-mnist", "--model", "mlp", "--clients", str(CLIENTS),
          "--partition", "iid", "--local-epochs", "1", "--batch-size", "32",
          "--optimizer", "adam", "--lr", "0.001", "--seed", "0"]
MARKS = (0.1, 0.25, 0.5, 0.75, 1.0)


def fedlearn_run(args: list[str], out: Path) -> list[dict[str, Any]]:
    """``fedlearn run ARGS`` to the end; the rows of its metrics.jsonl."""
    cmd = [sys.executable, "-m", "fedlearn.cli.main", "run", *COMMON, *args, "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def curve_of_sync(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(training seconds when the round closed, accuracy), from per-round durations."""
    times = itertools.accumulate(float(r["seconds"]) for r in rows)
    return [(t, float(r["accuracy"])) for t, r in zip(times, rows, strict=True)]


def curve_of_async(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(training seconds at the update, accuracy)."""
    return [(float(r["seconds"]), float(r["accuracy"])) for r in rows]


def accuracy_at(curve: list[tuple[float, float]], t: float) -> float | None:
    """The accuracy of the last model evaluated by time ``t`` (None before the first)."""
    seen = [acc for when, acc in curve if when <= t + 1e-9]
    return seen[-1] if seen else None


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """When the curve first reaches ``target`` (None if it never does)."""
    return next((when for when, acc in curve if acc >= target - 1e-12), None)


def pct(x: float | None) -> str:
    """A fraction as a percentage ('-' when missing)."""
    return "-" if x is None else f"{100 * x:.2f}%"


def secs(x: float | None) -> str:
    """Seconds, or 'never'."""
    return "never" if x is None else f"{x:.1f}s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16, help="sync rounds (sets the budget)")
    parser.add_argument("--slow", type=int, nargs="+", default=[4, 5],
                        help="indices of the slow clients")
    parser.add_argument("--factor", type=float, default=5.0, help="their slowdown")
    parser.add_argument("--policies", nargs="+", default=["samples", "fedasync", "fedbuff:3"])
    parser.add_argument("--eval-every", type=int, default=2,
                        help="async: evaluate every N merged updates")
    args = parser.parse_args()

    from fedlearn.data import load_dataset

    load_dataset("fashion-mnist")  # warm-up: the files are read once into the page cache
    slow = [a for i in args.slow for a in ("--slowdown", f"{i}={args.factor:g}")]
    work = Path(tempfile.mkdtemp(prefix="w4-"))
    print(f"sync, {args.rounds} rounds, clients {args.slow} {args.factor:g}x slower ...",
          flush=True)
    started = time.perf_counter()
    sync_rows = fedlearn_run(["--rounds", str(args.rounds), *slow], work / "sync")
    curves = {"sync": curve_of_sync(sync_rows)}
    walls = {"sync": time.perf_counter() - started}
    budget = curves["sync"][-1][0]
    target = curves["sync"][-1][1]
    print(f"  budget {budget:.1f}s of training, final accuracy {pct(target)}", flush=True)
    async_rows: dict[str, list[dict[str, Any]]] = {}
    for policy in args.policies:
        print(f"async {policy}, {budget:.1f}s ...", flush=True)
        started = time.perf_counter()
        rows = fedlearn_run(["--mode", "async", "--async-policy", policy, "--max-seconds",
                             f"{budget:.2f}", "--eval-every", str(args.eval_every), *slow],
                            work / policy.replace(":", "-"))
        walls[policy] = time.perf_counter() - started
        async_rows[policy] = rows
        curves[policy] = curve_of_async(rows)

    marks = [m * budget for m in MARKS]
    print(f"\nTest accuracy against training wall time (6 clients, clients "
          f"{', '.join(map(str, args.slow))} {args.factor:g}x slower):")
    headers = ["mode", *[f"{t:.0f}s" for t in marks], f"time to {pct(target)}", "updates",
               "mean staleness"]
    rows_out = []
    for mode, curve in curves.items():
        if mode == "sync":
            updates, staleness = f"{len(sync_rows)} rounds", "0"
        else:
            last = async_rows[mode][-1]
            updates, staleness = str(last["update"]), f"{last['mean_staleness']:.2f}"
        rows_out.append([mode if mode == "sync" else f"async {mode}",
                         *[pct(accuracy_at(curve, t)) for t in marks],
                         secs(time_to(curve, target)), updates, staleness])
    print(table(headers, rows_out))
    path = write_json("w4_stragglers", {
        "rounds": args.rounds,
        "slow_clients": args.slow,
        "slowdown": args.factor,
        "budget_seconds": budget,
        "sync_final_accuracy": target,
        "marks_seconds": [round(t, 2) for t in marks],
        "accuracy_at_marks": {m: [accuracy_at(c, t) for t in marks] for m, c in curves.items()},
        "seconds_to_sync_final": {m: time_to(c, target) for m, c in curves.items()},
        "final_accuracy": {m: c[-1][1] for m, c in curves.items()},
        "updates": {m: r[-1]["update"] for m, r in async_rows.items()},
        "mean_staleness": {m: r[-1]["mean_staleness"] for m, r in async_rows.items()},
        "process_wall_seconds": walls,
        "curves": {m: [[round(t, 3), a] for t, a in c] for m, c in curves.items()},
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
