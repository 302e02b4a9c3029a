"""The W2 workloads and the contenders beside the engines: the plain-loop floor, centralized.

Shared by ``w2_hundred_clients.py`` (which times them against the simulator's
engines); seeded, and the same on CPU and GPU.
"""

from __future__ import annotations

import time
from typing import Any

PARTITION = "dirichlet:0.5"
LR = 0.05
BATCH = 32
SEED = 0
RANDOM_CIFAR = "random data of CIFAR-10's shape"


def sync(device: str) -> None:
    """Wait for queued GPU work, so a clock read after it measures it."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_cifar() -> Any:
    """Random data of CIFAR-10's shape, normalised as the real one would be (seed 0)."""
    import numpy as np

    from fedlearn.data.datasets import Dataset

    rng = np.random.default_rng(SEED)

    def images(n: int) -> Any:
        pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        return ((pixels.astype(np.float32) / 255.0) - 0.5) / 0.5

    x_train = images(50_000)
    y_train = rng.integers(0, 10, 50_000).astype(np.int64)
    x_test = images(10_000)
    y_test = rng.integers(0, 10, 10_000).astype(np.int64)
    return Dataset(name="cifar10-shaped-random", x_train=x_train, y_train=y_train,
                   x_test=x_test, y_test=y_test, num_classes=10, input_shape=(3, 32, 32),
                   source=f"{RANDOM_CIFAR} (seed {SEED}, built by the benchmark)")


def workload(model: str) -> tuple[Any, Any, str]:
    """(dataset, task, what the data is) for ``model``; the task's model is ``model``."""
    from fedlearn.data import load_dataset
    from fedlearn.errors import DatasetNotFoundError
    from fedlearn.tasks import array_task, builtin_task

    if model != "cifar-cnn":
        return load_dataset("fashion-mnist"), builtin_task("fashion-mnist", model), \
            "Fashion-MNIST"
    try:
        return load_dataset("cifar10", download=False), builtin_task("cifar10", model), \
            "CIFAR-10"
    except DatasetNotFoundError:
        pass
    from fedlearn.models import build_model

    ds = random_cifar()
    task = array_task("cifar10-shaped-random/cifar-cnn",
                      lambda: build_model("cifar-cnn", (3, 32, 32), 10, seed=None),
                      (ds.x_train, ds.y_train), (ds.x_test, ds.y_test), num_classes=10)
    return ds, task, RANDOM_CIFAR

class PlainLoop:
    """The floor: bare PyTorch, the same model, sampled clients and data order, no framework."""

    name = "floor"

    def __init__(self, ds: Any, task: Any, clients: int, per_round: int, device: str) -> None:
        import torch

        from fedlearn.data import partition
        from fedlearn.training import Shard, build_task_model

        self.device = device
        # Data and model move to the device once, as the engines' do.
        train, test = Shard.from_numpy(ds.x_train, ds.y_train), Shard.from_numpy(
            ds.x_test, ds.y_test)
        self.x, self.y = train.x.to(device), train.y.to(device)
        self.x_test, self.y_test = test.x.to(device), test.y.to(device)
        self.parts = partition(ds.y_train, clients, PARTITION, SEED)
        self.ids = [f"client-{i}" for i in range(clients)]
        self.fraction = per_round / clients
        self.model = build_task_model(task, SEED).to(device)
        self.current: dict[str, torch.Tensor] = {
            k: v.clone() for k, v in self.model.state_dict().items()}

    def run_round(self, rnd: int) -> dict[str, Any]:
        """Train the round's clients one after another, average, evaluate."""
        import torch
        import torch.nn.functional as F

        from fedlearn.seeding import task_seed
        from fedlearn.strategies import sample_clients
        from fedlearn.training import epoch_orders

        t0 = time.perf_counter()
        model, x, y = self.model, self.x, self.y
        total = {k: torch.zeros_like(v) for k, v in self.current.items()}
        examples = 0
        for cid in sample_clients(self.ids, self.fraction, seed=SEED, round_number=rnd):
            idx = self.parts[int(cid.split("-")[1])]
            perm = epoch_orders(len(idx), 1, task_seed(SEED, rnd, cid))[0]
            order = torch.from_numpy(idx[perm]).to(self.device)
            model.load_state_dict(self.current)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            for start in range(0, len(order), BATCH):
                b = order[start : start + BATCH]
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    total[k].add_(v, alpha=len(idx))
            examples += len(idx)
        sync(self.device)
        train_seconds = time.perf_counter() - t0
        self.current = {k: v / examples for k, v in total.items()}
        model.load_state_dict(self.current)
        with torch.no_grad():
            logits = torch.cat([model(self.x_test[i : i + 1000])
                                for i in range(0, len(self.x_test), 1000)])
            accuracy = float((logits.argmax(1) == self.y_test).float().mean())
            test_loss = float(F.cross_entropy(logits, self.y_test))
        return {"round": rnd, "accuracy": accuracy, "loss": test_loss,
                "seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
                "examples": examples}


class Centralized:
    """Plain centralized training at batch 32 (``train_epochs``), in slices of the train set."""

    name = "centralized"

    def __init__(self, ds: Any, task: Any, device: str, rows_per_round: int = 6400) -> None:
        import numpy as np

        from fedlearn.config import TrainConfig
        from fedlearn.training import build_task_model, make_optimizer

        self.ds = ds
        self.device = device
        self.cfg = TrainConfig(epochs=1, batch_size=BATCH, optimizer="sgd", lr=LR)
        self.model = build_task_model(task, SEED).to(device)
        self.opt = make_optimizer(self.model, self.cfg)
        self.order = np.random.default_rng(SEED).permutation(ds.train_size)
        self.size = rows_per_round

    def run_round(self, rnd: int) -> dict[str, Any]:
        """One slice of ``rows_per_round`` images (the next one each round)."""
        from fedlearn.training import Shard, train_epochs

        start = ((rnd - 1) * self.size) % (self.ds.train_size - self.size)
        shard = Shard.from_numpy(self.ds.x_train, self.ds.y_train,
                                 self.order[start : start + self.size])
        t0 = time.perf_counter()
        train_epochs(self.model, shard, self.cfg, seed=rnd, optimizer=self.opt,
                     device=self.device)
        sync(self.device)
        seconds = time.perf_counter() - t0
        return {"round": rnd, "seconds": seconds, "train_seconds": seconds,
                "examples": len(shard), "accuracy": float("nan")}
