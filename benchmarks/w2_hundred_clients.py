"""W2 of BENCHMARKS.md: a hundred (and a thousand) simulated clients on one machine.

Fashion-MNIST split among N clients by Dirichlet(0.5) (seed 0), K sampled per
round, 1 local epoch, batch 32, SGD lr 0.05, 20 rounds; at 100/10 and at
1,000/100. The contenders:

* the sequential and the vectorized engine (``Simulation``, the round loop
  behind ``fedlearn sim``: sampling, training, FedAvg, test evaluation);
* the plain-loop floor: the same sampled clients, trained one after another
  in a bare PyTorch loop with the same data order, then averaged and
  evaluated, with no framework around it;
* plain centralized training of the same model at batch 32 (``train_epochs``
  on slices of the training set), for samples per second.

For each scale all contenders run in one process taking turns round by round,
so that whatever else loads the machine hits them alike; their ratios are
taken from that run. Times are medians of the rounds after the first. Then
each engine and the floor run once more alone in a fresh process (engines
through ``run_simulation``, writing a run directory) for peak resident memory.

    python benchmarks/w2_hundred_clients.py              # the full workload (a few minutes)
    python benchmarks/w2_hundred_clients.py --rounds 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table, write_json

SCALES = ((100, 10), (1000, 100))
ENGINES = ("sequential", "vectorized")
KINDS = ("floor", *ENGINES)
PARTITION = "dirichlet:0.5"
LR = 0.05
BATCH = 32
SEED = 0


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def task() -> Any:
    """The W2 task: the built-in ``mlp`` on Fashion-MNIST (``--dataset``/``--model``)."""
    from fedlearn.tasks import builtin_task

    return builtin_task("fashion-mnist", "mlp")


def sim_config(engine: str, clients: int, per_round: int, rounds: int) -> Any:
    """The W2 run for one engine, as ``fedlearn sim`` flags would make it."""
    from fedlearn.config import TrainConfig
    from fedlearn.sim import SimConfig

    return SimConfig(
        clients=clients, per_round=per_round, partition=PARTITION, rounds=rounds,
        engine=engine, dataset="fashion-mnist", model="mlp", seed=SEED,
        train=TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR),
    )


class PlainLoop:
    """The floor: bare PyTorch, the same sampled clients and data order, no framework."""

    name = "floor"

    def __init__(self, ds: Any, clients: int, per_round: int) -> None:
        import torch

        from fedlearn.data import partition
        from fedlearn.models import build_model
        from fedlearn.training import Shard

        self.train = Shard.from_numpy(ds.x_train, ds.y_train)
        self.test = Shard.from_numpy(ds.x_test, ds.y_test)
        self.parts = partition(ds.y_train, clients, PARTITION, SEED)
        self.ids = [f"client-{i}" for i in range(clients)]
        self.fraction = per_round / clients
        self.model = build_model("mlp", ds.input_shape, ds.num_classes, seed=SEED)
        self.current: dict[str, torch.Tensor] = {
            k: v.clone() for k, v in self.model.state_dict().items()}

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Train the round's clients one after another, average, evaluate."""
        import torch
        import torch.nn.functional as F

        from fedlearn.seeding import task_seed
        from fedlearn.strategies import sample_clients
        from fedlearn.training import epoch_orders

        t0 = time.perf_counter()
        model, x, y = self.model, self.train.x, self.train.y
        total = {k: torch.zeros_like(v) for k, v in self.current.items()}
        examples = 0
        for cid in sample_clients(self.ids, self.fraction, seed=SEED, round_number=rnd):
            idx = self.parts[int(cid.split("-")[1])]
            perm = epoch_orders(len(idx), 1, task_seed(SEED, rnd, cid))[0]
            order = torch.from_numpy(idx[perm])
            model.load_state_dict(self.current)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            for start in range(0, len(order), BATCH):
                b = order[start : start + BATCH]
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    total[k].add_(v, alpha=len(idx))
            examples += len(idx)
        self.current = {k: v / examples for k, v in total.items()}
        model.load_state_dict(self.current)
        with torch.no_grad():
            logits = model(self.test.x)
            accuracy = float((logits.argmax(1) == self.test.y).float().mean())
            test_loss = float(F.cross_entropy(logits, self.test.y))
        return {"round": rnd, "accuracy": accuracy, "loss": test_loss,
                "seconds": time.perf_counter() - t0, "examples": examples}


class Centralized:
    """Plain centralized training at batch 32 (``train_epochs``), in slices of the train set."""

    name = "centralized"

    def __init__(self, ds: Any, rows_per_round: int = 6400) -> None:
        import numpy as np

        from fedlearn.config import TrainConfig
        from fedlearn.models import build_model
        from fedlearn.training import make_optimizer

        self.ds = ds
        self.cfg = TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR)
        self.model = build_model("mlp", ds.input_shape, ds.num_classes, seed=SEED)
        self.opt = make_optimizer(self.model, self.cfg)
        self.order = np.random.default_rng(SEED).permutation(ds.train_size)
        self.size = rows_per_round

    def run_round(self, rnd: int) -> dict[str, Any]:
        """One slice of ``rows_per_round`` images (the next one each round)."""
        from fedlearn.training import Shard, train_epochs

        start = ((rnd - 1) * self.size) % (self.ds.train_size - self.size)
        shard = Shard.from_numpy(self.ds.x_train, self.ds.y_train,
                                 self.order[start : start + self.size])
        t0 = time.perf_counter()
        train_epochs(self.model, shard, self.cfg, seed=rnd, optimizer=self.opt)
        seconds = time.perf_counter() - t0
        return {"round": rnd, "seconds": seconds, "train_seconds": seconds,
                "examples": len(shard), "accuracy": float("nan")}


