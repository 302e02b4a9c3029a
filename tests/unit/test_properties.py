"""Properties that hold for every input: the weights codec, partitions and the IDX parser."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlearn import weights as W
from fedlearn.data import partition
from fedlearn.data.formats import IDX_DTYPES, read_idx
from fedlearn.errors import DatasetCorruptError, PartitionError

SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# --- weights codec ------------------------------------------------------------------------

DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64)]


@st.composite
def weight_arrays(draw: st.DrawFn) -> np.ndarray:
    """A finite float32/float64/int64 array, 0-d included, often not C-contiguous."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    if dtype.kind == "f":
        elements = st.floats(
            allow_nan=False, allow_infinity=False, width=8 * dtype.itemsize
        )
    else:
        elements = st.integers(-(2**63), 2**63 - 1)
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    view = draw(st.sampled_from(["as is", "fortran", "transposed", "strided"]))
    if view == "fortran":
        return np.asfortranarray(array)
    if view == "transposed":
        return array.T
    if view == "strided" and array.ndim >= 1:
        doubled = np.repeat(array, 2, axis=0)
        return doubled[::2]
    return array


@SETTINGS
@given(st.dictionaries(st.text(min_size=1, max_size=12), weight_arrays(), max_size=5))
def test_encode_decode_round_trip(weights: dict[str, np.ndarray]) -> None:
    decoded = W.decode(W.encode(weights))
    assert set(decoded) == set(weights)
    for name, array in weights.items():
        got = decoded[name]
        assert got.shape == array.shape, name
        assert got.dtype == array.dtype, name
        np.testing.assert_array_equal(got, array)
        assert got.tobytes() == array.tobytes()  # bit for bit, -0.0 included


# --- partitions ---------------------------------------------------------------------------

SPECS = {
    "iid": st.just("iid"),
    "dirichlet": st.floats(0.05, 100.0).map(lambda a: f"dirichlet:{a!r}"),
    "shards": st.integers(1, 4).map(lambda k: f"shards:{k}"),
}


@pytest.mark.parametrize("kind", sorted(SPECS))
@SETTINGS
@given(
    labels=hnp.arrays(np.int64, st.integers(1, 300), elements=st.integers(0, 9)),
    num_clients=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_partition_is_disjoint_complete_and_seeded(
    kind: str, labels: np.ndarray, num_clients: int, seed: int, data: st.DataObject
) -> None:
    spec = data.draw(SPECS[kind], label="spec")
    try:
        parts = partition(labels, num_clients, spec, seed)
    except PartitionError:
        event("refused")
        # An impossible request is refused, and refused again for the same inputs.
        with pytest.raises(PartitionError):
            partition(labels, num_clients, spec, seed)
        return
    event("partitioned")
    assert len(parts) == num_clients
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(np.unique(joined)) == len(joined)  # disjoint
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))  # complete
    again = partition(labels, num_clients, spec, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    for i in range(num_clients):
        (part,) = partition(labels, 1, f"{spec}:{num_clients}:{i}", seed)
        np.testing.assert_array_equal(part, parts[i])


# --- IDX parser ---------------------------------------------------------------------------

IDX_CODES = sorted(IDX_DTYPES)


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """The IDX encoding: 0x0000, type code, ndim, big-endian u32 dims, big-endian data."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(IDX_DTYPES[code]).tobytes()


@st.composite
def idx_arrays(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    code = draw(st.sampled_from(IDX_CODES))
    dtype = np.dtype(IDX_DTYPES[code]).newbyteorder("=")
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype, shape)), code


@SETTINGS
@given(case=idx_arrays(), gz=st.booleans())
def test_idx_round_trip(tmp_path: Path, case: tuple[np.ndarray, int], gz: bool) -> None:
    array, code = case
    data = idx_bytes(array, code)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    got = read_idx(path)
    assert got.shape == array.shape
    assert got.dtype == array.dtype
    assert got.tobytes() == array.tobytes()  # bit for bit, NaN payloads included


@st.composite
def idx_like_bytes(draw: st.DrawFn) -> bytes:
    """Bytes that look like IDX: a plausible header with odd dims and any amount of data."""
    code = draw(st.sampled_from([*IDX_CODES, 0x00, 0x0A, 0xFF]))
    ndim = draw(st.integers(0, 5))
    dims = draw(
        st.lists(st.sampled_from([0, 1, 2, 3, 2**16, 2**31, 2**32 - 1]), min_size=ndim,
                 max_size=ndim)
    )
    header = struct.pack(">BBBB", 0, 0, code, ndim) + struct.pack(f">{ndim}I", *dims)
    return header[: draw(st.integers(0, len(header)))] + draw(st.binary(max_size=64))


@SETTINGS
@given(
    raw=st.one_of(st.binary(max_size=200), idx_like_bytes()),
    gz=st.booleans(),
    cut=st.integers(0, 8),
)
# Four dims of 2**16 multiply to 2**64, which wraps to 0 in int64 arithmetic.
@example(raw=struct.pack(">BBBB4I", 0, 0, 0x08, 4, *[2**16] * 4), gz=False, cut=0)
def test_idx_arbitrary_bytes_parse_or_raise_corrupt(
    tmp_path: Path, raw: bytes, gz: bool, cut: int
) -> None:
    data = gzip.compress(raw) if gz else raw
    path = tmp_path / "a.idx"
    path.write_bytes(data[: len(data) - cut])  # a cut gzip stream is a truncated download
    try:
        array = read_idx(path)
    except DatasetCorruptError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(array, np.ndarray) and array.ndim >= 1
