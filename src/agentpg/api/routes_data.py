"""The explorer's routes: a database's public info, its tables, a page of rows, a whole-table export.

The same four routes exist for the user's global database (``/api/users/{user_id}/global-database``) and a
workspace's agent database (``/api/workspaces/{workspace_id}/database``). They read with the database's
full-rights role, through the service's reader (one READ ONLY transaction with a statement timeout); the
route names the database (:class:`agentpg.service.DatabaseRef`) and the URI never leaves the service.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response, StreamingResponse

from agentpg.api.auth import Auth, own_user, user_scope
from agentpg.api.context import AppContext, Ctx
from agentpg.api.errors import problems
from agentpg.api.models import QueryRequest
from agentpg.errors import AgentpgError, InvalidInput, NotFound
from agentpg.problems import ResponseAborted
from agentpg.service import EXPORT_MEDIA, DatabaseInfo, DatabaseRef, Principal, RowsPage, TableList, attachment

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api")

UserId = Annotated[str, Path(description="The platform's id for the user.", max_length=128)]
WorkspaceId = Annotated[str, Path(description="The platform's id for the workspace.", max_length=128)]
TableName = Annotated[str, Path(min_length=1, max_length=255, description="Exact table name in schema public.")]
ExportFormat = Annotated[Literal["csv", "json"], Query(description="csv (RFC 4180, header row) or json (array)")]

_READ_ERRORS = problems(429, 503, 504)
_EXPORT_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "The whole table, streamed.",
          "content": {"text/csv": {"schema": {"type": "string"}},
                      "application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}},
    **_READ_ERRORS,
}


def database_ref(principal: Principal, user_id: str | None, workspace_id: str | None) -> DatabaseRef:
    """Scope first (another user's → NotFound when read), then the database the route names."""
    if workspace_id is None:
        assert user_id is not None
        own_user(principal, user_id)
        return DatabaseRef.global_db(user_id)
    return DatabaseRef.agent_db(workspace_id, _workspace_scope(principal, user_id))


def _workspace_scope(principal: Principal, user_id: str | None) -> str | None:
    """Whose workspace a workspace route names: ``user_id``'s under ``/api/users/{user_id}/workspaces``
    (workspace ids are per user), else the caller's user's (any user's for the admin token)."""
    if user_id is None:
        return user_scope(principal)
    own_user(principal, user_id)
    return user_id


def _no_nul(table: str) -> str:
    if "\x00" in table:
        raise InvalidInput("a table name cannot contain NUL bytes")
    return table


async def _tables(ctx: AppContext, principal: Principal, user_id: str | None,
                  workspace_id: str | None) -> TableList:
    return await ctx.service.reader.tables(database_ref(principal, user_id, workspace_id))


async def _query(ctx: AppContext, principal: Principal, user_id: str | None, workspace_id: str | None,
                 body: QueryRequest) -> Response:
    order = [(k.column, k.direction == "desc") for k in body.order_by] if body.order_by else None
    page = await ctx.service.reader.rows(database_ref(principal, user_id, workspace_id), body.table,
                                         limit=body.limit, offset=body.offset, columns=body.columns, order_by=order,
                                         count=body.count == "auto")
    # Rows are JSON-ready already: answering directly skips a second, slower validation pass, and pydantic's
    # serializer writes the same JSON as model_dump + json.dumps in a fifth of the time (~35 vs ~170 us for
    # 100 rows).
    return Response(page.__pydantic_serializer__.to_json(page), media_type="application/json")


async def _export_stream(ctx: AppContext, ref: DatabaseRef, table: str, fmt: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in ctx.service.reader.export_bytes(ref, table, fmt):
            yield chunk
    except AgentpgError as exc:  # the 200 is already sent: all that is left is to cut the connection
        log.warning("export of a table stopped: %s", exc.message)
        raise ResponseAborted from None


async def _export(ctx: AppContext, principal: Principal, user_id: str | None, workspace_id: str | None,
                  table: str, fmt: str) -> StreamingResponse:
    _no_nul(table)
    ref = database_ref(principal, user_id, workspace_id)
    info = await ctx.service.reader.check_table(ref, table)  # 404 now, before the 200 is sent
    return StreamingResponse(_export_stream(ctx, ref, info.name, fmt), media_type=EXPORT_MEDIA[fmt],
                             headers={"Content-Disposition": attachment(info.name, fmt), "Cache-Control": "no-store"})


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
async def global_tables(user_id: UserId, principal: Auth, ctx: Ctx) -> TableList:
    """Tables in schema public with their columns, primary key and estimated row count."""
    return await _tables(ctx, principal, user_id, None)


@router.post("/users/{user_id}/global-database/query", tags=["global database"], responses=_READ_ERRORS,
             response_model=RowsPage)
async def global_query(user_id: UserId, body: QueryRequest, principal: Auth, ctx: Ctx) -> Response:
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
async def agent_tables(workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> TableList:
    """Tables in schema public with their columns, primary key and estimated row count."""
    return await _tables(ctx, principal, None, workspace_id)


@router.post("/workspaces/{workspace_id}/database/query", tags=["agent database"],
             responses={**_READ_ERRORS, **problems(409)}, response_model=RowsPage)
async def agent_query(workspace_id: WorkspaceId, body: QueryRequest, principal: Auth, ctx: Ctx) -> Response:
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
                            ctx: Ctx) -> TableList:
    """``GET /api/workspaces/{id}/database/tables`` for the user's workspace ``workspace_id``."""
    return await _tables(ctx, principal, user_id, workspace_id)


@router.post(_USER_WS + "/query", tags=["agent database"], responses=_READ_ERRORS, response_model=RowsPage)
async def user_agent_query(user_id: UserId, workspace_id: WorkspaceId, body: QueryRequest, principal: Auth,
                           ctx: Ctx) -> Response:
    """``POST /api/workspaces/{id}/database/query`` for the user's workspace ``workspace_id``."""
    return await _query(ctx, principal, user_id, workspace_id, body)


@router.get(_USER_WS + "/tables/{table}/export", tags=["agent database"], response_class=StreamingResponse,
            responses=_EXPORT_DOC)
async def user_agent_export(user_id: UserId, workspace_id: WorkspaceId, table: TableName, principal: Auth,
                            ctx: Ctx, format: ExportFormat = "csv") -> StreamingResponse:
    """``GET /api/workspaces/{id}/database/tables/{table}/export`` for the user's workspace ``workspace_id``."""
    return await _export(ctx, principal, user_id, workspace_id, table, format)
