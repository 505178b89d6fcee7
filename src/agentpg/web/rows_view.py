"""The table browser (the rows page): filters and a search read from the query string, the grid with its
foreign-key links both ways, and every link that keeps them (paging, sorting, removing one filter).

The page's state lives in the URL only (``?name=t&q=…&fc=col&fo=op&fv=value…&sort=&dir=&limit=&offset=``:
one ``fc``/``fo``/``fv`` triple per filter, in order), so a view can be shared and the back button works.
The read is :func:`agentpg.access.grid.read_grid` on the database the session may see, scoped exactly as
the SQL box and the REST routes scope it (:func:`agentpg.web.data.database_ref`: another user's database
is "not found"), with the app's :class:`~agentpg.access.browse.ReadLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Final
from urllib.parse import urlencode

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from agentpg.errors import InvalidInput
from agentpg.service import (
    MAX_FILTERS,
    NO_VALUE,
    OPERATORS,
    REF_COUNT_CAP,
    BadFilter,
    ColumnInfo,
    Filter,
    ForeignKey,
    GridPage,
    Principal,
    RowCount,
    WorkspaceInfo,
    linkable,
    row_key,
)
from agentpg.web import data
from agentpg.web.context import WebContext
from agentpg.web.render import Cell, cell, db_url, render
from agentpg.web.routing import Explorer

GRID_FOLD_CHARS: Final = 40
"""Longer values (or any with a line break) get a "show all" ``<details>``: the grid shows one line each."""
DEFAULT_LIMIT: Final = 100
PAGE_SIZES: Final = (25, 50, 100, 250)
REF_CAP_TEXT: Final = f"{REF_COUNT_CAP:,}+"


@dataclass(frozen=True)
class GridQuery:
    """What the URL asks for. ``filters`` keep the person's input as typed (shown again on an error)."""

    table: str
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    sort: str | None = None
    direction: str = "asc"
    filters: tuple[Filter, ...] = ()
    search: str | None = None

    def pairs(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = [("name", self.table)]
        if self.search:
            out.append(("q", self.search))
        for f in self.filters:
            out += [("fc", f.column), ("fo", f.op), ("fv", f.value)]
        if self.sort:
            out += [("sort", self.sort), ("dir", self.direction)]
        if self.limit != DEFAULT_LIMIT:
            out.append(("limit", str(self.limit)))
        if self.offset:
            out.append(("offset", str(self.offset)))
        return out

    def url(self, path: str, **change: Any) -> str:
        return f"{path}?{urlencode((replace(self, **change) if change else self).pairs())}"


def parse_filters(columns: list[str], ops: list[str], values: list[str]) -> tuple[Filter, ...]:
    """Zip the ``fc``/``fo``/``fv`` lists; a triple without a column is the form's empty "add" row (skipped).
    A missing ``fv`` counts as empty (``?fc=email&fo=null`` is fine). Raises ``InvalidInput`` when a column
    has no operator, or there are more values than columns."""
    if len(ops) != len(columns) or len(values) > len(columns):
        raise InvalidInput("each filter is a column (fc), an operator (fo) and a value (fv), in that order")
    padded = values + [""] * (len(columns) - len(values))
    return tuple(Filter(c, o, v) for c, o, v in zip(columns, ops, padded, strict=True) if c)


def grid_cell(value: Any, type_name: str) -> Cell:
    """:func:`render.cell`, folded sooner: the grid keeps each value on one line, the rest one click away."""
    c = cell(value, type_name)
    if c.full is None and c.kind in ("text", "json", "bytes") and (len(c.text) > GRID_FOLD_CHARS or "\n" in c.text):
        lines = c.text.count("\n") + 1
        note = c.note or (f"{lines:,} lines" if lines > 1 else f"{len(c.text):,} characters")
        return Cell(c.kind, c.text, full=c.text, note=note)
    return c


@dataclass(frozen=True)
class Link:
    text: str
    url: str | None
    title: str = ""


@dataclass
class GridCell:
    cell: Cell
    link: Link | None = None


@dataclass
class RowsView:
    """Everything rows.html shows, computed here so the template only chooses markup."""

    query: GridQuery
    columns: list[ColumnInfo]
    page: GridPage | None = None
    cells: list[list[GridCell]] = field(default_factory=list)
    referenced: list[list[Link]] = field(default_factory=list)
    error: str | None = None
    error_index: int | None = None
    remove_urls: list[str] = field(default_factory=list)
    clear_url: str = ""
    sort_urls: dict[str, str] = field(default_factory=dict)
    first_url: str | None = None
    prev_url: str | None = None
    next_url: str | None = None
    last_url: str | None = None
    shown_to: int = 0


def _key_filters(columns: tuple[str, ...], key: tuple[str, ...]) -> tuple[Filter, ...]:
    return tuple(Filter(c, "eq", v) for c, v in zip(columns, key, strict=True))


def _describe(filters: tuple[Filter, ...]) -> str:
    return " and ".join(f"{f.column} = {f.value}" for f in filters)


def _build(view: RowsView, here: str) -> None:
    page, q = view.page, view.query
    assert page is not None
    types = {c.name: c.type for c in page.columns}
    by_column: dict[str, ForeignKey] = {}
    for fk in page.outgoing:
        if all(linkable(types.get(c, "")) for c in fk.columns):
            for c in fk.columns:
                by_column.setdefault(c, fk)
    for row in page.rows:
        line: list[GridCell] = []
        for col in page.columns:
            gc = GridCell(grid_cell(row[col.name], col.type))
            out = by_column.get(col.name)
            key = row_key(row, out.columns) if out else None
            if out is not None and key is not None:
                target = GridQuery(out.ref_table, filters=_key_filters(out.ref_columns, key))
                gc.link = Link(gc.cell.text, target.url(here),
                               f"open the {out.ref_table} row where {_describe(target.filters)}")
            line.append(gc)
        view.cells.append(line)
    for refs in page.referrers:
        links: list[Link] = []
        for r in refs:
            if r.key is None:
                continue
            counted = REF_CAP_TEXT if r.capped else f"{r.count:,}" if r.count is not None else None
            shown = r.fk.table if counted is None else f"{r.fk.table} ({counted})"
            filters = _key_filters(r.fk.columns, r.key)
            url = None if r.count == 0 else GridQuery(r.fk.table, filters=filters).url(here)
            links.append(Link(shown, url, f"rows of {r.fk.table} where {_describe(filters)}"))
        view.referenced.append(links)
    view.shown_to = q.offset + len(page.rows)
    exact = page.count.value if page.count.exact else None
    for col in page.columns:
        next_dir = "desc" if q.sort == col.name and q.direction == "asc" else "asc"
        view.sort_urls[col.name] = q.url(here, sort=col.name, direction=next_dir, offset=0)
    if q.offset > 0:
        view.first_url = q.url(here, offset=0)
        view.prev_url = q.url(here, offset=max(q.offset - q.limit, 0))
    has_next = (exact is not None and view.shown_to < exact) or (exact is None and len(page.rows) == q.limit) \
        or page.truncated
    if has_next:
        view.next_url = q.url(here, offset=view.shown_to)
        if exact is not None and exact > 0:
            last = (exact - 1) // q.limit * q.limit
            if last > q.offset:
                view.last_url = q.url(here, offset=last)


async def rows_page(request: Request, s: Explorer, user_id: str, ws: WorkspaceInfo | None,
                    workspace_id: str | None, q: GridQuery, *, tidy: bool = True) -> Response:
    """Render the rows page for ``q``; a filter or search that cannot apply is the same page, answered 422
    with the message next to the form (the person's input kept). Other errors propagate (error pages).
    ``tidy=False``: the URL held empty form rows; answer 303 to the same view's own URL instead."""
    base = db_url(user_id, workspace_id)
    here = base + "/table"
    if not tidy:
        return RedirectResponse(q.url(here), status_code=303)
    ref = await run_in_threadpool(data.database_ref, s.ctx, s.principal, user_id, workspace_id)
    order = [(q.sort, q.direction == "desc")] if q.sort else None
    reader = s.ctx.service.reader
    try:
        page = await reader.grid(ref, q.table, limit=q.limit, offset=q.offset, order_by=order, filters=q.filters,
                                 search=q.search)
        view = RowsView(query=replace(q, table=page.table), columns=page.columns, page=page)
    except BadFilter as exc:
        info = await reader.check_table(ref, q.table)
        view = RowsView(query=q, columns=info.columns, error=exc.message, error_index=exc.index)
    q = view.query
    view.remove_urls = [q.url(here, filters=q.filters[:i] + q.filters[i + 1:], offset=0)
                        for i in range(len(q.filters))]
    view.clear_url = GridQuery(q.table, limit=q.limit, sort=q.sort, direction=q.direction).url(here)
    if view.page is not None:
        _build(view, here)
    return render(request, "rows.html", status=422 if view.error else 200, title=q.table, user_id=user_id,
                  workspace=ws, workspace_id=workspace_id, active="databases", tab="tables", view=view, q=q,
                  base=base, here=here, operators=OPERATORS, no_value=NO_VALUE,
                  page_sizes=PAGE_SIZES, max_filters=MAX_FILTERS)


async def table_counts(ctx: WebContext, principal: Principal, user_id: str,
                       workspace_id: str | None) -> dict[str, RowCount]:
    """Row counts for the tables panel (exact when cheap, else estimates), after the same scoping."""
    ref = await run_in_threadpool(data.database_ref, ctx, principal, user_id, workspace_id)
    return await ctx.service.reader.table_counts(ref)
