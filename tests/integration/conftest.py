"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli_env
from tests.integration.procs import Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Processes started by the test, each stopped by PID at the end."""
    p = Procs(cli_env(tmp_path), tmp_path / "logs")
    try:
        yield p
    finally:
        p.stop_all()
