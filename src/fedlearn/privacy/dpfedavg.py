"""User-level DP-FedAvg as a layer of a strategy: clip, sum, noise, fixed denominator.

:class:`DPFedAvg` is given to a :class:`~fedlearn.strategies.strategy.Strategy`
(its ``dp`` field) and replaces the strategy's example-weighted mean with
McMahan et al. 2018's private mean: every client delta is clipped to L2 norm
C, the clipped deltas are summed with equal weight, Gaussian noise of stddev
z_Δ·C is added to the sum and the result is divided by the *expected* number
of clients qN. The server optimizer then steps on that mean as usual (a
private mean under FedAdam is still private: post-processing).

- **Fixed clipping** (``clip=C``) or **adaptive clipping** (``adaptive``:
  Andrew et al. 2021): C moves each round towards the ``target_quantile`` of
  the update norms, using a noised count of unclipped updates; the count's
  noise is paid for by lowering the update noise to
  z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), so the round as a whole is one Gaussian
  mechanism with multiplier ``z`` (what the accountant is told).
- **Where clipping happens** (``clip_on``): ``server`` clips what arrives;
  ``client`` sends C with the round's config so each client clips before its
  update leaves (needed under secure aggregation, where the server never sees
  one update). The server clips again either way (a no-op for an honest
  client, a bound for a dishonest one), and under ``client`` it reads the
  unclipped bit from the norm (a clipped update has norm C).
- **Noise** is drawn from ``(seed, round)`` (see :mod:`fedlearn.privacy.dp`),
  so a resumed run draws the same noise; the adaptive C lives in the state's
  scalars, so it is in every checkpoint.

Pure numpy: no torch, no I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlearn.errors import ConfigError
from fedlearn.privacy.dp import AdaptiveClip, AdaptiveClipState, clip, effective_noise_multiplier
from fedlearn.privacy.dp import dp_mean as fixed_denominator_mean
from fedlearn.strategies.strategy import ClippedSum
from fedlearn.types import Weights

#: Scalar key of the current clip norm in the strategy state.
CLIP_KEY = "dp/clip"
#: Where clipping may happen.
CLIP_SITES = ("server", "client")
#: The relative slack under which a client-clipped update counts as clipped.
_AT_CLIP = 1e-5


@dataclass(frozen=True)
class DPFedAvg:
    """The private mean of a round (see the module docstring).

    ``noise_multiplier`` z (noise stddev over clip norm, for the round as a
    whole), ``clip`` the fixed C or ``adaptive`` the adaptive rule,
    ``expected_clients`` qN, ``seed`` the noise seed.
    """

    noise_multiplier: float
    expected_clients: float
    seed: int = 0
    clip: float | None = None
    adaptive: AdaptiveClip | None = None
    clip_on: str = "server"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"--dp-noise-multiplier must be 0 or more, got "
                              f"{self.noise_multiplier}.")
        if (self.clip is None) == (self.adaptive is None):
            raise ConfigError("give exactly one of a fixed clip norm and adaptive clipping "
                              "(--dp-clip C or --dp-clip adaptive:QUANTILE).")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"--dp-clip must be a positive number, got {self.clip}.")
        if self.clip_on not in CLIP_SITES:
            raise ConfigError(f"--dp-clip-on must be one of {', '.join(CLIP_SITES)}, got "
                              f"{self.clip_on!r}.")
        if not (math.isfinite(self.expected_clients) and self.expected_clients > 0):
            raise ConfigError(f"the expected clients per round must be positive, got "
                              f"{self.expected_clients}.")
        if self.seed < 0:
            raise ConfigError(f"the DP noise seed must be 0 or more, got {self.seed}.")
        sigma_b = self.count_stddev
        if sigma_b is not None and self.noise_multiplier >= 2 * sigma_b:
            raise ConfigError(
                f"adaptive clipping with --dp-noise-multiplier {self.noise_multiplier:g} "
                f"needs more than {10 * self.noise_multiplier:g} clients a round (the noise on "
                f"its count, clients/20, is {sigma_b:g} here); sample more clients a round, "
                "lower the noise multiplier or give a fixed --dp-clip C.")

    @property
    def count_stddev(self) -> float | None:
        """σ_b, the stddev of the noise on the unclipped count (adaptive clipping only)."""
        if self.adaptive is None:
            return None
        return self.adaptive.count_stddev(self.expected_clients)

    def update_noise_multiplier(self) -> float:
        """z_Δ: ``z`` itself, or what is left for the update after the count's share."""
        sigma_b = self.count_stddev
        if sigma_b is None or self.noise_multiplier == 0:
            return self.noise_multiplier
        return effective_noise_multiplier(self.noise_multiplier, sigma_b)

    def init_scalars(self) -> dict[str, float]:
        """The state's scalars before round 1: the clip norm."""
        c = self.clip if self.clip is not None else (
            self.adaptive.initial_clip_norm if self.adaptive is not None else 0.0)
        return {CLIP_KEY: float(c)}

    def clip_norm(self, scalars: Mapping[str, float | int]) -> float:
        """The clip norm of the round about to be aggregated."""
        if self.clip is not None:
            return self.clip
        return float(scalars.get(CLIP_KEY, self.init_scalars()[CLIP_KEY]))

    def client_config(self, scalars: Mapping[str, float | int]) -> dict[str, float]:
        """``{"dp_clip": C}`` when clients clip, else nothing."""
        return {"dp_clip": self.clip_norm(scalars)} if self.clip_on == "client" else {}

    def mean(self, scalars: Mapping[str, float | int], deltas: Sequence[Weights],
             round_number: int, like: Weights) -> tuple[Weights, dict[str, float]]:
        """The private mean of ``deltas`` for round ``round_number`` and the next scalars.

        ``like`` gives the names, shapes and dtypes (the global model) for a
        round with no deltas, whose mean is the noise alone.
        """
        c = self.clip_norm(scalars)
        # Float arrays sum in float64; integer ones (counters) in int64, never noised.
        total: Weights = {k: np.zeros(np.shape(v), dtype=np.float64 if np.asarray(v).dtype.kind
                                      == "f" else np.int64) for k, v in like.items()}
        unclipped = 0
        for delta in deltas:
            clipped, norm = clip(delta, c)
            at_clip = self.clip_on == "client" and norm >= c * (1 - _AT_CLIP)
            unclipped += int(norm <= c and not at_clip)
            for k, v in clipped.items():
                total[k] += v
        return self.mean_of_sum(scalars, ClippedSum(total, len(deltas), unclipped),
                                round_number, like)

    def mean_of_sum(self, scalars: Mapping[str, float | int], clipped: ClippedSum,
                    round_number: int, like: Weights) -> tuple[Weights, dict[str, float]]:
        """The private mean of a sum of ``clipped.count`` deltas each clipped to this
        round's C (by :meth:`mean`, or by the clients under secure aggregation), and
        the next scalars; ``clipped.unclipped`` feeds adaptive clipping."""
        c = self.clip_norm(scalars)
        stddev = self.update_noise_multiplier() * c
        mean = fixed_denominator_mean(dict(clipped.sums), stddev, self.expected_clients,
                                      self.seed, round_number)
        mean = {k: v.astype(np.asarray(like[k]).dtype) for k, v in mean.items()}
        nxt = {CLIP_KEY: c}
        if self.adaptive is not None:
            state = self.adaptive.update(AdaptiveClipState(c), clipped.unclipped,
                                         self.expected_clients, self.seed, round_number,
                                         num_reports=clipped.count)
            nxt[CLIP_KEY] = state.clip_norm
        return mean, nxt


