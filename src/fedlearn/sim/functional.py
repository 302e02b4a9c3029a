"""The vectorized engine for any torch model: the round's clients train as one stack.

Every parameter and buffer of the model gets a leading client axis, and each
step of all clients still training is one ``torch.func.vmap`` of
``torch.func.grad`` over ``functional_call(model, ...)``: the model's own
forward, run once for a batch of clients, each with its own weights and rows.

Each client takes exactly the steps :func:`fedlearn.training.local_update`
would: its own rows in its own ``epoch_orders`` order, batches of
``batch_size`` with a short last batch per epoch, the mean of the per-sample
loss over its own batch, and a fresh SGD or Adam (see
:class:`~fedlearn.sim.stacked.StackedOptimizer`). Clients are stacked by
descending step count (:func:`~fedlearn.sim.vectorized.make_schedule`), so
the clients training at step ``s`` are a prefix of the stack.

A short last batch is padded to the batch size with rows of loss weight zero
only when that is exact (:func:`can_pad`: no buffers, and each row's output
does not depend on the others). BatchNorm's batch statistics must cover the
client's real rows only, so for such models a step where some clients have a
short batch takes the clients in groups of equal batch size, one call per
group, and the optimizer then steps all of them at once. Running statistics
(and ``num_batches_tracked``) are per client, updated in place in the stacked
buffers.

FedProx's ``mu/2 ||w - w_start||^2`` (``config.prox_mu``) is part of each
client's objective; SCAFFOLD's ``c - c_i`` (a task's ``control``) is added
to each client's gradient before the step, and each client's new ``c_i`` and
``delta_c`` are computed from its own step count, as the sequential engine does.

A model whose forward branches on tensor values, draws random numbers
(dropout) or has non-float parameters cannot be stacked this way;
:func:`functional_unsupported_reason` says so in one line.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedlearn.config import TrainConfig
from fedlearn.errors import PayloadError
from fedlearn.sim.base import ClientTask, ClientUpdate
from fedlearn.sim.stacked import (
    StackedOptimizer,
    activation_bytes,
    clients_at_once,
    state_bytes,
)
from fedlearn.sim.vectorized import make_schedule
from fedlearn.strategies.scaffold import DELTA_C, control_update, correction
from fedlearn.training import autocast
from fedlearn.types import Weights
from fedlearn.weights import subtract

Loss = Callable[[Tensor, Tensor], Tensor]
Tensors = dict[str, Tensor]


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy (shape [B]): the default loss."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


class FunctionalEngine:
    """Trains the sampled clients of a round together, for any vmap-able torch model.

    ``x`` and ``y`` are the whole training set (shared, never copied per
    client), on the device training runs on. ``loss(outputs, targets)`` gives
    one loss per row; a client's loss is their mean over its batch.
    ``max_parallel`` caps how many clients are stacked at once (default: as
    many as half the free memory holds, said once through ``log``); the
    clients of a round train in chunks of at most that many. ``precision``
    ``bf16`` runs each forward pass under bfloat16 autocast.
    """

    name = "vectorized"

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        loss: Loss | None = None,
        max_parallel: int | None = None,
        precision: str = "fp32",
        log: Callable[[str], None] = print,
    ) -> None:
        self.x = x
        self.precision = precision
        self.y = y
        self.device = x.device
        self.model = copy.deepcopy(model).to(self.device).train()
        self.loss = loss if loss is not None else cross_entropy
        self.max_parallel = max_parallel
        self.log = log
        self._limit = max_parallel
        self.state_spec = {k: v.dtype for k, v in self.model.state_dict().items()}
        # state_dict names every alias of a tied tensor; each is trained under its first name.
        first: dict[int, str] = {}
        named = chain(self.model.named_parameters(remove_duplicate=False),
                      self.model.named_buffers(remove_duplicate=False))
        self.canonical = {name: first.setdefault(id(t), name) for name, t in named}
        params = dict(self.model.named_parameters())
        self.trainable = [n for n, p in params.items() if p.requires_grad]
        self.frozen = [n for n, p in params.items() if not p.requires_grad]
        self.buffers = [n for n in dict(self.model.named_buffers()) if n in self.state_spec]
        self.pad = not self.buffers and can_pad(self.model, x, y, self.loss)
        self._grad = vmap(grad(self._objective), in_dims=(0, 0, None, None, 0, 0, 0, None),
                          randomness="error")

    def _objective(self, params: Tensors, buffers: Tensors, frozen: Tensors, anchor: Tensors,
                   xb: Tensor, yb: Tensor, weight: Tensor, mu: float) -> Tensor:
        """One client's batch loss (plus FedProx's ``mu/2 ||w - w_start||^2``).

        With padding, ``weight`` is 1/(real rows) for real rows and 0 for padding.
        """
        with autocast(str(self.device), self.precision):
            out = functional_call(self.model, (params, buffers, frozen), (xb,))
            per_row = self.loss(out, yb).float()
        if self.pad:
            value = torch.sum(per_row * weight)
        else:
            value = per_row if per_row.dim() == 0 else per_row.mean()
        if mu > 0:
            value = value + mu / 2 * sum(
                torch.sum(torch.square(params[n] - anchor[n])) for n in params)
        return value

    def train_round(
        self, weights: Weights, clients: list[ClientTask], config: TrainConfig
    ) -> list[ClientUpdate]:
        """Train every client in ``clients`` from ``weights``, stacked; one update per client."""
        if weights.keys() != self.state_spec.keys():
            missing = sorted(set(self.state_spec) - set(weights))
            extra = sorted(set(weights) - set(self.state_spec))
            raise PayloadError(f"weights do not fit the model (missing {missing}, unexpected "
                               f"{extra}); use weights saved from the same task.")
        start = {k: torch.from_numpy(np.array(weights[k], copy=True)).to(
            dtype=self.state_spec[k], device=self.device) for k in self.canonical
            if k in self.state_spec and self.canonical[k] == k}
        if self._limit is None:
            self._limit = clients_at_once(self._client_bytes(start, config), self.device,
                                          self.log)
        steps = [-(-len(c.indices) // config.batch_size) for c in clients]
        by_steps = sorted(range(len(clients)), key=lambda i: -steps[i])
        out: list[ClientUpdate | None] = [None] * len(clients)
        size = max(1, self._limit)
        for lo in range(0, len(clients), size):
            chunk = by_steps[lo : lo + size]
            trained = self._train_chunk(start, [clients[i] for i in chunk], config)
            for i, (state, last) in zip(chunk, trained, strict=True):
                new = {k: state[self.canonical[k]] for k in self.state_spec}
                # numpy turns 0-d differences into scalars; keep them 0-d arrays.
                delta = {k: np.asarray(v) for k, v in subtract(new, weights).items()}
                control = clients[i].control
                sent: dict[str, Weights] = {}
                kept = None
                if control is not None:
                    beta = config.momentum if config.optimizer == "sgd" else 0.0
                    kept, sent[DELTA_C] = control_update(
                        control.client, control.server, weights, new,
                        steps=max(1, steps[i] * config.epochs), lr=config.lr,
                        momentum=beta, last_momentum=last)
                out[i] = ClientUpdate(clients[i].client_id, delta, len(clients[i].indices),
                                      sent, kept)
        return [u for u in out if u is not None]

    def _client_bytes(self, start: Tensors, config: TrainConfig) -> int:
        """Memory one stacked client needs: state, optimizer and activations."""
        trainable = [start[n] for n in self.trainable]
        others = [start[n] for n in self.buffers]
        rows = min(config.batch_size, int(self.x.shape[0]))
        act = activation_bytes(self.model, self.x[:rows]) * config.batch_size // max(rows, 1)
        return state_bytes(config, trainable, others) + act

    def _train_chunk(
        self, start: Tensors, chunk: list[ClientTask], config: TrainConfig
    ) -> list[tuple[dict[str, npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]]:
        """Train ``chunk`` (sorted by descending step count) as one stack; each one's state
        and its SGD momentum buffers after its last step (empty without momentum)."""
        plan = make_schedule(chunk, config.batch_size, config.epochs)
        k = len(chunk)
        with torch.no_grad():
            params = {n: start[n].expand(k, *start[n].shape).clone() for n in self.trainable}
            buffers = {n: start[n].expand(k, *start[n].shape).clone() for n in self.buffers}
            frozen = {n: start[n] for n in self.frozen}
            anchor = {n: start[n] for n in self.trainable}
            steps = _Steps(self, params, buffers, frozen, anchor, config.prox_mu)
            opt = StackedOptimizer(list(params.values()), config)
            rows, scale = plan.rows.to(self.device), plan.scale.to(self.device)
            counts = (plan.scale > 0).sum(2).numpy()
            shift = self._corrections([chunk[int(ci)] for ci in plan.order], start)
            for s, a in enumerate(plan.active):
                grads = steps.grads(rows[s, :a], scale[s, :a], counts[s, :a])
                for g, c in zip(grads, shift, strict=False):
                    g.add_(c[:a])
                opt.step(a, grads)
            stacked = {n: t.cpu().numpy() for n, t in chain(params.items(), buffers.items())}
            # A client's buffer stays as its last step left it (later steps move a prefix).
            momenta = {n: m.cpu().numpy() for n, m in zip(self.trainable, opt.momentum,
                                                          strict=True) if m is not None}
        fixed = {n: start[n].cpu().numpy() for n in self.frozen}
        states: list[tuple[dict[str, npt.NDArray[Any]], dict[str, npt.NDArray[Any]]]] = [
            ({}, {}) for _ in chunk]
        for slot, ci in enumerate(plan.order):
            # v[slot, ...] keeps a 0-d entry a 0-d array.
            states[ci] = ({**fixed, **{n: v[slot, ...] for n, v in stacked.items()}},
                          {n: m[slot, ...] for n, m in momenta.items()})
        return states


    def _corrections(self, slots: list[ClientTask], start: Tensors) -> list[Tensor]:
        """SCAFFOLD's ``c - c_i`` stacked by slot, per trainable parameter (none without
        control variates)."""
        if all(task.control is None for task in slots):
            return []
        per_client = [None if t.control is None else correction(t.control.server,
                                                                 t.control.client)
                      for t in slots]
        return [torch.stack([torch.zeros_like(start[n]) if c is None else
                             torch.from_numpy(c[n]).to(dtype=start[n].dtype,
                                                       device=self.device)
                             for c in per_client]) for n in self.trainable]


class _Steps:
    """The gradients of one step of the active clients: padded, or batch-size group by group."""

    def __init__(self, engine: FunctionalEngine, params: Tensors, buffers: Tensors,
                 frozen: Tensors, anchor: Tensors, mu: float) -> None:
        self.engine = engine
        self.params = params
        self.buffers = buffers
        self.frozen = frozen
        self.anchor = anchor
        self.mu = mu

    def grads(self, rows: Tensor, scale: Tensor, counts: npt.NDArray[np.int64]) -> list[Tensor]:
        """Gradients for clients ``0..a-1``.

        ``rows`` [a, B] are their rows (padded), ``scale`` [a, B] the loss weights
        (zero for padding) and ``counts`` how many rows of each are real.
        """
        a = len(counts)
        sizes = np.unique(counts)
        if self.engine.pad or len(sizes) == 1:
            c = rows.shape[1] if self.engine.pad else int(sizes[0])
            got = self._call(slice(0, a), rows[:, :c], scale[:, :c])
            return [got[n] for n in self.params]
        out = [torch.empty_like(p[:a]) for p in self.params.values()]
        for c in sizes:
            slots = np.flatnonzero(counts == c)
            lo, hi = int(slots[0]), int(slots[-1]) + 1
            where: slice | Tensor = (slice(lo, hi) if hi - lo == len(slots)
                                     else torch.from_numpy(slots).to(rows.device))
            got = self._call(where, rows[where, : int(c)], scale[where, : int(c)])
            for t, n in zip(out, self.params, strict=True):
                t[where] = got[n]
        return out

    def _call(self, where: slice | Tensor, rows: Tensor, weight: Tensor) -> Tensors:
        """One vmap'd gradient call for the clients at ``where``, each on its ``rows``."""
        x, y = self.engine.x, self.engine.y
        m, c = int(rows.shape[0]), int(rows.shape[1])
        flat = rows.reshape(-1)
        xb = x.index_select(0, flat).view(m, c, *x.shape[1:])
        yb = y.index_select(0, flat).view(m, c, *y.shape[1:])
        params = {n: p[where] for n, p in self.params.items()}
        buffers = {n: b[where] for n, b in self.buffers.items()}
        got: Tensors = self.engine._grad(params, buffers, self.frozen, self.anchor, xb, yb,
                                         weight, self.mu)
        if isinstance(where, Tensor):
            # Gathered copies: write the updated running statistics back.
            for n, b in buffers.items():
                self.buffers[n].index_copy_(0, where, b)
        return got