def interleaved(clients: int, per_round: int, rounds: int) -> dict[str, Any]:
    """Time every contender round by round, taking turns, so load on the machine hits all."""
    import numpy as np
    import torch

    from fedlearn.data import load_dataset
    from fedlearn.sim import Simulation

    ds = load_dataset("fashion-mnist")
    runners: list[Any] = [PlainLoop(ds, clients, per_round)]
    runners += [Simulation(sim_config(e, clients, per_round, rounds), task(),
                           log=lambda line: print(line, file=sys.stderr)) for e in ENGINES]
    runners.append(Centralized(ds))
    names = ["floor", *ENGINES, "centralized"]
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rnd in range(1, rounds + 1):
        shift = rnd % len(runners)
        for i in list(range(shift, len(runners))) + list(range(shift)):
            rows[names[i]].append(runners[i].run_round(rnd))
    seq, vec = runners[1].weights, runners[2].weights
    # The float noise floor: the sequential engine against itself on one thread,
    # whose matrix products round differently (not timed).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    again = Simulation(sim_config("sequential", clients, per_round, rounds), task())
    for rnd in range(1, rounds + 1):
        again.run_round(rnd)
    torch.set_num_threads(threads)

    def diff(a: dict[str, Any], b: dict[str, Any]) -> float:
        return max(float(np.abs(a[k] - b[k]).max()) for k in a)

    return {"rows": rows, "max_abs_model_difference": diff(seq, vec),
            "sequential_one_thread_difference": diff(seq, again.weights),
            "largest_weight": max(float(np.abs(v).max()) for v in seq.values())}


def alone(kind: str, clients: int, per_round: int, rounds: int, out: Path) -> dict[str, Any]:
    """One contender by itself in this process (for its peak memory); engines via run_simulation."""
    if kind == "floor":
        from fedlearn.data import load_dataset

        loop = PlainLoop(load_dataset("fashion-mnist"), clients, per_round)
        return {"rows": [loop.run_round(r) for r in range(1, rounds + 1)]}
    from fedlearn.runs import RunDir
    from fedlearn.sim import config_record, run_simulation

    config = sim_config(kind, clients, per_round, rounds)
    run = RunDir.create(out, config_record(config))
    run_simulation(config, task(), run, log=lambda line: print(line, file=sys.stderr))
    return {"rows": run.read_metrics()}


