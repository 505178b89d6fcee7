"""Undo (issue 19): checkpoints of one tenant database, and restoring it to a point in time.

A checkpoint is a restore point in its server's WAL plus a catalog row: milliseconds, whatever the size.
A restore is a saga like every other change (:class:`~agentpg.catalog.models.Operation`, kind ``restore``):

1. the intent row, with the names of what it will make (a fresh database name) and, in place, a checkpoint
   of the current state taken first, so the restore itself can be undone;
2. the database record's status becomes ``restoring`` (agents keep working on the current state meanwhile;
   what they write before the swap is part of what the restore replaces);
3. ``provider.restore_database`` builds the copy from the backups in a side instance;
4. every current agent's permissions and the user's budget state are applied to the copy;
5. ``new``: the copy is recorded as a :class:`RestoredCopy`; ``in_place``: ``provider.replace_database``
   swaps it in under the original name (same roles, same URIs);
6. the status goes back; the operation is done.

A crash before step 5 is undone by ``reconcile`` (the copy is dropped); a crash during the swap is finished
(``replace_database`` is resumable). Either way the database is as before or restored, never half.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from agentpg.catalog.models import (
    AgentGlobalDbPermissions,
    AuditEntry,
    Checkpoint,
    Operation,
    RestoredCopy,
    UserGlobalDatabase,
    Workspace,
    WorkspaceAgentDatabase,
)
from agentpg.errors import AgentpgError, Conflict, InvalidInput, NotFound
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.lifecycle.users import plan_of
from agentpg.lifecycle.workspaces import permissions_of
from agentpg.providers.base import DatabasePlan, RecoveryTarget

log = logging.getLogger(__name__)

Database = Literal["global", "agent"]
RestoreMode = Literal["in_place", "new"]
MAX_NAME = 128


@dataclass(frozen=True)
class Where:
    """One tenant database: the user's global one (``workspace_id`` None) or a workspace's agent one."""

    user_id: str
    workspace_id: str | None  # the catalog's (internal) id

    @property
    def database(self) -> Database:
        return "global" if self.workspace_id is None else "agent"


@dataclass(frozen=True)
class TargetSpec:
    """What the caller asked to restore to: exactly one of the three."""

    checkpoint_id: str | None = None
    at: datetime | None = None
    before_audit_id: int | None = None


def _record(s: Session, where: Where, *, for_update: bool = False) -> UserGlobalDatabase | WorkspaceAgentDatabase:
    query: Any
    if where.workspace_id is None:
        query = select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == where.user_id)
    else:
        query = select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.workspace_id == where.workspace_id,
                                                     WorkspaceAgentDatabase.user_id == where.user_id)
    if for_update:
        query = query.with_for_update()
    record: UserGlobalDatabase | WorkspaceAgentDatabase | None = s.scalars(query).one_or_none()
    what = "the global database" if where.workspace_id is None else "the workspace's database"
    if record is None:
        raise NotFound(f"{what} does not exist")
    if record.ownership_type != "platform":
        raise Conflict(f"{what} was brought by the platform: agentpg does not back it up, so it cannot be "
                       "checkpointed or restored here")
    return record


def _name(name: str | None, default: str) -> str:
    name = (name or default).strip()
    if not name or len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        raise InvalidInput(f"a checkpoint name is 1 to {MAX_NAME} printable characters")
    return name


def create_checkpoint(deps: LifecycleDeps, where: Where, name: str | None, created_by: str,
                      run_id: str | None = None) -> Checkpoint:
    """Mark the database's current state. NotRestorable when its server is not archived."""
    with deps.sessions() as s:
        record = _record(s, where)
        if record.status not in ("ready", "restoring"):
            raise Conflict(f"the database is {record.status}; retry when it is ready")
        plan = plan_of(record)
    label = _name(name, datetime.now(UTC).strftime("checkpoint %Y-%m-%d %H:%M:%S"))
    lsn, at = deps.provider.mark_point(plan, f"agentpg: {label}"[:60])
    with deps.sessions.begin() as s:
        row = Checkpoint(user_id=where.user_id, workspace_id=where.workspace_id, database=where.database,
                         database_name=plan.database, name=label, lsn=lsn, created_by=created_by[:160],
                         run_id=run_id, created_at=at)
        s.add(row)
        s.flush()
        s.expunge(row)
    return row


def list_checkpoints(deps: LifecycleDeps, where: Where) -> list[Checkpoint]:
    """Newest first; only those of the database as it is now named (all of them: a restore keeps the name)."""
    with deps.sessions() as s:
        record = _record(s, where)
        rows = list(s.scalars(select(Checkpoint).where(
            Checkpoint.user_id == where.user_id, Checkpoint.database_name == record.database_name)
            .order_by(Checkpoint.created_at.desc(), Checkpoint.id)))
        for row in rows:
            s.expunge(row)
    return rows


