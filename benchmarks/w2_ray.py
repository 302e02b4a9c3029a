"""W2 on Ray: the simulator's Ray backend on a local 2-CPU Ray against the in-process engine.

Fashion-MNIST split among N clients by Dirichlet(0.5) (seed 0), K sampled per
round, 1 local epoch, batch 32, SGD lr 0.05, 20 rounds, the ``mlp``; at
100/10 and 1,000/100. Contenders, in one process taking turns round by round
(so passing load hits both alike):

* ``in-process``: ``Simulation`` with the vectorized engine, 2 torch threads;
* ``ray``: the same ``Simulation`` with ``backend="ray"`` on a local Ray of
  2 CPUs: two actors of 1 CPU, each holding a vectorized engine, training
  half of each round's clients; the driver samples, aggregates, evaluates.

Seconds per round are medians of the rounds after the first (training, FedAvg
and test evaluation). PASS when Ray takes at most 1.5x the in-process time
per round and reaches the same accuracy at round 20 (same model to float
tolerance).

    python benchmarks/w2_ray.py               # the workload (about a minute)
    python benchmarks/w2_ray.py --rounds 5    # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table, write_json

SCALES = ((100, 10), (1000, 100))
PARTITION = "dirichlet:0.5"
LR = 0.05
BATCH = 32
SEED = 0
MAX_RATIO = 1.5


def sim_config(backend: str, clients: int, per_round: int, rounds: int, cpus: int) -> Any:
    """The W2 run, in-process or on Ray (one actor per CPU)."""
    from fedlearn.config import TrainConfig
    from fedlearn.sim import SimConfig

    placement: dict[str, Any] = {}
    if backend == "ray":
        placement = {"backend": "ray", "ray_workers": cpus, "ray_cpus_per_worker": 1.0}
    return SimConfig(
        clients=clients, per_round=per_round, partition=PARTITION, rounds=rounds,
        engine="vectorized", dataset="fashion-mnist", model="mlp", seed=SEED,
        train=TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR), **placement,
    )


def scale(clients: int, per_round: int, rounds: int, cpus: int) -> dict[str, Any]:
    """Both contenders at one scale, taking turns round by round."""
    import numpy as np

    from fedlearn.sim import Simulation
    from fedlearn.tasks import builtin_task

    task = builtin_task("fashion-mnist", "mlp")
    t0 = time.perf_counter()
    local = Simulation(sim_config("local", clients, per_round, rounds, cpus), task)
    t1 = time.perf_counter()
    on_ray = Simulation(sim_config("ray", clients, per_round, rounds, cpus), task)
    t2 = time.perf_counter()
    sims = {"in-process": local, "ray": on_ray}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in sims}
    overhead: list[float] = []
    try:
        for rnd in range(1, rounds + 1):
            order = list(sims) if rnd % 2 else list(sims)[::-1]
            for name in order:
                rows[name].append(sims[name].run_round(rnd))
                if name == "ray" and rnd > 1:
                    # train_round's time beyond the slowest actor's own training.
                    worker = on_ray.engine.last_worker_seconds
                    overhead.append(rows[name][-1]["train_seconds"] - worker)
    finally:
        on_ray.close()
    # The float noise floor (not timed): in-process again on one thread, as each actor
    # trains; matrix products on one thread or two round differently.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    again = Simulation(sim_config("local", clients, per_round, rounds, cpus), task)
    for rnd in range(1, rounds + 1):
        again.run_round(rnd)
    torch.set_num_threads(threads)

    def diff(a: dict[str, Any], b: dict[str, Any]) -> float:
        return max(float(np.abs(a[k] - b[k]).max()) for k in a)

    out: dict[str, Any] = {
        "max_abs_model_difference": diff(local.weights, on_ray.weights),
        "one_vs_two_threads_difference": diff(local.weights, again.weights),
        "ray_vs_one_thread_difference": diff(again.weights, on_ray.weights),
        "largest_weight": max(float(np.abs(v).max()) for v in local.weights.values()),
        "setup_seconds": {"in-process": t1 - t0, "ray": t2 - t1},
        "ray_median_overhead_seconds": median(overhead)}
    for name, recs in rows.items():
        later = recs[1:] or recs
        out[name] = {
            "median_round_seconds": median([r["seconds"] for r in later]),
            "median_train_seconds": median([r["train_seconds"] for r in later]),
            "first_round_seconds": recs[0]["seconds"],
            "final_accuracy": recs[-1]["accuracy"],
            "accuracy_by_round": [r["accuracy"] for r in recs],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (and "
                        "torch threads in-process).")
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(args.cpus)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="error")
    results: dict[str, Any] = {}
    load = [os.getloadavg()[0]]
    try:
        for clients, per_round in SCALES:
            name = f"{clients}/{per_round}"
            print(f"{name}: in-process vectorized and Ray taking turns, {args.rounds} rounds ...",
                  flush=True)
            results[name] = scale(clients, per_round, args.rounds, args.cpus)
    finally:
        ray.shutdown()
    load.append(os.getloadavg()[0])
    report(args, results, load, ray.__version__)


def report(args: argparse.Namespace, results: dict[str, Any], load: list[float],
           ray_version: str) -> None:
    """Print the table and the checks; write the JSON."""
    rows, checks = [], []
    for name, res in results.items():
        local, on_ray = res["in-process"], res["ray"]
        ratio = on_ray["median_round_seconds"] / local["median_round_seconds"]
        gap = abs(on_ray["final_accuracy"] - local["final_accuracy"])
        res["ratio_ray_to_in_process"] = ratio
        for label, r in (("in-process vectorized (2 threads)", local),
                         (f"ray, {args.cpus} actors x 1 CPU (vectorized)", on_ray)):
            rows.append([name, label, f"{r['median_round_seconds']:.3f}",
                         f"{r['median_train_seconds']:.3f}",
                         f"{r['median_round_seconds'] / local['median_round_seconds']:.2f}x",
                         f"{100 * r['final_accuracy']:.2f}%"])
        rows.append([name, "ray: time beyond the slowest actor's training", "-",
                     f"{res['ray_median_overhead_seconds']:.3f}", "-", "-"])
        checks.append([name, "ray / in-process seconds per round", f"{ratio:.2f}x",
                       f"<= {MAX_RATIO}x", "PASS" if ratio <= MAX_RATIO else "FAIL"])
        checks.append([name, f"|accuracy ray - in-process| @ round {args.rounds}",
                       f"{100 * gap:.2f} points", "<= 0.1 points",
                       "PASS" if gap <= 0.001 else "FAIL"])
        diff, noise = res["max_abs_model_difference"], res["one_vs_two_threads_difference"]
        checks.append([name, "max |ray - in-process| in the final model", f"{diff:.1e}",
                       f"float noise: < 1e-4 or <= 2x in-process 1-vs-{args.cpus}-thread "
                       f"({noise:.1e})", "PASS" if diff < 1e-4 or diff <= 2 * noise else "FAIL"])
        same = res["ray_vs_one_thread_difference"]
        checks.append([name, "max |ray - in-process on 1 thread| in the final model",
                       f"{same:.1e}", "< 1e-4", "PASS" if same < 1e-4 else "FAIL"])
    print(f"\nW2 on Ray: Fashion-MNIST mlp, {PARTITION}, SGD lr {LR}, batch {BATCH}, 1 local "
          f"epoch, {args.rounds} rounds; a local Ray of {args.cpus} CPUs. Seconds per round: "
          "medians of rounds 2.. (training, FedAvg, test evaluation), both taking turns in one "
          "process.")
    print(table(["clients/round", "contender", "s/round", "train s/round", "x in-process",
                 f"acc @ round {args.rounds}"], rows))
    cores = os.cpu_count() or 1
    if max(load) > cores:
        print(f"warning: the load average was {load[0]:.1f} at the start and {load[1]:.1f} at "
              f"the end on {cores} cores: other work shared the machine, so absolute times "
              "are inflated and noisy (ratios less so).")
    print("\nChecks:")
    print(table(["scale", "measure", "value", "target", "result"], checks))
    path = write_json("w2_ray", {
        "rounds": args.rounds, "cpus": args.cpus, "ray": ray_version, "partition": PARTITION,
        "lr": LR, "batch_size": BATCH, "load_average_start_end": load,
        "scales": results,
        "checks": [dict(zip(["scale", "measure", "value", "target", "result"], c, strict=True))
                   for c in checks],
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
