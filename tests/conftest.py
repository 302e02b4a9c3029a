"""Shared helpers: run the real ``fedlearn`` CLI in a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment with no network, an empty data cache and no system datasets."""
    empty = tmp_path / "no-system-data"
    empty.mkdir(exist_ok=True)
    env = dict(os.environ)
    env.update({
        "FEDLEARN_OFFLINE": "1",
        "FEDLEARN_DATA": str(tmp_path / "data-cache"),
        "FEDLEARN_SYSTEM_DATA": str(empty),
        "FEDLEARN_HOME": str(tmp_path / "fedlearn-home"),
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
    })
    env.update(extra)
    return env


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = 240, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``fedlearn ARGS`` as a user would run it; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "fedlearn.cli.main", *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )


FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for the test (toy-sized tensors train fastest, and steadiest on
    a busy machine, that way; an in-process simulation then trains as each HTTP client does).
    Use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
