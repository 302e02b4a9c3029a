"""Cryptographic building blocks of secure aggregation, on ``cryptography`` primitives.

- Key agreement: X25519, and HKDF-SHA256 (RFC 5869) of the shared secret with
  a purpose label, so the encryption key and the mask seed of one pair of
  clients are independent.
- Authenticated encryption: AES-256-GCM with a random 96-bit nonce and the
  (sender, recipient) pair as associated data, so the server can neither read
  nor alter nor redirect the shares it relays.
- Mask expansion: AES-256-CTR keystream under a 32-byte seed (zero IV; every
  seed is used for one vector only), read as little-endian uint64 and reduced
  mod 2^bits. Both ends of a pair derive the same mask from the same seed.
- Neighbour graph: complete, or the SecAgg+ random k-regular Harary graph
  (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
  Overhead"): clients on a ring in a seeded random order, each joined to the
  k/2 nearest on either side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlearn.errors import PayloadError
from fedlearn.privacy.quantize import Ring, ring_mask

KEY_BYTES = 32
NONCE_BYTES = 12
INFO_ENCRYPTION = b"fedlearn secagg share encryption v1"
INFO_MASK = b"fedlearn secagg pairwise mask v1"


def keypair(rng: Callable[[int], bytes]) -> tuple[bytes, bytes]:
    """A fresh X25519 (private, public) key pair as 32-byte raw encodings."""
    private = X25519PrivateKey.from_private_bytes(rng(KEY_BYTES))
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def public_key_of(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public), info): a 32-byte key both ends derive alike."""
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        shared = X25519PrivateKey.from_private_bytes(private).exchange(peer)
    except ValueError as exc:
        raise PayloadError(f"a public key is not a valid X25519 key ({exc}).") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, aad: bytes, rng: Callable[[int], bytes]) -> bytes:
    """AES-256-GCM: nonce ‖ ciphertext ‖ tag, authenticating ``aad`` too."""
    nonce = rng(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`encrypt`; :class:`PayloadError` if it was altered or misaddressed."""
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError) as exc:
        raise PayloadError(
            "an encrypted share failed authentication (tampered or misaddressed); "
            "the client refuses it."
        ) from exc


def pair_aad(sender: int, recipient: int) -> bytes:
    """Associated data binding a ciphertext to its sender and recipient."""
    return b"fedlearn secagg shares" + sender.to_bytes(8, "big") + recipient.to_bytes(8, "big")


def expand_mask(seed: bytes, dimension: int, bits: int) -> Ring:
    """``dimension`` pseudo-random elements of Z_{2^bits} from a 32-byte seed (AES-256-CTR)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(8 * dimension)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & ring_mask(bits)


def neighbours(
    ids: Iterable[int], degree: int | None, graph_seed: int
) -> dict[int, frozenset[int]]:
    """Each client's neighbours: everyone else, or a random ``degree``-regular Harary graph.

    The graph is complete when ``degree`` is None or at least n − 1. Otherwise
    clients sit on a ring in the order of a permutation drawn from
    ``graph_seed`` and each is joined to the ``degree // 2`` nearest clients on
    either side (``degree`` is even). Server and clients compute the same graph.
    """
    members = sorted(set(ids))
    n = len(members)
    if degree is None or degree >= n - 1:
        everyone = frozenset(members)
        return {u: everyone - {u} for u in members}
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([graph_seed, n])))
    ring = [members[i] for i in rng.permutation(n)]
    half = degree // 2
    return {
        ring[p]: frozenset(ring[(p + d) % n] for d in range(-half, half + 1) if d != 0)
        for p in range(n)
    }
