"""The import layering of STYLE.md: lower layers never import the heavy upper ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECKS = [
    ("fedlearn.types", {"torch", "fastapi", "httpx", "fedlearn.cli"}),
    ("fedlearn.weights", {"torch", "fastapi", "httpx", "fedlearn.cli"}),
    ("fedlearn.errors", {"torch", "numpy", "fastapi", "fedlearn.cli"}),
    ("fedlearn.data", {"torch", "fastapi", "httpx", "fedlearn.cli"}),
    ("fedlearn.training", {"fastapi", "httpx", "uvicorn", "fedlearn.cli"}),
    ("fedlearn.models", {"fastapi", "httpx", "fedlearn.cli"}),
    ("fedlearn.privacy", {"torch", "fastapi", "httpx", "fedlearn.cli"}),
    ("fedlearn.strategies", {"torch", "fastapi", "httpx", "fedlearn.cli"}),
    ("fedlearn.attacks", {"torch", "fastapi", "httpx", "fedlearn.cli"}),
    # The coordinators are the server's logic, apart from its HTTP app and the models.
    ("fedlearn.server.coordinator",
     {"fastapi", "starlette", "uvicorn", "httpx", "torch", "fedlearn.cli"}),
    ("fedlearn.server.async_coordinator",
     {"fastapi", "starlette", "uvicorn", "httpx", "torch", "fedlearn.cli"}),
    ("fedlearn.server.sync_secagg",
     {"fastapi", "starlette", "uvicorn", "httpx", "torch", "fedlearn.cli"}),
    ("fedlearn.server.coordinator_base",
     {"fastapi", "starlette", "uvicorn", "httpx", "torch", "fedlearn.cli"}),
    ("fedlearn.server.secagg_round",
     {"fastapi", "starlette", "uvicorn", "httpx", "torch", "fedlearn.cli"}),
    # The client's side of secure aggregation speaks through the worker's remote.
    ("fedlearn.client.secagg", {"fastapi", "starlette", "httpx", "torch", "fedlearn.cli"}),
]


@pytest.mark.parametrize(("module", "forbidden"), CHECKS)
def test_module_does_not_import(module: str, forbidden: set[str]) -> None:
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in {sorted(forbidden)!r} if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_the_web_layer_and_runner_see_one_coordinator_interface() -> None:
    """app.py, secagg_routes.py and runner.py talk to the common base: no mode branches on
    the coordinator's class (a new mode is a subclass, not an isinstance branch)."""
    import ast
    import inspect

    from fedlearn.server import app, runner, secagg_routes
    from fedlearn.server.async_coordinator import AsyncCoordinator
    from fedlearn.server.coordinator import SyncCoordinator
    from fedlearn.server.coordinator_base import Coordinator

    assert issubclass(SyncCoordinator, Coordinator) and issubclass(AsyncCoordinator, Coordinator)
    for module in (app, runner, secagg_routes):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                assert "Coordinator" not in ast.unparse(node), (module.__name__, ast.unparse(node))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        if module is not runner:  # the runner builds one of them for the run's mode
            assert not names & {"SyncCoordinator", "AsyncCoordinator"}, module.__name__
