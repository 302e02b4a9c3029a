"""Aggregation rules on tiny deltas whose answers can be worked out by hand."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import numpy as np
import pytest

from fedlearn.strategies.base import Update, integer_mean
from fedlearn.strategies.robust import (
    NotEnoughUpdatesError,
    Rule,
    bulyan,
    clip_norm,
    krum,
    krum_select,
    mean,
    median,
    trimmed_mean,
)
from fedlearn.types import Weights


def upd(a: list[float], n: int = 1, count: int = 0) -> Update:
    """A delta with a float array ``a`` and a 0-d int64 counter."""
    return Update({"a": np.array(a, np.float32), "count": np.array(count, np.int64)}, n)


# Five deltas; per coordinate the values are [1, 2, 3, 4, 100] and [-6, 0, 9, 3, 2].
FIVE = [upd([1, -6]), upd([2, 0]), upd([3, 9]), upd([4, 3]), upd([100, 2])]


def test_mean_is_example_weighted() -> None:
    out = mean([upd([1, 2], n=1), upd([4, -1], n=2)])
    assert out["a"].tolist() == [3.0, 0.0]  # (1*1 + 2*4)/3, (1*2 + 2*-1)/3
    assert out["a"].dtype == np.float32


def test_mean_unweighted_ignores_examples() -> None:
    out = mean([upd([1, 2], n=1), upd([4, -1], n=2)], weighted=False)
    assert out["a"].tolist() == [2.5, 0.5]


def test_median_of_five() -> None:
    out = median(FIVE)
    assert out["a"].tolist() == [3.0, 2.0]  # sorted: [1,2,3,4,100], [-6,0,2,3,9]
    assert out["a"].dtype == np.float32


def test_median_of_an_even_count_averages_the_middle_two() -> None:
    assert median(FIVE[:4])["a"].tolist() == [2.5, 1.5]  # [1,2,3,4], [-6,0,3,9]


def test_trimmed_mean_of_five() -> None:
    # beta 0.2: int(0.2*5) = 1 cut from each end -> mean(2,3,4), mean(0,2,3)
    out = trimmed_mean(FIVE, 0.2)
    assert out["a"][0] == pytest.approx(3.0)
    assert out["a"][1] == pytest.approx(5 / 3)
    # beta 0.4: 2 cut from each end -> the median
    assert trimmed_mean(FIVE, 0.4)["a"].tolist() == [3.0, 2.0]
    # beta 0.1: int(0.5) = 0 cut -> the plain (unweighted) mean
    assert trimmed_mean(FIVE, 0.1)["a"][0] == pytest.approx(22.0)


def test_trimmed_mean_rejects_beta_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        trimmed_mean(FIVE, 0.5)


# Seven deltas, one an outlier. Float arrays "a" and "b" hold x and -x, so Krum's
# flattened squared distance is 2 * (x_i - x_j)^2 and the ranking is that of x.
XS = [1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 100.0]


def seven(nums: list[int] | None = None) -> list[Update]:
    nums = nums or [1] * len(XS)
    return [Update({"a": np.array([x], np.float32), "b": np.array([-x], np.float64),
                    "count": np.array(i, np.int64)}, n)
            for i, (x, n) in enumerate(zip(XS, nums, strict=True))]


def test_krum_picks_the_most_central_honest_delta() -> None:
    # f=1: each score sums the 7-1-2 = 4 smallest of 2*(x_i - x_j)^2 over j != i.
    # x=1: 1+4+9+16=30; 2: 1+1+4+9=15; 3: 4+1+1+4=10; 4: 1+1+4+9=15; 5: 1+4+4+9=18;
    # 7: 4+9+16+25=54; 100: huge (all halved here) -> x=3 wins.
    assert krum_select(seven(), f=1, m=7) == [2, 1, 3, 4, 0, 5, 6]
    out = krum(seven(), f=1)
    assert out["a"].tolist() == [3.0]
    assert out["b"].tolist() == [-3.0]
    assert out["a"].dtype == np.float32 and out["b"].dtype == np.float64


def test_multi_krum_averages_the_best_m_by_examples() -> None:
    # The three lowest scores are x=3 (10), then x=2 and x=4 (15, tie kept in order).
    nums = [1, 1, 2, 3, 1, 1, 1]  # x=2 has 1 example, x=3 has 2, x=4 has 3
    out = krum(seven(nums), f=1, m=3)
    assert out["a"][0] == pytest.approx((2 * 1 + 3 * 2 + 4 * 3) / 6)
    assert out["b"][0] == pytest.approx(-(2 * 1 + 3 * 2 + 4 * 3) / 6)


def test_bulyan_selects_and_averages_around_the_median() -> None:
    # n=7, f=1: theta=5 picked by repeated Krum, beta=3 averaged per coordinate.
    # Krum on all seven picks 3; on {1,2,4,5,7,100} (3 neighbours) 2, 4 and 5 tie at 14,
    # the first (2) wins; on {1,4,5,7,100} (2 neighbours) 5 (score 5); on {1,4,7,100}
    # 1, 4, 7 tie at 9, 1 wins; on {4,7,100} 4. Selected [3,2,5,1,4], median 3, the
    # three closest to it are 3, 2, 4 -> 3. The outlier is never selected.
    out = bulyan(seven(), f=1)
    assert out["a"].tolist() == [3.0]
    assert out["b"].tolist() == [-3.0]


@pytest.mark.parametrize(("call", "needed"), [
    (lambda u: krum(u, f=1), "krum (f=1) needs at least 5 updates (n >= 2f+3)"),
    (lambda u: krum(u, f=1, m=2), "krum (f=1) needs at least 5 updates (n >= 2f+3)"),
    (lambda u: bulyan(u, f=1), "bulyan (f=1) needs at least 7 updates (n >= 4f+3)"),
    (lambda u: median(u[:0]), "median needs at least 1 update "),
    (lambda u: mean(u[:0]), "mean needs at least 1 update "),
    (lambda u: trimmed_mean(u[:0], 0.1), "trimmed mean (beta 0.1) needs at least 1 update "),
])
def test_too_few_updates_say_what_is_needed(
        call: Callable[[list[Update]], Weights], needed: str) -> None:
    with pytest.raises(NotEnoughUpdatesError, match=re.escape(needed)) as err:
        call(seven()[:4])
    assert isinstance(err.value, ValueError)
    assert "but the round has" in str(err.value)


def test_bulyan_with_six_updates_and_f1_is_refused() -> None:
    with pytest.raises(NotEnoughUpdatesError, match="at least 7 updates"):
        bulyan(seven()[:6], f=1)


def test_multi_krum_m_larger_than_n_is_refused() -> None:
    with pytest.raises(NotEnoughUpdatesError, match="m=8"):
        krum(seven(), f=1, m=8)


def test_clip_norm_scales_to_the_bound_and_returns_the_norm() -> None:
    delta: Weights = {"a": np.array([3.0, 0.0], np.float32), "b": np.array(4.0, np.float64),
                      "count": np.array(7, np.int64)}
    clipped, norm = clip_norm(delta, 1.0)
    assert norm == pytest.approx(5.0)  # integer arrays are not part of the norm
    assert clipped["a"].tolist() == pytest.approx([0.6, 0.0])
    assert float(clipped["b"]) == pytest.approx(0.8)
    assert clipped["b"].shape == () and isinstance(clipped["b"], np.ndarray)
    assert int(clipped["count"]) == 7
    assert clipped["a"].dtype == np.float32


def test_clip_norm_below_the_bound_is_a_copy() -> None:
    delta: Weights = {"a": np.array([3.0, 4.0], np.float32)}
    clipped, norm = clip_norm(delta, 10.0)
    assert norm == pytest.approx(5.0)
    assert clipped["a"].tolist() == [3.0, 4.0]
    assert not np.shares_memory(clipped["a"], delta["a"])


def test_clip_norm_of_zero_delta() -> None:
    clipped, norm = clip_norm({"a": np.zeros(2, np.float32)}, 1.0)
    assert norm == 0.0 and clipped["a"].tolist() == [0.0, 0.0]


ALL_RULES = [Rule("mean"), Rule("mean", weighted=False), Rule("median"),
             Rule("trimmed-mean", beta=0.2), Rule("krum", f=1), Rule("multi-krum", f=1, m=3),
             Rule("bulyan", f=1)]


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.spec)
def test_integer_arrays_take_the_rounded_example_weighted_mean(rule: Rule) -> None:
    # counts 0..6 with examples [1,1,2,3,1,1,1]: (0+1+4+9+4+5+6)/10 = 2.9 -> 3
    out = rule.apply(seven([1, 1, 2, 3, 1, 1, 1]))
    assert out["count"].dtype == np.int64 and out["count"].shape == ()
    assert isinstance(out["count"], np.ndarray)
    assert int(out["count"]) == 3


def test_integer_mean_rounds_ties_to_even() -> None:
    assert int(integer_mean([upd([0], count=1), upd([0], count=2)])["count"]) == 2  # 1.5
    assert int(integer_mean([upd([0], count=1), upd([0], count=4)])["count"]) == 2  # 2.5


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.spec)
def test_rules_change_nothing_they_are_given(rule: Rule) -> None:
    updates = seven([1, 1, 2, 3, 1, 1, 1])
    before = copy.deepcopy(updates)
    out = rule.apply(updates)
    for u, b in zip(updates, before, strict=True):
        for k in b.delta:
            assert np.array_equal(u.delta[k], b.delta[k]) and u.delta[k].dtype == b.delta[k].dtype
            assert not np.shares_memory(out[k], u.delta[k])


def test_clip_norm_changes_nothing_it_is_given() -> None:
    delta: Weights = {"a": np.array([3.0, 4.0], np.float32)}
    clip_norm(delta, 1.0)
    assert delta["a"].tolist() == [3.0, 4.0]


def test_rule_spec_round_trips_the_parameters() -> None:
    assert [r.spec for r in ALL_RULES] == [
        "mean", "mean", "median", "trimmed-mean:0.2", "krum:1", "multi-krum:1:3", "bulyan:1"]
    assert [r.streams for r in ALL_RULES] == [True, False, False, False, False, False, False]
