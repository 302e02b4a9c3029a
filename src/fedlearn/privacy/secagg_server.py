"""The server's side of SecAgg+ (see :mod:`fedlearn.privacy.secagg` for the protocol).

The server only relays and sums: it sees public keys, ciphertexts it cannot
read, masked vectors that are uniform in Z_{2^bits}, and, in the last stage,
exactly the shares it needs to remove the masks from the sum. Each stage
closes when the server produces the next stage's message; a message for a
closed stage is a :class:`ConflictError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fedlearn.errors import ConfigError, ConflictError, PayloadError, UnknownClientError
from fedlearn.privacy import quantize, shamir
from fedlearn.privacy.quantize import Ring
from fedlearn.privacy.secagg import SecAggParams, check_quorum
from fedlearn.privacy.secagg_crypto import INFO_MASK, agree, expand_mask, neighbours
from fedlearn.privacy.secagg_messages import (
    KeyAdvert,
    MaskedInput,
    ShareBundle,
    ShareInbox,
    UnmaskRequest,
    UnmaskResponse,
)


class SecAggServer:
    """Collects one round's stages and returns the sum of the surviving clients' vectors.

    ``dimension`` is the length of every client's vector.
    """

    def __init__(self, params: SecAggParams, dimension: int) -> None:
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
            raise ConfigError(f"dimension must be a positive integer, got {dimension!r}.")
        self.params = params
        self.dimension = dimension
        self._stage = 0
        self._adverts: dict[int, KeyAdvert] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._bundles: dict[int, ShareBundle] = {}
        self._masked: dict[int, Ring] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._request: UnmaskRequest | None = None

    def receive_advert(self, advert: KeyAdvert) -> None:
        """Stage 0: record a client's public keys."""
        self._expect(0, "advertise")
        if advert.client_id in self._adverts:
            raise ConflictError(f"client {advert.client_id} already advertised keys this round.")
        if len(self._adverts) >= self.params.max_clients:
            raise ConflictError(f"the round already has max_clients={self.params.max_clients}.")
        self._adverts[advert.client_id] = advert

    def public_keys(self) -> list[KeyAdvert]:
        """Close stage 0: every advertised key, for each client's :meth:`share_keys`."""
        if self._stage == 0:
            check_quorum(len(self._adverts), self.params.threshold, "clients advertised keys")
            self._graph = neighbours(self._adverts, self.params.neighbours, self.params.graph_seed)
            self._stage = 1
        self._expect(1, "public key list")
        return [self._adverts[u] for u in sorted(self._adverts)]

    def receive_shares(self, bundle: ShareBundle) -> None:
        """Stage 1: record a client's encrypted shares (one per neighbour)."""
        self._expect(1, "share keys")
        u = self._known(bundle.client_id, self._adverts)
        if u in self._bundles:
            raise ConflictError(f"client {u} already sent its shares this round.")
        if set(bundle.ciphertexts) != self._graph[u]:
            raise PayloadError(f"client {u} must send one encrypted share to each neighbour.")
        self._bundles[u] = bundle

    def inbox(self, client_id: int) -> ShareInbox:
        """Close stage 1 (at the first call): the shares addressed to ``client_id``."""
        if self._stage == 1:
            check_quorum(len(self._bundles), self.params.threshold, "clients shared keys")
            self._stage = 2
        self._expect(2, "share inbox")
        v = self._known(client_id, self._bundles)
        senders = self._graph[v] & self._bundles.keys()
        return ShareInbox(v, {u: self._bundles[u].ciphertexts[v] for u in sorted(senders)})

    def receive_masked(self, message: MaskedInput) -> None:
        """Stage 2: record a client's masked vector."""
        self._expect(2, "masked input")
        u = self._known(message.client_id, self._bundles)
        if u in self._masked:
            raise ConflictError(f"client {u} already uploaded its masked vector this round.")
        y = message.vector()
        if y.shape != (self.dimension,) or bool(np.any(y > quantize.ring_mask(self.params.bits))):
            raise PayloadError(
                f"client {u}'s masked vector must hold {self.dimension} integers below "
                f"2^{self.params.bits}."
            )
        self._masked[u] = y

    def unmask_request(self) -> UnmaskRequest:
        """Close stage 2: survivors (uploaded) and dropped (shared keys, did not upload)."""
        if self._stage == 2:
            check_quorum(len(self._masked), self.params.threshold, "clients uploaded")
            dropped = sorted(self._bundles.keys() - self._masked.keys())
            self._request = UnmaskRequest(tuple(sorted(self._masked)), tuple(dropped))
            self._stage = 3
        self._expect(3, "unmask request")
        if self._request is None:
            raise ConflictError("secure aggregation has no unmask request yet.")
        return self._request

    def receive_unmask(self, response: UnmaskResponse) -> None:
        """Stage 3: record a survivor's revealed shares."""
        self._expect(3, "unmask")
        v = self._known(response.client_id, self._masked)
        if v in self._responses:
            raise ConflictError(f"client {v} already sent its unmask shares this round.")
        request = self.unmask_request()
        if not (response.self_mask_shares.keys() <= set(request.survivors)
                and response.key_shares.keys() <= set(request.dropped)):
            raise PayloadError(f"client {v} revealed shares that were not asked for.")
        self._responses[v] = response

    def result(self) -> tuple[np.ndarray, int]:
        """Close stage 3: (Σ x_u as float64, number of clients summed).

        Raises :class:`SecAggAbortedError` when fewer than t survivors answered,
        or any survivor or dropped client has fewer than t shares revealed.
        """
        self._expect(3, "result")
        p = self.params
        request = self.unmask_request()
        check_quorum(len(self._responses), p.threshold, "survivors sent unmask shares")
        total = np.zeros(self.dimension, dtype=np.uint64)
        for y in self._masked.values():
            total += y
        for u in request.survivors:
            seed = self._reconstruct(u, lambda r: r.self_mask_shares)
            total -= expand_mask(seed, self.dimension, p.bits)
        for d in request.dropped:
            mask_key = self._reconstruct(d, lambda r: r.key_shares)
            for v in sorted(self._graph[d] & self._masked.keys()):
                pair_seed = agree(mask_key, self._adverts[v].mask_key, INFO_MASK)
                mask = expand_mask(pair_seed, self.dimension, p.bits)
                # v added PRG(s_vd) when v < d and subtracted it otherwise.
                total = total - mask if v < d else total + mask
        self._stage = 4
        total &= quantize.ring_mask(p.bits)
        count = len(request.survivors)
        return quantize.dequantize_sum(total, count, p.clip_range, p.scale), count

    def _reconstruct(
        self, owner: int, revealed: Callable[[UnmaskResponse], dict[int, bytes]]
    ) -> bytes:
        holders = self._graph[owner] | {owner}
        shares = {
            v + 1: revealed(response)[owner]
            for v, response in self._responses.items()
            if v in holders and owner in revealed(response)
        }
        check_quorum(len(shares), self.params.threshold, f"shares of client {owner}'s secret")
        return shamir.combine(shares, self.params.threshold)

    def _expect(self, stage: int, what: str) -> None:
        if self._stage != stage:
            raise ConflictError(f"the {what} stage of secure aggregation is not open now.")

    @staticmethod
    def _known(client_id: int, members: Mapping[int, object]) -> int:
        if client_id not in members:
            raise UnknownClientError(
                f"client {client_id} is not part of this secure aggregation stage."
            )
        return client_id

