"""The tenant query path: one agent statement, run as the agent's own role, with limits the agent can't lift.

Every call to :meth:`TenantQueries.run`:

* runs **exactly one statement over the extended protocol** (``Parse``/``Bind``/``Execute``), with or without
  bound parameters, so the *server* refuses ``SELECT 1; COMMIT; DROP TABLE t`` ("cannot insert multiple
  commands into a prepared statement") whatever any pre-check thought of it;
* runs it in **its own transaction**: ``BEGIN``, then (for reads) ``SET TRANSACTION READ ONLY`` and a local
  ``statement_timeout``, then the statement, then ``COMMIT`` (reads always roll back). The mode is fixed
  before the agent's statement runs, so a ``SET TRANSACTION READ WRITE`` inside it is refused by Postgres;
* is **cancelled from outside** if it outlives the timeout by a grace period (an agent can ``SET`` any
  timeout it likes, but not stop us sending a cancel request), and the connection is ``DISCARD ALL``-ed by
  the pool before reuse, so nothing a call changes in its session reaches the next call;
* **streams** rows (libpq chunked-rows mode) and keeps at most ``max_rows`` of them and ``max_result_bytes``
  of their JSON form: a read that would return more is cancelled at once (``truncated``), a write that
  returns more rows runs to completion and its surplus rows are dropped as they arrive. Memory stays flat.

Parameters are sent as untyped text (``$1``, ``$2`` … in the SQL; Postgres infers each type from context,
as with ``psql``'s ``\\bind``); ``%`` in the SQL is never interpreted.

Errors are :class:`StatementFailed` with the server's message (primary, detail, hint) in which agentpg's
internal role and database names are replaced by words; never a URI.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import pglast
import psycopg
from pglast import ast
from psycopg import AsyncConnection, AsyncRawCursor, sql
from psycopg.types.string import TextLoader

from agentpg.access.pools import TenantPools
from agentpg.errors import AgentpgError, ProviderUnavailable

log = logging.getLogger(__name__)

JsonValue = None | bool | int | float | str | list[Any] | dict[str, Any]
Outcome = Literal["denied", "timeout", "error"]

#: Rows asked from the server per network chunk while streaming.
_CHUNK_ROWS = 100
#: Most parameters one call may bind.
MAX_PARAMS = 1000


@dataclass(frozen=True)
class QueryLimits:
    """Server-side limits of one agent call. ``cancel_grace_s`` is how long past ``statement_timeout_s``
    agentpg waits before it cancels the statement itself."""

    max_rows: int = 500
    max_result_bytes: int = 1_000_000
    statement_timeout_s: float = 30.0
    cancel_grace_s: float = 2.0


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str


@dataclass(frozen=True)
class StatementResult:
    """What one statement returned. ``rows`` hold JSON-safe values; ``row_count`` is ``len(rows)``;
    ``rows_affected`` is the server's count for INSERT/UPDATE/DELETE/MERGE (and rows seen for RETURNING).
    ``columns`` of a streamed statement come with its first row: a query that matched no row has none
    (psycopg's streaming does not expose an empty result's description)."""

    columns: list[ColumnInfo]
    rows: list[list[JsonValue]]
    truncated: bool
    duration_ms: float
    command: str | None = None
    rows_affected: int | None = None
    truncated_by: Literal["max_rows", "max_result_bytes"] | None = None

    @property
    def row_count(self) -> int:
        return len(self.rows)


class StatementFailed(AgentpgError):
    """Postgres refused or failed the statement. ``outcome`` is ``denied`` (privilege, read-only),
    ``timeout`` or ``error``; ``condition`` is a literal-free label for the audit log (SQLSTATE + name)."""

    status = 422
    code = "statement_failed"

    def __init__(self, message: str, *, outcome: Outcome, condition: str) -> None:
        super().__init__(message)
        self.outcome: Outcome = outcome
        self.condition = condition


@dataclass
class _Collector:
    """Keeps rows until a limit is reached; counts (but drops) the rest."""

    max_rows: int
    max_bytes: int
    rows: list[list[JsonValue]] = field(default_factory=list)
    size: int = 0
    seen: int = 0
    truncated_by: Literal["max_rows", "max_result_bytes"] | None = None

    def add(self, raw: Sequence[Any]) -> bool:
        """Take one row; False once the result is full (the caller may stop fetching)."""
        self.seen += 1
        if self.truncated_by is not None:
            return False
        if len(self.rows) >= self.max_rows:
            self.truncated_by = "max_rows"
            return False
        row = [json_value(v) for v in raw]
        size = len(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
        if self.size + size > self.max_bytes:
            self.truncated_by = "max_result_bytes"
            return False
        self.rows.append(row)
        self.size += size
        return True


class TenantQueries:
    """Runs agent statements on tenant databases through a :class:`TenantPools`. One per process edge."""

    def __init__(self, pools: TenantPools, limits: QueryLimits) -> None:
        self.pools = pools
        self.limits = limits

    async def run(self, uri: str, statement: str, params: Sequence[JsonValue] | None = None, *,
                  read_only: bool, max_rows: int | None = None,
                  cancel_after_s: float | None = None) -> StatementResult:
        """Run one statement on ``uri`` within the limits; see the module docstring for the guarantees.

        ``max_rows`` may lower (never raise) the configured maximum. How the statement is fetched depends on
        its shape (see :func:`statement_shape`); a wrong guess (unparseable text) only costs the row count or
        the early stop. ``cancel_after_s`` overrides when the outside cancel fires (tests).
        Raises :class:`StatementFailed`, ``PoolExhausted`` or ``ProviderUnavailable``.
        """
        limit = self.limits.max_rows if max_rows is None else max(0, min(max_rows, self.limits.max_rows))
        returns_rows, is_dml = statement_shape(statement)
        args = bind_params(params)
        timeout_ms = max(1, int(self.limits.statement_timeout_s * 1000))
        cancel_after = (self.limits.statement_timeout_s + self.limits.cancel_grace_s
                        if cancel_after_s is None else cancel_after_s)
        collector = _Collector(limit, self.limits.max_result_bytes)
        started = time.perf_counter()
        try:
            # Last resort if even the cancel request goes unanswered: psycopg then closes the connection.
            async with asyncio.timeout(cancel_after + 10), self.pools.connection(uri) as conn:
                watchdog = asyncio.create_task(_cancel_after(conn, cancel_after))
                try:
                    columns, command, affected = await _execute(conn, statement, args, read_only=read_only,
                                                                timeout_ms=timeout_ms, returns_rows=returns_rows,
                                                                is_dml=is_dml, collector=collector)
                finally:
                    watchdog.cancel()
        except psycopg.Error as exc:
            raise _failure(exc, uri, time.perf_counter() - started) from None
        except TimeoutError:
            raise StatementFailed(_timeout_message(time.perf_counter() - started), outcome="timeout",
                                  condition="57014 QueryCanceled") from None
        return StatementResult(columns=columns, rows=collector.rows, truncated=collector.truncated_by is not None,
                               truncated_by=collector.truncated_by, command=command, rows_affected=affected,
                               duration_ms=round((time.perf_counter() - started) * 1000, 2))

    async def close(self) -> None:
        await self.pools.close()


async def _cancel_after(conn: AsyncConnection[Any], seconds: float) -> None:
    await asyncio.sleep(seconds)
    try:
        await conn.cancel_safe(timeout=5.0)
    except Exception as exc:  # the outer asyncio.timeout still ends the call (psycopg then drops the connection)
        log.warning("could not cancel an overrunning agent statement: %s", type(exc).__name__)


async def _execute(conn: AsyncConnection[Any], statement: str, args: list[str | None] | None, *, read_only: bool,
                   timeout_ms: int, returns_rows: bool, is_dml: bool, collector: _Collector,
                   ) -> tuple[list[ColumnInfo], str | None, int | None]:
    # set_config(..., true) is SET LOCAL; being a query, it also takes the transaction's snapshot, after which
    # Postgres refuses any change of the READ ONLY mode ("must be set before any query").
    setup = sql.SQL("SELECT set_config('statement_timeout', {}, true)").format(sql.Literal(f"{timeout_ms}ms"))
    if read_only:
        setup = sql.SQL("SET TRANSACTION READ ONLY; ") + setup
    # Reads never commit, so stopping a read early (which cancels it server-side) is harmless.
    async with conn.transaction(force_rollback=read_only):
        await conn.execute(setup)
        cur: AsyncRawCursor[tuple[Any, ...]] = AsyncRawCursor(conn)
        cur.adapters.register_loader("interval", TextLoader)  # Python's timedelta would turn months into days
        if not returns_rows:
            # Pipeline mode always uses the extended protocol, even without parameters.
            async with conn.pipeline():
                await cur.execute(statement, args)
            if cur.description is not None:  # a statement we did not expect to return rows did
                for raw in await cur.fetchall():
                    collector.add(raw)
            return _columns(cur), cur.statusmessage, cur.rowcount if cur.rowcount >= 0 else None
        columns: list[ColumnInfo] = []
        try:
            # stream() always uses the extended protocol (chunked-rows mode needs libpq 17).
            stream = cast(AsyncGenerator[tuple[Any, ...], None], cur.stream(statement, args, size=_CHUNK_ROWS))
            async with aclosing(stream) as rows:
                async for raw in rows:
                    if not columns:
                        columns = _columns(cur)
                    if not collector.add(raw) and read_only:
                        break  # leaving the stream cancels the rest of the read
        except psycopg.ProgrammingError as exc:
            if exc.sqlstate is not None:
                raise
            return [], None, None  # it ran fine but returned no rows (e.g. CALL of a procedure without OUT)
        return columns, None, collector.seen if is_dml and not read_only else None


def _columns(cur: AsyncRawCursor[Any]) -> list[ColumnInfo]:
    return [ColumnInfo(name=c.name, type=c.type_display) for c in cur.description or ()]


def statement_shape(statement: str) -> tuple[bool, bool]:
    """(returns rows, is DML) of the (first) statement. Rows come from SELECT/VALUES/TABLE (not SELECT
    INTO), SHOW, EXPLAIN, CALL, and INSERT/UPDATE/DELETE/MERGE with RETURNING. Unparseable text counts as
    row-returning and not DML (the server will say what is wrong with it)."""
    try:
        parsed = pglast.parse_sql(statement)
    except Exception:
        return True, False
    stmt = parsed[0].stmt if parsed else None
    if isinstance(stmt, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt):
        return stmt.returningClause is not None, True
    if isinstance(stmt, ast.SelectStmt):
        return stmt.intoClause is None, False
    return stmt is None or isinstance(stmt, ast.ExplainStmt | ast.VariableShowStmt | ast.CallStmt), False


def bind_params(params: Sequence[JsonValue] | None) -> list[str | None] | None:
    """Parameters as untyped text: null → NULL, booleans → true/false, numbers and strings as written,
    arrays and objects as JSON text (for json/jsonb). None (not an empty list) means "no parameters"."""
    if params is None:
        return None
    if len(params) > MAX_PARAMS:
        raise StatementFailed(f"too many parameters ({len(params)}); at most {MAX_PARAMS} per statement",
                              outcome="error", condition="too_many_params")
    out: list[str | None] = []
    for value in params:
        if value is None or isinstance(value, str):
            out.append(value)
        elif isinstance(value, bool):
            out.append("true" if value else "false")
        elif isinstance(value, int | float):
            out.append(repr(value) if isinstance(value, float) else str(value))
        else:
            out.append(json.dumps(value, ensure_ascii=False))
    return out


def json_value(value: Any) -> JsonValue:
    """A database value as JSON: numbers stay numbers when exact, times are ISO 8601, bytes are ``\\x`` hex,
    anything else is its text form."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        if value == value.to_integral_value() and abs(value) < 2**63:
            return int(value)
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


