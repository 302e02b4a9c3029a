"""Choosing a backend: flag checks, the message without Ray, and how clients are chunked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlearn.errors import ConfigError
from fedlearn.sim import ClientTask, SimConfig
from fedlearn.sim.ray_backend import balanced_chunks


def test_without_ray_backend_ray_says_how_to_install_it_in_one_line(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None\n"
            "from fedlearn.cli.main import main\n"
            "sys.argv = ['fedlearn', 'sim', '--dataset', 'digits', '--backend', 'ray', "
            f"'--out', {str(tmp_path / 'run')!r}]\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'fedlearn[ray]'" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()


def test_simulate_without_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedlearn

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedlearn\[ray\]'"):
        fedlearn.simulate(fedlearn.builtin_task("digits", "mlp"), clients=2, backend="ray")


@pytest.mark.parametrize(("overrides", "words"), [
    ({"backend": "spark"}, "unknown --backend"),
    ({"ray_workers": 2}, "--ray-workers applies to --backend ray"),
    ({"ray_address": "auto", "ray_timeout": 5.0}, "--ray-address, --ray-timeout applies"),
    ({"backend": "ray", "ray_workers": 0}, "--ray-workers must be at least 1"),
    ({"backend": "ray", "ray_cpus_per_worker": 0.0}, "--ray-cpus-per-worker must be positive"),
    ({"backend": "ray", "ray_gpus_per_worker": -1.0}, "--ray-gpus-per-worker must be 0"),
    ({"backend": "ray", "ray_timeout": 0.0}, "--ray-timeout must be positive"),
    ({"backend": "ray", "dp_sgd": "1.1:1.0"}, "--dp-sgd keeps each client's privacy ledger"),
])
def test_bad_placement_is_one_config_error(overrides: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        SimConfig(dataset="digits", **overrides)  # type: ignore[arg-type]


def tasks(sizes: list[int]) -> list[ClientTask]:
    return [ClientTask(f"client-{i}", np.arange(n, dtype=np.int64), i)
            for i, n in enumerate(sizes)]


def test_chunks_cover_every_client_once_and_balance_steps() -> None:
    clients = tasks([320, 32, 32, 160, 160, 64, 1])
    chunks = balanced_chunks(clients, 2, batch_size=32)
    assert sorted(i for c in chunks for i in c) == list(range(len(clients)))
    steps = [sum(-(-len(clients[i].indices) // 32) for i in c) for c in chunks]
    assert sum(steps) == 25 and abs(steps[0] - steps[1]) <= 1
    assert all(c == sorted(c) for c in chunks)


def test_never_more_chunks_than_clients() -> None:
    assert balanced_chunks(tasks([10, 10]), 8, batch_size=4) == [[0], [1]]
    assert balanced_chunks(tasks([10, 10, 10]), 1, batch_size=4) == [[0, 1, 2]]


def test_ray_is_imported_only_when_a_ray_run_starts() -> None:
    code = ("import sys, fedlearn.sim, fedlearn.sweep, fedlearn.cli.main\n"
            "print('ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"
