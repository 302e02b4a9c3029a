"""Evaluation metrics on whole test sets, as numpy functions of (outputs, targets).

``outputs`` are the model's raw outputs (logits for classification), ``targets``
the labels or regression targets. Federated evaluation averages each metric
over clients weighted by their example counts (a client's AUC is its own; the
mean is not a pooled AUC).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _squeeze(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1:
        return outputs[..., 0]
    return outputs


def accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Share of examples whose arg-max class (or logit > 0 for one output) is the label."""
    if len(targets) == 0:
        return float("nan")
    out = _squeeze(outputs, targets)
    pred = (out > 0).astype(np.int64) if out.ndim == targets.ndim else out.argmax(axis=-1)
    return float(np.mean(pred == targets))


def mse(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean squared error."""
    out = _squeeze(outputs, targets).astype(np.float64)
    return float(np.mean(np.square(out - targets.astype(np.float64))))


def mae(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean absolute error."""
    out = _squeeze(outputs, targets).astype(np.float64)
    return float(np.mean(np.abs(out - targets.astype(np.float64))))


def rmse(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Root mean squared error."""
    return float(np.sqrt(mse(outputs, targets)))


def auc(outputs: np.ndarray, targets: np.ndarray) -> float:
    """ROC AUC (binary: score of class 1; more classes: one-vs-rest macro mean).

    NaN when the test set holds a single class (AUC is undefined there).
    """
    from sklearn.metrics import roc_auc_score

    out = _squeeze(outputs, targets).astype(np.float64)
    labels = targets.astype(np.int64)
    if len(np.unique(labels)) < 2:
        return float("nan")
    if out.ndim == 1:
        return float(roc_auc_score(labels, out))
    shifted = np.exp(out - out.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    if len(present) < probs.shape[1]:
        scores = [roc_auc_score(labels == c, probs[:, c]) for c in present]
        return float(np.mean(scores))
    return float(roc_auc_score(labels, probs, multi_class="ovr"))


BY_NAME: dict[str, MetricFn] = {
    "accuracy": accuracy, "mse": mse, "mae": mae, "rmse": rmse, "auc": auc,
}


def weighted_means(results: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Example-weighted mean of each metric over clients (NaN values are left out)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics, n in results:
        for name, value in metrics.items():
            v = float(value)
            if n > 0 and np.isfinite(v):
                totals[name] = totals.get(name, 0.0) + v * n
                weights[name] = weights.get(name, 0.0) + n
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}
