"""User-level DP-FedAvg: the private mean, its place in a strategy, the accountant, the runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from fedlearn.config import ServerConfig, TrainConfig, build_strategy, privacy_budget
from fedlearn.errors import ConfigError
from fedlearn.privacy.dp import AdaptiveClip
from fedlearn.privacy.dpfedavg import CLIP_KEY, DPFedAvg, PrivacyBudget, parse_dp_clip
from fedlearn.runs import RunDir, load_model_file
from fedlearn.sim import SimConfig, config_record, run_simulation
from fedlearn.strategies import Update, parse_strategy, state_from_arrays, state_to_arrays
from fedlearn.tasks import builtin_task

LIKE = {"w": np.zeros(3, np.float32), "n": np.zeros((), np.int64)}


def deltas() -> list[dict[str, np.ndarray]]:
    return [{"w": np.array([3.0, 4.0, 0.0], np.float32), "n": np.array(2)},   # norm 5
            {"w": np.array([0.3, 0.0, 0.4], np.float32), "n": np.array(2)}]   # norm 0.5


def test_private_mean_is_clip_sum_noise_over_expected_clients() -> None:
    dp = DPFedAvg(noise_multiplier=0.0, expected_clients=4.0, clip=1.0)
    mean, scalars = dp.mean({}, deltas(), 1, LIKE)
    # (clip(Δ1, 1) + Δ2) / 4 = ([0.6, 0.8, 0] + [0.3, 0, 0.4]) / 4, counters by their mean.
    np.testing.assert_allclose(mean["w"], [0.225, 0.2, 0.1], rtol=1e-6)
    assert mean["w"].dtype == np.float32 and mean["n"].dtype == np.int64 and int(mean["n"]) == 1
    assert scalars == {CLIP_KEY: 1.0}


def test_noise_is_seeded_by_round_and_has_the_calibrated_stddev() -> None:
    dp = DPFedAvg(noise_multiplier=2.0, expected_clients=1.0, clip=0.5, seed=7)
    like = {"w": np.zeros(20000, np.float32)}
    zero = [{"w": np.zeros(20000, np.float32)}]
    a, _ = dp.mean({}, zero, 3, like)
    b, _ = dp.mean({}, zero, 3, like)
    c, _ = dp.mean({}, zero, 4, like)
    np.testing.assert_array_equal(a["w"], b["w"])  # a resumed run draws the same noise
    assert not np.array_equal(a["w"], c["w"])      # each round its own
    assert float(np.std(a["w"])) == pytest.approx(2.0 * 0.5, rel=0.03)
    # A round with no clients (Poisson sampling) releases the noise alone.
    empty, _ = dp.mean({}, [], 3, like)
    np.testing.assert_array_equal(empty["w"], a["w"])


def test_adaptive_clip_moves_towards_the_quantile_and_client_clipping_reads_the_bit() -> None:
    adaptive = AdaptiveClip(target_quantile=0.5, initial_clip_norm=1.0, clipped_count_stddev=1e-9)
    dp = DPFedAvg(noise_multiplier=0.0, expected_clients=2.0, adaptive=adaptive)
    assert dp.init_scalars() == {CLIP_KEY: 1.0}
    # One update of norm 5 is clipped, one of 0.5 is not: b = 1/2 = the target, C stays.
    _, same = dp.mean({CLIP_KEY: 1.0}, deltas(), 1, LIKE)
    assert same[CLIP_KEY] == pytest.approx(1.0)
    big = [{"w": np.array([3.0, 4.0, 0.0], np.float32), "n": np.array(0)}] * 2
    _, up = dp.mean({CLIP_KEY: 1.0}, big, 1, LIKE)
    assert up[CLIP_KEY] == pytest.approx(math.exp(0.2 * 0.5))  # all clipped: C grows
    # Clients that clip send updates of norm exactly C: they count as clipped.
    on_client = dataclasses.replace(dp, clip_on="client")
    assert on_client.client_config({CLIP_KEY: 0.8}) == {"dp_clip": 0.8}
    at_c = [{"w": np.array([0.6, 0.8, 0.0], np.float32), "n": np.array(0)}] * 2
    _, grown = on_client.mean({CLIP_KEY: 1.0}, at_c, 1, LIKE)
    assert grown[CLIP_KEY] > 1.0


def test_the_strategy_runs_the_private_mean_and_keeps_its_clip_in_the_state() -> None:
    adaptive = AdaptiveClip(target_quantile=0.9, initial_clip_norm=1.0, clipped_count_stddev=1.0)
    dp = DPFedAvg(noise_multiplier=1.0, expected_clients=2.0, adaptive=adaptive, seed=3)
    strategy = dataclasses.replace(parse_strategy("fedadam"), dp=dp)
    assert strategy.needs_all
    state = strategy.init(LIKE)
    assert state.scalars[CLIP_KEY] == 1.0
    updates = [Update(d, 10, {}, f"c{i}") for i, d in enumerate(deltas())]
    after = strategy.aggregate(state, updates, num_clients=5)
    assert after.version == 1 and after.scalars[CLIP_KEY] != 1.0
    again = strategy.aggregate(state, updates, num_clients=5)
    np.testing.assert_array_equal(after.weights["w"], again.weights["w"])
    arrays, meta = state_to_arrays(after)
    back = state_from_arrays(arrays, json.loads(json.dumps(meta)))
    assert back.scalars[CLIP_KEY] == after.scalars[CLIP_KEY]
    with pytest.raises(ValueError, match="private mean replaces"):
        dataclasses.replace(parse_strategy("median"), dp=dp)


def test_epsilon_matches_dp_accounting_computed_directly() -> None:
    budget = PrivacyBudget(noise_multiplier=1.1, sampling_rate=0.1, delta=1e-5,
                           sampling="poisson", num_clients=100)
    direct = RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(1.1)), 30)
    assert budget.epsilon(30) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    fixed = dataclasses.replace(budget, sampling="fixed")
    wor = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    wor.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(1.1)), 30)
    assert fixed.epsilon(30) == pytest.approx(wor.get_epsilon(1e-5), rel=1e-9)
    assert budget.epsilon(0) == 0.0 and budget.epsilon(10) < budget.epsilon(30)
    target = dataclasses.replace(budget, target_epsilon=budget.epsilon(30))
    assert target.max_rounds(100) == 30 and target.allows(30) and not target.allows(31)


@pytest.mark.parametrize(("settings", "words"), [
    ({"dp_clip": "1.0"}, "need --dp-noise-multiplier"),
    ({"dp_noise_multiplier": 1.0}, "needs --dp-clip"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "-1"}, "--dp-clip"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "adaptive:2"}, "quantile"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "loud"}, "--dp-clip"),
    ({"dp_noise_multiplier": -1.0, "dp_clip": "1"}, "--dp-noise-multiplier"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "1", "dp_clip_on": "moon"}, "--dp-clip-on"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "1", "strategy": "krum:1"}, "private mean"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "1", "dp_delta": 2.0}, "--dp-delta"),
    ({"dp_noise_multiplier": 0.3, "dp_clip": "1", "dp_target_epsilon": 0.01}, "single round"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "1", "mode": "async", "max_updates": 5},
     "--mode sync"),
])
def test_bad_settings_get_one_sentence(settings: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        config = ServerConfig(min_clients=10, fraction=0.5, **settings)  # type: ignore[arg-type]
        budget = privacy_budget(config, "fixed")
        if budget is not None:
            budget.max_rounds(10)
    assert "\n" not in str(info.value)


def test_server_population_and_sample_size_feed_the_accountant() -> None:
    config = ServerConfig(min_clients=20, fraction=0.25, dp_noise_multiplier=1.0, dp_clip="2")
    budget = privacy_budget(config, "fixed")
    assert budget is not None and budget.num_clients == 20 and budget.sampling_rate == 0.25
    assert budget.delta == pytest.approx(1 / 20)
    dp = build_strategy(config).dp
    assert isinstance(dp, DPFedAvg) and dp.expected_clients == 5 and dp.clip == 2.0
    assert parse_dp_clip("adaptive:0.7")[1] == AdaptiveClip(target_quantile=0.7)


def run(tmp_path: Path, name: str, **settings: object) -> dict[str, object]:
    config = SimConfig(clients=20, per_round=5, rounds=6, dataset="digits", seed=1,
                       dp_noise_multiplier=0.8, dp_clip="1.0",
                       train=TrainConfig(optimizer="sgd", lr=0.1), **settings)  # type: ignore[arg-type]
    lines: list[str] = []
    summary = run_simulation(config, builtin_task("digits", "mlp"),
                             RunDir.create(tmp_path / name, config_record(config)),
                             log=lines.append)
    summary["log"] = lines
    return summary


def test_simulated_dp_run_samples_by_poisson_reports_epsilon_and_is_reproducible(
        tmp_path: Path) -> None:
    first = run(tmp_path, "a")
    again = run(tmp_path, "b")
    rows = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len({r["clients"] for r in rows}) > 1  # Poisson: the count varies round to round
    eps = [r["dp_epsilon"] for r in rows]
    assert eps == sorted(eps) and eps[0] > 0 and rows[0]["dp_delta"] == pytest.approx(1 / 20)
    direct = PrivacyBudget(0.8, 0.25, 1 / 20, "poisson", 20).epsilon(6)
    assert first["dp_epsilon"] == pytest.approx(direct) and first["dp_rounds"] == 6
    a, b = (load_model_file(tmp_path / d / "model.safetensors") for d in ("a", "b"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert again["dp_epsilon"] == first["dp_epsilon"]
    assert any("Poisson sampling" in line for line in first["log"])  # type: ignore[attr-defined]


def test_a_target_epsilon_stops_the_simulation_before_it_is_exceeded(tmp_path: Path) -> None:
    target = PrivacyBudget(0.8, 0.25, 1 / 20, "poisson", 20).epsilon(3) + 1e-9
    summary = run(tmp_path, "t", dp_target_epsilon=target)
    assert summary["rounds"] == 3 and summary["dp_rounds"] == 3
    assert summary["stopped"] == "dp_target_epsilon"
    assert float(summary["dp_epsilon"]) <= target  # type: ignore[arg-type]
