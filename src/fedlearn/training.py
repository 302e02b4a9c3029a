"""The one local-training routine, and evaluation, for any task.

The HTTP client, the simulator and both baselines train through a
:class:`Trainer`: that is what makes a simulated run and a real one reach the
same model for the same seed. The data order is a pure function of the seed:
``numpy.random.default_rng(seed).permutation`` once per epoch. A task with a
custom ``train``/``evaluate`` function gets it called instead of the built-in
loop; everything else (deltas, example counts, metrics) is the same.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedlearn.config import TrainConfig
from fedlearn.errors import ConfigError, ModelError
from fedlearn.metrics import BY_NAME
from fedlearn.models import get_weights, set_weights
from fedlearn.strategies.scaffold import DELTA_C, control_update, correction
from fedlearn.tasks.base import (
    Data,
    EvalContext,
    Task,
    TrainContext,
    TrainResult,
    user_call,
)
from fedlearn.types import ClientResult, ControlVariates, EvalResult, Weights
from fedlearn.weights import check, spec_of, subtract

if TYPE_CHECKING:
    from fedlearn.privacy.dpsgd import DPSGD, DPLedger

EVAL_BATCH = 2000
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class Shard:
    """A client's data: row ``indices`` of shared tensors (never a copy of them).

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

    @classmethod
    def of(cls, data: Data) -> Shard:
        """A shard over all of ``data``."""
        return cls.from_numpy(data.x, data.y)

    def __len__(self) -> int:
        return int(self.x.shape[0]) if self.indices is None else len(self.indices)

    def rows(self) -> torch.Tensor:
        """The dataset rows of this shard as an index tensor."""
        if self.indices is None:
            return torch.arange(int(self.x.shape[0]))
        return torch.from_numpy(self.indices)

    def numpy(self) -> Data:
        """The shard's rows as numpy arrays (a copy when it is a subset)."""
        x, y = self.x.numpy(), self.y.numpy()
        if self.indices is None:
            return Data(x, y)
        return Data(x[self.indices], y[self.indices])


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    # Dataset caches hand out read-only arrays; training only ever reads them,
    # so sharing their memory is safe and torch's warning about it is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a))


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when present, else mps, else cpu; a missing device is a ConfigError."""
    if name not in DEVICES:
        raise ConfigError(f"unknown --device {name!r}; choose one of {', '.join(DEVICES)}.")
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise ConfigError("--device cuda was asked for but torch finds no CUDA GPU here; use "
                          "--device cpu or --device auto.")
    if name == "mps" and not mps:
        raise ConfigError("--device mps was asked for but this machine has no Apple GPU; use "
                          "--device cpu or --device auto.")
    return name


def build_task_model(task: Task, seed: int) -> nn.Module:
    """The task's torch model, initialised under ``seed`` (torch's global state untouched)."""
    if task.model is None:
        raise ModelError(f"task {task.name!r} has no torch model.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = user_call(task.name, "its model factory", task.model, error=ModelError,
                          hint="fix the model")
    if not isinstance(model, nn.Module):
        raise ModelError(f"task {task.name!r}: its model factory returned a "
                         f"{type(model).__name__}, not a torch nn.Module.")
    return model


def initial_state(task: Task, seed: int) -> Weights:
    """The task's state before round 1: the seeded model's state_dict, or ``init(seed)``."""
    if task.init is not None:
        state = user_call(task.name, f"init({seed})", task.init, seed, error=ModelError)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()
        ):
            raise ModelError(f"task {task.name!r}: init must return a dict of str to numpy "
                             "arrays.")
        return {k: np.array(v) for k, v in state.items()}
    return get_weights(build_task_model(task, seed))


# -- losses ----------------------------------------------------------------------


def _align(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if out.dim() == y.dim() + 1 and out.shape[-1] == 1:
        return out.squeeze(-1)
    return out


def _per_row(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).mean(1) if values.dim() > 1 else values


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
    "mse": lambda out, y: _per_row(torch.square(_align(out, y) - y.to(out.dtype))),
    "l1": lambda out, y: _per_row(torch.abs(_align(out, y) - y.to(out.dtype))),
    "bce": lambda out, y: _per_row(nn.functional.binary_cross_entropy_with_logits(
        _align(out, y), y.to(out.dtype), reduction="none")),
}


def per_sample_loss(task: Task) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(outputs, targets)`` -> one loss per example (shape [B]) for ``task``."""
    name = task.loss_name
    if name is not None:
        return LOSSES[name]
    fn = task.loss
    if not callable(fn):  # pragma: no cover - Task validates
        raise ConfigError(f"task {task.name!r}: loss must be a name or a function.")
    return fn


