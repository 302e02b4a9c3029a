"""Weights ops and the safetensors codec."""

from __future__ import annotations

import numpy as np
import pytest

from fedlearn import weights as W
from fedlearn.errors import PayloadError, PayloadTooLargeError


def w(a: float, b: float) -> dict[str, np.ndarray]:
    return {"x": np.array([a, a], dtype=np.float32), "y": np.array([[b]], dtype=np.float32)}


def test_ops_are_pure_and_correct() -> None:
    a, b = w(1, 2), w(3, 5)
    assert W.add(a, b)["x"].tolist() == [4, 4]
    assert W.subtract(b, a)["y"].tolist() == [[3]]
    assert W.scale(a, 2.0)["y"].tolist() == [[4]]
    assert W.scale(a, 2.0)["y"].dtype == np.float32
    assert a["x"].tolist() == [1, 1] and b["y"].tolist() == [[5]]
    assert W.norm({"x": np.array([3.0, 4.0])}) == pytest.approx(5.0)
    assert W.zeros_like(a)["x"].tolist() == [0, 0]


def test_weighted_mean_by_hand() -> None:
    # (1*1 + 3*3) / 4 = 2.5 ; (2*1 + 5*3) / 4 = 4.25
    mean = W.weighted_mean([(w(1, 2), 1), (w(3, 5), 3)])
    assert mean["x"].tolist() == [2.5, 2.5]
    assert mean["y"].tolist() == [[4.25]]
    assert mean["x"].dtype == np.float32


def test_running_sum_refuses_empty_and_mismatched() -> None:
    acc = W.RunningSum()
    with pytest.raises(ValueError):
        acc.mean()
    acc.add(w(1, 1), 1)
    with pytest.raises(ValueError):
        acc.add({"x": np.zeros(2, np.float32)}, 1)


def test_codec_round_trip() -> None:
    a = w(1.5, -2)
    data = W.encode(a)
    back = W.decode(data, W.spec_of(a))
    assert back.keys() == a.keys()
    for k in a:
        np.testing.assert_array_equal(back[k], a[k])


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"x": np.zeros(2, np.float32)}, "missing y"),
        ({**w(1, 1), "z": np.zeros(1, np.float32)}, "unexpected z"),
        ({"x": np.zeros(3, np.float32), "y": np.zeros((1, 1), np.float32)}, "shape"),
        ({"x": np.zeros(2, np.float64), "y": np.zeros((1, 1), np.float32)}, "dtype"),
        ({"x": np.array([np.nan, 0], np.float32), "y": np.zeros((1, 1), np.float32)}, "NaN"),
        ({"x": np.array([np.inf, 0], np.float32), "y": np.zeros((1, 1), np.float32)}, "NaN"),
    ],
)
def test_decode_refuses_bad_payloads(payload: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        W.decode(W.encode(payload), W.spec_of(w(0, 0)))


def test_decode_refuses_garbage_and_oversize() -> None:
    with pytest.raises(PayloadError, match="safetensors"):
        W.decode(b"this is not a safetensors file at all", None)
    with pytest.raises(PayloadError, match="safetensors"):
        W.decode(b"\x00", None)
    with pytest.raises(PayloadTooLargeError, match="over the limit"):
        W.decode(W.encode(w(1, 1)), None, max_bytes=16)


def test_pack_and_unpack_extra_groups_and_header_metadata() -> None:
    from fedlearn.weights import decode, encode, pack, read_metadata, unpack

    model = {"fc.weight": np.ones((2, 2), np.float32), "n": np.array(3, np.int64)}
    c = {"fc.weight": np.full((2, 2), 0.5, np.float32)}
    packed = pack(model, {"c": c})
    assert sorted(packed) == ["c/fc.weight", "fc.weight", "n"]
    data = encode(packed, {"run": "r1"})
    assert read_metadata(data) == {"run": "r1"} and read_metadata(encode(model)) == {}
    back, extras = unpack(decode(data), ("c", "delta_c"))
    assert sorted(back) == ["fc.weight", "n"] and back["n"].shape == ()
    assert extras["delta_c"] == {} and extras["c"]["fc.weight"].tolist() == [[0.5, 0.5]] * 2
    with pytest.raises(ValueError, match=r"two arrays would travel as 'c/fc\.weight'"):
        pack(packed, {"c": c})
    with pytest.raises(PayloadError, match="not safetensors"):
        read_metadata(b"\xff" * 16)
