"""Differential privacy and secure aggregation for federated averaging.

Pure code (numpy, dp_accounting, cryptography): no torch, no web, no I/O.

- :mod:`~fedlearn.privacy.accounting`: ε after a number of DP-FedAvg rounds.
- :mod:`~fedlearn.privacy.dp`: clipping, seeded Gaussian noise, the
  fixed-denominator DP mean and adaptive clipping.
- :mod:`~fedlearn.privacy.secagg` / :mod:`~fedlearn.privacy.secagg_server`:
  SecAgg+ client and server halves over JSON-ready messages.
"""

from __future__ import annotations

from fedlearn.privacy.accounting import Accountant
from fedlearn.privacy.dp import (
    AdaptiveClip,
    AdaptiveClipState,
    clip,
    dp_mean,
    effective_noise_multiplier,
    gaussian_noise_like,
    unclipped_bit,
)
from fedlearn.privacy.secagg import SecAggClient, SecAggParams
from fedlearn.privacy.secagg_server import SecAggServer

__all__ = [
    "Accountant",
    "AdaptiveClip",
    "AdaptiveClipState",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "clip",
    "dp_mean",
    "effective_noise_multiplier",
    "gaussian_noise_like",
    "unclipped_bit",
]