def mean_loss(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch mean of ``fn`` (which may already return a mean)."""
    value = fn(out, y)
    return value if value.dim() == 0 else value.mean()


def make_optimizer(
    model: nn.Module, config: TrainConfig, task: Task | None = None
) -> torch.optim.Optimizer:
    """A fresh optimizer: the task's factory, else sgd (momentum, decay) or adam as configured."""
    params = [p for p in model.parameters() if p.requires_grad]
    if task is not None and task.optimizer is not None:
        opt = task.optimizer(params, config.as_dict())
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(f"task {task.name!r}: optimizer must return a "
                              "torch.optim.Optimizer.")
        return opt
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


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
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    classification: bool = True,
    on_epoch: Callable[[int, float, float], None] | None = None,
    slowdown: float = 1.0,
    device: str = "cpu",
    precision: str = "fp32",
    correction: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Train ``model`` in place for ``config.epochs`` epochs of mini-batches.

    Returns (mean loss, accuracy) over the last epoch's training batches
    (accuracy NaN unless ``classification``; the loss is the task's, without
    the proximal term). With ``config.prox_mu`` > 0 each step minimises the
    loss plus FedProx's ``mu/2 ||w - w_start||^2`` over the trainable
    parameters (Li et al. 2020). ``correction`` (parameter name -> tensor) is
    added to each gradient before the step: SCAFFOLD's ``c - c_i``
    (Karimireddy et al. 2020). ``slowdown`` > 1 stretches wall time by that
    factor (benchmarks only). ``precision`` ``bf16`` runs the forward pass and
    loss under bfloat16 autocast (weights stay float32).
    """
    opt = optimizer if optimizer is not None else make_optimizer(model, config)
    loss_fn = loss if loss is not None else LOSSES["cross_entropy"]
    fused = loss is None or loss is LOSSES["cross_entropy"]
    mu = config.prox_mu
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    anchor = [p.detach().clone() for _, p in trainable] if mu > 0 else []
    corrected = [(p, correction[n]) for n, p in trainable] if correction is not None else []
    rows = data.rows()
    n = len(rows)
    model.train()
    last = (float("nan"), float("nan"))
    for epoch, order in enumerate(epoch_orders(n, config.epochs, seed), start=1):
        started = time.perf_counter()
        shuffled = rows[torch.from_numpy(order)]
        total_loss = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        for start in range(0, n, config.batch_size):
            idx = shuffled[start : start + config.batch_size]
            xb = data.x.index_select(0, idx).to(device, non_blocking=True)
            yb = data.y.index_select(0, idx).to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                out = model(xb)
                value = (nn.functional.cross_entropy(out, yb) if fused
                         else mean_loss(loss_fn, out, yb))
            objective = value
            if anchor:
                objective = value + mu / 2 * sum(
                    torch.sum(torch.square(p - a)) for (_, p), a in zip(trainable, anchor,
                                                                          strict=True))
            objective.backward()  # type: ignore[no-untyped-call]
            for p, c in corrected:
                if p.grad is None:
                    p.grad = c.clone()
                else:
                    p.grad.add_(c)
            opt.step()
            with torch.no_grad():
                total_loss += value.detach().cpu() * len(idx)
                if classification and out.dim() == 2 and out.shape[1] > 1:
                    correct += (out.argmax(1) == yb).sum().cpu()
        last = (float(total_loss) / max(n, 1),
                int(correct) / max(n, 1) if classification else float("nan"))
        if slowdown > 1.0:
            time.sleep((time.perf_counter() - started) * (slowdown - 1.0))
        if on_epoch is not None:
            on_epoch(epoch, *last)
    return last


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on ``device`` for ``precision`` ``bf16``; nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Trains and evaluates one task in one process (a model workspace on ``device``).

    ``precision`` ``bf16`` trains under bfloat16 autocast; evaluation stays float32.
    """

    def __init__(self, task: Task, *, seed: int = 0, device: str = "cpu",
                 precision: str = "fp32", dp_sgd: DPSGD | None = None) -> None:
        self.task = task
        self.precision = precision
        self.dp_sgd = dp_sgd
        #: The DP-SGD ledger of the client this trainer serves (when fit is given none).
        self.ledger: DPLedger | None = None
        self.device = resolve_device(device)
        self.model = build_task_model(task, seed).to(self.device) if task.uses_torch else None
        self.loss = per_sample_loss(task) if task.uses_torch else None
        self.spec = spec_of(initial_state(task, seed)) if self.model is None else spec_of(
            get_weights(self.model))

    def _load(self, weights: Weights) -> None:
        if self.model is not None:
            set_weights(self.model, weights)

    def fit(
        self, weights: Weights, data: Shard, config: TrainConfig, *, seed: int,
        base_version: int = 0, slowdown: float = 1.0, control: ControlVariates | None = None,
        ledger: DPLedger | None = None,
    ) -> ClientResult:
        """Train from ``weights`` on ``data``; the delta, example count and metrics.

        A fresh optimizer is made for each call (as in FedAvg); ``seed`` fixes the
        data order. With ``control`` (SCAFFOLD) each gradient gets ``c - c_i``
        and the result carries ``extra["delta_c"]`` (sent) and the client's new
        ``control`` (kept): option II of Karimireddy et al. 2020, with K the
        steps taken and the config's learning rate (with SGD momentum, the exact
        mean of the corrected gradients: see :mod:`fedlearn.strategies.scaffold`).
        With DP-SGD the run is added to ``ledger`` (default: this trainer's own)
        and the metrics carry the client's ε and δ so far.
        """
        started = time.perf_counter()
        self._load(weights)
        metrics: dict[str, float] = {}
        num = len(data)
        if control is not None and (self.task.train is not None or self.model is None
                                    or self.dp_sgd is not None):
            raise ConfigError(f"task {self.task.name!r} trains with its own function or with "
                              "DP-SGD, so it cannot take SCAFFOLD's corrected steps; choose "
                              "another --strategy.")
        opt: torch.optim.Optimizer | None = None
        if self.dp_sgd is not None:
            new, metrics = self._private_fit(data, config, seed, ledger)
        elif self.task.train is not None:
            new, num, metrics = self._custom_train(weights, data, config, seed)
        else:
            if self.model is None:  # pragma: no cover - Task validates
                raise ConfigError(f"task {self.task.name!r} cannot train without a model.")
            opt = make_optimizer(self.model, config, self.task)
            loss, acc = train_epochs(
                self.model, data, config, seed=seed, optimizer=opt, loss=self.loss,
                classification=self.task.kind == "classification", slowdown=slowdown,
                device=self.device, precision=self.precision,
                correction=None if control is None else self._correction(control),
            )
            metrics = {"train_loss": loss}
            if self.task.kind == "classification" and not np.isnan(acc):
                metrics["train_accuracy"] = acc
            new = get_weights(self.model)
        extra: dict[str, Weights] = {}
        kept = None
        if control is not None:
            steps = config.epochs * math.ceil(num / config.batch_size)
            beta, last = self._momentum(opt) if opt is not None else (0.0, None)
            kept, extra[DELTA_C] = control_update(control.client, control.server, weights,
                                                  new, steps=max(1, steps), lr=config.lr,
                                                  momentum=beta, last_momentum=last)
        metrics["seconds"] = time.perf_counter() - started
        return ClientResult(delta=subtract(new, weights), num_examples=num,
                            base_version=base_version, metrics=metrics, extra=extra,
                            control=kept)

    def _momentum(self, opt: torch.optim.Optimizer) -> tuple[float, Weights | None]:
        """SGD's momentum and its buffers after the last step, by parameter name, for
        SCAFFOLD's control update ((0, None) for any other optimizer: option II as written)."""
        if self.model is None or self.task.optimizer is not None \
                or not isinstance(opt, torch.optim.SGD):
            return 0.0, None
        beta = float(opt.param_groups[0]["momentum"])
        if beta == 0:
            return 0.0, None
        last: Weights = {}
        for name, p in self.model.named_parameters():
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if isinstance(buf, torch.Tensor):
                last[name] = buf.detach().cpu().numpy()
        return beta, last

    def _correction(self, control: ControlVariates) -> dict[str, torch.Tensor]:
        """SCAFFOLD's ``c - c_i`` per trainable parameter, on the training device."""
        if self.model is None:  # pragma: no cover - fit checks
            raise ConfigError("no model")
        diff = correction(control.server, control.client)
        return {n: torch.from_numpy(diff[n]).to(self.device)
                for n, p in self.model.named_parameters() if p.requires_grad}

    def _private_fit(self, data: Shard, config: TrainConfig, seed: int,
                     ledger: DPLedger | None) -> tuple[Weights, dict[str, float]]:
        from fedlearn.privacy.dpsgd import DPLedger
        from fedlearn.training_dp import dp_train_epochs

        if ledger is None:
            if self.ledger is None:
                self.ledger = DPLedger()
            ledger = self.ledger
        spec = self.dp_sgd
        if spec is None or self.model is None or self.task.train is not None \
                or self.task.optimizer is not None:
            raise ConfigError("--dp-sgd trains with fedlearn's own loop and optimizer; a task "
                              "with its own train function or optimizer must add DP itself.")
        model, task = self.model, self.task
        rows = data.rows()
        loss, steps = dp_train_epochs(
            model, data.x.index_select(0, rows), data.y.index_select(0, rows), config, spec,
            ledger, seed=seed, make_optimizer=lambda m: make_optimizer(m, config, task),
            loss=self.loss or LOSSES["cross_entropy"], device=self.device)
        metrics = {"train_loss": loss, "dp_steps": float(steps),
                   "dp_epsilon": ledger.epsilon(spec.delta), "dp_delta": spec.delta}
        return get_weights(model), metrics

    def _custom_train(
        self, weights: Weights, data: Shard, config: TrainConfig, seed: int
    ) -> tuple[Weights, int, dict[str, float]]:
        task = self.task
        ctx = TrainContext(weights={k: v.copy() for k, v in weights.items()}, data=data.numpy(),
                           config=config.as_dict(), seed=seed, model=self.model,
                           device=self.device)
        if task.train is None:  # pragma: no cover - checked by the caller
            raise ConfigError("no train function")
        out = user_call(task.name, "train", task.train, ctx)
        num, metrics = len(data), {}
        if out is None and self.model is not None:
            new = get_weights(self.model)
        elif isinstance(out, TrainResult):
            new, metrics = out.weights, {k: float(v) for k, v in out.metrics.items()}
            num = len(data) if out.num_examples is None else int(out.num_examples)
        elif isinstance(out, dict):
            new = out
        else:
            raise ConfigError(f"task {task.name!r}: train must return the new weights (a dict "
                              "of arrays) or a fedlearn.TrainResult.")
        new = {k: np.asarray(v) for k, v in new.items()}
        check(new, self.spec)
        return new, num, metrics

    @torch.no_grad()
    def evaluate(self, weights: Weights, data: Shard | Data) -> EvalResult:
        """``loss`` and the task's metrics of ``weights`` on ``data``."""
        shard = Shard.of(data) if isinstance(data, Data) else data
        self._load(weights)
        task = self.task
        if task.evaluate is not None:
            ctx = EvalContext(weights=weights, data=shard.numpy(), model=self.model,
                              device=self.device)
            found = dict(user_call(task.name, "evaluate", task.evaluate, ctx))
            return EvalResult({k: float(v) for k, v in found.items()}, len(shard))
        if self.model is None or self.loss is None:
            raise ConfigError(f"task {task.name!r} has no model and no evaluate function; "
                              "give it evaluate= to measure it.")
        outputs, targets, total = model_outputs(self.model, self.loss, shard, self.device)
        n = len(targets)
        metrics = {"loss": total / max(n, 1)}
        for spec in task.metric_specs():
            name, fn = (spec, BY_NAME[spec]) if isinstance(spec, str) else spec
            metrics[name] = float(fn(outputs, targets)) if n else float("nan")
        return EvalResult(metrics, n)


def model_outputs(
    model: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shard: Shard,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, float]:
    """All of ``model``'s outputs on ``shard`` (eval mode), the targets, and the summed loss."""
    was_training = model.training
    model.eval()
    rows = shard.rows()
    outs, ys = [], []
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), EVAL_BATCH):
            idx = rows[start : start + EVAL_BATCH]
            yb = shard.y.index_select(0, idx).to(device)
            out = model(shard.x.index_select(0, idx).to(device))
            value = loss(out, yb)
            total += float(value.sum()) if value.dim() else float(value) * len(idx)
            outs.append(out.float().cpu().numpy())
            ys.append(yb.cpu().numpy())
    model.train(was_training)
    if not outs:
        return np.zeros((0,)), np.zeros((0,)), 0.0
    return np.concatenate(outs), np.concatenate(ys), total


def local_update(
    model: nn.Module, weights: Weights, data: Shard, config: TrainConfig, *, seed: int,
    base_version: int = 0, slowdown: float = 1.0,
) -> ClientResult:
    """Cross-entropy training of a bare ``model`` from ``weights`` (the built-in loop).

    Kept for engines and benchmarks that hold a model rather than a task.
    """
    started = time.perf_counter()
    set_weights(model, weights)
    loss, acc = train_epochs(model, data, config, seed=seed, slowdown=slowdown)
    return ClientResult(
        delta=subtract(get_weights(model), weights), num_examples=len(data),
        base_version=base_version,
        metrics={"train_loss": loss, "train_accuracy": acc,
                 "seconds": time.perf_counter() - started},
    )


def evaluate(model: nn.Module, data: Shard, weights: Weights | None = None) -> EvalResult:
    """Accuracy and mean cross-entropy of a bare classification ``model``."""
    if weights is not None:
        set_weights(model, weights)
    outputs, targets, total = model_outputs(model, LOSSES["cross_entropy"], data)
    n = len(targets)
    acc = BY_NAME["accuracy"](outputs, targets) if n else float("nan")
    return EvalResult({"loss": total / max(n, 1), "accuracy": acc}, n)
