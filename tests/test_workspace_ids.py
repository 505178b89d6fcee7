"""Workspace ids are per user (issue 17, class 8): over real HTTP against a real ``agentpg serve``, another
user's workspace id is exactly as free as a never-used one. User B creating ``w`` while user A has a ``w``
gets what a fresh id gets (201, a workspace of B's own); nothing B does by that id reaches A's workspace;
the admin token, for which ``/api/workspaces/w`` is then ambiguous, gets a 409 that names the user-scoped
routes, which work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from api_support import LiveServer, assert_problem, bearer, uid

from agentpg.lifecycle import workspace_ids

MCP = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class User:
    id: str
    headers: dict[str, str]


@pytest.fixture()
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.base_url, timeout=120) as client:
        yield client


@pytest.fixture()
def two_users(http: httpx.Client, admin_token: str) -> Iterator[tuple[User, User]]:
    admin = bearer(admin_token)
    users = []
    for prefix in ("ida", "idb"):
        user = uid(prefix)
        assert http.post("/api/users", json={"id": user}, headers=admin).status_code == 201
        token = http.post(f"/api/users/{user}/tokens", json={}, headers=admin).json()["token"]
        users.append(User(user, bearer(token)))
    yield users[0], users[1]
    for user in users:
        http.delete(f"/api/users/{user.id}", headers=admin)


def _mcp(http: httpx.Client, agent_token: str, tool: str, sql: str) -> dict[str, Any]:
    answer = http.post("/mcp", headers={**MCP, **bearer(agent_token)}, json={
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": tool, "arguments": {"database": "agent", "sql": sql}}})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["result"]
    assert result["isError"] is False, result
    return result


def _shape(body: Any) -> Any:
    """The keys of a JSON body, recursively, with the values that differ between two workspaces blanked."""
    if isinstance(body, dict):
        return {key: _shape(value) for key, value in body.items()}
    return type(body).__name__


def test_another_users_workspace_id_is_as_free_as_a_new_one(http: httpx.Client, admin_token: str,
                                                             two_users: tuple[User, User]) -> None:
    a, b = two_users
    admin = bearer(admin_token)
    shared = uid("w")
    made_a = http.post(f"/api/users/{a.id}/workspaces", json={"id": shared}, headers=a.headers)
    assert made_a.status_code == 201, made_a.text

    # B: a never-used id, then A's id. The same answer: 201, the same body shape, B's own workspace.
    timings, answers = [], []
    for workspace in (uid("fresh"), shared):
        started = time.monotonic()
        answers.append(http.post(f"/api/users/{b.id}/workspaces", json={"id": workspace}, headers=b.headers))
        timings.append(time.monotonic() - started)
    fresh, taken = answers
    assert fresh.status_code == taken.status_code == 201, (fresh.text, taken.text)
    assert _shape(fresh.json()) == _shape(taken.json())
    assert taken.json()["id"] == shared and taken.json()["user_id"] == b.id
    assert taken.json()["agent_token"]["workspace_id"] == shared
    assert max(timings) < 2.0 or max(timings) < 10 * min(timings), timings  # same path: same order of time
    # Only B's own "w" is "already exists" for B; A's is untouched.
    assert_problem(http.post(f"/api/users/{b.id}/workspaces", json={"id": shared}, headers=b.headers), 409,
                   "already exists")

    # Each user's token reaches its own "w" by that id, and nothing of the other's.
    assert http.get(f"/api/workspaces/{shared}", headers=a.headers).json()["user_id"] == a.id
    assert http.get(f"/api/workspaces/{shared}", headers=b.headers).json()["user_id"] == b.id
    assert http.get(f"/api/users/{b.id}/workspaces/{shared}", headers=b.headers).json()["user_id"] == b.id
    assert_problem(http.get(f"/api/users/{a.id}/workspaces/{shared}", headers=b.headers), 404)
    for token_of in (a, b):
        listed = http.get(f"/api/users/{token_of.id}/workspaces", headers=token_of.headers).json()["items"]
        assert shared in [w["id"] for w in listed]
    denied = {"can_read": True, "can_write": False, "can_create_tables": False, "can_drop_tables": False,
              "allowed_tables": None}
    put = http.put(f"/api/workspaces/{shared}/global-database-permissions", json=denied, headers=b.headers)
    assert put.status_code == 200, put.text
    assert http.get(f"/api/workspaces/{shared}/global-database-permissions",
                    headers=b.headers).json()["can_write"] is False
    assert http.get(f"/api/workspaces/{shared}/global-database-permissions",
                    headers=a.headers).json()["can_write"] is True  # A's: as it was
    more = http.post(f"/api/workspaces/{shared}/tokens", json={}, headers=b.headers)
    assert more.status_code == 201 and more.json()["workspace_id"] == shared and more.json()["user_id"] == b.id
    assert http.get(f"/api/workspaces/{shared}/mcp-config", headers=b.headers).status_code == 200

    # The two agents have two databases: what B's agent creates, A's agent does not see.
    token_a, token_b = made_a.json()["agent_token"]["token"], taken.json()["agent_token"]["token"]
    _mcp(http, token_b, "execute", "CREATE TABLE only_in_b (n int)")
    seen_by_a = _mcp(http, token_a, "query", "SELECT to_regclass('only_in_b') IS NULL AS absent")
    assert seen_by_a["structuredContent"]["rows"] == [[True]]
    seen_by_b = _mcp(http, more.json()["token"], "query", "SELECT to_regclass('only_in_b') IS NULL AS absent")
    assert seen_by_b["structuredContent"]["rows"] == [[False]]
    # Audit, usage and env list B's workspace by its id, and only B's entries under it.
    audit = http.get(f"/api/users/{b.id}/audit", params={"workspace_id": shared}, headers=b.headers).json()
    assert audit["items"] and {e["workspace_id"] for e in audit["items"]} == {shared}
    assert {e["tool"] for e in audit["items"]} == {"execute", "query"}
    usage = http.get(f"/api/users/{b.id}/usage", headers=b.headers).json()
    assert shared in [d["workspace_id"] for d in usage["agent_databases"]], usage
    env = http.get(f"/api/users/{b.id}/env", headers=b.headers).json()
    assert shared in {v["workspace_id"] for v in env["items"] if v["workspace_id"]}, env
    assert workspace_ids.SEPARATOR not in json.dumps([audit, usage, env])

    # The admin token: /api/workspaces/{id} is ambiguous now, and says how to name the user.
    for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/global-database-permissions"),
                         ("POST", "/tokens"), ("GET", "/mcp-config")):
        body = {} if method == "POST" else None
        assert_problem(http.request(method, f"/api/workspaces/{shared}{path}", json=body, headers=admin), 409,
                       "more than one user", f"/api/users/{{user_id}}/workspaces/{shared}")
    for owner in (a, b):
        got = http.get(f"/api/users/{owner.id}/workspaces/{shared}", headers=admin)
        assert got.status_code == 200 and got.json()["user_id"] == owner.id
        perms = http.get(f"/api/users/{owner.id}/workspaces/{shared}/global-database-permissions", headers=admin)
        assert perms.json()["can_write"] is (owner is a)
        assert http.post(f"/api/users/{owner.id}/workspaces/{shared}/tokens", json={},
                         headers=admin).json()["user_id"] == owner.id
        assert http.get(f"/api/users/{owner.id}/workspaces/{shared}/mcp-config", headers=admin).status_code == 200
    assert http.put(f"/api/users/{a.id}/workspaces/{shared}/global-database-permissions", json=denied,
                    headers=admin).status_code == 200
    assert_problem(http.get(f"/api/workspaces/{shared}/database/tables", headers=admin), 409, "more than one user")
    for owner, tables in ((a, []), (b, ["only_in_b"])):
        base = f"/api/users/{owner.id}/workspaces/{shared}/database"
        assert http.get(base, headers=admin).json()["status"] == "ready"
        assert [t["name"] for t in http.get(f"{base}/tables", headers=admin).json()["tables"]] == tables
        assert [t["name"] for t in http.get(f"/api/workspaces/{shared}/database/tables",
                                            headers=owner.headers).json()["tables"]] == tables
    rows = http.post(f"/api/users/{b.id}/workspaces/{shared}/database/query", json={"table": "only_in_b"},
                     headers=admin)
    assert rows.status_code == 200 and rows.json()["rows"] == []
    assert http.get(f"/api/users/{b.id}/workspaces/{shared}/database/tables/only_in_b/export",
                    headers=admin).status_code == 200

    # B deletes its "w": A's stays, and is again the admin's /api/workspaces/w.
    assert http.delete(f"/api/workspaces/{shared}", headers=b.headers).status_code == 204
    assert_problem(http.get(f"/api/workspaces/{shared}", headers=b.headers), 404)
    assert http.get(f"/api/workspaces/{shared}", headers=a.headers).json()["status"] == "active"
    assert http.get(f"/api/workspaces/{shared}", headers=admin).json()["user_id"] == a.id
    _mcp(http, token_a, "query", "SELECT 1")  # A's agent still works
    # And through the admin's user-scoped DELETE.
    assert http.post(f"/api/users/{b.id}/workspaces", json={"id": shared}, headers=b.headers).status_code == 201
    assert http.delete(f"/api/users/{b.id}/workspaces/{shared}", headers=admin).status_code == 204
    assert http.get(f"/api/workspaces/{shared}", headers=a.headers).status_code == 200


def test_concurrent_creations_of_one_id(http: httpx.Client, two_users: tuple[User, User]) -> None:
    """Two users creating one id at once both get it; one user creating it twice at once gets it once."""
    a, b = two_users
    shared, twice = uid("race"), uid("twice")

    def create(user: User, workspace: str) -> int:
        return http.post(f"/api/users/{user.id}/workspaces", json={"id": workspace},
                         headers=user.headers).status_code

    with ThreadPoolExecutor(4) as pool:
        across = list(pool.map(create, (a, b), (shared, shared)))
        within = sorted(pool.map(create, (b, b), (twice, twice)))
    assert across == [201, 201]
    assert within == [201, 409]
    assert [w["id"] for w in http.get(f"/api/users/{b.id}/workspaces", headers=b.headers).json()["items"]
            ].count(twice) == 1