_INTERNAL_NAME = re.compile(r'"?\b(apg_[A-Za-z0-9_]+)\b"?')


def scrub(text: str, uri: str) -> str:
    """``text`` without agentpg's internal names: the URI's role becomes "your agent role", its database
    "this database", any other ``apg_…`` name "an internal name"."""
    parts = urlsplit(uri)
    role, database = unquote(parts.username or ""), unquote(parts.path.lstrip("/"))

    def word(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == role:
            return "your agent role"
        if name == database:
            return "this database"
        return "an internal name"

    return _INTERNAL_NAME.sub(word, text)


def _timeout_message(elapsed_s: float) -> str:
    return (f"The statement was cancelled after {elapsed_s:.1f} s: it exceeded the time limit. Narrow it "
            "(WHERE, LIMIT), add an index, or split the work into smaller statements.")


def _failure(exc: psycopg.Error, uri: str, elapsed_s: float) -> AgentpgError:
    state = exc.sqlstate
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return StatementFailed(_timeout_message(elapsed_s), outcome="timeout", condition="57014 QueryCanceled")
    if state is None:  # no server answer: connection lost, refused, or a client-side error
        if isinstance(exc, psycopg.OperationalError):
            return ProviderUnavailable("the database could not be reached to run the statement; retry shortly")
        return StatementFailed(f"the statement could not be sent: {scrub(str(exc), uri)}", outcome="error",
                               condition=type(exc).__name__)
    diag = exc.diag
    message = f"Postgres refused the statement: {diag.message_primary or type(exc).__name__}"
    if diag.statement_position:
        message += f" (at character {diag.statement_position})"
    if diag.message_detail:
        message += f"\nDetail: {diag.message_detail}"
    if diag.message_hint:
        message += f"\nHint: {diag.message_hint}"
    message += f"\nSQLSTATE {state}"
    denied = state == "42501" or state.startswith("25")  # insufficient privilege; read-only / txn state
    return StatementFailed(scrub(message, uri), outcome="denied" if denied else "error",
                           condition=f"{state} {type(exc).__name__}")
