"""Aggregation rules: many client deltas in, one aggregated delta out.

Every rule is a pure function over a sequence of :class:`~fedlearn.strategies.base.Update`
that returns new arrays in the dtypes of the deltas (computed in float64) and
changes nothing it was given. Only floating-point arrays go through a rule;
integer arrays get :func:`~fedlearn.strategies.base.integer_mean` in every rule.

- :func:`mean` (McMahan et al. 2017): ``sum(n_i d_i) / sum(n_i)``, streamed
  through a :class:`~fedlearn.weights.RunningSum`; the only rule that does not
  need the whole list.
- :func:`median` (Yin et al. 2018): coordinate-wise median, unweighted.
- :func:`trimmed_mean` (Yin et al. 2018): per coordinate, drop the
  ``int(beta*n)`` smallest and largest values and average the rest, unweighted.
- :func:`krum` (Blanchard et al. 2017): score each delta by the sum of squared
  L2 distances to its ``n-f-2`` nearest others; keep the lowest score
  (multi-Krum: the example-weighted mean of the ``m`` lowest).
- :func:`bulyan` (El Mhamdi et al. 2018): pick ``theta = n-2f`` deltas by
  repeated Krum, then per coordinate average the ``beta = theta-2f`` values
  closest to their median.
- :func:`clip_norm` (norm bounding, Sun et al. 2019): scale one delta to a
  global L2 norm of at most ``c``.

A rule given too few updates raises :class:`NotEnoughUpdatesError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fedlearn.strategies.base import Update, cast, integer_mean, is_float
from fedlearn.types import Weights
from fedlearn.weights import RunningSum

RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")


class NotEnoughUpdatesError(ValueError):
    """A round has fewer updates than its aggregation rule needs."""


def _need(rule: str, n: int, needed: int, why: str) -> None:
    if n < needed:
        raise NotEnoughUpdatesError(
            f"{rule} needs at least {needed} update{'' if needed == 1 else 's'} ({why}) "
            f"but the round has {n}"
        )


def _float_keys(updates: Sequence[Update]) -> list[str]:
    return [k for k, v in updates[0].delta.items() if is_float(v)]


def _stack(updates: Sequence[Update], key: str) -> np.ndarray:
    """The deltas' ``key`` arrays stacked on a new first axis, in float64."""
    return np.stack([np.asarray(u.delta[key], dtype=np.float64) for u in updates])


def _combine(updates: Sequence[Update], floats: Weights) -> Weights:
    """``floats`` (float64 results) cast to the deltas' dtypes, plus the integer mean."""
    ints = integer_mean(updates)
    first = updates[0].delta
    return {k: (cast(floats[k], v.dtype) if is_float(v) else ints[k])
            for k, v in first.items()}


def mean(updates: Sequence[Update], *, weighted: bool = True) -> Weights:
    """FedAvg's mean (McMahan et al. 2017): ``sum(n_i d_i) / sum(n_i)``.

    With ``weighted=False`` the float arrays get the plain mean
    ``sum(d_i) / K`` instead (SCAFFOLD's rule). The weighted mean goes through
    a :class:`~fedlearn.weights.RunningSum`, so it equals, bit for bit, what a
    server streaming the same updates into one gets.
    """
    _need("mean", len(updates), 1, "a mean of nothing is undefined")
    if weighted:
        acc = RunningSum()
        for u in updates:
            acc.add(u.delta, float(u.num_examples))
        return acc.mean()
    return _combine(updates, {k: _stack(updates, k).mean(axis=0) for k in _float_keys(updates)})


def median(updates: Sequence[Update]) -> Weights:
    """Coordinate-wise median (Yin et al. 2018): ``out[j] = median_i d_i[j]``, unweighted.

    With an even count the median is the mean of the two middle values.
    """
    _need("median", len(updates), 1, "a median of nothing is undefined")
    return _combine(updates, {k: np.median(_stack(updates, k), axis=0)
                              for k in _float_keys(updates)})


