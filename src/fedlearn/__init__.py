"""fedlearn: federated learning with real server and client processes.

The public face (everything a user's task or script needs)::

    import fedlearn

    task = fedlearn.Task(name="scans", model=make_model, data=load_data)
    history = fedlearn.simulate(task, clients=10, rounds=5)
    fedlearn.serve(task, rounds=10, min_clients=3)                 # on the server
    fedlearn.run_client(task, server=URL, token=TOKEN, data=PATH)  # on each client

Names load on first use, so ``import fedlearn`` stays light (no torch, no web code).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_WHERE = {
    "Task": "fedlearn.tasks.base",
    "Data": "fedlearn.tasks.base",
    "ClientData": "fedlearn.tasks.base",
    "DataContext": "fedlearn.tasks.base",
    "TrainContext": "fedlearn.tasks.base",
    "EvalContext": "fedlearn.tasks.base",
    "TrainResult": "fedlearn.tasks.base",
    "load_task": "fedlearn.tasks.loading",
    "builtin_task": "fedlearn.tasks.builtin",
    "array_task": "fedlearn.tasks.builtin",
    "TrainConfig": "fedlearn.config",
    "Strategy": "fedlearn.strategies",
    "parse_strategy": "fedlearn.strategies",
    "History": "fedlearn.api",
    "simulate": "fedlearn.api",
    "serve": "fedlearn.api",
    "run_client": "fedlearn.api",
    "centralized": "fedlearn.api",
    "get_weights": "fedlearn.models",
    "set_weights": "fedlearn.models",
    "FedlearnError": "fedlearn.errors",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first access."""
    if name not in _WHERE:
        raise AttributeError(f"module 'fedlearn' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
