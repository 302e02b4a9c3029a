"""Bringing your own task: `fedlearn new`, the Python API, and every bad input of it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import cli_env, run_cli

pytestmark = pytest.mark.slow


def test_fedlearn_new_writes_a_project_that_runs_as_its_readme_says(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    made = run_cli(["new", "clinic"], env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    project = tmp_path / "clinic"
    readme = (project / "README.md").read_text()
    assert "fedlearn sim --task task.py:task" in readme
    data = ["--data", "data/client-{i}.csv", "--label", "label", "--test-fraction", "0.2"]
    sim = run_cli(["sim", "--task", "task.py:task", *data, "--clients", "3", "--per-round", "3",
                   "--rounds", "3", "--out", "sim"], env, cwd=project)
    assert sim.returncode == 0, sim.stdout + sim.stderr
    run = run_cli(["run", "--task", "task.py:task", *data, "--clients", "3", "--rounds", "3",
                   "--out", "run"], env, cwd=project, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [json.loads(line) for line in (project / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["fed_accuracy"] > 0.8
    again = run_cli(["new", "clinic"], env, cwd=tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr


API_SCRIPT = """
import asyncio, sys, threading
import numpy as np
from sklearn.datasets import load_digits
from torch import nn
import fedlearn

digits = load_digits()
x = (digits.data / 16.0).astype(np.float32)
y = digits.target.astype(np.int64)
task = fedlearn.array_task(
    "digits-api", lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
    (x[:1500], y[:1500]), (x[1500:], y[1500:]), num_classes=10,
    config={"optimizer": "adam", "lr": 0.01})
OUT = sys.argv[1]


def federate():
    history = fedlearn.simulate(task, clients=3, rounds=3, partition="iid",
                                out=OUT + "/sim")
    ready = threading.Event()
    found = {}

    def on_ready(url, token):
        found.update(url=url, token=token)
        ready.set()

    def client(i):
        ready.wait(60)
        fedlearn.run_client(task, server=found["url"], token=found["token"],
                            client_id=f"client-{i}", partition=f"iid:2:{i}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    served = fedlearn.serve(task, rounds=2, min_clients=2, port=0, out=OUT + "/serve",
                            ready=on_ready)
    for t in threads:
        t.join(60)
    return history, served


if sys.argv[2] == "asyncio":
    async def main():
        return federate()
    history, served = asyncio.run(main())
else:
    history, served = federate()
print(history.metric("accuracy")[-1], served.metric("accuracy")[-1], len(served.records))
"""


@pytest.mark.parametrize("how", ["script", "asyncio"])
def test_python_api_from_a_script_and_from_a_running_event_loop(
    tmp_path: Path, how: str,
) -> None:
    script = tmp_path / "api.py"
    script.write_text(textwrap.dedent(API_SCRIPT))
    res = subprocess.run([sys.executable, str(script), str(tmp_path), how], capture_output=True,
                         text=True, timeout=300, env=cli_env(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    sim_acc, served_acc, rounds = res.stdout.split()
    assert float(sim_acc) > 0.8 and float(served_acc) > 0.7 and rounds == "2"


def write_task(tmp: Path, body: str, name: str = "mytask") -> str:
    path = tmp / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:task"


GOOD_TASK = """
from torch import nn
import fedlearn
task = fedlearn.Task(name="scans", num_classes=3, reader={"image_size": (8, 8), "channels": 1},
                     model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
tab = fedlearn.Task(name="tab", num_classes=2,
                    model=lambda: nn.Sequential(nn.Linear(2, 2)))
"""


def images(folder: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    for cls, shapes in sizes.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for j, shape in enumerate(shapes):
            Image.fromarray(np.zeros(shape, np.uint8)).save(folder / cls / f"{j}.png")
    return folder


@pytest.mark.parametrize(("case", "words"), [
    ("no-file", "does not exist"),
    ("no-attribute", "has no attribute 'nope'"),
    ("factory-raises", "model factory raised RuntimeError"),
    ("empty-folder", "empty"),
    ("class-without-images", "no images"),
    ("mixed-sizes", "differ in size"),
    ("csv-no-label", "label"),
    ("csv-text-feature", "city"),
    ("labels-outside", "outside the task's classes"),
    ("no-cuda", "--device cuda"),
])
def test_bad_task_or_data_is_one_sentence_and_nothing_runs(
    tmp_path: Path, case: str, words: str,
) -> None:
    env = cli_env(tmp_path)
    good = write_task(tmp_path, GOOD_TASK)
    tab = good.replace(":task", ":tab")
    out = tmp_path / "out"
    args = {
        "no-file": ["--task", str(tmp_path / "missing.py") + ":task"],
        "no-attribute": ["--task", good.replace(":task", ":nope")],
        "factory-raises": ["--task", write_task(tmp_path, """
            import fedlearn
            def boom():
                raise RuntimeError("no weights here")
            task = fedlearn.Task(name="x", model=boom)
            """, "boom")],
        "empty-folder": ["--task", good, "--data", str(images(tmp_path / "empty", {}))],
        "class-without-images": ["--task", good, "--data",
                                 str(images(tmp_path / "imgs", {"a": [(8, 8)], "b": []}))],
        "mixed-sizes": ["--task", write_task(tmp_path, """
            from torch import nn
            import fedlearn
            task = fedlearn.Task(name="s", model=lambda: nn.Linear(4, 2), num_classes=2)
            """, "nosize"),
            "--data", str(images(tmp_path / "mix", {"a": [(8, 8)], "b": [(9, 9)]}))],
        "csv-no-label": ["--task", tab, "--data", str(tmp_path / "t.csv"), "--label", "y"],
        "csv-text-feature": ["--task", tab, "--data", str(tmp_path / "t.csv"), "--label", "y"],
        "labels-outside": ["--task", tab, "--data", str(tmp_path / "t.csv"), "--label", "y"],
        "no-cuda": ["--task", good, "--data", str(images(tmp_path / "ok", {"a": [(8, 8)]})),
                    "--device", "cuda"],
    }[case]
    rows = {"csv-no-label": "a,b,c\n1,2,0\n", "csv-text-feature": "a,city,y\n1,Oslo,0\n",
            "labels-outside": "a,b,y\n1,2,0\n3,4,7\n"}
    (tmp_path / "t.csv").write_text(rows.get(case, "a,b,y\n1,2,0\n"))
    res = run_cli(["centralized", *args, "--epochs", "1", "--out", str(out)], env)
    assert res.returncode in (2, 3), res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    message = res.stderr.strip()
    assert message.startswith("error:") and words in message, message
    assert not out.exists()


def test_a_client_with_another_task_is_refused_at_registration(tmp_path: Path) -> None:
    from tests.integration.procs import Procs, endpoint

    env = cli_env(tmp_path)
    procs = Procs(env, tmp_path / "logs")
    try:
        run_dir = tmp_path / "run"
        procs.start("server", ["server", "--port", "0", "--dataset", "digits", "--rounds", "1",
                               "--min-clients", "1", "--out", str(run_dir)])
        url = endpoint(run_dir)["url"]
        other = write_task(tmp_path, """
            from torch import nn
            import fedlearn
            from fedlearn.tasks import builtin_task
            base = builtin_task("digits", "mlp")
            task = fedlearn.Task(name=base.name, data=base.data, num_classes=10,
                                 model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
            """, "other")
        res = run_cli(["client", "--server", url, "--token-file", str(run_dir / "join-token"),
                       "--task", other, "--partition", "iid:1:0", "--max-retries", "0"], env)
        assert res.returncode != 0
        assert "differs from the server's" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        procs.stop_all()
