"""How fast the round engines train one round: functional vs sequential vs the hand-written mlp.

One round of 10 clients x 600 synthetic 1x28x28 rows (batch 32, one epoch,
plain SGD), one thread. After a warm-up round the engines take turns for
``--repeats`` rounds; the table gives the fastest wall time and the median CPU
time (what a busy shared machine disturbs least). ``uneven`` gives the clients
300..900 rows, so short last batches fall on different steps.

    python benchmarks/vectorized_probe.py --models mlp --repeats 5     # seconds
    python benchmarks/vectorized_probe.py --models cnn --repeats 1 --layouts equal  # ~30 s
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table, write_json

CLIENTS = 10
ROWS = 600


def clients(uneven: bool, seed: int = 0) -> list[Any]:
    """Ten clients' tasks over one shared pool of rows."""
    import numpy as np

    from fedlearn.sim import ClientTask

    rng = np.random.default_rng(seed)
    sizes = rng.integers(300, 901, CLIENTS) if uneven else np.full(CLIENTS, ROWS)
    ends = np.cumsum(sizes)
    return [ClientTask(f"client-{i}", np.arange(e - n, e, dtype=np.int64), 100 + i)
            for i, (n, e) in enumerate(zip(sizes, ends, strict=True))]


def time_rounds(engines: dict[str, Any], weights: Any, tasks: list[Any], cfg: Any,
                repeats: int) -> dict[str, tuple[float, float]]:
    """Per engine: (fastest wall seconds, median CPU seconds) of a round, after a warm-up.

    Engines take turns, round by round, and CPU time (one thread) is what a
    busy shared machine disturbs least.
    """
    for engine in engines.values():
        engine.train_round(weights, tasks, cfg)
    wall: dict[str, list[float]] = {k: [] for k in engines}
    cpu: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(repeats):
        for label, engine in engines.items():
            w0, c0 = time.perf_counter(), time.process_time()
            engine.train_round(weights, tasks, cfg)
            wall[label].append(time.perf_counter() - w0)
            cpu[label].append(time.process_time() - c0)
    return {k: (min(wall[k]), median(cpu[k])) for k in engines}


def main() -> None:
    """Time every engine on each model and print a table."""
    import numpy as np
    import torch

    from fedlearn.config import TrainConfig
    from fedlearn.models import build_model, get_weights
    from fedlearn.sim import SequentialEngine, VectorizedEngine
    from fedlearn.sim.functional import FunctionalEngine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--layouts", nargs="+", default=["equal", "uneven"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n = CLIENTS * 900
    x = torch.from_numpy(rng.normal(0, 1, (n, 1, 28, 28)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, n).astype(np.int64))
    cfg = TrainConfig(optimizer="sgd", lr=0.05, batch_size=32, epochs=1)
    rows, records = [], []
    for name in args.models:
        model = build_model(name, (1, 28, 28), 10, seed=0)
        weights = get_weights(model)
        engines: dict[str, Any] = {
            "sequential": SequentialEngine(model, x, y),
            "functional": FunctionalEngine(model, x, y, log=lambda _: None),
        }
        if name == "mlp":
            engines["hand-written mlp"] = VectorizedEngine(model, x, y)
        for layout in args.layouts:
            tasks = clients(layout == "uneven")
            timed = time_rounds(engines, weights, tasks, cfg, args.repeats)
            base = timed["sequential"][1]
            for label, (wall, cpu) in timed.items():
                rows.append([name, layout, label, f"{wall:.3f}", f"{cpu:.3f}",
                             f"{base / cpu:.1f}x"])
                records.append({"model": name, "clients": layout, "engine": label,
                                "wall_seconds_min": wall, "cpu_seconds_median": cpu})
    print(table(["model", "clients", "engine", "wall s (min)", "cpu s (median)",
                 "vs sequential (cpu)"], rows))
    path = write_json("vectorized_probe_" + "_".join(args.models), {
        "clients": CLIENTS, "rows": ROWS, "batch_size": 32, "threads": 1, "results": records})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
