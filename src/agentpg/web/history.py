"""One database's History page: its checkpoints and its agents' audited statements on one timeline, newest first,
each with two actions, "Restore to here" (in place) and "Restore as a copy" (``mode: "new"``).

Registered, like every database page, for the user's global database and for each workspace's agent database.
Everything goes through the service (``service.undo`` for checkpoints, restores and copies, ``list_audit`` for
the statements), after the same scoping as the other database pages (another user's database is "not found").

* The actions are POST forms, checked like every explorer form (same origin, urlencoded, size-capped). A
  restore in place replaces the database, so it always passes a confirmation page first (a required checkbox;
  no script needed); a copy leaves the database alone and runs at once.
* A restore's answer is a redirect back to the History page (so reloading it never restores twice), which then
  shows the result: restored, with the checkpoint that undoes it; or the copy, with its tables.
* A refusal (unknown checkpoint or statement, a point outside the backups, no backups at all, another restore
  running) is the History page again with the service's message and its status (404, 409, 422…), never a 500.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from agentpg.errors import AgentpgError, Conflict, InvalidInput, NotFound
from agentpg.service import (
    AuditEntryInfo,
    CheckpointInfo,
    DatabaseRef,
    RestoredCopyInfo,
    RestoreResult,
    TableInfo,
    TargetSpec,
    WorkspaceInfo,
)
from agentpg.web.context import WebContext
from agentpg.web.render import db_url, render, with_query
from agentpg.web.routes_db import _where
from agentpg.web.routing import (
    Explorer,
    PageRoute,
    Session,
    WorkspaceInPath,
    error_response,
    for_both_databases,
    wants_json,
)
from agentpg.web.security import check_same_origin, field, read_form

router = APIRouter(route_class=PageRoute, include_in_schema=False)

AUDIT_READ: Final = 200
"""Audit entries read per service call (the log holds every database's calls; this page shows one's)."""
AUDIT_READS: Final = 5
SHOWN: Final = 50
"""Statements per page of the timeline."""
MAX_AUDIT_ID: Final = 2**63 - 2
"""Audit ids are bigint; looking one up reads the page older than ``id + 1``, which must be a bigint too."""

Mode = Literal["in_place", "new"]
Cursor = Annotated[str | None, Query(pattern=r"^[0-9]{1,19}$")]


def _both(suffix: str, method: str = "GET") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return for_both_databases(router, suffix, method)


@dataclass(frozen=True)
class Event:
    """One line of the timeline: a checkpoint or an audited statement."""

    at: datetime
    checkpoint: CheckpointInfo | None = None
    entry: AuditEntryInfo | None = None


@dataclass(frozen=True)
class Target:
    """What a restore form names, checked against this database's history."""

    spec: TargetSpec
    checkpoint: CheckpointInfo | None = None
    entry: AuditEntryInfo | None = None

    def fields(self) -> dict[str, str]:
        """The form fields that name it again (the confirmation page re-posts them)."""
        if self.checkpoint is not None:
            return {"checkpoint": self.checkpoint.id}
        return {"before_audit": str(self.spec.before_audit_id)}


@dataclass
class Timeline:
    events: list[Event]
    checkpoints: list[CheckpointInfo]
    next_cursor: str | None
    next_until: datetime | None
    undo_note: str | None
    """Why this database has no checkpoints and cannot be restored (a database the platform brought)."""
    copies: list[RestoredCopyInfo]

    def names(self) -> dict[str, str]:
        """Each checkpoint's name by id (a copy says which checkpoint it was restored to)."""
        return {c.id: c.name for c in self.checkpoints}


def _when(entry: AuditEntryInfo) -> datetime:
    """When a statement ran: its start (what "restore to just before it" means), else when it was logged."""
    return _utc(entry.started_at or entry.created_at)


def _utc(at: datetime) -> datetime:
    """``at`` in UTC (a time without a zone is taken as UTC): the page shows UTC, and compares aware times."""
    return at.astimezone(UTC) if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _statements(ctx: WebContext, user_id: str, workspace_id: str | None,
                cursor: str | None) -> tuple[list[AuditEntryInfo], str | None]:
    """Up to :data:`SHOWN` statements on this database, newest first, and the cursor of older ones."""
    database = "global" if workspace_id is None else "agent"
    found: list[AuditEntryInfo] = []
    for _ in range(AUDIT_READS):
        page = ctx.service.list_audit(user_id, workspace_id=workspace_id, limit=AUDIT_READ, cursor=cursor)
        for entry in page.items:
            if entry.statement and entry.database == database:
                found.append(entry)
                if len(found) == SHOWN:
                    return found, str(entry.id)
        cursor = page.next_cursor
        if cursor is None:
            break
    return found, cursor