def trimmed_mean(updates: Sequence[Update], beta: float) -> Weights:
    """Coordinate-wise trimmed mean (Yin et al. 2018), unweighted.

    With ``n`` updates and ``b = int(beta * n)``, each coordinate's values are
    sorted and ``out[j] = mean(sorted_j[b : n - b])``. ``beta`` is in
    ``[0, 0.5)``, so at least one value always remains.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed mean needs beta in [0, 0.5), got {beta}")
    n = len(updates)
    _need(f"trimmed mean (beta {beta})", n, 1, "a mean of nothing is undefined")
    cut = int(beta * n)
    return _combine(updates, {k: np.sort(_stack(updates, k), axis=0)[cut:n - cut].mean(axis=0)
                              for k in _float_keys(updates)})


def squared_distances(updates: Sequence[Update]) -> np.ndarray:
    """The ``n x n`` matrix of squared L2 distances between the deltas' float arrays.

    Accumulated one array at a time in float64, so memory is ``n`` copies of
    the largest array, not ``n`` flattened models.
    """
    n = len(updates)
    dist = np.zeros((n, n), dtype=np.float64)
    for key in _float_keys(updates):
        flat = _stack(updates, key).reshape(n, -1)
        for i in range(n):
            dist[i] += np.square(flat - flat[i]).sum(axis=1)
    return dist


def _krum_scores(dist: np.ndarray, members: Sequence[int], f: int) -> np.ndarray:
    """Each member's sum of squared distances to its ``len(members)-f-2`` nearest others.

    The neighbour count is clamped to ``[1, len(members)-1]``: Bulyan's later
    selection rounds run Krum on fewer than ``2f+3`` deltas, as in the paper.
    """
    r = len(members)
    k = min(r - 1, max(1, r - f - 2))
    sub = dist[np.ix_(members, members)]
    scores = np.empty(r, dtype=np.float64)
    for i in range(r):
        others = np.delete(sub[i], i)
        scores[i] = np.sort(others)[:k].sum()
    return scores


def krum_select(updates: Sequence[Update], f: int, m: int = 1) -> list[int]:
    """Indices of the ``m`` deltas with the lowest Krum scores (Blanchard et al. 2017).

    ``score(i) = sum of ||d_i - d_j||^2 over the n-f-2 nearest j != i``, over
    all float arrays flattened. Ties go to the earlier update. Needs
    ``n >= 2f+3`` and ``1 <= m <= n``.
    """
    n = len(updates)
    if f < 0:
        raise ValueError(f"krum needs f >= 0 Byzantine clients, got {f}")
    _need(f"krum (f={f})", n, 2 * f + 3, "n >= 2f+3")
    if not 1 <= m <= n:
        raise NotEnoughUpdatesError(f"multi-krum keeps m={m} updates, so it needs m between 1 "
                                    f"and the round's {n} updates")
    scores = _krum_scores(squared_distances(updates), range(n), f)
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]]


def krum(updates: Sequence[Update], f: int, m: int = 1) -> Weights:
    """Krum (``m=1``) or multi-Krum (Blanchard et al. 2017).

    Krum returns a copy of the delta with the lowest score (see
    :func:`krum_select`); multi-Krum returns the example-weighted mean of the
    ``m`` lowest-scoring deltas, as Flower's ``aggregate_krum`` does. Integer
    arrays take the integer mean over all updates.
    """
    chosen = [updates[i] for i in krum_select(updates, f, m)]
    acc = RunningSum()
    for u in chosen:
        acc.add({k: v for k, v in u.delta.items() if is_float(v)}, float(u.num_examples))
    floats = acc.mean() if m > 1 else {k: v for k, v in chosen[0].delta.items() if is_float(v)}
    return _combine(updates, floats)


def bulyan(updates: Sequence[Update], f: int) -> Weights:
    """Bulyan (El Mhamdi et al. 2018) with Krum as the selection rule.

    1. Selection: ``theta = n - 2f`` times, run Krum (tolerating ``f``) on the
       deltas not yet chosen and move the winner to the selection.
    2. Aggregation: per coordinate, take the median of the ``theta`` selected
       values and average (unweighted) the ``beta = theta - 2f`` values
       closest to it.

    Needs ``n >= 4f + 3``.
    """
    n = len(updates)
    if f < 0:
        raise ValueError(f"bulyan needs f >= 0 Byzantine clients, got {f}")
    _need(f"bulyan (f={f})", n, 4 * f + 3, "n >= 4f+3")
    theta, beta = n - 2 * f, n - 4 * f
    dist = squared_distances(updates)
    remaining = list(range(n))
    selected: list[int] = []
    for _ in range(theta):
        best = int(np.argmin(_krum_scores(dist, remaining, f)))
        selected.append(remaining.pop(best))
    chosen = [updates[i] for i in selected]
    floats: Weights = {}
    for key in _float_keys(updates):
        stack = _stack(chosen, key)
        med = np.median(stack, axis=0)
        order = np.argsort(np.abs(stack - med), axis=0, kind="stable")[:beta]
        floats[key] = np.take_along_axis(stack, order, axis=0).mean(axis=0)
    return _combine(updates, floats)


def clip_norm(delta: Weights, c: float) -> tuple[Weights, float]:
    """Norm bounding (Sun et al. 2019): ``delta * min(1, c / ||delta||)`` and ``||delta||``.

    The norm is the global L2 norm over all float arrays (in float64); integer
    arrays are returned unchanged. Always returns new arrays.
    """
    if not c > 0:
        raise ValueError(f"clip norm must be positive, got {c}")
    norm = float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum())
                             for v in delta.values() if is_float(v))))
    factor = min(1.0, c / norm) if norm > 0 else 1.0
    out: Weights = {}
    for k, v in delta.items():
        if is_float(v) and factor < 1.0:
            out[k] = cast(v.astype(np.float64) * factor, v.dtype)
        else:
            out[k] = np.array(v, copy=True)
    return out, norm


@runtime_checkable
class AggregationRule(Protocol):
    """What a :class:`~fedlearn.strategies.strategy.Strategy` needs from its rule.

    :class:`Rule` is the built-in one; a user's own rule is any object with
    these members (see the README, "Write your own strategy").
    """

    @property
    def spec(self) -> str:
        """The rule as written in a strategy spec."""
        ...

    @property
    def streams(self) -> bool:
        """True only for the example-weighted mean (a RunningSum suffices)."""
        ...

    @property
    def min_updates(self) -> int:
        """The fewest updates a round must have for this rule."""
        ...

    def apply(self, updates: Sequence[Update]) -> Weights:
        """The aggregated delta of ``updates`` (new arrays; integer arrays by the
        integer mean)."""
        ...


@dataclass(frozen=True)
class Rule:
    """One aggregation rule with its parameters, as a frozen value.

    ``kind`` is one of :data:`RULES`; ``beta`` is the trimmed mean's fraction,
    ``f`` the Byzantine clients Krum and Bulyan tolerate, ``m`` the deltas
    multi-Krum averages, ``weighted`` whether ``mean`` weights by examples.
    """

    kind: str = "mean"
    beta: float = 0.0
    f: int = 0
    m: int = 1
    weighted: bool = True

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"unknown rule {self.kind!r}; choose one of {', '.join(RULES)}")

    @property
    def spec(self) -> str:
        """The rule as written in a strategy spec (``trimmed-mean:0.2``, ``krum:1``)."""
        if self.kind == "trimmed-mean":
            return f"trimmed-mean:{self.beta:g}"
        if self.kind in ("krum", "bulyan"):
            return f"{self.kind}:{self.f}"
        if self.kind == "multi-krum":
            return f"multi-krum:{self.f}:{self.m}"
        return self.kind

    @property
    def streams(self) -> bool:
        """Whether the rule can be folded into an example-weighted RunningSum."""
        return self.kind == "mean" and self.weighted

    @property
    def min_updates(self) -> int:
        """The fewest updates a round needs: ``2f+3`` for Krum (and at least ``m`` for
        multi-Krum), ``4f+3`` for Bulyan, else 1."""
        if self.kind in ("krum", "multi-krum"):
            return max(2 * self.f + 3, self.m)
        if self.kind == "bulyan":
            return 4 * self.f + 3
        return 1

    def apply(self, updates: Sequence[Update]) -> Weights:
        """The aggregated delta of ``updates`` under this rule."""
        if self.kind == "mean":
            return mean(updates, weighted=self.weighted)
        if self.kind == "median":
            return median(updates)
        if self.kind == "trimmed-mean":
            return trimmed_mean(updates, self.beta)
        if self.kind in ("krum", "multi-krum"):
            return krum(updates, self.f, self.m)
        return bulyan(updates, self.f)
