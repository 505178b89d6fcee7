"""Undo (issue 19): checkpoints and restores of a user's global database or a workspace's agent database,
restored copies, and what the backups protect.

The same routes exist for ``/api/users/{user_id}/global-database/…``, ``/api/workspaces/{workspace_id}/database/…``
and ``/api/users/{user_id}/workspaces/{workspace_id}/database/…``. Admin token or the user's own token
(another user's is 404); agent tokens reach these through MCP's own tools.

A restore runs in a background task of the app (:class:`~agentpg.service.background.Background`). Done within
``AGENTPG_RESTORE_WAIT_S`` (20 s), it answers 200 (201 with the copy for ``mode: "new"``); a longer one answers
202 ``{operation_id, status: "restoring"}`` with ``Location: /api/operations/{operation_id}``, and goes on:
``GET /api/operations/{id}`` says ``pending`` until it is ``done`` (with the 200/201's body as ``result``),
``undone`` or ``failed``. Either way, while it runs the database's ``status`` is ``restoring`` and another
restore of it is 409; checks that fail fast (a bad target, another restore running) are answered as errors,
never 202.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Response
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator
from starlette.concurrency import run_in_threadpool

from agentpg.api.auth import Auth, own_user, require_admin, user_scope
from agentpg.api.context import Ctx
from agentpg.api.errors import problems
from agentpg.api.models import QueryRequest
from agentpg.errors import AgentpgError
from agentpg.service import (
    ArchiveInfo,
    Body,
    CheckpointInfo,
    DatabaseRef,
    OperationInfo,
    Principal,
    RestoredCopyInfo,
    RestoreResult,
    TableList,
    TargetSpec,
    Text,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api", tags=["undo"])

UserId = Annotated[str, Path(description="The platform's id for the user.", max_length=128)]
WorkspaceId = Annotated[str, Path(description="The platform's id for the workspace.", max_length=128)]
CopyId = Annotated[str, Path(description="A restored copy's id.", max_length=64)]
OperationId = Annotated[str, Path(description="An operation's id (a restore's 202 gives it).", max_length=64)]
_ERRORS = problems(404, 409, 422, 503)


class CheckpointCreate(Body):
    name: Annotated[Text, Field(min_length=1, max_length=128)] | None = None


class RestoreRequest(Body):
    """Exactly one of the three targets."""

    checkpoint_id: Annotated[Text, Field(max_length=64)] | None = None
    at: datetime | None = Field(default=None, description="A time in the retention window (ISO 8601).")
    before_audit_id: int | None = Field(default=None, ge=1, description="An audit entry's id: restore to just "
                                                                       "before that statement ran.")
    mode: Literal["in_place", "new"] = "in_place"

    model_config = Body.model_config | {"strict": False}  # "at" arrives as ISO 8601 text

    @model_validator(mode="after")
    def _one_target(self) -> RestoreRequest:
        if sum(v is not None for v in (self.checkpoint_id, self.at, self.before_audit_id)) != 1:
            raise ValueError("give exactly one of checkpoint_id, at or before_audit_id")
        return self

    def spec(self) -> TargetSpec:
        return TargetSpec(checkpoint_id=self.checkpoint_id, at=self.at, before_audit_id=self.before_audit_id)


class RestoreStarted(Body):
    """A restore still running after ``AGENTPG_RESTORE_WAIT_S``: follow ``GET /api/operations/{operation_id}``
    (the ``Location`` header) until its ``state`` is no longer ``pending``."""

    operation_id: str
    status: Literal["restoring"] = "restoring"


_RESTORE_ANSWERS: dict[int | str, dict[str, Any]] = {
    **_ERRORS, 201: {"model": RestoreResult, "description": "Restored as a copy (``mode: new``)."},
    202: {"model": RestoreStarted, "description": "Still restoring after ``AGENTPG_RESTORE_WAIT_S``: follow "
                                                  "the ``Location`` (``GET /api/operations/{id}``).",
          "headers": {"Location": {"description": "``/api/operations/{operation_id}``",
                                   "schema": {"type": "string"}}}}}


class CheckpointList(Body):
    items: list[CheckpointInfo]


class CopyList(Body):
    items: list[RestoredCopyInfo]


def _creator(principal: Principal) -> str:
    return "admin" if principal.is_admin else "user"


def _owner(ctx: Ctx, principal: Principal, user_id: str | None, workspace_id: str | None) -> str:
    """The user whose database the route names (scope first: another user's is 404)."""
    if user_id is not None:
        own_user(principal, user_id)
        if workspace_id is not None:
            ctx.service.get_workspace(workspace_id, user_id=user_id)
        return user_id
    assert workspace_id is not None
    return ctx.service.get_workspace(workspace_id, user_id=user_scope(principal)).user_id


async def _create(ctx: Ctx, principal: Principal, user_id: str | None, workspace_id: str | None,
                  body: CheckpointCreate | None) -> CheckpointInfo:
    def work() -> CheckpointInfo:
        owner = _owner(ctx, principal, user_id, workspace_id)
        return ctx.service.undo.create_checkpoint(owner, workspace_id, body.name if body else None,
                                                  _creator(principal))
    return await run_in_threadpool(work)


async def _list(ctx: Ctx, principal: Principal, user_id: str | None, workspace_id: str | None) -> CheckpointList:
    def work() -> CheckpointList:
        owner = _owner(ctx, principal, user_id, workspace_id)
        return CheckpointList(items=ctx.service.undo.list_checkpoints(owner, workspace_id))
    return await run_in_threadpool(work)


async def _restore(ctx: Ctx, principal: Principal, user_id: str | None, workspace_id: str | None,
                   body: RestoreRequest) -> JSONResponse:
    """Run the restore as a task of the app's :class:`~agentpg.service.background.Background` and answer with
    its result if it ends within ``AGENTPG_RESTORE_WAIT_S``, else 202 with its operation to follow. Errors
    found before it begins (bad target, another restore running) are answered as before, never 202."""
    loop = asyncio.get_running_loop()
    begun: asyncio.Future[str] = loop.create_future()

    def started(op_id: str) -> None:  # from the worker thread
        def settle() -> None:
            if not begun.done():
                begun.set_result(op_id)
        loop.call_soon_threadsafe(settle)

    owner = await run_in_threadpool(_owner, ctx, principal, user_id, workspace_id)

    async def run() -> RestoreResult:
        try:
            result = await run_in_threadpool(ctx.service.undo.restore, owner, workspace_id, body.spec(), body.mode,
                                             started)
        except AgentpgError as exc:
            if begun.done() and not begun.cancelled():  # its operation row says so too; an operator should see it
                log.warning("restore %s of user %s failed: %s", begun.result(), owner, exc.message)
            raise
        if result.mode == "in_place":  # pooled sessions were on the database that was replaced
            await ctx.service.forget_connections(
                await run_in_threadpool(ctx.service.held_after_restore, owner, workspace_id))
        return result

    task = ctx.service.background.spawn(run(), name="restore")
    # Cancelled with the request (client gone), these waits leave the task running: the background owns it.
    first: set[asyncio.Future[Any]] = {task, begun}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not begun.done():
        begun.cancel()
        result = await task  # it failed its checks: the error's own 4xx
    else:
        try:
            result = await asyncio.wait_for(asyncio.shield(task), timeout=ctx.settings.restore_wait_s)
        except TimeoutError:
            op_id = begun.result()
            return JSONResponse(RestoreStarted(operation_id=op_id).model_dump(mode="json"), status_code=202,
                                headers={"Location": f"/api/operations/{op_id}"})
    return JSONResponse(result.model_dump(mode="json"), status_code=201 if result.mode == "new" else 200)


# -- the user's global database ------------------------------------------------------------------------------


@router.post("/users/{user_id}/global-database/checkpoints", status_code=201, responses=_ERRORS)
async def create_global_checkpoint(ctx: Ctx, principal: Auth, user_id: UserId,
                                   body: CheckpointCreate | None = None) -> CheckpointInfo:
    """Mark the global database's current state (milliseconds, whatever its size)."""
    return await _create(ctx, principal, user_id, None, body)


@router.get("/users/{user_id}/global-database/checkpoints", responses=_ERRORS)
async def list_global_checkpoints(ctx: Ctx, principal: Auth, user_id: UserId) -> CheckpointList:
    return await _list(ctx, principal, user_id, None)


@router.post("/users/{user_id}/global-database/restore", responses=_RESTORE_ANSWERS,
             response_model=RestoreResult)
async def restore_global(ctx: Ctx, principal: Auth, user_id: UserId, body: RestoreRequest) -> JSONResponse:
    """Restore the global database to a checkpoint, a time, or just before an audited statement."""
    return await _restore(ctx, principal, user_id, None, body)


# -- a workspace's agent database ------------------------------------------------------------------------------


@router.post("/workspaces/{workspace_id}/database/checkpoints", status_code=201, responses=_ERRORS)
async def create_agent_checkpoint(ctx: Ctx, principal: Auth, workspace_id: WorkspaceId,
                                  body: CheckpointCreate | None = None) -> CheckpointInfo:
    return await _create(ctx, principal, None, workspace_id, body)


@router.get("/workspaces/{workspace_id}/database/checkpoints", responses=_ERRORS)
async def list_agent_checkpoints(ctx: Ctx, principal: Auth, workspace_id: WorkspaceId) -> CheckpointList:
    return await _list(ctx, principal, None, workspace_id)


@router.post("/workspaces/{workspace_id}/database/restore", responses=_RESTORE_ANSWERS,
             response_model=RestoreResult)
async def restore_agent(ctx: Ctx, principal: Auth, workspace_id: WorkspaceId, body: RestoreRequest) -> JSONResponse:
    return await _restore(ctx, principal, None, workspace_id, body)


@router.post("/users/{user_id}/workspaces/{workspace_id}/database/checkpoints", status_code=201,
             responses=_ERRORS)
async def create_user_agent_checkpoint(ctx: Ctx, principal: Auth, user_id: UserId, workspace_id: WorkspaceId,
                                       body: CheckpointCreate | None = None) -> CheckpointInfo:
    return await _create(ctx, principal, user_id, workspace_id, body)


@router.get("/users/{user_id}/workspaces/{workspace_id}/database/checkpoints", responses=_ERRORS)
async def list_user_agent_checkpoints(ctx: Ctx, principal: Auth, user_id: UserId,
                                      workspace_id: WorkspaceId) -> CheckpointList:
    return await _list(ctx, principal, user_id, workspace_id)


@router.post("/users/{user_id}/workspaces/{workspace_id}/database/restore",
             responses=_RESTORE_ANSWERS, response_model=RestoreResult)
async def restore_user_agent(ctx: Ctx, principal: Auth, user_id: UserId, workspace_id: WorkspaceId,
                             body: RestoreRequest) -> JSONResponse:
    return await _restore(ctx, principal, user_id, workspace_id, body)


# -- restored copies ("mode": "new") ---------------------------------------------------------------------------


@router.get("/users/{user_id}/restored-copies", responses=_ERRORS)
async def list_copies(ctx: Ctx, principal: Auth, user_id: UserId) -> CopyList:
    own_user(principal, user_id)
    return CopyList(items=await run_in_threadpool(ctx.service.undo.list_copies, user_id))


@router.delete("/users/{user_id}/restored-copies/{copy_id}", status_code=204, responses=_ERRORS)
async def drop_copy(ctx: Ctx, principal: Auth, user_id: UserId, copy_id: CopyId) -> Response:
    own_user(principal, user_id)
    await run_in_threadpool(ctx.service.undo.drop_copy, user_id, copy_id)
    return Response(status_code=204)


@router.get("/users/{user_id}/restored-copies/{copy_id}/tables", responses=_ERRORS)
async def copy_tables(ctx: Ctx, principal: Auth, user_id: UserId, copy_id: CopyId) -> TableList:
    """The copy's tables, read as the explorer reads any database (one READ ONLY transaction)."""
    own_user(principal, user_id)
    return await ctx.service.reader.tables(DatabaseRef.copy(user_id, copy_id))


@router.post("/users/{user_id}/restored-copies/{copy_id}/query", responses=_ERRORS)
async def copy_rows(ctx: Ctx, principal: Auth, user_id: UserId, copy_id: CopyId, body: QueryRequest) -> JSONResponse:
    own_user(principal, user_id)
    order = [(k.column, k.direction == "desc") for k in body.order_by] if body.order_by else None
    page = await ctx.service.reader.rows(DatabaseRef.copy(user_id, copy_id), body.table, limit=body.limit,
                                         offset=body.offset, columns=body.columns, order_by=order,
                                         count=body.count == "auto")
    return JSONResponse(page.model_dump())


# -- operations (a restore answered 202) --------------------------------------------------------------------------


@router.get("/operations/{operation_id}", responses=problems(404))
async def operation(ctx: Ctx, principal: Auth, operation_id: OperationId) -> OperationInfo:
    """Where an operation stands: ``pending`` (running), ``done`` (a restore's answer in ``result``),
    ``undone`` (failed and rolled back: the database is as it was; ``error`` says why) or ``failed`` (nothing
    runs it any more; ``agentpg reconcile`` settles it). Admin token, or the token of the user it belongs to
    (another user's is 404)."""
    return await run_in_threadpool(ctx.service.undo.operation, operation_id, user_scope(principal))


# -- the backups ------------------------------------------------------------------------------------------------


@router.get("/backups", responses=problems(403))
async def backups(ctx: Ctx, principal: Auth) -> list[ArchiveInfo]:
    """What continuous archiving protects, per server (admin token)."""
    require_admin(principal, "the backup status")
    return await run_in_threadpool(ctx.service.undo.archive_status)
