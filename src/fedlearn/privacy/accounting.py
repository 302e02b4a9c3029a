"""Privacy accounting for user-level DP-FedAvg: (ε, δ) after a number of rounds.

Each round releases one Gaussian-noised sum of clipped client updates
(McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"): noise multiplier ``z`` = noise stddev / clip norm, over a sample of
clients. Two sampling schemes are accounted:

- ``"poisson"``: every client joins a round independently with probability
  ``q``. Event ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` self-composed
  once per round, under the add-or-remove-one-client relation. Both the RDP
  accountant (Mironov et al. 2019, sampled Gaussian mechanism) and the PLD
  accountant (privacy loss distributions; Koskela et al. 2020, Doroshenko
  et al. 2022) support it.
- ``"fixed"``: exactly ``K = q·N`` of ``N`` clients are drawn without
  replacement, which is what a server that samples a fixed number of clients
  does. Event ``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z))``.
  dp_accounting 0.6 accounts it only with the RDP accountant (Wang, Balle and
  Kasiviswanathan 2019) and only under the replace-one-client relation; the
  PLD accountant refuses the event, so ``method="pld"`` with fixed sampling is
  a :class:`ConfigError`. Replace-one is a stronger notion than add-or-remove
  (one replacement is a removal plus an addition), so the two ε values are not
  directly comparable.

The unit protected is a whole client's data (user-level DP).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import dp_accounting
from dp_accounting import NeighboringRelation
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import RdpAccountant

from fedlearn.errors import ConfigError

Method = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed"]

#: Upper end of :meth:`Accountant.max_steps` (a budget that allows this many rounds is unbounded).
MAX_STEPS_CAP = 10**9

# dp_accounting's PLDAccountant default; kept equal so results match it exactly.
_PLD_DISCRETIZATION = 1e-4


class Accountant:
    """(ε, δ) of DP-FedAvg rounds, computed with Google's dp_accounting.

    ``noise_multiplier`` is z (noise stddev over clip norm), ``sampling_rate``
    q the chance a client takes part in a round (for ``"fixed"``, K/N) and
    ``delta`` the δ at which ε is reported. ``num_clients`` (N) is required
    for fixed-size sampling.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        *,
        method: Method = "rdp",
        sampling: Sampling = "poisson",
        num_clients: int | None = None,
    ) -> None:
        _check_positive("noise_multiplier", noise_multiplier)
        if not (isinstance(sampling_rate, int | float) and 0 < sampling_rate <= 1):
            raise ConfigError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}.")
        if not (isinstance(delta, int | float) and 0 < delta < 1):
            raise ConfigError(f"delta must be in (0, 1), got {delta!r}.")
        if method not in ("rdp", "pld"):
            raise ConfigError(f"method must be 'rdp' or 'pld', got {method!r}.")
        if sampling not in ("poisson", "fixed"):
            raise ConfigError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}.")
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self.method: Method = method
        self.sampling: Sampling = sampling
        self.num_clients = num_clients
        self.sample_size: int | None = None
        if sampling == "fixed":
            self.sample_size = _fixed_sample_size(num_clients, self.sampling_rate)
            if method == "pld":
                raise ConfigError(
                    "the PLD accountant does not support fixed-size sampling without "
                    "replacement; use method='rdp' or sampling='poisson'."
                )
        elif num_clients is not None:
            _fixed_sample_size(num_clients, 1.0)  # validated even if unused
        self._pld_round: pld_lib.PrivacyLossDistribution | None = None

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        """Add-or-remove-one client for Poisson sampling, replace-one for fixed-size sampling."""
        if self.sampling == "fixed":
            return NeighboringRelation.REPLACE_ONE
        return NeighboringRelation.ADD_OR_REMOVE_ONE

    def round_event(self) -> dp_accounting.DpEvent:
        """The DpEvent of one round: a subsampled Gaussian mechanism with multiplier z."""
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "fixed":
            return dp_accounting.SampledWithoutReplacementDpEvent(
                self.num_clients, self.sample_size, gaussian
            )
        return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)

    def epsilon(self, steps: int) -> float:
        """ε at ``self.delta`` after ``steps`` rounds (0.0 for no rounds).

        RDP: ``RdpAccountant`` over ``SelfComposedDpEvent(round_event, steps)``.
        PLD: the one-round privacy loss distribution (the one ``PLDAccountant``
        builds for the same event) self-composed ``steps`` times; it is built
        once per accountant so that :meth:`max_steps` stays fast.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"steps must be a non-negative integer, got {steps!r}.")
        if steps == 0:
            return 0.0
        if self.method == "pld":
            return float(self._pld().self_compose(steps).get_epsilon_for_delta(self.delta))
        # Orders whose series does not converge are left out of the bound (never loosening
        # it) with one absl warning each; that is not news to a user.
        logging.getLogger("absl").setLevel(logging.ERROR)
        accountant = RdpAccountant(neighboring_relation=self.neighboring_relation)
        accountant.compose(dp_accounting.SelfComposedDpEvent(self.round_event(), steps))
        return float(accountant.get_epsilon(self.delta))

    def max_steps(self, target_epsilon: float) -> int:
        """The most rounds whose ε stays at or below ``target_epsilon`` (0 if even one exceeds it).

        ε grows with the number of rounds, so this is an exponential then a
        binary search over :meth:`epsilon`; capped at :data:`MAX_STEPS_CAP`.
        """
        _check_positive("target_epsilon", target_epsilon)
        if self.epsilon(1) > target_epsilon:
            return 0
        lo, hi = 1, 2
        while self.epsilon(hi) <= target_epsilon:
            if hi >= MAX_STEPS_CAP:
                return MAX_STEPS_CAP
            lo, hi = hi, min(2 * hi, MAX_STEPS_CAP)
        while hi - lo > 1:  # invariant: epsilon(lo) <= target < epsilon(hi)
            mid = (lo + hi) // 2
            if self.epsilon(mid) <= target_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    def describe(self) -> str:
        """One line naming the accountant, the sampling scheme and the neighbouring relation."""
        if self.sampling == "fixed":
            sampling = (
                f"fixed-size sampling of {self.sample_size} of {self.num_clients} clients "
                "without replacement"
            )
            relation = "replace-one-client"
        else:
            sampling = f"Poisson sampling q={self.sampling_rate:g}"
            relation = "add-or-remove-one-client"
        return (
            f"{self.method.upper()} accountant, {sampling}, {relation} neighbouring "
            f"(user-level), noise multiplier z={self.noise_multiplier:g}, δ={self.delta:g}"
        )

    def _pld(self) -> pld_lib.PrivacyLossDistribution:
        if self._pld_round is None:
            self._pld_round = pld_lib.from_gaussian_mechanism(
                standard_deviation=self.noise_multiplier,
                value_discretization_interval=_PLD_DISCRETIZATION,
                sampling_prob=self.sampling_rate,
                neighboring_relation=self.neighboring_relation,
            )
        return self._pld_round


def _check_positive(name: str, value: object) -> None:
    if not (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}.")


def _fixed_sample_size(num_clients: int | None, sampling_rate: float) -> int:
    if num_clients is None:
        raise ConfigError("fixed-size sampling needs num_clients, the population size N.")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be a positive integer, got {num_clients!r}.")
    size = round(sampling_rate * num_clients)
    if size < 1 or not math.isclose(size, sampling_rate * num_clients, rel_tol=1e-9):
        raise ConfigError(
            f"sampling_rate × num_clients must be a whole number of clients, got "
            f"{sampling_rate} × {num_clients}; use sampling_rate = K / num_clients."
        )
    return size
