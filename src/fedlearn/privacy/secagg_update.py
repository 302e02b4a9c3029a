"""A model update as one vector for secure aggregation, and the checks on either side.

Under secure aggregation the server learns only the sum of the clients'
vectors, so a client folds everything the round needs from it into one:

    x = [s·δ (every array of the delta, flattened in name order), s, s·k·loss, s·k, w, u]

with ``w = min(n, E) / E`` its example weight (``n`` examples trained on, ``E``
the round's example scale: the largest count the round's clients declared
with their keys), ``s`` the weight its delta carries in the sum (``w`` under
FedAvg; 1 under DP-FedAvg, whose sum gives every client the same weight),
``loss`` its mean train loss, ``k`` 1 when it reports one, and ``u`` 1 when
DP-FedAvg's clip did not shorten its delta (the unclipped count adaptive
clipping needs; 0 without DP). The sum gives the weighted mean delta Σsδ / Σs
(FedAvg's, as the plain path computes it) or DP-FedAvg's sum of clipped
deltas, the examples behind the round (E·Σw), the weighted train loss and the
unclipped count, and nothing about any one client.

**Range.** Quantisation clips every coordinate to [-R, R] with
``R = max(B, 1)``, ``B`` the server's norm bound (``--max-update-norm``): for
float arrays ``|w·δ_j| ≤ |δ_j| ≤ ‖δ‖ ≤ B``, and ``w ≤ 1``. Integer buffers'
deltas must fit in [-R, R] too. A client checks all of this before it
takes part (:func:`checked_values`) and refuses to send an update that
fails, rather than letting the clip change it silently; the server checks what
survives aggregation (:func:`check_sum`).

Pure numpy: no torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedlearn.errors import PayloadError
from fedlearn.types import Weights
from fedlearn.weights import Spec, check, check_delta, float_norm

#: Coordinates after the model's values: the delta's weight, the weighted loss, the loss
#: weight, the example weight and the unclipped bit.
EXTRA = 5


def clip_range(norm_limit: float) -> float:
    """R: the quantisation range [-R, R] for a server norm bound ``norm_limit``."""
    return max(float(norm_limit), 1.0)


def example_weight(num_examples: int, example_scale: float) -> float:
    """w = min(n, E) / E: no client weighs more than E examples."""
    return min(float(num_examples), example_scale) / example_scale


@dataclass(frozen=True)
class UpdateLayout:
    """Where each array of a model's delta sits in the secure-aggregation vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, spec: Spec) -> UpdateLayout:
        """The layout of a model with ``spec``: its arrays in name order."""
        names = tuple(sorted(spec))
        return cls(names, tuple(spec[k].shape for k in names), tuple(spec[k].dtype for k in names))

    @property
    def size(self) -> int:
        """How many values the model has."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def dimension(self) -> int:
        """The vector's length: the model's values and :data:`EXTRA`."""
        return self.size + EXTRA

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> npt.NDArray[np.float64]:
        """The arrays in layout order as one float64 vector."""
        return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel()
                               for k in self.names]) if self.names else np.zeros(0)

    def unflatten(self, values: npt.NDArray[np.float64]) -> Weights:
        """Float64 arrays of the model's shapes from the first :attr:`size` values."""
        out: Weights = {}
        at = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            n = math.prod(shape)
            out[name] = np.array(values[at:at + n], dtype=np.float64).reshape(shape)
            at += n
        return out


def checked_values(
    layout: UpdateLayout, spec: Spec, delta: Weights, current: Weights, *, num_examples: int,
    norm_limit: float,
) -> npt.NDArray[np.float64]:
    """A client's own checks of its update; its values in layout order.

    Raises :class:`PayloadError` with one sentence for an update the server
    would refuse if it could see it: wrong names, shapes or dtypes, a NaN,
    a norm over ``norm_limit``, full weights instead of a delta, an example
    count below 1, or a value outside the quantisation range.
    """
    check(delta, spec)
    check_delta(delta, current, norm_limit)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise PayloadError(f"num_examples must be an integer of at least 1, got {num_examples!r}.")
    r = clip_range(norm_limit)
    values = layout.flatten(delta)
    outside = int(np.count_nonzero(np.abs(values) > r))
    if outside:
        raise PayloadError(f"{outside} value(s) of the update lie outside the secure "
                           f"aggregation range [-{r:.4g}, {r:.4g}] (integer buffers included); "
                           "the server's --max-update-norm sets that range.")
    return values


