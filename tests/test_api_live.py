"""The API as deployed: ``agentpg serve`` (uvicorn) in a child process, spoken to over a real TCP socket,
and schemathesis throwing generated requests at every operation of its /openapi.json."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import schemathesis
from api_support import LiveServer, Transcript, assert_problem, bearer, uid
from helpers import global_uri
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentpg.app.runtime import Runtime

EXAMPLES = 10


@pytest.fixture(scope="module")
def live(live_server: LiveServer, admin_token: str, api_transcript: Transcript) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, headers=bearer(admin_token), timeout=60,
                      event_hooks={"response": [api_transcript.record_response]}) as client:
        yield client


def test_serve_end_to_end_over_tcp(live: httpx.Client, runtime: Runtime) -> None:
    assert live.get("/healthz").json() == {"status": "ok"}
    assert live.get("/readyz").json()["status"] == "ready"
    assert live.get("/openapi.json").json()["info"]["title"] == "agentpg"
    user, ws = uid("lu"), uid("lw")
    assert live.post("/api/users", json={"id": user}).status_code == 201
    created = live.post(f"/api/users/{user}/workspaces", json={"id": ws})
    assert created.status_code == 201 and created.json()["agent_token"]["token"].startswith("apg_g_")
    with psycopg.connect(global_uri(runtime, user), autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO notes SELECT g, 'note ' || g FROM generate_series(1, 20000) g")
    tables = live.get(f"/api/users/{user}/global-database/tables").json()["tables"]
    assert [t["name"] for t in tables] == ["notes"]
    page = live.post(f"/api/users/{user}/global-database/query", json={"table": "notes", "limit": 2, "offset": 5})
    assert page.json()["rows"] == [{"id": 6, "body": "note 6"}, {"id": 7, "body": "note 7"}]
    assert page.json()["total"] == 20000
    with live.stream("GET", f"/api/users/{user}/global-database/tables/notes/export?format=json") as stream:
        assert stream.headers.get("transfer-encoding") == "chunked"
        chunks = list(stream.iter_bytes())
    rows = json.loads(b"".join(chunks))
    assert len(rows) == 20000 and rows[-1] == {"id": 20000, "body": "note 20000"}
    assert_problem(live.get(f"/api/users/{user}", headers={"Authorization": "Bearer wrong"}), 401)
    assert_problem(live.get(f"/api/users/{user}", headers=bearer(created.json()["agent_token"]["token"])), 403, "MCP")
    metrics = live.get("/metrics").text
    assert 'route="/api/users/{user_id}/global-database/query",status="200"' in metrics
    assert live.delete(f"/api/users/{user}").status_code == 204


def test_oversized_bodies_over_real_http(live_server: LiveServer, admin_token: str) -> None:
    """uvicorn, not a test transport: a declared and a chunked 2 MiB body are both refused with 413."""
    with httpx.Client(base_url=live_server.base_url, headers=bearer(admin_token), timeout=30) as client:
        big = b'{"id": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        assert_problem(client.post("/api/users", content=big, headers={"content-type": "application/json"}), 413)
        chunked = client.post("/api/users", content=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                              headers={"content-type": "application/json"})
        assert_problem(chunked, 413, "larger than the limit")
        # Raw HTTP with a lying Content-Length is refused before a byte of the body is read.
        conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=10)
        conn.putrequest("POST", "/api/users")
        conn.putheader("Authorization", f"Bearer {admin_token}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10 * 1024 * 1024 * 1024))
        conn.endheaders()
        answer = conn.getresponse()
        assert answer.status == 413 and answer.getheader("content-type") == "application/problem+json"
        conn.close()


def test_a_failing_export_drops_the_connection(live: httpx.Client, runtime: Runtime) -> None:
    """Over real HTTP, an export whose read fails after its 200 ends with a broken chunked stream, so a client
    cannot mistake the part it got for the whole table."""
    user = uid("cut")
    live.post("/api/users", json={"id": user})
    with psycopg.connect(global_uri(runtime, user), autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("CREATE FUNCTION boom() RETURNS int LANGUAGE sql AS 'SELECT 1 / 0'")
        conn.execute("CREATE VIEW v AS SELECT boom() AS x")
    with pytest.raises(httpx.RemoteProtocolError):
        live.get(f"/api/users/{user}/global-database/tables/v/export")
    assert live.get("/healthz").status_code == 200
    live.delete(f"/api/users/{user}")


@pytest.fixture(scope="module")
def seeded(live: httpx.Client, runtime: Runtime) -> Iterator[dict[str, str]]:
    """A user and workspace that exist, each database with a table, so generated requests reach real data."""
    user, ws = uid("st"), uid("sw")
    live.post("/api/users", json={"id": user})
    live.post(f"/api/users/{user}/workspaces", json={"id": ws})
    with psycopg.connect(global_uri(runtime, user), autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, label text, price numeric, tags text[])")
        conn.execute("INSERT INTO items SELECT g, 'item ' || g, g * 1.5, ARRAY['t' || g] FROM generate_series(1, 50) g")
    yield {"user_id": user, "workspace_id": ws, "table": "items"}
    live.delete(f"/api/users/{user}")


@pytest.mark.parametrize(("mode", "known_ids"), [(GenerationMode.POSITIVE, False), (GenerationMode.NEGATIVE, False),
                                                 (GenerationMode.POSITIVE, True)],
                         ids=["positive", "negative", "positive-existing-ids"])
def test_openapi_conformance(live_server: LiveServer, admin_token: str, api_transcript: Transcript,
                             seeded: dict[str, str], mode: GenerationMode, known_ids: bool) -> None:
    """schemathesis on every operation of /openapi.json, as the admin: valid data, invalid data, and valid
    data aimed at a user, workspace and table that exist. Never a 5xx; every answer as documented (status,
    content type, headers, body schema); invalid input always refused.

    Driven through schemathesis' Python API (its pytest plugin does not run under pytest 9)."""
    schema = schemathesis.openapi.from_url(f"{live_server.base_url}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance, negative_data_rejection]
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        if known_ids and operation.method.upper() == "DELETE" and operation.path in (
                "/api/users/{user_id}", "/api/workspaces/{workspace_id}",
                "/api/users/{user_id}/workspaces/{workspace_id}"):
            continue  # would delete the seeded tenant under the other operations' feet; tested explicitly
        fixed = {name: value for name, value in seeded.items() if known_ids and f"{{{name}}}" in operation.path}

        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed or None))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call_and_validate(headers=bearer(admin_token), checks=checks)
            api_transcript.record(f"schemathesis {case.method} {case.path} -> {response.status_code}",
                                  "\n".join(f"{k}: {v}" for k, v in response.headers.items()) + "\n" + response.text)

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid: the operation takes no input (e.g. /healthz)
            assert mode is GenerationMode.NEGATIVE and not operation.label.startswith(("POST", "PUT"))
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert operations >= 25
    assert not failures, "\n\n".join(failures)
