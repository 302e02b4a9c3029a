"""The data layer: finding, fetching, parsing, normalising and partitioning datasets.

:mod:`fedlearn.data.local` reads a client's own files (``--data``). numpy only;
nothing here imports torch.
"""

from __future__ import annotations

from fedlearn.data.datasets import Dataset, load_dataset
from fedlearn.data.fetch import DATASETS, fetch, locate, status
from fedlearn.data.local import LocalData, check_labels, read_local, split_test
from fedlearn.data.partition import (
    PartitionSpec,
    client_indices,
    parse_partition,
    partition,
)

__all__ = [
    "DATASETS",
    "Dataset",
    "LocalData",
    "PartitionSpec",
    "check_labels",
    "client_indices",
    "fetch",
    "load_dataset",
    "locate",
    "parse_partition",
    "partition",
    "read_local",
    "split_test",
    "status",
]
