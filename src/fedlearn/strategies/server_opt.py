"""Server optimizers: the aggregated delta as a pseudo-gradient (Reddi et al. 2021, Alg. 2).

The server treats the round's aggregated delta ``D`` (a step *towards* the
clients, so the negative of a gradient) as the input of an optimizer:

- ``sgd``     (FedAvg, McMahan et al. 2017): ``x <- x + lr * D``
- ``avgm``    (FedAvgM, Hsu et al. 2019):    ``m <- momentum * m + D;  x <- x + lr * m``
- ``adagrad`` (FedAdagrad, Reddi et al. 2021): ``v <- v + D^2``
- ``yogi``    (FedYogi):  ``v <- v - (1 - b2) * D^2 * sign(v - D^2)``
- ``adam``    (FedAdam):  ``v <- b2 * v + (1 - b2) * D^2``

and for the three adaptive ones ``m <- b1 * m + (1 - b1) * D`` then
``x <- x + lr * m / (sqrt(v) + tau)``, with no bias correction, as in the paper.

Defaults. ``sgd``: ``lr = 1`` (plain FedAvg). ``avgm``: ``lr = 1``,
``momentum = 0.9``, the setting of Hsu et al. and of Flower's FedAvgM baseline
(Flower's class defaults to momentum 0, which is plain FedAvg). Adaptive:
``b1 = 0.9``, ``b2 = 0.99`` (Reddi et al. section 5 and Flower), ``lr = 0.01``
and ``tau = 1e-3`` (Flower's FedYogi; Flower's FedAdam and FedAdagrad use
``lr = 0.1, tau = 1e-9``, which moves every coordinate by about ``lr`` on the
first round whatever its size). FedAdagrad keeps the momentum term with
``b1 = 0.9`` as in the paper's Algorithm 2 (Flower's sets ``b1 = 0``). The
moments start at ``m = 0`` and ``v = tau^2``, the least the paper's
``v_{-1} >= tau^2`` allows (Flower starts ``v`` at 0).

Everything is computed in float64 and each result is cast back to its array's
dtype; the moments are kept in float64. Only floating-point arrays are
optimized; any other array is copied through unchanged (the strategy applies
the integer rule to it). State is explicit: :class:`OptState` in, new
:class:`OptState` out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedlearn.strategies.base import cast, is_float
from fedlearn.types import Weights

OPTIMIZERS = ("sgd", "avgm", "adam", "yogi", "adagrad")

SGD_LR = 1.0
AVGM_LR = 1.0
AVGM_MOMENTUM = 0.9
ADAPTIVE_LR = 0.01
BETA1 = 0.9
BETA2 = 0.99
TAU = 1e-3


@dataclass(frozen=True)
class OptState:
    """An optimizer's moments (``"m"``, ``"v"``: float64 arrays per float key) and step count."""

    moments: dict[str, Weights] = field(default_factory=dict)
    step: int = 0


@dataclass(frozen=True)
class ServerOptimizer:
    """One server optimizer and its hyperparameters, as a frozen value (see the module doc)."""

    kind: str = "sgd"
    lr: float = SGD_LR
    momentum: float = 0.0
    beta1: float = BETA1
    beta2: float = BETA2
    tau: float = TAU

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.kind!r}; "
                             f"choose one of {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server learning rate must be positive, got {self.lr}")
        for name, value in (("momentum", self.momentum), ("beta1", self.beta1),
                            ("beta2", self.beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be positive, got {self.tau}")

    @property
    def moment_names(self) -> tuple[str, ...]:
        """The moments this optimizer keeps."""
        if self.kind == "sgd":
            return ()
        if self.kind == "avgm":
            return ("m",)
        return ("m", "v")

    def init(self, weights: Weights) -> OptState:
        """Fresh state for ``weights``: ``m = 0`` and ``v = tau^2`` per float array (float64)."""
        moments: dict[str, Weights] = {}
        for name in self.moment_names:
            start = self.tau ** 2 if name == "v" else 0.0
            moments[name] = {k: np.full(np.shape(v), start, dtype=np.float64)
                             for k, v in weights.items() if is_float(v)}
        return OptState(moments=moments, step=0)

    def step(self, weights: Weights, delta: Weights, state: OptState) -> tuple[Weights, OptState]:
        """New weights and state after one pseudo-gradient step with ``delta``.

        Float arrays move as the module docstring says; other arrays are copied.
        """
        new_weights: Weights = {}
        new_moments: dict[str, Weights] = {name: {} for name in self.moment_names}
        for k, w in weights.items():
            if not is_float(w):
                new_weights[k] = np.array(w, copy=True)
                continue
            d = np.asarray(delta[k], dtype=np.float64)
            moved, moments = self._move(d, {n: state.moments[n][k] for n in self.moment_names})
            new_weights[k] = cast(np.asarray(w, dtype=np.float64) + moved, w.dtype)
            for name, value in moments.items():
                new_moments[name][k] = value
        return new_weights, OptState(moments=new_moments, step=state.step + 1)

    def _move(self, d: np.ndarray,
              moments: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The change of one array and its new moments (all float64, inputs unchanged)."""
        if self.kind == "sgd":
            return self.lr * d, {}
        if self.kind == "avgm":
            m = self.momentum * moments["m"] + d
            return self.lr * m, {"m": m}
        m = self.beta1 * moments["m"] + (1.0 - self.beta1) * d
        v_old, d2 = moments["v"], d * d
        if self.kind == "adagrad":
            v = v_old + d2
        elif self.kind == "yogi":
            v = v_old - (1.0 - self.beta2) * d2 * np.sign(v_old - d2)
        else:
            v = self.beta2 * v_old + (1.0 - self.beta2) * d2
        return self.lr * m / (np.sqrt(v) + self.tau), {"m": m, "v": v}


def sgd(lr: float = SGD_LR) -> ServerOptimizer:
    """FedAvg's server step (McMahan et al. 2017): ``x <- x + lr * D``."""
    return ServerOptimizer("sgd", lr=lr)


def avgm(lr: float = AVGM_LR, momentum: float = AVGM_MOMENTUM) -> ServerOptimizer:
    """FedAvgM (Hsu et al. 2019): ``m <- momentum * m + D; x <- x + lr * m``."""
    return ServerOptimizer("avgm", lr=lr, momentum=momentum)


def adam(lr: float = ADAPTIVE_LR, beta1: float = BETA1, beta2: float = BETA2,
         tau: float = TAU) -> ServerOptimizer:
    """FedAdam (Reddi et al. 2021): ``v <- b2 v + (1-b2) D^2``, ``x <- x + lr m/(sqrt(v)+tau)``."""
    return ServerOptimizer("adam", lr=lr, beta1=beta1, beta2=beta2, tau=tau)


def yogi(lr: float = ADAPTIVE_LR, beta1: float = BETA1, beta2: float = BETA2,
         tau: float = TAU) -> ServerOptimizer:
    """FedYogi (Reddi et al. 2021): ``v <- v - (1-b2) D^2 sign(v - D^2)``, then as FedAdam."""
    return ServerOptimizer("yogi", lr=lr, beta1=beta1, beta2=beta2, tau=tau)


def adagrad(lr: float = ADAPTIVE_LR, beta1: float = BETA1, tau: float = TAU) -> ServerOptimizer:
    """FedAdagrad (Reddi et al. 2021): ``v <- v + D^2``, ``x <- x + lr m/(sqrt(v)+tau)``."""
    return ServerOptimizer("adagrad", lr=lr, beta1=beta1, tau=tau)