def can_pad(model: nn.Module, x: Tensor, y: Tensor, loss: Loss) -> bool:
    """Whether short batches may be padded with rows of weight zero, exactly.

    True when ``loss`` gives one value per row and, in training mode, a row's
    output is the same alone as in a batch (no BatchNorm-like batch
    statistics); any error counts as no.
    """
    if len(x) < 2:
        return False
    probe = copy.deepcopy(model).train()
    try:
        with torch.no_grad():
            out = probe(x[:4])
            alone = probe(x[:1])
            per_row = loss(out, y[:4])
        return per_row.shape == (len(out),) and bool(
            torch.allclose(out[:1], alone, rtol=1e-4, atol=1e-6))
    except Exception:  # a model we cannot probe is not padded
        return False


def functional_unsupported_reason(
    model: nn.Module, config: TrainConfig, *, x: Tensor | None = None, y: Tensor | None = None,
    loss: Loss | None = None, precision: str = "fp32",
) -> str | None:
    """Why :class:`FunctionalEngine` cannot train ``model`` with ``config`` (None if it can).

    Checks the optimizer and parameter dtypes, then, given a few training rows
    ``x``/``y``, tries one tiny stacked round of two clients and turns any
    failure into a one-line reason. Without rows only the static checks run.
    """
    if config.optimizer not in ("sgd", "adam"):
        return f"it does not implement the {config.optimizer} optimizer"
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            return f"parameter {name} is {p.dtype}, not a float"
    if x is None or y is None or len(x) == 0:
        return None
    from fedlearn.models import get_weights

    n = min(len(x), 4)
    rows = np.arange(4, dtype=np.int64) % n
    clients = [ClientTask("a", rows[:2], 0), ClientTask("b", rows[2:], 1)]
    tiny = TrainConfig(epochs=1, batch_size=2, optimizer=config.optimizer, lr=config.lr,
                       momentum=config.momentum, weight_decay=config.weight_decay,
                       extra=dict(config.extra))
    try:
        engine = FunctionalEngine(model, x[:n], y[:n], loss=loss, max_parallel=2,
                                  precision=precision, log=lambda _: None)
        engine.train_round(get_weights(model), clients, tiny)
    except Exception as exc:  # any failure means: train this model another way
        return _reason(exc)
    return None


def _reason(exc: Exception) -> str:
    """A one-line reason for a failed tiny stacked step."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = text.lower()
    if "data-dependent control flow" in lowered or "item()" in lowered:
        return "its forward has data-dependent control flow (Python branches on tensor values)"
    if "random" in lowered:
        return "its forward draws random numbers (e.g. dropout), which cannot match one-by-one"
    return f"a stacked training step failed ({type(exc).__name__}: {text[:160]})"
