"""Client sampling as a pure function of (candidates, fraction, seed, round)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from fedlearn.seeding import rng_for


def sample_clients(
    candidates: Iterable[str],
    fraction: float,
    *,
    seed: int,
    round_number: int,
    attempt: int = 0,
    minimum: int = 1,
) -> list[str]:
    """Pick ``ceil(fraction * n)`` (at least ``minimum``) of the candidates, sorted.

    The choice depends only on the sorted candidate ids, the seed, the round and
    the attempt (a round that is run again samples anew), so a resumed run
    samples the same clients.
    """
    pool = sorted(set(candidates))
    if not pool:
        return []
    k = min(len(pool), max(minimum, math.ceil(fraction * len(pool) - 1e-9)))
    if k == len(pool):
        return pool
    rng = rng_for("sample", seed, round_number, attempt)
    chosen = rng.choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in chosen)


def poisson_sample(candidates: Iterable[str], rate: float, *, seed: int,
                   round_number: int) -> list[str]:
    """Each candidate independently with probability ``rate`` (sorted; may be empty).

    Poisson sampling, as DP-FedAvg's accountant assumes it in the simulator; a
    pure function of the sorted ids, the seed and the round.
    """
    pool = sorted(set(candidates))
    draws = rng_for("poisson", seed, round_number).random(len(pool))
    return [cid for cid, u in zip(pool, draws, strict=True) if u < rate]
