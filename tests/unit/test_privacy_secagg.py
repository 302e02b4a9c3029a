"""SecAgg+: the unmasked sum equals the plain sum; dropouts, thresholds, tampering, hiding."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedlearn.errors import ConfigError, ConflictError, PayloadError, SecAggAbortedError
from fedlearn.privacy import SecAggClient, SecAggParams, SecAggServer, shamir
from fedlearn.privacy.secagg_crypto import neighbours
from fedlearn.privacy.secagg_messages import (
    KeyAdvert,
    MaskedInput,
    ShareBundle,
    ShareInbox,
    UnmaskRequest,
    UnmaskResponse,
)

DIM = 64


def seeded_bytes(seed: int) -> Callable[[int], bytes]:
    """A deterministic stand-in for secrets.token_bytes (SHA-256 in counter mode)."""
    counter = [0]

    def draw(n: int) -> bytes:
        out = b""
        while len(out) < n:
            counter[0] += 1
            out += hashlib.sha256(f"{seed}:{counter[0]}".encode()).digest()
        return out[:n]

    return draw


def wire(message: Any) -> Any:
    """Send a message through JSON and back, as an HTTP layer would."""
    data = json.loads(json.dumps(message.to_json()))
    return type(message).from_json(data)


def run_round(
    params: SecAggParams,
    inputs: dict[int, np.ndarray],
    *,
    drop_before_upload: frozenset[int] = frozenset(),
    drop_after_upload: frozenset[int] = frozenset(),
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    clients = {u: SecAggClient(u, params, seeded_bytes(seed * 1000 + u)) for u in inputs}
    server = SecAggServer(params, DIM)
    for c in clients.values():
        server.receive_advert(wire(c.advertise()))
    keys = [wire(a) for a in server.public_keys()]
    for c in clients.values():
        server.receive_shares(wire(c.share_keys(keys)))
    for u, c in clients.items():
        inbox = wire(server.inbox(u))
        if u not in drop_before_upload:
            server.receive_masked(wire(c.masked_input(inputs[u], inbox)))
    request = wire(server.unmask_request())
    for u in request.survivors:
        if u not in drop_after_upload:
            server.receive_unmask(wire(clients[u].unmask(request)))
    return server.result()


def inputs_for(n: int, seed: int = 1) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.uniform(-1, 1, DIM) for u in range(n)}


PARAMS = SecAggParams(threshold=3, clip_range=1.0, max_clients=5, bits=32)
# Stochastic rounding: below one level per client and coordinate.
TOL = 5 / PARAMS.scale


def test_sum_of_five_without_dropouts() -> None:
    x = inputs_for(5)
    total, count = run_round(PARAMS, x)
    assert count == 5
    np.testing.assert_allclose(total, sum(x.values()), atol=TOL)


def test_one_client_drops_before_its_masked_upload() -> None:
    x = inputs_for(5)
    total, count = run_round(PARAMS, x, drop_before_upload=frozenset({2}))
    assert count == 4
    np.testing.assert_allclose(total, sum(v for u, v in x.items() if u != 2), atol=TOL)


def test_one_client_drops_after_its_masked_upload() -> None:
    x = inputs_for(5)
    total, count = run_round(PARAMS, x, drop_after_upload=frozenset({4}))
    assert count == 5
    np.testing.assert_allclose(total, sum(x.values()), atol=TOL)


def test_sparse_neighbour_graph_with_a_dropout() -> None:
    params = SecAggParams(threshold=3, clip_range=1.0, max_clients=8, neighbours=4, graph_seed=7)
    graph = neighbours(range(8), 4, 7)
    assert all(len(g) == 4 for g in graph.values())
    assert all(u in graph[v] for u in graph for v in graph[u])
    x = inputs_for(8, seed=3)
    total, count = run_round(params, x, drop_before_upload=frozenset({5}))
    assert count == 7
    np.testing.assert_allclose(total, sum(v for u, v in x.items() if u != 5),
                               atol=8 / params.scale)


def test_values_outside_the_range_are_clipped_to_it() -> None:
    x = {u: np.full(DIM, 3.0 * (-1) ** u) for u in range(3)}
    total, _ = run_round(SecAggParams(threshold=2, clip_range=1.0, max_clients=3), x)
    np.testing.assert_allclose(total, np.ones(DIM), atol=1e-6)


def test_too_few_uploads_abort_before_unmasking() -> None:
    with pytest.raises(SecAggAbortedError, match="threshold of 3"):
        run_round(PARAMS, inputs_for(5), drop_before_upload=frozenset({0, 1, 2}))


def test_too_few_unmask_answers_abort_and_reveal_nothing() -> None:
    with pytest.raises(SecAggAbortedError, match="aborted"):
        run_round(PARAMS, inputs_for(5), drop_after_upload=frozenset({0, 1, 2}))


def upto_unmask(
    params: SecAggParams, n: int, seed: int = 0
) -> tuple[dict[int, SecAggClient], SecAggServer, UnmaskRequest]:
    clients = {u: SecAggClient(u, params, seeded_bytes(seed * 1000 + u)) for u in range(n)}
    server = SecAggServer(params, DIM)
    for c in clients.values():
        server.receive_advert(c.advertise())
    keys = server.public_keys()
    for c in clients.values():
        server.receive_shares(c.share_keys(keys))
    for u, c in clients.items():
        server.receive_masked(c.masked_input(np.zeros(DIM), server.inbox(u)))
    return clients, server, server.unmask_request()


def test_client_refuses_a_request_that_would_reveal_both_secrets() -> None:
    clients, _, request = upto_unmask(PARAMS, 5)
    forged = UnmaskRequest(request.survivors, (1,))
    with pytest.raises(PayloadError, match="both"):
        clients[0].unmask(forged)


def test_client_refuses_too_few_survivors() -> None:
    clients, _, _ = upto_unmask(PARAMS, 5)
    with pytest.raises(SecAggAbortedError):
        clients[0].unmask(UnmaskRequest((0, 1), (2, 3, 4)))


def test_stages_out_of_order_are_conflicts() -> None:
    clients, server, request = upto_unmask(PARAMS, 5)
    with pytest.raises(ConflictError):
        clients[0].advertise()
    with pytest.raises(ConflictError):
        server.receive_advert(KeyAdvert(9, b"k" * 32, b"m" * 32))
    server.receive_unmask(clients[0].unmask(request))
    with pytest.raises(ConflictError):
        server.receive_unmask(clients[0].unmask(request))


def test_tampered_ciphertext_is_rejected() -> None:
    clients = {u: SecAggClient(u, PARAMS, seeded_bytes(u)) for u in range(3)}
    server = SecAggServer(PARAMS, DIM)
    for c in clients.values():
        server.receive_advert(c.advertise())
    keys = server.public_keys()
    for c in clients.values():
        server.receive_shares(c.share_keys(keys))
    inbox = server.inbox(0)
    blob = bytearray(inbox.ciphertexts[1])
    blob[20] ^= 1
    tampered = ShareInbox(0, {**inbox.ciphertexts, 1: bytes(blob)})
    with pytest.raises(PayloadError, match="authentication"):
        clients[0].masked_input(np.zeros(DIM), tampered)
    # Redirecting client 2's share for client 0 to look as if it came from client 1 fails too.
    swapped = ShareInbox(0, {1: inbox.ciphertexts[2], 2: inbox.ciphertexts[1]})
    fresh = {u: SecAggClient(u, PARAMS, seeded_bytes(u)) for u in range(3)}
    for c in fresh.values():
        c.advertise()
    for c in fresh.values():
        c.share_keys(keys)
    with pytest.raises(PayloadError, match="authentication"):
        fresh[0].masked_input(np.zeros(DIM), swapped)


def masked_upload(x0: np.ndarray, params: SecAggParams, seed: int) -> np.ndarray:
    """What the server sees of client 0 in a three-client round."""
    clients = {u: SecAggClient(u, params, seeded_bytes(seed * 1000 + u)) for u in range(3)}
    server = SecAggServer(params, x0.size)
    for c in clients.values():
        server.receive_advert(c.advertise())
    keys = server.public_keys()
    for c in clients.values():
        server.receive_shares(c.share_keys(keys))
    return clients[0].masked_input(x0, server.inbox(0)).vector()


def test_masked_upload_is_uniform_whatever_the_input() -> None:
    stats = pytest.importorskip("scipy.stats")
    params = SecAggParams(threshold=2, clip_range=1.0, max_clients=3, bits=16)
    dim, bins = 256, 16
    views = {}
    for name, value in (("low", -1.0), ("high", 1.0)):
        views[name] = np.concatenate(
            [masked_upload(np.full(dim, value), params, seed) for seed in range(8)]
        )
        counts = np.bincount((views[name] >> np.uint64(params.bits - 4)).astype(int),
                             minlength=bins)
        assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.ks_2samp(views["low"], views["high"]).pvalue > 1e-3


def test_messages_survive_json_and_reject_garbage() -> None:
    bundle = ShareBundle(3, {1: b"ab", 4: b"\x00"})
    assert wire(bundle) == bundle
    response = UnmaskResponse(1, {2: b"x"}, {})
    assert wire(response) == response
    with pytest.raises(PayloadError):
        MaskedInput.from_json({"client_id": 1, "masked": "not base64!"})
    with pytest.raises(PayloadError):
        KeyAdvert.from_json({"client_id": True, "cipher_key": "", "mask_key": ""})
    with pytest.raises(PayloadError):
        ShareInbox.from_json({"client_id": 0, "ciphertexts": {"x": ""}})
    with pytest.raises(PayloadError):
        UnmaskRequest.from_json({"survivors": [0]})


def test_shamir_needs_threshold_shares() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3, seeded_bytes(9))
    assert shamir.combine({x: shares[x] for x in (2, 4, 5)}, 3) == secret
    with pytest.raises(PayloadError, match="inconsistent"):
        shamir.combine({x: shares[x] for x in (1, 2)}, 2)
    with pytest.raises(ValueError):
        shamir.combine({1: shares[1], 2: shares[2]}, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 1, "clip_range": 1.0, "max_clients": 3},
        {"threshold": 2, "clip_range": 0.0, "max_clients": 3},
        {"threshold": 4, "clip_range": 1.0, "max_clients": 3},
        {"threshold": 2, "clip_range": 1.0, "max_clients": 3, "bits": 64},
        {"threshold": 2, "clip_range": 1.0, "max_clients": 300, "bits": 8},
        {"threshold": 2, "clip_range": 1.0, "max_clients": 9, "neighbours": 3},
        {"threshold": 6, "clip_range": 1.0, "max_clients": 9, "neighbours": 4},
    ],
)
def test_bad_params_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SecAggParams(**kwargs)
