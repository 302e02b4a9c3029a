"""Small models by name, and the torch <-> :data:`~fedlearn.types.Weights` edge.

``mlp`` is the socket seed's 784-128-64-10 ReLU network (its input width
follows the dataset, so it also fits 8x8 ``digits``); ``cnn`` is a two-layer
conv net for 28x28 grayscale; ``cifar-cnn`` is the classic 32x32x3 conv net of
the Flower CIFAR-10 demo.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedlearn.errors import ModelError, PayloadError
from fedlearn.types import Weights


class MLP(nn.Module):
    """in-128-64-classes fully connected network with ReLU."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)  # type: ignore[no-any-return]


class CNN(nn.Module):
    """Two 3x3 conv layers with max-pooling, then 128 hidden units; for 1x28x28."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)  # type: ignore[no-any-return]


class CifarCNN(nn.Module):
    """The LeNet-style CIFAR-10 network of the PyTorch and Flower tutorials; for 3x32x32."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images."""
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)  # type: ignore[no-any-return]


Shape = tuple[int, int, int]

_BUILDERS: dict[str, tuple[Shape | None, Callable[[Shape, int], nn.Module]]] = {
    "mlp": (None, lambda shape, k: MLP(math.prod(shape), k)),
    "cnn": ((1, 28, 28), lambda shape, k: CNN(k)),
    "cifar-cnn": ((3, 32, 32), lambda shape, k: CifarCNN(k)),
}

MODELS: tuple[str, ...] = tuple(_BUILDERS)


def model_fits(name: str, input_shape: Shape) -> None:
    """Raise ModelError unless built-in model ``name`` takes inputs of ``input_shape``."""
    if name not in _BUILDERS:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    needs, _ = _BUILDERS[name]
    if needs is not None and tuple(input_shape) != needs:
        raise ModelError(
            f"model {name!r} takes inputs of shape {needs} but the dataset's are "
            f"{tuple(input_shape)}; pick a model that fits the dataset "
            f"(mlp fits any, cnn fits 1x28x28, cifar-cnn fits 3x32x32)."
        )


def build_model(
    name: str, input_shape: Shape, num_classes: int = 10, *, seed: int | None = 0
) -> nn.Module:
    """A freshly initialised model ``name`` for inputs of ``input_shape`` (C, H, W).

    With a ``seed`` the initialisation is seeded and leaves torch's global random
    state untouched; with None it draws from torch's current random state (the
    caller seeds, as :func:`fedlearn.training.build_task_model` does).
    """
    model_fits(name, input_shape)
    _, builder = _BUILDERS[name]
    if seed is None:
        return builder(tuple(input_shape), num_classes)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(tuple(input_shape), num_classes)  # type: ignore[arg-type]


def get_weights(model: nn.Module) -> Weights:
    """The model's whole ``state_dict`` (parameters and buffers) as numpy arrays (copies).

    dtypes and shapes are kept: an int64 0-d ``num_batches_tracked`` stays one.
    """
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Weights) -> None:
    """Load numpy ``weights`` into ``model``, checking names and shapes, keeping its dtypes."""
    state = model.state_dict()
    if state.keys() != weights.keys():
        missing = sorted(set(state) - set(weights))
        extra = sorted(set(weights) - set(state))
        raise PayloadError(
            f"weights do not fit the model (missing {missing}, unexpected {extra}); "
            "use weights saved from the same task."
        )
    new = {}
    for k, v in state.items():
        arr = np.asarray(weights[k])
        if tuple(arr.shape) != tuple(v.shape):
            raise PayloadError(
                f"{k} has shape {tuple(arr.shape)} but the model needs {tuple(v.shape)}; "
                "use weights saved from the same task."
            )
        new[k] = torch.from_numpy(np.array(arr, copy=True)).to(dtype=v.dtype, device=v.device)
    model.load_state_dict(new)
