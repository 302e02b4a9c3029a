"""An update as a secure-aggregation vector: the client's own checks, the sum's meaning,
the server's bounds, and quantisation in a wide ring."""

from __future__ import annotations

import numpy as np
import pytest

from fedlearn.errors import PayloadError
from fedlearn.privacy import quantize
from fedlearn.privacy.secagg_update import (
    UpdateLayout,
    check_sum,
    checked_values,
    client_vector,
    clip_range,
    decode_sum,
)
from fedlearn.types import Weights
from fedlearn.weights import RunningSum, spec_of

CURRENT: Weights = {"b": np.zeros(2, np.float32), "a": np.ones((2, 2), np.float32),
                    "n": np.array(7, np.int64)}
SPEC = spec_of(CURRENT)
LAYOUT = UpdateLayout.of(SPEC)


def delta(scale: float = 0.1, steps: int = 3) -> Weights:
    return {"b": np.full(2, scale, np.float32), "a": np.full((2, 2), -scale, np.float32),
            "n": np.array(steps, np.int64)}


def vector(d: Weights, n: int, scale: float, loss: float | None = 0.5,
           limit: float = 10.0) -> np.ndarray:
    values = checked_values(LAYOUT, SPEC, d, CURRENT, num_examples=n, norm_limit=limit)
    return client_vector(values, num_examples=n, example_scale=scale, train_loss=loss,
                         clip=clip_range(limit))


def test_layout_is_name_ordered_and_round_trips() -> None:
    assert LAYOUT.names == ("a", "b", "n") and LAYOUT.size == 7 and LAYOUT.dimension == 12
    back = LAYOUT.unflatten(LAYOUT.flatten(delta()))
    for k, v in delta().items():
        np.testing.assert_array_equal(back[k], v.astype(np.float64))


def test_the_sum_of_vectors_is_fedavgs_running_sum() -> None:
    d1, d2 = delta(0.1, 3), delta(-0.3, 5)
    total = vector(d1, 10, 40.0, loss=0.2) + vector(d2, 40, 40.0, loss=None)
    summed = decode_sum(LAYOUT, total, 2)
    assert summed.weight == pytest.approx(1.25) and summed.examples(40.0) == 50
    assert summed.train_loss() == pytest.approx(0.2)  # only the client that reported one
    plain = RunningSum()
    plain.add(d1, 10.0)
    plain.add(d2, 40.0)
    dtypes = {k: v.dtype for k, v in CURRENT.items()}
    ours = RunningSum.of_sum(summed.sums, summed.weight, 2, dtypes).mean()
    for k, v in plain.mean().items():
        np.testing.assert_allclose(ours[k], v, rtol=1e-6)
        assert ours[k].dtype == v.dtype
    assert check_sum(summed, dtypes, norm_limit=10.0, tolerance=1e-9) is None


def test_a_client_weighs_at_most_the_round_scale() -> None:
    assert vector(delta(), 80, 40.0)[LAYOUT.size] == 1.0


@pytest.mark.parametrize(("bad", "words"), [
    ({**delta(), "b": np.array([np.nan, 0], np.float32)}, "NaN"),
    ({**delta(), "b": np.zeros(3, np.float32)}, "shape"),
    ({k: v for k, v in delta().items() if k != "n"}, "missing n"),
    ({**delta(), "a": np.zeros((2, 2), np.float64)}, "dtype"),
    (delta(20.0), "--max-update-norm"),
    (delta(0.1, steps=50), "outside the secure aggregation range"),
])
def test_a_client_refuses_an_update_the_server_would_refuse(bad: Weights, words: str) -> None:
    with pytest.raises(PayloadError, match=words):
        checked_values(LAYOUT, SPEC, bad, CURRENT, num_examples=10, norm_limit=10.0)


def test_a_client_refuses_no_examples() -> None:
    with pytest.raises(PayloadError, match="num_examples"):
        checked_values(LAYOUT, SPEC, delta(), CURRENT, num_examples=0, norm_limit=10.0)


