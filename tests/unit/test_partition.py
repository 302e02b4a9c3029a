"""Partition specs and the seeded partitions they describe."""

from __future__ import annotations

import numpy as np
import pytest

from fedlearn.data import PartitionSpec, client_indices, parse_partition, partition
from fedlearn.errors import PartitionError

BALANCED = np.repeat(np.arange(10), 100)  # 1000 labels, 100 per class


def shuffled_labels(n: int, classes: int = 10, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def assert_disjoint(parts: list[np.ndarray]) -> None:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)


def assert_covers(parts: list[np.ndarray], n: int) -> None:
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


# --- grammar ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionSpec(kind="iid")),
        ("iid:4:3", PartitionSpec(kind="iid", part=(4, 3))),
        ("dirichlet:0.5", PartitionSpec(kind="dirichlet", alpha=0.5)),
        ("dirichlet:1e-1:3:0", PartitionSpec(kind="dirichlet", alpha=0.1, part=(3, 0))),
        ("shards:2", PartitionSpec(kind="shards", shards=2)),
        ("shards:2:100:99", PartitionSpec(kind="shards", shards=2, part=(100, 99))),
        ("range:1-2", PartitionSpec(kind="range", lo=1, hi=2)),
        ("range:3-3", PartitionSpec(kind="range", lo=3, hi=3)),
        (" IID ", PartitionSpec(kind="iid")),
    ],
)
def test_parse_good(text: str, expected: PartitionSpec) -> None:
    assert parse_partition(text) == expected
    assert parse_partition(str(expected)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "random",
        "iid:4",
        "iid:4:4",
        "iid:0:0",
        "iid:4:-1",
        "iid:a:b",
        "iid:4:1:2",
        "dirichlet",
        "dirichlet:x",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:nan",
        "dirichlet:inf",
        "dirichlet:0.5:3",
        "dirichlet:0.5:3:3",
        "shards",
        "shards:0",
        "shards:1.5",
        "shards:2:2:5",
        "range",
        "range:3",
        "range:2-1",
        "range:0-2",
        "range:a-b",
        "range:1-2-3",
        "range:1-2:3:0",
    ],
)
def test_parse_bad(text: str) -> None:
    with pytest.raises(PartitionError) as info:
        parse_partition(text)
    message = str(info.value)
    assert repr(text) in message
    assert "dirichlet:ALPHA" in message and "range:L-R" in message


def test_spec_fields_are_validated() -> None:
    with pytest.raises(PartitionError):
        PartitionSpec(kind="dirichlet")
    with pytest.raises(PartitionError):
        PartitionSpec(kind="range", lo=5, hi=2)
    with pytest.raises(PartitionError):
        PartitionSpec(kind="iid", part=(2, 2))


# --- properties of the partitions -----------------------------------------------------------


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "dirichlet:10", "shards:2"])
def test_disjoint_and_covering(spec: str) -> None:
    labels = shuffled_labels(3000)
    parts = partition(labels, 12, spec, seed=3)
    assert len(parts) == 12
    assert all(p.dtype == np.int64 for p in parts)
    assert_disjoint(parts)
    assert_covers(parts, len(labels))


def test_iid_sizes() -> None:
    parts = partition(np.zeros(60000, dtype=np.int64), 6, "iid", seed=0)
    assert [len(p) for p in parts] == [10000] * 6
    uneven = partition(np.zeros(10, dtype=np.int64), 3, "iid", seed=0)
    assert sorted(len(p) for p in uneven) == [3, 3, 4]


def test_dirichlet_skew_decreases_with_alpha() -> None:
    labels = np.repeat(np.arange(10), 500)

    def mean_max_share(alpha: float) -> float:
        shares = []
        for seed in range(3):
            for part in partition(labels, 10, f"dirichlet:{alpha}", seed=seed):
                counts = np.bincount(labels[part], minlength=10)
                shares.append(counts.max() / counts.sum())
        return float(np.mean(shares))

    skewed, mild, flat = mean_max_share(0.1), mean_max_share(1.0), mean_max_share(100.0)
    assert skewed > mild > flat
    assert skewed > 0.5 and flat < 0.2


