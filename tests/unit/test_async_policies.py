"""The async merge policies on two-number toy weights whose results can be done by hand."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedlearn.errors import ConfigError
from fedlearn.strategies.async_policies import (
    AsyncState,
    FedAsyncPolicy,
    FedBuffPolicy,
    SamplesPolicy,
    constant,
    hinge,
    make_policy,
    parse_policy,
    parse_staleness_fn,
    polynomial,
)
from fedlearn.types import Weights


def vec(a: float, b: float) -> Weights:
    return {"w": np.array([a, b], np.float32)}


def w(state: AsyncState) -> list[float]:
    return [float(x) for x in state.weights["w"]]


START = AsyncState(weights=vec(1.0, -1.0))


# -- samples ----------------------------------------------------------------------------


def test_samples_takes_the_first_update_whole_then_weighs_by_examples() -> None:
    policy = SamplesPolicy()
    one = policy.merge(START, vec(2, 2), 10, 0)
    assert w(one) == [3.0, 1.0]  # a = 0: new = server + delta
    assert (one.version, one.updates, one.absorbed_examples, one.buffered) == (1, 1, 10, 0)
    two = policy.merge(one, vec(4, 4), 30, 0)
    # b / (a + b) = 30 / 40: [3, 1] + 0.75 * [4, 4]
    assert w(two) == [6.0, 4.0]
    assert (two.version, two.updates, two.absorbed_examples) == (2, 2, 40)
    # the seed's rule with client = server + delta: (a * server + b * client) / (a + b)
    client = np.array([3.0, 1.0]) + np.array([4.0, 4.0])
    seed_rule = (10 * np.array([3.0, 1.0]) + 30 * client) / 40
    assert w(two) == seed_rule.tolist()


def test_samples_ignores_staleness() -> None:
    policy = SamplesPolicy()
    one = policy.merge(START, vec(2, 2), 10, 0)
    assert w(policy.merge(one, vec(4, 4), 10, 5)) == w(policy.merge(one, vec(4, 4), 10, 0))


# -- fedasync ---------------------------------------------------------------------------


def test_staleness_functions_by_hand() -> None:
    poly = polynomial()  # (t + 1) ** -0.5
    assert [poly(t) for t in (0, 3, 8)] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert polynomial(1.0)(3) == 0.25
    h = hinge()  # a = 10, b = 4
    assert [h(t) for t in (0, 4)] == [1.0, 1.0]
    assert h(5) == pytest.approx(1 / 11) and h(6) == pytest.approx(1 / 21)
    assert hinge(2.0, 1.0)(3) == pytest.approx(1 / 5)
    assert constant()(100) == 1.0
    assert parse_staleness_fn("polynomial")(3) == 0.5
    assert parse_staleness_fn("polynomial:2")(1) == 0.25
    assert parse_staleness_fn("hinge:2:1")(3) == pytest.approx(1 / 5)
    assert parse_staleness_fn("constant")(7) == 1.0


def test_fedasync_mixes_alpha_times_staleness_discount() -> None:
    fixed = FedAsyncPolicy(0.5, constant())
    one = fixed.merge(START, vec(2, 2), 10, 0)
    assert w(one) == [2.0, 0.0]  # [1, -1] + 0.5 * [2, 2]
    assert (one.version, one.updates, one.absorbed_examples) == (1, 1, 10)
    poly = FedAsyncPolicy(0.5, polynomial())
    # staleness 3: 0.5 * 4 ** -0.5 = 0.25
    assert w(poly.merge(START, vec(4, 4), 10, 3)) == [2.0, 0.0]
    assert poly.mixing(0) == 0.5
    stale = FedAsyncPolicy(1.0, hinge())
    assert w(stale.merge(START, vec(11, 11), 1, 5)) == [2.0, 0.0]  # 1/11 of the delta
    assert w(stale.merge(START, vec(11, 11), 1, 4)) == [12.0, 10.0]  # whole up to b


# -- fedbuff ----------------------------------------------------------------------------


def test_fedbuff_buffers_k_then_applies_the_example_weighted_mean() -> None:
    policy = FedBuffPolicy(2, server_lr=1.0, staleness_fn=constant())
    one = policy.merge(START, vec(2, 2), 1, 0)
    assert w(one) == [1.0, -1.0]  # held in the buffer
    assert (one.version, one.updates, one.buffered, one.absorbed_examples) == (0, 1, 1, 0)
    two = policy.merge(one, vec(5, 5), 2, 0)
    # (1 * 2 + 2 * 5) / 3 = 4
    assert w(two) == [5.0, 3.0]
    assert (two.version, two.updates, two.buffered, two.absorbed_examples) == (1, 2, 0, 3)
    half = FedBuffPolicy(2, server_lr=0.5, staleness_fn=constant())
    assert w(half.merge(half.merge(START, vec(2, 2), 1, 0), vec(5, 5), 2, 0)) == [3.0, 1.0]


def test_fedbuff_discounts_stale_deltas_as_in_the_paper() -> None:
    policy = FedBuffPolicy(2)  # polynomial: 1 / sqrt(1 + t)
    one = policy.merge(START, vec(2, 2), 1, 0)
    two = policy.merge(one, vec(5, 5), 2, 3)
    # (1 * 1 * 2 + 2 * 0.5 * 5) / 3 = 7 / 3
    assert w(two) == pytest.approx([1 + 7 / 3, -1 + 7 / 3])


def test_fedbuff_flush_applies_a_partial_buffer_and_is_a_no_op_when_empty() -> None:
    policy = FedBuffPolicy(3, staleness_fn=constant())
    held = policy.merge(policy.merge(START, vec(2, 2), 1, 0), vec(4, 4), 1, 0)
    assert held.buffered == 2 and held.version == 0
    flushed = policy.flush(held)
    assert w(flushed) == [4.0, 2.0]  # + (2 + 4) / 2
    assert (flushed.version, flushed.updates, flushed.buffered) == (1, 2, 0)
    assert policy.flush(flushed) is flushed
    assert SamplesPolicy().flush(flushed) is flushed


# -- purity and parsing -----------------------------------------------------------------


@pytest.mark.parametrize("spec", ["samples", "fedasync", "fedbuff:2"])
def test_merge_changes_nothing_it_was_given(spec: str) -> None:
    policy = make_policy(spec)
    base = policy.merge(START, vec(1, 1), 3, 0)  # fedbuff: a non-empty buffer
    before = {k: v.copy() for k, v in base.weights.items()}
    delta = vec(2, 3)
    first = policy.merge(base, delta, 5, 1)
    second = policy.merge(base, delta, 5, 1)
    np.testing.assert_array_equal(base.weights["w"], before["w"])
    np.testing.assert_array_equal(delta["w"], vec(2, 3)["w"])
    np.testing.assert_array_equal(first.weights["w"], second.weights["w"])
    assert first.weights["w"].dtype == np.float32
    if base.buffer is not None:
        assert base.buffer.count == 1  # the buffer of the state given is untouched


def test_bad_merges_are_value_errors() -> None:
    for policy in (SamplesPolicy(), FedAsyncPolicy(0.5, constant()), FedBuffPolicy(2)):
        with pytest.raises(ValueError):
            policy.merge(START, vec(1, 1), 0, 0)
        with pytest.raises(ValueError):
            policy.merge(START, vec(1, 1), 1, -1)


def test_policy_specs() -> None:
    assert parse_policy("samples") == ("samples", 0)
    assert parse_policy("FedAsync") == ("fedasync", 0)
    assert parse_policy("fedbuff:3") == ("fedbuff", 3)
    assert isinstance(make_policy("fedbuff:4", server_lr=0.5), FedBuffPolicy)
    assert make_policy("fedasync", alpha=0.9).mixing(0) == 0.9  # type: ignore[attr-defined]


@pytest.mark.parametrize("spec", ["", "fedavg", "samples:3", "fedbuff", "fedbuff:0",
                                  "fedbuff:x", "fedbuff:-2", "fedasync:1"])
def test_bad_policy_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="async-policy"):
        make_policy(spec)


@pytest.mark.parametrize("spec", ["", "poly", "hinge:1", "hinge:1:2:3", "polynomial:x",
                                  "polynomial:-1", "constant:1", "polynomial:inf"])
def test_bad_staleness_functions_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="staleness-fn"):
        parse_staleness_fn(spec)


def test_bad_parameters_are_config_errors() -> None:
    for alpha in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="async-alpha"):
            FedAsyncPolicy(alpha, constant())
    with pytest.raises(ConfigError, match="buffer"):
        FedBuffPolicy(0)
    with pytest.raises(ConfigError, match="server-lr"):
        FedBuffPolicy(2, server_lr=0.0)


def test_policies_import_no_torch_or_web_code() -> None:
    code = ("import sys, fedlearn.strategies.async_policies\n"
            "print(','.join(m for m in ('torch', 'fastapi', 'httpx') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == ""
