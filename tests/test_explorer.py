"""The database explorer without a browser: sign-in and session cookie, CSRF and headers, tenant isolation,
faithful values, the read-only SQL box, permissions, audit and usage pages (ASGI client, in process).

The browser flows (Chromium) are in tests/test_explorer_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from browser_support import Tenant, as_user, check_page, drop_tenant, make_tenant

from agentpg.app.runtime import Runtime
from agentpg.web.security import COOKIE, CSP, seal_session

DASH = "\u2013"  # the en dash the row count uses ("Rows 1-25 of 250")
ORIGIN = {"Origin": "http://testserver"}


@pytest.fixture(scope="module")
def tenant(runtime: Runtime) -> Iterator[Tenant]:
    t = make_tenant(runtime, seed_directly=True)
    yield t
    drop_tenant(runtime, t)


def sign_in(client: Any, token: str) -> Any:
    return client.post("/explorer/login", data={"token": token}, headers=ORIGIN, follow_redirects=False)


def page(client: Any, runtime: Runtime, t: Tenant, url: str, status: int = 200, *, admin: bool = False) -> str:
    response = client.get(url, follow_redirects=False)
    assert response.status_code == status, (url, response.status_code, response.text[:2000])
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["cache-control"] == "no-store"
    html: str = response.text
    check_page(runtime, t, f"explorer {url}", html, echoes_ids=status == 404, admin=admin)
    # No inline code anywhere: every script is a file of ours, no style attributes, no event handlers.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), url
    assert " style=" not in html and not re.search(r"\son[a-z]+=", html), url
    return html


def test_sign_in_sets_a_strict_http_only_cookie_and_never_a_url(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    login = page(web, runtime, tenant, "/")
    assert 'action="/explorer/login"' in login and 'type="password"' in login
    response = sign_in(web, tenant.user_token)
    assert response.status_code == 303 and response.headers["location"] == f"/explorer/u/{tenant.user}"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/" in cookie and "Max-Age=" in cookie and tenant.user_token not in cookie  # sealed
    assert tenant.user_token not in response.headers["location"]
    assert web.get("/", follow_redirects=False).headers["location"] == f"/explorer/u/{tenant.user}"
    overview = page(web, runtime, tenant, f"/explorer/u/{tenant.user}")
    assert "Global database" in overview and "Research agent" in overview and "Support bot" in overview
    out = web.post("/explorer/logout", headers=ORIGIN, follow_redirects=False)
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
    web.cookies.clear()
    assert web.get(f"/explorer/u/{tenant.user}", follow_redirects=False).headers["location"] == "/?reason=signin"


def test_bad_tokens_and_cross_site_forms_are_refused(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    bad = sign_in(web, "apg_u_" + "x" * 43)
    assert bad.status_code == 401 and "not valid" in bad.text and "set-cookie" not in bad.headers
    agent = sign_in(web, tenant.token_a)
    assert agent.status_code == 403 and "MCP" in agent.text and "set-cookie" not in agent.headers
    for headers in ({}, {"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        refused = web.post("/explorer/login", data={"token": tenant.user_token}, headers=headers,
                           follow_redirects=False)
        assert refused.status_code == 403 and "set-cookie" not in refused.headers, headers
    assert sign_in(web, tenant.user_token).status_code == 303
    forged = web.post(f"/explorer/u/{tenant.user}/agents/{tenant.ws_b}/permissions", data={"can_read": "on"},
                      headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert forged.status_code == 403
    assert runtime.service.get_agent_permissions(tenant.ws_b).can_write is True  # untouched


def test_revoking_the_token_ends_the_session(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    issued = runtime.service.issue_user_token(tenant.user, "short-lived")
    assert sign_in(web, issued.secret).status_code == 303
    assert web.get(f"/explorer/u/{tenant.user}").status_code == 200
    web.app.state.service.revoke_token(issued.id)  # through the app's service: its caches drop it at once
    gone = web.get(f"/explorer/u/{tenant.user}", follow_redirects=False)
    assert gone.status_code == 303 and gone.headers["location"] == "/?reason=expired"
    assert f'{COOKIE}=""' in gone.headers["set-cookie"]
    # A cookie past its sealed expiry, or altered, or holding the bare token, is no session either.
    sealed = seal_session(runtime.service, tenant.user_token)
    for value in (seal_session(runtime.service, tenant.user_token, seconds=-1), sealed[:-2] + "AA", tenant.user_token):
        web.cookies.clear()
        web.cookies.set(COOKIE, value)
        response = web.get(f"/explorer/u/{tenant.user}/usage", follow_redirects=False)
        assert response.headers["location"] == "/?reason=expired", value[:10]


def test_another_users_data_is_unreachable(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    me, other, ws_o = tenant.user, tenant.other_user, tenant.other_ws
    for url in (f"/explorer/u/{other}", f"/explorer/u/{other}/global", f"/explorer/u/{other}/agents",
                f"/explorer/u/{other}/audit", f"/explorer/u/{other}/usage", f"/explorer/u/{other}/global/sql",
                f"/explorer/u/{other}/global/table?name=other_secrets",
                f"/explorer/u/{other}/global/export?name=other_secrets&format=csv",
                f"/explorer/u/{me}/agents/{ws_o}", f"/explorer/u/{me}/agents/{ws_o}/table?name=x",
                f"/explorer/u/{me}/agents/{ws_o}/export?name=x", f"/explorer/u/{me}/audit?agent={ws_o}",
                f"/explorer/u/{other}/agents/{ws_o}/sql"):
        html = page(web, runtime, tenant, url, status=404)
        assert "does not exist" in html
    for url, form in ((f"/explorer/u/{other}/global/sql", {"sql": "SELECT * FROM other_secrets"}),
                      (f"/explorer/u/{me}/agents/{ws_o}/permissions", {"can_read": "on"}),
                      (f"/explorer/u/{other}/agents/{ws_o}/permissions", {"can_read": "on"})):
        response = web.post(url, data=form, headers=ORIGIN)
        assert response.status_code == 404, url
        check_page(runtime, tenant, f"explorer POST {url}", response.text, echoes_ids=True)
    assert runtime.service.get_agent_permissions(ws_o).can_write is True
    assert web.get("/explorer/users", follow_redirects=False).headers["location"] == f"/explorer/u/{me}"


def test_admin_picks_a_user(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    response = sign_in(web, tenant.admin_token)
    assert response.status_code == 303 and response.headers["location"] == "/explorer/users"
    picker = page(web, runtime, tenant, f"/explorer/users?user={tenant.user}", status=303)
    assert picker == ""
    assert page(web, runtime, tenant, "/explorer/users?user=nobody-here", status=404).count("There is no user")
    overview = page(web, runtime, tenant, f"/explorer/u/{tenant.other_user}", admin=True)
    assert "admin" in overview and tenant.other_user in overview


def test_tables_and_rows_render_values_faithfully(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    base = f"/explorer/u/{tenant.user}/global"
    tables = page(web, runtime, tenant, base)
    for text in ("customers", "orders", "<code>jsonb</code>", "numeric(12,2)", 'title="primary key">PK',
                 "FOREIGN KEY (customer_id) REFERENCES public.customers(id)", "export"):
        assert text in tables, text
    grid = page(web, runtime, tenant, f"{base}/table?name=customers&limit=25")
    assert f"Rows 1{DASH}25 of 250" in grid
    cells = re.findall(r"<td[^>]*>(.*?)</td>", grid, re.S)
    assert any('class="v-null"' in c for c in cells), "NULL is shown as NULL"
    assert any('class="v-empty"' in c for c in cells), "the empty string is shown distinct from NULL"
    assert '<div class="whole">{\n  &#34;tags&#34;: [\n    &#34;new&#34;,' in grid, "JSON is pretty-printed"
    long_cell = next(c for c in cells if "a very long note" in c)
    assert "<details" in long_cell and "THE END" in long_cell and "show all" in long_cell
    assert 'rel="next"' in grid and "offset=25" in grid
    desc = page(web, runtime, tenant, f"{base}/table?name=customers&sort=balance&dir=desc&limit=25")
    assert desc.index("customer 250") < desc.index("customer 249") and 'aria-sort="descending"' in desc
    last = page(web, runtime, tenant, f"{base}/table?name=customers&limit=100&offset=200")
    assert f"Rows 201{DASH}250 of 250" in last and 'id="next-page"' not in last
    missing = page(web, runtime, tenant, f"{base}/table?name=customer", status=404)
    assert "did you mean" in missing
    assert page(web, runtime, tenant, f"{base}/table?name=customers&limit=7", status=422).count("limit must be")


def test_empty_states_say_what_to_do_next(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    agent_db = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/agents/{tenant.ws_b}")
    assert "hasn't created any tables" in agent_db and "CREATE TABLE" in agent_db
    audit = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/audit?agent={tenant.ws_b}")
    assert "hasn't run anything" in audit


def test_export_is_the_rest_routes_export(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    mine = web.get(f"/explorer/u/{tenant.user}/global/export?name=customers&format=csv")
    assert mine.status_code == 200 and mine.headers["content-disposition"].startswith("attachment;")
    api = web.get(f"/api/users/{tenant.user}/global-database/tables/customers/export?format=csv",
                  headers={"Authorization": f"Bearer {tenant.user_token}"})
    assert mine.content == api.content
    lines = mine.text.split("\r\n")
    assert lines[0] == '"id","name","email","tier","profile","notes","balance","created_at"' and len(lines) == 252
    assert lines[10].startswith('10,"customer 010",,') and lines[5].startswith('5,"customer 005","",')
    json_export = web.get(f"/explorer/u/{tenant.user}/global/export?name=customers&format=json")
    assert json_export.json()[0]["profile"]["address"] == {"city": "Lyon", "zip": "69001"}


def run_sql(client: Any, tenant: Tenant, sql: str, status: int = 200) -> str:
    response = client.post(f"/explorer/u/{tenant.user}/global/sql", data={"sql": sql}, headers=ORIGIN)
    assert response.status_code == status, (sql, response.status_code, response.text[-1500:])
    return str(response.text)


def test_sql_box_reads_and_refuses_everything_else(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    ok = run_sql(web, tenant, "SELECT id, email, profile FROM customers WHERE id IN (5, 10) ORDER BY id")
    check_page(runtime, tenant, "sql box", ok)
    assert "2 rows in" in ok and 'class="v-null"' in ok and 'class="v-empty"' in ok
    capped = run_sql(web, tenant, "SELECT g FROM generate_series(1, 100000) g")
    assert "1,000 rows" in capped and "row limit" in capped
    refused = {
        "INSERT INTO customers (id, name) VALUES (999, 'x')": "only reads",
        "DROP TABLE customers": "only reads",
        "SELECT 1; DROP TABLE customers": "statements",
        "SELECT rolname FROM pg_roles": "schema public only",
        "SELECT * FROM agentpg_internal.config": "schema public only",
        "SELECT set_config('role', 'x', true)": "set_config",
        "BEGIN": "Transaction control",
        "SELECT * FROM customers FOR UPDATE": "only reads",
    }
    for sql, words in refused.items():
        html = run_sql(web, tenant, sql, status=422)
        assert words in html, (sql, html[-800:])
    # A function that writes is a "read" to the parser: READ ONLY is what stops it, in Postgres itself.
    html = run_sql(web, tenant, "SELECT touch_customers()", status=422)
    assert "read-only transaction" in html and "25006" in html
    who = run_sql(web, tenant, "SELECT current_user AS me, current_database() AS db")
    assert "[internal name]" in who
    assert runtime.service.get_agent_permissions(tenant.ws_a).can_read is True
    prefilled = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/global/sql?table=customers")
    assert "FROM public.&#34;customers&#34;" in prefilled


def test_permissions_form_changes_the_agents_role(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    agents = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/agents")
    assert "Support bot" in agents and agents.count('type="checkbox"') == 8
    url = f"/explorer/u/{tenant.user}/agents/{tenant.ws_b}/permissions"
    saved = web.post(url, data={"can_read": "on", "allowed_tables": "customers, orders"}, headers=ORIGIN,
                     follow_redirects=False)
    assert saved.status_code == 303 and saved.headers["location"].endswith(f"/agents?saved={tenant.ws_b}")
    perms = runtime.service.get_agent_permissions(tenant.ws_b)
    assert (perms.can_read, perms.can_write, perms.can_create_tables) == (True, False, False)
    assert perms.allowed_tables == ["customers", "orders"]
    as_json = web.post(url, data={"can_read": "on", "can_write": "on", "can_create_tables": "on"},
                       headers={**ORIGIN, "Accept": "application/json"})
    assert as_json.status_code == 200 and as_json.json()["permissions"]["can_write"] is True
    bad = web.post(url, data={"can_drop_tables": "on"}, headers=ORIGIN)
    assert bad.status_code == 422 and "can_drop_tables requires" in bad.text
    bad_json = web.post(url, data={"can_drop_tables": "on"}, headers={**ORIGIN, "Accept": "application/json"})
    assert bad_json.status_code == 422 and bad_json.headers["content-type"].startswith("application/problem+json")
    assert runtime.service.get_agent_permissions(tenant.ws_b).can_write is True


def test_audit_and_usage_pages(web: Any, runtime: Runtime, tenant: Tenant) -> None:
    as_user(web, runtime, tenant.user_token)
    audit = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/audit")
    assert "SELECT * FROM customers WHERE id = $1" in audit and "42501 InsufficientPrivilege" in audit
    usage = page(web, runtime, tenant, f"/explorer/u/{tenant.user}/usage")
    assert "Global database" in usage and "Research agent" in usage and "none set" in usage


def test_static_assets_and_unknown_pages(web: Any) -> None:
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        response = web.get(f"/explorer/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert response.headers["x-content-type-options"] == "nosniff"
    assert web.get("/explorer/static/../app.py").status_code == 404
    assert web.get("/explorer/static/secret.key").status_code == 404
    assert "/explorer" not in str(web.get("/openapi.json").json()["paths"])
    assert web.get("/explorer", follow_redirects=False).headers["location"] == "/"
