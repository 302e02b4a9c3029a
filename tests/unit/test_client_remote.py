"""RemoteServer against httpx.MockTransport (request shapes, error mapping) and the backoff."""

from __future__ import annotations

import json
import random
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedlearn.client.remote import (
    RemoteServer,
    RetriesExhausted,
    ServerUnavailable,
    Task,
    backoff_delay,
    with_retries,
)
from fedlearn.errors import AuthError, ConfigError, ConflictError, PayloadError, RemoteError
from fedlearn.weights import decode, encode

URL = "http://fl.test:8000"
REG = {"client_id": "c1", "credential": "cred-1", "run_id": "run-7", "mode": "sync",
       "dataset": "digits", "model": "mlp", "rounds": 3}

Handler = Callable[[httpx.Request], httpx.Response]


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"fc1.weight": rng.normal(size=(4, 3)).astype(np.float32),
            "fc1.bias": rng.normal(size=(4,)).astype(np.float32)}


def server(handler: Handler, seen: list[httpx.Request] | None = None) -> RemoteServer:
    def record(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            request.read()
            seen.append(request)
        return handler(request)

    return RemoteServer(URL, "join-tok", transport=httpx.MockTransport(record))


def registered(handler: Handler, seen: list[httpx.Request] | None = None) -> RemoteServer:
    def both(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/register":
            return httpx.Response(200, json=REG)
        return handler(request)

    remote = server(both, seen)
    remote.register("c1", 10)
    return remote


def test_register_sends_join_token_and_later_calls_the_credential() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/register":
            return httpx.Response(200, json=REG)
        return httpx.Response(200, json={"action": "wait"})

    with server(handler, seen) as remote:
        reg = remote.register("c1", 1234)
        assert remote.next_task(5) == Task("wait")
    assert (reg.credential, reg.run_id, reg.mode, reg.dataset, reg.model, reg.rounds) == (
        "cred-1", "run-7", "sync", "digits", "mlp", 3)
    assert (reg.task, reg.config) == ("", {})  # an answer without them still parses
    assert "cred-1" not in repr(reg)
    first, second = seen
    assert first.method == "POST" and str(first.url) == f"{URL}/api/register"
    assert first.headers["authorization"] == "Bearer join-tok"
    assert json.loads(first.content) == {"client_id": "c1", "num_examples": 1234}
    assert second.headers["authorization"] == "Bearer cred-1"


def test_register_sends_the_task_identity_and_reads_the_task_and_config() -> None:
    seen: list[httpx.Request] = []
    config = {"epochs": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.05, "mu": 0.1}
    body = {**REG, "task": "digits/mlp", "config": config}
    remote = server(lambda r: httpx.Response(200, json=body), seen)
    identity = {"name": "digits/mlp",
                "spec": {"fc1.bias": {"shape": [4], "dtype": "float32"}}}
    reg = remote.register("c1", 719, num_test_examples=80, task=identity)
    assert (reg.task, reg.config) == ("digits/mlp", config)
    assert json.loads(seen[-1].content) == {"client_id": "c1", "num_examples": 719,
                                            "num_test_examples": 80, "task": identity}
    # Without examples (a client still learning which model the server runs):
    remote.register("c1", None)
    assert json.loads(seen[-1].content) == {"client_id": "c1"}
    # A test-set count of 0 is sent, not dropped.
    remote.register("c1", 5, num_test_examples=0)
    assert json.loads(seen[-1].content) == {"client_id": "c1", "num_examples": 5,
                                            "num_test_examples": 0}


@pytest.mark.parametrize("missing", ["credential", "run_id", "mode", "rounds"])
def test_register_refuses_an_answer_without_a_field(missing: str) -> None:
    body = {k: v for k, v in REG.items() if k != missing}
    remote = server(lambda r: httpx.Response(200, json=body))
    with pytest.raises(RemoteError, match=missing):
        remote.register("c1", 1)
    assert remote.credential is None


def test_next_task_long_polls_and_parses_actions() -> None:
    seen: list[httpx.Request] = []
    answers = iter([{"action": "train", "round": 4, "version": 3, "seed": 99,
                     "task_id": "r4.0.c1", "config": {"lr": 0.1, "epochs": 2}},
                    {"action": "done"}, {"action": "wait"},
                    {"action": "evaluate", "round": 2, "version": 6, "task_id": "e2.c1"},
                    {"action": "train", "round": 5, "version": 4, "seed": 1}])
    remote = registered(lambda r: httpx.Response(200, json=next(answers)), seen)
    assert remote.next_task(30.0) == Task("train", round=4, version=3, seed=99,
                                          task_id="r4.0.c1", config={"lr": 0.1, "epochs": 2})
    assert remote.next_task(500) == Task("done")
    assert remote.next_task(0.5) == Task("wait")
    assert remote.next_task(1) == Task("evaluate", round=2, version=6, task_id="e2.c1")
    # An older server's train task: no task id, no config (the registration's config holds).
    assert remote.next_task(1) == Task("train", round=5, version=4, seed=1, task_id="",
                                       config=None)
    waits = [r.url.params["wait"] for r in seen if r.url.path == "/api/task"]
    assert waits == ["30", "60", "0.5", "1", "1"]  # capped at the protocol's 60 s


@pytest.mark.parametrize("body", [{"action": "explode"}, {"action": "train", "round": 1},
                                  {"action": "evaluate", "round": 1},
                                  {"action": "train", "version": "x"},
                                  ["not", "an", "object"]])
def test_next_task_refuses_malformed_answers(body: object) -> None:
    remote = registered(lambda r: httpx.Response(200, json=body))
    with pytest.raises(RemoteError):
        remote.next_task(1)


def test_get_model_decodes_safetensors_and_reads_the_version() -> None:
    w = weights()
    seen: list[httpx.Request] = []
    remote = registered(lambda r: httpx.Response(
        200, content=encode(w), headers={"X-Fedlearn-Version": "5"}), seen)
    got, version = remote.get_model()
    assert version == 5
    assert set(got) == set(w)
    for k in w:
        np.testing.assert_array_equal(got[k], w[k])
    assert seen[-1].headers["authorization"] == "Bearer cred-1"


def test_get_model_without_version_or_with_junk_is_refused() -> None:
    remote = registered(lambda r: httpx.Response(200, content=encode(weights())))
    with pytest.raises(RemoteError, match="X-Fedlearn-Version"):
        remote.get_model()
    junk = registered(lambda r: httpx.Response(200, content=b"\x00" * 20,
                                               headers={"X-Fedlearn-Version": "1"}))
    with pytest.raises(PayloadError):
        junk.get_model()


def test_submit_update_sends_safetensors_delta_and_query() -> None:
    delta = weights()
    seen: list[httpx.Request] = []
    remote = registered(lambda r: httpx.Response(200, json={"accepted": True, "round": 2}), seen)
    remote.submit_update(2, delta, 640, {"train_loss": 0.25, "train_accuracy": 0.875,
                                         "seconds": 1.5, "other": 3}, "r2.0.c1")
    req = seen[-1]
    assert req.method == "POST" and req.url.path == "/api/update"
    assert req.headers["authorization"] == "Bearer cred-1"
    assert req.headers["content-type"] == "application/octet-stream"
    params = dict(req.url.params)
    # Every finite metric travels in one compact JSON object; no legacy per-metric params.
    assert params == {"round": "2", "num_examples": "640", "task_id": "r2.0.c1",
                      "metrics": params["metrics"]}
    assert params["metrics"] == ('{"train_loss":0.25,"train_accuracy":0.875,"seconds":1.5,'
                                 '"other":3.0}')
    assert json.loads(params["metrics"]) == {"train_loss": 0.25, "train_accuracy": 0.875,
                                             "seconds": 1.5, "other": 3.0}
    back = decode(req.content)
    assert set(back) == set(delta)
    for k in delta:
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], delta[k])


