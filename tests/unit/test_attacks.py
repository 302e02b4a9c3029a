"""Attacks for robustness evaluation: each one on tiny arrays, by hand; specs and the choice."""

from __future__ import annotations

import numpy as np
import pytest

from fedlearn.attacks import (
    DEFAULT_FRACTION,
    Attack,
    Attackers,
    attack_delta,
    attack_rng,
    check_attack_config,
    check_fraction,
    choose_attackers,
    flip_labels,
    label_flip_classes,
    parse_attack,
)
from fedlearn.errors import ConfigError
from fedlearn.tasks import Task
from fedlearn.types import Weights

IDS = [f"client-{i}" for i in range(20)]


def delta() -> Weights:
    """Two float arrays (one 0-d) and an integer buffer."""
    return {
        "w": np.array([[1.0, -2.0], [0.5, 0.0]], dtype=np.float32),
        "b": np.array(3.0, dtype=np.float64),
        "num_batches_tracked": np.array(7, dtype=np.int64),
    }


def attacked(spec: str, seed: int = 0) -> Weights:
    return attack_delta(delta(), parse_attack(spec), attack_rng(seed))


def same(a: Weights, b: Weights) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k])


def test_sign_flip_sends_minus_the_delta() -> None:
    same(attacked("sign-flip"), {
        "w": np.array([[-1.0, 2.0], [-0.5, 0.0]], dtype=np.float32),
        "b": np.array(-3.0),
        "num_batches_tracked": np.array(7, dtype=np.int64),
    })


def test_sign_flip_with_a_factor_scales_it() -> None:
    same(attacked("sign-flip:2"), {
        "w": np.array([[-2.0, 4.0], [-1.0, 0.0]], dtype=np.float32),
        "b": np.array(-6.0),
        "num_batches_tracked": np.array(7, dtype=np.int64),
    })


def test_scale_multiplies_the_delta() -> None:
    same(attacked("scale:10"), {
        "w": np.array([[10.0, -20.0], [5.0, 0.0]], dtype=np.float32),
        "b": np.array(30.0),
        "num_batches_tracked": np.array(7, dtype=np.int64),
    })


def test_same_value_sets_every_float_entry() -> None:
    same(attacked("same-value:-0.25"), {
        "w": np.full((2, 2), -0.25, dtype=np.float32),
        "b": np.array(-0.25),
        "num_batches_tracked": np.array(7, dtype=np.int64),
    })


def test_gaussian_sends_seeded_noise_of_the_deltas_shape() -> None:
    out = attacked("gaussian:0.5", seed=3)
    # Drawn in sorted-name order: "b" first, then "w".
    rng = attack_rng(3)
    b = rng.standard_normal(()) * 0.5
    w = rng.standard_normal((2, 2)) * 0.5
    same(out, {"w": w.astype(np.float32), "b": np.asarray(b),
               "num_batches_tracked": np.array(7, dtype=np.int64)})
    same(attacked("gaussian:0.5", seed=3), out)  # same seed, same noise
    assert not np.array_equal(attacked("gaussian:0.5", seed=4)["w"], out["w"])


def test_gaussian_noise_has_the_asked_spread() -> None:
    big = {"w": np.zeros(40_000, dtype=np.float32)}
    noise = attack_delta(big, parse_attack("gaussian:2"), attack_rng(0))["w"]
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 2.0) < 0.05


def test_label_flip_leaves_the_delta_alone() -> None:
    same(attacked("label-flip"), delta())


def test_attacks_change_nothing_they_were_given() -> None:
    given = delta()
    for spec in ("sign-flip", "scale:3", "gaussian:1", "same-value:9", "label-flip"):
        out = attack_delta(given, parse_attack(spec), attack_rng(0))
        assert all(out[k] is not given[k] for k in given)
    same(given, delta())


@pytest.mark.parametrize("spec", ["scale:1e300", "same-value:1e39", "gaussian:1e300",
                                  "sign-flip:1e300"])
def test_an_attacked_delta_stays_finite(spec: str) -> None:
    out = attacked(spec)
    assert all(np.isfinite(v).all() for v in out.values())
    assert float(np.abs(out["w"]).max()) <= float(np.finfo(np.float32).max)
    if spec.startswith("scale"):
        assert out["w"][0, 0] == np.finfo(np.float32).max  # clipped to the largest float32
        assert out["w"][0, 1] == -np.finfo(np.float32).max


def test_flip_labels_maps_y_to_k_minus_one_minus_y() -> None:
    y = np.array([0, 1, 2, 9, 4], dtype=np.int64)
    flipped = flip_labels(y, 10)
    np.testing.assert_array_equal(flipped, [9, 8, 7, 0, 5])
    assert flipped.dtype == np.int64 and y[0] == 0  # a new array
    np.testing.assert_array_equal(flip_labels(np.array([0, 1], dtype=np.uint8), 2), [1, 0])