def _copies(ctx: WebContext, user_id: str, workspace_id: str | None) -> list[RestoredCopyInfo]:
    database = "global" if workspace_id is None else "agent"
    return [c for c in ctx.service.undo.list_copies(user_id)
            if c.database == database and c.workspace_id == workspace_id]


def timeline(ctx: WebContext, user_id: str, workspace_id: str | None, cursor: str | None,
             until: datetime | None) -> Timeline:
    """A page of the history. The checkpoints shown are those between this page's statements: newer than
    the oldest statement shown (when older ones remain) and older than ``until`` (the previous page's end)."""
    undo_note = None
    try:
        checkpoints = ctx.service.undo.list_checkpoints(user_id, workspace_id)
        copies = _copies(ctx, user_id, workspace_id)
    except (Conflict, NotFound) as exc:  # a database the platform brought: agentpg does not back it up
        checkpoints, copies, undo_note = [], [], exc.message
    entries, next_cursor = _statements(ctx, user_id, workspace_id, cursor)
    lower: datetime | None = None
    if next_cursor is not None:
        lower = _when(entries[-1]) if entries else until
    shown = [c for c in checkpoints if (until is None or _utc(c.created_at) < until)
             and (lower is None or _utc(c.created_at) >= lower)]
    events = [Event(_utc(c.created_at), checkpoint=c) for c in shown] + [Event(_when(e), entry=e) for e in entries]
    events.sort(key=lambda e: e.at, reverse=True)
    return Timeline(events=events, checkpoints=checkpoints, next_cursor=next_cursor,
                    next_until=lower if next_cursor is not None else None, undo_note=undo_note, copies=copies)


def _audit_entry(ctx: WebContext, user_id: str, workspace_id: str | None, audit_id: int) -> AuditEntryInfo:
    """The audited statement ``audit_id`` if it ran on this database (else NotFound)."""
    page = ctx.service.list_audit(user_id, workspace_id=workspace_id, limit=1, cursor=str(audit_id + 1))
    database = "global" if workspace_id is None else "agent"
    entry = page.items[0] if page.items else None
    if entry is None or entry.id != audit_id or entry.database != database or not entry.statement:
        raise NotFound(f"audit entry {audit_id} is not a statement on this database")
    return entry


def target_of(ctx: WebContext, user_id: str, workspace_id: str | None, form: dict[str, list[str]]) -> Target:
    """The restore target a form names: ``checkpoint`` (an id) or ``before_audit`` (an audit entry's id).
    Raises InvalidInput (neither, both, not a number) or NotFound (not this database's)."""
    checkpoint_id, audit_id = field(form, "checkpoint").strip(), field(form, "before_audit").strip()
    if bool(checkpoint_id) == bool(audit_id):
        raise InvalidInput("name one point to restore to: a checkpoint or an audited statement")
    if checkpoint_id:
        if not _is_uuid(checkpoint_id):
            raise NotFound(f"checkpoint {checkpoint_id[:64]!r} does not exist for this database")
        found = [c for c in ctx.service.undo.list_checkpoints(user_id, workspace_id) if c.id == checkpoint_id]
        if not found:
            raise NotFound(f"checkpoint {checkpoint_id!r} does not exist for this database")
        return Target(TargetSpec(checkpoint_id=checkpoint_id), checkpoint=found[0])
    if not audit_id.isdigit() or not 1 <= int(audit_id) <= MAX_AUDIT_ID:
        raise InvalidInput(f"an audited statement is named by its entry's id, a positive whole number (at most "
                           f"{MAX_AUDIT_ID:,})")
    entry = _audit_entry(ctx, user_id, workspace_id, int(audit_id))
    if entry.started_at is None:
        raise Conflict(f"audit entry {entry.id} was written before agentpg recorded when calls began; "
                       "restore to a checkpoint instead")
    return Target(TargetSpec(before_audit_id=entry.id), entry=entry)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36


def _mode(form: dict[str, list[str]]) -> Mode:
    mode = field(form, "mode")
    if mode == "in_place":
        return "in_place"
    if mode == "new":
        return "new"
    raise InvalidInput('the form\'s mode is "in_place" (restore to here) or "new" (restore as a copy)')


async def _copy_tables(ctx: WebContext, user_id: str, copy_id: str) -> list[TableInfo]:
    return (await ctx.service.reader.tables(DatabaseRef.copy(user_id, copy_id))).tables


