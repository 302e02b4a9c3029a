"""W2, W2-CNN and W2-CIFAR of BENCHMARKS.md: a hundred (and a thousand) simulated clients.

Dirichlet(0.5) label split among N clients (seed 0), K sampled per round,
1 local epoch, batch 32, SGD lr 0.05; at 100/10 and at 1,000/100. ``--model``
picks the workload:

* ``mlp`` (W2) and ``cnn`` (W2-CNN): Fashion-MNIST;
* ``cifar-cnn`` (W2-CIFAR): CIFAR-10 when fedlearn's ``cifar10`` loader finds
  it on this machine (no download), else random data of CIFAR-10's shape
  (3x32x32, 10 classes, 50,000 train / 10,000 test, seed 0) built here and
  labelled so everywhere; its accuracy is then meaningless (chance is 10%).

The contenders:

* the sequential and the vectorized engine (``Simulation``, the round loop
  behind ``fedlearn sim``: sampling, training, FedAvg, test evaluation);
* the plain-loop floor: the same sampled clients of the same model, trained
  one after another in a bare PyTorch loop with the same data order, then
  averaged and evaluated, with no framework around it;
* plain centralized training of the same model at batch 32 (``train_epochs``
  on slices of the training set), for samples per second.

For each scale all contenders run in one process taking turns round by round,
so that whatever else loads the machine hits them alike; their ratios are
taken from that run. Times are medians of the rounds after the first (round 1
when only one ran). Then
each engine and the floor run once more alone in a fresh process (engines
through ``run_simulation``, writing a run directory; at most ``--alone-rounds``
rounds; ``--alone`` picks which) for peak resident memory. When the two engines'
final models differ by 1e-4 or more, the sequential engine runs once more on
another thread count: that difference is the float-noise reference. Scales
measured by an earlier run of the same model and device stay in the JSON, so
1,000/100 can run on its own (``--scales 1000/100:1``).

It runs unchanged on a GPU (``--device cuda``): data and model move there
once, and the table's samples/s columns are the figures to read there (with
peak GPU memory). Results go to ``benchmarks/results/w2_hundred_clients.json``
(mlp) or ``w2_hundred_clients_<model>.json``, with ``_cuda`` on a GPU.

    python benchmarks/w2_hundred_clients.py                         # W2, mlp (a few minutes)
    python benchmarks/w2_hundred_clients.py --rounds 5              # a quick look
    python benchmarks/w2_hundred_clients.py --model cnn --scales 100/10:5,1000/100:2
    python benchmarks/w2_hundred_clients.py --model cifar-cnn --rounds 3
    python benchmarks/w2_hundred_clients.py --model cnn --device cuda --rounds 20
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
from w2_contenders import (
    BATCH,
    LR,
    PARTITION,
    RANDOM_CIFAR,
    SEED,
    Centralized,
    PlainLoop,
    workload,
)

MODELS = ("mlp", "cnn", "cifar-cnn")
#: The scales each model runs at unless --scales says otherwise.
DEFAULT_SCALES = {"mlp": "100/10,1000/100", "cnn": "100/10,1000/100", "cifar-cnn": "100/10"}
ENGINES = ("sequential", "vectorized")
KINDS = ("floor", *ENGINES)
#: The bars of BENCHMARKS.md and issue #10: (model, scale) -> [(measure, bound)].
#: ``vec/floor`` and ``seq/floor`` at most the bound, ``seq/vec`` at least it,
#: ``vec MiB`` (the vectorized engine's peak resident memory alone) at most it, and
#: ``vec/cent`` (its training samples/s over centralized training's) at least it.
BARS: dict[tuple[str, str], list[tuple[str, float]]] = {
    ("mlp", "100/10"): [("vec/floor", 0.4), ("seq/floor", 1.15), ("vec/cent", 1.2)],
    ("mlp", "1000/100"): [("seq/vec", 2.5), ("vec MiB", 2048.0), ("vec/cent", 1.2)],
    ("cnn", "100/10"): [("vec/floor", 0.6), ("seq/vec", 2.0)],
    ("cnn", "1000/100"): [("vec/floor", 0.6), ("seq/vec", 2.0), ("vec MiB", 4096.0)],
}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sim_config(args: argparse.Namespace, engine: str, clients: int, per_round: int,
               rounds: int) -> Any:
    """The W2 run for one engine, as ``fedlearn sim`` flags would make it."""
    from fedlearn.config import TrainConfig
    from fedlearn.sim import SimConfig

    return SimConfig(
        clients=clients, per_round=per_round, partition=PARTITION, rounds=rounds,
        engine=engine, dataset="cifar10" if args.model == "cifar-cnn" else "fashion-mnist",
        model=args.model, seed=SEED, max_parallel=args.max_parallel,
        precision=args.precision,
        train=TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR),
    )


def interleaved(args: argparse.Namespace, clients: int, per_round: int,
                rounds: int) -> dict[str, Any]:
    """Time every contender round by round, taking turns, so load on the machine hits all."""
    import numpy as np
    import torch

    from fedlearn.sim import Simulation

    ds, task, data = workload(args.model)
    runners: list[Any] = [PlainLoop(ds, task, clients, per_round, args.device)]
    runners += [Simulation(sim_config(args, e, clients, per_round, rounds), task,
                           device=args.device, log=lambda line: print(line, file=sys.stderr))
                for e in ENGINES]
    runners.append(Centralized(ds, task, args.device))
    names = ["floor", *ENGINES, "centralized"]
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rnd in range(1, rounds + 1):
        shift = rnd % len(runners)
        for i in list(range(shift, len(runners))) + list(range(shift)):
            rows[names[i]].append(runners[i].run_round(rnd))
    seq, vec = runners[1].weights, runners[2].weights

    def diff(a: dict[str, Any], b: dict[str, Any]) -> float:
        return max(float(np.abs(a[k] - b[k]).max()) for k in a)

    out: dict[str, Any] = {"rows": rows, "data": data,
                           "max_abs_model_difference": diff(seq, vec),
                           "vectorized_engine": type(runners[2].engine).__name__,
                           "largest_weight": max(float(np.abs(v).max()) for v in seq.values())}
    if out["max_abs_model_difference"] >= 1e-4 and args.device == "cpu" and args.noise:
        # The float noise floor: the sequential engine against itself on another thread
        # count, whose products add in another order (not timed; only when needed).
        threads = torch.get_num_threads()
        other = 1 if threads > 1 else 2
        torch.set_num_threads(other)
        again = Simulation(sim_config(args, "sequential", clients, per_round, rounds), task)
        for rnd in range(1, rounds + 1):
            again.run_round(rnd)
        torch.set_num_threads(threads)
        out["sequential_other_threads_difference"] = diff(seq, again.weights)
        out["noise_threads"] = f"{other} vs {threads}"
    return out


def alone(args: argparse.Namespace, kind: str, clients: int, per_round: int,
          rounds: int, out: Path) -> dict[str, Any]:
    """One contender by itself in this process (for its peak memory); engines via run_simulation."""
    ds, task, _ = workload(args.model)
    if kind == "floor":
        loop = PlainLoop(ds, task, clients, per_round, args.device)
        return {"rows": [loop.run_round(r) for r in range(1, rounds + 1)]}
    from fedlearn.runs import RunDir
    from fedlearn.sim import config_record, run_simulation

    config = sim_config(args, kind, clients, per_round, rounds)
    run = RunDir.create(out, config_record(config))
    run_simulation(config, task, run, device=args.device,
                   log=lambda line: print(line, file=sys.stderr))
    return {"rows": run.read_metrics()}


def child(args: argparse.Namespace) -> None:
    """Run one measurement in this (fresh) process; print its JSON on the last line."""
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "interleaved":
        result = interleaved(args, args.clients, args.per_round, args.rounds)
    else:
        result = alone(args, args.child, args.clients, args.per_round, args.rounds,
                       Path(args.out))
    result["peak_rss_mb"] = peak_rss_mb()
    if args.device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def spawn(kind: str, args: argparse.Namespace, rounds: int, **extra: Any) -> dict[str, Any]:
    """Run ``child`` for ``kind`` in a new process and return what it printed.

    The engines' one-line notices (clients stacked at once, fallbacks) are passed on.
    """
    cmd = [sys.executable, __file__, "--child", kind, "--rounds", str(rounds),
           "--threads", str(args.threads), "--model", args.model, "--device", args.device,
           "--precision", args.precision]
    if args.max_parallel is not None:
        cmd += ["--max-parallel", str(args.max_parallel)]
    for k, v in extra.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"the {kind} run failed (exit {res.returncode})")
    for line in res.stderr.splitlines():
        if line.startswith(("vectorized:", "note:")):
            print(f"  {line}", flush=True)
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


def parse_scales(text: str, rounds: int) -> list[tuple[int, int, int]]:
    """``100/10,1000/100:2`` -> [(100, 10, rounds), (1000, 100, 2)]."""
    out = []
    for item in text.split(","):
        scale, _, r = item.strip().partition(":")
        n, _, k = scale.partition("/")
        try:
            out.append((int(n), int(k), int(r) if r else rounds))
        except ValueError:
            raise SystemExit(f"--scales: {item!r} is not N/K or N/K:ROUNDS") from None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mlp")
    parser.add_argument("--rounds", type=int, default=20,
                        help="rounds per scale (default 20) unless --scales gives them")
    parser.add_argument("--scales", default=None,
                        help="N/K[:ROUNDS] list, e.g. 100/10,1000/100:2 (default: 100/10 and "
                        "1000/100; cifar-cnn 100/10)")
    parser.add_argument("--alone-rounds", type=int, default=2,
                        help="rounds of each run alone, for peak memory (default 2)")
    parser.add_argument("--alone", default=",".join(KINDS),
                        help="contenders run alone for peak memory (default all; 'none')")
    parser.add_argument("--no-noise", dest="noise", action="store_false",
                        help="skip the sequential rerun on another thread count that gives "
                        "the float-noise reference (run only when the engines differ by 1e-4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the engines' precision (the floor stays fp32)")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="clients the vectorized engine stacks at once (default: it picks)")
    parser.add_argument("--child", choices=(*KINDS, "interleaved"), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--per-round", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    scales = parse_scales(args.scales or DEFAULT_SCALES[args.model], args.rounds)
    alone_kinds = [k for k in args.alone.split(",") if k in KINDS]
    work = Path(tempfile.mkdtemp(prefix="w2-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        for clients, per_round, rounds in scales:
            scale = f"{clients}/{per_round}"
            print(f"{args.model} {scale}: floor, engines and centralized taking turns, "
                  f"{rounds} rounds ...", flush=True)
            before = _cpu_clock()
            inter = spawn("interleaved", args, rounds, clients=clients, per_round=per_round)
            others = _others_share(before, _cpu_clock())
            res: dict[str, Any] = {
                kind: summarize(inter["rows"][kind]) for kind in (*KINDS, "centralized")}
            res["rounds"] = rounds
            for key in ("data", "vectorized_engine", "max_abs_model_difference",
                        "sequential_other_threads_difference", "noise_threads",
                        "largest_weight"):
                if key in inter:
                    res[key] = inter[key]
            for kind in alone_kinds:
                n = min(rounds, args.alone_rounds)
                print(f"{args.model} {scale}: {kind} alone for {n} rounds (peak memory) ...",
                      flush=True)
                one = spawn(kind, args, n, clients=clients, per_round=per_round,
                            out=work / f"{clients}-{kind}")
                res[kind]["peak_rss_mb"] = one["peak_rss_mb"]
                if "peak_gpu_mb" in one:
                    res[kind]["peak_gpu_mb"] = one["peak_gpu_mb"]
                res[kind]["alone_median_round_seconds"] = summarize(one["rows"])[
                    "median_round_seconds"]
            res["other_processes_cpu_share"] = others
            results[scale] = res
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, results)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ratios(res: dict[str, Any]) -> dict[str, float]:
    floor = res["floor"]["median_round_seconds"]
    seq, vec = res["sequential"]["median_round_seconds"], res["vectorized"]["median_round_seconds"]
    cent = res["centralized"]["train_samples_per_second"]
    return {"sequential_to_floor": seq / floor, "vectorized_to_floor": vec / floor,
            "sequential_to_vectorized": seq / vec,
            "vectorized_train_samples_per_second_to_centralized":
                res["vectorized"]["train_samples_per_second"] / cent}


def _bar_lines(model: str, scale: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    """The PASS/FAIL checks of one scale: the workload's bars and the same-model checks."""
    r = res["ratios"]
    measured = {"vec/floor": (r["vectorized_to_floor"], "vectorized / floor per round", "x"),
                "seq/floor": (r["sequential_to_floor"], "sequential / floor per round", "x"),
                "seq/vec": (r["sequential_to_vectorized"],
                            "sequential / vectorized per round (speed-up)", "x"),
                "vec MiB": (res["vectorized"].get("peak_rss_mb", float("nan")),
                            "vectorized peak resident memory", " MiB"),
                "vec/cent": (r["vectorized_train_samples_per_second_to_centralized"],
                             "vectorized / centralized training samples per second", "x")}
    lines = []
    for key, bound in BARS.get((model, scale), []):
        value, what, unit = measured[key]
        at_least = key in ("seq/vec", "vec/cent")
        ok = None if value != value else value >= bound if at_least else value <= bound
        fmt = ".0f" if unit == " MiB" else ".2f"
        lines.append({"scale": scale, "measure": what, "value": value, "ok": ok,
                      "text": f"{value:{fmt}}{unit} (bar: {'>=' if at_least else '<='} "
                              f"{bound:{fmt}}{unit})"})
    diff = res["max_abs_model_difference"]
    noise = res.get("sequential_other_threads_difference")
    ok = diff < 1e-4 or (noise is not None and diff <= 2 * noise)
    lines.append({"scale": scale, "measure": "max |sequential - vectorized| in the final model",
                  "value": diff, "ok": ok,
                  "text": f"{diff:.2e} (bar: < 1e-4" + (
                      f", or <= 2x the sequential engine's {res['noise_threads']} thread "
                      f"difference {noise:.2e})" if noise is not None
                      else ")")})
    gap = abs(res["sequential"]["final_accuracy"] - res["vectorized"]["final_accuracy"])
    lines.append({"scale": scale, "measure": "|accuracy sequential - vectorized|",
                  "value": gap, "ok": gap <= 0.005,
                  "text": f"{100 * gap:.2f} points (bar: <= 0.5 points)"})
    return lines


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Print the tables and the PASS/FAIL lines, and write the JSON."""
    gpu = args.device.startswith("cuda")
    rows, checks = [], []
    data = next(iter(results.values()))["data"]
    for scale, res in results.items():
        floor = res["floor"]["median_round_seconds"]
        cent = res["centralized"]["train_samples_per_second"]
        res["ratios"] = _ratios(res)
        for kind in KINDS:
            r = res[kind]
            sps = r["train_samples_per_second"]
            label = {"floor": "plain-loop floor", "vectorized":
                     f"vectorized ({res['vectorized_engine']})"}.get(kind, kind)
            rows.append([
                scale, label, f"{r['median_round_seconds']:.3f}",
                f"{r['median_round_seconds'] / floor:.2f}x",
                f"{100 * r['final_accuracy']:.2f}%", _mib(r.get("peak_rss_mb")),
                *([_mib(r.get("peak_gpu_mb"))] if gpu else []),
                f"{sps:,.0f}", f"{sps / cent:.2f}x", f"{r['round_samples_per_second']:,.0f}",
            ])
        rows.append([scale, "centralized (batch 32)", "-", "-", "-", "-",
                     *(["-"] if gpu else []), f"{cent:,.0f}", "1.00x", "-"])
        checks += _bar_lines(args.model, scale, res)
    device = args.device + (f", {args.precision}" if args.precision != "fp32" else "")
    print(f"\nW2 ({args.model}): {data}, {PARTITION}, SGD lr {LR}, batch {BATCH}, 1 local "
          f"epoch, {args.threads} threads, {device}. Seconds per round: medians of rounds 2.. "
          "(training, FedAvg, test evaluation), all contenders taking turns in one process; "
          "peak memory from each run alone in a process of its own.")
    if data == RANDOM_CIFAR:
        print(f"Data: {RANDOM_CIFAR} (CIFAR-10 was not found here); accuracy is meaningless "
              "(chance is 10%), the times are what to read.")
    print(table(["clients/round", "contender", "s/round", "x floor", "acc @ last round",
                 "peak RSS MiB", *(["peak GPU MiB"] if gpu else []), "train samples/s",
                 "x centralized", "round samples/s"], rows))
    for scale, res in results.items():
        r = res["ratios"]
        print(f"{scale} ({res['rounds']} rounds): vectorized / floor "
              f"{r['vectorized_to_floor']:.2f}x, sequential / vectorized "
              f"{r['sequential_to_vectorized']:.2f}x, vectorized "
              f"{res['vectorized']['train_samples_per_second']:,.0f} train samples/s")
    busy = [f"{scale}: {100 * res['other_processes_cpu_share']:.0f}%"
            for scale, res in results.items() if res["other_processes_cpu_share"] > 0.1]
    if busy:
        print(f"warning: other processes used the CPUs while this ran ({', '.join(busy)} of "
              f"{os.cpu_count()} cores); absolute times are inflated, ratios less so.")
    print()
    for c in checks:
        verdict = "SKIP" if c["ok"] is None else "PASS" if c["ok"] else "FAIL"
        print(f"{verdict}  {args.model} {c['scale']}: {c['measure']}: "
              f"{c['text']}")
    name = "w2_hundred_clients" + ("" if args.model == "mlp" else f"_{args.model}") + (
        "_cuda" if gpu else "")
    for scale, res in results.items():
        res.update(threads=args.threads, precision=args.precision,
                   max_parallel=args.max_parallel, alone_rounds=args.alone_rounds,
                   date=time.strftime("%Y-%m-%d %H:%M:%S"),
                   checks=[{k: c[k] for k in ("scale", "measure", "value", "text", "ok")}
                           for c in checks if c["scale"] == scale])
    # Scales measured by an earlier run (e.g. 1,000/100 run on its own) stay in the file.
    scales = {s: r for s, r in _earlier_scales(name, args.device).items() if s not in results}
    for scale, res in scales.items():
        print(f"kept from an earlier run: {scale} ({res['date']}, {res['rounds']} rounds)")
    scales.update(results)
    path = write_json(name, {
        "model": args.model, "data": data, "device": args.device, "partition": PARTITION,
        "lr": LR, "batch_size": BATCH, "scales": scales,
        "checks": [c for res in scales.values() for c in res["checks"]],
    })
    print(f"\nwrote {path}")


def _earlier_scales(name: str, device: str) -> dict[str, Any]:
    """The per-scale results already in ``results/<name>.json`` (this format, same device)."""
    from common import RESULTS

    try:
        found = json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    if found.get("device") != device or "model" not in found:
        return {}
    kept = {}
    for scale, res in found.get("scales", {}).items():
        if "checks" not in res:  # written before the per-scale fields
            res = {**res, "threads": found.get("threads"), "date": found["machine"]["date"],
                   "checks": [c for c in found.get("checks", []) if c["scale"] == scale]}
        kept[scale] = res
    return kept


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


if __name__ == "__main__":
    main()