def client_vector(values: npt.NDArray[np.float64], *, num_examples: int, example_scale: float,
                  train_loss: float | None, clip: float, equal_weight: bool = False,
                  unclipped: bool = False) -> npt.NDArray[np.float64]:
    """The vector of the module doc from :func:`checked_values`; ``clip`` is R (a train loss
    outside [-R, R] is left out of the loss coordinates). ``equal_weight`` (DP-FedAvg) gives
    the delta weight 1 instead of its example weight; ``unclipped`` is DP's bit u."""
    if not (math.isfinite(example_scale) and example_scale >= 1):
        raise PayloadError(f"the round's example scale must be at least 1, got {example_scale}.")
    w = example_weight(num_examples, example_scale)
    s = 1.0 if equal_weight else w
    known = train_loss is not None and math.isfinite(train_loss) and abs(train_loss) <= clip
    loss = float(train_loss) if known and train_loss is not None else 0.0
    out = np.empty(values.size + EXTRA, dtype=np.float64)
    out[:values.size] = s * values
    out[values.size:] = (s, s * loss if known else 0.0, s if known else 0.0, w,
                         1.0 if unclipped else 0.0)
    return out


@dataclass(frozen=True)
class SummedUpdate:
    """What the unmasked sum of ``count`` client vectors says."""

    sums: Weights  # Σ s·δ per array, float64
    weight: float  # Σ s
    loss_sum: float  # Σ s·loss over clients that reported one
    loss_weight: float  # Σ s over those clients
    example_weight: float  # Σ w
    unclipped: float  # Σ u
    count: int

    def examples(self, example_scale: float) -> int:
        """The examples behind the round: E·Σw, to the nearest integer."""
        return round(self.example_weight * example_scale)

    def train_loss(self) -> float | None:
        """The weighted mean train loss (None when no client reported one)."""
        return self.loss_sum / self.loss_weight if self.loss_weight > 1e-9 else None


def decode_sum(layout: UpdateLayout, total: npt.NDArray[np.float64], count: int) -> SummedUpdate:
    """The :class:`SummedUpdate` of an unmasked sum of ``count`` vectors."""
    if total.shape != (layout.dimension,):
        raise PayloadError(f"the unmasked sum has {total.size} values; the layout needs "
                           f"{layout.dimension}.")
    weight, loss_sum, loss_weight, example_weight, unclipped = (
        float(v) for v in total[layout.size:])
    return SummedUpdate(layout.unflatten(total), weight, loss_sum, loss_weight, example_weight,
                        unclipped, count)


def check_sum(summed: SummedUpdate, dtypes: Mapping[str, np.dtype], *, norm_limit: float,
              tolerance: float, equal_weight: bool = False) -> str | None:
    """What is wrong with an unmasked sum, or None: the server's check of what it can see.

    Every honest vector has ``0 < s ≤ 1`` (``s = 1`` with ``equal_weight``),
    ``0 ≤ s·k ≤ s``, ``0 < w ≤ 1``, ``u`` 0 or 1 and ``‖s·δ‖ ≤ s·B`` over the
    float arrays (``B`` is ``norm_limit``: the server's norm bound, or DP's clip
    norm), so the sum has ``0 < Σs ≤ count`` (``= count``), ``0 < Σw ≤ count``,
    ``0 ≤ Σu ≤ count`` and ``‖Σ s·δ‖ ≤ B·Σs`` (triangle inequality);
    ``tolerance`` is the quantisation error allowed per coordinate (one level);
    the slack is two levels per client, as a bound compares two coordinates that
    were rounded apart (``s·k`` may round up where ``s`` rounds down). A sum
    outside these bounds proves that some client sent a vector outside its own.
    """
    slack = 2 * tolerance * summed.count
    if not summed.weight > slack:
        return f"the clients' example weights sum to {summed.weight:.4g}, not a positive number"
    if summed.weight > summed.count + slack:
        return (f"the clients' example weights sum to {summed.weight:.4g}, more than one per "
                f"client ({summed.count})")
    if equal_weight and abs(summed.weight - summed.count) > slack:
        return (f"the clients' weights sum to {summed.weight:.4g}, but under DP-FedAvg every "
                f"one of the {summed.count} clients weighs 1")
    if not slack < summed.example_weight <= summed.count + slack:
        return "the example weights of the sum are out of range"
    if not -slack <= summed.unclipped <= summed.count + slack:
        return "the unclipped count of the sum is out of range"
    if not -slack <= summed.loss_weight <= summed.weight + slack:
        return "the train-loss weights of the sum are out of range"
    floats = {k: v for k, v in summed.sums.items() if np.dtype(dtypes[k]).kind == "f"}
    size = float_norm(floats)
    values = sum(v.size for v in floats.values())
    bound = norm_limit * summed.weight + math.sqrt(values) * slack
    if not size <= bound:
        return (f"the sum's norm {size:.4g} is over the norm bound times the clients' weight "
                f"({bound:.4g}), so some client sent an update over its bound")
    return None
