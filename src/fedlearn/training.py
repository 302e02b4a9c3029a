"""The one local-training routine, and evaluation.

The HTTP client, the simulator and both baselines all call
:func:`local_update`; that is what makes a simulated run and a real one reach
the same model for the same seed. The data order is a pure function of the
seed: ``numpy.random.default_rng(seed).permutation`` once per epoch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedlearn.config import TrainConfig
from fedlearn.models import get_weights, set_weights
from fedlearn.types import ClientResult, EvalResult, Weights
from fedlearn.weights import subtract

EVAL_BATCH = 2000


@dataclass(frozen=True)
class Shard:
    """A client's data: row ``indices`` of a shared dataset (never a copy of it).

    ``x`` and ``y`` are the whole dataset's tensors; ``indices`` None means all rows.
    """

    x: torch.Tensor
    y: torch.Tensor
    indices: npt.NDArray[np.int64] | None = None

    @classmethod
    def from_numpy(
        cls, x: np.ndarray, y: np.ndarray, indices: np.ndarray | None = None
    ) -> Shard:
        """Wrap numpy arrays without copying them (read-only arrays are fine)."""
        return cls(_as_tensor(x), _as_tensor(y), None if indices is None else
                   np.asarray(indices, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.x.shape[0]) if self.indices is None else len(self.indices)

    def rows(self) -> torch.Tensor:
        """The dataset rows of this shard as an index tensor."""
        if self.indices is None:
            return torch.arange(int(self.x.shape[0]))
        return torch.from_numpy(self.indices)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    # The dataset cache hands out read-only arrays; training only ever reads them,
    # so sharing their memory is safe and torch's warning about it is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer as ``config`` describes (sgd with optional momentum, or adam)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def epoch_orders(n: int, epochs: int, seed: int) -> list[npt.NDArray[np.int64]]:
    """The permutation of ``range(n)`` used in each epoch for ``seed``."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n).astype(np.int64) for _ in range(epochs)]


def train_epochs(
    model: nn.Module,
    data: Shard,
    config: TrainConfig,
    *,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    slowdown: float = 1.0,
) -> tuple[float, float]:
    """Train ``model`` in place for ``config.epochs`` epochs of mini-batches.

    Returns (mean loss, accuracy) over the last epoch's training batches.
    ``on_epoch(epoch, loss, accuracy)`` is called after each epoch.
    ``slowdown`` > 1 stretches wall time by that factor (benchmarks only).
    """
    opt = optimizer if optimizer is not None else make_optimizer(model, config)
    rows = data.rows()
    n = len(rows)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = (float("nan"), float("nan"))
    for epoch, order in enumerate(epoch_orders(n, config.epochs, seed), start=1):
        started = time.perf_counter()
        shuffled = rows[torch.from_numpy(order)]
        total_loss = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        for start in range(0, n, config.batch_size):
            idx = shuffled[start : start + config.batch_size]
            xb = data.x.index_select(0, idx)
            yb = data.y.index_select(0, idx)
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            with torch.no_grad():
                total_loss += loss.detach() * len(idx)
                correct += (logits.argmax(1) == yb).sum()
        last = (float(total_loss) / max(n, 1), int(correct) / max(n, 1))
        if slowdown > 1.0:
            time.sleep((time.perf_counter() - started) * (slowdown - 1.0))
        if on_epoch is not None:
            on_epoch(epoch, *last)
    return last


def local_update(
    model: nn.Module,
    weights: Weights,
    data: Shard,
    config: TrainConfig,
    *,
    seed: int,
    base_version: int = 0,
    slowdown: float = 1.0,
) -> ClientResult:
    """Train from ``weights`` on ``data`` and return the delta, example count and metrics.

    A fresh optimizer is made for each call (as in FedAvg); ``seed`` fixes the
    data order. ``model`` is only used as a workspace: its weights are replaced.
    """
    started = time.perf_counter()
    set_weights(model, weights)
    loss, acc = train_epochs(model, data, config, seed=seed, slowdown=slowdown)
    delta = subtract(get_weights(model), weights)
    return ClientResult(
        delta=delta,
        num_examples=len(data),
        base_version=base_version,
        metrics={
            "train_loss": loss,
            "train_accuracy": acc,
            "seconds": time.perf_counter() - started,
        },
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: Shard, weights: Weights | None = None) -> EvalResult:
    """Accuracy and mean cross-entropy of ``model`` (or of ``weights`` loaded into it)."""
    if weights is not None:
        set_weights(model, weights)
    was_training = model.training
    model.eval()
    rows = data.rows()
    n = len(rows)
    total_loss = 0.0
    correct = 0
    for start in range(0, n, EVAL_BATCH):
        idx = rows[start : start + EVAL_BATCH]
        logits = model(data.x.index_select(0, idx))
        yb = data.y.index_select(0, idx)
        total_loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return EvalResult(accuracy=correct / max(n, 1), loss=total_loss / max(n, 1), num_examples=n)
