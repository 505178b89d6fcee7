"""The usage and budget routes over HTTP: the numbers add up, a budget below the spend makes it read-only."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from api_support import assert_problem, bearer, uid
from helpers import workspace_global_uri
from test_budgets import EXPENSIVE, wait_for_stats

from agentpg.app.runtime import Runtime
from agentpg.usage.budgets import sync_usage


@pytest.fixture()
def admin_h(admin_token: str) -> dict[str, str]:
    return bearer(admin_token)


def test_usage_and_budget_routes(api_client: Any, admin_h: dict[str, str], runtime: Runtime) -> None:
    u, w = uid("usage"), uid("w")
    assert api_client.post("/api/users", json={"id": u}, headers=admin_h).status_code == 201
    created = api_client.post(f"/api/users/{u}/workspaces", json={"id": w}, headers=admin_h)
    assert created.status_code == 201
    with psycopg.connect(workspace_global_uri(runtime, w), autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 300) g")
    wait_for_stats(runtime, u, 300)
    sync_usage(runtime.service.deps, EXPENSIVE)

    body = api_client.get(f"/api/users/{u}/usage", headers=admin_h).json()
    parts = [body["global_database"]["cost_cents"]] + [a["cost_cents"] for a in body["agent_databases"]]
    parts.append(body["backups"]["cost_cents"])  # its own line (0 here: the suite's server is not archived)
    assert sum(parts) == body["total_cost_cents"] > 0 and body["status"] == "ok" and body["budget_cents"] is None
    assert [a["workspace_id"] for a in body["agent_databases"]] == [w]

    over = api_client.put(f"/api/users/{u}/budget", json={"budget_cents": 1}, headers=admin_h)
    assert over.status_code == 200 and over.json()["status"] == "exceeded" and over.json()["read_only"]
    assert over.json()["percent_of_budget"] > 100
    user_token = api_client.post(f"/api/users/{u}/tokens", json={}, headers=admin_h).json()["token"]
    mine = api_client.get(f"/api/users/{u}/usage", headers=bearer(user_token))
    assert mine.status_code == 200 and mine.json()["read_only"]
    assert_problem(api_client.put(f"/api/users/{u}/budget", json={"budget_cents": 10**9},
                                  headers=bearer(user_token)), 403)  # a user cannot lift its own cap
    for bad in ({"budget_cents": -1}, {"budget_cents": "100"}, {"budget_cents": 1.5}, {"cents": 1}, {}):
        assert_problem(api_client.put(f"/api/users/{u}/budget", json=bad, headers=admin_h), 422)
    back = api_client.put(f"/api/users/{u}/budget", json={"budget_cents": None}, headers=admin_h)
    assert back.status_code == 200 and not back.json()["read_only"]
    other = uid("usage")
    assert_problem(api_client.get(f"/api/users/{other}/usage", headers=bearer(user_token)), 404)
    assert_problem(api_client.get(f"/api/users/{other}/usage", headers=admin_h), 404)
    assert api_client.delete(f"/api/users/{u}", headers=admin_h).status_code == 204
