"""The explorer's accessibility, checked by a well-kept tool (issue 21): axe-core, pinned, run inside Debian's
Chromium (Playwright) on a real ``agentpg serve`` over every kind of explorer page, in the light and the dark
color scheme (the contrast differs); and two key flows done with the keyboard only.

axe-core is the npm package, installed by this module's set-up with npm into a cache directory under /tmp
(per version, like the npm MCP server of tests/test_gateway.py; node and npm come from Debian's packages when
missing). The explorer's CSP allows no foreign or inline script, so axe is not added as a ``<script>`` tag
(which the CSP would refuse, short of ``bypass_csp``): it is given to the browser context as an init script
(``add_init_script``, evaluated by the DevTools protocol in every page, outside the page's CSP). So the pages
are audited as served, under their real CSP, and no CSP violation or script error may be logged meanwhile.

Each page is audited with every rule in the light scheme, then, switched to the dark scheme in place
(``emulate_media``, no second load), with the rules that depend on colours (contrast, links told apart from
text). A page fails on any axe violation of impact "serious" or "critical"; the failure lists each one
(scheme, page, rule id, help, the target selectors).

The keyboard flows (Tab, Enter, Space only) apply a filter on the rows page, and press "Restore as a copy"
(then "Restore to here" and its confirmation page's "Restore as a copy instead") on the History page,
checking at every control the focus passes that its focus is visible (a ``:focus-visible`` outline or box
shadow). The shared server runs without archiving, so the copy itself may be refused with a message on the
page (tests/test_explorer_history.py makes real copies); what is checked here is that the keyboard gets
there and the answer is announced (``role="alert"`` or ``role="status"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from api_support import LiveServer
from browser_support import Tenant, check_page, chromium_browser, drop_tenant, make_tenant
from install_lock import npm_install

from agentpg.access import audit as audit_log
from agentpg.app.runtime import Runtime

pytestmark = pytest.mark.timeout(900)  # the first run on a fresh machine installs chromium (apt) and axe-core
Page = Any  # playwright.sync_api.Page (imported lazily)

AXE_VERSION = "4.14.1"
BLOCKING = ("serious", "critical")
COLOUR_RULES = ("color-contrast", "link-in-text-block")  # what the dark scheme can change
# A control has visible focus when the browser draws an outline or a ring (box shadow) around it.
FOCUS_STYLE = """() => {
    const el = document.activeElement;
    if (!el || el === document.body) return {tag: null};
    const s = getComputedStyle(el);
    return {tag: el.tagName, text: (el.innerText || el.value || el.id || '').slice(0, 60),
            visible: el.matches(':focus-visible') &&
                     ((s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0) || s.boxShadow !== 'none')};
}"""


def ensure_axe() -> Path:
    """``axe.min.js`` of the pinned axe-core, installed with npm into /tmp (once per version)."""
    from test_gateway import apt_install

    apt_install(("node", "npm"), ("nodejs", "npm"))
    return npm_install("axe-core", AXE_VERSION, "axe-core/axe.min.js")


@pytest.fixture(scope="module")
def tenant(runtime: Runtime, live_server: LiveServer) -> Iterator[Tenant]:
    t = make_tenant(runtime, seed_directly=True)
    runtime.service.sync_usage()  # today's usage sample, for the chart
    # A statement with its start time, so the History page offers its restore buttons.
    audit_log.record(runtime.service.deps.sessions, audit_log.AuditRecord(
        user_id=t.user, workspace_id=t.ws_a, tool="execute", outcome="ok", duration_ms=2.0, database="global",
        statement="DELETE FROM orders WHERE id = $1", rows=0, started_at=datetime.now(UTC)))
    yield t
    drop_tenant(runtime, t)


@pytest.fixture(scope="module")
def browser(tenant: Tenant) -> Iterator[Any]:
    with chromium_browser() as launched:
        yield launched


def new_tab(browser: Any, scheme: str, problems: list[str]) -> Page:
    """A tab in its own context, in ``scheme``; console errors and script errors go to ``problems``."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme=scheme)
    tab = context.new_page()
    # The error page (a 404) logs "Failed to load resource": expected. A CSP violation or a script error is not.
    tab.on("console", lambda m: problems.append(m.text)
           if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    tab.on("pageerror", lambda e: problems.append(str(e)))
    tab.set_default_timeout(15_000)
    return tab


def sign_in(tab: Page, base_url: str, token: str) -> None:
    tab.goto(base_url + "/")
    tab.fill("#token", token)
    tab.click("button:has-text('Sign in')")
    tab.wait_for_load_state()


def audit(tab: Page, name: str, rules: tuple[str, ...] = ()) -> list[str]:
    """axe's serious and critical violations on the page shown (only ``rules`` when given), one readable line
    per rule. axe must be injected already."""
    result: dict[str, Any] = tab.evaluate(
        """async (rules) => {
            const options = {resultTypes: ['violations']};
            if (rules.length) options.runOnly = {type: 'rule', values: rules};
            const r = await axe.run(document, options);
            return {passed: r.passes.length, version: r.testEngine.version, violations: r.violations.map(v => (
                {id: v.id, impact: v.impact, help: v.help, targets: v.nodes.map(n => n.target.join(' '))}))};
        }""", list(rules))
    # Rules that found nothing to check still count as passes: none at all would mean axe checked nothing.
    assert result["version"] == AXE_VERSION and result["passed"] > 0, f"{name}: axe did not run its rules: {result}"
    return [f"{name}: {v['id']} ({v['impact']}): {v['help']} -> {', '.join(v['targets'][:6])}"
            f"{' …' if len(v['targets']) > 6 else ''}" for v in result["violations"] if v["impact"] in BLOCKING]


def test_every_page_kind_passes_axe_light_and_dark(browser: Any, live_server: LiveServer, runtime: Runtime,
                                                   tenant: Tenant) -> None:
    axe = ensure_axe()
    problems: list[str] = []
    tab = new_tab(browser, "light", problems)
    tab.context.add_init_script(path=str(axe))  # in every page of this context, before the page's own scripts
    base, user = live_server.base_url, tenant.user
    db = f"{base}/explorer/u/{user}/global"
    found: list[str] = []

    def visit(name: str, url: str | None = None, wait: str | None = None) -> None:
        if url is not None:
            tab.goto(url)
        if wait is not None:
            tab.locator(wait).wait_for()
        check_page(runtime, tenant, f"a11y {tab.url}", tab.content(), echoes_ids=True, admin="admin" in name)
        found.extend(audit(tab, f"light {name}"))
        tab.emulate_media(color_scheme="dark")
        found.extend(audit(tab, f"dark {name}", COLOUR_RULES))
        tab.emulate_media(color_scheme="light")

    try:
        tab.goto(base + "/")
        background = "() => getComputedStyle(document.documentElement).backgroundColor"
        light = tab.evaluate(background)
        tab.emulate_media(color_scheme="dark")
        assert tab.evaluate(background) != light, "the dark scheme does not change the colours: nothing to audit"
        tab.emulate_media(color_scheme="light")
        visit("sign-in")
        sign_in(tab, base, tenant.user_token)
        visit("databases", wait="#databases")
        visit("tables", db, wait="#table-list")
        visit("rows with filters", db + "/table?name=customers&limit=25&fc=tier&fo=ne&fv=gold&fc=balance&fo=lt&fv=90",
              wait="#rows")
        tab.goto(db + "/table?name=customers&limit=25")
        tab.locator("#rows tbody tr").nth(0).locator("details.v-text summary").click()
        visit("truncated cell open")
        tab.goto(db + "/sql")
        tab.fill("#sql", "SELECT id, name, email, profile, notes FROM customers ORDER BY id LIMIT 12")
        tab.get_by_role("button", name="Run").click()
        visit("sql box with result", wait="#sql-result")
        visit("agents & permissions", f"{base}/explorer/u/{user}/agents")
        visit("history", db + "/history", wait="#timeline")
        tab.locator("#timeline tr.ev-statement").nth(0).get_by_role("button", name="Restore to here").click()
        visit("history confirm", wait="#confirm-title")
        visit("audit with filters", f"{base}/explorer/u/{user}/audit?outcome=denied&q=drop", wait="#audit")
        visit("usage with chart", f"{base}/explorer/u/{user}/usage", wait="#usage-chart[data-points]")
        visit("schema picture", db + "/schema", wait="#schema-graph[data-nodes]")
        visit("workspaces & tokens", f"{base}/explorer/u/{user}/manage", wait="#workspaces")
        tab.locator(f"#workspaces tr[data-workspace='{tenant.ws_b}']").get_by_role(
            "link", name="Delete workspace Support bot").click()
        visit("confirm (delete a workspace)", wait="#confirm-form")
        visit("error page", db + "/table?name=no_such_table")
        tab.get_by_role("button", name="Sign out").click()
        sign_in(tab, base, tenant.admin_token)
        visit("admin pick user")
        visit("admin manage users", f"{base}/explorer/manage/users")
    finally:
        tab.context.close()
    assert not found, "axe-core found serious or critical problems:\n" + "\n".join(found)
    assert not problems, f"the browser reported errors (CSP violations, script errors): {problems}"


def tab_to(tab: Page, predicate: str, *, limit: int = 80) -> list[dict[str, Any]]:
    """Press Tab until the focused element matches the JS ``predicate`` (on ``el``); every stop's focus style."""
    stops: list[dict[str, Any]] = []
    for _ in range(limit):
        tab.keyboard.press("Tab")
        stops.append(tab.evaluate(FOCUS_STYLE))
        if tab.evaluate(f"() => {{ const el = document.activeElement; return !!el && ({predicate}); }}"):
            return stops
    raise AssertionError(f"{predicate} not reached with {limit} Tabs; stops: {stops}")


def assert_focus_visible(stops: list[dict[str, Any]]) -> None:
    hidden = [s for s in stops if s["tag"] and not s["visible"]]
    assert not hidden, f"focused without a visible focus indicator: {hidden}"


def test_keyboard_only_filter_and_restore_as_a_copy(browser: Any, live_server: LiveServer, runtime: Runtime,
                                                   tenant: Tenant) -> None:
    problems: list[str] = []
    tab = new_tab(browser, "light", problems)
    db = f"{live_server.base_url}/explorer/u/{tenant.user}/global"
    try:
        sign_in(tab, live_server.base_url, tenant.user_token)
        # Rows: a filter chosen and applied with the keyboard alone (type-ahead picks the options).
        tab.goto(db + "/table?name=customers&limit=25")
        stops = tab_to(tab, "el.id === 'fc-0'")
        tab.keyboard.type("tier")
        stops += tab_to(tab, "el.id === 'fv-0'")
        tab.keyboard.type("gold")
        stops += tab_to(tab, "el.id === 'apply-filters'")
        with tab.expect_navigation():
            tab.keyboard.press("Enter")
        tab.wait_for_url("**fc=tier&fo=eq&fv=gold**")
        assert "matching" in tab.locator("#row-count").inner_text()
        assert_focus_visible(stops)
        check_page(runtime, tenant, f"a11y {tab.url}", tab.content())

        # History: "Restore as a copy" reached and pressed with the keyboard.
        tab.goto(db + "/history")
        stops = tab_to(tab, "el.matches('tr.ev-statement button.secondary')")
        assert tab.evaluate("document.activeElement.textContent").startswith("Restore as a copy")
        with tab.expect_navigation():
            tab.keyboard.press("Enter")
        tab.get_by_role("heading", name="History", level=1).wait_for()
        answer = tab.locator("#history-result, #history-error").first  # the copy, or the refusal, announced
        assert answer.is_visible() and answer.get_attribute("role") in ("alert", "status"), answer.inner_text()
        # "Restore to here" (Space on the button), the confirmation page, and its copy button (Enter).
        tab.goto(db + "/history")
        stops += tab_to(tab, "el.matches('tr.ev-statement button.danger-outline')")
        with tab.expect_navigation():
            tab.keyboard.press("Space")
        tab.get_by_role("heading", name="Restore in place?").wait_for()
        stops += tab_to(tab, "el.id === 'confirm'")
        tab.keyboard.press("Space")
        assert tab.locator("#confirm").is_checked()
        tab.keyboard.press("Space")  # un-ticked again: nothing is replaced by this test
        stops += tab_to(tab, "el.textContent.startsWith('Restore as a copy instead')")
        with tab.expect_navigation():
            tab.keyboard.press("Enter")
        tab.get_by_role("heading", name="History", level=1).wait_for()
        assert_focus_visible(stops)
        check_page(runtime, tenant, f"a11y {tab.url}", tab.content())
    finally:
        tab.context.close()
    assert not problems, f"the browser reported errors (CSP violations, script errors): {problems}"
