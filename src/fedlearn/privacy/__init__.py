"""Differential privacy and secure aggregation for federated averaging.

Pure code (numpy, dp_accounting, cryptography): no torch, no web, no I/O.

- :mod:`~fedlearn.privacy.accounting`: ε after a number of DP-FedAvg rounds.
- :mod:`~fedlearn.privacy.dp`: clipping, seeded Gaussian noise, the
  fixed-denominator DP mean and adaptive clipping.
- :mod:`~fedlearn.privacy.secagg` / :mod:`~fedlearn.privacy.secagg_server`:
  SecAgg+ client and server halves over JSON-ready messages.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use: dp_accounting and cryptography take seconds to import, and
# most runs use neither (``import fedlearn.privacy.dpsgd`` stays cheap too).
_WHERE = {
    "Accountant": "accounting",
    "AdaptiveClip": "dp",
    "AdaptiveClipState": "dp",
    "clip": "dp",
    "dp_mean": "dp",
    "effective_noise_multiplier": "dp",
    "gaussian_noise_like": "dp",
    "unclipped_bit": "dp",
    "SecAggClient": "secagg",
    "SecAggParams": "secagg",
    "SecAggServer": "secagg_server",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedlearn.privacy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedlearn.privacy.{_WHERE[name]}"), name)
