"""Attacks for robustness evaluation: what a malicious client sends instead of its update.

Pure numpy (no torch, no I/O). An attack is parsed once from its spec
(``--attack``) into an :class:`Attack`; the simulator and the HTTP client then
call :func:`attack_delta` on an attacker's delta (model poisoning) or
:func:`flip_labels` on its training labels (data poisoning, ``label-flip``).
Which clients attack is :func:`choose_attackers`, seeded from the run seed.

Attacks touch float arrays only: integer buffers (``num_batches_tracked``)
travel as trained. Every attacked value is finite: what would overflow the
array's dtype is clipped to its largest finite value, so the update always
reaches the aggregation rule (a server's own checks, such as
``--max-update-norm``, may still refuse it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlearn.errors import ConfigError
from fedlearn.seeding import rng_for
from fedlearn.types import Weights

if TYPE_CHECKING:
    from fedlearn.tasks.base import Task

#: The attack kinds and what their spec looks like.
ATTACKS: dict[str, str] = {
    "sign-flip": "sign-flip or sign-flip:F (sends -F x delta; F defaults to 1)",
    "scale": "scale:F (sends F x delta)",
    "gaussian": "gaussian:SIGMA (sends N(0, SIGMA^2) noise instead of the delta)",
    "same-value": "same-value:V (every float entry of the delta set to V)",
    "label-flip": "label-flip (trains on labels num_classes - 1 - y)",
}

#: The share of clients that attack when ``--attack`` is given without ``--attackers``.
DEFAULT_FRACTION = 0.2

_SPECS = "sign-flip[:F], scale:F, gaussian:SIGMA, label-flip or same-value:V"


@dataclass(frozen=True)
class Attack:
    """A parsed attack: its ``kind`` (a key of :data:`ATTACKS`) and its number, if any."""

    kind: str
    value: float = 1.0

    @property
    def poisons_data(self) -> bool:
        """True for a data-poisoning attack (``label-flip``): the delta is left alone."""
        return self.kind == "label-flip"

    def __str__(self) -> str:
        if self.kind == "label-flip" or (self.kind == "sign-flip" and self.value == 1.0):
            return self.kind
        text = repr(self.value)  # exact, so the spec parses back to the same number
        return f"{self.kind}:{text[:-2] if text.endswith('.0') else text}"


def parse_attack(spec: str) -> Attack:
    """``--attack SPEC`` as an :class:`Attack`; a bad spec is one ConfigError sentence."""
    text = spec.strip().lower()
    kind, sep, arg = text.partition(":")
    if kind not in ATTACKS:
        raise ConfigError(f"unknown --attack {spec!r}; choose {_SPECS}.")
    if kind == "label-flip":
        if sep:
            raise ConfigError(f"--attack label-flip takes no value, got {spec!r}.")
        return Attack(kind)
    if not sep and kind == "sign-flip":
        return Attack(kind, 1.0)
    name, example = {"sign-flip": ("F", "2"), "scale": ("F", "10"), "gaussian": ("SIGMA", "0.5"),
                     "same-value": ("V", "100")}[kind]
    try:
        value = float(arg)
    except ValueError:
        value = math.nan
    if not sep or not math.isfinite(value):
        raise ConfigError(f"--attack {spec!r} needs a finite number, as in "
                          f"{kind}:{name} (e.g. {kind}:{example}).")
    if kind in ("gaussian", "sign-flip") and value <= 0:
        raise ConfigError(f"--attack {kind}:{name} needs {name} > 0, got {arg}.")
    return Attack(kind, value)


def check_fraction(fraction: float, clients: int | None = None) -> int | None:
    """Check ``--attackers FRACTION``; with ``clients``, how many of them attack.

    The count is ``FRACTION x clients`` rounded half up; a fraction above 0 that
    rounds to no client at all is refused, so a run never claims attackers it lacks.
    """
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ConfigError(f"--attackers must be a fraction of the clients in [0, 1], "
                          f"got {fraction}.")
    if clients is None:
        return None
    count = math.floor(fraction * clients + 0.5 + 1e-9)
    if fraction > 0 and count == 0:
        raise ConfigError(f"--attackers {fraction:g} of {clients} clients is no client at all; "
                          f"give at least {1 / clients:.3g} or add clients.")
    return count


def check_attack_config(spec: str, fraction: float | None, clients: int) -> float | None:
    """Check ``--attack``/``--attackers`` for a run of ``clients``; the resolved fraction.

    No attack: None (and ``--attackers`` alone is refused). An attack with no
    fraction attacks with :data:`DEFAULT_FRACTION` of the clients.
    """
    if not spec:
        if fraction is not None:
            raise ConfigError("--attackers says how many clients attack; give --attack too "
                              f"({_SPECS}).")
        return None
    parse_attack(spec)
    resolved = DEFAULT_FRACTION if fraction is None else fraction
    check_fraction(resolved, clients)
    return resolved


def choose_attackers(client_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The attacking clients: a seeded choice of ``fraction`` of ``client_ids``, in their order.

    The choice depends only on the number of ids, the fraction and the run seed, so a
    simulated run and ``fedlearn run`` with the same flags pick the same clients.
    """
    count = check_fraction(fraction, len(client_ids)) or 0
    picked = rng_for("attackers", seed, len(client_ids)).permutation(len(client_ids))[:count]
    return [client_ids[i] for i in sorted(int(i) for i in picked)]


