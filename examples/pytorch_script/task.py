"""The task of train.py: its model (the server's initial state) and the script to run.

    fedlearn run --task examples/pytorch_script/task.py:task --clients 3 --rounds 5
    fedlearn sim --task examples/pytorch_script/task.py:task --clients 3 --per-round 3 --rounds 5
"""

from pathlib import Path

from net import Net

import fedlearn

task = fedlearn.Task(
    name="digits-script",
    model=Net,
    script=Path(__file__).resolve().parent / "train.py",
    config={"lr": 0.3, "epochs": 1},
)
