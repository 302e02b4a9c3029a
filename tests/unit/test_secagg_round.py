"""Secure aggregation in the sync coordinator, driven directly: a fake clock, a real Store,
toy weights, and real SecAggClients on the client side."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlearn.client.secagg import SecAggTask, check_update
from fedlearn.config import ServerConfig, build_strategy, privacy_budget
from fedlearn.errors import ConfigError, ConflictError, PayloadError
from fedlearn.privacy.secagg import SecAggClient
from fedlearn.privacy.secagg_messages import KeyAdvert, ShareInbox, UnmaskRequest
from fedlearn.privacy.secagg_update import EXTRA, client_vector
from fedlearn.server.coordinator import SyncCoordinator
from fedlearn.server.store import Store
from fedlearn.types import Weights
from tests.unit.test_coordinator import FakeClock

INITIAL: Weights = {"w": np.array([1.0, -1.0, 0.5], np.float32),
                    "count": np.array(3, np.int64)}


def delta(a: float, b: float, c: float, steps: int = 2) -> Weights:
    return {"w": np.array([a, b, c], np.float32), "count": np.array(steps, np.int64)}


class Party:
    """One client: its task, its SecAggClient and what it sends."""

    def __init__(self, coord: SyncCoordinator, cid: str) -> None:
        self.coord, self.cid = coord, cid
        task = coord.poll(cid)
        assert task.action == "train" and task.secagg is not None
        self.task_id = task.task_id
        self.block = SecAggTask.from_json(json.loads(json.dumps(task.secagg)))
        self.client = SecAggClient(self.block.index, self.block.params())

    def post(self, name: str, body: Any, num_examples: int | None = None) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.coord.secagg_post(self.cid, self.task_id, name, raw, num_examples)

    def fetch(self, name: str) -> Any:
        return self.coord.secagg_fetch(self.cid, self.task_id, name)


class Run:
    """A secagg coordinator and its clients c0..c{n-1}, registered with 10*(i+1) examples."""

    def __init__(self, tmp_path: Path, stores: list[Store], n: int = 4, **config: Any) -> None:
        settings: dict[str, Any] = {"rounds": 2, "min_clients": n, "round_timeout": 10.0,
                                    "seed": 7, "pickup_timeout": 1e9, "secagg": True,
                                    "secagg_timeout": 5.0}
        settings.update(config)
        self.config = ServerConfig(**settings)
        store = Store(tmp_path)
        stores.append(store)
        self.clock = FakeClock()
        self.records: list[dict[str, Any]] = []
        self.coord = SyncCoordinator(self.config, INITIAL, strategy=build_strategy(self.config),
                                     store=store, evaluator=None, clock=self.clock,
                                     on_round=self.records.append)
        self.ids = [f"c{i}" for i in range(n)]
        for i, cid in enumerate(self.ids):
            self.coord.register(cid, 10 * (i + 1))
        assert self.coord.step()

    def round(self, deltas: dict[str, tuple[Weights, int]], *, vanish_before_masked: frozenset[str]
              = frozenset(), vanish_after_masked: frozenset[str] = frozenset(),
              vectors: dict[str, np.ndarray] | None = None) -> dict[str, Party]:
        """Every client of ``deltas`` trains and runs the stages; some vanish on the way."""
        parties = {cid: Party(self.coord, cid) for cid in deltas}
        for cid, p in parties.items():
            p.post("advert", p.client.advertise().to_json(), deltas[cid][1])
        assert self.coord.step()  # training is over: keys published
        scale = 0.0
        for p in parties.values():
            published = p.fetch("keys")
            scale = published["example_scale"]
            keys = [KeyAdvert.from_json(k) for k in published["keys"]]
            p.post("shares", p.client.share_keys(keys).to_json())
        assert self.coord.step()  # shares delivered
        for cid, p in parties.items():
            inbox = ShareInbox.from_json(p.fetch("inbox")["inbox"])
            if cid in vanish_before_masked:
                continue
            d, n = deltas[cid]
            vector = (vectors or {}).get(cid)
            if vector is None:
                values = check_update(p.block, INITIAL, d, n)
                vector = client_vector(values.values, num_examples=n, example_scale=scale,
                                       train_loss=0.5 + n / 100, clip=p.block.clip_range,
                                       equal_weight=p.block.dp_clip is not None,
                                       unclipped=values.unclipped)
            p.post("masked", p.client.masked_input(vector, inbox).masked)
        failures = len(self.coord.failures)
        if vanish_before_masked:
            assert not self.coord.step()  # waits for them until the stage deadline
            self.clock.advance(5.1)
        assert self.coord.step()  # the unmask request is out, or the round aborted
        if len(self.coord.failures) > failures:
            return parties
        for cid, p in parties.items():
            if cid in vanish_before_masked | vanish_after_masked:
                continue
            request = UnmaskRequest.from_json(p.fetch("unmask")["request"])
            p.post("unmask", p.client.unmask(request).to_json())
        if vanish_after_masked:
            assert not self.coord.step()
            self.clock.advance(5.1)
        while self.coord.step():
            pass
        return parties


def mean_of(deltas: dict[str, tuple[Weights, int]]) -> np.ndarray:
    total = sum(n for _, n in deltas.values())
    return sum(d["w"].astype(np.float64) * n for d, n in deltas.values()) / total


DELTAS = {"c0": (delta(0.1, -0.2, 0.05), 10), "c1": (delta(-0.3, 0.1, 0.0), 20),
          "c2": (delta(0.2, 0.2, -0.1), 30), "c3": (delta(0.0, -0.05, 0.3), 40)}


def test_a_round_gives_the_example_weighted_mean(tmp_path: Path, stores: list[Store]) -> None:
    run = Run(tmp_path, stores)
    run.round(DELTAS)
    np.testing.assert_allclose(run.coord.weights["w"], INITIAL["w"] + mean_of(DELTAS), atol=1e-6)
    assert int(run.coord.weights["count"]) == 5  # integer buffers: weighted mean, rounded
    rec = run.records[0]
    assert rec["clients"] == 4 and rec["sampled"] == 4 and rec["examples"] == 100
    assert rec["secagg_dropped"] == 0 and rec["secagg_recovered"] == 0
    assert rec["train_loss"] == pytest.approx(sum((0.5 + n / 100) * n for _, n in
                                                  DELTAS.values()) / 100, abs=1e-6)
    assert run.coord.state.version == 1 and not run.coord.failures


def test_a_client_gone_after_its_masked_upload_is_still_summed(
        tmp_path: Path, stores: list[Store]) -> None:
    run = Run(tmp_path, stores)
    run.round(DELTAS, vanish_after_masked=frozenset({"c2"}))
    np.testing.assert_allclose(run.coord.weights["w"], INITIAL["w"] + mean_of(DELTAS), atol=1e-6)
    rec = run.records[0]
    assert rec["clients"] == 4 and rec["examples"] == 100 and rec["secagg_recovered"] == 1
    assert run.coord.clients["c2"].dropped  # not sampled again until it polls


def test_a_client_gone_before_its_masked_upload_is_left_out(
        tmp_path: Path, stores: list[Store]) -> None:
    run = Run(tmp_path, stores)
    run.round(DELTAS, vanish_before_masked=frozenset({"c1"}))
    kept = {k: v for k, v in DELTAS.items() if k != "c1"}
    np.testing.assert_allclose(run.coord.weights["w"], INITIAL["w"] + mean_of(kept), atol=1e-6)
    rec = run.records[0]
    assert rec["clients"] == 3 and rec["examples"] == 80 and rec["secagg_dropped"] == 1


def test_below_the_threshold_the_round_fails_and_runs_again(
        tmp_path: Path, stores: list[Store]) -> None:
    run = Run(tmp_path, stores, n=3, secagg_threshold=3)
    deltas = {k: DELTAS[k] for k in ("c0", "c1", "c2")}
    parties = run.round(deltas, vanish_before_masked=frozenset({"c2"}))
    assert not run.records and run.coord.state.version == 0  # nothing unmasked or applied
    np.testing.assert_array_equal(run.coord.weights["w"], INITIAL["w"])
    assert "secure aggregation aborted" in run.coord.failures[0]["reason"]
    assert "threshold of 3" in run.coord.failures[0]["reason"]
    # The round runs again with fresh tasks; the old task ids are refused.
    with pytest.raises(ConflictError, match="fetch a new task"):
        parties["c0"].fetch("unmask")
    run.clock.advance(1)
    run.round(deltas)
    assert run.records[0]["round"] == 1 and run.records[0]["attempts"] == 2
    np.testing.assert_allclose(run.coord.weights["w"], INITIAL["w"] + mean_of(deltas), atol=1e-6)


def test_too_few_clients_after_training_rerun_the_round(
        tmp_path: Path, stores: list[Store]) -> None:
    run = Run(tmp_path, stores, n=3, secagg_threshold=3)
    assert run.coord.min_results == 3  # a round needs the threshold
    parties = {cid: Party(run.coord, cid) for cid in ("c0", "c1")}
    for p in parties.values():
        p.post("advert", p.client.advertise().to_json(), 10)
    run.clock.advance(10.1)  # c2 never finishes training
    while run.coord.step():
        pass
    assert run.coord.short_rounds == 1 and run.coord.state.version == 0
    with pytest.raises(ConflictError):
        parties["c0"].fetch("keys")  # no keys were ever published


def test_messages_are_checked_and_retries_are_harmless(
        tmp_path: Path, stores: list[Store]) -> None:
    run = Run(tmp_path, stores, n=3)
    a, b = Party(run.coord, "c0"), Party(run.coord, "c1")
    advert = a.client.advertise().to_json()
    a.post("advert", advert, 10)
    a.post("advert", advert, 10)  # a retry after a lost answer: accepted, nothing changes
    with pytest.raises(ConflictError, match="already sent"):
        a.post("advert", {**advert, "mask_key": advert["cipher_key"]}, 10)
    b_advert = b.client.advertise().to_json()
    with pytest.raises(PayloadError, match="client index"):
        b.post("advert", {**b_advert, "client_id": a.block.index}, 10)
    with pytest.raises(PayloadError, match="JSON"):
        b.post("advert", b"not json", 10)
    with pytest.raises(PayloadError, match="repeat keys"):
        b.post("advert", {**b_advert, "cipher_key": advert["cipher_key"]}, 10)
    low_order = base64.b64encode(bytes(32)).decode()  # the all-zero point
    with pytest.raises(PayloadError, match="X25519"):
        b.post("advert", {**b_advert, "mask_key": low_order}, 10)
    with pytest.raises(PayloadError, match="num_examples"):
        b.post("advert", b_advert)
    with pytest.raises(ConflictError, match="not open"):
        a.post("masked", b"\x00" * 8 * a.block.dimension)
    assert a.fetch("keys") is None  # not open before training is over
    with pytest.raises(ConflictError, match="fetch a new task"):
        run.coord.secagg_fetch("c0", "r1.0.c1", "keys")  # another client's task id
    with pytest.raises(ConflictError, match="/api/secagg"):
        run.coord.precheck("c0", 1, a.task_id)
    status = run.coord.status()
    assert status["secagg"]["stage"] == "advertise" and status["secagg"]["advertised"] == 1


def test_a_masked_vector_of_the_wrong_size_is_refused(tmp_path: Path, stores: list[Store]) -> None:
    run = Run(tmp_path, stores, n=3)
    parties = {cid: Party(run.coord, cid) for cid in ("c0", "c1", "c2")}
    for p in parties.values():
        p.post("advert", p.client.advertise().to_json(), 10)
    run.coord.step()
    for p in parties.values():
        keys = [KeyAdvert.from_json(k) for k in p.fetch("keys")["keys"]]
        p.post("shares", p.client.share_keys(keys).to_json())
    run.coord.step()
    with pytest.raises(PayloadError, match="integers below"):
        parties["c0"].post("masked", b"\x00" * 8 * (parties["c0"].block.dimension - 1))


def test_a_sum_beyond_the_honest_bounds_fails_the_round(
        tmp_path: Path, stores: list[Store]) -> None:
    run = Run(tmp_path, stores, n=3)
    deltas = {k: DELTAS[k] for k in ("c0", "c1", "c2")}
    # c1 skips its own checks and claims the weight of 50 clients.
    cheat = np.zeros(INITIAL["w"].size + 1 + EXTRA)
    cheat[-EXTRA] = 50.0
    run.round(deltas, vectors={"c1": cheat})
    assert run.coord.state.version == 0 and not run.records
    assert "more than one per client" in run.coord.failures[0]["reason"]


def test_what_the_server_holds_of_a_client_does_not_depend_on_its_update(
        tmp_path: Path, stores: list[Store]) -> None:
    """Client c0 sends a small or a huge update; the masked bytes the server gets look
    alike (uniform over the ring; two-sample KS test)."""
    stats = pytest.importorskip("scipy.stats")
    views: dict[str, list[int]] = {"small": [], "huge": []}
    for k, (name, value) in enumerate([("small", 0.0), ("huge", 100.0)] * 8):
        run = Run(tmp_path / str(k), stores, n=3, max_update_norm=200.0)
        seen: list[bytes] = []
        original = run.coord.secagg_post

        def spy(cid: str, task_id: str, stage: str, body: bytes, n: int | None = None,
                keep: list[bytes] = seen, post: Any = original) -> dict[str, Any]:
            if stage == "masked" and cid == "c0":
                keep.append(body)
            return dict(post(cid, task_id, stage, body, n))

        run.coord.secagg_post = spy  # type: ignore[method-assign]
        deltas = {"c0": (delta(value, -value, value), 10), "c1": DELTAS["c1"],
                  "c2": DELTAS["c2"]}
        run.round(deltas)
        views[name] += np.frombuffer(seen[0], "<u8")[:3].tolist()
        views[name] += np.frombuffer(seen[0], "<u8")[3:].tolist()
    bits = run.config.secagg_bits or 48
    for name in views:
        assert max(views[name]) < 2**bits
    assert stats.ks_2samp(views["small"], views["huge"]).pvalue > 1e-3


@pytest.mark.parametrize(("settings", "match"), [
    ({"strategy": "median"}, "needs every client's own update"),
    ({"strategy": "scaffold"}, "needs every client's own update"),
    ({"clip_norm": 1.0}, "with --clip-norm"),
    ({"max_update_norm": 0.0}, "norm bound"),
    ({"secagg_threshold": 1}, "at least 2"),
    ({"secagg_bits": 63}, "8 to 62"),
    ({"secagg_neighbours": 3}, "even number"),
    ({"secagg_neighbours": 2, "secagg_threshold": 4}, "neighbours"),
    ({"secagg_timeout": 0.0}, "positive"),
    ({"secagg": False, "secagg_bits": 32}, "applies with --secagg"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "1", "dp_clip_on": "server"},
     "drop --dp-clip-on server"),
    ({"dp_noise_multiplier": 1.0, "dp_clip": "1", "strategy": "median"},
     "replaces the aggregation rule"),
])
def test_settings_that_cannot_work_are_one_sentence(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ServerConfig(**{"secagg": True, **settings})


def private_round(deltas: dict[str, tuple[Weights, int]], config: ServerConfig,
                  weights: Weights) -> tuple[Weights, dict[str, float | int]]:
    """What DP-FedAvg over plainly sent updates gives for round 1 (the reference)."""
    from fedlearn.strategies import Update

    strategy = build_strategy(config)
    state = strategy.aggregate(strategy.init(weights),
                               [Update(d, n, {}, cid) for cid, (d, n) in sorted(deltas.items())],
                               num_clients=len(deltas))
    return state.weights, dict(state.scalars)


@pytest.mark.parametrize(("noise", "clip"), [(1.0, "0.25"), (0.3, "adaptive:0.5:0.25")])
def test_dp_fedavg_under_secagg_is_the_private_mean_of_the_clients_clipped_deltas(
        tmp_path: Path, stores: list[Store], noise: float, clip: str) -> None:
    """Each client clips its own delta and weighs it 1; the server adds DP's noise to the
    unmasked sum: the same model (to quantisation error), clip norm and ε as DP-FedAvg over
    plainly sent updates, with a client gone after its masked upload."""
    run = Run(tmp_path, stores, dp_noise_multiplier=noise, dp_clip=clip)
    assert run.coord.strategy.dp is not None
    parties = run.round(DELTAS, vanish_after_masked=frozenset({"c3"}))
    # The round's clip goes to the clients; c0's delta (norm 0.23) is the one left unclipped.
    assert all(p.block.dp_clip == pytest.approx(0.25) for p in parties.values())
    weights, scalars = private_round(DELTAS, run.config, INITIAL)
    np.testing.assert_allclose(run.coord.weights["w"], weights["w"], atol=1e-6)
    assert run.coord.state.scalars["dp/clip"] == pytest.approx(scalars["dp/clip"], rel=1e-9)
    if clip.startswith("adaptive"):
        assert scalars["dp/clip"] != pytest.approx(0.25)  # it moved, the same way
    plain = INITIAL["w"] + sum(min(1.0, 0.25 / float(np.linalg.norm(d["w"]))) * d["w"]
                               for d, _ in DELTAS.values()) / 4
    assert not np.allclose(run.coord.weights["w"], plain, atol=1e-3)  # the noise is there
    rec = run.records[0]
    assert rec["clients"] == 4 and rec["examples"] == 100 and rec["secagg_recovered"] == 1
    budget = privacy_budget(run.config, "fixed")
    assert rec["dp_epsilon"] == pytest.approx(budget.epsilon(1))


def test_async_mode_refuses_secagg() -> None:
    with pytest.raises(ConfigError, match="sync"):
        ServerConfig(secagg=True, mode="async", max_updates=5)


def test_an_unexpected_error_while_unmasking_fails_the_round_not_the_server(
        tmp_path: Path, stores: list[Store], monkeypatch: pytest.MonkeyPatch) -> None:
    run = Run(tmp_path, stores, n=3)
    deltas = {k: DELTAS[k] for k in ("c0", "c1", "c2")}

    def broken(self: Any) -> Any:
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as patch:
        patch.setattr("fedlearn.privacy.secagg_server.SecAggServer.result", broken)
        run.round(deltas)
    assert run.coord.state.version == 0 and "RuntimeError: disk on fire" in (
        run.coord.failures[0]["reason"])
    run.clock.advance(1)
    run.round(deltas)  # the round runs again, and this time it sums
    assert run.coord.state.version == 1 and run.records[0]["attempts"] == 2
