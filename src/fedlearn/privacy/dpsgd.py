"""Sample-level DP-SGD on a client: the ``--dp-sgd NOISE:MAX_GRAD_NORM`` spec and its ledger.

DP-SGD (Abadi et al. 2016) clips each example's gradient to ``max_grad_norm``
and adds Gaussian noise of stddev ``noise_multiplier * max_grad_norm`` to the
sum of a batch drawn by Poisson sampling (each example joins with probability
``q = batch_size / n``). The training itself is Opacus's
(:mod:`fedlearn.training_dp`); this module holds what is torch-free:

- :class:`DPSGD`, the parsed spec;
- :class:`DPLedger`, a client's record of every DP-SGD run it made (noise
  multiplier, sampling rate, steps), so the guarantee composes across all the
  rounds the client took part in;
- :func:`sample_level_epsilon`, the client's ε at δ for that ledger, composed
  with Google's ``dp_accounting`` RDP accountant over
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` events under the
  add-or-remove-one-example relation — the bound Opacus's own RDP accountant
  computes.

The unit protected is one *example* of the client's data (sample-level DP),
not the whole client (that is the server's user-level DP-FedAvg).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedlearn.errors import ConfigError

#: RDP orders: Opacus's own set (fractional orders near 1, then integers to 63).
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

#: δ at which a client reports its ε unless told otherwise (below 1/n for n < 100,000).
DEFAULT_DELTA = 1e-5



@dataclass(frozen=True)
class DPSGD:
    """DP-SGD's two knobs, and the δ at which the client reports ε."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float = DEFAULT_DELTA

    def describe(self) -> str:
        """One line for logs."""
        return (f"DP-SGD: noise multiplier {self.noise_multiplier:g}, per-example clip "
                f"{self.max_grad_norm:g}")


def parse_dp_sgd(spec: str | None, delta: float = DEFAULT_DELTA) -> DPSGD | None:
    """``"NOISE:MAX_GRAD_NORM"`` (e.g. ``1.1:1.0``) to :class:`DPSGD`; None or "" to None."""
    if spec is None or spec == "":
        return None
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        noise, clip = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"--dp-sgd {spec!r} is not NOISE:MAX_GRAD_NORM; give two numbers, "
                          "e.g. --dp-sgd 1.1:1.0.") from None
    if not (math.isfinite(noise) and noise > 0):
        raise ConfigError(f"--dp-sgd noise multiplier must be a positive number, got {parts[0]}.")
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"--dp-sgd max grad norm must be a positive number, got {parts[1]}.")
    if not 0 < delta < 1:
        raise ConfigError(f"--dp-delta must be in (0, 1), got {delta}.")
    return DPSGD(noise, clip, delta)


@dataclass
class DPLedger:
    """Every DP-SGD run a client made: ``(noise_multiplier, sampling_rate, steps)`` entries.

    ``examples`` is the size of the data the runs sampled from.
    """

    runs: list[tuple[float, float, int]] = field(default_factory=list)
    examples: int = 0

    def record(self, noise_multiplier: float, sampling_rate: float, steps: int,
               examples: int) -> None:
        """Add one run of ``steps`` noisy steps at sampling rate ``sampling_rate``."""
        if steps > 0:
            self.runs.append((float(noise_multiplier), float(sampling_rate), int(steps)))
        self.examples = max(self.examples, int(examples))

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` of all recorded runs together."""
        return sample_level_epsilon(self.runs, delta)

    def save(self, path: Path) -> None:
        """Keep the ledger as JSON (a restarted client goes on composing from it)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"runs": self.runs, "examples": self.examples}))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> DPLedger:
        """The ledger kept at ``path`` (empty when there is none yet)."""
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
            runs = [(float(z), float(q), int(s)) for z, q, s in raw["runs"]]
            return cls(runs, int(raw.get("examples", 0)))
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is not a DP-SGD ledger this client wrote; move it away "
                              "only if you accept losing the record of privacy spent.") from None


def sample_level_epsilon(runs: list[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of DP-SGD runs ``(z, q, steps)``, composed (RDP, add-or-remove-one).

    The same bound as composing ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``
    ``steps`` times per run in dp_accounting's ``RdpAccountant`` over
    :data:`ORDERS`; the RDP curve of each distinct ``(z, q)`` is computed once
    per process, so a client's ε after every round costs next to nothing.
    """
    if not runs:
        return 0.0
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    total = np.zeros(len(ORDERS))
    for z, q, steps in runs:
        total += _rdp_curve(z, q) * steps
    eps, _ = rdp.compute_epsilon(ORDERS, total, delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def _rdp_curve(z: float, q: float) -> npt.NDArray[np.float64]:
    """RDP of one Poisson-sampled Gaussian step at each of :data:`ORDERS`."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    # Orders whose series does not converge are left out of the bound (never loosening
    # it) with one absl warning each; that is not news to a user.
    logging.getLogger("absl").setLevel(logging.ERROR)
    curve = rdp._compute_rdp_poisson_subsampled_gaussian(q, z, ORDERS)
    return np.asarray(curve, dtype=np.float64)
