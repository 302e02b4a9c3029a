"""Seeded partitions of a training set among federated clients.

Every function here is pure: the same labels, number of clients, spec and seed
always give the same list of int64 index arrays, one per client. No index is
given to two clients; ``iid``, ``dirichlet`` and ``shards`` cover every index.

Spec grammar (see :func:`parse_partition`)::

    iid | iid:N:I
    dirichlet:ALPHA | dirichlet:ALPHA:N:I
    shards:K | shards:K:N:I
    range:L-R

``N:I`` means "part I (0-based) of an N-way partition"; ``range:L-R`` selects
the training-set chunks L..R (1-based) of :data:`RANGE_CHUNK` samples each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlearn.errors import PartitionError

__all__ = [
    "GRAMMAR",
    "KINDS",
    "RANGE_CHUNK",
    "PartitionSpec",
    "client_indices",
    "parse_partition",
    "partition",
]

KINDS: tuple[str, ...] = ("iid", "dirichlet", "shards", "range")
GRAMMAR = "iid, iid:N:I, dirichlet:ALPHA, dirichlet:ALPHA:N:I, shards:K, shards:K:N:I or range:L-R"
RANGE_CHUNK = 5000
DIRICHLET_TRIES = 100
DIRICHLET_MIN_SAMPLES = 10


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec; ``part`` is ``(N, I)``: part I (0-based) of N."""

    kind: str
    alpha: float | None = None
    shards: int | None = None
    lo: int | None = None
    hi: int | None = None
    part: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        problem = _spec_problem(self)
        if problem is not None:
            raise PartitionError(
                f"Partition spec {self!r} is invalid ({problem}); use one of {GRAMMAR}."
            )

    def __str__(self) -> str:
        if self.kind == "range":
            return f"range:{self.lo}-{self.hi}"
        if self.kind == "dirichlet":
            alpha = float(self.alpha or 0.0)
            short = f"{alpha:g}"
            head = f"dirichlet:{short if float(short) == alpha else repr(alpha)}"
        else:
            head = "iid" if self.kind == "iid" else f"shards:{self.shards}"
        if self.part is None:
            return head
        return f"{head}:{self.part[0]}:{self.part[1]}"


def _spec_problem(spec: PartitionSpec) -> str | None:
    """What is wrong with a spec's fields, or None when they are consistent."""
    if spec.kind not in KINDS:
        return f"unknown kind {spec.kind!r}"
    if spec.kind == "dirichlet" and (
        spec.alpha is None or not math.isfinite(spec.alpha) or spec.alpha <= 0
    ):
        return "dirichlet needs a positive finite alpha"
    if spec.kind == "shards" and (spec.shards is None or spec.shards < 1):
        return "shards needs K of at least 1"
    if spec.kind == "range":
        if spec.lo is None or spec.hi is None or spec.lo < 1 or spec.lo > spec.hi:
            return "range needs 1 <= L <= R"
        if spec.part is not None:
            return "range cannot be split into parts"
    if spec.part is not None:
        n, i = spec.part
        if n < 1 or not 0 <= i < n:
            return "part (N, I) needs N >= 1 and 0 <= I < N"
    return None


def _bad_spec(spec: str, why: str) -> PartitionError:
    return PartitionError(f"Partition spec {spec!r} is invalid ({why}); use one of {GRAMMAR}.")


