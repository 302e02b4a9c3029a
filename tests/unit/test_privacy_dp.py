"""DP-FedAvg pieces: clipping, the fixed-denominator mean, seeded noise, adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlearn.errors import ConfigError, PayloadError
from fedlearn.privacy import (
    AdaptiveClip,
    AdaptiveClipState,
    clip,
    dp_mean,
    effective_noise_multiplier,
    gaussian_noise_like,
    unclipped_bit,
)


def test_clip_scales_to_the_global_norm_and_leaves_integers_alone() -> None:
    delta = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]]),
             "n": np.array(7, np.int64)}
    clipped, norm = clip(delta, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [[0.8]])
    assert clipped["a"].dtype == np.float32 and clipped["n"] == 7
    assert delta["a"][0] == 3.0  # input unchanged


def test_clip_leaves_small_updates_as_they_are() -> None:
    clipped, norm = clip({"a": np.array([0.3, 0.4])}, 1.0)
    assert norm == pytest.approx(0.5)
    np.testing.assert_allclose(clipped["a"], [0.3, 0.4])
    assert unclipped_bit(norm, 1.0) == 1 and unclipped_bit(5.0, 1.0) == 0


def test_dp_mean_without_noise_divides_by_expected_clients() -> None:
    # Two clients' clipped updates summed; expected qN = 4 clients, not the 2 that came.
    total = {"w": np.array([1.0, -2.0])}
    np.testing.assert_allclose(dp_mean(total, 0.0, 4.0, seed=1, round_number=3)["w"],
                               [0.25, -0.5])


def test_dp_mean_adds_the_seeded_noise() -> None:
    total = {"w": np.array([1.0, -2.0, 0.5])}
    noise = gaussian_noise_like(total, 0.7, seed=5, round_number=2)
    mean = dp_mean(total, 0.7, 2.0, seed=5, round_number=2)
    np.testing.assert_allclose(mean["w"], (total["w"] + noise["w"]) / 2.0)


def test_noise_is_deterministic_per_seed_and_round() -> None:
    w = {"b": np.zeros(5, np.float32), "a": np.zeros((2, 3)), "n": np.zeros(2, np.int64)}
    first = gaussian_noise_like(w, 1.0, seed=11, round_number=4)
    again = gaussian_noise_like(dict(reversed(list(w.items()))), 1.0, seed=11, round_number=4)
    for k in w:
        np.testing.assert_array_equal(first[k], again[k])
    assert first["b"].dtype == np.float32
    np.testing.assert_array_equal(first["n"], [0, 0])
    other = gaussian_noise_like(w, 1.0, seed=11, round_number=5)
    assert not np.allclose(first["a"], other["a"])


def test_noise_has_the_requested_spread() -> None:
    noise = gaussian_noise_like({"w": np.zeros(20_000)}, 2.0, seed=0, round_number=0)
    assert noise["w"].std() == pytest.approx(2.0, rel=0.03)


def test_adaptive_clip_update_by_hand() -> None:
    ac = AdaptiveClip(target_quantile=0.5, learning_rate=0.2, clipped_count_stddev=1e-12,
                      initial_clip_norm=1.0)
    state = ac.init()
    # 8 of 10 expected clients unclipped: b̃ = 0.8, so C shrinks by exp(-0.2 * 0.3).
    new = ac.update(state, 8, 10, seed=0, round_number=0)
    assert new.clip_norm == pytest.approx(math.exp(-0.06))
    assert state == AdaptiveClipState(1.0)
    # Centred bits with all 10 reporting give the same b̃.
    centred = ac.update(state, 8, 10, seed=0, round_number=0, num_reports=10)
    assert centred.clip_norm == pytest.approx(new.clip_norm)


def test_adaptive_clip_noise_is_seeded_and_defaults_to_m_over_20() -> None:
    ac = AdaptiveClip(initial_clip_norm=1.0)
    assert ac.count_stddev(100) == 5.0
    a = ac.update(ac.init(), 50, 100, seed=3, round_number=7)
    b = ac.update(ac.init(), 50, 100, seed=3, round_number=7)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 7, 1])))
    b_tilde = (50 + rng.normal(0.0, 5.0)) / 100
    assert a == b
    assert a.clip_norm == pytest.approx(math.exp(-0.2 * (b_tilde - 0.5)))


def test_effective_noise_multiplier_formula() -> None:
    assert effective_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ConfigError):
        effective_noise_multiplier(2.0, 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"target_quantile": 1.5}, {"learning_rate": 0.0}, {"clipped_count_stddev": -1.0},
     {"initial_clip_norm": math.inf}],
)
def test_bad_adaptive_clip_params(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        AdaptiveClip(**kwargs)


def test_bad_clip_and_mean_arguments() -> None:
    with pytest.raises(ConfigError):
        clip({"a": np.ones(2)}, 0.0)
    with pytest.raises(ConfigError):
        dp_mean({"a": np.ones(2)}, 1.0, 0.0, seed=0, round_number=0)
    with pytest.raises(ConfigError):
        gaussian_noise_like({"a": np.ones(2)}, -1.0, seed=0, round_number=0)


def test_clip_refuses_non_finite_updates() -> None:
    with pytest.raises(PayloadError):
        clip({"a": np.array([np.nan, 1.0])}, 1.0)
