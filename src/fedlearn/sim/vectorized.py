"""The fast engine: all sampled clients of a round train at once, as one stacked model.

Each parameter of the ``mlp`` gets a new leading client axis (``fc1.weight``
becomes ``[K, 128, in]``) and each step of all clients is a handful of batched
matrix products (``torch.baddbmm``/``torch.bmm``), one per layer and pass. The
backward pass is written out by hand (for this network: the products and two
ReLU masks), so no autograd graph is built at each step.

Each client still takes exactly the steps :func:`fedlearn.training.local_update`
would give it: its own rows, in its own ``epoch_orders`` order, in batches of
``batch_size`` with a short last batch per epoch, and the gradient of the mean
cross-entropy over *its own* batch. Clients are stacked by descending step
count, so the clients still training at step ``s`` are a prefix of the stack
and a finished client costs nothing. A client's short last batch is padded to
the batch size with rows of weight zero (at most one batch per client per
epoch), which contribute exactly nothing to its gradient.

SGD (momentum, weight decay) and Adam (with bias correction) keep their state
in the same stacked form and do the arithmetic of ``torch.optim.SGD`` and
``torch.optim.Adam``; SGD folds each weight gradient's product straight into
its update (``baddbmm_``), the same sum rounded once less. So the only
differences from the sequential engine are float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedlearn.config import TrainConfig
from fedlearn.models import MLP
from fedlearn.sim.base import ClientTask, ClientUpdate
from fedlearn.training import epoch_orders
from fedlearn.types import Weights

#: The stacked parameters, in forward order (the state_dict names of ``MLP``).
PARAMS: tuple[str, ...] = (
    "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias",
)
#: torch.optim.Adam's defaults, which ``make_optimizer`` keeps.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def unsupported_reason(model: nn.Module, config: TrainConfig) -> str | None:
    """Why this engine cannot train ``model`` with ``config`` (None when it can)."""
    if type(model) is not MLP:
        return f"it only stacks the mlp model, not {type(model).__name__}"
    if tuple(model.state_dict()) != PARAMS:
        return "the mlp's parameters are not fc1, fc2 and fc3"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "it only trains float32 parameters"
    if config.optimizer not in ("sgd", "adam"):
        return f"it does not implement the {config.optimizer} optimizer"
    if config.prox_mu > 0 or config.scaffold:
        return "its hand-written steps have no FedProx term or SCAFFOLD correction"
    return None


@dataclass(frozen=True)
class Schedule:
    """Which dataset rows each stacked client trains on at each step.

    Slot ``i`` of the stack holds client ``order[i]``; at step ``s`` the first
    ``active[s]`` slots train, on rows ``rows[s, :active[s]]`` (``[S, K, B]``)
    with per-row loss weights ``scale[s, :active[s]]``: 1/(the client's batch
    size) for real rows and 0 for padding.
    """

    order: npt.NDArray[np.int64]
    active: list[int]
    rows: torch.Tensor
    scale: torch.Tensor


def make_schedule(clients: list[ClientTask], batch_size: int, epochs: int) -> Schedule:
    """The step-by-step data plan of ``clients``, each in its own ``epoch_orders`` order."""
    k = len(clients)
    sizes = np.array([len(c.indices) for c in clients], dtype=np.int64)
    per_epoch = -(-sizes // batch_size)
    steps = per_epoch * epochs
    order = np.argsort(-steps, kind="stable").astype(np.int64)
    total = int(steps.max()) if k else 0
    rows = np.zeros((total, k, batch_size), dtype=np.int64)
    scale = np.zeros((total, k, batch_size), dtype=np.float32)
    for slot, ci in enumerate(order):
        task, n, spe = clients[ci], int(sizes[ci]), int(per_epoch[ci])
        if n == 0:
            continue
        weight = np.zeros(spe * batch_size, dtype=np.float32)
        weight[:n] = np.float32(1.0 / batch_size)
        if n % batch_size:
            weight[(spe - 1) * batch_size : n] = np.float32(1.0 / (n % batch_size))
        block = np.full(spe * batch_size, task.indices[0], dtype=np.int64)
        for e, perm in enumerate(epoch_orders(n, epochs, task.seed)):
            block[:n] = task.indices[perm]
            rows[e * spe : (e + 1) * spe, slot] = block.reshape(spe, batch_size)
            scale[e * spe : (e + 1) * spe, slot] = weight.reshape(spe, batch_size)
    active = [int(a) for a in (steps[None, :] > np.arange(total)[:, None]).sum(axis=1)]
    return Schedule(order, active, torch.from_numpy(rows), torch.from_numpy(scale))


class VectorizedEngine:
    """Trains all clients of a round at once on stacked ``mlp`` parameters.

    ``x`` and ``y`` are the whole training set (shared, never copied per
    client); each step gathers the active clients' rows with one
    ``index_select``. The stacked parameters and optimizer state live in
    :class:`Buffers` kept from round to round; each client's delta is copied
    out of them.
    """

    name = "vectorized"

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 max_parallel: int | None = None) -> None:
        self.x = x.reshape(x.shape[0], -1)
        self.y = y
        self.max_parallel = max_parallel
        self.buffers = Buffers()

    def train_round(
        self, weights: Weights, clients: list[ClientTask], config: TrainConfig
    ) -> list[ClientUpdate]:
        """Train every client in ``clients`` from ``weights``: all at once, or in chunks.

        Chunks of at most ``max_parallel`` clients take them by descending step
        count, so each chunk's clients finish close together.
        """
        if config.prox_mu > 0 or any(c.control is not None for c in clients):
            raise ValueError("the mlp engine has no FedProx term or SCAFFOLD correction; "
                             "make_engine picks another engine for such rounds")
        size = self.max_parallel or len(clients)
        if size >= len(clients):
            return self._train_chunk(weights, clients, config)
        steps = [-(-len(c.indices) // config.batch_size) for c in clients]
        order = sorted(range(len(clients)), key=lambda i: -steps[i])
        out: dict[int, ClientUpdate] = {}
        for lo in range(0, len(order), size):
            chunk = order[lo : lo + size]
            got = self._train_chunk(weights, [clients[i] for i in chunk], config)
            out.update(zip(chunk, got, strict=True))
        return [out[i] for i in range(len(clients))]

    def _train_chunk(
        self, weights: Weights, clients: list[ClientTask], config: TrainConfig
    ) -> list[ClientUpdate]:
        plan = make_schedule(clients, config.batch_size, config.epochs)
        k = len(clients)
        start = [torch.from_numpy(np.array(weights[n], dtype=np.float32)) for n in PARAMS]
        with torch.no_grad():
            params = [self.buffers.get(f"param.{n}", k, w.shape) for n, w in zip(
                PARAMS, start, strict=True)]
            for p, w in zip(params, start, strict=True):
                p.copy_(w.expand_as(p))
            _train(self.x, self.y, params, plan, config, self.buffers)
            deltas = [p.sub_(w).numpy() for p, w in zip(params, start, strict=True)]
        slot_of = np.empty(k, dtype=np.int64)
        slot_of[plan.order] = np.arange(k)
        return [
            ClientUpdate(
                task.client_id,
                {n: d[slot_of[i]].copy() for n, d in zip(PARAMS, deltas, strict=True)},
                len(task.indices),
            )
            for i, task in enumerate(clients)
        ]


class Buffers:
    """Stacked tensors kept from one round to the next, by name.

    A fresh stack of 100 clients' models is 40 MB of new pages, which the
    kernel zeroes and maps one by one: slower than the copy into a kept one.
    """

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}

    def get(self, name: str, k: int, shape: torch.Size) -> torch.Tensor:
        """A float32 ``[k, *shape]`` tensor (its contents are whatever was left in it)."""
        buf = self._kept.get(name)
        if buf is None or buf.shape[0] < k or buf.shape[1:] != shape:
            buf = self._kept[name] = torch.empty(k, *shape)
        return buf[:k]

    def zeros(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """A zeroed tensor shaped like the stacked ``like``."""
        return self.get(name, like.shape[0], like.shape[1:]).zero_()


def _train(
    x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], plan: Schedule,
    config: TrainConfig, buffers: Buffers,
) -> None:
    """Run every step of ``plan`` on the stacked ``params`` in place."""
    batch = config.batch_size
    opt = _Optimizer(params, config, buffers)
    minus_one = torch.full((len(plan.order), batch, 1), -1.0)
    for s, a in enumerate(plan.active):
        idx = plan.rows[s, :a].reshape(-1)
        xb = x.index_select(0, idx).view(a, batch, -1)
        yb = y.index_select(0, idx).view(a, batch, 1)
        w1, b1, w2, b2, w3, b3 = (p[:a] for p in params)
        h1 = torch.baddbmm(b1.unsqueeze(1), xb, w1.transpose(1, 2)).relu_()
        h2 = torch.baddbmm(b2.unsqueeze(1), h1, w2.transpose(1, 2)).relu_()
        # d(mean CE)/d(logits) = (softmax - onehot) / batch, per client and row.
        g3 = torch.baddbmm(b3.unsqueeze(1), h2, w3.transpose(1, 2)).softmax(2)
        g3.scatter_add_(2, yb, minus_one[:a])
        g3.mul_(plan.scale[s, :a].unsqueeze(2))
        g2 = torch.bmm(g3, w3).masked_fill_(h2 <= 0, 0.0)
        g1 = torch.bmm(g2, w2).masked_fill_(h1 <= 0, 0.0)
        # The gradient of layer i's weight is bmm(outer[i], inner[i]); every
        # gradient is taken before any parameter changes.
        outer = (g1.transpose(1, 2), g2.transpose(1, 2), g3.transpose(1, 2))
        inner = (xb, h1, h2)
        opt.begin(s)
        for layer in range(3):
            opt.update_weight(2 * layer, a, outer[layer], inner[layer])
            opt.update_bias(2 * layer + 1, a, (g1, g2, g3)[layer].sum(1))


class _Optimizer:
    """torch.optim.SGD / Adam over stacked parameters, updating the first ``a`` clients.

    Weight gradients arrive as the two factors of a batched product. SGD folds
    that product into its update (``baddbmm_`` straight into the parameter or
    momentum buffer), so the largest gradient is never written out; Adam needs
    it whole and writes it into a kept buffer.
    """

    def __init__(self, params: list[torch.Tensor], config: TrainConfig, buffers: Buffers) -> None:
        self.params = params
        self.config = config
        self.adam = config.optimizer == "adam"
        self.step = 0
        self.first = True
        sgd_momentum = not self.adam and config.momentum != 0
        self.momentum = [buffers.zeros(f"momentum.{n}", p) for n, p in zip(
            PARAMS, params, strict=True)] if sgd_momentum else []
        self.grad = [buffers.get(f"grad.{n}", p.shape[0], p.shape[1:]) for n, p in zip(
            PARAMS[::2], params[::2], strict=True)] if self.adam else []
        self.exp_avg = [buffers.zeros(f"exp_avg.{n}", p) for n, p in zip(
            PARAMS, params, strict=True)] if self.adam else []
        self.exp_avg_sq = [buffers.zeros(f"exp_avg_sq.{n}", p) for n, p in zip(
            PARAMS, params, strict=True)] if self.adam else []

    def begin(self, s: int) -> None:
        """Start step ``s`` (0-based; the same for every active client)."""
        self.step = s + 1
        self.first = s == 0

    def update_weight(self, i: int, a: int, outer: torch.Tensor, inner: torch.Tensor) -> None:
        """Update parameter ``i`` of slots ``0..a-1`` with gradient ``bmm(outer, inner)``."""
        cfg = self.config
        p = self.params[i][:a]
        if self.adam:
            self._adam(i, p, torch.bmm(outer, inner, out=self.grad[i // 2][:a]))
        elif self.momentum:
            # buf = momentum * buf + grad (+ wd * p); torch starts buf as the first gradient.
            buf = self.momentum[i][:a]
            buf.baddbmm_(outer, inner, beta=0.0 if self.first else cfg.momentum)
            if cfg.weight_decay != 0:
                buf.add_(p, alpha=cfg.weight_decay)
            p.add_(buf, alpha=-cfg.lr)
        else:
            # p - lr * (grad + wd * p) == (1 - lr * wd) * p - lr * grad
            p.baddbmm_(outer, inner, beta=1.0 - cfg.lr * cfg.weight_decay, alpha=-cfg.lr)

    def update_bias(self, i: int, a: int, grad: torch.Tensor) -> None:
        """Update parameter ``i`` of slots ``0..a-1`` with ``grad`` (which may be changed)."""
        cfg = self.config
        p = self.params[i][:a]
        if self.adam:
            self._adam(i, p, grad)
            return
        if cfg.weight_decay != 0:
            grad.add_(p, alpha=cfg.weight_decay)
        if self.momentum:
            buf = self.momentum[i][:a]
            if self.first:
                buf.copy_(grad)
            else:
                buf.mul_(cfg.momentum).add_(grad)
            grad = buf
        p.add_(grad, alpha=-cfg.lr)

    def _adam(self, i: int, p: torch.Tensor, grad: torch.Tensor) -> None:
        """torch.optim.Adam's single-tensor step, operation for operation."""
        cfg = self.config
        a = p.shape[0]
        beta1, beta2 = ADAM_BETAS
        if cfg.weight_decay != 0:
            grad.add_(p, alpha=cfg.weight_decay)
        exp_avg, exp_avg_sq = self.exp_avg[i][:a], self.exp_avg_sq[i][:a]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(self.step)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
        p.addcdiv_(exp_avg, denom, value=-cfg.lr / bias_correction1)
