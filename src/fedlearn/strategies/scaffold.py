"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct client drift.

Server half (used by the ``scaffold`` strategy): the server keeps a control
variate ``c``, zeros like the model's float arrays at the start. After a
round in which the set ``S`` of the ``N`` clients reported
``(dy_i, dc_i)``::

    x <- x + lr_g * mean_S(dy_i)
    c <- c + (|S| / N) * mean_S(dc_i)

Both means are plain (unweighted) as in the paper's Algorithm 1 and FedLab;
``lr_g`` defaults to 1.

Client half (pure helpers for the training loop). Each local step uses the
corrected gradient ``g - c_i + c``; after ``K`` steps of learning rate
``lr_l`` from ``x`` to ``y``, option II of the paper updates the client's own
variate ``c_i+ = c_i - c + (x - y) / (K * lr_l)`` and reports
``dc = c_i+ - c_i`` with ``dy = y - x``. A client's ``c_i`` starts at zero.

Option II is ``c_i+ = c_i - c + mean(corrected gradients)``, that is the mean
of the client's own raw gradients, because plain SGD moves ``x - y = lr_l *
sum(corrected gradients)``. With heavy-ball momentum ``beta`` (torch's SGD:
``m_t = beta m_{t-1} + g_t``, ``w -= lr_l m_t``) the weights move ``lr_l *
sum(m_t)``, about ``1 / (1 - beta)`` times as far, and option II as written
would make ``c_i`` ten times too large at ``beta = 0.9`` (SCAFFOLD then
over-corrects and diverges). Since ``sum(g_t) = (1 - beta) sum(m_t) + beta m_K``,
the mean corrected gradient is exactly ``((1 - beta)(x - y) / lr_l + beta m_K)
/ K`` with ``m_K`` the last momentum buffer; :func:`control_update` uses that,
which for ``beta = 0`` is option II as written.

Everything is computed in float64 and cast back to each array's dtype; the
variates cover every float array of the model (a training loop uses the
entries of the parameters it has gradients for).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedlearn.strategies.base import cast, check_like, is_float
from fedlearn.types import Weights

#: Key of the control-variate delta in :attr:`Update.extra`.
DELTA_C = "delta_c"
#: Key of the server's control variate in ``client_arrays`` and in the state's arrays.
CONTROL = "c"


def init_control(weights: Weights) -> Weights:
    """A zero control variate: zeros like each float array of ``weights``."""
    return {k: np.zeros_like(v) for k, v in weights.items() if is_float(v)}


def corrected_gradient(grad: Mapping[str, np.ndarray], c_i: Mapping[str, np.ndarray],
                       c: Mapping[str, np.ndarray]) -> Weights:
    """SCAFFOLD's local gradient ``g - c_i + c`` for each array of ``grad`` (dtype of ``g``)."""
    out: Weights = {}
    for k, g in grad.items():
        g64 = np.asarray(g, dtype=np.float64)
        out[k] = cast(g64 - np.asarray(c_i[k], np.float64) + np.asarray(c[k], np.float64),
                      np.asarray(g).dtype)
    return out


def correction(c: Mapping[str, np.ndarray], c_i: Mapping[str, np.ndarray]) -> Weights:
    """``c - c_i`` for each array of ``c``, in ``c``'s dtypes: what a local step adds to
    the gradient (:func:`corrected_gradient` is ``g`` plus this)."""
    return {k: cast(np.asarray(v, np.float64) - np.asarray(c_i[k], np.float64),
                    np.asarray(v).dtype) for k, v in c.items()}


def control_update(c_i: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray],
                   x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], *,
                   steps: int, lr: float, momentum: float = 0.0,
                   last_momentum: Mapping[str, np.ndarray] | None = None,
                   ) -> tuple[Weights, Weights]:
    """Option II: ``c_i+ = c_i - c + mean corrected gradient``; returns ``(c_i+, c_i+ - c_i)``.

    ``x`` is the model the client started from, ``y`` the one it ended with
    after ``steps = K`` local steps of learning rate ``lr``. With plain SGD
    (``momentum`` 0) the mean corrected gradient is ``(x - y) / (K * lr)``, the
    paper's formula; with SGD momentum ``beta`` and ``last_momentum`` the
    momentum buffer after the last step (``m_K``; missing entries count as
    zero) it is ``((1 - beta)(x - y) / lr + beta m_K) / K`` (see the module
    doc). Keys are those of ``c`` (the model's float arrays); results have the
    dtypes of ``c``.
    """
    if steps < 1:
        raise ValueError(f"SCAFFOLD's control update needs at least 1 local step, got {steps}")
    if not lr > 0:
        raise ValueError(f"SCAFFOLD's control update needs a positive learning rate, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"SCAFFOLD's control update needs momentum in [0, 1), got {momentum}")
    buffers = last_momentum if momentum > 0 and last_momentum is not None else {}
    new: Weights = {}
    delta: Weights = {}
    for k, ck in c.items():
        old = np.asarray(c_i[k], np.float64)
        moved = (np.asarray(x[k], np.float64) - np.asarray(y[k], np.float64)) * (
            (1.0 - momentum) / lr)
        if k in buffers:
            moved = moved + momentum * np.asarray(buffers[k], np.float64)
        plus = old - np.asarray(ck, np.float64) + moved / steps
        dtype = np.asarray(ck).dtype
        new[k] = cast(plus, dtype)
        delta[k] = cast(plus - old, dtype)
    return new, delta


def server_control_update(c: Weights, delta_cs: Sequence[Mapping[str, np.ndarray]], *,
                          num_clients: int) -> Weights:
    """``c + (|S| / N) * mean(dc_i)`` with ``|S| = len(delta_cs)`` and ``N = num_clients``."""
    sampled = len(delta_cs)
    if sampled < 1:
        raise ValueError("SCAFFOLD's server update needs at least 1 control delta, got none")
    if num_clients < sampled:
        raise ValueError(f"SCAFFOLD needs num_clients (N) >= the {sampled} clients that "
                         f"reported, got {num_clients}")
    for i, dc in enumerate(delta_cs):
        check_like(c, dc, f"control delta {i}")
    factor = sampled / num_clients
    return {k: cast(np.asarray(v, np.float64) + factor
                    * np.mean([np.asarray(dc[k], np.float64) for dc in delta_cs], axis=0),
                    v.dtype)
            for k, v in c.items()}