def test_submit_update_leaves_out_non_finite_metrics() -> None:
    seen: list[httpx.Request] = []
    remote = registered(lambda r: httpx.Response(200, json={"accepted": True, "round": 1}), seen)
    remote.submit_update(1, weights(), 3, {"train_loss": float("nan"), "seconds": 2.0,
                                           "x": float("inf"), "y": float("-inf")})
    assert dict(seen[-1].url.params) == {"round": "1", "num_examples": "3",
                                         "metrics": '{"seconds":2.0}'}
    remote.submit_update(1, weights(), 3, {"train_loss": float("nan")})  # none left: {}
    assert dict(seen[-1].url.params) == {"round": "1", "num_examples": "3", "metrics": "{}"}


def test_submit_evaluation_sends_the_round_count_and_metrics() -> None:
    seen: list[httpx.Request] = []
    remote = registered(lambda r: httpx.Response(200, json={"accepted": True, "round": 2}), seen)
    remote.submit_evaluation(2, {"loss": 0.5, "accuracy": 0.75, "auc": float("nan")}, 40)
    req = seen[-1]
    assert req.method == "POST" and req.url.path == "/api/evaluate"
    assert req.headers["authorization"] == "Bearer cred-1"
    assert dict(req.url.params) == {"round": "2", "num_examples": "40",
                                    "metrics": '{"loss":0.5,"accuracy":0.75}'}
    assert req.content == b""
    remote.submit_evaluation(3, {}, 0)  # no local test data
    assert dict(seen[-1].url.params) == {"round": "3", "num_examples": "0", "metrics": "{}"}


