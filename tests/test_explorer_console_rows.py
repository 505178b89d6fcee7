"""The explorer's table browser over HTTP (ASGI client, in process): filters alone and combined, bad filter
input as a clear 422 on the page, the search box, exact and "about" counts, foreign keys as links both
ways, one-line cells with the whole value on demand. The Chromium flows are in
tests/test_explorer_console_browser_rows.py."""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from rows_support import Shop, check_html, drop_shop, make_shop

from agentpg.access.browse import ReadLimits
from agentpg.app.runtime import Runtime
from agentpg.web.security import COOKIE, CSP, seal_session

DASH = "\u2013"


@pytest.fixture(scope="module")
def shop(runtime: Runtime) -> Iterator[Shop]:
    made = make_shop(runtime)
    yield made
    drop_shop(runtime, made)


@pytest.fixture()
def web(api_client: Any, runtime: Runtime, shop: Shop) -> Iterator[Any]:
    api_client.cookies.clear()
    api_client.cookies.set(COOKIE, seal_session(runtime.service, shop.token))
    yield api_client
    api_client.cookies.clear()


def rows(client: Any, runtime: Runtime, shop: Shop, table: str, *pairs: tuple[str, str], status: int = 200,
         user: str | None = None) -> str:
    url = f"/explorer/u/{user or shop.user}/global/table?" + urlencode([("name", table), *pairs])
    response = client.get(url, follow_redirects=False)
    assert response.status_code == status, (url, response.status_code, response.text[-2000:])
    assert response.headers["content-security-policy"] == CSP
    text: str = response.text
    check_html(runtime, shop, url, text)
    assert not re.search(r"<script(?![^>]*\bsrc=)", text) and " style=" not in text  # still no inline code
    return text


def f(column: str, op: str, value: str = "") -> list[tuple[str, str]]:
    return [("fc", column), ("fo", op), ("fv", value)]


def first_column(page: str) -> list[str]:
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.sub(r"<[^>]+>", "", m).strip() for m in re.findall(r"<tr>\s*<td[^>]*>(.*?)</td>", body, re.S)]


def count_line(page: str) -> str:
    found = re.search(r'id="row-count"[^>]*>(.*?)</p>', page, re.S)
    assert found, "no row count on the page"
    return " ".join(re.sub(r"<[^>]+>", "", found.group(1)).split())


def test_filters_alone_and_combined(web: Any, runtime: Runtime, shop: Shop) -> None:
    gold = rows(web, runtime, shop, "customers", *f("tier", "eq", "gold"), ("limit", "25"))
    # g % 3 == 0 is gold: 45 of 137; a non-last page, so the count is a real count(*) with the filter
    assert count_line(gold).startswith(f"Rows 1{DASH}25 of 45 matching")
    assert all(int(i) % 3 == 0 for i in first_column(gold))
    both = rows(web, runtime, shop, "customers", *f("tier", "eq", "gold"), *f("balance", "gt", "100"),
                *f("email", "notnull"))
    expected = [g for g in range(1, 138) if g % 3 == 0 and g * 1.25 > 100 and g % 10]
    assert [int(i) for i in first_column(both)] == expected
    assert count_line(both).startswith(f"Rows 1{DASH}{len(expected)} of {len(expected)} matching")
    assert 'value="gold"' in both and 'aria-label="Remove filter 1 (tier = gold)"' in both  # the form keeps them
    ops = {"ne": ("tier", "gold", lambda g: g % 3 != 0), "lt": ("id", "5", lambda g: g < 5),
           "le": ("id", "5", lambda g: g <= 5), "ge": ("signed_up", "2024-05-01", lambda g: g >= 121),
           "in": ("id", "3, 7,11", lambda g: g in (3, 7, 11)), "null": ("email", "", lambda g: g % 10 == 0),
           "contains": ("name", "02", lambda g: "02" in f"{g:03d}")}
    for op, (column, value, keep) in ops.items():
        got = rows(web, runtime, shop, "customers", *f(column, op, value), ("limit", "250"))
        assert [int(i) for i in first_column(got)] == [g for g in range(1, 138) if keep(g)], op
    # "contains" is literal: % and _ match themselves only
    assert first_column(rows(web, runtime, shop, "customers", *f("notes", "contains", "0% sure_"))) == ["3"]
    assert "No row matches the filters" in rows(web, runtime, shop, "customers", *f("id", "gt", "1000"))
    # the form's empty "add a filter" row (no column) and an empty search send the browser to the tidy URL
    tidy = web.get(f"/explorer/u/{shop.user}/global/table?" + urlencode(
        [("name", "customers"), ("q", " "), *f("tier", "eq", "gold"), *f("", "eq", "")]), follow_redirects=False)
    assert tidy.status_code == 303
    assert query_of(tidy.headers["location"]) == [("name", "customers"), *f("tier", "eq", "gold")]
    # a missing fv counts as empty
    assert "14" in first_column(rows(web, runtime, shop, "orders", ("fc", "customer_id"), ("fo", "null")))


