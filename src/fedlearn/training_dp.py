"""Local training with sample-level DP-SGD through Opacus (``--dp-sgd NOISE:MAX_GRAD_NORM``).

Opacus's ``PrivacyEngine.make_private`` wraps the task's model, optimizer and
a data loader over the client's rows: per-example gradients (``GradSampleModule``),
each clipped to ``max_grad_norm``, Gaussian noise of stddev
``noise_multiplier * max_grad_norm`` added to their sum, and Poisson-sampled
batches of expected size ``batch_size`` (so the accountant's assumption is
what happens). An epoch is ``ceil(n / batch_size)`` steps. Sampling and noise
draw from torch's generator seeded with the round's data seed, so a run is
reproducible. The run is recorded in the client's :class:`~fedlearn.privacy.dpsgd.DPLedger`.

Opacus is an optional extra (``pip install 'fedlearn[dp]'``); a model it cannot
train privately (BatchNorm mixes the examples of a batch) gets one sentence
naming the layer and the fix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedlearn.config import TrainConfig
from fedlearn.errors import ConfigError
from fedlearn.privacy.dpsgd import DPSGD, DPLedger


def check_private_model(model: nn.Module) -> None:
    """Raise ConfigError (one sentence) unless Opacus can train ``model`` with DP-SGD."""
    try:
        from opacus.validators import ModuleValidator
    except ImportError:
        raise ConfigError("--dp-sgd needs Opacus; install it with pip install "
                          "'fedlearn[dp]' (or pip install opacus).") from None
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(
                f"--dp-sgd cannot train this model: layer {name or 'model'} "
                f"({type(module).__name__}) mixes the examples of a batch, so per-example "
                "gradients do not exist; replace it with GroupNorm (e.g. nn.GroupNorm(8, C)) "
                "or let opacus.validators.ModuleValidator.fix(model) do it.")
    first = str(errors[0]).strip().splitlines()[0]
    raise ConfigError(f"--dp-sgd cannot train this model: {first}")


def dp_train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    spec: DPSGD,
    ledger: DPLedger,
    *,
    seed: int,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: str = "cpu",
) -> tuple[float, int]:
    """Train ``model`` in place on ``(x, y)`` with DP-SGD; (mean loss, steps taken).

    ``loss(outputs, targets)`` gives one value per row; the optimizer steps on
    their mean over the (Poisson) batch, as Opacus expects.
    """
    check_private_model(model)
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    n = len(x)
    batch = min(config.batch_size, n)
    steps_per_epoch = max(1, math.ceil(n / batch))
    rate = batch / n
    total, count, steps = 0.0, 0, 0
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # Opacus warns about secure RNG and full backward hooks on every call: not news here.
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        engine = PrivacyEngine(accountant="rdp")
        module, optimizer, private_loader = engine.make_private(
            module=model, optimizer=make_optimizer(model), data_loader=loader,
            noise_multiplier=spec.noise_multiplier, max_grad_norm=spec.max_grad_norm,
            poisson_sampling=True)
        module.train()
        for _ in range(config.epochs):
            for xb, yb in _take(private_loader, steps_per_epoch):
                xb, yb = xb.to(device), yb.to(device)
                optimizer.zero_grad(set_to_none=True)
                # An empty Poisson batch still takes its step: the noise alone.
                per_row = loss(module(xb), yb)
                value = per_row.sum() / max(len(xb), 1)
                value.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
                total += float(value.detach()) * len(xb)
                count += len(xb)
        _unwrap(module)
    ledger.record(spec.noise_multiplier, rate, steps, n)
    return (total / count if count else float("nan")), steps


def _take(loader: Any, steps: int) -> Any:
    """The first ``steps`` batches of ``loader`` (Opacus's loader has that many per pass)."""
    for i, item in enumerate(loader):
        if i >= steps:
            return
        yield item


def _unwrap(module: Any) -> None:
    """Remove Opacus's hooks so the model is a plain module again."""
    remove = getattr(module, "_close", None)
    if callable(remove):
        remove()
