"""The explorer's routes: a database's public info, its tables, a page of rows, a whole-table export.

The same four routes exist for the user's global database (``/api/users/{user_id}/global-database``) and a
workspace's agent database (``/api/workspaces/{workspace_id}/database``). They read with the database's
full-rights role, always through :mod:`agentpg.access.browse` (one READ ONLY transaction with a statement
timeout); the URI is resolved per request and lives only in this process's memory and pool keys.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from agentpg.access import browse
from agentpg.api.auth import Auth, own_user, user_scope
from agentpg.api.context import AppContext, Ctx
from agentpg.api.errors import problems
from agentpg.api.middleware import ResponseAborted
from agentpg.api.models import QueryRequest
from agentpg.errors import AgentpgError, InvalidInput, NotFound
from agentpg.schemas import DatabaseInfo
from agentpg.tokens import Principal

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api")

UserId = Annotated[str, Path(description="The platform's id for the user.", max_length=128)]
WorkspaceId = Annotated[str, Path(description="The platform's id for the workspace.", max_length=128)]
TableName = Annotated[str, Path(min_length=1, max_length=255, description="Exact table name in schema public.")]
ExportFormat = Annotated[Literal["csv", "json"], Query(description="csv (RFC 4180, header row) or json (array)")]

_READ_ERRORS = problems(429, 503, 504)
_EXPORT_MEDIA = {"csv": "text/csv; charset=utf-8", "json": "application/json"}
_EXPORT_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "The whole table, streamed.",
          "content": {"text/csv": {"schema": {"type": "string"}},
                      "application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}},
    **_READ_ERRORS,
}


def _platform_uri(ctx: AppContext, principal: Principal, user_id: str | None, workspace_id: str | None) -> str:
    """Scope first (another user's → NotFound), then the URI. Sync: catalog reads and an unseal (remembered
    for 2 s by the service, see agentpg.access.cache)."""
    if workspace_id is None:
        assert user_id is not None
        own_user(principal, user_id)
        return ctx.service.browse_uri(None, user_id, None)
    return ctx.service.browse_uri(_workspace_scope(principal, user_id), None, workspace_id)


def _workspace_scope(principal: Principal, user_id: str | None) -> str | None:
    """Whose workspace a workspace route names: ``user_id``'s under ``/api/users/{user_id}/workspaces``
    (workspace ids are per user), else the caller's user's (any user's for the admin token)."""
    if user_id is None:
        return user_scope(principal)
    own_user(principal, user_id)
    return user_id


async def _uri(ctx: AppContext, principal: Principal, user_id: str | None, workspace_id: str | None) -> str:
    """:func:`_platform_uri`, answered on the event loop when the service has it cached."""
    if workspace_id is None:
        assert user_id is not None
        own_user(principal, user_id)
        hit = ctx.service.browse_uri_cached(None, user_id, None)
    else:
        hit = ctx.service.browse_uri_cached(_workspace_scope(principal, user_id), None, workspace_id)
    return hit if hit is not None else await run_in_threadpool(_platform_uri, ctx, principal, user_id, workspace_id)


def _no_nul(table: str) -> str:
    if "\x00" in table:
        raise InvalidInput("a table name cannot contain NUL bytes")
    return table


async def _tables(ctx: AppContext, principal: Principal, user_id: str | None,
                  workspace_id: str | None) -> browse.TableList:
    uri = await _uri(ctx, principal, user_id, workspace_id)
    async with ctx.pools.connection(uri) as conn:
        return await browse.list_tables(conn, ctx.read_limits)


async def _query(ctx: AppContext, principal: Principal, user_id: str | None, workspace_id: str | None,
                 body: QueryRequest) -> JSONResponse:
    uri = await _uri(ctx, principal, user_id, workspace_id)
    order = [(k.column, k.direction == "desc") for k in body.order_by] if body.order_by else None
    async with ctx.pools.connection(uri) as conn:
        page = await browse.read_rows(conn, body.table, limits=ctx.read_limits, limit=body.limit,
                                      offset=body.offset, columns=body.columns, order_by=order)
    # Rows are JSON-ready already: answering directly skips a second, slower validation pass.
    return JSONResponse(page.model_dump())


def _csv_cell(value: Any) -> str:
    """NULL is an empty unquoted field; every other value is quoted, so "" (empty text) stays distinct."""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    return '"' + text.replace('"', '""') + '"'


def _csv_line(values: list[Any]) -> str:
    return ",".join(_csv_cell(v) for v in values) + "\r\n"


async def _export_stream(ctx: AppContext, uri: str, table: str, fmt: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in _export_chunks(ctx, uri, table, fmt):
            yield chunk
    except AgentpgError as exc:  # the 200 is already sent: all that is left is to cut the connection
        log.warning("export of a table stopped: %s", exc.message)
        raise ResponseAborted from None


async def _export_chunks(ctx: AppContext, uri: str, table: str, fmt: str) -> AsyncIterator[bytes]:
    async with ctx.pools.connection(uri) as conn:
        started = False
        async for columns, rows in browse.export_rows(conn, table, ctx.read_limits):
            names = [c.name for c in columns]
            if fmt == "csv":
                chunk = "" if started else _csv_line(names)
                chunk += "".join(_csv_line(r) for r in rows)
            else:
                parts = [json.dumps(dict(zip(names, r, strict=True)), ensure_ascii=False, allow_nan=False,
                                    separators=(",", ":")) for r in rows]
                chunk = ("[\n" if not started else (",\n" if parts else "")) + ",\n".join(parts)
            started = True
            yield chunk.encode()
        if fmt == "json":
            yield b"\n]\n"


async def _export(ctx: AppContext, principal: Principal, user_id: str | None, workspace_id: str | None,
                  table: str, fmt: str) -> StreamingResponse:
    _no_nul(table)
    uri = await _uri(ctx, principal, user_id, workspace_id)
    async with ctx.pools.connection(uri) as conn:
        info = await browse.check_table(conn, table, ctx.read_limits)  # 404 now, before the 200 is sent
    ascii_name = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in info.name)
    disposition = (f'attachment; filename="{ascii_name}.{fmt}"; '
                   f"filename*=UTF-8''{quote(info.name, safe='')}.{fmt}")
    return StreamingResponse(_export_stream(ctx, uri, info.name, fmt), media_type=_EXPORT_MEDIA[fmt],
                             headers={"Content-Disposition": disposition, "Cache-Control": "no-store"})


# -- the user's global database -------------------------------------------------------------------------


@router.get("/users/{user_id}/global-database", tags=["global database"])
def global_database(user_id: UserId, principal: Auth, ctx: Ctx) -> DatabaseInfo:
    """The global database's public info (never a URI)."""
    own_user(principal, user_id)
    info = ctx.service.get_user(user_id).global_database
    if info is None:
        raise NotFound(f"user {user_id!r} has no global database")
    return info


@router.get("/users/{user_id}/global-database/tables", tags=["global database"], responses=_READ_ERRORS)
async def global_tables(user_id: UserId, principal: Auth, ctx: Ctx) -> browse.TableList:
    """Tables in schema public with their columns, primary key and estimated row count."""
    return await _tables(ctx, principal, user_id, None)


@router.post("/users/{user_id}/global-database/query", tags=["global database"], responses=_READ_ERRORS,
             response_model=browse.RowsPage)
async def global_query(user_id: UserId, body: QueryRequest, principal: Auth, ctx: Ctx) -> JSONResponse:
    """A page of rows (read only). Unknown table → 404; unknown column → 422."""
    return await _query(ctx, principal, user_id, None, body)


@router.get("/users/{user_id}/global-database/tables/{table}/export", tags=["global database"],
            response_class=StreamingResponse, responses=_EXPORT_DOC)
async def global_export(user_id: UserId, table: TableName, principal: Auth, ctx: Ctx,
                        format: ExportFormat = "csv") -> StreamingResponse:
    """The whole table as CSV or JSON, streamed from one consistent READ ONLY snapshot."""
    return await _export(ctx, principal, user_id, None, table, format)


# -- a workspace's agent database -----------------------------------------------------------------------


@router.get("/workspaces/{workspace_id}/database", tags=["agent database"], responses=problems(409))
def agent_database(workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> DatabaseInfo:
    """The agent database's public info (never a URI)."""
    return _agent_database(ctx, principal, None, workspace_id)


def _agent_database(ctx: AppContext, principal: Principal, user_id: str | None, workspace_id: str) -> DatabaseInfo:
    info = ctx.service.get_workspace(workspace_id, user_id=_workspace_scope(principal, user_id)).database
    if info is None:
        raise NotFound(f"workspace {workspace_id!r} has no database")
    return info


@router.get("/workspaces/{workspace_id}/database/tables", tags=["agent database"],
            responses={**_READ_ERRORS, **problems(409)})
async def agent_tables(workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> browse.TableList:
    """Tables in schema public with their columns, primary key and estimated row count."""
    return await _tables(ctx, principal, None, workspace_id)


@router.post("/workspaces/{workspace_id}/database/query", tags=["agent database"],
             responses={**_READ_ERRORS, **problems(409)}, response_model=browse.RowsPage)
async def agent_query(workspace_id: WorkspaceId, body: QueryRequest, principal: Auth, ctx: Ctx) -> JSONResponse:
    """A page of rows (read only). Unknown table → 404; unknown column → 422."""
    return await _query(ctx, principal, None, workspace_id, body)


@router.get("/workspaces/{workspace_id}/database/tables/{table}/export", tags=["agent database"],
            response_class=StreamingResponse, responses={**_EXPORT_DOC, **problems(409)})
async def agent_export(workspace_id: WorkspaceId, table: TableName, principal: Auth, ctx: Ctx,
                       format: ExportFormat = "csv") -> StreamingResponse:
    """The whole table as CSV or JSON, streamed from one consistent READ ONLY snapshot."""
    return await _export(ctx, principal, None, workspace_id, table, format)


# The same, naming the user: workspace ids are per user, and for the admin token an id two users share is
# ambiguous under /api/workspaces/{id} (409).
_USER_WS = "/users/{user_id}/workspaces/{workspace_id}/database"


@router.get(_USER_WS, tags=["agent database"])
def user_agent_database(user_id: UserId, workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> DatabaseInfo:
    """``GET /api/workspaces/{id}/database`` for the user's workspace ``workspace_id``."""
    return _agent_database(ctx, principal, user_id, workspace_id)


@router.get(_USER_WS + "/tables", tags=["agent database"], responses=_READ_ERRORS)
async def user_agent_tables(user_id: UserId, workspace_id: WorkspaceId, principal: Auth,
                            ctx: Ctx) -> browse.TableList:
    """``GET /api/workspaces/{id}/database/tables`` for the user's workspace ``workspace_id``."""
    return await _tables(ctx, principal, user_id, workspace_id)


@router.post(_USER_WS + "/query", tags=["agent database"], responses=_READ_ERRORS, response_model=browse.RowsPage)
async def user_agent_query(user_id: UserId, workspace_id: WorkspaceId, body: QueryRequest, principal: Auth,
                           ctx: Ctx) -> JSONResponse:
    """``POST /api/workspaces/{id}/database/query`` for the user's workspace ``workspace_id``."""
    return await _query(ctx, principal, user_id, workspace_id, body)


@router.get(_USER_WS + "/tables/{table}/export", tags=["agent database"], response_class=StreamingResponse,
            responses=_EXPORT_DOC)
async def user_agent_export(user_id: UserId, workspace_id: WorkspaceId, table: TableName, principal: Auth,
                            ctx: Ctx, format: ExportFormat = "csv") -> StreamingResponse:
    """``GET /api/workspaces/{id}/database/tables/{table}/export`` for the user's workspace ``workspace_id``."""
    return await _export(ctx, principal, user_id, workspace_id, table, format)
