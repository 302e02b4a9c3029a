"""The in-process simulator: many clients in one process, sequential or vectorized.

:func:`run_simulation` runs the rounds (the same sampling, seeds and strategy
code as the HTTP server); an :class:`Engine` trains the sampled clients of a
round. ``sequential`` trains each client in turn with the task's trainer (any
model); ``vectorized`` trains all of them at once on stacked parameters.
"""

from fedlearn.sim.base import ENGINES, ClientTask, ClientUpdate, Engine
from fedlearn.sim.config import SimConfig
from fedlearn.sim.engine import (
    Simulation,
    client_ids,
    config_record,
    make_engine,
    run_simulation,
)
from fedlearn.sim.sequential import SequentialEngine
from fedlearn.sim.vectorized import VectorizedEngine, unsupported_reason

__all__ = [
    "ENGINES",
    "ClientTask",
    "ClientUpdate",
    "Engine",
    "SequentialEngine",
    "SimConfig",
    "Simulation",
    "VectorizedEngine",
    "client_ids",
    "config_record",
    "make_engine",
    "run_simulation",
    "unsupported_reason",
]
