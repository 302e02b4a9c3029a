"""W7 of BENCHMARKS.md: privacy against utility for user-level DP-FedAvg.

Fashion-MNIST ``mlp``, 100 simulated clients (IID), Poisson sampling at rate
0.1 (10 clients a round on average), 100 rounds, SGD lr 0.05, batch 32, one
local epoch. For each target ε (δ = 1e-5) the noise multiplier z is the
smallest that keeps ε(rounds) at or below the target (found with the run's own
accountant, ``fedlearn.privacy.dpfedavg.PrivacyBudget``); the clip norm is
fixed (``--clip``). Rows: ε ≈ 1, 3, 8 and no DP (the same run with FedAvg and
fixed-size sampling). Columns: z, the ε the run reports, final accuracy.

    python benchmarks/w7_privacy.py                  # 100 rounds (several minutes)
    python benchmarks/w7_privacy.py --rounds 30      # a quicker look (z re-derived for 30)
    python benchmarks/w7_privacy.py --targets 8,none # only some rows
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

CLIENTS, RATE, DELTA = 100, 0.1, 1e-5


def noise_for(target: float, rounds: int) -> float:
    """The smallest z (to 1e-3) whose ε after ``rounds`` Poisson rounds is at most ``target``."""
    from fedlearn.privacy.dpfedavg import PrivacyBudget

    def eps(z: float) -> float:
        return PrivacyBudget(z, RATE, DELTA, "poisson", CLIENTS).epsilon(rounds)

    lo, hi = 0.05, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


def run(rounds: int, z: float | None, clip: float, out: Path) -> dict[str, Any]:
    """One simulated run; its summary."""
    from fedlearn.config import TrainConfig
    from fedlearn.runs import RunDir
    from fedlearn.sim import SimConfig, config_record, run_simulation
    from fedlearn.tasks import builtin_task

    dp: dict[str, Any] = {} if z is None else {
        "dp_noise_multiplier": z, "dp_clip": str(clip), "dp_delta": DELTA}
    config = SimConfig(clients=CLIENTS, per_round=int(RATE * CLIENTS), rounds=rounds,
                       dataset="fashion-mnist", model="mlp", seed=0,
                       train=TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.05),
                       **dp)
    started = time.perf_counter()
    summary = run_simulation(config, builtin_task("fashion-mnist", "mlp"),
                             RunDir.create(out, config_record(config)), log=lambda _: None)
    summary["seconds"] = time.perf_counter() - started
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clip", type=float, default=0.5,
                        help="DP-FedAvg's clip norm (the median update norm of the first "
                        "rounds is about 1 here).")
    parser.add_argument("--targets", default="1,3,8,none",
                        help="comma-separated target ε values; 'none' is the run without DP.")
    args = parser.parse_args()
    try:
        targets = [None if t.strip() == "none" else float(t) for t in args.targets.split(",")]
    except ValueError:
        parser.error(f"--targets {args.targets!r}: give numbers or 'none', comma-separated.")
    import torch

    torch.set_num_threads(2)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            z = None if target is None else noise_for(target, args.rounds)
            s = run(args.rounds, z, args.clip, Path(tmp) / f"r{target}")
            eps = s.get("dp_epsilon")
            results.append({"target_epsilon": target, "noise_multiplier": z,
                            "epsilon": eps, "delta": DELTA if z is not None else None,
                            "accuracy": s["final_accuracy"], "seconds": s["seconds"]})
            rows.append(["no DP" if target is None else f"ε ≈ {target:g}",
                         "-" if z is None else f"{z:.3f}",
                         "-" if eps is None else f"{eps:.3f}",
                         f"{100 * s['final_accuracy']:.2f}%", f"{s['seconds']:.0f}s"])
            print(rows[-1], flush=True)
    print(f"\nW7: Fashion-MNIST mlp, {CLIENTS} clients, Poisson rate {RATE}, {args.rounds} "
          f"rounds, clip {args.clip}, δ = {DELTA:g}")
    print(table(["privacy", "noise multiplier z", "ε reported", "final accuracy", "time"], rows))
    path = write_json("w7_privacy", {"rounds": args.rounds, "clip": args.clip,
                                     "clients": CLIENTS, "rate": RATE, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
