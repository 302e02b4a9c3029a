"""``fedlearn new NAME``: write a small project that runs as its README says."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer

from fedlearn.cli.common import console
from fedlearn.errors import ConfigError

TASK = '''"""The {name} task: a small network on CSV files (one per client), label column `label`.

Edit `model` and `load` for your own data; see README.md for the commands.
"""

from __future__ import annotations

import numpy as np
from torch import nn

import fedlearn
from fedlearn.data import read_local

FEATURES = 64
CLASSES = 10


def model() -> nn.Module:
    """The network every client trains (the server starts it from a seed)."""
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def load(ctx: fedlearn.DataContext) -> fedlearn.Data:
    """This client's rows of ``--data FILE.csv`` (``--test-fraction`` of them are held out)."""
    if ctx.path is None:
        raise fedlearn.FedlearnError("pass --data FILE.csv (see README.md).")
    table = read_local(ctx.path, label=ctx.label or "label", num_classes=CLASSES)
    return fedlearn.Data(table.x.astype(np.float32), table.y)


task = fedlearn.Task(
    name="{name}",
    model=model,
    data=load,
    num_classes=CLASSES,
    metrics=["accuracy"],
    config={{"optimizer": "adam", "lr": 0.005, "batch_size": 32}},
)
'''

CONFIG = '''# fedlearn server --config fedlearn.toml
task = "task.py:task"

[server]
rounds = 5
min_clients = 3
round_timeout = 120

[client]            # sent to every client with each round's task
epochs = 1
batch_size = 32
optimizer = "adam"
lr = 0.005
'''

README = '''# {name}

A federated-learning project made by `fedlearn new`. `task.py` says what is
trained (`model`) and how a client reads its data (`load`); `data/` holds one
CSV file per client (64 pixel features of scikit-learn's digits and a `label`
column) so everything below runs as written.

Simulate three clients in one process:

```sh
fedlearn sim --task task.py:task --data 'data/client-{{i}}.csv' --label label --test-fraction 0.2 \\
    --clients 3 --per-round 3 --rounds 5
```

A real server and three client processes on this machine:

```sh
fedlearn run --task task.py:task --data 'data/client-{{i}}.csv' --label label --test-fraction 0.2 \\
    --clients 3 --rounds 5
```

The same across machines: the server (settings in `fedlearn.toml`), then on each client
its own file:

```sh
fedlearn server --config fedlearn.toml --port 8080 --out runs/server
fedlearn client --server http://127.0.0.1:8080 --token-file runs/server/join-token \\
    --task task.py:task --data data/client-0.csv --label label --test-fraction 0.2
```

Baselines on one client's data: `fedlearn centralized --task task.py:task --data
data/client-0.csv --label label --test-fraction 0.2`.
'''


def new(
    name: Annotated[str, typer.Argument(help="Folder (and task name) of the new project.")],
    clients: Annotated[int, typer.Option("--clients", help="CSV files to write.")] = 3,
) -> None:
    """Write a small project (task.py, fedlearn.toml, README.md, data/) that runs as written."""
    from sklearn.datasets import load_digits

    folder = Path(name)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} exists and is not empty; pick a new name.")
    if clients < 1:
        raise ConfigError(f"--clients must be at least 1, got {clients}.")
    title = folder.name
    if not title or not all(c.isalnum() or c in "-_." for c in title):
        raise ConfigError(f"project name {title!r} may only hold letters, digits, - _ and .")
    try:
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "task.py").write_text(TASK.format(name=title))
        (folder / "fedlearn.toml").write_text(CONFIG)
        (folder / "README.md").write_text(README.format(name=title))
        digits = load_digits()
        for i in range(clients):
            rows = range(i, len(digits.target), clients)
            with (folder / "data" / f"client-{i}.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow([*(f"p{j}" for j in range(64)), "label"])
                for r in rows:
                    writer.writerow([*(f"{v / 16:.4g}" for v in digits.data[r]),
                                     int(digits.target[r])])
    except OSError as exc:
        raise ConfigError(f"cannot write the project in {folder}: {exc.strerror}.") from exc
    console.print(f"wrote {folder}/ (task.py, fedlearn.toml, README.md, data/ with {clients} "
                  f"CSV files); next: cd {folder} and follow README.md", markup=False,
                  highlight=False)
