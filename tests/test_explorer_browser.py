"""The database explorer in a real browser: Debian's Chromium, driven by Playwright, against a real
``agentpg serve`` process (the ``live_server`` fixture). The agents' data is made through MCP (the SDK
client), so the audit log is real too.

Shown, in order (the tests share one browser page, like a user's visit): sign in; the databases panel; the
global database's tables; paging through 250 rows and sorting; a CSV export checked row by row; the SQL box;
an agent's permission changed in the page and taking effect through MCP (and in Postgres); the audit log;
usage; the admin's user picker. Every page's HTML goes to the leak scanner and is searched for the tenants'
passwords and role names; a screenshot of each panel is saved to artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from api_support import LiveServer
from browser_support import (
    CHROMIUM_ARGS,
    CUSTOMERS,
    FILL_CUSTOMERS,
    ORDERS,
    Tenant,
    check_page,
    drop_tenant,
    ensure_chromium,
    make_tenant,
    publish_docs_screenshot,
    save_screenshot,
)
from helpers import workspace_global_uri
from mcp import ClientSession
from mcp_support import http_session, ok, refused

from agentpg.app.runtime import Runtime

# The first run on a fresh machine installs Debian's chromium package (apt) inside the set-up.
pytestmark = pytest.mark.timeout(1800)

DASH = "\u2013"  # the en dash the row count uses ("Rows 1-50 of 250")
T = TypeVar("T")
Page = Any  # playwright.sync_api.Page (imported lazily: the module needs no browser to be collected)


def in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on its own event loop in a worker thread (Playwright's sync API owns this one)."""
    async def main() -> T:
        return await make()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result(timeout=120)


def mcp(base_url: str, token: str, work: Callable[[ClientSession], Awaitable[T]]) -> T:
    async def call() -> T:
        async with http_session(base_url, token) as session:
            return await work(session)

    return in_thread(call)


@pytest.fixture(scope="module")
def tenant(runtime: Runtime, live_server: LiveServer) -> Iterator[Tenant]:
    t = make_tenant(runtime, seed_directly=False)

    async def seed(s: ClientSession) -> None:  # agent a builds the shared tables, as an agent would
        for statement in (CUSTOMERS, FILL_CUSTOMERS, ORDERS, "INSERT INTO orders VALUES (1, 1, 9.5)"):
            await ok(s, "execute", database="global", sql=statement)
        await ok(s, "query", database="global", sql="SELECT count(*) FROM customers WHERE tier = $1",
                 params=["gold"])
        await ok(s, "execute", database="agent", sql="CREATE TABLE notes (id serial PRIMARY KEY, body text)")

    mcp(live_server.base_url, t.token_a, seed)
    yield t
    drop_tenant(runtime, t)


