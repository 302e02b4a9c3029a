"""The task: what is trained and on what (numpy only here; torch is touched in training.py).

A :class:`Task` names a model (a torch ``nn.Module`` factory, or an ``init``
function that returns a state as numpy arrays for a task without torch), how
a party loads its local data, the loss and the metrics, and optionally an
optimizer factory, a whole custom ``train``/``evaluate`` function, or a
client-API ``script`` that does the training. Every command and the Python
API take a task; the built-in datasets and models are tasks too
(:mod:`fedlearn.tasks.builtin`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedlearn.errors import ConfigError, FedlearnError
from fedlearn.types import Weights

KINDS = ("classification", "regression")
T = TypeVar("T")
LOSSES = ("cross_entropy", "mse", "l1", "bce")
METRICS = ("accuracy", "mse", "mae", "rmse", "auc")

#: A metric computed from a whole test set: (outputs, targets) as numpy arrays -> float.
MetricFn = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Data:
    """A party's examples: features ``x`` and targets ``y`` (numpy, first axis = examples)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ConfigError(
                f"data has {len(self.x)} inputs but {len(self.y)} targets; give one target "
                "per input."
            )

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class ClientData:
    """What one party holds: training data and, optionally, a local test set."""

    train: Data
    test: Data | None = None


@dataclass(frozen=True)
class DataContext:
    """What a task's data function is told about the party that loads data.

    ``client_index``/``num_clients`` say which of ``num_clients`` parties this is
    (None for a centralized run); ``path`` is ``--data`` (with ``{i}`` already
    replaced by the client index); ``partition`` is the ``--partition`` spec of
    a built-in set (``iid:N:I`` ...); ``test_fraction`` is the share of the
    local data to hold out as a local test set, split with ``seed``.
    """

    client_index: int | None = None
    num_clients: int | None = None
    client_id: str = ""
    path: Path | None = None
    label: str | None = None
    partition: str | None = None
    seed: int = 0
    test_fraction: float = 0.0


@dataclass(frozen=True)
class TrainContext:
    """What a custom ``train`` function gets.

    ``weights`` is the global state to start from; ``model`` (torch tasks) a
    model with those weights loaded, to train in place; ``config`` the round's
    configuration (``lr``, ``epochs``, ``batch_size``, ``optimizer``, ... and
    any user keys the server sent); ``seed`` fixes the data order.
    """

    weights: Weights
    data: Data
    config: Mapping[str, Any]
    seed: int
    model: Any = None
    device: str = "cpu"


@dataclass(frozen=True)
class EvalContext:
    """What a custom ``evaluate`` function gets (``model`` has ``weights`` loaded)."""

    weights: Weights
    data: Data
    model: Any = None
    device: str = "cpu"


