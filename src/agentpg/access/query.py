"""The tenant query path: one agent statement, run as the agent's own role, with limits the agent can't lift.

Every call to :meth:`TenantQueries.run`:

* runs **exactly one statement over the extended protocol** (``Parse``/``Bind``/``Execute``), with or without
  bound parameters, so the *server* refuses ``SELECT 1; COMMIT; DROP TABLE t`` ("cannot insert multiple
  commands into a prepared statement") whatever any pre-check thought of it;
* runs it in **its own transaction**, on a connection whose session starts (startup packet) with
  ``default_transaction_read_only=on`` and the ``statement_timeout``: a read is the statement alone in its
  implicit, read-only transaction, followed in the same round trip by the session's ``DISCARD ALL``
  (:mod:`agentpg.access.pipeline`); a write is ``BEGIN READ WRITE``, the statement, then ``COMMIT``, and the
  pool resets its session in the background after the answer. The mode is fixed when the transaction
  starts, before the agent's statement, so a ``SET TRANSACTION READ WRITE`` inside it is refused by Postgres;
* is **cancelled from outside** if it outlives the timeout by a grace period (an agent can ``SET`` any
  timeout it likes, but not stop us sending a cancel request). Since every connection is ``DISCARD ALL``-ed
  before reuse, nothing a call changes in its session reaches the next call: ``RESET ALL`` returns to the
  startup settings above, not to the role's defaults;
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
import contextlib
import datetime as dt
import functools
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

import pglast
import psycopg
from pglast import ast
from psycopg import AsyncConnection, AsyncRawCursor, pq
from psycopg.adapt import AdaptersMap
from psycopg.types.string import TextLoader

from agentpg.access.pipeline import Field, read_and_reset
from agentpg.access.pools import SessionSettings, TenantPools, is_connection_lost
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
    A read's ``columns`` are known even when no row matched; a write's RETURNING columns come with its first
    row (psycopg's streaming does not expose an empty result's description)."""

    columns: list[ColumnInfo]
    rows: list[list[JsonValue]]
    truncated: bool
    duration_ms: float
    command: str | None = None
    rows_affected: int | None = None
    truncated_by: Literal["max_rows", "max_result_bytes"] | None = None
    rows_json: list[str] | None = None
    """Each row of ``rows`` as compact JSON (computed anyway to count result bytes), for text renderings."""

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


#: OIDs of the types whose values, as psycopg loads them, are JSON as they are (bool, char, name, int8, int2,
#: int4, text, oid, bpchar, varchar): their columns skip :func:`json_value`.
_JSON_READY_TYPES = frozenset({16, 18, 19, 20, 21, 23, 25, 26, 1042, 1043})


def _row_encoder() -> Callable[[list[JsonValue]], str]:
    """Compact JSON of one row, built once. Every ``json.dumps`` call builds its C encoder afresh, which costs
    more than encoding a short row; CPython's ``c_make_encoder`` (what ``JSONEncoder.iterencode`` calls) is
    kept instead, with the pure ``JSONEncoder`` as the fallback where it is missing or differs."""
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is not None:
        try:
            fast = make(None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)
            if "".join(fast([1, "é", None, 1.5, True], 0)) == '[1,"é",null,1.5,true]':
                return lambda row: "".join(fast(row, 0))
        except TypeError:  # another signature: use the documented path
            pass
    return encoder.encode


_encode_row = _row_encoder()


@dataclass
class _Collector:
    """Keeps rows until a limit is reached; counts (but drops) the rest."""

    max_rows: int
    max_bytes: int
    rows: list[list[JsonValue]] = field(default_factory=list)
    rows_json: list[str] = field(default_factory=list)
    size: int = 0
    seen: int = 0
    truncated_by: Literal["max_rows", "max_result_bytes"] | None = None
    convert: list[int] | None = None
    """Positions of the columns whose values need :func:`json_value` (None: unknown, so all)."""

    def describe(self, type_oids: Sequence[int]) -> None:
        """The result's column types are known: convert only the values that need it (most are plain already)."""
        self.convert = [i for i, oid in enumerate(type_oids) if oid not in _JSON_READY_TYPES]

    def add_rows(self, raws: Sequence[Sequence[Any]]) -> bool:
        """Take a chunk of rows, as :meth:`add` would one by one (the same rows kept, the same truncation),
        column by column rather than row by row; False once the result is full."""
        self.seen += len(raws)
        if self.truncated_by is not None:
            return False
        room = self.max_rows - len(self.rows)
        rows = [list(raw) for raw in (raws[:room] if len(raws) > room else raws)]
        if self.convert is None:
            rows = [[json_value(v) for v in row] for row in rows]
        else:
            for i in self.convert:
                for row in rows:
                    row[i] = json_value(row[i])
        texts = [_encode_row(row) for row in rows]
        size, limit = self.size, self.max_bytes
        for kept, text in enumerate(texts):
            if size + len(text) > limit:
                self.truncated_by = "max_result_bytes"
                del rows[kept:], texts[kept:]
                break
            size += len(text)
        else:
            if len(raws) > room:
                self.truncated_by = "max_rows"
        self.rows.extend(rows)
        self.rows_json.extend(texts)
        self.size = size
        return self.truncated_by is None

    def add(self, raw: Sequence[Any]) -> bool:
        """Take one row; False once the result is full (the caller may stop fetching)."""
        self.seen += 1
        if self.truncated_by is not None:
            return False
        if len(self.rows) >= self.max_rows:
            self.truncated_by = "max_rows"
            return False
        if self.convert is None:
            row = [json_value(v) for v in raw]
        else:
            row = list(raw)
            for i in self.convert:
                row[i] = json_value(row[i])
        text = _encode_row(row)
        size = len(text)
        if self.size + size > self.max_bytes:
            self.truncated_by = "max_result_bytes"
            return False
        self.rows.append(row)
        self.rows_json.append(text)
        self.size += size
        return True


