"""Turning ``--task path/to/file.py:NAME`` or ``--task package.module:NAME`` into a Task.

The reference is resolved once, at the edge (the CLI or the Python API); everything
below receives the :class:`~fedlearn.tasks.base.Task` object.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from fedlearn.errors import ConfigError
from fedlearn.tasks.base import Task

_LOADED: dict[str, Task] = {}


def _fail(ref: str, why: str) -> ConfigError:
    return ConfigError(f"--task {ref}: {why}.")


def split_ref(ref: str) -> tuple[str, str]:
    """``"file.py:NAME"`` -> (``"file.py"``, ``"NAME"``); the NAME defaults to ``task``."""
    text = ref.strip()
    if not text:
        raise ConfigError("--task is empty; pass path/to/file.py:NAME or package.module:NAME.")
    where, sep, name = text.rpartition(":")
    if not sep or "/" in name or "\\" in name or not name:
        return text, "task"
    return where, name


def _module_from_file(ref: str, path: Path) -> Any:
    if not path.is_file():
        raise _fail(ref, f"the file {path} does not exist; check the path")
    resolved = path.resolve()
    key = "fedlearn_task_" + hashlib.blake2b(str(resolved).encode(), digest_size=6).hexdigest()
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, resolved)
    if spec is None or spec.loader is None:
        raise _fail(ref, f"{path} cannot be imported as Python; name a .py file")
    module = importlib.util.module_from_spec(spec)
    # Like running a script: modules beside the task file can be imported from it.
    folder = str(resolved.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[key]
        raise _fail(ref, f"importing {path} raised {type(exc).__name__}: {exc}") from exc
    return module


def load_task(ref: str) -> Task:
    """The :class:`Task` that ``ref`` names (a Task, or a function with no arguments making one).

    ``ref`` is ``path/to/file.py:NAME`` or ``package.module:NAME`` (NAME defaults to
    ``task``). Any problem -- no such file or module, no such name, the module or
    the function raising, a name that is not a task -- is a ConfigError of one
    sentence.
    """
    where, name = split_ref(ref)
    cache_key = f"{Path(where).resolve() if where.endswith('.py') else where}:{name}"
    if cache_key in _LOADED:
        return _LOADED[cache_key]
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _module_from_file(ref, Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise _fail(ref, f"there is no module {exc.name!r}; give a file path ending in .py "
                        "or an importable module") from exc
        except Exception as exc:
            raise _fail(ref, f"importing {where} raised {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, name):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, Task))
        hint = f"tasks defined there: {', '.join(found)}" if found else "it defines no Task"
        raise _fail(ref, f"{where} has no attribute {name!r} ({hint})")
    obj = getattr(module, name)
    if not isinstance(obj, Task) and callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise _fail(ref, f"calling {name}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Task):
        raise _fail(ref, f"{name} is a {type(obj).__name__}, not a fedlearn.Task")
    _LOADED[cache_key] = obj
    return obj