async def _page(request: Request, s: Explorer, user_id: str, ws: WorkspaceInfo | None, workspace_id: str | None,
                *, cursor: str | None = None, until: datetime | None = None, error: str | None = None,
                status: int = 200, restored: bool = False, undo_id: str | None = None,
                copy_id: str | None = None) -> Response:
    line = await run_in_threadpool(timeline, s.ctx, user_id, workspace_id, cursor, until)
    undo_checkpoint = next((c for c in line.checkpoints if c.id == undo_id), None) if undo_id else None
    copy = next((c for c in line.copies if c.id == copy_id), None) if copy_id else None
    copy_tables: list[TableInfo] | None = None
    copy_error = None
    if copy is not None:
        try:
            copy_tables = await _copy_tables(s.ctx, user_id, copy.id)
        except AgentpgError as exc:  # the copy is there; only listing its tables failed
            copy_error = exc.message
    return render(request, "history.html", title="History", user_id=user_id, workspace=ws,
                  workspace_id=workspace_id, active="databases", tab="history", line=line, cursor=cursor,
                  error=error, status=status, restored=restored, undo_checkpoint=undo_checkpoint,
                  copy_id=copy_id, copy=copy, copy_tables=copy_tables, copy_error=copy_error)


@_both("/history")
async def history(request: Request, user_id: str, s: Session, workspace_id: WorkspaceInPath, cursor: Cursor = None,
                  until: Annotated[datetime | None, Query()] = None,
                  restored: Annotated[Literal["in_place"] | None, Query()] = None,
                  undo: Annotated[str | None, Query(max_length=64)] = None,
                  copy: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    """The timeline (and, after a restore, its result: ``restored=in_place&undo=<checkpoint>`` or
    ``copy=<copy id>``)."""
    ws = await _where(s, user_id, workspace_id)
    return await _page(request, s, user_id, ws, workspace_id, cursor=cursor, until=_utc(until) if until else None,
                       restored=restored is not None, undo_id=undo, copy_id=copy)


async def _run_restore(ctx: WebContext, user_id: str, workspace_id: str | None, spec: TargetSpec,
                       mode: Mode) -> RestoreResult:
    """The service's restore, then (in place) the pools on the replaced database dropped. Shielded: a
    browser that gives up (its request cancelled) does not stop the restore halfway between the two."""
    async def work() -> RestoreResult:
        result = await run_in_threadpool(ctx.service.undo.restore, user_id, workspace_id, spec, mode)
        if result.mode == "in_place":  # pooled sessions were on the database that was replaced
            await ctx.service.forget_connections(
                await run_in_threadpool(ctx.service.held_after_restore, user_id, workspace_id))
        return result

    # Held by the app's background set (drained at shutdown), so a browser that leaves does not orphan it.
    return await asyncio.shield(ctx.service.background.spawn(work(), name="explorer restore"))


def _confirm(request: Request, user_id: str, ws: WorkspaceInfo | None, workspace_id: str | None, target: Target,
             *, error: str | None = None) -> Response:
    return render(request, "history_confirm.html", title="Restore in place?", user_id=user_id, workspace=ws,
                  workspace_id=workspace_id, active="databases", tab="history", target=target, error=error,
                  status=422 if error else 200)


@_both("/history/restore", method="POST")
async def restore(request: Request, user_id: str, s: Session, workspace_id: WorkspaceInPath) -> Response:
    """Restore to a checkpoint or to just before a statement: ``mode=new`` at once; ``mode=in_place`` only
    with ``confirm=yes`` (else the confirmation page). Answers 303 to the History page showing the result."""
    check_same_origin(request, s.ctx.settings.public_url)
    ws = await _where(s, user_id, workspace_id)
    form = await read_form(request)
    try:
        mode = _mode(form)
        target = await run_in_threadpool(target_of, s.ctx, user_id, workspace_id, form)
        if mode == "in_place" and field(form, "confirm") != "yes":
            problem = "Tick the box to confirm, or go back." if field(form, "step") == "confirm" else None
            return _confirm(request, user_id, ws, workspace_id, target, error=problem)
        result = await _run_restore(s.ctx, user_id, workspace_id, target.spec, mode)
    except AgentpgError as exc:
        if wants_json(request):
            return error_response(request, exc.status, exc.code, exc.message)
        return await _page(request, s, user_id, ws, workspace_id, error=exc.message, status=exc.status)
    here = db_url(user_id, workspace_id) + "/history"
    if result.restored_copy is not None:
        return RedirectResponse(with_query(here, copy=result.restored_copy.id), status_code=303)
    return RedirectResponse(with_query(here, restored="in_place", undo=result.undo_checkpoint_id), status_code=303)
