"""schemathesis against a real `fedlearn server`: no 5xx and no schema violation, any input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import cli_env
from tests.integration.procs import Procs, endpoint

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["plain", "secagg"])
def served(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    procs = Procs(cli_env(tmp), tmp / "logs")
    secagg = ["--secagg"] if request.param == "secagg" else []
    try:
        run_dir = tmp / "run"
        procs.start("server", ["server", "--port", "0", "--dataset", "digits", "--rounds", "1",
                               "--min-clients", "1", "--round-timeout", "600", "--no-docs",
                               *secagg, "--out", str(run_dir)])
        url = endpoint(run_dir)["url"]
        token = (run_dir / "join-token").read_text().strip()
        reply = httpx.post(f"{url}/api/register", json={"client_id": "fuzzer"},
                           headers={"Authorization": f"Bearer {token}"}, timeout=30)
        reply.raise_for_status()
        if secagg:  # a round needs two clients: then the fuzzer's round is open
            httpx.post(f"{url}/api/register", json={"client_id": "other"},
                       headers={"Authorization": f"Bearer {token}"},
                       timeout=30).raise_for_status()
        yield {"url": url, "token": token, "credential": reply.json()["credential"],
               "procs": procs, "secagg": bool(secagg)}
    finally:
        procs.stop_all()


def test_no_input_gives_a_5xx_or_breaks_the_schema(served: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_url(f"{served['url']}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/api/register", "/api/task", "/api/model", "/api/update", "/api/evaluate",
            "/api/status"} <= paths
    if served["secagg"]:
        assert {"/api/secagg/advert", "/api/secagg/keys", "/api/secagg/masked"} <= paths
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case: Any) -> None:
            polls = case.path == "/api/task" or case.path.startswith("/api/secagg/")
            if case.method == "GET" and polls and case.query is not None:
                case.query["wait"] = 0  # the long-poll would otherwise wait up to a minute
            for who in ("token", "credential"):  # the operator's view and a client's
                response = case.call(headers={"Authorization": f"Bearer {served[who]}"},
                                     timeout=30)
                assert response.status_code < 500, (case.method, case.path, response.text)
                # A safetensors body cannot be told apart from other bytes in a JSON
                # schema, so "schema-valid but refused" (a 400 for garbage bytes) is not
                # checked; every other check is.
                case.validate_response(response, excluded_checks=[positive_data_acceptance])

        check()
