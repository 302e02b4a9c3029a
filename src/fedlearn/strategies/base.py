"""What a composable strategy works on: one client's :class:`Update`, the :class:`ServerState`.

Also the rule every strategy shares for integer arrays (see the package
docstring) and the flat checkpoint form of a state (:func:`state_to_arrays`,
:func:`state_from_arrays`). Nothing here changes its arguments.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedlearn.types import Weights
from fedlearn.weights import RunningSum

#: Group name of the model's arrays in :func:`state_to_arrays`.
MODEL_GROUP = "model"
#: Version of the layout :func:`state_to_arrays` writes.
STATE_FORMAT = 1


@dataclass(frozen=True)
class Update:
    """One client's result as a strategy sees it.

    ``delta`` is the client's weights minus the weights it started from;
    ``num_examples`` the examples it trained on (the weight of its delta in
    example-weighted means); ``extra`` any further named deltas a strategy asks
    for (SCAFFOLD: ``{"delta_c": ...}``).
    """

    delta: Weights
    num_examples: int
    extra: Mapping[str, Weights] = field(default_factory=dict)
    client_id: str = ""


@dataclass(frozen=True)
class ServerState:
    """Everything needed to resume a run exactly.

    ``arrays`` holds named groups of arrays (``"opt/m"``, ``"opt/v"``,
    ``"scaffold/c"``); ``scalars`` numbers such as ``"opt/step"``. ``version``
    counts rounds applied to ``weights``.
    """

    weights: Weights
    version: int = 0
    arrays: Mapping[str, Weights] = field(default_factory=dict)
    scalars: Mapping[str, float | int] = field(default_factory=dict)


def is_float(a: np.ndarray) -> bool:
    """Whether ``a`` goes through robust rules and server optimizers (floating dtypes do)."""
    return a.dtype.kind == "f"


def float_part(w: Weights) -> Weights:
    """The floating-point arrays of ``w`` (the same array objects, not copies)."""
    return {k: v for k, v in w.items() if is_float(v)}


def cast(x: object, dtype: npt.DTypeLike) -> np.ndarray:
    """A new array of ``x`` in ``dtype`` (0-d stays a 0-d array, never a numpy scalar)."""
    return np.array(x, dtype=dtype)


def copy_weights(w: Mapping[str, np.ndarray]) -> Weights:
    """A deep copy of ``w`` (0-d arrays stay 0-d)."""
    return {k: np.array(v, copy=True) for k, v in w.items()}


def integer_mean(updates: Sequence[Update]) -> Weights:
    """The non-float arrays' combined delta: ``rint(sum(n_i d_i) / sum(n_i))``, dtype kept.

    The one rule every strategy uses for integer arrays (BatchNorm's
    ``num_batches_tracked``, 0-d included): the example-weighted mean of the
    integer deltas, rounded to the nearest integer (ties to even), as
    :class:`~fedlearn.weights.RunningSum` rounds it.
    """
    acc = RunningSum()
    for u in updates:
        acc.add({k: v for k, v in u.delta.items() if not is_float(v)}, float(u.num_examples))
    return acc.mean()


def check_updates(weights: Weights, updates: Sequence[Update]) -> None:
    """Raise ValueError unless every update has the model's keys and shapes and >= 1 example."""
    if not updates:
        raise ValueError("a round needs at least 1 update to aggregate, got none")
    for u in updates:
        who = f"update from {u.client_id!r}" if u.client_id else "an update"
        if (isinstance(u.num_examples, bool) or not isinstance(u.num_examples, int | np.integer)
                or u.num_examples < 1):
            raise ValueError(f"{who} has num_examples {u.num_examples!r}; it needs an int >= 1")
        check_like(weights, u.delta, f"{who}'s delta")


def check_like(weights: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
               what: str) -> None:
    """Raise ValueError unless ``other`` has exactly the keys and shapes of ``weights``."""
    if other.keys() != weights.keys():
        missing = sorted(set(weights) - set(other))
        extra = sorted(set(other) - set(weights))
        raise ValueError(f"{what} does not match the model (missing {missing}, unexpected {extra})")
    for k, v in weights.items():
        if np.shape(other[k]) != np.shape(v):
            raise ValueError(f"{what} has shape {np.shape(other[k])} for {k!r}; "
                             f"the model needs {np.shape(v)}")


# -- checkpoint form ------------------------------------------------------------------


def state_to_arrays(state: ServerState) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A state as flat named arrays plus JSON-able metadata, for a checkpoint.

    Array names are ``"model/<name>"`` for the weights and ``"<group>/<name>"``
    for ``state.arrays`` (``"opt/m/fc1.weight"``). The metadata holds the
    version, the scalars and which group and name each flat key came from, so
    :func:`state_from_arrays` restores the state exactly. The arrays are copies.
    """
    groups: dict[str, Mapping[str, np.ndarray]] = {MODEL_GROUP: state.weights, **state.arrays}
    if len(groups) != len(state.arrays) + 1:
        raise ValueError(f"the state's arrays may not use the group name {MODEL_GROUP!r}")
    arrays: dict[str, np.ndarray] = {}
    names: dict[str, list[str]] = {}
    for group, members in groups.items():
        for name, value in members.items():
            flat = f"{group}/{name}"
            if flat in arrays:
                raise ValueError(f"two arrays of the state flatten to the same name {flat!r}")
            arrays[flat] = np.array(value, copy=True)
            names[flat] = [group, name]
    scalars: dict[str, float | int] = {}
    for key, number in state.scalars.items():
        if (isinstance(number, bool) or not isinstance(number, int | float)
                or not math.isfinite(number)):
            raise ValueError(f"state scalar {key!r} is {number!r}; scalars must be finite numbers")
        scalars[key] = number
    meta: dict[str, Any] = {
        "format": STATE_FORMAT,
        "version": int(state.version),
        "scalars": scalars,
        "groups": sorted(state.arrays),
        "names": names,
    }
    json.dumps(meta)  # fails here, not in the checkpoint writer, if anything is not JSON-able
    return arrays, meta


def state_from_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> ServerState:
    """The inverse of :func:`state_to_arrays` (copies; ValueError for anything inconsistent)."""
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"strategy state format {meta.get('format')!r} is not the supported "
                         f"{STATE_FORMAT}; resume with the fedlearn version that wrote it")
    names = meta.get("names")
    version = meta.get("version")
    scalars = meta.get("scalars")
    groups = meta.get("groups")
    if (not isinstance(names, dict) or not isinstance(version, int)
            or not isinstance(scalars, dict) or not isinstance(groups, list)):
        raise ValueError("strategy state metadata is malformed (needs names, version, scalars, "
                         "groups)")
    if set(names) != set(arrays):
        raise ValueError("strategy state arrays do not match their metadata: "
                         f"missing {sorted(set(names) - set(arrays))}, "
                         f"unexpected {sorted(set(arrays) - set(names))}")
    out: dict[str, Weights] = {MODEL_GROUP: {}, **{str(g): {} for g in groups}}
    for flat, entry in names.items():
        if (not isinstance(entry, list) or len(entry) != 2 or entry[0] not in out
                or f"{entry[0]}/{entry[1]}" != flat):
            raise ValueError(f"strategy state metadata for {flat!r} is malformed")
        out[entry[0]][entry[1]] = np.array(arrays[flat], copy=True)
    weights = out.pop(MODEL_GROUP)
    return ServerState(weights=weights, version=version, arrays=out, scalars=dict(scalars))
