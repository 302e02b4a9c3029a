"""The simulator's virtual clock: client speeds, task durations and an event heap.

A client's **speed** is how many local steps it takes per virtual second; a
**step** is one mini-batch (one optimizer step). A task of ``epochs`` passes
over ``n`` rows with batch size ``B`` is ``epochs * ceil(n / B)`` steps, so it
takes ``steps / speed`` virtual seconds. Speeds come from ``--client-speeds``:

- ``constant`` (every client 1.0; ``constant:S`` for S),
- ``lognormal:SIGMA`` (``exp(N(0, SIGMA^2))``, median 1),
- ``uniform:LO:HI`` (``0 < LO <= HI``),
- or a file (CSV or plain text) with one positive speed per client, in client
  order; numbers may be separated by newlines, commas or blanks, a first line
  that is not a number is a header, and ``#`` starts a comment.

Random speeds are drawn once per run from a generator seeded by the run seed,
in client order, so a run with the same seed gives every client the same speed.
Nothing here knows about models or training.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from fedlearn.errors import ConfigError
from fedlearn.seeding import rng_for

SPEED_SPECS = ("constant", "lognormal:SIGMA", "uniform:LO:HI", "a file with one speed per client")
_NAMES = ("constant", "lognormal", "uniform")

T = TypeVar("T")


def _hint(spec: str) -> str:
    return (f"--client-speeds {spec!r} is not a speed spec or a readable file; use "
            f"{', '.join(SPEED_SPECS[:-1])} or {SPEED_SPECS[-1]}.")


def _number(spec: str, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--client-speeds {spec!r} has a non-number {what} {text!r}; "
                          "write e.g. lognormal:1.0 or uniform:0.5:2.") from None
    if not math.isfinite(value):
        raise ConfigError(f"--client-speeds {spec!r} needs a finite {what}, got {text!r}.")
    return value


def _from_file(spec: str, path: Path, clients: int) -> npt.NDArray[np.float64]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read --client-speeds file {spec} ({why}); give a "
                          "readable CSV or text file with one speed per client.") from None
    values: list[float] = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = [t for t in re.split(r"[,;\s]+", line.split("#", 1)[0]) if t]
        for token in tokens:
            try:
                value = float(token)
            except ValueError:
                if not values and number == _first_line(text):
                    break  # a header line
                raise ConfigError(f"--client-speeds file {spec} line {number} has {token!r}, "
                                  "not a number; write one positive speed per client.") from None
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--client-speeds file {spec} line {number} has speed "
                                  f"{token}; every speed must be a positive finite number.")
            values.append(value)
    if len(values) != clients:
        raise ConfigError(f"--client-speeds file {spec} holds {len(values)} speeds but there "
                          f"are {clients} clients; give exactly one speed per client.")
    return np.asarray(values, dtype=np.float64)


def _first_line(text: str) -> int:
    """The number of the first line with anything but blanks and comments on it."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.split("#", 1)[0].strip():
            return number
    return 0


def client_speeds(spec: str, clients: int, seed: int) -> npt.NDArray[np.float64]:
    """Each of ``clients`` clients' speed (steps per virtual second) as ``spec`` says.

    Raises a one-sentence :class:`ConfigError` for an unknown or malformed spec,
    an unreadable file, a bad number or a count that is not ``clients``.
    """
    name, *args = spec.strip().split(":")
    lowered = name.lower()
    if lowered not in _NAMES:
        path = Path(spec)
        if path.is_file():
            return _from_file(spec, path, clients)
        raise ConfigError(_hint(spec))
    rng = rng_for("client-speeds", seed)
    if lowered == "constant" and len(args) <= 1:
        speed = _number(spec, args[0], "speed") if args else 1.0
        if not speed > 0:
            raise ConfigError(f"--client-speeds {spec!r} needs a positive speed.")
        return np.full(clients, speed, dtype=np.float64)
    if lowered == "lognormal" and len(args) == 1:
        sigma = _number(spec, args[0], "SIGMA")
        if sigma < 0:
            raise ConfigError(f"--client-speeds {spec!r} needs SIGMA >= 0, e.g. lognormal:1.0.")
        return np.asarray(np.exp(rng.normal(0.0, sigma, clients)), dtype=np.float64)
    if lowered == "uniform" and len(args) == 2:
        lo, hi = (_number(spec, a, "bound") for a in args)
        if not 0 < lo <= hi:
            raise ConfigError(f"--client-speeds {spec!r} needs 0 < LO <= HI, e.g. "
                              "uniform:0.5:2.")
        return np.asarray(rng.uniform(lo, hi, clients), dtype=np.float64)
    forms = {"constant": "constant or constant:S", "lognormal": "lognormal:SIGMA",
             "uniform": "uniform:LO:HI"}
    raise ConfigError(f"--client-speeds {spec!r} has the wrong number of parts; write "
                      f"{forms[lowered]}.")


def task_steps(rows: int, epochs: int, batch_size: int) -> int:
    """Local steps (mini-batches) of a task: ``epochs * ceil(rows / batch_size)``."""
    return epochs * max(1, math.ceil(rows / batch_size))


@dataclass(order=True)
class _Entry(Generic[T]):
    time: float
    seq: int
    item: T = field(compare=False)


class EventQueue(Generic[T]):
    """Items ordered by virtual time; equal times come out in the order they went in."""

    def __init__(self) -> None:
        self._heap: list[_Entry[T]] = []
        self._seq = itertools.count()

    def push(self, time: float, item: T) -> None:
        """Schedule ``item`` at virtual ``time``."""
        heapq.heappush(self._heap, _Entry(time, next(self._seq), item))

    def pop(self) -> tuple[float, T]:
        """The earliest item and its time (IndexError when empty)."""
        entry = heapq.heappop(self._heap)
        return entry.time, entry.item

    def peek_time(self) -> float | None:
        """The earliest time queued, or None when empty."""
        return self._heap[0].time if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)
