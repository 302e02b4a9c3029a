"""The simulator's round loop: sampling, seeds, the strategy and the run directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedlearn.config import TrainConfig
from fedlearn.data import Dataset, partition
from fedlearn.errors import ConfigError
from fedlearn.models import build_model, get_weights
from fedlearn.runs import RunDir, load_model_file
from fedlearn.seeding import task_seed
from fedlearn.sim import ENGINES, SimConfig, Simulation, config_record, run_simulation
from fedlearn.strategies import sample_clients
from fedlearn.tasks import Task, array_task
from fedlearn.training import Shard, local_update

# Toy-sized tensors train fastest (and steadiest on a busy machine) on one thread.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_dataset(n_train: int = 480, n_test: int = 120, seed: int = 0) -> Dataset:
    """Three learnable classes of 1x4x4 images, as a Dataset."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n).astype(np.int64)
        x = rng.normal(0, 1.0, (n, 1, 4, 4)).astype(np.float32)
        x[:, 0, 0, :] += 1.5 * y[:, None]
        return x, y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return Dataset("toy", xtr, ytr, xte, yte, 3, (1, 4, 4), "test")


def simulate(tmp: Path, engine: str, **overrides: object) -> tuple[dict[str, object], RunDir]:
    values: dict[str, object] = {
        "clients": 8, "per_round": 3, "partition": "dirichlet:0.5", "rounds": 3,
        "engine": engine, "dataset": "toy", "seed": 4,
        "train": TrainConfig(optimizer="sgd", lr=0.1, momentum=0.5, batch_size=16),
    }
    values.update(overrides)
    config = SimConfig(**values)  # type: ignore[arg-type]
    run = RunDir.create(tmp / engine, config_record(config))
    return run_simulation(config, toy_task(), run, log=lambda line: None), run


def toy_task(ds: Dataset | None = None, model: str = "mlp") -> Task:
    """The toy dataset as a task with the built-in model (partitioned as the built-ins are)."""
    data = ds if ds is not None else toy_dataset()
    return array_task(
        data.name, lambda: build_model(model, data.input_shape, data.num_classes, seed=None),
        (data.x_train, data.y_train), (data.x_test, data.y_test), num_classes=data.num_classes)


@pytest.mark.parametrize("engine", ENGINES)
def test_one_round_is_fedavg_of_local_updates(tmp_path: Path, engine: str) -> None:
    """Round 1 by hand: same sample, same task seeds, client-i on part i, weighted mean."""
    ds = toy_dataset()
    cfg = TrainConfig(optimizer="adam", lr=0.01, batch_size=16)
    _, run = simulate(tmp_path, engine, rounds=1, train=cfg)
    model = build_model("mlp", ds.input_shape, 3, seed=4)
    start = get_weights(model)
    parts = partition(ds.y_train, 8, "dirichlet:0.5", 4)
    ids = [f"client-{i}" for i in range(8)]
    sampled = sample_clients(ids, 3 / 8, seed=4, round_number=1)
    assert len(sampled) == 3
    total = 0
    acc = {k: np.zeros_like(v, dtype=np.float64) for k, v in start.items()}
    for cid in sampled:
        shard = Shard.from_numpy(ds.x_train, ds.y_train, parts[int(cid.split("-")[1])])
        res = local_update(model, start, shard, cfg, seed=task_seed(4, 1, cid))
        total += res.num_examples
        for k in acc:
            acc[k] += res.num_examples * res.delta[k].astype(np.float64)
    expected = {k: start[k] + (acc[k] / total).astype(np.float32) for k in start}
    got = load_model_file(run.path / "model.safetensors")
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-5, err_msg=k)
    assert run.read_metrics()[0]["examples"] == total


def test_engines_reach_the_same_model_and_write_the_run(tmp_path: Path) -> None:
    models, accs = [], []
    for engine in ENGINES:
        summary, run = simulate(tmp_path, engine)
        rows = run.read_metrics()
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert all(r["clients"] == 3 and r["examples"] > 0 and r["seconds"] > 0 for r in rows)
        assert {"accuracy", "loss", "train_seconds"} <= set(rows[0])
        assert summary["mode"] == "sim" and summary["engine"] == engine
        assert summary["rounds"] == 3 and summary["clients"] == 8
        assert summary["final_accuracy"] == rows[-1]["accuracy"]
        assert summary["median_round_seconds"] is not None
        on_disk = json.loads((run.path / "summary.json").read_text())
        assert on_disk["engine"] == engine
        assert (run.path / "report.png").exists()
        assert run.read_config()["sim"]["per_round"] == 3
        models.append(load_model_file(run.path / "model.safetensors"))
        accs.append(summary["final_accuracy"])
    assert max(float(np.abs(models[0][k] - models[1][k]).max()) for k in models[0]) < 1e-4
    assert accs[0] == pytest.approx(accs[1], abs=0.01)
    # Three rounds of training learned something (a toy problem a model can solve).
    assert accs[0] > 0.6


#: One spec of every row of the strategy table (its F, BETA and M chosen for 7 updates).
EVERY_STRATEGY = [
    ("fedavg", {}), ("fedavgm", {}), ("fedadam", {}), ("fedyogi", {}), ("fedadagrad", {}),
    ("fedprox", {}), ("scaffold", {}), ("median", {}), ("trimmed-mean:0.2", {}),
    ("krum:1", {}), ("multi-krum:1:4", {}), ("bulyan:1", {}),
    ("norm-bounding", {"clip_norm": 0.5}), ("trimmed-mean:0.2+fedadam", {}),
]


