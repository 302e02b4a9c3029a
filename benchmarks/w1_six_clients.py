"""W1 of BENCHMARKS.md: six Fashion-MNIST clients, local-only vs federated vs centralized.

Federated rounds run over real HTTP: ``fedlearn run`` with a server process and
6 client processes on 127.0.0.1. The compute floor is the same six local
epochs run back to back in one process (one thread, as each client uses),
divided by the cores used.

    python benchmarks/w1_six_clients.py            # the full workload (about 10 minutes)
    python benchmarks/w1_six_clients.py --rounds 5 --local-epochs-alone 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table, write_json

CHECKPOINTS = (1, 5, 10, 20, 50)


def compute_floor(reps: int, seed: int = 0) -> tuple[float, list[float]]:
    """Seconds for six clients' local epochs back to back, one thread, divided by the cores."""
    import torch

    from fedlearn.config import TrainConfig
    from fedlearn.data import load_dataset, partition
    from fedlearn.models import build_model, get_weights
    from fedlearn.training import Shard, local_update

    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist")
    parts = partition(ds.y_train, 6, "iid", seed)
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-3)
    model = build_model("mlp", ds.input_shape, ds.num_classes, seed=seed)
    weights = get_weights(model)
    per_round = []
    for r in range(reps + 1):
        t0 = time.perf_counter()
        for i, idx in enumerate(parts):
            shard = Shard.from_numpy(ds.x_train, ds.y_train, idx)
            local_update(model, weights, shard, cfg, seed=r * 10 + i)
        per_round.append(time.perf_counter() - t0)
    per_round = per_round[1:]  # the first pass warms caches and page-faults the data in
    cores = min(6, os.cpu_count() or 1)
    return median(per_round) / cores, per_round


def federated(rounds: int, out: Path) -> dict[str, object]:
    """``fedlearn run`` over HTTP with 6 client processes."""
    cmd = [sys.executable, "-m", "fedlearn.cli.main", "run", "--dataset", "fashion-mnist",
           "--model", "mlp", "--clients", "6", "--rounds", str(rounds), "--partition", "iid",
           "--local-epochs", "1", "--batch-size", "32", "--optimizer", "adam", "--lr", "0.001",
           "--seed", "0", "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "wall_seconds": wall,
            "median_round_seconds": median([r["seconds"] for r in rows[1:]])}


def simulated(rounds: int) -> dict[str, float]:
    """Median seconds per round of the same workload in ``fedlearn sim`` (each engine)."""
    import torch

    from fedlearn.config import TrainConfig
    from fedlearn.sim import SimConfig, Simulation
    from fedlearn.tasks import builtin_task

    torch.set_num_threads(os.cpu_count() or 1)
    task = builtin_task("fashion-mnist", "mlp")
    out = {}
    for engine in ("vectorized", "sequential"):
        sim = Simulation(SimConfig(
            clients=6, per_round=6, partition="iid", rounds=rounds, engine=engine,
            dataset="fashion-mnist", model="mlp", seed=0,
            train=TrainConfig(epochs=1, batch_size=32, optimizer="adam", lr=1e-3),
        ), task)
        times = [float(sim.run_round(r)["seconds"]) for r in range(1, rounds + 1)]
        out[engine] = median(times[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--local-epochs-alone", type=int, default=50,
                        help="epochs for the local-only and centralized baselines")
    parser.add_argument("--floor-reps", type=int, default=3)
    args = parser.parse_args()

    from fedlearn.baselines import run_centralized, run_local
    from fedlearn.config import TrainConfig
    from fedlearn.runs import RunDir
    from fedlearn.tasks import builtin_task
    from fedlearn.tasks.runtime import context, load_client_data, server_test_data

    task = builtin_task("fashion-mnist", "mlp")
    test = server_test_data(task)
    cfg = TrainConfig(epochs=args.local_epochs_alone, batch_size=32, optimizer="adam", lr=1e-3)
    work = Path(tempfile.mkdtemp(prefix="w1-"))

    print("measuring the compute floor ...", flush=True)
    floor, floor_reps = compute_floor(args.floor_reps)
    print(f"federated over HTTP, {args.rounds} rounds ...", flush=True)
    fed = federated(args.rounds, work / "fed")
    print("simulator, 6 rounds per engine ...", flush=True)
    sim = simulated(6)
    print(f"local only, {args.local_epochs_alone} epochs per client ...", flush=True)
    parts = [load_client_data(task, context(index=i, num_clients=6, client_id=f"client-{i}",
                                            partition=f"iid:6:{i}", seed=0)) for i in range(6)]
    _, local_rows = run_local(task, parts, test, cfg, RunDir.create(work / "local", {}), seed=0)
    print(f"centralized, {args.local_epochs_alone} epochs ...", flush=True)
    cent_rows: list[dict[str, float]] = []
    run_centralized(task, load_client_data(task, context(seed=0)), test, cfg,
                    RunDir.create(work / "cent", {}), seed=0, on_epoch=cent_rows.append)

    print("\nEach client alone (no federation):")
    print(table(["client", "train accuracy", "test accuracy"],
                [[r.client + 1, f"{100 * r.train_accuracy:.2f}%", f"{100 * r.test_accuracy:.2f}%"]
                 for r in local_rows]))
    fed_rows = fed["rows"]
    assert isinstance(fed_rows, list)
    fed_at = {r["round"]: r["accuracy"] for r in fed_rows}
    cent_at = {int(r["epoch"]): r["accuracy"] for r in cent_rows}
    marks = [c for c in CHECKPOINTS if c <= max(args.rounds, args.local_epochs_alone)]
    print("\nTest accuracy after round / epoch:")
    print(table(["after", "federated (HTTP, 6 clients)", "centralized"],
                [[c, f"{100 * fed_at[c]:.2f}%" if c in fed_at else "-",
                  f"{100 * cent_at[c]:.2f}%" if c in cent_at else "-"] for c in marks]))
    mrs = float(fed["median_round_seconds"])  # type: ignore[arg-type]
    print("\nSpeed:")
    print(table(["measure", "seconds"], [
        ["median seconds per round over HTTP", f"{mrs:.3f}"],
        ["compute floor per round (6 local epochs / cores)", f"{floor:.3f}"],
        ["ratio round / floor", f"{mrs / floor:.2f}x"],
        ["median seconds per round, fedlearn sim (vectorized)", f"{sim['vectorized']:.3f}"],
        ["median seconds per round, fedlearn sim (sequential)", f"{sim['sequential']:.3f}"],
    ]))
    path = write_json("w1_six_clients", {
        "rounds": args.rounds,
        "local_epochs": args.local_epochs_alone,
        "local_only": [r.__dict__ for r in local_rows],
        "local_only_mean_test_accuracy": sum(r.test_accuracy for r in local_rows) / 6,
        "federated_accuracy": {str(k): v for k, v in fed_at.items() if k in marks},
        "federated_final_accuracy": fed_rows[-1]["accuracy"],
        "centralized_accuracy": {str(k): v for k, v in cent_at.items() if k in marks},
        "median_round_seconds_http": mrs,
        "compute_floor_seconds": floor,
        "compute_floor_reps": floor_reps,
        "ratio_round_to_floor": mrs / floor,
        "federated_wall_seconds": fed["wall_seconds"],
        "sim_median_round_seconds": sim,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