@pytest.mark.parametrize(("y", "classes", "words"), [
    (np.array([0.0, 1.0]), 2, "integer class labels"),
    (np.array([0, 3]), 3, "outside 0..2"),
    (np.array([-1, 0]), 3, "outside 0..2"),
    (np.array([0]), 0, "at least 1 class"),
])
def test_flip_labels_refuses_what_is_not_a_class(y: np.ndarray, classes: int,
                                                 words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        flip_labels(y, classes)


@pytest.mark.parametrize(("spec", "want"), [
    ("sign-flip", Attack("sign-flip", 1.0)),
    ("Sign-Flip:2", Attack("sign-flip", 2.0)),
    ("scale:-3.5", Attack("scale", -3.5)),
    ("gaussian:0.1", Attack("gaussian", 0.1)),
    ("same-value:100", Attack("same-value", 100.0)),
    ("label-flip", Attack("label-flip")),
])
def test_specs_parse_and_print_back(spec: str, want: Attack) -> None:
    got = parse_attack(spec)
    assert got == want
    assert parse_attack(str(got)) == got


@pytest.mark.parametrize(("spec", "words"), [
    ("boost", "unknown --attack"),
    ("", "unknown --attack"),
    ("scale", "needs a finite number"),
    ("scale:", "needs a finite number"),
    ("scale:ten", "needs a finite number"),
    ("scale:inf", "needs a finite number"),
    ("same-value:nan", "needs a finite number"),
    ("gaussian:0", "SIGMA > 0"),
    ("gaussian:-1", "SIGMA > 0"),
    ("sign-flip:0", "F > 0"),
    ("label-flip:3", "takes no value"),
])
def test_bad_specs_are_one_sentence(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        parse_attack(spec)
    message = str(info.value)
    assert message.endswith(".") and "\n" not in message


@pytest.mark.parametrize(("fraction", "clients", "words"), [
    (-0.1, 10, r"in \[0, 1\]"),
    (1.5, 10, r"in \[0, 1\]"),
    (float("nan"), 10, r"in \[0, 1\]"),
    (0.01, 10, "no client at all"),
])
def test_bad_fractions_are_one_sentence(fraction: float, clients: int, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        check_fraction(fraction, clients)


def test_attack_config_resolves_the_default_fraction() -> None:
    assert check_attack_config("sign-flip", None, 20) == DEFAULT_FRACTION == 0.2
    assert check_attack_config("scale:5", 0.5, 20) == 0.5
    assert check_attack_config("", None, 20) is None
    with pytest.raises(ConfigError, match="give --attack too"):
        check_attack_config("", 0.3, 20)
    with pytest.raises(ConfigError, match="unknown --attack"):
        check_attack_config("nope", 0.3, 20)


def test_attackers_are_a_seeded_fraction_of_the_ids() -> None:
    chosen = choose_attackers(IDS, 0.2, seed=0)
    assert len(chosen) == 4 and set(chosen) <= set(IDS)
    assert chosen == sorted(chosen, key=IDS.index)  # in the ids' order
    assert choose_attackers(IDS, 0.2, seed=0) == chosen  # seeded
    assert any(choose_attackers(IDS, 0.2, seed=s) != chosen for s in (1, 2, 3))
    assert len(choose_attackers(IDS, 0.25, seed=0)) == 5
    assert len(choose_attackers(IDS[:10], 0.25, seed=0)) == 3  # 2.5 rounds half up
    assert choose_attackers(IDS, 0.0, seed=0) == []
    assert choose_attackers(IDS, 1.0, seed=0) == IDS


def test_attackers_attack_only_their_own_updates() -> None:
    hostile = Attackers.of("sign-flip", 0.2, IDS, seed=0)
    assert hostile.active and len(hostile.ids) == 4
    bad = sorted(hostile.ids)[0]
    good = next(i for i in IDS if i not in hostile.ids)
    given = delta()
    assert hostile.delta(good, given, seed=1) is given
    same(hostile.delta(bad, given, seed=1), attacked("sign-flip"))
    y = np.array([0, 1])
    assert hostile.labels(bad, y) is y  # a model-poisoning attack leaves the data alone
    record = hostile.record()
    assert record == {"attack": "sign-flip", "fraction": 0.2, "seed": 0,
                      "attackers": sorted(hostile.ids, key=lambda c: int(c.split("-")[1]))}
    none = Attackers.of("", 0.0, IDS, seed=0)
    assert not none.active and none.delta(bad, given, 1) is given and none.labels(bad, y) is y


def test_label_flip_attackers_flip_their_labels_only() -> None:
    task = Task(name="toy", init=lambda seed: {}, train=lambda ctx: None, num_classes=3)
    hostile = Attackers.of("label-flip", 0.5, ["a", "b"], seed=0, task=task)
    (bad,) = hostile.ids
    (good,) = {"a", "b"} - hostile.ids
    y = np.array([0, 1, 2])
    np.testing.assert_array_equal(hostile.labels(bad, y), [2, 1, 0])
    assert hostile.labels(good, y) is y
    assert hostile.delta(bad, delta(), 0)["w"][0, 0] == 1.0  # the delta is left alone


@pytest.mark.parametrize(("options", "words"), [
    ({"kind": "regression"}, "for classification tasks"),
    ({"script": "train.py", "num_classes": 3}, "client script"),
    ({}, "num_classes=K"),
])
def test_label_flip_needs_a_classification_task_with_classes(options: dict[str, object],
                                                              words: str) -> None:
    task = Task(name="toy", init=lambda seed: {}, train=lambda ctx: None,
                **options)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=words):
        label_flip_classes(task)
    with pytest.raises(ConfigError, match=words):
        Attackers.of("label-flip", 0.5, ["a", "b"], seed=0, task=task)