def restorable_from(deps: LifecycleDeps, where: Where) -> tuple[str, datetime] | None:
    """The oldest restorable point of the database's server (WAL position, time): checkpoints before it are
    expired (the retention window or a rebase removed the backups they need). None: not known."""
    with deps.sessions() as s:
        server = _record(s, where).provider_server
    return deps.provider.restorable_from(server)


def _target(s: Session, where: Where, plan: DatabasePlan, spec: TargetSpec) -> tuple[RecoveryTarget, dict[str, Any]]:
    """The recovery target of ``spec`` for this database, and its description for the records."""
    given = [v for v in (spec.checkpoint_id, spec.at, spec.before_audit_id) if v is not None]
    if len(given) != 1:
        raise InvalidInput("give exactly one of checkpoint_id, at or before_audit_id")
    if spec.checkpoint_id is not None:
        cp = s.get(Checkpoint, spec.checkpoint_id)
        if cp is None or cp.user_id != where.user_id or cp.database_name != plan.database:
            raise NotFound(f"checkpoint {spec.checkpoint_id!r} does not exist for this database")
        return RecoveryTarget(lsn=cp.lsn), {"checkpoint_id": cp.id, "lsn": cp.lsn}
    if spec.before_audit_id is not None:
        entry = s.get(AuditEntry, spec.before_audit_id)
        matches = (entry is not None and entry.user_id == where.user_id and entry.database == where.database
                   and (where.workspace_id is None or entry.workspace_id == where.workspace_id))
        if not matches or entry is None:
            raise NotFound(f"audit entry {spec.before_audit_id} is not a statement on this database")
        if entry.started_at is None:
            raise Conflict(f"audit entry {spec.before_audit_id} was written before agentpg recorded when calls "
                           "began; restore to a time instead")
        return (RecoveryTarget(time=entry.started_at),
                {"before_audit_id": entry.id, "time": entry.started_at.isoformat()})
    assert spec.at is not None
    at = spec.at if spec.at.tzinfo is not None else spec.at.replace(tzinfo=UTC)
    if at > datetime.now(UTC):
        raise InvalidInput("the time to restore to is in the future")
    return RecoveryTarget(time=at), {"at": at.isoformat(), "time": at.isoformat()}


def restore(deps: LifecycleDeps, where: Where, spec: TargetSpec, mode: RestoreMode, *,
            read_only: bool, on_begin: Callable[[str], None] | None = None) -> RestoredCopy | None:
    """Restore the database (see the module docstring). Returns the copy for ``new``, None in place.
    ``read_only``: the user is over budget now, so the restored database must be too. ``on_begin`` gets the
    operation's id once its intent row exists and this process holds its lease (from then on
    :func:`operation_state` follows it), before the long part; the checks that fail fast have passed.

    Raises NotFound, InvalidInput, Conflict (another restore of it runs, or it is not ready), NotRestorable
    (outside the backups), ProviderError. On a failure the database is as it was.
    """
    if mode not in ("in_place", "new"):
        raise InvalidInput('mode is "in_place" or "new"')
    with deps.sessions() as s:
        record = _record(s, where)
        plan = plan_of(record)
        target, described = _target(s, where, plan, spec)
    into = DatabasePlan.fresh(plan.server)
    op_id = _begin(deps, where, plan, into, target, described, mode)
    with deps.operation_lease(op_id) as lease:
        if not lease.acquired:  # only reconcile could hold it this early
            raise Conflict("this restore is being settled by another process")
        try:
            if on_begin is not None:
                on_begin(op_id)
            if mode == "in_place":
                checkpoint = create_checkpoint(deps, where, f"before restore {op_id[:8]}", "agentpg")
                _update_plan(deps, op_id, pre_checkpoint=checkpoint.id)
            deps.provider.restore_database(plan, target, into)
            deps.reached("restore.restored")
            restored = DatabasePlan(into.database, plan.owner_role, plan.login_role, plan.server)
            apply_current_access(deps, where, restored, read_only=read_only)
            if mode == "new":
                with deps.sessions.begin() as s:
                    copy = RestoredCopy(user_id=where.user_id, workspace_id=where.workspace_id,
                                        database=where.database, source_database_name=plan.database,
                                        database_name=into.database, provider_server=plan.server,
                                        target=described)
                    s.add(copy)
                    s.flush()
                    op = s.get_one(Operation, op_id)
                    op.plan = {**op.plan, "copy_id": copy.id}  # what the operation's answer names
                    _finish(s, op_id, where)
                    s.flush()
                    s.expunge(copy)
                return copy
            _update_plan(deps, op_id, step="replacing")
            deps.reached("restore.replacing")
            deps.provider.replace_database(plan, restored)
            with deps.sessions.begin() as s:
                _finish(s, op_id, where)
            return None
        except BaseException as exc:
            if not isinstance(exc, AgentpgError):  # the caller may only ever see its type (public_error)
                log.warning("restore %s failed unexpectedly; rolling it back", op_id, exc_info=exc)
            try:
                undo_restore(deps, op_id, reason=exc)
            except AgentpgError as settling:
                _note_unsettled(deps, op_id, exc, settling)
            raise


