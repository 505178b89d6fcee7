"""Every auth rule on every REST route: 401 without a valid token, 403 for agent tokens, 404 across tenants."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from api_support import assert_problem, bearer, uid
from helpers import global_uri

from agentpg.app.runtime import Runtime

Route = tuple[str, str, Any]


def routes(user: str, ws: str, table: str = "things") -> list[Route]:
    """Every route that names a user or a workspace, with a body it would accept."""
    g, a = f"/api/users/{user}/global-database", f"/api/workspaces/{ws}/database"
    return [
        ("GET", f"/api/users/{user}", None),
        ("DELETE", f"/api/users/{user}", None),
        ("POST", f"/api/users/{user}/tokens", {"name": "x"}),
        ("POST", f"/api/users/{user}/workspaces", {"id": uid("nw")}),
        ("GET", f"/api/users/{user}/workspaces", None),
        ("GET", f"/api/users/{user}/env", None),
        ("PUT", f"/api/users/{user}/env/SOME_KEY", {"value": "v"}),
        ("DELETE", f"/api/users/{user}/env/SOME_KEY", None),
        ("GET", g, None),
        ("GET", f"{g}/tables", None),
        ("POST", f"{g}/query", {"table": table}),
        ("GET", f"{g}/tables/{table}/export", None),
        ("GET", f"/api/workspaces/{ws}", None),
        ("DELETE", f"/api/workspaces/{ws}", None),
        ("POST", f"/api/workspaces/{ws}/tokens", {}),
        ("GET", a, None),
        ("GET", f"{a}/tables", None),
        ("POST", f"{a}/query", {"table": table}),
        ("GET", f"{a}/tables/{table}/export", None),
        # The same workspace, naming its user (workspace ids are per user).
        ("GET", f"/api/users/{user}/workspaces/{ws}", None),
        ("DELETE", f"/api/users/{user}/workspaces/{ws}", None),
        ("POST", f"/api/users/{user}/workspaces/{ws}/tokens", {}),
        ("GET", f"/api/users/{user}/workspaces/{ws}/global-database-permissions", None),
        ("PUT", f"/api/users/{user}/workspaces/{ws}/global-database-permissions", {"can_read": True}),
        ("GET", f"/api/users/{user}/workspaces/{ws}/mcp-config", None),
    ]


ADMIN_ONLY: list[Route] = [("POST", "/api/users", {"id": "someone"}), ("GET", "/api/users", None)]


@dataclass
class Tenant:
    user: str
    ws: str
    user_token: str
    user_token_id: str
    agent_token: str
    agent_token_id: str


def _tenant(client: Any, admin_h: dict[str, str], runtime: Runtime) -> Tenant:
    user, ws = uid("au"), uid("aw")
    assert client.post("/api/users", json={"id": user}, headers=admin_h).status_code == 201
    created = client.post(f"/api/users/{user}/workspaces", json={"id": ws}, headers=admin_h).json()
    tok = client.post(f"/api/users/{user}/tokens", json={}, headers=admin_h).json()
    with psycopg.connect(global_uri(runtime, user), autocommit=True) as conn:
        conn.execute("CREATE TABLE things (id int PRIMARY KEY, label text)")
        conn.execute("INSERT INTO things VALUES (1, 'one')")
    return Tenant(user, ws, tok["token"], tok["id"], created["agent_token"]["token"], created["agent_token"]["id"])


@pytest.fixture(scope="module")
def tenants(api_client: Any, admin_token: str, runtime: Runtime) -> Iterator[tuple[Tenant, Tenant]]:
    admin_h = bearer(admin_token)
    pair = (_tenant(api_client, admin_h, runtime), _tenant(api_client, admin_h, runtime))
    yield pair
    for t in pair:
        api_client.delete(f"/api/users/{t.user}", headers=admin_h)


def call(client: Any, route: Route, headers: dict[str, str]) -> Any:
    method, path, body = route
    return client.request(method, path, json=body, headers=headers)


def test_no_token_bad_token_and_malformed_header_are_401_everywhere(api_client: Any, admin_token: str,
                                                                    tenants: tuple[Tenant, Tenant]) -> None:
    t = tenants[0]
    all_routes = [*routes(t.user, t.ws), *ADMIN_ONLY, ("DELETE", f"/api/tokens/{t.user_token_id}", None)]
    variants: list[dict[str, str]] = [{}, bearer("apg_u_" + "x" * 43), bearer(""), bearer("y" * 500),
                                      {"Authorization": f"Basic {t.user_token}"}, {"Authorization": t.user_token}]
    for route in all_routes:
        for headers in variants:
            response = call(api_client, route, headers)
            body = assert_problem(response, 401, "token")
            assert response.headers["www-authenticate"].startswith("Bearer"), route
            assert body["code"] == "unauthenticated"
    # And nothing happened: the user, its workspace and its env are as they were.
    admin_h = bearer(admin_token)
    assert api_client.get(f"/api/workspaces/{t.ws}", headers=admin_h).status_code == 200
    names = [i["name"] for i in api_client.get(f"/api/users/{t.user}/env", headers=admin_h).json()["items"]]
    assert "SOME_KEY" not in names


def test_agent_tokens_reach_no_rest_route(api_client: Any, tenants: tuple[Tenant, Tenant]) -> None:
    t = tenants[0]
    agent = bearer(t.agent_token)
    for route in [*routes(t.user, t.ws), *ADMIN_ONLY, ("DELETE", f"/api/tokens/{t.agent_token_id}", None)]:
        body = assert_problem(call(api_client, route, agent), 403, "MCP")
        assert body["code"] == "forbidden"


def test_user_token_on_another_users_routes_is_404_like_a_missing_id(api_client: Any, admin_token: str,
                                                                     tenants: tuple[Tenant, Tenant]) -> None:
    mine, theirs = tenants
    token = bearer(mine.user_token)
    for route, missing_route in zip(routes(theirs.user, theirs.ws), routes(uid("nobody"), uid("nows")),
                                    strict=True):
        other = call(api_client, route, token)
        body = assert_problem(other, 404, "does not exist")
        # Indistinguishable from an id that does not exist at all (same status, code, wording).
        missing = call(api_client, missing_route, token).json()
        assert (body["code"], body["title"]) == (missing["code"], missing["title"])
    # Their tokens cannot be revoked with mine either.
    assert_problem(api_client.delete(f"/api/tokens/{theirs.user_token_id}", headers=token), 404)
    assert_problem(api_client.delete(f"/api/tokens/{theirs.agent_token_id}", headers=token), 404)
    # …and all of theirs is still there and working.
    admin_h = bearer(admin_token)
    assert api_client.get(f"/api/users/{theirs.user}", headers=bearer(theirs.user_token)).status_code == 200
    assert api_client.get(f"/api/workspaces/{theirs.ws}", headers=admin_h).status_code == 200
    rows = api_client.post(f"/api/users/{theirs.user}/global-database/query", json={"table": "things"},
                           headers=admin_h).json()
    assert rows["rows"] == [{"id": 1, "label": "one"}]


def test_user_token_on_its_own_routes(api_client: Any, tenants: tuple[Tenant, Tenant]) -> None:
    t = tenants[0]
    mine = bearer(t.user_token)
    assert api_client.get(f"/api/users/{t.user}", headers=mine).status_code == 200
    assert api_client.get(f"/api/users/{t.user}/global-database/tables", headers=mine).status_code == 200
    rows = api_client.post(f"/api/users/{t.user}/global-database/query", json={"table": "things"}, headers=mine)
    assert rows.status_code == 200 and rows.json()["total"] == 1
    assert api_client.get(f"/api/workspaces/{t.ws}/database/tables", headers=mine).json() == {"tables": []}
    assert api_client.put(f"/api/users/{t.user}/env/MY_KEY", json={"value": "v"}, headers=mine).status_code == 201
    ws = uid("own")
    made = api_client.post(f"/api/users/{t.user}/workspaces", json={"id": ws}, headers=mine)
    assert made.status_code == 201
    more = api_client.post(f"/api/workspaces/{ws}/tokens", json={}, headers=mine)
    assert more.status_code == 201 and more.json()["workspace_id"] == ws
    assert api_client.delete(f"/api/tokens/{more.json()['id']}", headers=mine).status_code == 204
    assert api_client.delete(f"/api/workspaces/{ws}", headers=mine).status_code == 204
    # Admin-only routes, on its own user: refused with 403 (no existence is revealed: it is its own user).
    assert_problem(api_client.delete(f"/api/users/{t.user}", headers=mine), 403, "admin token")
    assert_problem(api_client.post(f"/api/users/{t.user}/tokens", json={}, headers=mine), 403, "admin token")
    for route in ADMIN_ONLY:
        assert_problem(call(api_client, route, mine), 403, "admin token")
    assert api_client.get(f"/api/users/{t.user}", headers=mine).status_code == 200  # still there
