"""SecAgg+ secure aggregation: the server learns the sum of client vectors and nothing else.

Practical Secure Aggregation (Bonawitz et al. 2017, CCS) with the sparse
neighbour graph of SecAgg+ (Bell et al. 2020, CCS), in four stages, each a
pure exchange of JSON-ready messages (:mod:`fedlearn.privacy.secagg_messages`):

0. advertise keys: each client u sends two X25519 public keys, c_u (to
   encrypt shares) and s_u (to agree pairwise masks);
1. share keys: u draws a self-mask seed b_u, Shamir-shares b_u and its mask
   private key among its neighbours N(u) and itself with threshold t, and
   sends each neighbour's two shares AES-GCM-encrypted under
   HKDF(X25519(c_u, c_v)) through the server;
2. masked input: u quantises x_u into Z_{2^bits} and uploads
   y_u = x_u + PRG(b_u) + Σ_{v∈U2∩N(u), u<v} PRG(s_uv) − Σ_{v∈U2∩N(u), u>v} PRG(s_uv),
   where s_uv = HKDF(X25519(s_u, s_v)) and U2 are the clients whose shares arrived;
3. unmasking: for each client that uploaded, survivors reveal their share of
   b_u; for each client that shared keys but did not upload, survivors reveal
   their share of its mask key, so the server can rebuild the pairwise masks
   it left behind. An honest client never reveals both for the same u.

The server then has Σ_{u∈U3} x_u mod 2^bits, which does not wrap (see
:mod:`fedlearn.privacy.quantize`). Any stage with fewer than t clients left
raises :class:`SecAggAbortedError` before anything is revealed. This is the
semi-honest (honest-but-curious server) variant: there is no signature
round (consistency check) against a server that lies about who dropped.
Each client object serves one round; keys and seeds are fresh every round.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedlearn.errors import ConfigError, ConflictError, PayloadError, SecAggAbortedError
from fedlearn.privacy import quantize, shamir
from fedlearn.privacy.secagg_crypto import (
    INFO_ENCRYPTION,
    INFO_MASK,
    agree,
    decrypt,
    encrypt,
    expand_mask,
    keypair,
    neighbours,
    pair_aad,
)
from fedlearn.privacy.secagg_messages import (
    KeyAdvert,
    MaskedInput,
    ShareBundle,
    ShareInbox,
    UnmaskRequest,
    UnmaskResponse,
)

RandomBytes = Callable[[int], bytes]


@dataclass(frozen=True)
class SecAggParams:
    """Parameters every party of a round agrees on.

    ``threshold`` t: shares needed to rebuild a secret, and the fewest clients
    a round may continue with (Bonawitz et al. advise t > n/2; with a
    neighbour graph, t > k/2). ``bits``: the ring Z_{2^bits} (8 to 62).
    ``clip_range`` R: inputs are clipped to [-R, R]. ``max_clients``: the most
    clients whose sum must not wrap; the quantisation scale is chosen from it.
    ``neighbours``: None for the complete graph, or an even degree k for the
    SecAgg+ k-regular graph drawn from ``graph_seed``.
    """

    threshold: int
    clip_range: float
    max_clients: int
    bits: int = 32
    neighbours: int | None = None
    graph_seed: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.threshold) or self.threshold < 2:
            raise ConfigError(
                f"threshold must be an integer of at least 2, got {self.threshold!r}."
            )
        if not _is_int(self.max_clients) or self.max_clients < self.threshold:
            raise ConfigError(
                f"max_clients must be an integer of at least threshold, got {self.max_clients!r}."
            )
        if not _is_int(self.bits) or not 8 <= self.bits <= 62:
            raise ConfigError(f"bits must be an integer from 8 to 62, got {self.bits!r}.")
        if not (isinstance(self.clip_range, int | float) and math.isfinite(self.clip_range)
                and self.clip_range > 0):
            raise ConfigError(f"clip_range must be positive and finite, got {self.clip_range!r}.")
        if quantize.levels(self.bits, self.max_clients) < 2:
            raise ConfigError(
                f"{self.bits} bits leave no room for {self.max_clients} clients; raise bits."
            )
        if self.neighbours is not None and (
            not _is_int(self.neighbours) or self.neighbours < 2 or self.neighbours % 2
            or self.neighbours + 1 < self.threshold
        ):
            raise ConfigError(
                f"neighbours must be an even integer of at least 2 and at least threshold − 1, "
                f"got {self.neighbours!r}."
            )
        if not _is_int(self.graph_seed) or self.graph_seed < 0:
            raise ConfigError(
                f"graph_seed must be a non-negative integer, got {self.graph_seed!r}."
            )

    @property
    def scale(self) -> float:
        """Quantisation levels per unit, L / (2R) with L = floor((2^bits − 1) / max_clients)."""
        return quantize.scale(self.bits, self.clip_range, self.max_clients)


class SecAggClient:
    """One client's side of one round; call the four stage methods in order.

    ``client_id`` is the client's index in this round (unique, ≥ 0). ``rng(n)``
    returns n cryptographically random bytes (default :func:`secrets.token_bytes`);
    tests may pass a seeded stand-in.
    """

    def __init__(
        self, client_id: int, params: SecAggParams, rng: RandomBytes = secrets.token_bytes
    ) -> None:
        if not _is_int(client_id) or client_id < 0:
            raise ConfigError(f"client_id must be a non-negative integer, got {client_id!r}.")
        self.client_id = client_id
        self.params = params
        self._rng = rng
        self._cipher_sk, self._cipher_pk = keypair(rng)
        self._mask_sk, self._mask_pk = keypair(rng)
        self._self_seed = rng(shamir.SECRET_BYTES)
        self._stage = 0
        self._adverts: dict[int, KeyAdvert] = {}
        self._holders: frozenset[int] = frozenset()
        # owner -> (share of its self-mask seed, share of its mask private key)
        self._held: dict[int, tuple[bytes, bytes]] = {}

    def advertise(self) -> KeyAdvert:
        """Stage 0: this client's public keys."""
        self._advance(0)
        return KeyAdvert(self.client_id, self._cipher_pk, self._mask_pk)

    def share_keys(self, adverts: Sequence[KeyAdvert]) -> ShareBundle:
        """Stage 1: Shamir-share b_u and the mask key; encrypt each neighbour's pair of shares."""
        self._advance(1)
        by_id = {a.client_id: a for a in adverts}
        if len(by_id) != len(adverts):
            raise PayloadError("the public key list names a client twice.")
        mine = by_id.get(self.client_id)
        if mine != KeyAdvert(self.client_id, self._cipher_pk, self._mask_pk):
            raise PayloadError("the public key list does not carry this client's own keys.")
        keys = [a.cipher_key for a in adverts] + [a.mask_key for a in adverts]
        if len(set(keys)) != len(keys):
            raise PayloadError("two public keys in the list are equal; the round is refused.")
        check_quorum(len(by_id), self.params.threshold, "advertised keys")
        self._adverts = by_id
        graph = neighbours(by_id, self.params.neighbours, self.params.graph_seed)
        self._holders = graph[self.client_id] | {self.client_id}
        check_quorum(len(self._holders), self.params.threshold, "share holders")
        xs = [v + 1 for v in self._holders]
        t = self.params.threshold
        seed_shares = shamir.split(self._self_seed, xs, t, self._rng)
        key_shares = shamir.split(self._mask_sk, xs, t, self._rng)
        self._held[self.client_id] = (seed_shares[self.client_id + 1],
                                      key_shares[self.client_id + 1])
        ciphertexts = {}
        for v in sorted(self._holders - {self.client_id}):
            key = agree(self._cipher_sk, by_id[v].cipher_key, INFO_ENCRYPTION)
            plaintext = seed_shares[v + 1] + key_shares[v + 1]
            ciphertexts[v] = encrypt(key, plaintext, pair_aad(self.client_id, v), self._rng)
        return ShareBundle(self.client_id, ciphertexts)

    def masked_input(self, vector: npt.NDArray[np.floating], inbox: ShareInbox) -> MaskedInput:
        """Stage 2: decrypt the shares received, then upload the masked, quantised ``vector``."""
        self._advance(2)
        if inbox.client_id != self.client_id:
            raise PayloadError("the share inbox is addressed to another client.")
        strangers = set(inbox.ciphertexts) - self._holders
        if strangers or self.client_id in inbox.ciphertexts:
            raise PayloadError(
                f"the share inbox holds shares from non-neighbours {sorted(strangers)}."
            )
        for v, blob in inbox.ciphertexts.items():
            key = agree(self._cipher_sk, self._adverts[v].cipher_key, INFO_ENCRYPTION)
            plaintext = decrypt(key, blob, pair_aad(v, self.client_id))
            if len(plaintext) != 2 * shamir.SHARE_BYTES:
                raise PayloadError("a decrypted share pair has the wrong length.")
            self._held[v] = (plaintext[: shamir.SHARE_BYTES], plaintext[shamir.SHARE_BYTES :])
        check_quorum(len(self._held), self.params.threshold, "neighbours that shared keys")
        x = np.asarray(vector, dtype=np.float64).ravel()
        if not np.isfinite(x).all():
            raise PayloadError("the vector to aggregate holds NaN or infinite values.")
        p = self.params
        noise_rng = np.random.Generator(np.random.PCG64(int.from_bytes(self._rng(16), "big")))
        y = quantize.quantize(x, p.clip_range, p.scale, noise_rng,
                              top=quantize.levels(p.bits, p.max_clients))
        y += expand_mask(self._self_seed, x.size, p.bits)
        for v in inbox.ciphertexts:
            seed = agree(self._mask_sk, self._adverts[v].mask_key, INFO_MASK)
            mask = expand_mask(seed, x.size, p.bits)
            y = y + mask if self.client_id < v else y - mask
        return MaskedInput.of(self.client_id, y & quantize.ring_mask(p.bits))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 3: reveal b-shares of survivors and mask-key shares of dropped clients.

        Refuses a request that lists a client as both, does not list this
        client as a survivor, or names fewer than t survivors.
        """
        self._advance(3)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise PayloadError("the unmask request lists a client as both survivor and dropped.")
        if self.client_id not in survivors:
            raise PayloadError("the unmask request does not list this client as a survivor.")
        check_quorum(len(survivors), self.params.threshold, "survivors")
        seed_shares = {u: s[0] for u, s in self._held.items() if u in survivors}
        key_shares = {u: s[1] for u, s in self._held.items() if u in dropped}
        return UnmaskResponse(self.client_id, seed_shares, key_shares)

    def _advance(self, stage: int) -> None:
        if self._stage != stage:
            raise ConflictError(
                f"secure aggregation stage {stage} was called out of order; "
                "use a new client object for each round."
            )
        self._stage = stage + 1


def check_quorum(have: int, threshold: int, what: str) -> None:
    """Raise :class:`SecAggAbortedError` when fewer than ``threshold`` parties are left."""
    if have < threshold:
        raise SecAggAbortedError(
            f"only {have} {what} for a threshold of {threshold}; the round is aborted and "
            "nothing is revealed."
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