def test_bad_filter_input_is_a_clear_422_on_the_page(web: Any, runtime: Runtime, shop: Shop) -> None:
    cases = [
        (f("balance", "gt", "lots"), "filter 1: 'lots' is not a valid numeric(12,2) value for column balance"),
        (f("id", "eq", "1") + f("signed_up", "lt", "2024-13-45"),
         "filter 2: '2024-13-45' is not a valid date value for column signed_up"),
        (f("id", "in", "1, two"), "filter 1: '1, two' is not a valid integer value for column id"),
        (f("nope", "eq", "1"), "filter 1: table 'customers' has no column 'nope'"),
        (f("id", "like", "1"), "filter 1: unknown operator 'like'"),
        (f("id", "eq", ""), "filter 1: id = needs a value"),
        (f("id", "in", ",".join(map(str, range(101)))), "'in list' takes 1 to 100"),
        ([("fc", "id"), ("fv", "1")], "each filter is a column (fc), an operator (fo) and a value (fv)"),
    ]
    for pairs, message in cases:
        page = rows(web, runtime, shop, "customers", *pairs, status=422)
        assert message in html_lib.unescape(page), (pairs, html_lib.unescape(page)[-1500:])
    page = rows(web, runtime, shop, "customers", *f("balance", "gt", "lots"), status=422)
    assert 'role="alert"' in page and 'aria-invalid="true"' in page and 'value="lots"' in page
    json_lt = rows(web, runtime, shop, "events", *f("payload", "lt", "{}"), status=422)
    assert "column payload (json) has no '<' comparison" in html_lib.unescape(json_lt)
    # a json column can still be searched as text with "contains"
    assert first_column(rows(web, runtime, shop, "events", *f("payload", "contains", '"a"'))) == ["1"]
    # names are matched against the catalog and values are bound: SQL in either is just a wrong name or value
    assert "has no column 'id; DROP TABLE orders'" in html_lib.unescape(
        rows(web, runtime, shop, "customers", *f("id; DROP TABLE orders", "eq", "1"), status=422))
    assert "is not a valid integer value" in rows(web, runtime, shop, "customers",
                                                  *f("id", "eq", "1; DROP TABLE orders"), status=422)
    assert "No row matches" in rows(web, runtime, shop, "customers", *f("name", "eq", "x' OR '1'='1"))
    assert count_line(rows(web, runtime, shop, "orders")).endswith("of 5")  # still there, untouched
    # the rival's table and an unknown table stay "not found", filters or not
    rows(web, runtime, shop, "customers", *f("id", "eq", "1"), status=404, user=shop.other_user)
    assert "did you mean" in rows(web, runtime, shop, "customer", *f("id", "eq", "1"), status=404)