@functools.lru_cache(maxsize=4096)
def _epsilon(budget: PrivacyBudget, rounds: int) -> float:
    return float(budget._accountant().epsilon(rounds))


def parse_dp_clip(spec: str) -> tuple[float | None, AdaptiveClip | None]:
    """``"C"`` (fixed) or ``"adaptive:QUANTILE[:INITIAL]"`` to (clip, adaptive)."""
    text = spec.strip()
    if text.startswith("adaptive"):
        parts = text.split(":")
        try:
            if not 2 <= len(parts) <= 3:
                raise ValueError
            quantile = float(parts[1])
            initial = float(parts[2]) if len(parts) == 3 else 0.1
        except ValueError:
            raise ConfigError(f"--dp-clip {spec!r} is not adaptive:QUANTILE[:INITIAL_CLIP]; "
                              "e.g. adaptive:0.5.") from None
        if not 0 <= quantile <= 1:
            raise ConfigError(f"--dp-clip adaptive quantile must be in [0, 1], got {quantile}.")
        return None, AdaptiveClip(target_quantile=quantile, initial_clip_norm=initial)
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--dp-clip {spec!r} is neither a clip norm nor adaptive:QUANTILE; "
                          "e.g. --dp-clip 1.0 or --dp-clip adaptive:0.5.") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--dp-clip must be a positive number, got {spec}.")
    return value, None


