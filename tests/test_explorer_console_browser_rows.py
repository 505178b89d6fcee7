"""The table browser in a real browser (Debian's Chromium, Playwright, a real ``agentpg serve``): filter a
table with the form (and go back), search, a bad value answered on the page, follow a foreign key to the
referenced row and back through "referenced by", open a truncated cell with the keyboard, the sticky header
inside a grid that scrolls on its own, and the phone layout in dark mode. Screenshots go to
artifacts/screenshots/ (30-… to 34-…), like the other explorer browser tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import LiveServer
from browser_support import DOCS_SCREENSHOT_MAX_BYTES, ROOT, chromium_browser, save_screenshot, sign_in, watch_errors
from rows_support import Shop, check_html, drop_shop, make_shop

from agentpg.app.runtime import Runtime

pytestmark = pytest.mark.timeout(1800)  # the first run on a fresh machine installs chromium (apt)

DASH = "\u2013"
DOCS_ROWS_SCREENSHOT = ROOT / "docs" / "explorer-rows.png"
Page = Any  # playwright.sync_api.Page (imported lazily)


@pytest.fixture(scope="module")
def shop(runtime: Runtime, live_server: LiveServer) -> Iterator[Shop]:
    made = make_shop(runtime)
    yield made
    drop_shop(runtime, made)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium_browser() as launched:
        yield launched


def open_tab(browser: Any, live_server: LiveServer, shop: Shop, problems: list[str], **options: Any) -> Page:
    context = browser.new_context(**options)
    tab = context.new_page()
    # A refused filter answers 422, which Chromium logs as "Failed to load resource": expected. A CSP violation
    # or a script error is not.
    watch_errors(tab, problems)
    tab.set_default_timeout(15_000)
    sign_in(tab, live_server.base_url, shop.token, shop.user)
    return tab


@pytest.fixture(scope="module")
def page(browser: Any, live_server: LiveServer, shop: Shop) -> Iterator[Page]:
    problems: list[str] = []
    tab = open_tab(browser, live_server, shop, problems, viewport={"width": 1280, "height": 800})
    yield tab
    tab.context.close()
    assert not problems, f"the browser reported errors (CSP violations, script errors): {problems}"


def look(page: Page, runtime: Runtime, shop: Shop, name: str | None = None) -> None:
    check_html(runtime, shop, f"browser {page.url}", page.content())
    if name:
        save_screenshot(page.screenshot(), name)


def publish_rows_screenshot(path: Path) -> None:
    """docs/explorer-rows.png from one screenshot, when missing or asked for (as browser_support does for
    docs/explorer.png: ``AGENTPG_UPDATE_DOCS_SCREENSHOT=1``), so ordinary runs leave the committed file alone."""
    assert path.stat().st_size < DOCS_SCREENSHOT_MAX_BYTES, f"{path} is {path.stat().st_size} bytes"
    if not DOCS_ROWS_SCREENSHOT.exists() or os.environ.get("AGENTPG_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(path, DOCS_ROWS_SCREENSHOT)


def ids(page: Page) -> list[int]:
    return [int(x) for x in page.locator("#rows tbody tr td:first-child").all_inner_texts()]


def table_url(live_server: LiveServer, shop: Shop, table: str) -> str:
    return f"{live_server.base_url}/explorer/u/{shop.user}/global/table?name={table}"


def test_filter_combine_go_back_and_search(page: Page, live_server: LiveServer, runtime: Runtime,
                                          shop: Shop) -> None:
    page.goto(table_url(live_server, shop, "customers"))
    assert page.locator("#row-count").inner_text().startswith(f"Rows 1{DASH}100 of 137")
    page.select_option("#fc-0", "tier")
    page.select_option("#fo-0", "eq")
    page.fill("#fv-0", "gold")
    page.click("#apply-filters")
    page.wait_for_url("**fc=tier&fo=eq&fv=gold**")
    assert page.locator("#row-count").inner_text().startswith(f"Rows 1{DASH}45 of 45 matching")
    assert all(i % 3 == 0 for i in ids(page))
    page.select_option("#fc-1", "balance")  # the form always offers one more, empty row
    page.select_option("#fo-1", "gt")
    page.fill("#fv-1", "100")
    page.press("#fv-1", "Enter")
    page.wait_for_url("**fc=balance&fo=gt&fv=100**")
    assert ids(page) == [g for g in range(81, 138) if g % 3 == 0]
    look(page, runtime, shop, "30-rows-filtered")
    page.go_back()  # the filters live in the URL: back is the previous view
    page.wait_for_url("**fv=gold")
    assert page.locator("#row-count").inner_text().startswith(f"Rows 1{DASH}45 of 45")
    assert page.locator("#fc-1").input_value() == ""  # the form shows this view's filters, not the later ones
    page.fill("#fv-0", "plenty")
    page.select_option("#fc-0", "balance")
    page.click("#apply-filters")
    alert = page.get_by_role("alert")
    assert "'plenty' is not a valid numeric(12,2) value for column balance" in alert.inner_text()
    assert page.locator("#fv-0").input_value() == "plenty"  # kept, to be corrected
    page.get_by_role("link", name="Clear filters and search").click()
    page.fill("#q", "c13")
    page.press("#q", "Enter")
    page.wait_for_url("**q=c13**")
    assert ids(page) == [13, 131, 132, 133, 134, 135, 136, 137]
    look(page, runtime, shop)


def test_follow_a_foreign_key_and_back(page: Page, live_server: LiveServer, runtime: Runtime, shop: Shop) -> None:
    page.goto(table_url(live_server, shop, "orders"))
    first = page.locator("#rows tbody tr").nth(0).locator("a.fk")
    assert first.inner_text() == "1"
    first.click()  # to the referenced row
    page.wait_for_url("**name=customers&fc=id&fo=eq&fv=1")
    assert ids(page) == [1]
    look(page, runtime, shop, "31-rows-foreign-key")
    page.get_by_role("link", name="orders (3)").click()  # and back through "referenced by"
    page.wait_for_url("**name=orders&fc=customer_id&fo=eq&fv=1")
    assert ids(page) == [10, 11, 12]
    assert page.locator("#rows tbody a.ref").all_inner_texts() == ["line_items (2)", "line_items (1)"]
    # the picture for the docs: two filters, links both ways, a long and a two-line value folded
    page.goto(table_url(live_server, shop, "customers") + "&fc=tier&fo=ne&fv=gold&fc=balance&fo=lt&fv=30")
    assert page.locator("#row-count").inner_text().startswith(f"Rows 1{DASH}16 of 16 matching")
    assert page.locator("#rows tbody a.ref").all_inner_texts() == ["orders (3)", "orders (1)"]
    look(page, runtime, shop)
    publish_rows_screenshot(save_screenshot(page.screenshot(), "34-rows-overview"))


def test_truncated_cell_opens_with_the_keyboard_and_the_header_sticks(page: Page, live_server: LiveServer,
                                                                      runtime: Runtime, shop: Shop) -> None:
    page.goto(table_url(live_server, shop, "customers"))
    note = page.locator("#rows tbody tr").nth(0).locator("details.v-text")
    summary = note.locator("summary")
    assert "THE END" not in summary.inner_text() and not note.locator(".whole").is_visible()
    summary.focus()
    page.keyboard.press("Enter")
    assert note.locator(".whole").is_visible() and "THE END" in note.locator(".whole").inner_text()
    look(page, runtime, shop, "32-rows-cell-open")
    page.keyboard.press("Enter")
    assert not note.locator(".whole").is_visible()
    # 100 rows: the page stays about one screen tall, the grid scrolls in its own box, its header stays put.
    assert page.evaluate("document.documentElement.scrollHeight") < 1600
    region = page.locator(".grid-scroll")
    region.evaluate("el => { el.scrollTop = 1200; }")
    head = page.locator("#rows thead th").nth(0).bounding_box()
    box = region.bounding_box()
    assert head is not None and box is not None and abs(head["y"] - box["y"]) < 3
    assert page.locator("#rows tbody tr").nth(0).bounding_box()["y"] < box["y"]  # type: ignore[index]


def test_phone_in_dark_mode(browser: Any, live_server: LiveServer, runtime: Runtime, shop: Shop) -> None:
    problems: list[str] = []
    tab = open_tab(browser, live_server, shop, problems, viewport={"width": 390, "height": 844},
                   color_scheme="dark", is_mobile=True, has_touch=True)
    try:
        tab.goto(table_url(live_server, shop, "orders") + "&fc=total&fo=ge&fv=5")
        assert tab.locator("#row-count").inner_text().startswith(f"Rows 1{DASH}3 of 3 matching")
        assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")  # no sideways page
        check_html(runtime, shop, f"browser {tab.url}", tab.content())
        save_screenshot(tab.screenshot(full_page=True), "33-rows-phone-dark")
    finally:
        tab.context.close()
    assert not problems, problems
