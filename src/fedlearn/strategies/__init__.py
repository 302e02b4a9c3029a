"""Pure aggregation: no torch, no web code, no I/O; explicit state in and out."""

from fedlearn.strategies.fedavg import FedAvg, StrategyState, make_strategy
from fedlearn.strategies.sampling import sample_clients

__all__ = ["FedAvg", "StrategyState", "make_strategy", "sample_clients"]
