"""One database's pages: its tables, a page of rows, an export, the read-only SQL box.

Each route is registered twice, for the user's global database (``/explorer/u/{user}/global…``) and for a
workspace's agent database (``/explorer/u/{user}/agents/{workspace}…``); the handler reads the workspace
from the path (absent for the global database). Table names travel as a query parameter (``?name=``) so any
name, slashes included, survives the URL.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from agentpg.errors import AgentpgError, InvalidInput
from agentpg.problems import ResponseAborted
from agentpg.service import EXPORT_MEDIA, MAX_FILTERS, MAX_OFFSET, MAX_SEARCH_CHARS, WorkspaceInfo, attachment
from agentpg.service.sql_box import MAX_SQL_CHARS, SqlResult
from agentpg.web import data, rows_view
from agentpg.web.render import render
from agentpg.web.routing import Explorer, PageRoute, Session, WorkspaceInPath, for_both_databases
from agentpg.web.security import check_same_origin, field, read_form

log = logging.getLogger(__name__)

router = APIRouter(route_class=PageRoute, include_in_schema=False)

PAGE_SIZES: Final = rows_view.PAGE_SIZES

TableName = Annotated[str, Query(alias="name", min_length=1, max_length=255)]


def _both(suffix: str, method: str = "GET") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return for_both_databases(router, suffix, method)


async def _where(s: Explorer, user_id: str, workspace_id: str | None) -> WorkspaceInfo | None:
    """The workspace (scoped like the API), or None for the global database; checks the user exists."""
    if workspace_id is None:
        await run_in_threadpool(data.get_user, s.ctx, s.principal, user_id)
        return None
    return await run_in_threadpool(data.get_workspace, s.ctx, s.principal, user_id, workspace_id)


def _no_nul(name: str) -> str:
    if "\x00" in name:
        raise InvalidInput("a table name cannot contain NUL bytes")
    return name


@_both("")
async def tables(request: Request, user_id: str, s: Session, workspace_id: WorkspaceInPath) -> Response:
    """Tables panel: every table and view with its columns, types, keys and row count (exact when cheap)."""
    ws = await _where(s, user_id, workspace_id)
    listed, constraints = await data.tables(s.ctx, s.principal, user_id, workspace_id)
    counts = await rows_view.table_counts(s.ctx, s.principal, user_id, workspace_id) if listed.tables else {}
    return render(request, "tables.html", title="Tables", user_id=user_id, workspace=ws, workspace_id=workspace_id,
                  active="databases", tables=listed.tables, constraints=constraints, tab="tables", counts=counts)


@_both("/table")
async def table_rows(request: Request, user_id: str, s: Session, workspace_id: WorkspaceInPath, name: TableName,
                     offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
                     limit: Annotated[int, Query(ge=1, le=250)] = 100,
                     sort: Annotated[str | None, Query(max_length=255)] = None,
                     direction: Annotated[Literal["asc", "desc"], Query(alias="dir")] = "asc",
                     q: Annotated[str | None, Query(max_length=MAX_SEARCH_CHARS)] = None,
                     fc: Annotated[list[str] | None, Query(max_length=MAX_FILTERS + 1)] = None,
                     fo: Annotated[list[str] | None, Query(max_length=MAX_FILTERS + 1)] = None,
                     fv: Annotated[list[str] | None, Query(max_length=MAX_FILTERS + 1)] = None) -> Response:
    """The table browser: a page of ``limit`` rows from ``offset``, sorted by one column (default: primary
    key), narrowed by filters (``fc``/``fo``/``fv`` triples, ANDed) and a search ``q`` (web/rows_view.py)."""
    ws = await _where(s, user_id, workspace_id)
    if limit not in PAGE_SIZES:
        raise InvalidInput(f"limit must be one of {', '.join(map(str, PAGE_SIZES))}")
    filters = rows_view.parse_filters(fc or [], fo or [], fv or [])
    query = rows_view.GridQuery(_no_nul(name), limit=limit, offset=offset, sort=_no_nul(sort) if sort else None,
                                direction=direction, filters=filters, search=q.strip() if q and q.strip() else None)
    # The form always sends one empty "add a filter" row (and maybe an empty search): send the browser on to
    # the tidy URL, so the address to share (and the history) holds only what applies.
    untidy = any(not c for c in fc or []) or (q is not None and not q.strip())
    return await rows_view.rows_page(request, s, user_id, ws, workspace_id, query, tidy=not untidy)


@_both("/export")
async def export(request: Request, user_id: str, s: Session, workspace_id: WorkspaceInPath, name: TableName,
                 format: Annotated[Literal["csv", "json"], Query()] = "csv") -> Response:
    """The whole table as CSV or JSON, as the REST API's export route answers it, with the session's principal."""
    ref = await run_in_threadpool(data.database_ref, s.ctx, s.principal, user_id, workspace_id)
    reader = s.ctx.service.reader
    info = await reader.check_table(ref, _no_nul(name))  # 404 now, before the 200 is sent

    async def stream() -> AsyncIterator[bytes]:
        try:
            async for chunk in reader.export_bytes(ref, info.name, format):
                yield chunk
        except AgentpgError as exc:  # the 200 is already sent: all that is left is to cut the connection
            log.warning("export of a table stopped: %s", exc.message)
            raise ResponseAborted from None

    headers = {"Content-Disposition": attachment(info.name, format), "Cache-Control": "no-store"}
    return StreamingResponse(stream(), media_type=EXPORT_MEDIA[format], headers=headers)


def _sql_page(request: Request, user_id: str, ws: WorkspaceInfo | None, workspace_id: str | None, statement: str,
              *, result: SqlResult | None = None, error: str | None = None, status: int = 200) -> Response:
    return render(request, "sql.html", title="SQL", user_id=user_id, workspace=ws, workspace_id=workspace_id,
                  active="databases", statement=statement, result=result, error=error, status=status, tab="sql",
                  max_chars=MAX_SQL_CHARS)


@_both("/sql")
async def sql_box(request: Request, user_id: str, s: Session, workspace_id: WorkspaceInPath,
                  table: Annotated[str | None, Query(max_length=255)] = None) -> Response:
    """The read-only SQL box (the statement is POSTed, never put in a URL where logs would keep it)."""
    ws = await _where(s, user_id, workspace_id)
    statement = ""
    if table and "\x00" not in table:
        quoted = '"' + table.replace('"', '""') + '"'
        statement = f"SELECT *\nFROM public.{quoted}\nLIMIT 100"
    return _sql_page(request, user_id, ws, workspace_id, statement)


@_both("/sql", method="POST")
async def run_sql_box(request: Request, user_id: str, s: Session, workspace_id: WorkspaceInPath) -> Response:
    check_same_origin(request, s.ctx.settings.public_url)
    ws = await _where(s, user_id, workspace_id)
    statement = field(await read_form(request), "sql")
    ref = await run_in_threadpool(data.database_ref, s.ctx, s.principal, user_id, workspace_id)
    try:
        result = await s.ctx.service.reader.run_sql(ref, statement)
    except AgentpgError as exc:
        return _sql_page(request, user_id, ws, workspace_id, statement, error=exc.message, status=exc.status)
    return _sql_page(request, user_id, ws, workspace_id, statement, result=result)
