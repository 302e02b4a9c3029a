"""W4-sim of BENCHMARKS.md: stragglers in virtual time, sync vs async, 1,000 clients.

Fashion-MNIST mlp split IID among 1,000 simulated clients (60 training rows
each, seed 0), with lognormal:1.0 speeds (median 1 step per virtual second;
a tenth of the clients are over 3.6x slower than the median). Each mode runs
in this process (``fedlearn.sim``, the vectorized engine) for the same budget
of virtual time (``max_virtual_time``), with 10 clients at work at a time:

- sync, 10 sampled per round, each round waiting for its slowest client;
- sync with a round timeout (by default 2x the median task, 4 virtual s):
  later clients are dropped stragglers;
- async fedasync and fedbuff:5, 10 clients training at once.

Printed: test accuracy at fifths of the budget (the last model evaluated by
then), virtual time to reach the plain sync run's final accuracy, updates
or rounds done, stragglers dropped, mean staleness, and wall seconds.

    python benchmarks/w4_sim.py                       # the full workload (under a minute here)
    python benchmarks/w4_sim.py --budget 60           # a quick look
    python benchmarks/w4_sim.py --policies samples fedasync fedbuff:10 --concurrency 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_json

MARKS = (0.2, 0.4, 0.6, 0.8, 1.0)


def simulate(name: str, work: Path, **settings: Any) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                              float]:
    """One run in this process: its summary, its metrics rows and its wall seconds."""
    from fedlearn.runs import RunDir
    from fedlearn.sim import SimConfig, config_record, run_simulation
    from fedlearn.tasks import builtin_task

    config = SimConfig(dataset="fashion-mnist", model="mlp", **settings)
    run = RunDir.create(work / name.replace(":", "-").replace(" ", "-"), config_record(config))
    started = time.perf_counter()
    summary = run_simulation(config, builtin_task("fashion-mnist", "mlp"), run,
                             log=lambda line: print("  " + line))
    return summary, run.read_metrics(), time.perf_counter() - started


def accuracy_at(rows: list[dict[str, Any]], t: float) -> float | None:
    """The accuracy of the last model evaluated by virtual time ``t`` (None before any)."""
    seen = [r["accuracy"] for r in rows if r["virtual_time"] <= t + 1e-9]
    return seen[-1] if seen else None


def time_to(rows: list[dict[str, Any]], target: float) -> float | None:
    """The virtual time a run first reached ``target`` accuracy (None if never)."""
    return next((r["virtual_time"] for r in rows if r["accuracy"] >= target - 1e-12), None)


def pct(x: float | None) -> str:
    """A fraction as a percentage ('-' when missing)."""
    return "-" if x is None else f"{100 * x:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10,
                        help="sync: clients per round; async: clients training at once")
    parser.add_argument("--speeds", default="lognormal:1.0", help="--client-speeds")
    parser.add_argument("--budget", type=float, default=200.0, help="virtual seconds per mode")
    parser.add_argument("--timeout", type=float, default=4.0,
                        help="the sync round timeout, virtual seconds")
    parser.add_argument("--policies", nargs="+", default=["fedasync", "fedbuff:5"])
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--eval-every", type=int, default=25,
                        help="async: evaluate every N merged updates")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one: tasks of 60 rows are too small to split)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from fedlearn.data import load_dataset

    torch.set_num_threads(args.threads)
    load_dataset("fashion-mnist")  # warm-up: the files are read once into the page cache
    work = Path(tempfile.mkdtemp(prefix="w4-sim-"))
    common: dict[str, Any] = {
        "clients": args.clients, "per_round": args.concurrency, "partition": args.partition,
        "client_speeds": args.speeds, "max_virtual_time": args.budget, "seed": args.seed,
        "engine": "vectorized",
    }
    runs: dict[str, tuple[dict[str, Any], list[dict[str, Any]], float]] = {}
    plans: list[tuple[str, dict[str, Any]]] = [
        ("sync", {"rounds": 100_000}),
        (f"sync, timeout {args.timeout:g}s", {"rounds": 100_000, "round_timeout": args.timeout}),
        *[(f"async {p}", {"mode": "async", "async_policy": p, "eval_every": args.eval_every})
          for p in args.policies],
    ]
    for name, settings in plans:
        print(f"{name}: {args.budget:g} virtual seconds ...", flush=True)
        runs[name] = simulate(name, work, **common, **settings)
        print(f"  {runs[name][2]:.1f}s wall, final accuracy "
              f"{pct(runs[name][0]['final_accuracy'])}", flush=True)

    target = runs["sync"][0]["final_accuracy"]
    marks = [m * args.budget for m in MARKS]
    print(f"\nTest accuracy against virtual time ({args.clients} clients, {args.speeds} speeds, "
          f"{args.concurrency} at work at a time):")
    headers = ["mode", *[f"{t:g} s" for t in marks], f"time to {pct(target)}",
               "updates", "dropped", "mean staleness", "wall"]
    out_rows = []
    for name, (summary, rows, wall) in runs.items():
        if summary.get("sim_mode") == "async":
            done = f"{summary['updates']}"
            dropped, staleness = "-", f"{summary['mean_staleness']:.2f}"
        else:
            done = f"{summary['rounds']} rounds"
            dropped, staleness = str(summary["dropped"]), "0"
        reached = time_to(rows, target)
        out_rows.append([name, *[pct(accuracy_at(rows, t)) for t in marks],
                         "never" if reached is None else f"{reached:.0f} s", done, dropped,
                         staleness, f"{wall:.0f} s"])
    print(table(headers, out_rows))
    path = write_json("w4_sim", {
        "clients": args.clients, "concurrency": args.concurrency, "speeds": args.speeds,
        "budget_virtual_seconds": args.budget, "round_timeout": args.timeout,
        "partition": args.partition, "seed": args.seed, "sync_final_accuracy": target,
        "threads": args.threads,
        "marks_virtual_seconds": marks,
        "accuracy_at_marks": {n: [accuracy_at(r, t) for t in marks]
                              for n, (_, r, _) in runs.items()},
        "virtual_time_to_sync_final": {n: time_to(r, target) for n, (_, r, _) in runs.items()},
        "summaries": {n: s for n, (s, _, _) in runs.items()},
        "wall_seconds": {n: w for n, (_, _, w) in runs.items()},
        "curves": {n: [[round(r["virtual_time"], 3), r["accuracy"]] for r in rows]
                   for n, (_, rows, _) in runs.items()},
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
