"""The in-process simulator: many clients in one process, sequential or vectorized.

:func:`run_simulation` runs the rounds (the same sampling, seeds and strategy
code as the HTTP server); an :class:`Engine` trains the sampled clients of a
round. ``sequential`` trains each client in turn with the task's trainer (any
model); ``vectorized`` trains all of them at once on stacked parameters.

Simulated time (:mod:`fedlearn.sim.virtual`): clients with speeds on a virtual
clock (:mod:`fedlearn.sim.clock`), asynchronous merging with the HTTP server's
policies, and sync rounds with a virtual deadline (:mod:`fedlearn.sim.deadline`);
:func:`run_simulation` hands a run with ``SimConfig.virtual`` set to :func:`run_virtual`.
"""

from fedlearn.sim.base import ENGINES, ClientTask, ClientUpdate, Engine
from fedlearn.sim.clock import EventQueue, client_speeds, task_steps
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
from fedlearn.sim.virtual import AsyncSimulation, run_virtual

__all__ = [
    "ENGINES",
    "AsyncSimulation",
    "ClientTask",
    "ClientUpdate",
    "Engine",
    "EventQueue",
    "SequentialEngine",
    "SimConfig",
    "Simulation",
    "VectorizedEngine",
    "client_ids",
    "client_speeds",
    "config_record",
    "make_engine",
    "run_simulation",
    "run_virtual",
    "task_steps",
    "unsupported_reason",
]
