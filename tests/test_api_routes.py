"""Every REST route, through HTTP against the ASGI app (lifespan run, real embedded Postgres, nothing mocked)."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from api_support import assert_problem, bearer, uid
from helpers import env_value, global_uri
from mcp_support import PROCESS_INVALIDATION

from agentpg.app.runtime import Runtime
from agentpg.lifecycle import deps as lifecycle_deps
from agentpg.service import ID_PATTERN
from agentpg.settings import Settings


@pytest.fixture()
def admin_h(admin_token: str) -> dict[str, str]:
    return bearer(admin_token)


def test_health_docs_and_openapi(api_client: Any) -> None:
    assert api_client.get("/healthz").json() == {"status": "ok"}
    ready = api_client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "catalog": "ok", "postgres": "ok"}
    assert "swagger" in api_client.get("/docs").text.lower()
    spec = api_client.get("/openapi.json").json()
    assert "Problem" in spec["components"]["schemas"] and "HTTPValidationError" not in spec["components"]["schemas"]
    operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()
                  if path.startswith("/api/")]
    assert len(operations) >= 22
    for path, method, op in operations:
        for status in ("401", "404", "422", "500"):
            assert list(op["responses"][status]["content"]) == ["application/problem+json"], (path, method)
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_id_pattern_mirrors_the_lifecycle_validation() -> None:
    assert ID_PATTERN.strip("^$") == lifecycle_deps._ID_PATTERN.pattern


def test_user_register_get_list_and_delete(api_client: Any, admin_h: dict[str, str], runtime: Runtime) -> None:
    users = [uid("ru") for _ in range(3)]
    for user in users:
        created = api_client.post("/api/users", json={"id": user, "email": f"{user}@example.com"}, headers=admin_h)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["id"] == user and body["status"] == "active"
        assert set(body["global_database"]) == {"name", "status", "ownership_type", "provider", "created_at",
                                                "current_period_cost_cents"}
        assert body["global_database"]["status"] == "ready" and body["global_database"]["ownership_type"] == "platform"
        assert global_uri(runtime, user).split("/")[-1] == body["global_database"]["name"]
    assert_problem(api_client.post("/api/users", json={"id": users[0]}, headers=admin_h), 409, "already exists")

    got = api_client.get(f"/api/users/{users[1]}", headers=admin_h)
    assert got.status_code == 200 and got.json()["email"] == f"{users[1]}@example.com"
    db = api_client.get(f"/api/users/{users[1]}/global-database", headers=admin_h)
    assert db.status_code == 200 and db.json() == got.json()["global_database"]

    seen, cursor = [], None  # keyset pagination, two at a time, finds all three in id order
    while True:
        page = api_client.get("/api/users", params={"limit": 2, **({"cursor": cursor} if cursor else {})},
                              headers=admin_h).json()
        assert len(page["items"]) <= 2
        seen += [u["id"] for u in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert set(users) <= set(seen) and seen == sorted(seen)

    for user in users:
        deleted = api_client.delete(f"/api/users/{user}", headers=admin_h)
        assert deleted.status_code == 204 and deleted.content == b""
        assert_problem(api_client.get(f"/api/users/{user}", headers=admin_h), 404, "does not exist")
    assert_problem(api_client.delete(f"/api/users/{users[0]}", headers=admin_h), 404)


def test_workspace_create_get_list_tokens_and_delete(api_client: Any, admin_h: dict[str, str]) -> None:
    user, ws1, ws2 = uid("wu"), uid("ws"), uid("ws")
    assert api_client.post("/api/users", json={"id": user}, headers=admin_h).status_code == 201
    created = api_client.post(f"/api/users/{user}/workspaces", json={"id": ws1, "name": "first"}, headers=admin_h)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"] == ws1 and body["user_id"] == user and body["name"] == "first" and body["status"] == "active"
    assert body["database"]["status"] == "ready"
    token = body["agent_token"]
    assert token["kind"] == "agent" and token["token"].startswith("apg_g_") and token["workspace_id"] == ws1
    assert api_client.post(f"/api/users/{user}/workspaces", json={"id": ws2}, headers=admin_h).status_code == 201
    assert_problem(api_client.post(f"/api/users/{user}/workspaces", json={"id": ws1}, headers=admin_h), 409)

    assert api_client.get(f"/api/workspaces/{ws1}", headers=admin_h).json()["database"] == body["database"]
    assert api_client.get(f"/api/workspaces/{ws1}/database", headers=admin_h).json() == body["database"]
    listed = api_client.get(f"/api/users/{user}/workspaces", headers=admin_h).json()
    assert [w["id"] for w in listed["items"]] == sorted([ws1, ws2]) and listed["next_cursor"] is None

    more = api_client.post(f"/api/workspaces/{ws1}/tokens", json={"name": "ci"}, headers=admin_h)
    assert more.status_code == 201 and more.json()["kind"] == "agent" and more.json()["name"] == "ci"
    assert more.json()["token"] != token["token"]
    # An agent token is a real credential: it authenticates (and is then refused on REST).
    assert_problem(api_client.get(f"/api/workspaces/{ws1}", headers=bearer(token["token"])), 403, "MCP")

    assert api_client.delete(f"/api/workspaces/{ws1}", headers=admin_h).status_code == 204
    assert_problem(api_client.get(f"/api/workspaces/{ws1}", headers=admin_h), 404)
    assert_problem(api_client.get(f"/api/workspaces/{ws1}", headers=bearer(token["token"])), 401)
    assert [w["id"] for w in api_client.get(f"/api/users/{user}/workspaces", headers=admin_h).json()["items"]] == [ws2]
    assert api_client.delete(f"/api/users/{user}", headers=admin_h).status_code == 204
    assert_problem(api_client.get(f"/api/workspaces/{ws2}", headers=admin_h), 404)


def test_user_tokens_issue_use_and_revoke(api_client: Any, admin_h: dict[str, str]) -> None:
    user = uid("tu")
    api_client.post("/api/users", json={"id": user}, headers=admin_h)
    issued = api_client.post(f"/api/users/{user}/tokens", json={"name": "backend"}, headers=admin_h)
    assert issued.status_code == 201
    tok = issued.json()
    assert tok["kind"] == "user" and tok["token"].startswith("apg_u_") and tok["user_id"] == user
    bare = api_client.post(f"/api/users/{user}/tokens", headers=admin_h)  # the body is optional
    assert bare.status_code == 201 and bare.json()["name"] is None

    mine = bearer(tok["token"])
    assert api_client.get(f"/api/users/{user}", headers=mine).status_code == 200
    # A user token may revoke its own user's tokens, itself included.
    assert api_client.delete(f"/api/tokens/{bare.json()['id']}", headers=mine).status_code == 204
    assert_problem(api_client.get(f"/api/users/{user}", headers=bearer(bare.json()["token"])), 401)
    assert api_client.delete(f"/api/tokens/{tok['id']}", headers=admin_h).status_code == 204
    assert_problem(api_client.get(f"/api/users/{user}", headers=mine), 401)
    assert_problem(api_client.delete(f"/api/tokens/{tok['id']}", headers=admin_h), 404, "does not exist")
    api_client.delete(f"/api/users/{user}", headers=admin_h)


def test_env_vars_names_only_values_sealed_managed_refused(api_client: Any, admin_h: dict[str, str],
                                                           runtime: Runtime) -> None:
    user, ws = uid("eu"), uid("ew")
    api_client.post("/api/users", json={"id": user}, headers=admin_h)
    api_client.post(f"/api/users/{user}/workspaces", json={"id": ws}, headers=admin_h)
    secret_value = "sk-live-" + uid("v")
    first = api_client.put(f"/api/users/{user}/env/OPENAI_API_KEY", json={"value": secret_value}, headers=admin_h)
    assert first.status_code == 201 and first.json()["name"] == "OPENAI_API_KEY" and not first.json()["managed"]
    again = api_client.put(f"/api/users/{user}/env/OPENAI_API_KEY", json={"value": secret_value + "2"}, headers=admin_h)
    assert again.status_code == 200 and again.json()["updated_at"] is not None
    assert env_value(runtime, user, "OPENAI_API_KEY") == secret_value + "2"  # sealed, and opens to the value

    listing = api_client.get(f"/api/users/{user}/env", headers=admin_h)
    assert listing.status_code == 200 and secret_value not in listing.text
    items = {(i["name"], i["workspace_id"]): i["managed"] for i in listing.json()["items"]}
    assert items == {("OPENAI_API_KEY", None): False, ("GLOBAL_DB_URL", None): True, ("AGENT_DB_URL", ws): True}
    for name in ("GLOBAL_DB_URL", "AGENT_DB_URL"):
        assert_problem(api_client.put(f"/api/users/{user}/env/{name}", json={"value": "postgresql://evil"},
                                      headers=admin_h), 403, "managed by agentpg")
        assert_problem(api_client.delete(f"/api/users/{user}/env/{name}", headers=admin_h), 403, "managed by agentpg")
    with psycopg.connect(env_value(runtime, user, "GLOBAL_DB_URL")) as conn:  # untouched, still works
        conn.execute("SELECT 1")
    assert api_client.delete(f"/api/users/{user}/env/OPENAI_API_KEY", headers=admin_h).status_code == 204
    assert_problem(api_client.delete(f"/api/users/{user}/env/OPENAI_API_KEY", headers=admin_h), 404)
    assert [i["name"] for i in api_client.get(f"/api/users/{user}/env", headers=admin_h).json()["items"]] == [
        "GLOBAL_DB_URL", "AGENT_DB_URL"]
    api_client.delete(f"/api/users/{user}", headers=admin_h)


def test_metrics_count_requests_by_route_template_and_provisioning(api_client: Any,
                                                                   admin_h: dict[str, str]) -> None:
    user = uid("mu")
    api_client.post("/api/users", json={"id": user}, headers=admin_h)
    api_client.get(f"/api/users/{user}", headers=admin_h)
    api_client.delete(f"/api/users/{user}", headers=admin_h)
    text = api_client.get("/metrics").text
    assert 'agentpg_http_requests_total{method="GET",route="/api/users/{user_id}",status="200"}' in text
    assert 'agentpg_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/api/users"}' in text
    assert 'agentpg_provisioning_operations_total{operation="register_user",outcome="ok"}' in text
    assert 'agentpg_provisioning_duration_seconds_count{operation="delete_user"}' in text
    assert user not in text  # ids never become labels


def test_an_unexpected_exception_is_a_bare_500_problem(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """The guard: no traceback text, exception message or driver detail reaches the client or the log."""
    import warnings

    from agentpg.app.asgi import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    app = create_app(settings, invalidation=PROCESS_INVALIDATION)
    secret = "postgresql://apg_0000000000000000_login:not-a-real-password@127.0.0.1/x"

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError(f"connection to {secret} failed")

    with TestClient(app) as client:
        response = client.get("/boom")
        body = assert_problem(response, 500, "unexpected")
        assert body["code"] == "internal" and "RuntimeError" not in response.text and secret not in response.text
        assert client.get("/healthz").status_code == 200  # and the app carries on
        assert 'route="/boom",status="500"' in client.get("/metrics").text
    logged = [r for r in caplog.records if r.name == "agentpg.api.middleware"]
    assert logged and "RuntimeError" in logged[0].getMessage()
    assert all(secret not in r.getMessage() and "not-a-real-password" not in r.getMessage() for r in caplog.records)


def test_metrics_sample_the_event_loop_lag(api_client: Any) -> None:
    """serve's loop is sampled every 50 ms while it runs: the count grows between two scrapes."""

    def count() -> float:
        text = api_client.get("/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("agentpg_event_loop_lag_seconds_count"))
        return float(line.split()[-1])

    first = count()
    time.sleep(0.5)
    assert count() >= first + 3
