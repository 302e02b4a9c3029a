"""Sample-level DP-SGD with Opacus: the spec, the ledger's ε, training, and where it runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from fedlearn.config import TrainConfig
from fedlearn.errors import ConfigError
from fedlearn.privacy.dpsgd import DPLedger, parse_dp_sgd, sample_level_epsilon
from fedlearn.runs import RunDir
from fedlearn.sim import SimConfig, config_record, run_simulation
from fedlearn.tasks import Task, array_task
from fedlearn.training import Shard, Trainer, initial_state

pytest.importorskip("opacus")


def blobs(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three separable Gaussian blobs in 8 dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype(np.int64)
    x = (rng.normal(size=(n, 8)) + 3 * np.eye(8)[y]).astype(np.float32)
    return x, y


def task(net: torch.nn.Module | None = None) -> Task:
    x, y = blobs()
    model = net if net is not None else torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return array_task("blobs", lambda: copy.deepcopy(model), (x, y), (x[:40], y[:40]))


CFG = TrainConfig(epochs=2, batch_size=16, optimizer="sgd", lr=0.2)


@pytest.mark.parametrize(("spec", "words"), [
    ("1.0", "NOISE:MAX_GRAD_NORM"), ("a:b", "NOISE:MAX_GRAD_NORM"), ("0:1", "noise"),
    ("1:-1", "max grad norm"), ("1:1:1", "NOISE:MAX_GRAD_NORM"), ("nan:1", "noise")])
def test_bad_specs_get_one_sentence(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        parse_dp_sgd(spec)
    assert str(info.value).count("\n") == 0


def test_delta_must_be_a_probability() -> None:
    with pytest.raises(ConfigError, match="--dp-delta"):
        parse_dp_sgd("1:1", delta=1.5)
    assert parse_dp_sgd(None) is None and parse_dp_sgd("") is None
    spec = parse_dp_sgd("1.1:0.5", delta=1e-6)
    assert spec is not None and (spec.noise_multiplier, spec.max_grad_norm) == (1.1, 0.5)


def test_epsilon_matches_dp_accounting_composed_directly() -> None:
    runs = [(1.1, 16 / 300, 38), (1.1, 16 / 300, 38), (0.8, 0.1, 10)]
    accountant = RdpAccountant([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    for z, q, steps in runs:
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    want = accountant.get_epsilon(1e-5)
    assert sample_level_epsilon(runs, 1e-5) == pytest.approx(want, rel=1e-9)
    # Opacus's own RDP accountant agrees to the third digit.
    from opacus.accountants import RDPAccountant

    ref = RDPAccountant()
    ref.history = [(z, q, s) for z, q, s in runs]
    assert sample_level_epsilon(runs, 1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=2e-3)
    assert sample_level_epsilon([], 1e-5) == 0.0


def test_training_is_reproducible_private_and_composes(tmp_path: Path) -> None:
    t = task()
    x, y = blobs()
    shard = Shard.from_numpy(x, y)
    start = initial_state(t, 0)
    spec = parse_dp_sgd("1.0:1.0")
    first = Trainer(t, dp_sgd=spec).fit(start, shard, CFG, seed=3)
    again = Trainer(t, dp_sgd=spec).fit(start, shard, CFG, seed=3)
    plain = Trainer(t).fit(start, shard, CFG, seed=3)
    for k in first.delta:
        np.testing.assert_array_equal(first.delta[k], again.delta[k])
    assert any(not np.allclose(first.delta[k], plain.delta[k]) for k in first.delta)
    # Poisson batches of expected size 16 from 120 rows: ceil(120/16) = 8 steps an epoch.
    assert first.metrics["dp_steps"] == 16
    eps1 = first.metrics["dp_epsilon"]
    assert eps1 == pytest.approx(sample_level_epsilon([(1.0, 16 / 120, 16)], 1e-5))
    trainer = Trainer(t, dp_sgd=spec)
    trainer.fit(start, shard, CFG, seed=3)
    second = trainer.fit(start, shard, CFG, seed=4)
    assert second.metrics["dp_epsilon"] > eps1  # the same client's rounds compose
    assert trainer.ledger is not None
    path = tmp_path / "ledger.json"
    trainer.ledger.save(path)
    back = DPLedger.load(path)
    assert back.runs == trainer.ledger.runs
    assert back.epsilon(1e-5) == pytest.approx(second.metrics["dp_epsilon"])


def test_more_noise_spends_less_epsilon() -> None:
    t = task()
    x, y = blobs()
    shard = Shard.from_numpy(x, y)
    start = initial_state(t, 0)
    eps = [Trainer(t, dp_sgd=parse_dp_sgd(f"{z}:1.0")).fit(start, shard, CFG, seed=1)
           .metrics["dp_epsilon"] for z in (0.7, 1.5, 4.0)]
    assert eps[0] > eps[1] > eps[2] > 0


def test_batchnorm_gets_a_sentence_naming_the_layer_and_the_fix() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                              torch.nn.ReLU(), torch.nn.Linear(16, 3))
    t = task(net)
    x, y = blobs()
    with pytest.raises(ConfigError, match=r"layer 1 \(BatchNorm1d\).*GroupNorm") as info:
        Trainer(t, dp_sgd=parse_dp_sgd("1:1")).fit(initial_state(t, 0), Shard.from_numpy(x, y),
                                                   CFG, seed=0)
    assert "\n" not in str(info.value)


def test_a_bad_ledger_file_is_refused_in_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"runs": [[1, "x"]]}))
    with pytest.raises(ConfigError, match="not a DP-SGD ledger"):
        DPLedger.load(path)
    assert DPLedger.load(tmp_path / "missing.json").runs == []


def test_simulator_runs_dp_sgd_per_client_and_reports_the_largest_epsilon(
        tmp_path: Path) -> None:
    config = SimConfig(clients=4, per_round=2, rounds=3, engine="vectorized",
                       dataset="blobs", dp_sgd="1.0:1.0", train=CFG)
    lines: list[str] = []
    run_simulation(config, task(), RunDir.create(tmp_path / "r", config_record(config)),
                   log=lines.append)
    assert any("DP-SGD" in line and "sequential" in line for line in lines), lines
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dp_sgd_epsilon_max"] for r in rows]
    assert all(e > 0 for e in eps) and eps == sorted(eps)
    with pytest.raises(ConfigError, match="--dp-sgd"):
        SimConfig(dp_sgd="loud")


def test_a_restarted_client_goes_on_composing_from_its_ledger_file(tmp_path: Path) -> None:
    from fedlearn.client.local import LocalClient
    from fedlearn.tasks.runtime import context

    t = task()
    ledger = tmp_path / "client-0.dpsgd.json"
    spec = parse_dp_sgd("1.0:1.0")
    start = initial_state(t, 0)
    first = LocalClient(t, context(), dp_sgd=spec, ledger_file=str(ledger)).fit(
        start, CFG, seed=1)
    assert ledger.exists()
    restarted = LocalClient(t, context(), dp_sgd=spec, ledger_file=str(ledger))
    second = restarted.fit(start, CFG, seed=2)
    fresh = LocalClient(t, context(), dp_sgd=spec).fit(start, CFG, seed=2)
    assert second.metrics["dp_epsilon"] > first.metrics["dp_epsilon"]
    assert fresh.metrics["dp_epsilon"] == pytest.approx(first.metrics["dp_epsilon"])