class TenantQueries:
    """Runs agent statements on tenant databases through a :class:`TenantPools`. One per process edge."""

    def __init__(self, pools: TenantPools, limits: QueryLimits) -> None:
        self.pools = pools
        self.limits = limits
        self._session = session_settings(limits)
        self._adapters = AdaptersMap(psycopg.adapters)
        self._adapters.register_loader("interval", TextLoader)  # Python's timedelta would turn months into days

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
        cancel_after = (self.limits.statement_timeout_s + self.limits.cancel_grace_s
                        if cancel_after_s is None else cancel_after_s)
        collector = _Collector(limit, self.limits.max_result_bytes)
        started = time.perf_counter()
        # A pooled connection may have died since its last use (the server restarted). If it fails before the
        # agent's statement was sent, nothing of the call ran: drop the pool's dead connections and try once
        # more on a fresh one. A write on the wire is never re-sent; a read is (its transaction was read only
        # and never committed) as long as none of its rows arrived.
        sent = _Progress()
        for attempt in (1, 2):
            try:
                # Last resort if even the cancel request goes unanswered: psycopg then closes the connection.
                async with asyncio.timeout(cancel_after + 10), self.pools.connection(uri, self._session) as conn:
                    # A timer, not a task per call: the cancel task exists only if the statement overruns.
                    watchdog = asyncio.get_running_loop().call_later(cancel_after, _start_cancel, conn)
                    try:
                        if read_only:
                            columns, command, affected = await self._read(conn, statement, args, collector, sent)
                        else:
                            columns, command, affected = await _write(
                                conn, statement, args, returns_rows=returns_rows, is_dml=is_dml,
                                collector=collector, progress=sent)
                    finally:
                        watchdog.cancel()
                break
            except psycopg.Error as exc:
                resendable = not sent.statement_sent or (read_only and collector.seen == 0)
                if attempt == 1 and resendable and is_connection_lost(exc):
                    log.info("a pooled tenant connection was dead (%s); retrying the call on a fresh one",
                             type(exc).__name__)
                    await self.pools.discard_broken(uri, self._session)
                    continue
                raise _failure(exc, uri, time.perf_counter() - started) from None
            except TimeoutError:
                raise StatementFailed(_timeout_message(time.perf_counter() - started), outcome="timeout",
                                      condition="57014 QueryCanceled") from None
        return StatementResult(columns=columns, rows=collector.rows, truncated=collector.truncated_by is not None,
                               truncated_by=collector.truncated_by, command=command, rows_affected=affected,
                               rows_json=collector.rows_json,
                               duration_ms=round((time.perf_counter() - started) * 1000, 2))

    async def _read(self, conn: AsyncConnection[Any], statement: str, args: list[str | None] | None,
                    collector: _Collector, progress: _Progress) -> tuple[list[ColumnInfo], str | None, None]:
        """A read and the session's reset in one round trip (:mod:`agentpg.access.pipeline`); the pool then
        skips its own reset. Columns come from the result's description, even when no row matched."""
        columns: list[ColumnInfo] = []

        def on_fields(fields: list[Field]) -> None:
            columns.extend(ColumnInfo(name=f.name, type=self._type_display(f.type_oid, f.type_mod)) for f in fields)
            collector.describe([f.type_oid for f in fields])

        progress.statement_sent = True
        outcome = await read_and_reset(conn, self._adapters, statement, args, chunk_rows=_CHUNK_ROWS,
                                       on_fields=on_fields, on_rows=collector.add_rows)
        if outcome.reset:
            self.pools.mark_reset(conn)
        return columns, None if columns else outcome.command, None

    def _type_display(self, oid: int, type_mod: int) -> str:
        """The type's name as psql shows it (``integer``, ``numeric(10,2)``, ``text[]``); its OID if unknown."""
        info = self._adapters.types.get(oid)
        return info.get_type_display(oid=oid, fmod=type_mod) if info is not None else str(oid)

    async def close(self) -> None:
        await self.pools.close()


