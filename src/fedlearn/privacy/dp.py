"""User-level DP-FedAvg pieces: clipping, seeded Gaussian noise and adaptive clipping.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models") clips each client's update Δ_k to L2 norm at most C,
sums the clipped updates, adds N(0, (zC)²) to every coordinate of the sum and
divides by the *expected* number of clients qN (the fixed-denominator
estimator, whose sensitivity does not depend on who turned up). Adaptive
clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping") moves C towards a target quantile of the update norms using a
noised count of unclipped updates.

Noise is drawn from a generator derived from ``(seed, round_number, purpose)``
with :class:`numpy.random.SeedSequence`, so a resumed run draws the same noise
and the only state to checkpoint is the seed and the round. Integer arrays
(counters such as BatchNorm's ``num_batches_tracked``) are neither clipped nor
noised and are not covered by the privacy guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlearn.errors import ConfigError, PayloadError
from fedlearn.types import Weights

# Distinct streams for the two noises drawn in one round, so they are independent.
_UPDATE_NOISE = 0
_COUNT_NOISE = 1


def clip(delta: Weights, c: float) -> tuple[Weights, float]:
    """Scale ``delta`` so its global L2 norm is at most ``c``; return it and the original norm.

    Δ ← Δ · min(1, C / ‖Δ‖₂) (McMahan et al. 2018, Algorithm 1, ``ClipFn``).
    The norm is taken over all floating-point arrays together; integer arrays
    are copied unchanged. A new dict of new arrays is returned.
    """
    _check_positive("clip norm", c)
    norm = _float_norm(delta)
    if not math.isfinite(norm):
        raise PayloadError("the update holds NaN or infinite values and cannot be clipped.")
    factor = 1.0 if norm <= c else c / norm
    clipped = {
        k: (v * factor).astype(v.dtype) if _is_float(v) else v.copy() for k, v in delta.items()
    }
    return clipped, norm


def unclipped_bit(norm: float, c: float) -> int:
    """1 when an update of L2 norm ``norm`` is not clipped at ``c`` (b = 𝟙[‖Δ‖ ≤ C]), else 0."""
    return 1 if norm <= c else 0


def gaussian_noise_like(
    weights: Weights, stddev: float, seed: int, round_number: int
) -> Weights:
    """N(0, stddev²) noise shaped like the float arrays of ``weights``; zeros for integer arrays.

    Deterministic in ``(seed, round_number)``: the generator is
    ``Generator(PCG64(SeedSequence([seed, round_number, 0])))`` and arrays are
    drawn in sorted key order, so a resumed run draws identical noise.
    """
    if not (math.isfinite(stddev) and stddev >= 0):
        raise ConfigError(f"noise stddev must be a non-negative finite number, got {stddev!r}.")
    rng = _rng(seed, round_number, _UPDATE_NOISE)
    noise: Weights = {}
    for k in sorted(weights):
        v = weights[k]
        if _is_float(v):
            noise[k] = rng.normal(0.0, stddev, size=v.shape).astype(v.dtype)
        else:
            noise[k] = np.zeros_like(v)
    return {k: noise[k] for k in weights}


def dp_mean(
    sum_of_clipped: Weights,
    noise_stddev: float,
    expected_clients: float,
    seed: int,
    round_number: int,
) -> Weights:
    """The fixed-denominator DP mean (Σ_k Δ̂_k + N(0, σ²)) / (qN) (McMahan et al. 2018, Alg. 1).

    ``sum_of_clipped`` is the sum of the round's clipped updates, ``noise_stddev``
    σ = zC and ``expected_clients`` qN, the expected (not the actual) number
    of participants. Noise comes from :func:`gaussian_noise_like` with the same
    ``(seed, round_number)``. Integer arrays are divided without noise.
    """
    _check_positive("expected_clients", expected_clients)
    noise = gaussian_noise_like(sum_of_clipped, noise_stddev, seed, round_number)
    out: Weights = {}
    for k, v in sum_of_clipped.items():
        total = v.astype(np.float64) + noise[k].astype(np.float64) if _is_float(v) else v
        out[k] = (np.asarray(total, dtype=np.float64) / expected_clients).astype(v.dtype)
    return out


@dataclass(frozen=True)
class AdaptiveClipState:
    """The adaptive clipping state carried between rounds: the current clip norm C."""

    clip_norm: float


@dataclass(frozen=True)
class AdaptiveClip:
    """Geometric clip-norm updates towards a target quantile (Andrew et al. 2021, Alg. 1).

    ``target_quantile`` γ is the fraction of updates that should go unclipped,
    ``learning_rate`` η_C the step size of C ← C·exp(−η_C(b̃ − γ)),
    ``clipped_count_stddev`` σ_b the stddev of the noise on the count of
    unclipped updates (``None``: expected_clients / 20, the paper's choice),
    ``initial_clip_norm`` C₀.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    initial_clip_norm: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.target_quantile <= 1:
            raise ConfigError(
                f"target_quantile must be in [0, 1], got {self.target_quantile!r}."
            )
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("initial_clip_norm", self.initial_clip_norm)
        if self.clipped_count_stddev is not None:
            _check_positive("clipped_count_stddev", self.clipped_count_stddev)

    def init(self) -> AdaptiveClipState:
        """The state before round one: C = C₀."""
        return AdaptiveClipState(self.initial_clip_norm)

    def count_stddev(self, expected_clients: float) -> float:
        """σ_b: the configured value, or expected_clients / 20 when none was given."""
        _check_positive("expected_clients", expected_clients)
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return expected_clients / 20

    def update(
        self,
        state: AdaptiveClipState,
        unclipped_count_bits_sum: float,
        expected_clients: float,
        seed: int,
        round_number: int,
        *,
        num_reports: int | None = None,
    ) -> AdaptiveClipState:
        """The next state: C ← C·exp(−η_C(b̃ − γ)) with b̃ = (Σ_i b_i + N(0, σ_b²)) / m.

        ``unclipped_count_bits_sum`` is Σ_i b_i, b_i = 𝟙[‖Δ_i‖ ≤ C], and
        ``expected_clients`` is m. With ``num_reports`` (the number of bits
        summed) the bits are centred as in the paper's privacy analysis:
        b̃ = (Σ_i (b_i − ½) + N(0, σ_b²)) / m + ½, which is what makes
        :func:`effective_noise_multiplier` exact when the count is private.
        The noise is drawn from ``(seed, round_number)`` on a stream separate
        from :func:`gaussian_noise_like`'s.
        """
        sigma_b = self.count_stddev(expected_clients)
        bits = float(unclipped_count_bits_sum)
        if num_reports is not None:
            if num_reports < 0 or bits > num_reports or bits < 0:
                raise ConfigError(
                    f"unclipped count {bits} must lie in [0, num_reports={num_reports}]."
                )
            bits -= num_reports / 2
        noise = float(_rng(seed, round_number, _COUNT_NOISE).normal(0.0, sigma_b))
        b_tilde = (bits + noise) / expected_clients
        if num_reports is not None:
            b_tilde += 0.5
        new = state.clip_norm * math.exp(-self.learning_rate * (b_tilde - self.target_quantile))
        return AdaptiveClipState(new)


def effective_noise_multiplier(z: float, sigma_b: float) -> float:
    """The update noise multiplier z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021).

    Releasing both the noised sum of updates (multiplier z_Δ) and the noised
    count of unclipped updates (stddev σ_b, sensitivity ½) costs as much privacy
    as one Gaussian mechanism with multiplier ``z``. Needs z < 2σ_b.
    """
    _check_positive("noise multiplier", z)
    _check_positive("clipped count stddev", sigma_b)
    if z >= 2 * sigma_b:
        raise ConfigError(
            f"noise multiplier {z} needs a clipped count stddev above {z / 2}, got {sigma_b}; "
            "raise clipped_count_stddev or lower the noise multiplier."
        )
    return float((z**-2 - (2 * sigma_b) ** -2) ** -0.5)


def _rng(seed: int, round_number: int, purpose: int) -> np.random.Generator:
    if seed < 0 or round_number < 0:
        raise ConfigError(
            f"seed and round must be non-negative integers, got {seed} and {round_number}."
        )
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, round_number,
                                                                        purpose])))


def _is_float(v: np.ndarray) -> bool:
    return v.dtype.kind == "f"


def _float_norm(w: Weights) -> float:
    total = sum(float(np.sum(np.square(v, dtype=np.float64))) for v in w.values() if _is_float(v))
    return math.sqrt(total)


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}.")
