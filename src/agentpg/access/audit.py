"""The audit log of agent tool calls: one row per MCP call, written after the call, read by the platform.

A row never holds a literal value: the statement is stored normalised (constants replaced by ``$n``, see
:func:`agentpg.access.classify.normalize_for_audit`) with its pglast fingerprint, and an error as a reason
code or SQLSTATE name rather than the server's message (which may quote values).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from agentpg.access.classify import RejectedStatement
from agentpg.catalog.models import AuditEntry
from agentpg.errors import AgentpgError

AuditOutcome = Literal["ok", "refused", "denied", "timeout", "error"]


@dataclass(frozen=True)
class AuditRecord:
    """One call, as the MCP path reports it."""

    user_id: str
    workspace_id: str
    tool: str
    outcome: AuditOutcome
    duration_ms: float
    database: str | None = None
    fingerprint: str | None = None
    statement: str | None = None
    rows: int | None = None
    error: str | None = None


@dataclass
class AuditDraft:
    """An entry being filled in while a call runs; :meth:`fail` records how it ended if it did not succeed."""

    tool: str
    database: str | None = None
    user_id: str | None = None
    statement: str | None = None
    fingerprint: str | None = None
    rows: int | None = None
    outcome: AuditOutcome = "ok"
    error: str | None = None

    def fail(self, exc: BaseException) -> None:
        """Outcome and literal-free error label of a call that raised ``exc``."""
        outcome = getattr(exc, "outcome", None)
        if outcome in ("denied", "timeout", "error"):  # StatementFailed: the server refused or failed it
            self.outcome, self.error = outcome, str(getattr(exc, "condition", "")) or None
        elif isinstance(exc, RejectedStatement):
            self.outcome, self.error = "refused", exc.reason
        elif isinstance(exc, AgentpgError):  # refused for the caller's own reasons; 429/5xx are ours
            self.outcome = "refused" if exc.status < 500 and exc.status != 429 else "error"
            self.error = str(getattr(exc, "reason", exc.code))
        elif isinstance(exc, asyncio.CancelledError):
            self.outcome, self.error = "error", "cancelled"
        else:
            self.outcome, self.error = "error", type(exc).__name__


class AuditEntryInfo(BaseModel):
    """An audit entry as the platform sees it."""

    model_config = ConfigDict(from_attributes=True, extra="forbid")

    id: int
    workspace_id: str
    database: str | None
    tool: str
    fingerprint: str | None
    statement: str | None
    rows: int | None
    duration_ms: int
    outcome: str
    error: str | None
    created_at: datetime


class AuditPage(BaseModel):
    """Newest first. Pass ``next_cursor`` back as ``cursor`` for older entries."""

    model_config = ConfigDict(extra="forbid")

    items: list[AuditEntryInfo]
    next_cursor: str | None


def record(sessions: sessionmaker[Session], entry: AuditRecord) -> None:
    """Append one entry (its own short transaction)."""
    with sessions.begin() as s:
        s.add(AuditEntry(user_id=entry.user_id, workspace_id=entry.workspace_id, database=entry.database,
                         tool=entry.tool, fingerprint=entry.fingerprint, statement=entry.statement,
                         rows=entry.rows, duration_ms=round(entry.duration_ms), outcome=entry.outcome,
                         error=entry.error[:200] if entry.error else None))


def page(sessions: sessionmaker[Session], user_id: str, *, workspace_id: str | None = None, limit: int = 100,
         cursor: str | None = None) -> AuditPage:
    """A user's entries, newest first, optionally of one workspace. ``cursor`` is an opaque id."""
    query = select(AuditEntry).where(AuditEntry.user_id == user_id)
    if workspace_id is not None:
        query = query.where(AuditEntry.workspace_id == workspace_id)
    if cursor:
        query = query.where(AuditEntry.id < int(cursor))
    with sessions() as s:
        rows = list(s.scalars(query.order_by(AuditEntry.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return AuditPage(items=[AuditEntryInfo.model_validate(r) for r in rows],
                     next_cursor=str(rows[-1].id) if more and rows else None)
