"""W5 of BENCHMARKS.md: robust aggregation against attackers, in the simulator.

Fashion-MNIST ``mlp``, 20 clients split by Dirichlet(0.5) (seed 0), all 20
sampled every round, 1 local epoch, batch 32, SGD lr 0.05, 30 rounds; 20% of
the clients (4) attack in every round. Rows are attacks, columns aggregation
rules; each cell is the test accuracy of the global model after the last
round. Every cell is one ``Simulation`` (the round loop behind ``fedlearn
sim``, vectorized ``mlp`` engine), run one after another in this process.

Attack strengths (see the README's Attacks section for what each does):

* ``sign-flip`` (-1x the delta) only slows FedAvg down: with f = 0.2 the
  round keeps about 0.6 of its step. ``sign-flip:4`` is the smallest factor
  that cancels the honest step (1 - f - 4f = 0), so the attackers' non-IID
  deltas then steer the model.
* ``scale:10`` boosts the attackers' deltas tenfold (boosting / model
  replacement); ``gaussian:1`` sends N(0, 1) noise; ``same-value:100`` is the
  value of Li et al. 2019; ``label-flip`` trains on labels 9 - y.

Rules are tuned to the known f = 4 attackers of n = 20: ``trimmed-mean:0.2``
cuts 4 from each end, ``krum:4``, ``multi-krum:4:16`` (averages the n - f
best), ``bulyan:4`` (n = 20 >= 4f + 3 = 19, so it can run), and
``norm-bounding`` with ``--clip-norm 1.0`` (about the median honest delta norm
over the first rounds here: 2.0, 1.3, 0.8, 0.7, ... in rounds 1-5).

Goals: for every attack, the best robust rule within 3 points of clean
FedAvg; each robust rule's clean accuracy within 2 points of clean FedAvg.

The cells are written to the JSON as they finish; ``--merge`` keeps cells
already there from a run with the same settings, so a long table can be
filled in several shorter runs (``--attacks``/``--rules`` pick cells).
Training runs on ``--threads`` threads (default 1: on a shared 2-core
machine a second thread measured 3-5x slower per round, not faster).

    python benchmarks/w5_robustness.py                 # the full table (about 0.4-1.5 s a round)
    python benchmarks/w5_robustness.py --rounds 10     # a quicker look
    python benchmarks/w5_robustness.py --attacks none,sign-flip:4 --merge
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import kept_cells, run_rounds, table, write_json

NAME = "w5_robustness"
CLIENTS = 20
ATTACKERS = 0.2
PARTITION = "dirichlet:0.5"
LR = 0.05
BATCH = 32
SEED = 0
#: Rows: (label, --attack spec); "none" is the clean run.
ATTACKS = ["none", "sign-flip", "sign-flip:4", "scale:10", "gaussian:1", "label-flip",
           "same-value:100"]
#: Columns: strategy specs (norm-bounding takes --clip-norm).
RULES = ["fedavg", "median", "trimmed-mean:0.2", "krum:4", "multi-krum:4:16", "bulyan:4",
         "norm-bounding"]
#: Why a rule cannot be expected to match clean FedAvg on this non-IID split.
WHY_NOT = {
    "krum:4": "Krum keeps one client's delta a round; under Dirichlet(0.5) that is one "
              "skewed slice of the labels, so each round's step comes from a twentieth of the data",
    "median": "the coordinate-wise median of 20 non-IID deltas is not their mean (and is "
              "unweighted); it lags FedAvg on skewed splits (Yin et al. assume IID)",
    "bulyan:4": "per coordinate Bulyan averages the 4 values closest to the median of 12 "
                "Krum-selected deltas: it inherits the median's and Krum's bias on non-IID data",
    "trimmed-mean:0.2": "it discards the 8 most extreme of 20 honest values per coordinate "
                        "even when no one attacks",
}


def sim_config(rule: str, attack: str, rounds: int, clip_norm: float) -> Any:
    """One W5 cell, as ``fedlearn sim`` flags would make it."""
    from fedlearn.config import TrainConfig
    from fedlearn.sim import SimConfig

    return SimConfig(
        clients=CLIENTS, per_round=CLIENTS, partition=PARTITION, rounds=rounds,
        engine="vectorized", dataset="fashion-mnist", model="mlp", seed=SEED, strategy=rule,
        clip_norm=clip_norm if rule == "norm-bounding" else None,
        attack="" if attack == "none" else attack,
        attackers=None if attack == "none" else ATTACKERS,
        train=TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR),
    )


def run_cell(rule: str, attack: str, rounds: int, clip_norm: float) -> dict[str, Any]:
    """Simulate one cell; its final accuracy, curve, failed rounds and timing."""
    from fedlearn.sim import Simulation
    from fedlearn.tasks import builtin_task

    said: list[str] = []
    sim = Simulation(sim_config(rule, attack, rounds, clip_norm),
                     builtin_task("fashion-mnist", "mlp"), log=said.append)
    cell = run_rounds(sim, rounds)
    seconds = cell.pop("round_seconds")
    return {**cell, "attackers": sorted(sim.attackers.ids), "notices": said,
            "median_round_seconds": sorted(seconds)[len(seconds) // 2]}


def pick(text: str | None, known: list[str], what: str) -> list[str]:
    """The comma-separated subset ``text`` of ``known`` (all when None)."""
    if text is None:
        return list(known)
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in chosen if t not in known]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; choose from {', '.join(known)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--attacks", help=f"comma-separated rows (default all: {ATTACKS})")
    parser.add_argument("--rules", help=f"comma-separated columns (default all: {RULES})")
    parser.add_argument("--merge", action="store_true",
                        help="keep cells of the existing JSON measured with the same settings")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    attacks = pick(args.attacks, ATTACKS, "attack")
    rules = pick(args.rules, RULES, "rule")
    setup = {"clients": CLIENTS, "per_round": CLIENTS, "attackers": ATTACKERS,
             "partition": PARTITION, "lr": LR, "batch_size": BATCH, "local_epochs": 1,
             "optimizer": "sgd", "seed": SEED, "rounds": args.rounds,
             "clip_norm": args.clip_norm}
    cells = kept_cells(NAME, setup) if args.merge else {}
    for attack in attacks:
        for rule in rules:
            key = f"{attack}|{rule}"
            if key in cells:
                continue
            cell = run_cell(rule, attack, args.rounds, args.clip_norm)
            cells[key] = cell
            fails = f", failed rounds {cell['failed_rounds']}" if cell["failed_rounds"] else ""
            print(f"{attack:>15} {rule:>17}: {100 * cell['final_accuracy']:6.2f}%  "
                  f"({cell['seconds']:.0f} s, {cell['median_round_seconds']:.2f} s/round{fails})",
                  flush=True)
            write_json(NAME, {"setup": setup, "threads": args.threads, "cells": cells})
    report(args, setup, cells)


def report(args: argparse.Namespace, setup: dict[str, Any], cells: dict[str, Any]) -> None:
    """Print the table and the goal lines; write the JSON with them."""
    rows = []
    for attack in ATTACKS:
        if not any(f"{attack}|{r}" in cells for r in RULES):
            continue
        row = [attack]
        for rule in RULES:
            cell = cells.get(f"{attack}|{rule}")
            if cell is None:
                row.append("-")
                continue
            mark = f" ({len(cell['failed_rounds'])} failed)" if cell["failed_rounds"] else ""
            row.append(f"{100 * cell['final_accuracy']:.2f}%{mark}")
        rows.append(row)
    print(f"\nW5: Fashion-MNIST mlp, {CLIENTS} clients, {PARTITION}, all sampled, "
          f"{args.rounds} rounds, {int(ATTACKERS * 100)}% attackers, SGD lr {LR}, batch {BATCH}, "
          f"1 local epoch; norm-bounding --clip-norm {args.clip_norm:g}. Test accuracy after "
          "the last round (\"failed\": rounds whose aggregate was unusable and was dropped).")
    print(table(["attack", *RULES], rows))
    lines = goals(cells)
    print()
    for line in lines:
        print(line)
    times = [c["median_round_seconds"] for c in cells.values()]
    if times:
        print(f"\nmedian seconds per round over the cells: {sorted(times)[len(times) // 2]:.2f} "
              f"({args.threads} thread{'s' if args.threads > 1 else ''})")
    path = write_json(NAME, {"setup": setup, "threads": args.threads, "cells": cells,
                             "goals": lines})
    print(f"wrote {path}")


def goals(cells: dict[str, Any]) -> list[str]:
    """PASS/FAIL lines of W5's two goals, from the cells measured so far."""
    clean = cells.get("none|fedavg")
    if clean is None:
        return ["(no clean FedAvg cell yet: the goals compare against it)"]
    base = clean["final_accuracy"]
    robust = [r for r in RULES if r != "fedavg"]
    out = []
    for attack in ATTACKS[1:]:
        got = {r: cells[f"{attack}|{r}"]["final_accuracy"] for r in robust
               if f"{attack}|{r}" in cells}
        if not got:
            continue
        best = max(got, key=lambda r: got[r])
        gap = 100 * (base - got[best])
        fedavg = cells.get(f"{attack}|fedavg")
        under = "" if fedavg is None else \
            f"; fedavg under it {100 * fedavg['final_accuracy']:.2f}%"
        partial = "" if len(got) == len(robust) else f" (of {len(got)} rules run)"
        out.append(f"{'PASS' if gap <= 3 else 'FAIL'} {attack}: best robust rule {best} "
                   f"{100 * got[best]:.2f}% is {gap:+.2f} points below clean fedavg "
                   f"{100 * base:.2f}% (goal <= 3){partial}{under}")
    for rule in robust:
        cell = cells.get(f"none|{rule}")
        if cell is None:
            continue
        gap = 100 * (base - cell["final_accuracy"])
        why = f" - cannot: {WHY_NOT[rule]}" if gap > 2 and rule in WHY_NOT else ""
        out.append(f"{'PASS' if gap <= 2 else 'FAIL'} clean {rule}: "
                   f"{100 * cell['final_accuracy']:.2f}% is {gap:+.2f} points below clean "
                   f"fedavg (goal <= 2){why}")
    return out


if __name__ == "__main__":
    main()
