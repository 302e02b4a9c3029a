"""Fixed-point quantisation of float vectors into the ring Z_{2^bits} for secure aggregation.

A value x is clipped to [-R, R], shifted to [0, 2R] and scaled by
``scale = L / (2R)`` with ``L = floor((2^bits − 1) / n_max)`` levels, then
rounded stochastically (unbiased: E[q] = (x + R)·scale). Each client's
integers therefore lie in [0, L], so the plain sum of up to ``n_max`` clients
is at most n_max·L ≤ 2^bits − 1 and the modular sum never wraps: the sum mod
2^bits *is* the integer sum, and Σx ≈ Σq / scale − count·R. The rounding
error is below one level (1 / scale) per client and coordinate.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedlearn.errors import ConfigError

Ring = npt.NDArray[np.uint64]


def levels(bits: int, max_clients: int) -> int:
    """L = floor((2^bits − 1) / max_clients): the largest integer one client may contribute."""
    return ((1 << bits) - 1) // max_clients


def scale(bits: int, clip_range: float, max_clients: int) -> float:
    """Integers per unit: L / (2R), so that x ∈ [-R, R] maps onto [0, L]."""
    return levels(bits, max_clients) / (2.0 * clip_range)


def ring_mask(bits: int) -> np.uint64:
    """2^bits − 1 as uint64: ``a & ring_mask(bits)`` is ``a mod 2^bits``."""
    return np.uint64((1 << bits) - 1)


def quantize(
    x: npt.NDArray[np.floating], clip_range: float, q_scale: float, rng: np.random.Generator,
    *, top: int | None = None,
) -> Ring:
    """Clip ``x`` to [-R, R] and map it to integers in [0, 2R·scale] by stochastic rounding.

    ``top`` (the levels L) caps the integers exactly: above 2^53 the float
    product 2R·scale may round past L, and n clients at the top of the range
    would then wrap the ring.
    """
    y = (np.clip(np.asarray(x, dtype=np.float64), -clip_range, clip_range) + clip_range) * q_scale
    floor = np.floor(y)
    up = rng.random(y.shape) < (y - floor)
    q = floor + up
    cap = np.floor(2 * clip_range * q_scale)
    out: Ring = np.minimum(q, cap).astype(np.uint64)
    if top is not None:
        np.minimum(out, np.uint64(top), out=out)
    return out


def dequantize_sum(total: Ring, count: int, clip_range: float, q_scale: float) -> np.ndarray:
    """Σx from the integer sum of ``count`` quantised vectors: Σq / scale − count·R."""
    if count < 1:
        raise ConfigError(f"a quantised sum needs at least one client, got {count}.")
    return total.astype(np.float64) / q_scale - count * clip_range
