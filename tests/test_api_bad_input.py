"""Hostile and broken input: always a 4xx problem with a clear message, never a 5xx, and nothing changed."""

from __future__ import annotations

from typing import Any

import psycopg
from api_support import assert_problem, uid

INJECTIONS = ['"; DROP TABLE victims; --', "victims; DROP TABLE victims", 'victims"', "public.victims",
              "victims --", "../victims", "VICTIMS", " victims", "victims\u200b", "v" * 255,
              "pg_catalog.pg_authid", "agentpg_internal.config", "'", "%", "*"]



def _user_ids(api_client: Any, admin_h: dict[str, str]) -> set[str]:
    return {u["id"] for u in api_client.get("/api/users", params={"limit": 500}, headers=admin_h).json()["items"]}


def _unchanged(api_client: Any, user: str, uri: str, admin_h: dict[str, str], users_before: set[str]) -> None:
    with psycopg.connect(uri) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        assert tables == ["victims"]
        assert conn.execute("SELECT count(*), sum(id) FROM victims").fetchone() == (3, 6)
    assert _user_ids(api_client, admin_h) == users_before


def test_injection_in_table_column_and_sort_names(api_client: Any, victims: tuple[str, str, dict[str, str]]) -> None:
    user, uri, admin_h = victims
    before = _user_ids(api_client, admin_h)
    query = f"/api/users/{user}/global-database/query"
    for name in INJECTIONS:
        assert_problem(api_client.post(query, json={"table": name}, headers=admin_h), 404, "does not exist")
        export = api_client.get(f"/api/users/{user}/global-database/tables/{name.replace('/', '%2F')}/export",
                                headers=admin_h)
        assert 400 <= export.status_code < 500, (name, export.status_code)
        assert export.headers["content-type"].startswith("application/problem+json")
        body = assert_problem(api_client.post(query, json={"table": "victims", "columns": ["id", name]},
                                              headers=admin_h), 422, "no column")
        assert repr(name)[:20] in body["detail"] or name == "v" * 255
        assert_problem(api_client.post(query, json={"table": "victims", "order_by": [{"column": name}]},
                                       headers=admin_h), 422, "order_by")
    assert_problem(api_client.post(query, json={"table": "victims", "order_by": [
        {"column": "id", "direction": "desc; DROP TABLE victims"}]}, headers=admin_h), 422, "order_by")
    # Close but wrong: a hint, still 404.
    assert_problem(api_client.post(query, json={"table": "victim"}, headers=admin_h), 404, "did you mean 'victims'")
    _unchanged(api_client, user, uri, admin_h, before)


def test_limits_offsets_and_wrong_types(api_client: Any, victims: tuple[str, str, dict[str, str]]) -> None:
    user, uri, admin_h = victims
    before = _user_ids(api_client, admin_h)
    query = f"/api/users/{user}/global-database/query"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"table": "victims", "limit": -1}, "body.limit"), ({"table": "victims", "limit": 0}, "body.limit"),
        ({"table": "victims", "limit": 1001}, "body.limit"), ({"table": "victims", "limit": 10**12}, "body.limit"),
        ({"table": "victims", "limit": 10**100}, "body.limit"), ({"table": "victims", "limit": "abc"}, "body.limit"),
        ({"table": "victims", "limit": "10"}, "body.limit"), ({"table": "victims", "limit": 1.5}, "body.limit"),
        ({"table": "victims", "limit": True}, "body.limit"), ({"table": "victims", "limit": None}, "body.limit"),
        ({"table": "victims", "offset": -1}, "body.offset"), ({"table": "victims", "offset": 10**12}, "body.offset"),
        ({"table": "victims", "offset": [1]}, "body.offset"), ({"table": 5}, "body.table"),
        ({"table": ""}, "body.table"),
        ({"table": ["victims"]}, "body.table"), ({"table": None}, "body.table"), ({}, "body.table"),
        ({"table": "victims", "columns": "id"}, "body.columns"), ({"table": "victims", "columns": []}, "body.columns"),
        ({"table": "victims", "columns": ["id", "id"]}, "body.columns"),
        ({"table": "victims", "order_by": "id"}, "body.order_by"),
        ({"table": "victims", "order_by": [{"column": "id", "direction": "up"}]}, "body.order_by"),
        ({"table": "victims", "order_by": [{"column": "id", "nulls": "first"}]}, "body.order_by"),
        ({"table": "victims", "sql": "DROP TABLE victims"}, "body.sql"),
        ({"table": "vic\x00tims"}, "body.table"), ({"table": "victims", "columns": ["id\x00"]}, "body.columns"),
    ]
    for body, field in bad:
        problem = assert_problem(api_client.post(query, json=body, headers=admin_h), 422, field)
        assert any(e["field"].startswith(field) for e in problem["errors"]), (body, problem)
    assert_problem(api_client.post(query, json={"table": "victims", "order_by": [{"column": "doc"}]},
                                   headers=admin_h), 422, "sort order")
    # Query strings too.
    for params in ({"limit": "abc"}, {"limit": -1}, {"limit": 10**12}, {"cursor": "a\x00b"}, {"cursor": "x" * 200}):
        assert_problem(api_client.get("/api/users", params=params, headers=admin_h), 422, "query.")
    assert_problem(api_client.get(f"/api/users/{user}/global-database/tables/victims/export",
                                  params={"format": "xml"}, headers=admin_h), 422, "query.format")
    _unchanged(api_client, user, uri, admin_h, before)