def _int(text: str, spec: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad_spec(spec, f"{what} {text!r} is not an integer") from None


def _part(fields: list[str], spec: str) -> tuple[int, int] | None:
    if not fields:
        return None
    if len(fields) != 2:
        raise _bad_spec(spec, "a part is written N:I")
    n = _int(fields[0], spec, "N")
    i = _int(fields[1], spec, "I")
    if n < 1:
        raise _bad_spec(spec, f"N = {n} must be at least 1")
    if not 0 <= i < n:
        raise _bad_spec(spec, f"I = {i} must be in 0..N-1 = 0..{n - 1}")
    return (n, i)


def parse_partition(spec: str) -> PartitionSpec:
    """Parse a partition spec string; anything outside the grammar raises PartitionError."""
    text = spec.strip().lower()
    kind, *fields = text.split(":")
    if kind == "iid":
        return PartitionSpec(kind="iid", part=_part(fields, spec))
    if kind == "dirichlet":
        if not fields:
            raise _bad_spec(spec, "dirichlet needs ALPHA")
        try:
            alpha = float(fields[0])
        except ValueError:
            raise _bad_spec(spec, f"ALPHA {fields[0]!r} is not a number") from None
        if not math.isfinite(alpha) or alpha <= 0:
            raise _bad_spec(spec, f"ALPHA = {fields[0]} must be a positive finite number")
        return PartitionSpec(kind="dirichlet", alpha=alpha, part=_part(fields[1:], spec))
    if kind == "shards":
        if not fields:
            raise _bad_spec(spec, "shards needs K")
        k = _int(fields[0], spec, "K")
        if k < 1:
            raise _bad_spec(spec, f"K = {k} must be at least 1")
        return PartitionSpec(kind="shards", shards=k, part=_part(fields[1:], spec))
    if kind == "range":
        if len(fields) != 1 or fields[0].count("-") != 1:
            raise _bad_spec(spec, "range is written range:L-R")
        left, right = fields[0].split("-")
        lo = _int(left, spec, "L")
        hi = _int(right, spec, "R")
        if lo < 1:
            raise _bad_spec(spec, f"L = {lo} must be at least 1")
        if lo > hi:
            raise _bad_spec(spec, f"L = {lo} is greater than R = {hi}")
        return PartitionSpec(kind="range", lo=lo, hi=hi)
    raise _bad_spec(spec, f"unknown kind {kind!r}, expected one of {', '.join(KINDS)}")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise PartitionError(
            f"Labels must be a 1-D integer array, got {array.dtype} of shape {array.shape}; "
            "pass the training labels."
        )
    return array


def _rng(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise PartitionError(f"Seed {seed!r} is not a non-negative integer; pass one such as 0.")
    return np.random.default_rng(int(seed))


def _check_clients(n: int, num_clients: int, what: str) -> None:
    if num_clients < 1:
        raise PartitionError(f"num_clients = {num_clients} must be at least 1; ask for 1 or more.")
    if num_clients > n:
        raise PartitionError(
            f"{num_clients} clients cannot share {what} of {n} samples; use at most {n} clients."
        )


def _as_int64(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(p, dtype=np.int64) for p in parts]


def _iid(indices: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return _as_int64(np.array_split(rng.permutation(indices), num_clients))


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, spec: str
) -> list[np.ndarray]:
    n = labels.shape[0]
    need = min(DIRICHLET_MIN_SAMPLES, n // num_clients)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_clients, alpha, dtype=np.float64)
    for _ in range(DIRICHLET_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        ok = True
        for members in by_class:
            shuffled = rng.permutation(members)
            shares = rng.dirichlet(concentration)
            if not np.all(np.isfinite(shares)):
                ok = False
                break
            cuts = (np.cumsum(shares)[:-1] * shuffled.shape[0]).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                buckets[client].append(piece)
        if not ok:
            continue
        parts = [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
        if min(p.shape[0] for p in parts) >= need:
            return _as_int64(parts)
    raise PartitionError(
        f"Partition {spec!r} could not give each of {num_clients} clients at least {need} "
        f"samples in {DIRICHLET_TRIES} tries; raise ALPHA or use fewer clients."
    )


def _shards(
    labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator, spec: str
) -> list[np.ndarray]:
    n = labels.shape[0]
    num_shards = num_clients * k
    if num_shards > n:
        raise PartitionError(
            f"Partition {spec!r} with {num_clients} clients needs {num_shards} shards "
            f"but there are only {n} samples; lower K or use fewer clients."
        )
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, k)
    return _as_int64([np.concatenate([shards[s] for s in row]) for row in assignment])


def _full_partition(
    labels: np.ndarray, num_clients: int, spec: PartitionSpec, seed: int
) -> list[np.ndarray]:
    rng = _rng(seed)
    n = labels.shape[0]
    name = str(spec)
    if spec.kind == "range":
        lo, hi = spec.lo or 1, spec.hi or 1
        if hi * RANGE_CHUNK > n:
            raise PartitionError(
                f"Partition {name!r} needs R*{RANGE_CHUNK} = {hi * RANGE_CHUNK} samples "
                f"but the training set has {n}; choose a smaller R."
            )
        chosen = np.arange((lo - 1) * RANGE_CHUNK, hi * RANGE_CHUNK, dtype=np.int64)
        _check_clients(chosen.shape[0], num_clients, f"the range {name}")
        return _iid(chosen, num_clients, rng)
    _check_clients(n, num_clients, "a training set")
    if spec.kind == "iid":
        return _iid(np.arange(n, dtype=np.int64), num_clients, rng)
    if spec.kind == "dirichlet":
        return _dirichlet(labels, num_clients, float(spec.alpha or 0.0), rng, name)
    if spec.kind == "shards":
        return _shards(labels, num_clients, int(spec.shards or 1), rng, name)
    raise PartitionError(f"Partition kind {spec.kind!r} is unknown; use one of {GRAMMAR}.")


def partition(
    labels: np.ndarray, num_clients: int, spec: PartitionSpec | str, seed: int
) -> list[np.ndarray]:
    """Split the indices of ``labels`` among ``num_clients`` clients as ``spec`` says.

    Returns one int64 index array per client, deterministic for a given seed.
    When ``spec`` names a part ``N:I``, the N-way partition is computed and
    only part I is returned (a one-element list); ``num_clients`` must then be
    N or 1. Impossible requests raise PartitionError.
    """
    parsed = parse_partition(spec) if isinstance(spec, str) else spec
    array = _check_labels(labels)
    if parsed.part is not None:
        n_parts, index = parsed.part
        if num_clients not in (1, n_parts):
            raise PartitionError(
                f"Partition {str(parsed)!r} is part {index} of {n_parts} but "
                f"{num_clients} clients were asked for; pass num_clients={n_parts} or 1."
            )
        return [_full_partition(array, n_parts, parsed, seed)[index]]
    return _full_partition(array, num_clients, parsed, seed)


def client_indices(labels: np.ndarray, spec: PartitionSpec | str, seed: int) -> np.ndarray:
    """The indices for one client process: spec must name a part (``N:I``) or a range."""
    parsed = parse_partition(spec) if isinstance(spec, str) else spec
    if parsed.part is None and parsed.kind != "range":
        raise PartitionError(
            f"Partition {str(parsed)!r} does not say which part this client gets; "
            f"add N:I (part I of N) or use range:L-R."
        )
    return partition(labels, parsed.part[0] if parsed.part else 1, parsed, seed)[0]