@pytest.mark.parametrize(("tail", "words"), [
    ((0.0, 0.0, 0.0, 1.0, 0.0), "not a positive number"),
    ((3.5, 0.0, 0.0, 1.0, 0.0), "more than one per client"),
    ((1.0, 0.5, 1.5, 1.0, 0.0), "train-loss weights"),
    ((1.0, 0.0, 0.0, 0.0, 0.0), "example weights of the sum"),
    ((1.0, 0.0, 0.0, 1.0, 2.5), "unclipped count"),
])
def test_the_server_refuses_sums_no_honest_clients_make(tail: tuple[float, ...],
                                                        words: str) -> None:
    total = np.concatenate([np.zeros(LAYOUT.size), tail])
    problem = check_sum(decode_sum(LAYOUT, total, 2), {k: v.dtype for k, v in CURRENT.items()},
                        norm_limit=10.0, tolerance=1e-9)
    assert problem is not None and words in problem


def test_the_server_refuses_a_sum_over_the_norm_bound() -> None:
    total = vector(delta(0.1), 10, 10.0) + vector(delta(0.1), 10, 10.0)
    total[:4] += 30.0  # someone sent w·δ far beyond w·B
    problem = check_sum(decode_sum(LAYOUT, total, 2), {k: v.dtype for k, v in CURRENT.items()},
                        norm_limit=10.0, tolerance=1e-9)
    assert problem is not None and "over its bound" in problem


def test_under_dp_every_client_weighs_one_and_reports_its_clip_bit() -> None:
    """DP-FedAvg's vectors sum to Σ δ (equal weights), the examples and the unclipped count."""
    d1, d2 = delta(0.1, 3), delta(-0.3, 5)
    v1 = checked_values(LAYOUT, SPEC, d1, CURRENT, num_examples=10, norm_limit=10.0)
    v2 = checked_values(LAYOUT, SPEC, d2, CURRENT, num_examples=40, norm_limit=10.0)
    total = (client_vector(v1, num_examples=10, example_scale=40.0, train_loss=0.2, clip=10.0,
                           equal_weight=True, unclipped=True)
             + client_vector(v2, num_examples=40, example_scale=40.0, train_loss=0.4, clip=10.0,
                             equal_weight=True))
    summed = decode_sum(LAYOUT, total, 2)
    assert summed.weight == 2.0 and summed.unclipped == 1.0 and summed.examples(40.0) == 50
    assert summed.train_loss() == pytest.approx(0.3)  # equal weights for the loss too
    for k in d1:
        np.testing.assert_allclose(summed.sums[k], d1[k].astype(np.float64) + d2[k], rtol=1e-6)
    dtypes = {k: v.dtype for k, v in CURRENT.items()}
    assert check_sum(summed, dtypes, norm_limit=1.0, tolerance=1e-9, equal_weight=True) is None
    # A sum whose weights are not one per client, or over the clip norm, is refused.
    bad = total.copy()
    bad[LAYOUT.size] = 1.5
    problem = check_sum(decode_sum(LAYOUT, bad, 2), dtypes, norm_limit=1.0, tolerance=1e-9,
                        equal_weight=True)
    assert problem is not None and "weighs 1" in problem
    problem = check_sum(summed, dtypes, norm_limit=0.2, tolerance=1e-9, equal_weight=True)
    assert problem is not None and "over its bound" in problem


@pytest.mark.parametrize("n", [3, 5, 11, 100])
def test_a_wide_ring_never_wraps_at_the_top_of_the_range(n: int) -> None:
    """At 62 bits 2R·scale is not exact in float64; each client stays at most L."""
    bits, r = 62, 1.0
    top = quantize.levels(bits, n)
    q = quantize.quantize(np.full(4, r), r, quantize.scale(bits, r, n),
                          np.random.default_rng(0), top=top)
    assert int(q.max()) <= top
    assert n * int(q.max()) <= (1 << bits) - 1
