"""The service's undo part (issue 19): checkpoints, restores and restored copies, as the edges call them.

A part of :class:`agentpg.service.Service` (``service.undo``), composed rather than mixed in: it owns no
state and reaches the catalog and provider only through :mod:`agentpg.lifecycle.undo`. Every method takes
the database as the platform names it (``workspace_id`` None: the user's global database; else the platform's
id of a workspace, of ``user_id``), raises :mod:`agentpg.errors` exceptions only, and returns public shapes
(no database name, role or URI).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agentpg.catalog.models import Checkpoint, Operation, RestoredCopy
from agentpg.errors import NotFound
from agentpg.lifecycle import undo, workspace_ids
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.providers.base import ArchiveStatus, RebaseResult
from agentpg.providers.walfiles import parse_lsn


class CheckpointInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    database: Literal["global", "agent"]
    workspace_id: str | None
    created_at: datetime
    created_by: str
    run_id: str | None = None
    expired: bool = False
    """Before the oldest restorable point of its server (the retention window, or a rebase after a user's
    deletion, removed the backups it needs): a restore to it is refused (409)."""


class RestoredCopyInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    database: Literal["global", "agent"]
    workspace_id: str | None
    restored_to: dict[str, str | int]
    created_at: datetime


class RestoreResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["in_place", "new"]
    status: Literal["restored"]
    restored_to: dict[str, str | int]
    undo_checkpoint_id: str | None = None
    """In place: the checkpoint of the state just before the restore (restore to it to undo the restore)."""
    restored_copy: RestoredCopyInfo | None = None


class OperationInfo(BaseModel):
    """A change agentpg runs as a saga (a restore, a registration…), as its caller follows it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: str
    state: Literal["pending", "done", "undone", "failed"]
    """``pending``: running; ``done``; ``undone``: it failed and was rolled back, the database is as it was
    (``error`` says why); ``failed``: it stopped and nothing runs it any more (the process died, or rolling
    back failed too): ``agentpg reconcile`` settles it (``error``, when known, says why)."""
    error: str | None = None
    result: RestoreResult | None = None
    """A done restore's answer, as the 200/201 would have carried it."""


class ArchiveInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: str | None
    protected: bool
    reason: str | None
    earliest: datetime | None
    latest: datetime | None
    base_backups: int
    bytes: int
    synchronous: bool
    rebase_pending: bool = False
    """A rebase was asked for (a user's deletion, ``AGENTPG_BACKUP_PURGE_ON_USER_DELETE=rebase``) and is not
    done yet: ``serve``'s next archiving round does it."""


def _checkpoint_info(row: Checkpoint, window_start: int | None = None) -> CheckpointInfo:
    return CheckpointInfo(id=row.id, name=row.name, database=row.database,  # type: ignore[arg-type]
                          workspace_id=workspace_ids.public_id(row.workspace_id) if row.workspace_id else None,
                          created_at=row.created_at, created_by=row.created_by, run_id=row.run_id,
                          expired=window_start is not None and parse_lsn(row.lsn) < window_start)


def _copy_info(row: RestoredCopy) -> RestoredCopyInfo:
    return RestoredCopyInfo(id=row.id, database=row.database,  # type: ignore[arg-type]
                            workspace_id=workspace_ids.public_id(row.workspace_id) if row.workspace_id else None,
                            restored_to={k: v for k, v in row.target.items() if k != "lsn"},
                            created_at=row.created_at)