def test_malformed_bodies_sizes_and_nul_bytes(api_client: Any, victims: tuple[str, str, dict[str, str]]) -> None:
    user, uri, admin_h = victims
    before = _user_ids(api_client, admin_h)
    query = f"/api/users/{user}/global-database/query"
    json_h = {**admin_h, "content-type": "application/json"}
    for raw in (b"{", b'{"table": "victims",}', b"nope", b'{"table": "victims"} trailing', b"\xff\xfe{}",
                b"[" * 100_000 + b"]" * 100_000, b'{"table": "victims", "table": 5}'):
        response = api_client.post(query, content=raw, headers=json_h)
        assert response.status_code in (400, 422), (raw[:20], response.status_code, response.text)
        assert_problem(response, response.status_code)
    assert_problem(api_client.post(query, content=b'{"table": "victims"', headers=json_h), 422, "not valid JSON")
    for raw_body in (b"[]", b'"victims"', b"null", b"42"):
        assert_problem(api_client.post(query, content=raw_body, headers=json_h), 422, "body")
    assert_problem(api_client.post(query, content=b'{"table": "victims"}', headers={**admin_h, "content-type":
                                                                                 "text/plain"}),
                   415, "Content-Type: application/json", "'text/plain'")
    # Huge bodies: declared, and streamed without a Content-Length (chunked).
    big = b'{"table": "' + b"v" * (2 * 1024 * 1024) + b'"}'
    assert_problem(api_client.post(query, content=big, headers=json_h), 413, "larger than the limit")
    assert_problem(api_client.post(query, content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                                   headers=json_h), 413, "larger than the limit")
    assert_problem(api_client.post("/api/users", content=big, headers=json_h), 413)
    # Unknown fields, everywhere there is a body.
    assert_problem(api_client.post("/api/users", json={"id": uid("x"), "admin": True}, headers=admin_h), 422,
                   "body.admin")
    assert_problem(api_client.post(f"/api/users/{user}/workspaces", json={"id": uid("x"), "owner": "me"},
                                   headers=admin_h), 422, "body.owner")
    assert_problem(api_client.post(f"/api/users/{user}/tokens", json={"kind": "admin"}, headers=admin_h), 422,
                   "body.kind")
    assert_problem(api_client.put(f"/api/users/{user}/env/KEY", json={"value": "v", "managed": True},
                                  headers=admin_h), 422, "body.managed")
    # NUL bytes and bad ids, in bodies and paths.
    assert_problem(api_client.post("/api/users", json={"id": "a\x00b"}, headers=admin_h), 422, "NUL")
    assert_problem(api_client.post("/api/users", json={"id": "a b"}, headers=admin_h), 422, "user id")
    assert_problem(api_client.post("/api/users", json={"id": "x" * 129}, headers=admin_h), 422, "body.id")
    assert_problem(api_client.post("/api/users", json={"id": uid("e"), "email": "not-an-email"}, headers=admin_h),
                   422, "email")
    assert_problem(api_client.put(f"/api/users/{user}/env/KEY", json={"value": "a\x00b"}, headers=admin_h), 422, "NUL")
    assert_problem(api_client.put(f"/api/users/{user}/env/KEY", json={"value": "v" * 70_000}, headers=admin_h), 422,
                   "body.value")
    for name in ("lower", "1ABC", "A-B", "A" * 129, "A%00B"):
        assert_problem(api_client.put(f"/api/users/{user}/env/{name}", json={"value": "v"}, headers=admin_h), 422,
                       "path.name")
    assert_problem(api_client.get("/api/users/a%00b", headers=admin_h), 422, "user id")
    assert_problem(api_client.get("/api/workspaces/a%00b/database/tables", headers=admin_h), 422, "workspace id")
    assert_problem(api_client.get(f"/api/users/{user}/global-database/tables/vic%00tims/export", headers=admin_h),
                   422, "NUL")
    assert_problem(api_client.post(f"/api/users/{user}/workspaces", json={"id": uid("w"), "name": "n\x00"},
                                   headers=admin_h), 422, "NUL")
    for token_id in ("not-a-uuid", "%00", "1' OR '1'='1"):
        assert_problem(api_client.delete(f"/api/tokens/{token_id}", headers=admin_h), 422, "path.token_id")
    # Routes and methods that do not exist.
    assert_problem(api_client.get("/api/nope", headers=admin_h), 404, "no route")
    wrong = api_client.patch(f"/api/users/{user}", headers=admin_h)
    assert_problem(wrong, 405, "not allowed")
    assert "GET" in wrong.headers["allow"]
    _unchanged(api_client, user, uri, admin_h, before)


def test_a_repeated_query_parameter_is_refused(api_client: Any, admin_token: str) -> None:
    """``?cursor=a&cursor=b`` is not silently read as ``b``: the caller hears that it sent it twice."""
    answer = api_client.get("/api/users?limit=5&cursor=a&cursor=b", headers={"Authorization": f"Bearer {admin_token}"})
    assert answer.status_code == 422 and "'cursor' is given more than once" in answer.json()["detail"]