def test_dirichlet_minimum_size_and_impossible() -> None:
    labels = np.repeat(np.arange(10), 100)
    parts = partition(labels, 20, "dirichlet:0.5", seed=1)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(PartitionError, match="fewer clients"):
        partition(labels, 100, "dirichlet:0.0001", seed=0)


def test_shards_balanced_labels_give_k_labels_each() -> None:
    parts = partition(BALANCED, 100, "shards:2", seed=0)
    assert [len(p) for p in parts] == [10] * 100
    distinct = [len(np.unique(BALANCED[p])) for p in parts]
    assert max(distinct) <= 2
    assert_covers(parts, len(BALANCED))


def test_shards_unbalanced_labels_stay_skewed() -> None:
    labels = shuffled_labels(5000)
    parts = partition(labels, 50, "shards:2", seed=4)
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert np.mean(distinct) <= 2 * 2
    assert max(distinct) <= 4
    with pytest.raises(PartitionError, match="shards"):
        partition(labels[:50], 30, "shards:2", seed=0)


def test_range_chunks() -> None:
    labels = np.zeros(60000, dtype=np.int64)
    parts = partition(labels, 1, "range:1-2", seed=0)
    np.testing.assert_array_equal(np.sort(parts[0]), np.arange(10000))
    split = partition(labels, 4, "range:3-4", seed=5)
    assert [len(p) for p in split] == [2500] * 4
    assert_disjoint(split)
    np.testing.assert_array_equal(np.sort(np.concatenate(split)), np.arange(10000, 20000))
    last = client_indices(labels, "range:12-12", seed=0)
    np.testing.assert_array_equal(last, partition(labels, 1, "range:12-12", seed=0)[0])
    np.testing.assert_array_equal(np.sort(last), np.arange(55000, 60000))


def test_range_past_the_end() -> None:
    with pytest.raises(PartitionError) as info:
        partition(np.zeros(60000, dtype=np.int64), 2, "range:11-13", seed=0)
    assert "65000" in str(info.value) and "60000" in str(info.value)


@pytest.mark.parametrize("kind", ["iid", "dirichlet:0.5", "shards:3"])
def test_part_i_of_n_matches_full_partition(kind: str) -> None:
    labels = shuffled_labels(2000)
    full = partition(labels, 8, kind, seed=11)
    for i in (0, 3, 7):
        spec = f"{kind}:8:{i}"
        one = partition(labels, 8, spec, seed=11)
        assert len(one) == 1
        np.testing.assert_array_equal(one[0], full[i])
        np.testing.assert_array_equal(partition(labels, 1, spec, seed=11)[0], full[i])
        np.testing.assert_array_equal(client_indices(labels, spec, seed=11), full[i])
    with pytest.raises(PartitionError, match="num_clients"):
        partition(labels, 5, f"{kind}:8:1", seed=11)


def test_client_indices_needs_a_part() -> None:
    with pytest.raises(PartitionError, match="N:I"):
        client_indices(BALANCED, "iid", seed=0)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "shards:2", "range:1-1"])
def test_deterministic_per_seed(spec: str) -> None:
    labels = shuffled_labels(6000)
    a = partition(labels, 10, spec, seed=42)
    b = partition(labels, 10, parse_partition(spec), seed=42)
    c = partition(labels, 10, spec, seed=43)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:1", "shards:1", "range:1-1"])
def test_bad_client_counts(spec: str) -> None:
    labels = np.arange(5000) % 10
    with pytest.raises(PartitionError, match="at most 5000"):
        partition(labels, 5001, spec, seed=0)
    with pytest.raises(PartitionError, match="at least 1"):
        partition(labels, 0, spec, seed=0)


def test_bad_labels_and_seed() -> None:
    with pytest.raises(PartitionError, match="1-D integer"):
        partition(np.zeros((4, 2), dtype=np.int64), 2, "iid", seed=0)
    with pytest.raises(PartitionError, match="1-D integer"):
        partition(np.zeros(4), 2, "iid", seed=0)
    with pytest.raises(PartitionError, match="Seed"):
        partition(BALANCED, 2, "iid", seed=-1)