@dataclass(frozen=True)
class PrivacyBudget:
    """(ε, δ) of a DP-FedAvg run after each round, and whether a round still fits the budget.

    ``sampling`` is what the run actually does: ``poisson`` (each client joins a
    round with probability ``sampling_rate``; the simulator) or ``fixed``
    (exactly ``sampling_rate × num_clients`` of ``num_clients`` without
    replacement; the HTTP server). See :mod:`fedlearn.privacy.accounting`.
    """

    noise_multiplier: float
    sampling_rate: float
    delta: float
    sampling: str
    num_clients: int
    target_epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.target_epsilon is not None and not (
                math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ConfigError(f"--dp-target-epsilon must be a positive number, got "
                              f"{self.target_epsilon}.")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.delta}.")

    def _accountant(self) -> Any:
        from fedlearn.privacy.accounting import Accountant

        return Accountant(self.noise_multiplier, self.sampling_rate, self.delta,
                          sampling=self.sampling,  # type: ignore[arg-type]
                          num_clients=self.num_clients)

    def epsilon(self, rounds: int) -> float:
        """ε after ``rounds`` released rounds (0 for none; inf without noise); remembered,
        as every round's record and every status request asks again."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return _epsilon(self, rounds)

    def allows(self, rounds: int) -> bool:
        """True when ``rounds`` rounds stay within ``target_epsilon`` (always, without one)."""
        return self.target_epsilon is None or self.epsilon(rounds) <= self.target_epsilon

    def max_rounds(self, planned: int) -> int:
        """The rounds a run of ``planned`` rounds may have within ``target_epsilon``.

        Raises ConfigError when not even one round fits.
        """
        if self.target_epsilon is None:
            return planned
        if self.noise_multiplier == 0:
            raise ConfigError("--dp-target-epsilon needs noise: --dp-noise-multiplier 0 gives "
                              "no guarantee at all.")
        allowed = int(self._accountant().max_steps(self.target_epsilon))
        if allowed < 1:
            raise ConfigError(f"--dp-target-epsilon {self.target_epsilon:g} is below the ε of "
                              f"a single round ({self.epsilon(1):.3g}); raise "
                              "--dp-noise-multiplier or the target.")
        return min(planned, allowed)

    def record(self, rounds: int) -> dict[str, float]:
        """The metrics columns after ``rounds`` rounds: ``dp_epsilon`` and ``dp_delta``."""
        return {"dp_epsilon": self.epsilon(rounds), "dp_delta": self.delta}

    def describe(self) -> str:
        """One line: the accountant, the sampling, z and δ (and the target, if any)."""
        if self.noise_multiplier == 0:
            return "DP-FedAvg with no noise: clipping only, no privacy guarantee (ε = inf)"
        text = str(self._accountant().describe())
        if self.target_epsilon is not None:
            text += f"; stops before ε exceeds {self.target_epsilon:g}"
        return text