def test_every_strategy_row_is_covered() -> None:
    from fedlearn.strategies import STRATEGY_TABLE

    covered = {spec.split("+")[0].split(":")[0] for spec, _ in EVERY_STRATEGY}
    covered |= {"RULE+OPT"} if any("+" in spec for spec, _ in EVERY_STRATEGY) else set()
    assert {row.name.split(":")[0] for row in STRATEGY_TABLE} <= covered


@pytest.mark.parametrize(("spec", "options"), EVERY_STRATEGY, ids=[s for s, _ in EVERY_STRATEGY])
def test_every_strategy_runs_vectorized_and_matches_sequential(
        tmp_path: Path, spec: str, options: dict[str, float]) -> None:
    """Two rounds with ``--engine vectorized`` reach the sequential engine's model, and the
    vectorized engine ran: the mlp's own (the plain strategies) or, for FedProx's term and
    SCAFFOLD's correction, the torch.func one (README, Strategies), never the fallback."""
    models = {}
    for engine in ENGINES:
        config = SimConfig(clients=8, per_round=7, partition="dirichlet:0.5", rounds=2,
                           engine=engine, dataset="toy", seed=4, strategy=spec,
                           train=TrainConfig(optimizer="sgd", lr=0.1, momentum=0.5,
                                             batch_size=16), **options)  # type: ignore[arg-type]
        run = RunDir.create(tmp_path / engine, config_record(config))
        said: list[str] = []
        summary = run_simulation(config, toy_task(), run, log=said.append)
        on_disk = json.loads((run.path / "summary.json").read_text())
        assert on_disk["engine"] == on_disk["engine_requested"] == engine, said
        assert on_disk["strategy"] == spec and summary["rounds"] == 2
        assert not any("cannot run this" in line for line in said), said
        assert all("failed" not in r for r in run.read_metrics())
        models[engine] = load_model_file(run.path / "model.safetensors")
        if engine == "vectorized":  # which of the two stacked engines: both say "vectorized"
            kind = type(Simulation(config, toy_task(), log=said.append).engine).__name__
            assert kind == ("FunctionalEngine" if spec in ("fedprox", "scaffold")
                            else "VectorizedEngine")
    seq, vec = models["sequential"], models["vectorized"]
    start = get_weights(build_model("mlp", (1, 4, 4), 3, seed=4))
    assert max(float(np.abs(seq[k] - start[k]).max()) for k in seq) > 1e-3  # it trained
    for k in seq:
        np.testing.assert_allclose(vec[k], seq[k], rtol=0, atol=1e-4, err_msg=k)


def test_vectorized_runs_the_cnn_and_matches_sequential(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 40).astype(np.int64)
    ds = Dataset("toy28", x, y, x[:10], y[:10], 10, (1, 28, 28), "test")
    config = SimConfig(clients=2, per_round=2, rounds=1, model="cnn", dataset="toy28",
                       train=TrainConfig(optimizer="sgd", lr=0.01, batch_size=20))
    lines: list[str] = []
    summary = run_simulation(config, toy_task(ds, "cnn"),
                             RunDir.create(tmp_path / "r", config_record(config)),
                             log=lines.append)
    assert summary["engine"] == "vectorized" and summary["engine_requested"] == "vectorized"
    assert len(lines) == 1 and "clients at once" in lines[0], lines
    seq = dataclasses.replace(config, engine="sequential")
    run_simulation(seq, toy_task(ds, "cnn"), RunDir.create(tmp_path / "s", config_record(seq)))
    got, want = (load_model_file(tmp_path / d / "model.safetensors") for d in ("r", "s"))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"clients": 0}, "--clients"),
        ({"per_round": 0}, "--per-round"),
        ({"per_round": 9}, "--per-round"),
        ({"rounds": 0}, "--rounds"),
        ({"engine": "fast"}, "engine"),
        ({"partition": "zipf:2"}, "--partition"),
        ({"partition": "iid:4:0"}, "names one part"),
        ({"strategy": "fedfoo"}, "unknown strategy 'fedfoo'"),
        ({"strategy": "krum:1"}, "needs at least 5 updates a round but --per-round is 3"),
        ({"server_lr": 0.0}, "--server-lr must be a positive number"),
        ({"strategy": "fedavg", "beta1": 0.5}, "--beta1 applies only to"),
        ({"seed": -1}, "--seed"),
    ],
)

def test_bad_config_is_one_clear_config_error(overrides: dict[str, object], words: str) -> None:
    values: dict[str, object] = {"clients": 8, "per_round": 3}
    values.update(overrides)
    with pytest.raises(ConfigError, match=words):
        SimConfig(**values)  # type: ignore[arg-type]


def test_per_round_gives_exactly_that_many_clients() -> None:
    for n in (1, 3, 7, 10, 100, 997, 1000):
        for k in sorted({1, min(2, n), n // 3 or 1, n - 1 or 1, n}):
            cfg = SimConfig(clients=n, per_round=k)
            ids = [f"client-{i}" for i in range(n)]
            assert len(sample_clients(ids, cfg.fraction, seed=0, round_number=1)) == k
