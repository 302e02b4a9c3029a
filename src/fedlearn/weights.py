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
    return {k: np.asarray(a[k] + b[k]) for k in a}


def subtract(a: Weights, b: Weights) -> Weights:
    """Element-wise ``a - b``."""
    _same_keys(a, b)
    return {k: np.asarray(a[k] - b[k]) for k in a}


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

    @classmethod
    def of_sum(cls, sums: Mapping[str, np.ndarray], total_weight: float, count: int,
               dtypes: Mapping[str, np.dtype]) -> RunningSum:
        """A running sum that already holds ``count`` weights adding up to ``sums``
        (Σ factor·w, per name) with factors adding up to ``total_weight``; ``mean``
        casts to ``dtypes``. For a sum computed elsewhere, e.g. by secure aggregation."""
        if sums.keys() != dtypes.keys():
            raise ValueError("the sums and their dtypes name different arrays")
        if not total_weight >= 0 or count < 0:
            raise ValueError(f"a sum needs a non-negative weight and count, got "
                             f"{total_weight} and {count}")
        out = cls()
        out._sum = {k: np.array(v, dtype=np.float64) for k, v in sums.items()}
        out._dtypes = {k: np.dtype(v) for k, v in dtypes.items()}
        out.total_weight = float(total_weight)
        out.count = count
        return out

    def add(self, w: Weights, factor: float) -> None:
        """Fold ``factor * w`` into the sum."""
        if not factor >= 0:
            raise ValueError(f"weights in a mean must be non-negative, got {factor}")
        if self._sum is None:
            self._sum = {k: np.asarray(v, dtype=np.float64) * factor for k, v in w.items()}
            self._dtypes = {k: v.dtype for k, v in w.items()}
        else:
            _same_keys(self._sum, w)
            for k, v in w.items():
                self._sum[k] += v.astype(np.float64) * factor
        self.total_weight += factor
        self.count += 1

    def mean(self) -> Weights:
        """The weighted mean of everything added so far (integer arrays rounded to nearest)."""
        if self._sum is None or self.total_weight <= 0:
            raise ValueError("cannot take the mean of nothing (no weights or zero total weight)")
        out: Weights = {}
        for k, v in self._sum.items():
            m = v / self.total_weight
            if self._dtypes[k].kind in "iub":
                m = np.rint(m)
            out[k] = np.asarray(m).astype(self._dtypes[k])
        return out


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and dtype of one named array."""

    shape: tuple[int, ...]
    dtype: str


Spec = Mapping[str, TensorSpec]


def spec_of(w: Weights) -> dict[str, TensorSpec]:
    """The spec (names, shapes, dtypes) that payloads shaped like ``w`` must match."""
    return {k: TensorSpec(tuple(int(d) for d in v.shape), str(v.dtype)) for k, v in w.items()}


def encode(w: Weights, metadata: Mapping[str, str] | None = None) -> bytes:
    """Weights to safetensors bytes (contiguous copies; no pickle).

    ``metadata`` (text to text) goes into the safetensors header; read it back
    with :func:`read_metadata`.
    """
    # np.ascontiguousarray would turn a 0-d array (a BatchNorm counter) into shape (1,).
    return bytes(st_save({k: np.require(v, requirements="C") for k, v in w.items()},
                         metadata=dict(metadata) if metadata else None))


def read_metadata(data: bytes) -> dict[str, str]:
    """The text metadata in the header of safetensors ``data`` (empty when there is none).

    Raises :class:`PayloadError` for bytes whose header is not safetensors'.
    """
    import json

    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        raise PayloadError("payload is not safetensors bytes (bad header length).")
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError) as exc:
        raise PayloadError("payload is not safetensors bytes (bad header).") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        return {}
    return {str(k): str(v) for k, v in meta.items()}


def pack(weights: Weights, extras: Mapping[str, Weights]) -> Weights:
    """``weights`` plus each group of ``extras`` as entries named ``GROUP/NAME``.

    How further named arrays travel beside a model or a delta in one safetensors
    payload (SCAFFOLD's ``c/fc1.weight``, ``delta_c/fc1.weight``). The arrays are
    not copied.
    """
    out = dict(weights)
    for group, arrays in extras.items():
        for name, value in arrays.items():
            key = f"{group}/{name}"
            if key in out:
                raise ValueError(f"two arrays would travel as {key!r}")
            out[key] = value
    return out


def unpack(arrays: Mapping[str, np.ndarray], groups: Iterable[str]) -> tuple[Weights,
                                                                            dict[str, Weights]]:
    """The inverse of :func:`pack` for ``groups``: (the other entries, {group: arrays})."""
    prefixes = {f"{g}/": g for g in groups}
    weights: Weights = {}
    extras: dict[str, Weights] = {g: {} for g in prefixes.values()}
    for key, value in arrays.items():
        group = next((g for p, g in prefixes.items() if key.startswith(p)), None)
        if group is None:
            weights[key] = value
        else:
            extras[group][key[len(group) + 1 :]] = value
    return weights, extras


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


def spec_to_json(spec: Spec) -> dict[str, dict[str, object]]:
    """A spec as JSON: ``{name: {"shape": [...], "dtype": "float32"}}``."""
    return {k: {"shape": list(s.shape), "dtype": s.dtype} for k, s in spec.items()}


def spec_from_json(data: object) -> dict[str, TensorSpec]:
    """The inverse of :func:`spec_to_json`; PayloadError for anything malformed."""
    if not isinstance(data, dict) or len(data) > 100_000:
        raise PayloadError("the task identity must be an object of name -> {shape, dtype}.")
    out: dict[str, TensorSpec] = {}
    for name, entry in data.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(shape, list):  # JSON has one number type: 3.0 is the integer 3
            shape = [int(d) if isinstance(d, float) and d.is_integer() and abs(d) < 2**40
                     else d for d in shape]
        if (not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list)
                or len(shape) > 32 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                    for d in shape)):
            raise PayloadError(f"the task identity entry for {str(name)[:80]!r} is malformed; "
                               "send {shape: [ints], dtype: str}.")
        out[name] = TensorSpec(tuple(shape), dtype)
    return out


def spec_difference(expected: Spec, got: Spec) -> str | None:
    """The first difference between two specs as a phrase, or None when they match."""
    for name in sorted(set(expected) | set(got)):
        if name not in got:
            return f"the client's model has no {name!r}"
        if name not in expected:
            return f"the client's model has {name!r}, which the server's does not"
        e, g = expected[name], got[name]
        if e.shape != g.shape:
            return f"{name!r} has shape {g.shape} on the client but {e.shape} on the server"
        if e.dtype != g.dtype:
            return f"{name!r} has dtype {g.dtype} on the client but {e.dtype} on the server"
    return None


def spec_nbytes(spec: Spec) -> int:
    """Bytes of the data of arrays shaped as ``spec`` says."""
    return int(sum(np.dtype(s.dtype).itemsize * int(np.prod(s.shape, dtype=np.int64))
                   for s in spec.values()))


def nbytes(w: Weights) -> int:
    """Bytes of the arrays' data (about the size of their safetensors encoding)."""
    return int(sum(v.nbytes for v in w.values()))


#: The largest magnitude a global model value may have; beyond it (or non-finite)
#: an aggregate is refused and the round fails, keeping the previous model.
MAX_MAGNITUDE = 1e12


def unusable(w: Weights) -> str | None:
    """Why ``w`` cannot be a global model (non-finite or absurdly large), or None."""
    for k, v in w.items():
        if v.dtype.kind != "f" or v.size == 0:
            continue
        if not np.isfinite(v).all():
            return f"{k} holds NaN or infinite values"
        peak = float(np.max(np.abs(v)))
        if peak > MAX_MAGNITUDE:
            return f"{k} reaches {peak:.3g}, beyond the limit of {MAX_MAGNITUDE:g}"
    return None


def float_norm(w: Weights) -> float:
    """Global L2 norm over the float arrays only (counters are not weights)."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64)))
                             for v in w.values() if v.dtype.kind == "f")))


#: Models with at least this many float values get the "full weights, not a delta" check.
FULL_WEIGHTS_MIN_VALUES = 1000


def check_delta(delta: Weights, current: Weights, limit: float | None) -> None:
    """Refuse a delta whose norm is over ``limit`` or that is the full weights, not a delta.

    A client that sends its trained weights instead of (trained - global) sends
    something within half the global model's norm of the global model itself;
    no honest delta looks like that.
    """
    size = float_norm(delta)
    if not np.isfinite(size):
        raise PayloadError("the update's norm overflows; send a finite delta of sane size.")
    if limit is not None and size > limit:
        raise PayloadError(f"the update's norm {size:.4g} is over the server's "
                           f"--max-update-norm {limit:.4g}; send trained weights minus the "
                           "global weights, with a sane learning rate.")
    base = float_norm(current)
    values = sum(v.size for v in current.values() if v.dtype.kind == "f")
    # Only for real models: in a handful of numbers a delta may well look like the weights.
    if values >= FULL_WEIGHTS_MIN_VALUES and base > 0 and size > 0.5 * base:
        gap = float_norm({k: v.astype(np.float64) - current[k] for k, v in delta.items()
                          if v.dtype.kind == "f"})
        if gap < 0.5 * base:
            raise PayloadError("the update looks like full model weights, not a delta; send "
                               "trained weights minus the global weights the task named.")
