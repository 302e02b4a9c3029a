"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 − 1).

The Mersenne prime p = 2^521 − 1 exceeds every 256-bit secret, so a secret
is one field element and needs no chunking. A secret s is shared with a
random polynomial f of degree t − 1 and f(0) = s; holder x gets f(x). Any t
shares give s by Lagrange interpolation at 0; fewer reveal nothing
(Shamir 1979, "How to Share a Secret"). Holder ``x`` is a client index plus
one, since x = 0 would be the secret itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from fedlearn.errors import PayloadError

PRIME = 2**521 - 1
#: Bytes of one serialised share value (big-endian, below PRIME).
SHARE_BYTES = 66
SECRET_BYTES = 32
# Coefficients are drawn 128 bits wider than p so their bias mod p is below 2^-128.
_COEFF_BYTES = SHARE_BYTES + 16


def split(
    secret: bytes, holders: Iterable[int], threshold: int, rng: Callable[[int], bytes]
) -> dict[int, bytes]:
    """Shares of ``secret`` for each holder x ≥ 1 (any ``threshold`` of them recover it).

    ``rng(n)`` returns n cryptographically random bytes.
    """
    xs = sorted(set(holders))
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs) or any(x < 1 for x in xs):
        raise ValueError(f"cannot share among {xs} with threshold {threshold}")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [int.from_bytes(rng(_COEFF_BYTES), "big") % PRIME for _ in range(threshold - 1)]
    return {x: _eval(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares {x: f(x)}; the first ``threshold`` are used."""
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}")
    points = sorted(shares.items())[:threshold]
    xs = [x for x, _ in points]
    ys = [_share_value(y) for _, y in points]
    secret = 0
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise PayloadError("secret shares are inconsistent; a holder sent a corrupted share.")
    return secret.to_bytes(SECRET_BYTES, "big")


def _eval(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def _share_value(y: bytes) -> int:
    value = int.from_bytes(y, "big")
    if len(y) != SHARE_BYTES or value >= PRIME:
        raise PayloadError(f"a secret share must be {SHARE_BYTES} bytes below 2^521 − 1.")
    return value