def _note_unsettled(deps: LifecycleDeps, op_id: str, cause: BaseException, settling: AgentpgError) -> None:
    """A failed restore that could not be rolled back either stays pending for ``reconcile``; say why on it."""
    log.warning("restore %s failed and could not be rolled back (%s); reconcile settles it", op_id,
                settling.message, exc_info=cause)
    why = f"; rolling it back failed too ({settling.message}): `agentpg reconcile` settles it"
    with contextlib.suppress(Exception), deps.sessions.begin() as s:  # the catalog may be what failed
        op = s.get_one(Operation, op_id)
        op.error = f"{type(cause).__name__}: {cause}{why}"[:1000]
        op.plan = {**op.plan, "public_error": (public_error(cause) + why)[:1000]}


def _begin(deps: LifecycleDeps, where: Where, plan: DatabasePlan, into: DatabasePlan, target: RecoveryTarget,
           described: dict[str, Any], mode: RestoreMode) -> str:
    """The intent row, and the record's status ``restoring`` (one restore of a database at a time)."""
    with deps.sessions.begin() as s:
        record = _record(s, where, for_update=True)
        if record.status == "restoring":
            raise Conflict("this database is already being restored; wait for that restore to end")
        if record.status != "ready":
            raise Conflict(f"the database is {record.status}; retry when it is ready")
        op = Operation(kind="restore", user_id=where.user_id, workspace_id=where.workspace_id,
                       plan={"source": plan.to_json(), "into": into.to_json(), "mode": mode, "step": "restoring",
                             "target": {"lsn": target.lsn, "time": target.time.isoformat() if target.time else None},
                             "described": described})
        s.add(op)
        record.status = "restoring"
        s.flush()
        return op.id


def _update_plan(deps: LifecycleDeps, op_id: str, **changes: Any) -> None:
    with deps.sessions.begin() as s:
        op = s.get_one(Operation, op_id)
        op.plan = {**op.plan, **changes}


def _finish(s: Session, op_id: str, where: Where, state: str = "done", error: str | None = None) -> None:
    op = s.get_one(Operation, op_id)
    op.state, op.error = state, error
    try:
        record = _record(s, where, for_update=True)
    except (NotFound, Conflict):
        return  # deleted meanwhile: nothing to give back
    if record.status == "restoring":
        record.status = "ready"


def apply_current_access(deps: LifecycleDeps, where: Where, restored: DatabasePlan, *, read_only: bool) -> None:
    """The catalog is the truth about who may do what now: every current agent's permissions (global
    database) and the user's budget state go onto the restored copy."""
    with deps.sessions() as s:
        grants: list[tuple[str, AgentGlobalDbPermissions | None]] = []
        if where.workspace_id is None:
            for ws in s.scalars(select(Workspace).where(Workspace.user_id == where.user_id,
                                                        Workspace.status == "active")):
                if ws.agent_role:
                    perms = s.scalars(select(AgentGlobalDbPermissions)
                                      .where(AgentGlobalDbPermissions.workspace_id == ws.id)).one_or_none()
                    grants.append((ws.agent_role, perms))
    for role, perms in grants:
        deps.provider.set_agent_permissions(restored, role, permissions_of(perms))
    if read_only:
        deps.provider.set_read_only(restored, True)


def undo_restore(deps: LifecycleDeps, op_id: str, reason: BaseException | str) -> None:
    """Settle an abandoned or failed restore: before the swap, drop the copy (the database is as it was);
    once the swap began, finish it (the database is restored)."""
    with deps.sessions() as s:
        op = s.get_one(Operation, op_id)
        plan_json, user_id, workspace_id, state = dict(op.plan), op.user_id, op.workspace_id, op.state
    if state != "pending":
        return
    where = Where(user_id, workspace_id)
    source, into = DatabasePlan.from_json(plan_json["source"]), DatabasePlan.from_json(plan_json["into"])
    if plan_json.get("step") == "replacing":
        deps.provider.replace_database(source, DatabasePlan(into.database, source.owner_role, source.login_role,
                                                            source.server))
        with deps.sessions.begin() as s:
            _finish(s, op_id, where)
        return
    deps.provider.drop_database(DatabasePlan(into.database, f"{into.database}_owner", f"{into.database}_login",
                                             into.server))
    error = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
    with deps.sessions.begin() as s:
        _finish(s, op_id, where, state="undone", error=error[:1000])
        op = s.get_one(Operation, op_id)
        op.plan = {**op.plan, "public_error": public_error(reason, plan_json.get("public_error"))}