@dataclass
class _Progress:
    statement_sent: bool = False


_CANCELS: set[asyncio.Task[None]] = set()


def _start_cancel(conn: AsyncConnection[Any]) -> None:
    task = asyncio.ensure_future(_cancel_now(conn))
    _CANCELS.add(task)
    task.add_done_callback(_CANCELS.discard)


async def _cancel_now(conn: AsyncConnection[Any]) -> None:
    try:
        await conn.cancel_safe(timeout=5.0)
    except Exception as exc:  # the outer asyncio.timeout still ends the call (psycopg then drops the connection)
        log.warning("could not cancel an overrunning agent statement: %s", type(exc).__name__)


def session_settings(limits: QueryLimits) -> SessionSettings:
    """What every connection of the agent path starts with: transactions read only unless opened
    ``READ WRITE``, and the statement timeout. Startup defaults, so the pool's ``DISCARD ALL`` restores them
    after any call, whatever the call ``SET``."""
    timeout_ms = max(1, int(limits.statement_timeout_s * 1000))
    return (("default_transaction_read_only", "on"), ("statement_timeout", f"{timeout_ms}ms"))


async def _write(conn: AsyncConnection[Any], statement: str, args: list[str | None] | None, *,
                 returns_rows: bool, is_dml: bool, collector: _Collector,
                 progress: _Progress) -> tuple[list[ColumnInfo], str | None, int | None]:
    """Run a write in its own transaction: ``BEGIN READ WRITE`` first (it also proves the pooled connection
    alive before the statement is sent), then the statement and ``COMMIT`` (together, when it returns no rows).
    The connection is idle again when this returns or raises; the pool resets the session afterwards, off
    the caller's time. RETURNING rows are streamed to completion; those past the limits are dropped."""
    await conn.execute("BEGIN READ WRITE")
    try:
        cur: AsyncRawCursor[tuple[Any, ...]] = AsyncRawCursor(conn)
        cur.adapters.register_loader("interval", TextLoader)  # Python's timedelta would turn months into days
        progress.statement_sent = True
        if not returns_rows:
            # Pipeline mode always uses the extended protocol, even without parameters; a failed statement
            # makes the server skip the COMMIT queued behind it.
            async with conn.pipeline():
                await cur.execute(statement, args)
                await conn.execute("COMMIT")
            if cur.description is not None:  # a statement we did not expect to return rows did
                collector.describe([c.type_code for c in cur.description])
                collector.add_rows(await cur.fetchall())
            return _columns(cur), cur.statusmessage, cur.rowcount if cur.rowcount >= 0 else None
        columns: list[ColumnInfo] = []
        no_result = False
        try:
            # stream() always uses the extended protocol (chunked-rows mode needs libpq 17).
            stream = cast(AsyncGenerator[tuple[Any, ...], None], cur.stream(statement, args, size=_CHUNK_ROWS))
            async with aclosing(stream) as rows:
                async for raw in rows:
                    if not columns:
                        columns = _columns(cur)
                        collector.describe([c.type_code for c in cur.description or ()])
                    collector.add(raw)
        except psycopg.ProgrammingError as exc:
            if exc.sqlstate is not None:
                raise
            no_result = True  # it ran fine but returned no rows (e.g. CALL of a procedure without OUT)
        await conn.execute("COMMIT")
        if no_result:
            return [], None, None
        return columns, None, collector.seen if is_dml else None
    except BaseException:
        if conn.pgconn.transaction_status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
            with contextlib.suppress(psycopg.Error):  # the connection is gone: the pool replaces it
                await conn.execute("ROLLBACK")
        raise


def _columns(cur: AsyncRawCursor[Any]) -> list[ColumnInfo]:
    return [ColumnInfo(name=c.name, type=c.type_display) for c in cur.description or ()]


def statement_shape(statement: str) -> tuple[bool, bool]:
    """(returns rows, is DML) of the (first) statement; remembered for statements up to 4 KiB (agents repeat
    theirs, and parsing costs more than the rest of a short call's own work)."""
    return _shape_cached(statement) if len(statement) <= 4096 else _shape(statement)


def _shape(statement: str) -> tuple[bool, bool]:
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


_shape_cached = functools.lru_cache(maxsize=4096)(_shape)


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
    if is_connection_lost(exc):  # no server answer, the connection broke, or the server is shutting down
        return ProviderUnavailable("the connection to the database was lost or could not be made (the server may "
                                   "be restarting); retry shortly. A write that was under way may or may not "
                                   "have been applied: check before repeating it")
    if state is None:  # a client-side error
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