def test_a_refused_evaluation_is_a_conflict() -> None:
    remote = registered(lambda r: httpx.Response(409, json={"detail": "no evaluation open."}))
    with pytest.raises(ConflictError, match="no evaluation open"):
        remote.submit_evaluation(1, {"loss": 1.0}, 3)


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, AuthError), (409, ConflictError), (400, RemoteError), (404, RemoteError),
     (413, RemoteError), (422, RemoteError)],
)
def test_4xx_maps_to_errors_carrying_the_detail(status: int, error: type[Exception]) -> None:
    detail = "the round is closed; wait for the next task."
    remote = server(lambda r: httpx.Response(status, json={"detail": detail}))
    with pytest.raises(error, match="the round is closed") as info:
        remote.status()
    assert type(info.value) is error  # never ServerUnavailable, so never retried


def test_validation_error_lists_are_readable() -> None:
    body = {"detail": [{"loc": ["query", "round"], "msg": "Field required"}]}
    remote = server(lambda r: httpx.Response(422, json=body))
    with pytest.raises(RemoteError, match=r"query\.round: Field required"):
        remote.submit_update(1, weights(), 1, {})


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_unavailable(status: int) -> None:
    remote = server(lambda r: httpx.Response(status, text="upstream gone"))
    with pytest.raises(ServerUnavailable, match=str(status)) as info:
        remote.status()
    assert info.value.url == URL


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"),
                                 httpx.RemoteProtocolError("cut")])
def test_transport_errors_are_unavailable(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(ServerUnavailable, match=type(exc).__name__):
        server(handler).next_task(1)


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://x", "http://", ""])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        RemoteServer(url, "tok")


def test_empty_token_and_missing_ca_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token"):
        RemoteServer(URL, "")
    with pytest.raises(ConfigError, match="CA file"):
        RemoteServer("https://fl.test", "tok", ca_file=tmp_path / "missing.pem")


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake between the two contexts in memory; raises what the client raises."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(20):
        done = 0
        for side in (c, s):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return
    raise AssertionError("the TLS handshake did not finish")


def test_ca_file_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trustme = pytest.importorskip("trustme")
    ca, other = trustme.CA(), trustme.CA()
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    made: list[dict[str, object]] = []
    real_client = httpx.Client

    def client(*args: object, **kwargs: object) -> httpx.Client:
        made.append(kwargs)
        return real_client(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(httpx, "Client", client)
    RemoteServer("https://fl.test", "tok", ca_file=pem).close()
    RemoteServer("https://fl.test", "tok").close()
    assert len(made) == 2
    ctx = made[0]["verify"]
    assert made[1]["verify"] is True  # without --ca-file: the system's trust store
    # The client verifies the server against the given CA (and the host name)...
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    ca_der = ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())
    assert ca_der in ctx.get_ca_certs(binary_form=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("fl.test").configure_cert(server)
    handshake(ctx, server, "fl.test")
    # ...and refuses a certificate from another CA, or for another host.
    stranger = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other.issue_cert("fl.test").configure_cert(stranger)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ctx, stranger, "fl.test")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ctx, server, "elsewhere.test")


@pytest.mark.parametrize("content", [None, "", "not a certificate\n"])
def test_unusable_ca_file_is_a_one_sentence_config_error(
    tmp_path: Path, content: str | None
) -> None:
    pem = tmp_path / "ca.pem"
    if content is not None:
        pem.write_text(content)
    with pytest.raises(ConfigError) as info:
        RemoteServer("https://fl.test", "tok", ca_file=pem)
    message = str(info.value)
    assert message.startswith(f"cannot use CA file {pem} (") and "\n" not in message
    assert message.endswith("pass the PEM certificate the server uses with --ca-file.")


