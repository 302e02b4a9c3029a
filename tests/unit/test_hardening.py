"""What a hostile or careless client tries against the coordinators and the app, refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlearn.errors import ConflictError, PayloadError
from fedlearn.server.store import Store
from fedlearn.weights import check_delta, encode
from tests.unit.test_app import TOKEN, bearer, build, one_sentence, post_update, register, run
from tests.unit.test_app import serving as serve_app
from tests.unit.test_async_coordinator import Harness as AsyncHarness
from tests.unit.test_coordinator import Harness, global_w, vec


def test_an_overflowing_aggregate_fails_the_round_and_the_run_goes_on(
    tmp_path: Path, stores: list[Store],
) -> None:
    h = Harness(tmp_path, stores, max_update_norm=0)  # the norm check off: reach aggregation
    h.register("a", "b")
    assert h.coord.step()
    before = global_w(h.coord)
    for cid in h.sampled():
        h.coord.poll(cid)
        h.coord.submit(cid, 1, vec(3e38, 3e38), 1)
    assert h.coord.step()
    assert global_w(h.coord) == before  # the previous model stays
    status = h.coord.status()
    assert status["version"] == 0 and status["round"] == 1
    assert status["failures"][-1]["round"] == 1
    assert "unusable" in status["failures"][-1]["reason"]
    assert h.store.get_meta("failures")[-1]["reason"] == status["failures"][-1]["reason"]
    # Honest clients go on: the round runs again and finishes with their updates.
    h.finish_round(0.5)
    h.coord.step()
    assert h.coord.status()["version"] == 1
    assert global_w(h.coord) == [1.5, -0.5]


def test_an_absurd_delta_is_refused_with_the_default_norm_limit(
    tmp_path: Path, stores: list[Store],
) -> None:
    h = Harness(tmp_path, stores)
    h.register("a", "b")
    h.coord.step()
    h.coord.poll("a")
    with pytest.raises(PayloadError, match="--max-update-norm"):
        h.coord.submit("a", 1, vec(1e6, 1e6), 1)
    assert h.coord.status()["received"] == 0


def test_full_weights_sent_as_a_delta_are_refused() -> None:
    rng = np.random.default_rng(0)
    model = {"w": rng.normal(0, 0.1, (40, 40)).astype(np.float32),
             "n": np.array(3, np.int64)}
    honest = {"w": rng.normal(0, 0.01, (40, 40)).astype(np.float32), "n": np.array(1)}
    check_delta(honest, model, None)
    trained = {"w": model["w"] + honest["w"], "n": np.array(4)}
    with pytest.raises(PayloadError, match="full model weights"):
        check_delta(trained, model, None)


def test_a_replayed_sync_update_gets_the_same_answer_and_is_not_counted_twice(
    tmp_path: Path, stores: list[Store],
) -> None:
    h = Harness(tmp_path, stores, min_clients=2, rounds=2)
    h.register("a", "b")
    h.coord.step()
    task = h.coord.poll("a")
    first = h.coord.submit("a", 1, vec(1.0, 1.0), 1, task_id=task.task_id)
    again = h.coord.submit("a", 1, vec(9.0, 9.0), 1, task_id=task.task_id)
    assert again == first
    assert h.coord.status()["received"] == 1
    with pytest.raises(ConflictError, match="not this client's open task"):
        h.coord.submit("b", 1, vec(1.0, 1.0), 1, task_id="r1.0.a")


def test_one_async_client_cannot_flood_the_run(tmp_path: Path, stores: list[Store]) -> None:
    h = AsyncHarness(tmp_path, stores, max_updates=5)
    h.start("a", "b")
    task = h.coord.poll("a")
    h.coord.submit("a", 0, vec(1.0, 1.0), 1, task_id=task.task_id)
    for _ in range(30):  # the same task again and again: answered, never merged
        h.coord.submit("a", 0, vec(1.0, 1.0), 1, task_id=task.task_id)
    with pytest.raises(ConflictError, match="not this client's open task"):
        h.coord.submit("a", 1, vec(1.0, 1.0), 1, task_id="u7.a")
    assert h.coord.state.updates == 1 and not h.coord.done


def test_a_registered_id_cannot_be_taken_over(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores)
    cred = h.coord.register("victim", 10)
    with pytest.raises(ConflictError, match="already registered"):
        h.coord.register("victim", 10)
    assert h.coord.authenticate(cred) == "victim"


def test_max_clients_caps_registration(tmp_path: Path, stores: list[Store]) -> None:
    h = Harness(tmp_path, stores, max_clients=2)
    h.register("a", "b")
    with pytest.raises(ConflictError, match="--max-clients"):
        h.coord.register("c", 1)


def test_hostile_numbers_and_json_are_4xx_never_5xx(tmp_path: Path, stores: list[Store]) -> None:
    app, coord = build(tmp_path, stores, min_clients=1, rounds=1)

    async def scenario() -> None:
        async with serve_app(app) as client:
            nested = b"[" * 100_000 + b"]" * 100_000
            response = await client.post("/api/register", content=nested,
                                         headers={**bearer(TOKEN),
                                                  "Content-Type": "application/json"})
            assert response.status_code in (400, 413), response.text
            for n in (2**63, 10**400, -1):
                response = await client.post(
                    "/api/register", json={"client_id": "x", "num_examples": n},
                    headers=bearer(TOKEN))
                one_sentence(response, 400)
            cred = await register(client, "a")
            good = encode(vec(0.1, 0.1))
            for n in (2**63, 10**400, 0):
                one_sentence(await post_update(client, cred, good, round=1, num_examples=n),
                             422)
            response = await client.get("/api/status", headers=bearer(cred))
            body = response.json()
            assert body["you"]["client_id"] == "a" and isinstance(body["sampled"], int)
            assert coord.status()["version"] == 0

    run(scenario)


def test_sampled_clients_that_never_pick_up_their_task_are_replaced_in_seconds(
    tmp_path: Path, stores: list[Store],
) -> None:
    h = Harness(tmp_path, stores, min_clients=4, fraction=0.5, pickup_timeout=5.0,
                round_timeout=600.0)
    h.register("a", "b", "c", "d")
    h.coord.step()
    sampled = set(h.sampled())
    awake = sorted(sampled)[0]
    assert h.coord.poll(awake).action == "train"  # one picks up its task, the other never
    silent = (sampled - {awake}).pop()
    h.clock.advance(4.0)
    assert not h.coord.step()
    h.clock.advance(1.5)
    assert h.coord.step()  # pickup deadline: the silent one is swapped out
    now = set(h.sampled())
    assert awake in now and silent not in now and len(now) == 2
    for cid in sorted(now):
        h.coord.poll(cid)
        h.coord.submit(cid, 1, vec(1.0, 1.0), 1)
    assert h.coord.step()
    assert h.coord.status()["version"] == 1  # closed long before the 600 s deadline


def test_a_retried_registration_with_the_same_claim_is_the_same_client(
    tmp_path: Path, stores: list[Store],
) -> None:
    h = Harness(tmp_path, stores)
    first = h.coord.register("a", 10, claim="my-own-secret")  # the answer is lost ...
    again = h.coord.register("a", 10, claim="my-own-secret")  # ... so the client retries
    assert h.coord.authenticate(again) == "a"
    with pytest.raises(ConflictError, match="already registered"):
        h.coord.register("a", 10, claim="a-guess")
    assert first != again


def test_a_client_keeps_its_identity_in_a_private_file(tmp_path: Path) -> None:
    import stat

    from fedlearn.client.identity import load_identity, save_identity

    path = tmp_path / "creds" / "a.json"
    first = load_identity(str(path), "a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and "credential" not in first
    save_identity(str(path), {**first, "credential": "c1"})
    again = load_identity(str(path), "a")
    assert again["claim"] == first["claim"] and again["credential"] == "c1"
    assert load_identity(str(path), "b")["claim"] != first["claim"]  # another id: a new one


def test_a_clients_file_admits_only_listed_clients_with_their_own_tokens(
    tmp_path: Path, stores: list[Store],
) -> None:
    import hashlib

    from fedlearn.server.runner import read_clients_file

    listing = tmp_path / "clients.txt"
    listing.write_text("# who may join\nhospital-a " +
                       hashlib.sha256(b"token-of-a").hexdigest() + "\n")
    allowed = read_clients_file(listing)
    app, _ = build(tmp_path, stores, allowed=allowed)

    async def scenario() -> None:
        async with serve_app(app) as client:
            async def reg(cid: str, token: str) -> int:
                response = await client.post("/api/register", json={"client_id": cid},
                                             headers=bearer(token))
                return response.status_code

            assert await reg("hospital-a", "token-of-a") == 200
            assert await reg("hospital-a", TOKEN) == 401  # the join token admits nobody
            assert await reg("hospital-b", "token-of-a") == 401  # not listed
            assert await reg("hospital-a", "guess") == 401

    run(scenario)
    bad = tmp_path / "bad.txt"
    bad.write_text("hospital-a not-a-hash\n")
    with pytest.raises(Exception, match="SHA256"):
        read_clients_file(bad)


def test_registration_is_rate_limited_per_address() -> None:
    from fedlearn.errors import RateLimitedError
    from fedlearn.server.wire import RateLimit

    limit = RateLimit(burst=3, rate=1e-9)
    for _ in range(3):
        limit.take("10.0.0.1")
    with pytest.raises(RateLimitedError, match="retry"):
        limit.take("10.0.0.1")
    limit.take("10.0.0.2")  # another address has its own bucket


def test_a_damaged_checkpoint_falls_back_with_its_own_strategy_state(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for version in (1, 2):
        store.commit_round({"round": version}, {"model/w": np.full(2, version, np.float32)}, {},
                           metadata={"fedlearn.state": f"state {version}"})
    newest = tmp_path / "checkpoints" / "global-000002.safetensors"
    newest.write_bytes(newest.read_bytes()[:-3])
    found = store.load_checkpoint()
    assert found is not None and found.key == 1
    assert found.metadata == {"fedlearn.state": "state 1"}
    assert found.arrays["model/w"].tolist() == [1.0, 1.0]
    store.close()
