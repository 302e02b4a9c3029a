"""W2 of BENCHMARKS.md: a hundred (and a thousand) simulated clients on one machine.

Fashion-MNIST split among N clients by Dirichlet(0.5) (seed 0), K sampled per
round, 1 local epoch, batch 32, SGD lr 0.05, 20 rounds; at 100/10 and at
1,000/100. For each scale it runs, each in its own process (so each peak
resident memory is its own):

* ``fedlearn sim`` with the sequential engine and with the vectorized engine
  (``run_simulation``, the code behind the command);
* the plain-loop floor: the same sampled clients, trained one after another
  in a bare PyTorch loop with the same data order, then averaged and
  evaluated, with no framework around it;

and once, plain centralized training of the same model at batch 32
(``train_epochs`` over all 60,000 images) for samples per second. Times are
medians of the rounds after the first; ratios are taken within this run.

    python benchmarks/w2_hundred_clients.py              # the full workload (a few minutes)
    python benchmarks/w2_hundred_clients.py --rounds 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
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
KINDS = ("floor", "sequential", "vectorized")
PARTITION = "dirichlet:0.5"
LR = 0.05
BATCH = 32
SEED = 0


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(engine: str, clients: int, per_round: int, rounds: int, out: Path) -> dict[str, Any]:
    """One simulated run, as ``fedlearn sim`` does it; rows of metrics.jsonl."""
    from fedlearn.config import TrainConfig
    from fedlearn.runs import RunDir
    from fedlearn.sim import SimConfig, config_record, run_simulation

    config = SimConfig(
        clients=clients, per_round=per_round, partition=PARTITION, rounds=rounds,
        engine=engine, dataset="fashion-mnist", model="mlp", seed=SEED,
        train=TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR),
    )
    run = RunDir.create(out, config_record(config))
    run_simulation(config, run, log=lambda line: print(line, file=sys.stderr))
    return {"rows": run.read_metrics(), "model": str(out / "model.safetensors")}


def run_floor(clients: int, per_round: int, rounds: int) -> dict[str, Any]:
    """The plain-loop floor: bare PyTorch, same clients and data order, no framework."""
    import torch
    import torch.nn.functional as F

    from fedlearn.data import load_dataset, partition
    from fedlearn.models import build_model
    from fedlearn.seeding import task_seed
    from fedlearn.strategies import sample_clients
    from fedlearn.training import Shard, epoch_orders

    ds = load_dataset("fashion-mnist")
    train, test = Shard.from_numpy(ds.x_train, ds.y_train), Shard.from_numpy(ds.x_test, ds.y_test)
    parts = partition(ds.y_train, clients, PARTITION, SEED)
    ids = [f"client-{i}" for i in range(clients)]
    model = build_model("mlp", ds.input_shape, ds.num_classes, seed=SEED)
    current = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        sampled = sample_clients(ids, per_round / clients, seed=SEED, round_number=rnd)
        total = {k: torch.zeros_like(v) for k, v in current.items()}
        examples = 0
        for cid in sampled:
            idx = parts[int(cid.split("-")[1])]
            order = torch.from_numpy(idx[epoch_orders(len(idx), 1, task_seed(SEED, rnd, cid))[0]])
            model.load_state_dict(current)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            for start in range(0, len(order), BATCH):
                b = order[start : start + BATCH]
                loss = F.cross_entropy(model(train.x[b]), train.y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    total[k].add_(v, alpha=len(idx))
            examples += len(idx)
        current = {k: v / examples for k, v in total.items()}
        model.load_state_dict(current)
        with torch.no_grad():
            logits = model(test.x)
            accuracy = float((logits.argmax(1) == test.y).float().mean())
            test_loss = float(F.cross_entropy(logits, test.y))
        rows.append({"round": rnd, "accuracy": accuracy, "loss": test_loss,
                     "seconds": time.perf_counter() - t0, "examples": examples})
    return {"rows": rows}


def run_centralized(epochs: int = 1) -> dict[str, Any]:
    """Samples per second of plain centralized training (all 60,000 images, batch 32)."""
    from fedlearn.config import TrainConfig
    from fedlearn.data import load_dataset
    from fedlearn.models import build_model
    from fedlearn.training import Shard, make_optimizer, train_epochs

    ds = load_dataset("fashion-mnist")
    model = build_model("mlp", ds.input_shape, ds.num_classes, seed=SEED)
    cfg = TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR)
    opt = make_optimizer(model, cfg)
    warm = Shard.from_numpy(ds.x_train, ds.y_train, list(range(3200)))
    train_epochs(model, warm, cfg, seed=SEED, optimizer=opt)
    full = Shard.from_numpy(ds.x_train, ds.y_train)
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        train_epochs(model, full, cfg, seed=SEED + epoch, optimizer=opt)
        times.append(time.perf_counter() - t0)
    return {"samples_per_second": len(full) / median(times), "epoch_seconds": times}


def child(args: argparse.Namespace) -> None:
    """Run one measurement in this (fresh) process; print its JSON on the last line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "centralized":
        result = run_centralized()
    elif args.child == "floor":
        result = run_floor(args.clients, args.per_round, args.rounds)
    else:
        result = run_engine(args.child, args.clients, args.per_round, args.rounds, Path(args.out))
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


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Median round seconds, training samples per second and final accuracy of one run."""
    rows = result["rows"]
    later = rows[1:] or rows
    out = {
        "median_round_seconds": median([r["seconds"] for r in later]),
        "final_accuracy": rows[-1]["accuracy"],
        "peak_rss_mb": result["peak_rss_mb"],
        "round_samples_per_second": sum(r["examples"] for r in later)
        / sum(r["seconds"] for r in later),
    }
    if "train_seconds" in later[0]:
        out["median_train_seconds"] = median([r["train_seconds"] for r in later])
        out["train_samples_per_second"] = sum(r["examples"] for r in later) / sum(
            r["train_seconds"] for r in later)
    return out


def max_diff(a: str, b: str) -> float:
    """Largest absolute difference between two saved models."""
    import numpy as np

    from fedlearn.runs import load_model_file

    wa, wb = load_model_file(Path(a)), load_model_file(Path(b))
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=(*KINDS, "centralized"), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--per-round", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="w2-"))
    results: dict[str, dict[str, Any]] = {}
    models: dict[str, dict[str, str]] = {}
    try:
        for clients, per_round in SCALES:
            scale = f"{clients}/{per_round}"
            results[scale], models[scale] = {}, {}
            for kind in KINDS:
                print(f"{scale}: {kind}, {args.rounds} rounds ...", flush=True)
                raw = spawn(kind, args, clients=clients, per_round=per_round,
                            out=work / f"{clients}-{kind}")
                results[scale][kind] = summarize(raw)
                if "model" in raw:
                    models[scale][kind] = raw["model"]
            diff = max_diff(models[scale]["sequential"], models[scale]["vectorized"])
            results[scale]["max_abs_model_difference"] = {"value": diff}
        print("centralized training, 1 epoch ...", flush=True)
        central = spawn("centralized", args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, results, central)


def report(args: argparse.Namespace, results: dict[str, Any], central: dict[str, Any]) -> None:
    """Print the tables and write the JSON."""
    cent_sps = float(central["samples_per_second"])
    rows, checks = [], []
    for scale, res in results.items():
        floor = res["floor"]["median_round_seconds"]
        for kind in KINDS:
            r = res[kind]
            sps = r.get("train_samples_per_second")
            rows.append([
                scale, kind if kind != "floor" else "plain-loop floor",
                f"{r['median_round_seconds']:.3f}", f"{r['median_round_seconds'] / floor:.2f}x",
                f"{100 * r['final_accuracy']:.2f}%", f"{r['peak_rss_mb']:.0f}",
                f"{sps:,.0f}" if sps else "-", f"{sps / cent_sps:.2f}x" if sps else "-",
                f"{r['round_samples_per_second']:,.0f}",
            ])
        seq, vec = res["sequential"], res["vectorized"]
        r_seq = seq["median_round_seconds"] / floor
        r_vec = vec["median_round_seconds"] / floor
        speedup = seq["median_round_seconds"] / vec["median_round_seconds"]
        diff = res["max_abs_model_difference"]["value"]
        res["ratios"] = {"sequential_to_floor": r_seq, "vectorized_to_floor": r_vec,
                         "vectorized_speedup_over_sequential": speedup,
                         "vectorized_train_samples_per_second_to_centralized":
                         vec["train_samples_per_second"] / cent_sps}
        checks.append([scale, "max |sequential - vectorized| in the final model",
                       f"{diff:.2e}", "< 1e-3", _ok(diff < 1e-3)])
        if scale == "100/10":
            checks.append([scale, "sequential / floor", f"{r_seq:.2f}x", "<= 1.15x",
                           _ok(r_seq <= 1.15)])
            checks.append([scale, "vectorized / floor", f"{r_vec:.2f}x", "<= 0.50x",
                           _ok(r_vec <= 0.5)])
        else:
            checks.append([scale, "sequential / vectorized per round", f"{speedup:.2f}x",
                           ">= 2.5x", _ok(speedup >= 2.5)])
            checks.append([scale, "vectorized peak resident memory",
                           f"{vec['peak_rss_mb']:.0f} MiB", "< 2048 MiB",
                           _ok(vec["peak_rss_mb"] < 2048)])
        ratio = vec["train_samples_per_second"] / cent_sps
        checks.append([scale, "vectorized / centralized samples per second", f"{ratio:.2f}x",
                       ">= 1.2x", _ok(ratio >= 1.2)])
    print(f"\nW2: Fashion-MNIST, {PARTITION}, SGD lr {LR}, batch {BATCH}, 1 local epoch, "
          f"{args.rounds} rounds, {args.threads} threads. Seconds per round are medians of "
          "rounds 2.. (training, FedAvg and test evaluation).")
    print(table(["clients/round", "engine", "s/round", "x floor",
                 f"acc @ round {args.rounds}", "peak RSS MiB", "train samples/s",
                 "x centralized", "round samples/s"], rows))
    print(f"\nplain centralized training at batch 32: {cent_sps:,.0f} samples/s "
          f"(peak RSS {central['peak_rss_mb']:.0f} MiB)")
    print("\nChecks:")
    print(table(["scale", "measure", "value", "target", "ok"], checks))
    path = write_json("w2_hundred_clients", {
        "rounds": args.rounds, "threads": args.threads, "partition": PARTITION, "lr": LR,
        "batch_size": BATCH, "scales": results, "centralized": central,
        "checks": [dict(zip(["scale", "measure", "value", "target", "ok"], c, strict=True))
                   for c in checks],
    })
    print(f"\nwrote {path}")


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    main()
