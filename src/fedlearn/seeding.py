"""Seeds derived from (run seed, round, client, ...): stable across processes and runs.

Python's ``hash`` is salted per process, so we hash with blake2b instead. A
resumed run, a simulated run and an HTTP run all derive the same seeds.
"""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part and nothing else."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def rng_for(*parts: int | str) -> np.random.Generator:
    """A numpy Generator seeded by :func:`derive_seed` of ``parts``."""
    return np.random.default_rng(derive_seed(*parts))


def task_seed(run_seed: int, round_number: int, client_id: str) -> int:
    """The data-order seed a client uses for its local training in a round."""
    return derive_seed("task", run_seed, round_number, client_id)
