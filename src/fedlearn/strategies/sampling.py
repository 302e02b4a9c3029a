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
