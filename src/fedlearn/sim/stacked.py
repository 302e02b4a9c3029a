"""Pieces of the functional engine that know nothing of the model: optimizer and memory.

:class:`StackedOptimizer` runs torch's own functional SGD and Adam
(``torch.optim.sgd.sgd``, ``torch.optim.adam.adam``, the code behind
``torch.optim.SGD.step`` and ``torch.optim.Adam.step``) on parameters stacked
along a leading client axis. The arithmetic is element-wise, so one call on a
``[a, ...]`` stack does for each of the ``a`` clients exactly what the
optimizer does for one model, with the same operations in the same order.
:func:`clients_at_once` sizes the stack from the memory at hand.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
import torch
from torch import Tensor, nn
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from fedlearn.config import TrainConfig

#: torch.optim.Adam's defaults, which ``make_optimizer`` keeps.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: The share of free memory the stacked clients may take.
MEMORY_SHARE = 0.5


class StackedOptimizer:
    """A fresh ``make_optimizer`` optimizer for each of the stacked clients.

    ``params`` are ``[k, ...]`` stacks changed in place. Each :meth:`step` moves
    the first ``a`` clients (those still training; a prefix, since clients are
    stacked by descending step count), so every active client is at the same
    step number and one step counter serves them all.
    """

    def __init__(self, params: list[Tensor], config: TrainConfig) -> None:
        self.params = params
        self.config = config
        self.adam = config.optimizer == "adam"
        # SGD makes each momentum buffer from the first gradient (left None until then).
        self.momentum: list[Tensor | None] = [None] * len(params)
        self.exp_avg = [torch.zeros_like(p) for p in params] if self.adam else []
        self.exp_avg_sq = [torch.zeros_like(p) for p in params] if self.adam else []
        self.steps = [torch.tensor(0.0) for _ in params]

    def step(self, a: int, grads: list[Tensor]) -> None:
        """Update clients ``0..a-1`` with their ``[a, ...]`` gradients."""
        cfg = self.config
        params = [p[:a] for p in self.params]
        if self.adam:
            adam(params, grads, [m[:a] for m in self.exp_avg], [v[:a] for v in self.exp_avg_sq],
                 [], self.steps, amsgrad=False, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1],
                 lr=cfg.lr, weight_decay=cfg.weight_decay, eps=ADAM_EPS, maximize=False)
            return
        first = all(b is None for b in self.momentum)
        buffers = self.momentum if first else [None if b is None else b[:a]
                                                for b in self.momentum]
        sgd(params, grads, buffers, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
            lr=cfg.lr, dampening=0.0, nesterov=False, maximize=False)


def state_bytes(config: TrainConfig, trainable: list[Tensor], others: list[Tensor]) -> int:
    """Bytes one stacked client holds besides activations.

    Parameters, their gradient and its weight-decayed copy, and the optimizer
    state (one momentum buffer, or Adam's two moments), plus the buffers.
    """
    size = sum(t.numel() * t.element_size() for t in trainable)
    state = 2 if config.optimizer == "adam" else int(config.momentum != 0)
    return size * (3 + state) + sum(t.numel() * t.element_size() for t in others)


def activation_bytes(model: nn.Module, xb: Tensor) -> int:
    """Bytes of every module's outputs on the batch ``xb``, times three for the backward pass."""
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        outs = output if isinstance(output, tuple | list) else (output,)
        total += sum(o.numel() * o.element_size() for o in outs if isinstance(o, Tensor))

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(xb)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return 3 * total


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's own, else the machine's."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def clients_at_once(per_client: int, device: torch.device, log: Callable[[str], None]) -> int:
    """How many clients fit in memory together (at least one), said once through ``log``."""
    free = available_bytes(device)
    n = max(1, int(free * MEMORY_SHARE) // max(per_client, 1))
    log(f"vectorized: training up to {n} clients at once "
        f"(model {per_client / 2**20:.1f} MB, {free / 2**30:.1f} GB available)")
    return n
