"""The explorer as a console, over HTTP (ASGI client, in process; issue 21): users, workspaces and tokens
managed from the pages (a new token shown once, a revoked one refused by MCP at once), a permission changed
on the permissions page taking effect for the agent through MCP, the audit log's filters, the usage history
behind the chart, and the schema picture's data. The same in Chromium: tests/test_explorer_console_browser_manage.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from browser_support import Tenant, as_user, check_page, drop_tenant, make_tenant, uid
from mcp_support import MCP_HEADERS

from agentpg.access import audit as audit_log
from agentpg.app.runtime import Runtime
from agentpg.catalog.models import UsageDay
from agentpg.errors import NotFound
from agentpg.usage import history as usage_history
from agentpg.web.security import CSP

ORIGIN = {"Origin": "http://testserver"}
TOKEN = re.compile(r'id="new-token"[^>]*value="(apg_[a-z]_[A-Za-z0-9_-]+)"')


@pytest.fixture(scope="module")
def tenant(runtime: Runtime) -> Iterator[Tenant]:
    t = make_tenant(runtime, seed_directly=True)
    yield t
    drop_tenant(runtime, t)


def page(client: Any, runtime: Runtime, t: Tenant, url: str, status: int = 200, *, admin: bool = False,
         method: str = "GET", data: dict[str, str] | None = None) -> str:
    """A page (or a form's answer): the expected status, the explorer's headers, no inline code, no secret."""
    if method == "GET":
        response = client.get(url, follow_redirects=False)
    else:
        response = client.post(url, data=data or {}, headers=ORIGIN, follow_redirects=False)
    assert response.status_code == status, (url, response.status_code, response.text[:2000])
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["cache-control"] == "no-store"
    html: str = response.text
    if status != 303:
        check_page(runtime, t, f"explorer {url}", html, echoes_ids=status == 404, admin=admin)
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), url
        assert " style=" not in html and not re.search(r"\son[a-z]+=", html), url
    return html


def post(client: Any, url: str, data: dict[str, str]) -> Any:
    return client.post(url, data=data, headers=ORIGIN, follow_redirects=False)


def mcp_status(client: Any, token: str, sql: str = "SELECT 1 AS one") -> tuple[int, dict[str, Any]]:
    """One stateless MCP ``tools/call`` of ``query`` on the global database with ``token``."""
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "execute" if sql.startswith("INSERT") else "query",
                       "arguments": {"database": "global", "sql": sql}}}
    response = client.post("/mcp", json=call, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}",
                                                       "Host": "127.0.0.1"})  # MCP checks Host (DNS rebinding)
    return response.status_code, response.json() if response.status_code == 200 else {}


def test_admin_creates_and_deletes_a_user(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    assert web.get("/explorer/manage/users", follow_redirects=False).status_code == 403  # admin only
    assert post(web, "/explorer/manage/users", {"id": uid("nope")}).status_code == 403
    as_user(web, runtime, tenant.admin_token)
    listing = page(web, runtime, tenant, "/explorer/manage/users", admin=True)
    assert f'data-user="{tenant.user}"' in listing and 'for="new-user-id"' in listing
    bad = page(web, runtime, tenant, "/explorer/manage/users", 422, admin=True, method="POST",
               data={"id": "not an id!"})
    assert "Could not create the user" in bad and 'value="not an id!"' in bad  # the form keeps what was typed
    assert web.post("/explorer/manage/users", data={"id": "x"}, follow_redirects=False).status_code == 403  # no Origin
    user = uid("cm")
    created = post(web, "/explorer/manage/users", {"id": user, "email": f"{user}@example.com"})
    assert created.status_code == 303 and created.headers["location"].startswith(f"/explorer/u/{user}/manage")
    assert runtime.service.get_user(user).email == f"{user}@example.com"
    again = page(web, runtime, tenant, "/explorer/manage/users", 409, admin=True, method="POST", data={"id": user})
    assert "already exists" in again or "exists" in again
    confirm = page(web, runtime, tenant, f"/explorer/manage/users/{user}/delete", admin=True)
    assert "cannot be undone" in confirm and f'action="/explorer/manage/users/{user}/delete"' in confirm
    wrong = page(web, runtime, tenant, f"/explorer/manage/users/{user}/delete", 422, admin=True, method="POST",
                 data={"confirm": "something else"})
    assert "Type the user" in wrong
    runtime.service.get_user(user)  # still there
    gone = post(web, f"/explorer/manage/users/{user}/delete", {"confirm": user})
    assert gone.status_code == 303 and "Deleted+user" in gone.headers["location"]
    with pytest.raises(NotFound):
        runtime.service.get_user(user)
    page(web, runtime, tenant, f"/explorer/manage/users/{user}/delete", 404, admin=True)


def test_workspace_and_tokens_shown_once_and_revoked_at_once(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    base = f"/explorer/u/{tenant.user}/manage"
    before = page(web, runtime, tenant, base)
    assert f'data-workspace="{tenant.ws_a}"' in before and "Only the platform (admin token)" in before
    bad = page(web, runtime, tenant, base + "/workspaces", 422, method="POST", data={"id": "bad id/"})
    assert "Could not create the workspace" in bad
    ws = uid("cw")
    made = web.post(base + "/workspaces", data={"id": ws, "name": "Console agent"}, headers=ORIGIN,
                    follow_redirects=False)
    assert made.status_code == 201 and "only time it is shown" in made.text
    first = TOKEN.search(made.text)
    assert first and first.group(1).startswith("apg_g_")
    assert first.group(1) in made.text.split('id="mcp-config"')[1]  # the HTTP config, filled in
    code, answer = mcp_status(web, first.group(1))
    assert code == 200 and not answer["result"].get("isError"), answer
    listing = page(web, runtime, tenant, base)
    assert first.group(1) not in listing and f'data-workspace="{ws}"' in listing  # never shown again
    second_page = web.post(f"{base}/workspaces/{ws}/tokens", data={"name": "laptop"}, headers=ORIGIN,
                           follow_redirects=False)
    assert second_page.status_code == 201 and "laptop" in second_page.text
    second = TOKEN.search(second_page.text)
    assert second and second.group(1) != first.group(1)
    tokens = runtime.service.list_tokens(tenant.user, ws)
    assert len(tokens) == 2 and {t.name for t in tokens} == {None, "laptop"}
    first_id = next(t.id for t in tokens if t.name is None)
    confirm = page(web, runtime, tenant, f"{base}/tokens/{first_id}/revoke")
    assert "Yes, revoke this token" in confirm
    unticked = page(web, runtime, tenant, f"{base}/tokens/{first_id}/revoke", 422, method="POST",
                    data={"confirm": ""})
    assert "Tick the box" in unticked
    assert mcp_status(web, first.group(1))[0] == 200  # not revoked without the confirmation
    revoked = post(web, f"{base}/tokens/{first_id}/revoke", {"confirm": "yes"})
    assert revoked.status_code == 303 and first.group(1) not in revoked.headers["location"]
    assert mcp_status(web, first.group(1))[0] == 401  # at once
    assert mcp_status(web, second.group(1))[0] == 200
    page(web, runtime, tenant, f"{base}/tokens/{first_id}/revoke", 404)  # already revoked
    page(web, runtime, tenant, f"/explorer/u/{tenant.user}/manage/tokens/not-a-token/revoke", 404)
    # Another user's workspace and tokens are "not found", as in the API.
    other_tokens = runtime.service.list_tokens(tenant.other_user)
    page(web, runtime, tenant, f"{base}/tokens/{other_tokens[0].id}/revoke", 404)
    assert web.post(f"/explorer/u/{tenant.other_user}/manage/workspaces", data={"id": uid("x")}, headers=ORIGIN,
                    follow_redirects=False).status_code == 404
    # Deleting the workspace asks for its id; then its remaining token stops too.
    page(web, runtime, tenant, f"{base}/workspaces/{ws}/delete")
    page(web, runtime, tenant, f"{base}/workspaces/{ws}/delete", 422, method="POST", data={"confirm": "no"})
    deleted = post(web, f"{base}/workspaces/{ws}/delete", {"confirm": ws})
    assert deleted.status_code == 303
    assert mcp_status(web, second.group(1))[0] == 401
    with pytest.raises(NotFound):
        runtime.service.get_workspace(ws, user_id=tenant.user)


def test_admin_issues_a_user_token_once(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    refused = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/manage/tokens", 403, method="POST",
                   data={"name": ""})
    assert "admin token" in refused
    as_user(web, runtime, tenant.admin_token)
    issued = web.post(f"/explorer/u/{tenant.user}/manage/tokens", data={"name": "ci"}, headers=ORIGIN,
                      follow_redirects=False)
    assert issued.status_code == 201
    found = TOKEN.search(issued.text)
    assert found and found.group(1).startswith("apg_u_")
    assert web.get(f"/api/users/{tenant.user}", headers={"Authorization": f"Bearer {found.group(1)}"}).status_code \
        == 200
    token_id = next(t.id for t in runtime.service.list_tokens(tenant.user) if t.name == "ci")
    assert post(web, f"/explorer/u/{tenant.user}/manage/tokens/{token_id}/revoke", {"confirm": "yes"}).status_code \
        == 303
    assert web.get(f"/api/users/{tenant.user}", headers={"Authorization": f"Bearer {found.group(1)}"}).status_code \
        == 401


def test_a_permission_changed_on_the_page_binds_the_agent_through_mcp(web: Any, runtime: Runtime,
                                                                      tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    url = f"/explorer/u/{tenant.user}/agents/{tenant.ws_b}/permissions"
    insert = "INSERT INTO orders (id, customer_id, total) VALUES (70, 2, 1.5)"
    assert post(web, url, {"can_read": "on"}).status_code == 303
    code, answer = mcp_status(web, tenant.token_b, insert)
    assert code == 200 and answer["result"]["isError"] and "can_write is false" in str(answer)
    assert post(web, url, {"can_read": "on", "can_write": "on", "can_create_tables": "on"}).status_code == 303
    code, answer = mcp_status(web, tenant.token_b, insert)
    assert code == 200 and not answer["result"].get("isError"), answer


def _audit(runtime: Runtime, t: Tenant, workspace: str, tool: str, outcome: audit_log.AuditOutcome,
           statement: str) -> None:
    audit_log.record(runtime.service.deps.sessions, audit_log.AuditRecord(
        user_id=t.user, workspace_id=workspace, tool=tool, outcome=outcome, duration_ms=1.0, database="global",
        statement=statement, error=None if outcome == "ok" else "x"))


def rows_of(html: str) -> list[str]:
    body = html.split('id="audit"')[1] if 'id="audit"' in html else ""
    return re.findall(r"<code>([^<]*)</code>", body)


def test_audit_filters_in_the_url(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    _audit(runtime, tenant, tenant.ws_b, "query", "ok", "SELECT total FROM orders WHERE id = $1")
    _audit(runtime, tenant, tenant.ws_b, "execute", "refused", "UPDATE orders SET total = $1 -- 100%_sure")
    as_user(web, runtime, tenant.user_token)
    base = f"/explorer/u/{tenant.user}/audit"
    everything = rows_of(page(web, runtime, tenant, base))
    assert len(everything) >= 4
    assert rows_of(page(web, runtime, tenant, base + "?outcome=denied")) == ["DROP TABLE customers"]
    assert rows_of(page(web, runtime, tenant, f"{base}?agent={tenant.ws_b}&tool=query")) == [
        "SELECT total FROM orders WHERE id = $1"]
    assert rows_of(page(web, runtime, tenant, base + "?q=customers+WHERE")) == ["SELECT * FROM customers WHERE id = $1"]
    assert rows_of(page(web, runtime, tenant, base + "?q=100%25_sure")) == [  # % and _ are literal
        "UPDATE orders SET total = $1 -- 100%_sure"]
    assert rows_of(page(web, runtime, tenant, base + "?q=100_")) == []
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    assert "No calls match" in page(web, runtime, tenant, f"{base}?since={tomorrow}")
    assert len(rows_of(page(web, runtime, tenant, f"{base}?until={tomorrow}T00:00"))) == len(everything)
    assert len(rows_of(page(web, runtime, tenant, f"{base}?since=2000-01-01&until={tomorrow}"))) == len(everything)
    for bad, reason in (("since=yesterday", "from must be a date"), ("outcome=great", "outcome must be one of"),
                        ("tool=DROP%20TABLE", "tool must be"),
                        (f"since={tomorrow}&until=2000-01-01", "the time range is empty")):
        html = page(web, runtime, tenant, f"{base}?{bad}", 422)
        assert "The filter is not valid" in html and reason in html, bad
    paged = page(web, runtime, tenant, f"{base}?outcome=ok&limit=1")
    nxt = re.search(r'href="([^"]*cursor=[^"]*)" rel="next"', paged)
    assert nxt and "outcome=ok" in nxt.group(1) and "limit=1" in nxt.group(1)  # the pager keeps the filters
    older = page(web, runtime, tenant, nxt.group(1).replace("&amp;", "&"))
    assert len(rows_of(older)) == 1 and "refused" not in older.split('id="audit"')[1].split("</table>")[0]
    as_user(web, runtime, tenant.other_token)
    assert "customers WHERE" not in page(web, runtime, tenant, f"/explorer/u/{tenant.user}/audit?q=customers", 404,
                                         admin=True)


def test_usage_history_is_recorded_by_the_sync_and_charted(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    runtime.service.sync_usage()
    today = datetime.now(UTC).date()
    history = runtime.service.usage_history(tenant.user, 30)
    assert history and history[-1].day == today and history[-1].storage_bytes > 0
    # The per-day cost is the growth of the period's total since the previous sample (a new period restarts).
    feb, mar = datetime(2020, 2, 1, tzinfo=UTC), datetime(2020, 3, 1, tzinfo=UTC)
    with runtime.service.deps.sessions.begin() as s:
        for day, period, cents in ((date(2020, 2, 27), feb, 100), (date(2020, 2, 29), feb, 250),
                                   (date(2020, 3, 1), mar, 40), (date(2020, 3, 3), mar, 90)):
            s.add(UsageDay(user_id=tenant.other_user, day=day, period_start=period, cost_cents=cents,
                           storage_bytes=cents * 1024, updated_at=period))
    old = usage_history.history(runtime.service.deps.sessions, tenant.other_user, 4, today=date(2020, 3, 3))
    assert [(d.day.day, d.cost_cents, d.period_cost_cents) for d in old] == [(29, 150, 250), (1, 40, 40), (3, 50, 90)]
    as_user(web, runtime, tenant.user_token)
    html = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/usage?days=30")
    assert 'id="usage-chart"' in html and "chart.umd.min.js" in html and "console.js" in html
    days = re.findall(r'<tr data-day="([0-9-]+)" data-cost-cents="(\d+)" data-storage-bytes="(\d+)"', html)
    assert days[-1][0] == today.isoformat() and int(days[-1][2]) > 0 and len(days) == len(history)
    for bad in ("days=0", "days=400", "days=x"):
        page(web, runtime, tenant, f"/explorer/u/{tenant.user}/usage?{bad}", 422)
    as_user(web, runtime, tenant.other_token)
    page(web, runtime, tenant, f"/explorer/u/{tenant.user}/usage", 404, admin=True)
    static = web.get("/explorer/static/chart.umd.min.js")
    assert static.status_code == 200 and static.headers["content-type"].startswith("text/javascript")
    assert "Chart.js v4" in static.text[:200]
    assert "MIT" in web.get("/explorer/static/chart.js.LICENSE.md").text


def test_schema_picture_data_and_text_alternative(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    html = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/global/schema")
    assert 'id="schema-graph"' in html and "cytoscape.min.js" in html
    assert re.findall(r'<li data-table="([^"]+)"', html) == ["customers", "orders"]
    assert re.findall(r'<li data-from="([^"]+)" data-to="([^"]+)"', html) == [("orders", "customers")]
    assert "<strong>orders</strong> (customer_id) → <strong>customers</strong> (id)" in html
    empty = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/agents/{tenant.ws_b}/schema")
    assert "no tables yet" in empty and "cytoscape" not in empty
    page(web, runtime, tenant, f"/explorer/u/{tenant.user}/agents/{tenant.other_ws}/schema", 404)
    page(web, runtime, tenant, f"/explorer/u/{tenant.other_user}/global/schema", 404)
    assert "Permission is hereby granted" in web.get("/explorer/static/cytoscape.LICENSE.txt").text
