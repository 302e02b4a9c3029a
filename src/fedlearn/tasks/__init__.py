"""Tasks: what is trained and on what. See :class:`~fedlearn.tasks.base.Task`."""

from fedlearn.tasks.base import (
    ClientData,
    Data,
    DataContext,
    EvalContext,
    Task,
    TrainContext,
    TrainResult,
)
from fedlearn.tasks.builtin import array_task, builtin_task
from fedlearn.tasks.loading import load_task

__all__ = [
    "ClientData",
    "Data",
    "DataContext",
    "EvalContext",
    "Task",
    "TrainContext",
    "TrainResult",
    "array_task",
    "builtin_task",
    "load_task",
]