def test_search_looks_in_the_text_columns(web: Any, runtime: Runtime, shop: Shop) -> None:
    page = rows(web, runtime, shop, "customers", ("q", "C13"))  # case-insensitive; c130's email is NULL
    assert [int(i) for i in first_column(page)] == [13, 131, 132, 133, 134, 135, 136, 137]
    assert first_column(rows(web, runtime, shop, "customers", ("q", "C13@EXAMPLE"))) == ["13"]
    assert "in name, email, tier, notes" in page and "matching" in count_line(page)
    combined = rows(web, runtime, shop, "customers", ("q", "silver"), *f("id", "lt", "10"))
    assert [int(i) for i in first_column(combined)] == [1, 4, 7]
    assert first_column(rows(web, runtime, shop, "customers", ("q", "100%"))) == ["3"]
    items = rows(web, runtime, shop, "line_items", ("q", "a-1"), *f("order_id", "eq", "10"))
    assert first_column(items) == ["10"] and "in sku" in items
    refused = rows(web, runtime, shop, "orders", ("q", "x"), status=422)
    assert "has no text columns to search" in refused


def test_counts_exact_when_cheap_and_about_otherwise(web: Any, runtime: Runtime, shop: Shop) -> None:
    # Never analysed (reltuples = -1): still an exact count, on the grid and on the tables panel.
    assert count_line(rows(web, runtime, shop, "customers", ("limit", "25"))).startswith(f"Rows 1{DASH}25 of 137")
    tables = web.get(f"/explorer/u/{shop.user}/global").text
    check_html(runtime, shop, "tables panel", tables)
    assert "not analysed" not in tables and "137 rows" in tables and "5 rows" in tables
    access = web.app.state.service.tenant()
    limits = access.read_limits
    access.read_limits = ReadLimits(count_max_bytes=0, count_timeout_ms=0)
    try:
        about = count_line(rows(web, runtime, shop, "customers", ("limit", "25")))
        filtered = count_line(rows(web, runtime, shop, "customers", *f("tier", "eq", "gold"), ("limit", "25")))
        tables = web.get(f"/explorer/u/{shop.user}/global").text
    finally:
        access.read_limits = limits
    n = int(re.search(r"of about ([\d,]+)", about).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert 50 <= n <= 1000 and "planner's estimate" in about  # the planner's guess for an unanalysed table
    assert re.search(r"of about [\d,]+ matching", filtered)
    assert "about" in tables and "not analysed" not in tables


def links(page: str, cls: str) -> list[tuple[str, str]]:
    """(text, href) of the links with this class, hrefs unescaped."""
    found = re.findall(rf'<a class="{cls}" href="([^"]+)"[^>]*>(.*?)</a>', page, re.S)
    found += re.findall(rf'<a href="([^"]+)"[^>]*class="{cls}"[^>]*>(.*?)</a>', page, re.S)
    return [(re.sub(r"<[^>]+>", "", t).strip(), html_lib.unescape(h)) for h, t in found]


def query_of(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def test_foreign_keys_link_both_ways(web: Any, runtime: Runtime, shop: Shop) -> None:
    orders = rows(web, runtime, shop, "orders")
    fks = links(orders, "fk")
    assert [t for t, _ in fks] == ["1", "1", "1", "2"]  # the NULL customer_id has no link
    assert query_of(fks[0][1]) == [("name", "customers"), ("fc", "id"), ("fo", "eq"), ("fv", "1")]
    target = web.get(fks[0][1])
    assert target.status_code == 200 and first_column(target.text) == ["1"]
    assert count_line(target.text).startswith(f"Rows 1{DASH}1 of 1 matching")
    refs = links(target.text, "ref")
    assert refs[0][0] == "orders (3)"
    assert query_of(refs[0][1]) == [("name", "orders"), ("fc", "customer_id"), ("fo", "eq"), ("fv", "1")]
    back = web.get(refs[0][1]).text
    assert first_column(back) == ["10", "11", "12"]
    # every customer row says how many orders point at it; 0 is shown, not linked
    customers = rows(web, runtime, shop, "customers", ("limit", "25"))
    assert [t for t, _ in links(customers, "ref")] == ["orders (3)", "orders (1)"]
    assert customers.count('<span class="ref none"') == 23 and "orders (0)" in customers
    # two levels: an order is referenced by its line items, and a line item links to its order
    assert [t for t, _ in links(orders, "ref")] == ["line_items (2)", "line_items (1)"]
    items = rows(web, runtime, shop, "line_items")
    assert query_of(links(items, "fk")[0][1]) == [("name", "orders"), ("fc", "id"), ("fo", "eq"), ("fv", "10")]
    # a two-column key: both columns link to the one line item, and it counts its two shipments
    assert [t for t, _ in links(items, "ref")] == ["shipments (2)"]
    assert query_of(links(items, "ref")[0][1]) == [("name", "shipments"), *f("order_id", "eq", "10"),
                                                   *f("line", "eq", "2")]
    shipments = rows(web, runtime, shop, "shipments")
    to_item = [("name", "line_items"), *f("order_id", "eq", "10"), *f("line", "eq", "2")]
    assert [query_of(u) for _, u in links(shipments, "fk")] == [to_item] * 4  # NULL order_id: no link
    assert first_column(web.get(links(shipments, "fk")[0][1]).text) == ["10"]


def test_long_cells_are_one_line_with_the_whole_value_on_demand(web: Any, runtime: Runtime, shop: Shop) -> None:
    page = rows(web, runtime, shop, "customers", ("limit", "25"))
    assert 'class="scroll grid-scroll"' in page and 'tabindex="0" role="region"' in page
    cells = re.findall(r"<td[^>]*>(.*?)</td>", page, re.S)
    long_note = next(c for c in cells if "a very long note" in c)
    assert "<details" in long_note and "show all" in long_note and "THE END" in long_note
    two_lines = next(c for c in cells if "first line" in c)
    assert "<details" in two_lines and "(2 lines)" in two_lines and "first line\nsecond line" in two_lines
    short = next(c for c in cells if "note 5<" in c)
    assert "<details" not in short
    assert '<th scope="col"' in page and "<caption" in page  # headers with scope, a caption


def test_urls_keep_filters_through_paging_and_sorting(web: Any, runtime: Runtime, shop: Shop) -> None:
    page = rows(web, runtime, shop, "customers", ("q", "example"), *f("tier", "ne", "gold"), ("limit", "25"))
    nxt = html_lib.unescape(re.search(r'href="([^"]+)" rel="next"', page).group(1))  # type: ignore[union-attr]
    assert query_of(nxt) == [("name", "customers"), ("q", "example"), ("fc", "tier"), ("fo", "ne"), ("fv", "gold"),
                             ("limit", "25"), ("offset", "25")]
    sort = html_lib.unescape(re.search(r'href="([^"]+)" data-column="balance"', page).group(1))  # type: ignore[union-attr]
    assert ("sort", "balance") in query_of(sort) and ("fv", "gold") in query_of(sort)
    last = re.search(r'href="([^"]+)" rel="last"', page)
    assert last and "offset=75" in html_lib.unescape(last.group(1))  # 83 matching rows: pages of 25
    remove = html_lib.unescape(re.search(r'<a href="([^"]+)" class="remove"', page).group(1))  # type: ignore[union-attr]
    assert query_of(remove) == [("name", "customers"), ("q", "example"), ("limit", "25")]


def test_plain_paging_and_sorting_keep_their_urls(web: Any, runtime: Runtime, shop: Shop) -> None:
    desc = rows(web, runtime, shop, "customers", ("sort", "balance"), ("dir", "desc"), ("limit", "25"))
    assert first_column(desc)[:2] == ["137", "136"] and 'aria-sort="descending"' in desc
    last = rows(web, runtime, shop, "customers", ("limit", "100"), ("offset", "100"))
    assert count_line(last).startswith(f"Rows 101{DASH}137 of 137") and 'id="next-page"' not in last
    assert 'rel="prev"' in last and 'rel="first"' in last
    assert "limit must be" in rows(web, runtime, shop, "customers", ("limit", "7"), status=422)
    assert "has no column" in rows(web, runtime, shop, "customers", ("sort", "nope"), status=422)
    # an empty value is a value for a text column (= ''), not for a number
    assert "No row matches the filters" in rows(web, runtime, shop, "customers", *f("tier", "eq", ""))