def public_error(reason: BaseException | str, known: str | None = None) -> str:
    """Why a restore failed, as its caller may read it (``GET /api/operations/{id}``): an agentpg error's own
    message; anything unexpected only by its type (its text may name internal databases or SQL; the full one
    is in ``Operation.error`` and the server's log)."""
    if isinstance(reason, AgentpgError):
        return reason.message[:1000]
    if isinstance(reason, str):
        return known or "abandoned: the process running it stopped"
    return f"an unexpected error ({type(reason).__name__}); the server's log has the details"


def drop_copy(deps: LifecycleDeps, user_id: str, copy_id: str) -> None:
    """Drop a restored copy (NotFound if it is not this user's)."""
    with deps.sessions() as s:
        copy = s.get(RestoredCopy, copy_id)
        if copy is None or copy.user_id != user_id:
            raise NotFound(f"restored copy {copy_id!r} does not exist")
        name, server = copy.database_name, copy.provider_server
    deps.provider.drop_database(DatabasePlan(name, f"{name}_owner", f"{name}_login", server))
    with deps.sessions.begin() as s:
        row = s.get(RestoredCopy, copy_id)
        if row is not None:
            s.delete(row)


def get_copy(deps: LifecycleDeps, user_id: str, copy_id: str) -> RestoredCopy | None:
    """This user's restored copy ``copy_id``, or None (dropped since, or not its own)."""
    with deps.sessions() as s:
        copy = s.get(RestoredCopy, copy_id) if copy_id else None
        if copy is None or copy.user_id != user_id:
            return None
        s.expunge(copy)
    return copy


def list_copies(deps: LifecycleDeps, user_id: str) -> list[RestoredCopy]:
    with deps.sessions() as s:
        rows = list(s.scalars(select(RestoredCopy).where(RestoredCopy.user_id == user_id)
                              .order_by(RestoredCopy.created_at.desc())))
        for row in rows:
            s.expunge(row)
    return rows


def copy_uri(deps: LifecycleDeps, user_id: str, copy_id: str) -> str:
    """The platform's (read) URI of a restored copy: its source's login role, on the copy. A secret, for
    the access layer's READ ONLY reads only. NotFound if it is not this user's."""
    with deps.sessions() as s:
        copy = s.get(RestoredCopy, copy_id)
        if copy is None or copy.user_id != user_id:
            raise NotFound(f"restored copy {copy_id!r} does not exist")
        record = _record(s, Where(copy.user_id, copy.workspace_id))
        if record.connection_uri_sealed is None:
            raise NotFound(f"restored copy {copy_id!r} does not exist")
        table = "user_global_database" if copy.workspace_id is None else "workspace_agent_database"
        uri = deps.open(record.connection_uri_sealed, table, record.id, "connection_uri")
        name = copy.database_name
    return deps.provider.restored_copy_uri(uri, name)


OperationState = Literal["pending", "done", "undone", "failed"]


def operation_state(deps: LifecycleDeps, op_id: str, user_id: str | None) -> tuple[Operation, OperationState]:
    """The operation ``op_id`` (of ``user_id``; None: anyone's) and where it stands: ``pending`` (a process
    holds its lease: it is running), ``done``, ``undone`` (rolled back; ``error`` says why), or ``failed``:
    pending with nobody working on it (the process died, or rolling back failed too) until ``agentpg
    reconcile`` settles it. NotFound for an unknown id or another user's."""
    with deps.sessions() as s:
        op = s.get(Operation, op_id)
        if op is None or (user_id is not None and op.user_id != user_id):
            raise NotFound(f"operation {op_id!r} does not exist")
        s.expunge(op)
        if op.state != "pending":
            return op, "done" if op.state == "done" else "undone"
        # The lease is a session advisory lock on hashtextextended(id, 0) (LifecycleDeps.operation_lease);
        # pg_locks shows a bigint key as its high (classid) and low (objid) halves.
        held = s.execute(text(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(:id, 0))"), {"id": op_id}).scalar()
    return op, "pending" if held else "failed"
