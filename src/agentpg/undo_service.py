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

from agentpg.access import cache
from agentpg.catalog.models import Checkpoint, RestoredCopy
from agentpg.errors import NotFound
from agentpg.lifecycle import undo, workspace_ids
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.providers.base import ArchiveStatus


class CheckpointInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    database: Literal["global", "agent"]
    workspace_id: str | None
    created_at: datetime
    created_by: str
    run_id: str | None = None


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


def _checkpoint_info(row: Checkpoint) -> CheckpointInfo:
    return CheckpointInfo(id=row.id, name=row.name, database=row.database,  # type: ignore[arg-type]
                          workspace_id=workspace_ids.public_id(row.workspace_id) if row.workspace_id else None,
                          created_at=row.created_at, created_by=row.created_by, run_id=row.run_id)


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
        return [_checkpoint_info(row) for row in undo.list_checkpoints(self._deps, self._where(user_id, workspace_id))]

    def restore(self, user_id: str, workspace_id: str | None, spec: undo.TargetSpec,
                mode: undo.RestoreMode = "in_place") -> RestoreResult:
        return self._restore(self._where(user_id, workspace_id), spec, mode)

    def _restore(self, where: undo.Where, spec: undo.TargetSpec, mode: undo.RestoreMode) -> RestoreResult:
        user_id = where.user_id
        before = {row.id for row in undo.list_checkpoints(self._deps, where)} if mode == "in_place" else set()
        try:
            copy = undo.restore(self._deps, where, spec, mode, read_only=self._read_only(user_id))
        finally:
            cache.invalidate_all()  # cached targets and URIs may name the replaced database's sessions
        if copy is not None:
            info = _copy_info(copy)
            return RestoreResult(mode="new", status="restored", restored_to=info.restored_to, restored_copy=info)
        created = [row for row in undo.list_checkpoints(self._deps, where)
                   if row.id not in before and row.created_by == "agentpg"]
        restored_to = {k: v for k, v in spec.__dict__.items() if v is not None}
        return RestoreResult(mode="in_place", status="restored",
                             restored_to={k: v.isoformat() if isinstance(v, datetime) else v
                                          for k, v in restored_to.items()},
                             undo_checkpoint_id=created[0].id if created else None)

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
        where = undo.Where(user_id, None if database == "global" else workspace_id)
        return [_checkpoint_info(row) for row in undo.list_checkpoints(self._deps, where)]

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
