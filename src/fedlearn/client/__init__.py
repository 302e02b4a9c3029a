"""The client side: :class:`RemoteServer` speaks the HTTP protocol, :func:`run_worker` trains.

Names are loaded on first use, so importing one submodule does not pull in
the other (the worker loop never loads httpx; the remote never loads torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlearn.client.remote import (
        Registration,
        RemoteServer,
        RetriesExhausted,
        ServerUnavailable,
        Task,
        with_retries,
    )
    from fedlearn.client.worker import Remote, WorkerConfig, WorkerSummary, run_worker

_WHERE = {
    "Registration": "remote",
    "RemoteServer": "remote",
    "RetriesExhausted": "remote",
    "ServerUnavailable": "remote",
    "Task": "remote",
    "with_retries": "remote",
    "Remote": "worker",
    "WorkerConfig": "worker",
    "WorkerSummary": "worker",
    "run_worker": "worker",
}

__all__ = [
    "Registration",
    "Remote",
    "RemoteServer",
    "RetriesExhausted",
    "ServerUnavailable",
    "Task",
    "WorkerConfig",
    "WorkerSummary",
    "run_worker",
    "with_retries",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedlearn.client.{_WHERE[name]}"), name)
