"""Pure operations on :data:`~fedlearn.types.Weights` and the safetensors codec.

Every function returns new arrays and never changes its arguments. The codec
is the only way weights cross a process boundary: safetensors bytes (names,
dtypes and shapes in its header; no pickle), checked on the way in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedlearn.errors import PayloadError, PayloadTooLargeError
from fedlearn.types import Weights

#: Default largest payload accepted by :func:`decode` (bytes).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


def add(a: Weights, b: Weights) -> Weights:
    """Element-wise ``a + b``."""
    _same_keys(a, b)
    return {k: a[k] + b[k] for k in a}


def subtract(a: Weights, b: Weights) -> Weights:
    """Element-wise ``a - b``."""
    _same_keys(a, b)
    return {k: a[k] - b[k] for k in a}


def scale(a: Weights, factor: float) -> Weights:
    """Every array of ``a`` multiplied by ``factor`` (dtype kept)."""
    return {k: (v * factor).astype(v.dtype, copy=False) for k, v in a.items()}


def zeros_like(a: Weights) -> Weights:
    """Arrays of zeros with the keys, shapes and dtypes of ``a``."""
    return {k: np.zeros_like(v) for k, v in a.items()}


def norm(a: Weights) -> float:
    """Global L2 norm over all arrays."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in a.values())))


def weighted_mean(items: Iterable[tuple[Weights, float]]) -> Weights:
    """Mean of weights weighted by the given non-negative factors (streamed: one sum held)."""
    acc = RunningSum()
    for w, factor in items:
        acc.add(w, factor)
    return acc.mean()


class RunningSum:
    """A streaming weighted sum: holds one model's worth of float64 arrays.

    ``add`` folds one (weights, factor) pair in; ``mean`` returns the weighted
    mean in the dtypes of the first weights added. Used by FedAvg so a server
    never keeps one model per client.
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] | None = None
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, w: Weights, factor: float) -> None:
        """Fold ``factor * w`` into the sum."""
        if not factor >= 0:
            raise ValueError(f"weights in a mean must be non-negative, got {factor}")
        if self._sum is None:
            self._sum = {k: v.astype(np.float64) * factor for k, v in w.items()}
            self._dtypes = {k: v.dtype for k, v in w.items()}
        else:
            _same_keys(self._sum, w)
            for k, v in w.items():
                self._sum[k] += v.astype(np.float64) * factor
        self.total_weight += factor
        self.count += 1

    def mean(self) -> Weights:
        """The weighted mean of everything added so far."""
        if self._sum is None or self.total_weight <= 0:
            raise ValueError("cannot take the mean of nothing (no weights or zero total weight)")
        return {
            k: (v / self.total_weight).astype(self._dtypes[k]) for k, v in self._sum.items()
        }


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one named array."""

    shape: tuple[int, ...]
    dtype: str


Spec = Mapping[str, TensorSpec]


def spec_of(w: Weights) -> dict[str, TensorSpec]:
    """The spec (names, shapes, dtypes) that payloads shaped like ``w`` must match."""
    return {k: TensorSpec(tuple(int(d) for d in v.shape), str(v.dtype)) for k, v in w.items()}


def encode(w: Weights) -> bytes:
    """Weights to safetensors bytes (contiguous copies; no pickle)."""
    # np.ascontiguousarray would turn a 0-d array (a BatchNorm counter) into shape (1,).
    return bytes(st_save({k: np.require(v, requirements="C") for k, v in w.items()}))


def decode(
    data: bytes, spec: Spec | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Weights:
    """Safetensors bytes to weights, checked against ``spec``.

    Raises :class:`PayloadTooLargeError` over ``max_bytes`` and
    :class:`PayloadError` for bytes that are not safetensors, missing or extra
    keys, a wrong shape or dtype, or any NaN or infinite value.
    """
    if len(data) > max_bytes:
        raise PayloadTooLargeError(
            f"payload is {len(data)} bytes, over the limit of {max_bytes}; "
            "send a model of the run's shape."
        )
    if len(data) < 8:
        raise PayloadError("payload is not safetensors bytes (too short); encode weights with "
                           "safetensors.")
    try:
        arrays = st_load(data)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise PayloadError(
            f"payload is not valid safetensors ({exc}); encode weights with safetensors."
        ) from exc
    if spec is not None:
        check(arrays, spec)
    else:
        _check_finite(arrays)
    return arrays


def check(w: Weights, spec: Spec) -> None:
    """Raise :class:`PayloadError` unless ``w`` matches ``spec`` and is all finite."""
    missing = sorted(set(spec) - set(w))
    extra = sorted(set(w) - set(spec))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise PayloadError(
            f"payload keys do not match the model ({'; '.join(parts)}); "
            "send every parameter of the run's model and nothing else."
        )
    for k, s in spec.items():
        v = w[k]
        if tuple(v.shape) != s.shape:
            raise PayloadError(
                f"{k} has shape {tuple(v.shape)} but the model needs {s.shape}; "
                "train the run's model."
            )
        if str(v.dtype) != s.dtype:
            raise PayloadError(f"{k} has dtype {v.dtype} but the model needs {s.dtype}.")
    _check_finite(w)


def _check_finite(w: Weights) -> None:
    for k, v in w.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise PayloadError(
                f"{k} contains NaN or infinite values; lower the learning rate or check the data."
            )


def _same_keys(a: Mapping[str, object], b: Mapping[str, object]) -> None:
    if a.keys() != b.keys():
        raise ValueError(f"weights have different keys: {sorted(a)} vs {sorted(b)}")