class UndoService:
    """Checkpoints and restores. ``resolve(user_id, workspace_id)`` gives the catalog's workspace id (NotFound
    for another user's); ``read_only(user_id)`` says whether the user is over budget now."""

    def __init__(self, deps: LifecycleDeps, resolve: Callable[[str, str], str],
                 read_only: Callable[[str], bool]) -> None:
        self._deps = deps
        self._resolve = resolve
        self._read_only = read_only

    def _where(self, user_id: str, workspace_id: str | None) -> undo.Where:
        validate_id(user_id, "user id")
        return undo.Where(user_id, self._resolve(user_id, workspace_id) if workspace_id is not None else None)

    def archive_status(self) -> list[ArchiveInfo]:
        statuses: list[ArchiveStatus] = self._deps.provider.archive_status()
        return [ArchiveInfo(**status.__dict__) for status in statuses]

    def create_checkpoint(self, user_id: str, workspace_id: str | None, name: str | None,
                          created_by: str) -> CheckpointInfo:
        return _checkpoint_info(undo.create_checkpoint(self._deps, self._where(user_id, workspace_id), name,
                                                       created_by))

    def create_run_checkpoint(self, user_id: str, workspace_id: str, name: str | None,
                              created_by: str) -> list[CheckpointInfo]:
        """An agent run's checkpoint: its user's global database and its own agent database, together."""
        run_id = str(uuid.uuid4())
        return [_checkpoint_info(undo.create_checkpoint(self._deps, self._where(user_id, ws), name, created_by,
                                                        run_id=run_id)) for ws in (None, workspace_id)]

    def list_checkpoints(self, user_id: str, workspace_id: str | None) -> list[CheckpointInfo]:
        """Newest first; those before the oldest restorable point are marked ``expired``."""
        return self._listed(self._where(user_id, workspace_id))

    def _listed(self, where: undo.Where) -> list[CheckpointInfo]:
        rows = undo.list_checkpoints(self._deps, where)
        start = undo.restorable_from(self._deps, where) if rows else None
        window_start = parse_lsn(start[0]) if start is not None else None
        return [_checkpoint_info(row, window_start) for row in rows]

    def rebase_backups(self) -> list[RebaseResult]:
        """The operator's purge (``agentpg backups rebase``): every archived server's backups start over from
        a fresh full base backup, verified before anything older is deleted. Every tenant loses the points
        before it (their checkpoints are listed ``expired``; a restore there is 409). ProviderError (nothing
        deleted) when the new base backup cannot be taken or verified."""
        return self._deps.provider.rebase_backups()

    def schedule_rebase(self, reason: str) -> bool:
        """Ask ``serve``'s archiving to rebase every archived server's backups soon (after a user's deletion
        with ``AGENTPG_BACKUP_PURGE_ON_USER_DELETE=rebase``); False when nothing is archived here."""
        return bool(self._deps.provider.request_backup_rebase(reason))

    def restore(self, user_id: str, workspace_id: str | None, spec: undo.TargetSpec,
                mode: undo.RestoreMode = "in_place", on_begin: Callable[[str], None] | None = None) -> RestoreResult:
        """Run a restore to its end. ``on_begin(operation_id)`` is called once it has passed its checks and
        its operation exists (:meth:`operation` follows it from then on), so an edge running this in a
        background worker can answer early. Raises as :func:`agentpg.lifecycle.undo.restore`."""
        return self._restore(self._where(user_id, workspace_id), spec, mode, on_begin)

    def _restore(self, where: undo.Where, spec: undo.TargetSpec, mode: undo.RestoreMode,
                 on_begin: Callable[[str], None] | None = None) -> RestoreResult:
        begun: list[str] = []

        def started(op_id: str) -> None:
            begun.append(op_id)
            if on_begin is not None:
                on_begin(op_id)
        try:
            undo.restore(self._deps, where, spec, mode, read_only=self._read_only(where.user_id), on_begin=started)
        finally:
            self._deps.invalidation.bump()  # cached targets and URIs may name the replaced database's sessions
        op, _ = undo.operation_state(self._deps, begun[0], where.user_id)
        return self._result_of(op)

    def _result_of(self, op: Operation) -> RestoreResult:
        """A finished restore's answer, from its operation: the target, and the undo checkpoint or the copy."""
        plan = op.plan
        restored_to = {k: v for k, v in dict(plan.get("described") or {}).items() if k not in ("lsn", "time")}
        if plan.get("mode") == "new":
            copy = undo.get_copy(self._deps, op.user_id, str(plan.get("copy_id") or ""))
            info = _copy_info(copy) if copy is not None else None
            return RestoreResult(mode="new", status="restored", restored_to=info.restored_to if info else restored_to,
                                 restored_copy=info)
        return RestoreResult(mode="in_place", status="restored", restored_to=restored_to,
                             undo_checkpoint_id=plan.get("pre_checkpoint"))

    def operation(self, operation_id: str, user_id: str | None) -> OperationInfo:
        """Where an operation stands (``GET /api/operations/{id}``): of ``user_id`` (None: the admin, anyone's).
        A done restore carries its answer in ``result``. NotFound for an unknown id or another user's."""
        try:
            uuid.UUID(operation_id)
        except ValueError:
            raise NotFound(f"operation {operation_id!r} does not exist") from None
        op, state = undo.operation_state(self._deps, operation_id, user_id)
        result = self._result_of(op) if state == "done" and op.kind == "restore" else None
        error = None
        if state != "done" and (op.error or op.plan.get("public_error")):
            # Only the public form: Operation.error may name internal databases or SQL (operators read it).
            error = str(op.plan.get("public_error") or "it failed; the server's log has the details")
        return OperationInfo(id=op.id, kind=op.kind, state=state, error=error, result=result)

    # -- for an agent (its principal's catalog ids, already authenticated) ---------------------------------

    def agent_checkpoint(self, user_id: str, workspace_id: str, database: Literal["global", "agent", "both"],
                         name: str | None) -> list[CheckpointInfo]:
        by = f"agent {workspace_ids.public_id(workspace_id)}"
        if database == "both":
            run_id = str(uuid.uuid4())
            return [_checkpoint_info(undo.create_checkpoint(self._deps, undo.Where(user_id, ws), name, by, run_id))
                    for ws in (None, workspace_id)]
        where = undo.Where(user_id, None if database == "global" else workspace_id)
        return [_checkpoint_info(undo.create_checkpoint(self._deps, where, name, by))]

    def agent_list_checkpoints(self, user_id: str, workspace_id: str,
                               database: Literal["global", "agent"]) -> list[CheckpointInfo]:
        return self._listed(undo.Where(user_id, None if database == "global" else workspace_id))

    def agent_restore(self, user_id: str, workspace_id: str, spec: undo.TargetSpec,
                      mode: undo.RestoreMode) -> RestoreResult:
        """An agent restores its OWN agent database only (the global one is the user's or platform's call)."""
        return self._restore(undo.Where(user_id, workspace_id), spec, mode)

    def list_copies(self, user_id: str) -> list[RestoredCopyInfo]:
        validate_id(user_id, "user id")
        return [_copy_info(row) for row in undo.list_copies(self._deps, user_id)]

    def drop_copy(self, user_id: str, copy_id: str) -> None:
        validate_id(user_id, "user id")
        try:
            uuid.UUID(copy_id)
        except ValueError:
            raise NotFound(f"restored copy {copy_id!r} does not exist") from None
        undo.drop_copy(self._deps, user_id, copy_id)
