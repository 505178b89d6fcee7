"""The explorer's console pages in a real browser (Debian's Chromium, Playwright, a real ``agentpg serve``;
issue 21): a workspace created from the page, its token shown once and working for MCP, revoked from the page
and refused at once, the workspace deleted; the audit log filtered; the usage chart drawn (Chart.js, a canvas
with data) and the schema picture drawn (Cytoscape.js, a node per table) under the strict CSP, with no
console error; light, dark and narrow (mobile) screenshots in artifacts/screenshots/ (console-*.png).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import LiveServer
from browser_support import (
    Tenant,
    check_page,
    chromium_browser,
    drop_tenant,
    make_tenant,
    save_screenshot,
    sign_in,
    uid,
    watch_errors,
)
from mcp_support import MCP_HEADERS

from agentpg.app.runtime import Runtime

pytestmark = pytest.mark.timeout(600)
Page = Any  # playwright.sync_api.Page (imported lazily)


@pytest.fixture(scope="module")
def tenant(runtime: Runtime, live_server: LiveServer) -> Iterator[Tenant]:
    t = make_tenant(runtime, seed_directly=True)
    runtime.service.sync_usage()  # today's usage sample, for the chart
    yield t
    drop_tenant(runtime, t)


@pytest.fixture(scope="module")
def browser_context(tenant: Tenant) -> Iterator[tuple[Any, list[str]]]:
    with chromium_browser() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        problems: list[str] = []
        yield context, problems
        context.close()
    # A 4xx page logs "Failed to load resource": expected. A CSP violation ("Refused to …") or a script error is not.
    assert not problems, f"the browser reported errors (CSP violations, script errors): {problems}"


@pytest.fixture(scope="module")
def page(browser_context: tuple[Any, list[str]], live_server: LiveServer, tenant: Tenant) -> Page:
    context, problems = browser_context
    tab = context.new_page()
    watch_errors(tab, problems)
    tab.set_default_timeout(15_000)
    sign_in(tab, live_server.base_url, tenant.user_token, tenant.user)
    return tab


def look(page: Page, runtime: Runtime, t: Tenant, name: str | None = None) -> str:
    html: str = page.content()
    check_page(runtime, t, f"browser {page.url}", html)
    if name:
        save_screenshot(page.screenshot(full_page=True), name)
    return html


def mcp_call(base_url: str, token: str) -> int:
    """One MCP ``tools/call`` (a query on the global database) with ``token``: the HTTP status."""
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "query", "arguments": {"database": "global", "sql": "SELECT 1 AS one"}}}
    response = httpx.post(base_url + "/mcp", json=call, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
                          timeout=30)
    if response.status_code == 200:
        assert not response.json()["result"].get("isError"), response.text
    return response.status_code


def test_manage_a_workspace_and_its_token(page: Page, live_server: LiveServer, runtime: Runtime,
                                          tenant: Tenant) -> None:
    page.get_by_role("link", name="Workspaces & tokens").click()
    page.wait_for_url("**/manage")
    ws = uid("console")
    page.get_by_label("Workspace id").fill(ws)
    page.get_by_label("Name (optional)").fill("Console agent")
    page.get_by_role("button", name="Create workspace").click()
    page.get_by_role("heading", name="Copy the new agent token now").wait_for()
    token = page.get_by_label("Token", exact=True).input_value()
    assert token.startswith("apg_g_") and token not in page.url
    save_screenshot(page.screenshot(), "console-01-token-once")
    assert mcp_call(live_server.base_url, token) == 200
    page.get_by_role("link", name="Done: back to workspaces & tokens").click()
    row = page.locator(f"#workspaces tr[data-workspace='{ws}']")
    assert "Console agent" in row.inner_text()
    assert token not in page.content()  # shown once, never again
    look(page, runtime, tenant, "console-02-workspaces")
    token_id = runtime.service.list_tokens(tenant.user, ws)[0].id
    row.get_by_role("link", name=f"Revoke token {token_id} of Console agent").click()
    page.get_by_label("Yes, revoke this token").check()
    page.get_by_role("button", name="Revoke token").click()
    page.wait_for_url("**/manage?notice=**")
    assert "Revoked the agent token" in page.locator("#manage-notice").inner_text()
    assert mcp_call(live_server.base_url, token) == 401  # at once
    row = page.locator(f"#workspaces tr[data-workspace='{ws}']")
    assert "none: the agent cannot connect" in row.inner_text()
    row.get_by_role("link", name="Delete workspace Console agent").click()
    page.get_by_label(f"Type {ws} to confirm").fill(ws)
    page.get_by_role("button", name="Delete workspace").click()
    page.wait_for_url("**/manage?notice=**")
    assert page.locator(f"#workspaces tr[data-workspace='{ws}']").count() == 0


def test_audit_log_filters(page: Page, runtime: Runtime, tenant: Tenant) -> None:
    page.get_by_role("link", name="Audit log").click()
    page.get_by_label("Outcome").select_option("denied")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**outcome=denied**")
    assert page.locator("#audit tbody tr").count() == 1 and "DROP TABLE" in page.locator("#audit").inner_text()
    page.get_by_label("Statement contains").fill("nothing like this")
    page.get_by_role("button", name="Filter").click()
    page.locator("#audit-empty").wait_for()
    look(page, runtime, tenant, "console-03-audit-filters")
    page.get_by_role("link", name="Clear filters").click()
    assert page.locator("#audit tbody tr").count() >= 2


def test_usage_chart_renders(page: Page, runtime: Runtime, tenant: Tenant) -> None:
    page.get_by_role("link", name="Usage & budget").click()
    canvas = page.locator("#usage-chart[data-points]")
    canvas.wait_for()
    assert int(canvas.get_attribute("data-points") or 0) >= 1
    drawn = page.evaluate("""() => {
        const chart = window.Chart.getChart('usage-chart');
        const c = document.getElementById('usage-chart');
        const pixels = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let painted = 0;
        for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
        return {points: chart.data.datasets[1].data.length, storage: chart.data.datasets[1].data[0],
                width: c.width, painted};
    }""")
    assert drawn["points"] >= 1 and drawn["storage"] > 0 and drawn["width"] > 100 and drawn["painted"] > 1000
    page.locator("#history-title").scroll_into_view_if_needed()
    look(page, runtime, tenant, "console-04-usage-chart")


def test_schema_picture_renders(page: Page, live_server: LiveServer, runtime: Runtime, tenant: Tenant) -> None:
    page.goto(f"{live_server.base_url}/explorer/u/{tenant.user}/global")
    page.get_by_role("link", name="Schema").click()
    graph = page.locator("#schema-graph[data-nodes]")
    graph.wait_for()
    assert graph.get_attribute("data-nodes") == "customers,orders" and graph.get_attribute("data-edges") == "1"
    assert page.locator("#schema-graph canvas").count() >= 1
    graph.focus()
    before = page.evaluate("() => document.querySelector('#schema-graph canvas').toDataURL().length")
    page.keyboard.press("+")  # keyboard zoom
    after = page.evaluate("() => document.querySelector('#schema-graph canvas').toDataURL().length")
    assert before > 0 and after > 0
    assert page.locator("#schema-keys li").inner_text().startswith("orders (customer_id) → customers (id)")
    look(page, runtime, tenant, "console-05-schema")
    page.emulate_media(color_scheme="dark")
    page.reload()
    page.locator("#schema-graph[data-nodes]").wait_for()
    save_screenshot(page.screenshot(full_page=True), "console-06-schema-dark")
    page.emulate_media(color_scheme="light")


def test_narrow_screen(page: Page, live_server: LiveServer, runtime: Runtime, tenant: Tenant) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{live_server.base_url}/explorer/u/{tenant.user}/manage")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390 + 1  # no sideways scrolling
    look(page, runtime, tenant, "console-07-manage-mobile")
    page.goto(f"{live_server.base_url}/explorer/u/{tenant.user}/usage")
    page.locator("#usage-chart[data-points]").wait_for()
    save_screenshot(page.screenshot(full_page=True), "console-08-usage-mobile")
    page.set_viewport_size({"width": 1280, "height": 800})