@dataclass(frozen=True)
class TrainResult:
    """What a custom ``train`` function may return (or just the new weights)."""

    weights: Weights
    num_examples: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """What is trained and on what. Only ``name`` and one of ``model``/``init`` are required.

    - ``model``: a zero-argument factory of a torch ``nn.Module`` (initialised
      under a seed fork, so runs are reproducible); or ``init(seed) -> Weights``
      for a task that trains without torch (then ``train`` or ``script`` is needed).
    - ``data(ctx) -> ClientData`` (or ``Data``, then ``--test-fraction`` of it is
      held out as the local test set): how a party loads its data; None means
      ``--data PATH`` read by :func:`fedlearn.data.local.read_local` with ``reader``
      options (``image_size``, ``channels``, ``mean``, ``std``, ``classes``).
    - ``test_data() -> Data | None``: the server's (and the centralized
      baseline's) test set; None: the server evaluates nothing itself and the run
      relies on federated evaluation.
    - ``kind``: "classification" (default loss cross-entropy, metric accuracy)
      or "regression" (loss mse, metrics mse and mae); ``num_classes`` bounds labels.
    - ``loss``: a name in ``LOSSES`` or ``fn(outputs, targets) -> tensor`` (per
      example, shape [B], or already a mean).
    - ``metrics``: names in ``METRICS`` or ``(name, fn(outputs, targets) -> float)``.
    - ``optimizer(params, config) -> torch.optim.Optimizer`` replaces sgd/adam.
    - ``train(ctx: TrainContext)`` and ``evaluate(ctx: EvalContext)``: full control.
    - ``script``: a client-API script (:mod:`fedlearn.client_api`) run by each
      client instead of the built-in loop.
    - ``config``: default round configuration (e.g. ``{"lr": 0.01}``) that a
      server sends unless its own ``[client]`` settings say otherwise.
    """

    name: str
    model: Callable[[], Any] | None = None
    init: Callable[[int], Weights] | None = None
    data: Callable[[DataContext], ClientData | Data] | None = None
    test_data: Callable[[], Data | None] | None = None
    kind: str = "classification"
    num_classes: int | None = None
    loss: str | Callable[..., Any] | None = None
    metrics: Sequence[str | tuple[str, MetricFn]] | None = None
    optimizer: Callable[..., Any] | None = None
    train: Callable[[TrainContext], Any] | None = None
    evaluate: Callable[[EvalContext], Mapping[str, float]] | None = None
    script: str | Path | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    reader: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("a Task needs a non-empty name, e.g. Task(name='scans', ...).")
        if (self.model is None) == (self.init is None):
            raise ConfigError(
                f"task {self.name!r} needs exactly one of model= (a torch model factory) or "
                "init= (a function of a seed returning the initial state as numpy arrays)."
            )
        if self.model is None and self.train is None and self.script is None:
            raise ConfigError(
                f"task {self.name!r} has no torch model, so it needs train= (a function) or "
                "script= (a client-API script) to say how a client trains."
            )
        if self.kind not in KINDS:
            raise ConfigError(f"task {self.name!r}: kind must be one of {', '.join(KINDS)}, "
                              f"got {self.kind!r}.")
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            raise ConfigError(f"task {self.name!r}: unknown loss {self.loss!r}; choose one of "
                              f"{', '.join(LOSSES)} or pass a function.")
        for m in self.metric_names():
            if not isinstance(m, str):
                raise ConfigError(f"task {self.name!r}: metric names must be strings.")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"task {self.name!r}: num_classes must be at least 1.")

    @property
    def loss_name(self) -> str | None:
        """The loss's name (None for a user function)."""
        if self.loss is None:
            return "cross_entropy" if self.kind == "classification" else "mse"
        return self.loss if isinstance(self.loss, str) else None

    def metric_specs(self) -> list[str | tuple[str, MetricFn]]:
        """The metrics asked for, with the kind's defaults when none are given."""
        if self.metrics is None:
            return ["accuracy"] if self.kind == "classification" else ["mse", "mae"]
        out: list[str | tuple[str, MetricFn]] = []
        for m in self.metrics:
            if isinstance(m, str) and m not in METRICS:
                raise ConfigError(f"task {self.name!r}: unknown metric {m!r}; choose from "
                                  f"{', '.join(METRICS)} or pass (name, function).")
            out.append(m)
        return out

    def metric_names(self) -> list[str]:
        """Names of the task's metrics (``loss`` is always reported besides)."""
        return [m if isinstance(m, str) else m[0] for m in self.metric_specs()]

    @property
    def uses_torch(self) -> bool:
        """True when the task's state comes from a torch model."""
        return self.model is not None


def user_call(
    task_name: str, what: str, fn: Callable[..., T], *args: Any,
    error: type[FedlearnError] = ConfigError, hint: str = "",
) -> T:
    """``fn(*args)`` from a user's task; any exception but ours becomes one ``error`` sentence."""
    try:
        return fn(*args)
    except FedlearnError:
        raise
    except Exception as exc:
        raise error(f"task {task_name!r}: {what} raised {type(exc).__name__}: {exc}"
                    f"{'; ' + hint if hint else ''}.") from exc
