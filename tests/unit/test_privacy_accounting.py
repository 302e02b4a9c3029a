"""Accountant: ε equals dp_accounting called directly; max_steps inverts epsilon."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedlearn.errors import ConfigError
from fedlearn.privacy import Accountant

Z, Q, STEPS, DELTA = 1.1, 0.01, 1000, 1e-5


def direct_epsilon(accountant: dp_accounting.PrivacyAccountant, event: dp_accounting.DpEvent,
                   steps: int) -> float:
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(DELTA))


def poisson_event() -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(Z))


def test_rdp_poisson_matches_dp_accounting() -> None:
    ours = Accountant(Z, Q, DELTA, method="rdp").epsilon(STEPS)
    assert ours == pytest.approx(direct_epsilon(RdpAccountant(), poisson_event(), STEPS),
                                 rel=1e-12)
    assert ours == pytest.approx(1.7118, abs=1e-3)


def test_pld_poisson_matches_dp_accounting() -> None:
    ours = Accountant(Z, Q, DELTA, method="pld").epsilon(STEPS)
    assert ours == pytest.approx(direct_epsilon(PLDAccountant(), poisson_event(), STEPS),
                                 rel=1e-9)
    # PLD accounting is tighter than RDP for the same mechanism.
    assert ours < Accountant(Z, Q, DELTA, method="rdp").epsilon(STEPS)


def test_fixed_size_sampling_uses_replace_one_rdp() -> None:
    acc = Accountant(Z, Q, DELTA, sampling="fixed", num_clients=1000)
    assert acc.neighboring_relation is NeighboringRelation.REPLACE_ONE
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 10, dp_accounting.GaussianDpEvent(Z))
    expected = direct_epsilon(
        RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE), event, STEPS)
    assert acc.epsilon(STEPS) == pytest.approx(expected, rel=1e-12)
    assert "replace-one" in acc.describe() and "10 of 1000" in acc.describe()


# PLD's target keeps the answer near a hundred rounds so its search stays quick.
@pytest.mark.parametrize(("method", "target"), [("rdp", 1.5), ("pld", 0.5)])
def test_max_steps_is_the_last_round_within_budget(method: str, target: float) -> None:
    acc = Accountant(Z, Q, DELTA, method=method)  # type: ignore[arg-type]
    n = acc.max_steps(target)
    assert n > 0
    assert acc.epsilon(n) <= target < acc.epsilon(n + 1)


def test_max_steps_is_zero_when_one_round_is_too_many() -> None:
    assert Accountant(0.5, 1.0, DELTA).max_steps(0.1) == 0


def test_epsilon_grows_with_steps_and_is_zero_at_zero() -> None:
    acc = Accountant(Z, Q, DELTA)
    assert acc.epsilon(0) == 0.0
    assert acc.epsilon(10) < acc.epsilon(100) < acc.epsilon(1000)


def test_describe_names_accountant_sampling_and_relation() -> None:
    line = Accountant(Z, Q, DELTA, method="pld").describe()
    assert "PLD" in line and "Poisson" in line and "add-or-remove-one" in line
    assert "\n" not in line


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0.0, Q, DELTA), {}),
        ((Z, 0.0, DELTA), {}),
        ((Z, 1.5, DELTA), {}),
        ((Z, Q, 1.0), {}),
        ((Z, Q, DELTA), {"method": "moments"}),
        ((Z, Q, DELTA), {"sampling": "shuffle"}),
        ((Z, Q, DELTA), {"sampling": "fixed"}),
        ((Z, 0.015, DELTA), {"sampling": "fixed", "num_clients": 100}),
        ((Z, Q, DELTA), {"sampling": "fixed", "num_clients": 1000, "method": "pld"}),
    ],
)
def test_bad_arguments_are_config_errors(args: tuple[float, float, float],
                                         kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Accountant(*args, **kwargs)  # type: ignore[arg-type]


def test_bad_steps_and_targets_are_config_errors() -> None:
    acc = Accountant(Z, Q, DELTA)
    with pytest.raises(ConfigError):
        acc.epsilon(-1)
    with pytest.raises(ConfigError):
        acc.max_steps(0.0)