@pytest.fixture(scope="module")
def page(tenant: Tenant) -> Iterator[Page]:
    from playwright.sync_api import sync_playwright

    chromium = ensure_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
        tab = context.new_page()
        problems: list[str] = []
        # An error page (a refused SQL statement answers 422) logs "Failed to load resource": expected. A CSP
        # violation ("Refused to …") or a script error is not.
        tab.on("console", lambda m: problems.append(m.text)
               if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        tab.on("pageerror", lambda e: problems.append(str(e)))
        tab.set_default_timeout(15_000)
        yield tab
        context.close()
        browser.close()
    assert not problems, f"the browser reported errors (CSP violations, script errors): {problems}"


def look(page: Page, runtime: Runtime, t: Tenant, name: str | None = None) -> str:
    """The page's HTML, checked for leaks; and a screenshot of it when ``name`` is given."""
    html: str = page.content()
    check_page(runtime, t, f"browser {page.url}", html, admin="admin" in (name or ""))
    if name:
        save_screenshot(page.screenshot(), name)
    return html


def test_sign_in_and_databases_panel(page: Page, live_server: LiveServer, runtime: Runtime, tenant: Tenant) -> None:
    page.goto(live_server.base_url + "/")
    look(page, runtime, tenant, "00-sign-in")
    page.fill("#token", tenant.user_token)
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"**/explorer/u/{tenant.user}")
    assert tenant.user_token not in page.url
    cookies = page.context.cookies()
    assert [c["httpOnly"] and c["sameSite"] == "Strict" for c in cookies] == [True]
    assert tenant.user_token not in cookies[0]["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts
    look(page, runtime, tenant, "01-databases")
    rows = page.locator("#databases tbody tr")
    assert rows.count() == 3
    assert "Global database" in rows.nth(0).inner_text() and "ready" in rows.nth(0).inner_text()
    assert "Research agent" in page.locator("#databases").inner_text()


def test_tables_panel(page: Page, runtime: Runtime, tenant: Tenant) -> None:
    page.locator("#databases tbody tr").nth(0).get_by_role("link", name="Tables").click()
    page.wait_for_url("**/global")
    html = look(page, runtime, tenant, "02-tables")
    assert "REFERENCES public.customers(id)" in html
    cards = page.locator("#table-list > section")
    assert [cards.nth(i).get_attribute("data-name") for i in range(cards.count())] == ["customers", "orders"]
    page.fill("#table-filter", "ord")  # the little script filters the cards
    assert page.locator("section[data-name='customers']").is_hidden()
    page.fill("#table-filter", "")


def grid_ids(page: Page) -> list[int]:
    return [int(x) for x in page.locator("#rows tbody tr td:first-child").all_inner_texts()]


def test_page_through_250_rows_and_sort(page: Page, runtime: Runtime, tenant: Tenant) -> None:
    page.locator("section[data-name='customers']").get_by_role("link", name="Browse rows").click()
    page.wait_for_url("**/global/table?name=customers")
    with page.expect_navigation():
        page.select_option("#limit", "50")  # submits itself (script); 5 pages
    seen: list[int] = []
    for n in range(5):
        assert page.locator("#row-count").inner_text().startswith(f"Rows {n * 50 + 1}{DASH}{n * 50 + 50} of 250")
        seen += grid_ids(page)
        look(page, runtime, tenant)
        if n < 4:
            page.click("#next-page")
            page.wait_for_load_state()
    assert seen == list(range(1, 251))
    assert page.locator("#next-page").count() == 0
    with page.expect_navigation():
        page.select_option("#limit", "100")  # back to the first page, 100 rows a page
    assert page.locator("#row-count").inner_text().startswith(f"Rows 1{DASH}100 of 250")
    page.locator("#rows thead a[data-column='balance']").click()
    page.wait_for_url("**sort=balance&dir=asc**")
    assert grid_ids(page)[:3] == [1, 2, 3]
    page.locator("#rows thead a[data-column='balance']").click()
    page.wait_for_url("**sort=balance&dir=desc**")
    assert grid_ids(page)[:3] == [250, 249, 248]
    assert page.locator("#rows thead th[aria-sort='descending']").inner_text().startswith("balance")
    page.click("#next-page")
    page.wait_for_url("**offset=100**")
    assert grid_ids(page)[:2] == [150, 149]
    page.get_by_role("link", name="First").click()
    page.locator("#rows thead a[data-column='id']").click()
    page.wait_for_url("**sort=id&dir=asc**")
    path = save_screenshot(page.screenshot(), "03-rows")
    publish_docs_screenshot(path)
    first = page.locator("#rows tbody tr").nth(0)
    long_note = first.locator("details.v-text")
    assert "THE END" not in long_note.locator("summary").inner_text()
    long_note.locator("summary").click()  # show the whole value
    assert long_note.locator(".whole").is_visible() and "THE END" in long_note.locator(".whole").inner_text()
    profile = first.locator("details.v-json")
    assert '"city": "Lyon"' in profile.locator("summary").inner_text()  # one compact line…
    profile.locator("summary").click()
    assert '{\n  "tags": [\n    "new",' in profile.locator(".whole").inner_text()  # …unfolds pretty-printed
    tenth = page.locator("#rows tbody tr").nth(9)
    fifth = page.locator("#rows tbody tr").nth(4)
    assert tenth.locator(".v-null").inner_text() == "NULL" and fifth.locator(".v-empty").count() == 1


def test_export_csv(page: Page, tenant: Tenant) -> None:
    with page.expect_download() as info:
        page.click("#export-csv")
    download = info.value
    assert download.suggested_filename == "customers.csv"
    text = Path(download.path()).read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == ["id", "name", "email", "tier", "profile", "notes", "balance", "created_at"]
    assert len(rows) == 251 and [int(r[0]) for r in rows[1:]] == list(range(1, 251))
    assert rows[2][1:4] == ["customer 002", "c2@example.com", "bronze"] and rows[2][6] == "2.50"
    assert '"visits":2' in rows[2][4].replace(" ", "") and rows[2][7] == "2024-05-01T12:00:00+00:00"
    assert 'customer 010",,"' in text and 'customer 005","",' in text  # NULL vs empty string survive
    assert rows[1][5].endswith("THE END")


def test_sql_box(page: Page, runtime: Runtime, tenant: Tenant) -> None:
    page.get_by_role("link", name="SQL (read only)").click()
    page.fill("#sql", "SELECT tier, count(*) AS customers, sum(balance) AS balance\n"
                      "FROM customers GROUP BY tier ORDER BY tier")
    with page.expect_navigation():
        page.press("#sql", "Control+Enter")
    result = page.locator("#sql-result")
    assert "3 rows" in result.inner_text() and "bronze" in result.inner_text()
    look(page, runtime, tenant, "04-sql")
    page.fill("#sql", "DELETE FROM customers")
    with page.expect_navigation():
        page.click("#sql-form button")
    assert "only reads" in page.locator("#sql-error").inner_text()
    look(page, runtime, tenant)


def test_permission_change_takes_effect_through_mcp(page: Page, live_server: LiveServer, runtime: Runtime,
                                                    tenant: Tenant) -> None:
    base = live_server.base_url
    insert = "INSERT INTO orders (id, customer_id, total) VALUES ($1, 2, 1.5)"

    async def can_insert(s: ClientSession) -> dict[str, Any]:
        return await ok(s, "execute", database="global", sql=insert, params=[2])

    assert mcp(base, tenant.token_b, can_insert)["rows_affected"] == 1
    page.get_by_role("link", name="Agents & permissions").click()
    row = page.locator(f"#permissions tr[data-agent='{tenant.ws_b}']")
    write = row.locator("input[name='can_write']")
    assert write.is_checked()
    write.uncheck()
    row.get_by_role("button", name="Save").click()  # saved in place by the script (fetch, JSON)
    status = row.locator(".perm-status")
    status.filter(has_text="Saved").wait_for()
    look(page, runtime, tenant, "05-agents")

    async def cannot_insert(s: ClientSession) -> str:
        return await refused(s, "execute", database="global", sql=insert, params=[3])

    assert "can_write is false" in mcp(base, tenant.token_b, cannot_insert)
    with psycopg.connect(workspace_global_uri(runtime, tenant.ws_b), autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("INSERT INTO orders VALUES (4, 2, 1.0)")  # Postgres itself says no, not only agentpg
    page.reload()
    row = page.locator(f"#permissions tr[data-agent='{tenant.ws_b}']")
    assert not row.locator("input[name='can_write']").is_checked()
    row.locator("input[name='can_write']").check()
    row.get_by_role("button", name="Save").click()
    row.locator(".perm-status").filter(has_text="Saved").wait_for()

    async def insert_again(s: ClientSession) -> dict[str, Any]:
        return await ok(s, "execute", database="global", sql=insert, params=[5])

    assert mcp(base, tenant.token_b, insert_again)["rows_affected"] == 1


def test_audit_log(page: Page, runtime: Runtime, tenant: Tenant) -> None:
    page.get_by_role("link", name="Audit log").click()
    text = page.locator("#audit").inner_text()
    assert "INSERT INTO orders" in text and "refused" in text and "CREATE TABLE customers" in text
    with page.expect_navigation():
        page.select_option("#agent", tenant.ws_b)
    agents = set(page.locator("#audit tbody tr td:nth-child(2)").all_inner_texts())
    assert agents == {tenant.ws_b}
    look(page, runtime, tenant, "06-audit")


def test_usage_and_budget(page: Page, runtime: Runtime, tenant: Tenant) -> None:
    page.get_by_role("link", name="Usage & budget").click()
    assert "Total" in page.locator("#costs").inner_text()
    look(page, runtime, tenant, "07-usage")


def test_admin_picks_a_user(page: Page, live_server: LiveServer, runtime: Runtime, tenant: Tenant) -> None:
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/?reason=signedout")
    assert page.context.cookies() == []
    page.fill("#token", tenant.admin_token)
    page.click("button:has-text('Sign in')")
    page.wait_for_url("**/explorer/users")
    page.fill("#user", tenant.user)
    page.click("button:has-text('Open')")
    page.wait_for_url(f"**/explorer/u/{tenant.user}")
    assert "viewing user" in page.locator("header").inner_text()
    look(page, runtime, tenant, "08-admin")


def test_the_server_log_holds_no_token(live_server: LiveServer, tenant: Tenant) -> None:
    time.sleep(0.2)
    output = live_server.output()
    assert "/explorer/u/" in output or "GET /" in output or output  # the log exists
    for token in (tenant.user_token, tenant.admin_token, tenant.token_a, tenant.token_b):
        assert token not in output