# --- backoff -----------------------------------------------------------------------------


class UpperBound(random.Random):
    """An rng whose uniform(a, b) always returns b and remembers the bounds."""

    def __init__(self) -> None:
        super().__init__(0)
        self.bounds: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append((a, b))
        return b


def failing(times: int, result: str = "ok") -> tuple[Callable[[], str], list[int]]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise ServerUnavailable("down", url=URL)
        return result

    return fn, calls


def test_backoff_grows_exponentially_capped_at_max_wait() -> None:
    slept: list[float] = []
    rng = UpperBound()
    fn, calls = failing(7)
    assert with_retries(fn, max_retries=10, max_wait=5.0, base=0.5, rng=rng,
                        sleep=slept.append) == "ok"
    assert len(calls) == 8
    assert slept == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert rng.bounds == [(d / 2, d) for d in slept]


def test_backoff_jitter_stays_within_bounds() -> None:
    slept: list[float] = []
    fn, _ = failing(12)
    with_retries(fn, max_retries=12, max_wait=3.0, base=0.25, rng=random.Random(1),
                 sleep=slept.append)
    for k, s in enumerate(slept):
        d = min(3.0, 0.25 * 2**k)
        assert d / 2 <= s <= d
    assert len(set(slept)) > 1


def test_gives_up_after_max_retries_with_a_sentence() -> None:
    slept: list[float] = []
    fn, calls = failing(100)
    with pytest.raises(RemoteError, match="after 4 tries") as info:
        with_retries(fn, max_retries=3, max_wait=1.0, rng=random.Random(0), sleep=slept.append)
    # a RemoteError that is not itself retried again, and that async clients can tell apart
    assert type(info.value) is RetriesExhausted
    assert not isinstance(info.value, ServerUnavailable)
    assert len(calls) == 4 and len(slept) == 3
    msg = str(info.value)
    assert msg.startswith(f"could not reach the server at {URL} after 4 tries")
    assert "`fedlearn server` is running and --server is right." in msg


def test_zero_retries_tries_once() -> None:
    slept: list[float] = []
    fn, calls = failing(1)
    with pytest.raises(RemoteError, match="after 1 tries"):
        with_retries(fn, max_retries=0, max_wait=1.0, sleep=slept.append)
    assert len(calls) == 1 and slept == []


def test_only_unavailable_is_retried() -> None:
    slept: list[float] = []
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        raise ConflictError("closed")

    with pytest.raises(ConflictError):
        with_retries(fn, max_retries=5, max_wait=1.0, sleep=slept.append)
    assert len(calls) == 1 and slept == []


def test_backoff_resets_after_success() -> None:
    slept: list[float] = []
    rng = UpperBound()
    fn, _ = failing(3)
    with_retries(fn, max_retries=5, max_wait=10.0, rng=rng, sleep=slept.append)
    fn2, _ = failing(2)
    with_retries(fn2, max_retries=5, max_wait=10.0, rng=rng, sleep=slept.append)
    assert slept == [0.5, 1.0, 2.0, 0.5, 1.0]


def test_on_retry_reports_each_retry() -> None:
    seen: list[tuple[int, float]] = []
    fn, _ = failing(2)
    with_retries(fn, max_retries=5, max_wait=10.0, rng=UpperBound(), sleep=lambda s: None,
                 on_retry=lambda n, s, e: seen.append((n, s)))
    assert seen == [(1, 0.5), (2, 1.0)]


def test_default_budget_rides_out_a_long_restart() -> None:
    delays = [backoff_delay(k, base=0.5, max_wait=10.0) for k in range(30)]
    assert sum(delays) == pytest.approx(265.5)
    assert sum(delays) / 2 == pytest.approx(132.75)
    assert backoff_delay(10_000, base=0.5, max_wait=10.0) == 10.0


def test_unreachable_server_gives_up_with_its_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    remote = server(handler)
    with pytest.raises(RemoteError, match=f"server at {URL} after 3 tries"):
        with_retries(lambda: remote.next_task(1), max_retries=2, max_wait=0.01,
                     sleep=lambda s: None)
