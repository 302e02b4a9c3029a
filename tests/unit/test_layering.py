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
