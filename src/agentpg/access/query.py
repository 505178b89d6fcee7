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
  timeout it likes, but not stop us sending a cancel request), and if it is still running
  ``terminate_grace_s`` later (a plpgsql handler can swallow a cancel), its **backend is terminated**
  (``pg_terminate_backend`` by pid, as agentpg's admin: :mod:`agentpg.access.guard`). The same happens when
  the call is abandoned any other way while its statement may run (the caller cancelled it, the result was
  too large): a connection whose backend may still run is never handed back to the pool as free; the call
  ends only once that backend is gone. Since every connection is ``DISCARD ALL``-ed
  before reuse, nothing a call changes in its session reaches the next call: ``RESET ALL`` returns to the
  startup settings above, not to the role's defaults;
* **streams** rows (libpq chunked-rows mode) and keeps at most ``max_rows`` of them and ``max_result_bytes``
  of their JSON form: a read that would return more is cancelled at once (``truncated``), a write that
  returns more rows runs to completion and its surplus rows are dropped as they arrive. Memory stays flat,
  whatever one value's size: at most :attr:`QueryLimits.read_bound_bytes` of a not yet complete chunk of
  rows is read from the server (:mod:`agentpg.access.pipeline`); past it the call ends with "result too
  large" (or, when rows were already kept, as a truncated result) and the backend is terminated. A first
  row that alone exceeds ``max_result_bytes`` is "result too large" too (no row could be returned).

Parameters are sent as untyped text (``$1``, ``$2`` … in the SQL; Postgres infers each type from context,
as with ``psql``'s ``\\bind``); ``%`` in the SQL is never interpreted.

Errors are :class:`StatementFailed` with the server's message (primary, detail, hint) in which agentpg's
internal role and database names are replaced by words; never a URI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, AsyncRawCursor, pq
from psycopg.adapt import AdaptersMap
from psycopg.types.string import TextLoader

from agentpg.access.failures import failure_of, oversize_row, timeout_message, too_large_message
from agentpg.access.guard import Reaper
from agentpg.access.pipeline import Field, ResultTooLarge, read_and_reset, stream_in_transaction
from agentpg.access.pools import SessionSettings, TenantPools, is_connection_lost
from agentpg.access.results import (
    ColumnInfo,
    JsonValue,
    RowCollector,
    StatementFailed,
    StatementResult,
    bind_params,
    columns_of,
)
from agentpg.access.shape import Shape, bounded_statement, shape_of
from agentpg.providers.limits import Setting, TenantLimits
from agentpg.settings import Settings

log = logging.getLogger(__name__)

Terminate = Callable[[str, int], Awaitable[bool]]
"""Ends the backend of pid (2nd argument) for the URI's role and database; True once it is gone."""

#: Rows asked from the server per network chunk while streaming.
_CHUNK_ROWS = 100


@dataclass(frozen=True)
class QueryLimits:
    """Server-side limits of one agent call. ``cancel_grace_s`` is how long past ``statement_timeout_s``
    agentpg waits before it cancels the statement itself; ``terminate_grace_s`` how long after that cancel it
    terminates the statement's backend if the statement still runs."""

    max_rows: int = 500
    max_result_bytes: int = 1_000_000
    statement_timeout_s: float = 30.0
    cancel_grace_s: float = 2.0
    terminate_grace_s: float = 2.0
    tenant_settings: tuple[Setting, ...] = TenantLimits().session_settings()
    """The per-role limits agentpg's connections start with (:meth:`TenantLimits.session_settings`)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> QueryLimits:
        """The agent-call limits (``AGENTPG_MCP_MAX_ROWS``, ``…_MAX_RESULT_BYTES``, ``…_STATEMENT_TIMEOUT_S``)
        and the tenant limits (``AGENTPG_TENANT_*``) configured in ``settings``."""
        return cls(max_rows=settings.mcp_max_rows, max_result_bytes=settings.mcp_max_result_bytes,
                   statement_timeout_s=settings.mcp_statement_timeout_s,
                   tenant_settings=TenantLimits.from_settings(settings).session_settings())

    @property
    def row_bound_bytes(self) -> int:
        """Largest row (``pg_column_size`` of it) the server may send for a query or DML ``RETURNING``: twice the
        byte cap plus 64 KiB (a row over the cap is never kept; the margin is for rows whose JSON is larger than
        their size in Postgres)."""
        return 2 * self.max_result_bytes + (64 << 10)

    @property
    def read_bound_bytes(self) -> int:
        """Most bytes of one not yet complete chunk of rows (or one row) serve reads from the server: two row
        bounds, at least 4 MiB."""
        return max(2 * self.row_bound_bytes, 4 << 20)


class TenantQueries:
    """Runs agent statements on tenant databases through a :class:`TenantPools`. One per process edge."""

    def __init__(self, pools: TenantPools, limits: QueryLimits, *, terminate: Terminate | None = None) -> None:
        """``terminate`` ends a backend agentpg gave up on (the runtime's :class:`Reaper`, which knows the admin
        of the servers agentpg manages); by default, as the tenant's own role."""
        self.pools = pools
        self.limits = limits
        self._terminate = terminate or Reaper().terminate
        self._background: set[asyncio.Task[Any]] = set()
        """Give-up and termination tasks of this edge's calls, held until done."""
        self._session = session_settings(limits)
        self._adapters = AdaptersMap(psycopg.adapters)
        self._adapters.register_loader("interval", TextLoader)  # Python's timedelta would turn months into days

    async def run(self, uri: str, statement: str, params: Sequence[JsonValue] | None = None, *,
                  read_only: bool, max_rows: int | None = None,
                  cancel_after_s: float | None = None, user: str | None = None,
                  shape: Shape | None = None) -> StatementResult:
        """Run one statement on ``uri`` within the limits; see the module docstring for the guarantees.

        ``max_rows`` may lower (never raise) the configured maximum. How the statement is fetched depends on
        its shape (:class:`agentpg.access.shape.Shape`: the classification's, else parsed here); a wrong guess
        (unparseable text) only costs the row count or the early stop. ``cancel_after_s`` overrides when the
        outside cancel fires (tests). ``user`` is whose call it is, for the connection governor's fair share
        (default: the database counts as its own user).
        Raises :class:`StatementFailed`, ``ServerBusy``, ``PoolExhausted`` or ``ProviderUnavailable``.
        """
        limit = self.limits.max_rows if max_rows is None else max(0, min(max_rows, self.limits.max_rows))
        shape = shape or shape_of(statement)
        returns_rows, is_dml = shape.returns_rows, shape.is_dml
        args = bind_params(params)
        bounded = bounded_statement(statement, self.limits.row_bound_bytes, shape) if returns_rows else None
        text = statement if bounded is None else bounded.text
        cancel_after = (self.limits.statement_timeout_s + self.limits.cancel_grace_s
                        if cancel_after_s is None else cancel_after_s)
        collector = RowCollector(limit, self.limits.max_result_bytes)
        started = time.perf_counter()
        # A pooled connection may have died since its last use (the server restarted). If it fails before the
        # agent's statement was sent, nothing of the call ran: drop the pool's dead connections and try once
        # more on a fresh one. A write on the wire is never re-sent; a read is (its transaction was read only
        # and never committed) as long as none of its rows arrived.
        sent = _Progress()
        watch: _Watch | None = None
        chunk = _CHUNK_ROWS
        for attempt in (1, 2, 3):
            try:
                # Last resort if even the termination fails: the call ends (its connection closed) regardless.
                async with asyncio.timeout(cancel_after + self.limits.terminate_grace_s + 15), \
                        self.pools.connection(uri, self._session, user=user) as conn:
                    # A timer, not a task per call: the give-up task exists only if the statement overruns.
                    watch = _Watch(conn, uri, self._terminate, self.limits.terminate_grace_s, self._background)
                    watchdog = asyncio.get_running_loop().call_later(cancel_after, watch.give_up)
                    try:
                        if read_only:
                            columns, command, affected = await self._read(conn, text, args, collector, sent,
                                                                          chunk_rows=chunk, look_ahead=not bounded)
                        else:
                            columns, command, affected = await self._write(
                                conn, text, args, returns_rows=returns_rows, is_dml=is_dml,
                                collector=collector, progress=sent, look_ahead=not bounded)
                    except BaseException as exc:
                        # Before the connection's pool slot is freed: its backend must not be left running.
                        await watch.settle(exc, statement_sent=sent.statement_sent)
                        raise
                    finally:
                        watchdog.cancel()
                        watch.stop()
                break
            except ResultTooLarge as exc:
                if read_only and bounded is not None and chunk > 1 and collector.seen == 0:
                    # A first chunk of rows over the read bound, none complete: the rows are wide but each within
                    # the row bound. Read again a row at a time (reads are read only: re-running is safe).
                    log.info("a read's first chunk of rows was over the read bound; reading it row by row")
                    chunk, collector, sent = 1, RowCollector(limit, self.limits.max_result_bytes), _Progress()
                    continue
                return self._too_large(collector, read_only=read_only, read_bytes=exc.pending, started=started)
            except psycopg.Error as exc:
                gave_up = watch is not None and watch.gave_up
                if gave_up:  # cancelled, then terminated by us: the statement overran
                    raise StatementFailed(timeout_message(time.perf_counter() - started), outcome="timeout",
                                          condition="57014 QueryCanceled") from None
                if oversize_row(exc):  # the server refused to send a row over the read bound
                    return self._too_large(collector, read_only=read_only, read_bytes=None, started=started)
                resendable = not sent.statement_sent or (read_only and collector.seen == 0)
                if attempt == 1 and resendable and is_connection_lost(exc):
                    log.info("a pooled tenant connection was dead (%s); retrying the call on a fresh one",
                             type(exc).__name__)
                    await self.pools.discard_broken(uri, self._session)
                    continue
                raise failure_of(exc, uri, time.perf_counter() - started,
                               offset=bounded.offset if bounded is not None else 0, length=len(statement)) from None
            except TimeoutError:
                raise StatementFailed(timeout_message(time.perf_counter() - started), outcome="timeout",
                                      condition="57014 QueryCanceled") from None
        if read_only and collector.truncated_by == "max_result_bytes" and not collector.rows:
            return self._too_large(collector, read_only=True, read_bytes=None, started=started)  # no row fits
        return StatementResult(columns=columns, rows=collector.rows, truncated=collector.truncated_by is not None,
                               truncated_by=collector.truncated_by, command=command, rows_affected=affected,
                               rows_json=collector.rows_json,
                               duration_ms=round((time.perf_counter() - started) * 1000, 2))

    def _too_large(self, collector: RowCollector, *, read_only: bool, read_bytes: int | None,
                   started: float) -> StatementResult:
        """A row too large to return arrived (or was refused by the server). A read that already kept rows
        returns them, truncated; otherwise the call fails with "result too large" (a write was rolled back)."""
        if read_only and collector.rows:
            return StatementResult(columns=list(collector.columns), rows=collector.rows, truncated=True,
                                   truncated_by="max_result_bytes", rows_json=collector.rows_json,
                                   duration_ms=round((time.perf_counter() - started) * 1000, 2))
        if read_only:
            raise StatementFailed(too_large_message(self.limits.max_result_bytes, read_bytes), outcome="error",
                                  condition="result_too_large")
        raise StatementFailed(
            f"The result is too large: a row it returns is over the {self.limits.row_bound_bytes:,}-byte limit "
            "of one row, so the statement was rolled back (nothing was written). Return fewer or narrower "
            "columns (e.g. RETURNING id, or left(col, 1000)).", outcome="error", condition="result_too_large")

    async def _read(self, conn: AsyncConnection[Any], statement: str, args: list[str | None] | None,
                    collector: RowCollector, progress: _Progress, *, chunk_rows: int = _CHUNK_ROWS,
                    look_ahead: bool = False) -> tuple[list[ColumnInfo], str | None, None]:
        """A read and the session's reset in one round trip (:mod:`agentpg.access.pipeline`); the pool then
        skips its own reset. Columns come from the result's description, even when no row matched."""
        progress.statement_sent = True
        outcome = await read_and_reset(conn, self._adapters, statement, args, chunk_rows=chunk_rows,
                                       on_fields=functools.partial(self._on_fields, collector),
                                       on_rows=collector.add_rows, max_pending_bytes=self.limits.read_bound_bytes,
                                       look_ahead=look_ahead)
        if outcome.reset:
            self.pools.mark_reset(conn)
        columns = collector.columns
        return columns, None if columns else outcome.command, None

    def _on_fields(self, collector: RowCollector, fields: list[Field]) -> None:
        collector.columns.extend(ColumnInfo(name=f.name, type=self._type_display(f.type_oid, f.type_mod))
                                 for f in fields)
        collector.describe([f.type_oid for f in fields])

    async def _write(self, conn: AsyncConnection[Any], statement: str, args: list[str | None] | None, *,
                     returns_rows: bool, is_dml: bool, collector: RowCollector, progress: _Progress,
                     look_ahead: bool = False) -> tuple[list[ColumnInfo], str | None, int | None]:
        """Run a write in its own transaction: ``BEGIN READ WRITE`` first (it also proves the pooled connection
        alive before the statement is sent), then the statement and ``COMMIT`` (together, when it returns no
        rows). The connection is idle again when this returns or raises; the pool resets the session afterwards,
        off the caller's time. RETURNING rows are streamed to completion (within the read bound, as a read's);
        those past the limits are dropped."""
        await conn.execute("BEGIN READ WRITE")
        try:
            progress.statement_sent = True
            if not returns_rows:
                cur: AsyncRawCursor[tuple[Any, ...]] = AsyncRawCursor(conn)
                cur.adapters.register_loader("interval", TextLoader)  # timedelta would turn months into days
                # Pipeline mode always uses the extended protocol, even without parameters; a failed statement
                # makes the server skip the COMMIT queued behind it.
                async with conn.pipeline():
                    await cur.execute(statement, args)
                    await conn.execute("COMMIT")
                if cur.description is not None:  # a statement we did not expect to return rows did
                    collector.describe([c.type_code for c in cur.description])
                    collector.add_rows(await cur.fetchall())
                return columns_of(cur), cur.statusmessage, cur.rowcount if cur.rowcount >= 0 else None
            # Chunks small enough that rows within the row bound never make one over the read bound: a
            # write cannot be re-run a row at a time as a read can.
            outcome = await stream_in_transaction(
                conn, self._adapters, statement, args,
                chunk_rows=max(1, min(_CHUNK_ROWS, self.limits.read_bound_bytes // self.limits.row_bound_bytes)),
                on_fields=functools.partial(self._on_fields, collector), on_rows=collector.add_rows,
                max_pending_bytes=self.limits.read_bound_bytes, look_ahead=look_ahead)
            await conn.execute("COMMIT")
            if not outcome.fields:  # it ran fine but returned no rows (e.g. CALL of a procedure without OUT)
                return [], None, None
            return collector.columns, None, collector.seen if is_dml else None
        except BaseException:
            if conn.pgconn.transaction_status in (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR):
                with contextlib.suppress(psycopg.Error):  # the connection is gone: the pool replaces it
                    await conn.execute("ROLLBACK")
            raise

    def _type_display(self, oid: int, type_mod: int) -> str:
        """The type's name as psql shows it (``integer``, ``numeric(10,2)``, ``text[]``); its OID if unknown."""
        info = self._adapters.types.get(oid)
        return info.get_type_display(oid=oid, fmod=type_mod) if info is not None else str(oid)

    async def close(self) -> None:
        await self.pools.close()


@dataclass
class _Progress:
    statement_sent: bool = False


class _Watch:
    """One call's statement, watched: at the deadline (:meth:`give_up`, a timer) it is cancelled from outside;
    if it still runs ``grace_s`` later, its backend is terminated by pid (:data:`Terminate`). :meth:`settle`
    makes sure, before a failed call frees its connection, that no backend is left running for it."""

    def __init__(self, conn: AsyncConnection[Any], uri: str, terminate: Terminate, grace_s: float,
                 background: set[asyncio.Task[Any]]) -> None:
        self._conn = conn
        self._background = background
        self._uri = uri
        self._pid = conn.info.backend_pid
        self._terminate_backend = terminate
        self._grace_s = grace_s
        self._task: asyncio.Task[None] | None = None
        self._terminating: asyncio.Task[bool] | None = None
        self.gave_up = False
        """The outside cancel was sent: the statement overran."""

    def give_up(self) -> None:
        self.gave_up = True
        self._task = asyncio.ensure_future(self._cancel_then_terminate())
        self._hold(self._task)

    async def _cancel_then_terminate(self) -> None:
        started = time.monotonic()
        try:
            await self._conn.cancel_safe(timeout=5.0)
        except Exception as exc:  # the termination below still ends it
            log.warning("could not cancel an overrunning agent statement: %s", type(exc).__name__)
        await asyncio.sleep(max(0.0, self._grace_s - (time.monotonic() - started)))
        log.warning("an agent statement outlived its cancel by %.1f s: terminating its backend", self._grace_s)
        await self._terminate()

    def _terminate(self) -> asyncio.Task[bool]:
        """Terminate the backend (once), in a task of its own: a cancelled caller does not stop it."""
        if self._terminating is None:
            self._terminating = asyncio.ensure_future(self._terminate_backend(self._uri, self._pid))
            self._hold(self._terminating)
        return self._terminating

    def _hold(self, task: asyncio.Task[Any]) -> None:
        """Keep ``task`` referenced until done (the event loop keeps only weak references to tasks)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _healthy(self) -> bool:
        """The connection is open, idle, outside any transaction or pipeline: its statement is over."""
        pgconn = self._conn.pgconn
        return (not self._conn.closed and pgconn.status == pq.ConnStatus.OK
                and pgconn.transaction_status == pq.TransactionStatus.IDLE
                and pgconn.pipeline_status == pq.PipelineStatus.OFF)

    async def settle(self, exc: BaseException, *, statement_sent: bool) -> None:
        """The call is failing with ``exc``. If its statement may still run (the call was abandoned, or gave up
        on it), terminate its backend and wait (bounded) until it is gone; never raises."""
        if self._terminating is None:
            if not statement_sent or (self._healthy() and not isinstance(exc, ResultTooLarge)):
                return  # the statement ended (it failed, or the cancel worked): the connection is fine
            if (isinstance(exc, psycopg.Error) and not isinstance(exc, ResultTooLarge) and not self.gave_up
                    and is_connection_lost(exc)):
                return  # the server ended the connection itself (a restart): nothing of it runs
            if self._task is not None:
                self._task.cancel()  # no need to wait out the grace: the call is over
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._terminate()), 15)
        with contextlib.suppress(Exception):
            await self._conn.close()  # never handed out again: the pool discards it

    def stop(self) -> None:
        """The call is over: a give-up still waiting out its grace has nothing left to do."""
        if self._task is not None and not self._task.done() and self._terminating is None:
            self._task.cancel()


def session_settings(limits: QueryLimits) -> SessionSettings:
    """What every connection of the agent path starts with: transactions read only unless opened
    ``READ WRITE``, and the statement timeout. Startup defaults, so the pool's ``DISCARD ALL`` restores them
    after any call, whatever the call ``SET``."""
    timeout_ms = max(1, int(limits.statement_timeout_s * 1000))
    return (("default_transaction_read_only", "on"), ("statement_timeout", f"{timeout_ms}ms"),
            *limits.tenant_settings)