def child(args: argparse.Namespace) -> None:
    """Run one measurement in this (fresh) process; print its JSON on the last line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "interleaved":
        result = interleaved(args.clients, args.per_round, args.rounds)
    else:
        result = alone(args.child, args.clients, args.per_round, args.rounds, Path(args.out))
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def spawn(kind: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Run ``child`` for ``kind`` in a new process and return what it printed."""
    cmd = [sys.executable, __file__, "--child", kind, "--rounds", str(args.rounds),
           "--threads", str(args.threads)]
    for k, v in extra.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median round seconds, training samples per second and final accuracy of one run."""
    later = rows[1:] or rows
    out = {
        "median_round_seconds": median([r["seconds"] for r in later]),
        "final_accuracy": rows[-1]["accuracy"],
        "round_samples_per_second": sum(r["examples"] for r in later)
        / sum(r["seconds"] for r in later),
    }
    if "train_seconds" in later[0]:
        out["median_train_seconds"] = median([r["train_seconds"] for r in later])
        out["train_samples_per_second"] = sum(r["examples"] for r in later) / sum(
            r["train_seconds"] for r in later)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=(*KINDS, "interleaved"), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--per-round", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="w2-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        for clients, per_round in SCALES:
            scale = f"{clients}/{per_round}"
            print(f"{scale}: floor, engines and centralized taking turns, {args.rounds} rounds "
                  "...", flush=True)
            before = _cpu_clock()
            inter = spawn("interleaved", args, clients=clients, per_round=per_round)
            others = _others_share(before, _cpu_clock())
            res: dict[str, Any] = {
                kind: summarize(inter["rows"][kind]) for kind in (*KINDS, "centralized")}
            for key in ("max_abs_model_difference", "sequential_one_thread_difference",
                        "largest_weight"):
                res[key] = inter[key]
            for kind in KINDS:
                print(f"{scale}: {kind} alone (peak memory) ...", flush=True)
                one = spawn(kind, args, clients=clients, per_round=per_round,
                            out=work / f"{clients}-{kind}")
                res[kind]["peak_rss_mb"] = one["peak_rss_mb"]
                res[kind]["alone_median_round_seconds"] = summarize(one["rows"])[
                    "median_round_seconds"]
                res[kind]["alone_final_accuracy"] = one["rows"][-1]["accuracy"]
            res["other_processes_cpu_share"] = others
            results[scale] = res
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Print the tables and write the JSON."""
    rows, checks = [], []
    for scale, res in results.items():
        floor = res["floor"]["median_round_seconds"]
        cent = res["centralized"]["train_samples_per_second"]
        for kind in KINDS:
            r = res[kind]
            sps = r.get("train_samples_per_second")
            rows.append([
                scale, kind if kind != "floor" else "plain-loop floor",
                f"{r['median_round_seconds']:.3f}", f"{r['median_round_seconds'] / floor:.2f}x",
                f"{100 * r['final_accuracy']:.2f}%", f"{r['peak_rss_mb']:.0f}",
                f"{sps:,.0f}" if sps else "-", f"{sps / cent:.2f}x" if sps else "-",
                f"{r['round_samples_per_second']:,.0f}",
            ])
        rows.append([scale, "centralized (batch 32)", "-", "-", "-", "-", f"{cent:,.0f}",
                     "1.00x", "-"])
        seq, vec = res["sequential"], res["vectorized"]
        r_seq = seq["median_round_seconds"] / floor
        r_vec = vec["median_round_seconds"] / floor
        speedup = seq["median_round_seconds"] / vec["median_round_seconds"]
        to_cent = vec["train_samples_per_second"] / cent
        diff = res["max_abs_model_difference"]
        noise = res["sequential_one_thread_difference"]
        res["ratios"] = {"sequential_to_floor": r_seq, "vectorized_to_floor": r_vec,
                         "vectorized_speedup_over_sequential": speedup,
                         "vectorized_train_samples_per_second_to_centralized": to_cent}
        checks.append([scale, "max |sequential - vectorized| in the final model",
                       f"{diff:.2e}", f"float noise: < 1e-4 or <= 2x sequential 1-vs-"
                       f"{args.threads}-thread ({noise:.2e})",
                       _ok(diff < 1e-4 or diff <= 2 * noise)])
        gap = abs(seq["final_accuracy"] - vec["final_accuracy"])
        checks.append([scale, "|accuracy sequential - vectorized|",
                       f"{100 * gap:.2f} points", "<= 0.5 points", _ok(gap <= 0.005)])
        if scale == "100/10":
            checks.append([scale, "sequential / floor per round", f"{r_seq:.2f}x", "<= 1.15x",
                           _ok(r_seq <= 1.15)])
            checks.append([scale, "vectorized / floor per round", f"{r_vec:.2f}x", "<= 0.50x",
                           _ok(r_vec <= 0.5)])
        else:
            checks.append([scale, "sequential / vectorized per round", f"{speedup:.2f}x",
                           ">= 2.5x", _ok(speedup >= 2.5)])
            checks.append([scale, "vectorized peak resident memory",
                           f"{vec['peak_rss_mb']:.0f} MiB", "< 2048 MiB",
                           _ok(vec["peak_rss_mb"] < 2048)])
        checks.append([scale, "vectorized / centralized training samples per second",
                       f"{to_cent:.2f}x", ">= 1.2x", _ok(to_cent >= 1.2)])
    print(f"\nW2: Fashion-MNIST, {PARTITION}, SGD lr {LR}, batch {BATCH}, 1 local epoch, "
          f"{args.rounds} rounds, {args.threads} threads. Seconds per round: medians of "
          "rounds 2.. (training, FedAvg, test evaluation), all contenders taking turns in one "
          "process; peak memory from each run alone in a process of its own.")
    print(table(["clients/round", "engine", "s/round", "x floor",
                 f"acc @ round {args.rounds}", "peak RSS MiB", "train samples/s",
                 "x centralized", "round samples/s"], rows))
    busy = [f"{scale}: {100 * res['other_processes_cpu_share']:.0f}%"
            for scale, res in results.items() if res["other_processes_cpu_share"] > 0.1]
    if busy:
        print(f"warning: other processes used the CPUs while this ran ({', '.join(busy)} of "
              f"{os.cpu_count()} cores); absolute times are inflated, ratios less so.")
    print("\nChecks:")
    print(table(["scale", "measure", "value", "target", "ok"], checks))
    path = write_json("w2_hundred_clients", {
        "rounds": args.rounds, "threads": args.threads, "partition": PARTITION, "lr": LR,
        "batch_size": BATCH, "scales": results,
        "checks": [dict(zip(["scale", "measure", "value", "target", "ok"], c, strict=True))
                   for c in checks],
    })
    print(f"\nwrote {path}")


def _cpu_clock() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of our children, wall seconds)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return (float("nan"), 0.0, time.perf_counter())
    ticks = [int(f) for f in fields]
    busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (busy, kids.ru_utime + kids.ru_stime, time.perf_counter())


def _others_share(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """The share of all cores that processes other than ours used between ``a`` and ``b``."""
    wall = b[2] - a[2]
    others = (b[0] - a[0]) - (b[1] - a[1])
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    main()