def attack_rng(seed: int) -> np.random.Generator:
    """The generator of an attacker's noise from its task's data seed (per round and client).

    The simulator and the HTTP client both derive it from ``task_seed(run seed,
    round, client id)``, so the same run draws the same noise on either path.
    """
    return rng_for("attack", seed)


def attack_delta(delta: Weights, attack: Attack, rng: np.random.Generator) -> Weights:
    """What an attacker sends instead of ``delta`` (new arrays; ``delta`` is not changed).

    Float arrays are attacked, in sorted-name order (so the noise does not
    depend on the dict's order); integer arrays are copied unchanged. Values
    beyond the array dtype's range are clipped to its largest finite value.
    ``label-flip`` poisons the data, not the delta, which it returns as is.
    """
    out: Weights = {}
    for name in sorted(delta):
        value = np.asarray(delta[name])
        if value.dtype.kind != "f" or attack.poisons_data:
            out[name] = value.copy()
            continue
        wide = value.astype(np.float64)
        if attack.kind == "sign-flip":
            wide = -attack.value * wide
        elif attack.kind == "scale":
            wide = attack.value * wide
        elif attack.kind == "gaussian":
            wide = rng.standard_normal(value.shape) * attack.value
        else:  # same-value
            wide = np.full(value.shape, attack.value)
        top = float(np.finfo(value.dtype).max)
        out[name] = np.clip(np.nan_to_num(wide, nan=0.0, posinf=top, neginf=-top),
                            -top, top).astype(value.dtype)
    return {name: out[name] for name in delta}


def flip_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels ``y`` mapped to ``num_classes - 1 - y`` (a new array of the same dtype)."""
    if num_classes < 1:
        raise ConfigError(f"label-flip needs at least 1 class, got {num_classes}.")
    labels = np.asarray(y)
    if labels.dtype.kind not in "iu":
        raise ConfigError(f"label-flip needs integer class labels, got {labels.dtype}; it is "
                          "for classification tasks.")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(f"label-flip found labels {int(labels.min())}..{int(labels.max())} "
                          f"outside 0..{num_classes - 1}; fix the task's num_classes.")
    return (num_classes - 1 - labels).astype(labels.dtype)


def label_flip_classes(task: Task) -> int:
    """The class count ``label-flip`` flips within, checking that ``task`` can be flipped."""
    if task.kind != "classification":
        raise ConfigError(f"--attack label-flip is for classification tasks; task "
                          f"{task.name!r} is {task.kind}.")
    if task.script is not None:
        raise ConfigError(f"--attack label-flip cannot reach the data of task {task.name!r}: "
                          "its client script loads it; use a model-poisoning attack.")
    if task.num_classes is None:
        raise ConfigError(f"--attack label-flip needs the number of classes; give task "
                          f"{task.name!r} num_classes=K.")
    return task.num_classes


@dataclass(frozen=True)
class Attackers:
    """Which clients of a run attack, and how; empty (a no-op) when there is no attack.

    ``fraction`` and ``seed`` are what the choice was made from (for the record).
    """

    attack: Attack | None = None
    ids: frozenset[str] = frozenset()
    num_classes: int | None = None
    fraction: float = 0.0
    seed: int = 0

    @classmethod
    def of(cls, spec: str, fraction: float, client_ids: Sequence[str], seed: int,
           task: Task | None = None) -> Attackers:
        """The attackers among ``client_ids`` of a run (no attack for an empty ``spec``).

        For ``label-flip`` the ``task`` says how many classes there are.
        """
        if not spec:
            return cls()
        attack = parse_attack(spec)
        chosen = choose_attackers(client_ids, fraction, seed)
        classes = label_flip_classes(task) if attack.poisons_data and task is not None else None
        return cls(attack, frozenset(chosen), classes, fraction, seed)

    @property
    def active(self) -> bool:
        """True when at least one client attacks."""
        return self.attack is not None and bool(self.ids)

    def delta(self, client_id: str, delta: Weights, seed: int) -> Weights:
        """What ``client_id`` sends for ``delta`` trained with data seed ``seed``."""
        if self.attack is None or client_id not in self.ids or self.attack.poisons_data:
            return delta
        return attack_delta(delta, self.attack, attack_rng(seed))

    def labels(self, client_id: str, y: np.ndarray) -> np.ndarray:
        """The training labels ``client_id`` trains on (flipped for a label-flip attacker)."""
        if self.attack is None or client_id not in self.ids or not self.attack.poisons_data:
            return y
        if self.num_classes is None:
            raise ConfigError("--attack label-flip needs the task's number of classes.")
        return flip_labels(y, self.num_classes)

    def record(self) -> dict[str, Any]:
        """What ``attackers.json`` says: the attack, the fraction, the seed and the ids."""
        return {"attack": None if self.attack is None else str(self.attack),
                "fraction": self.fraction, "seed": self.seed,
                "attackers": sorted(self.ids, key=_natural)}


def _natural(client_id: str) -> tuple[str, int]:
    """``client-10`` after ``client-9``."""
    head, _, tail = client_id.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (client_id, -1)
