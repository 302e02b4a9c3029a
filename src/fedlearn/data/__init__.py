"""The data layer: finding, fetching, parsing, normalising and partitioning datasets.

numpy only; nothing here imports torch.
"""

from __future__ import annotations

from fedlearn.data.datasets import Dataset, load_dataset
from fedlearn.data.fetch import DATASETS, fetch, locate, status
from fedlearn.data.partition import (
    PartitionSpec,
    client_indices,
    parse_partition,
    partition,
)

__all__ = [
    "DATASETS",
    "Dataset",
    "PartitionSpec",
    "client_indices",
    "fetch",
    "load_dataset",
    "locate",
    "parse_partition",
    "partition",
    "status",
]
