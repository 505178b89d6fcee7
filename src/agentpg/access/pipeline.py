"""An agent's read and the session reset after it, in one round trip (libpq pipeline mode).

psycopg streams a result only outside pipeline mode, so a streamed read plus the pool's ``DISCARD ALL`` cost
two round trips, and the second one as much CPU as the first. Here both go out in one write, each after its
own ``Sync`` (so each runs in its own implicit transaction and ``DISCARD ALL`` is allowed), and their answers
come back together::

    Parse/Bind/Execute <statement>  (chunked rows mode)   Sync   Parse/Bind/Execute DISCARD ALL   Sync

This uses only psycopg's public libpq layer (:mod:`psycopg.pq`) and its :class:`~psycopg.adapt.Transformer`
to load each chunk of rows at once. The contract, as :func:`read_and_reset` sees it:

- The statement runs over the extended protocol (one statement only, parameters as untyped text), in the
  implicit transaction the session's defaults make read only; rows arrive in chunks of ``chunk_rows``.
- ``on_rows`` takes each chunk; when it returns False the statement is cancelled server-side and the rest
  of its rows are dropped as they arrive (the cancel's own error is not reported).
- The connection's session is ``DISCARD ALL``-ed in the same round trip, whatever the statement did or
  however it failed; ``True`` in the outcome's ``reset`` says it was (else the pool resets it as usual).
- A failure of the statement is raised as the psycopg error for its SQLSTATE, after the pipeline is drained
  (the connection stays usable). Anything that leaves the pipeline unfinished (the connection breaking, the
  task being cancelled) cancels the statement, closes the connection (the pool replaces it) and re-raises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, abc, pq
from psycopg.adapt import AdaptersMap, Transformer
from psycopg.pq.abc import PGconn, PGresult

_STATUS = pq.ExecStatus
_DISCARD_ALL = b"DISCARD ALL"


@dataclass(frozen=True)
class Field:
    """One result column: its name, type OID and type modifier."""

    name: str
    type_oid: int
    type_mod: int


@dataclass
class ReadOutcome:
    fields: list[Field]
    """The result's columns (known even when no row matched); empty for a statement without rows."""
    command: str | None
    """The command tag (e.g. ``SELECT 3``, ``SHOW``)."""
    reset: bool
    """Whether the session was ``DISCARD ALL``-ed in this round trip."""


class _LoadContext:
    """What a :class:`Transformer` reads: the adapters (agentpg's own map) and the connection (its encoding)."""

    def __init__(self, adapters: AdaptersMap, connection: AsyncConnection[Any]) -> None:
        self._adapters = adapters
        self._connection = connection

    @property
    def adapters(self) -> AdaptersMap:
        return self._adapters

    @property
    def connection(self) -> AsyncConnection[Any]:
        return self._connection


async def read_and_reset(conn: AsyncConnection[Any], adapters: AdaptersMap, statement: str,
                         args: Sequence[str | None] | None, *, chunk_rows: int,
                         on_fields: Callable[[list[Field]], None],
                         on_rows: Callable[[list[tuple[Any, ...]]], bool]) -> ReadOutcome:
    """Run ``statement`` then ``DISCARD ALL`` on ``conn`` (idle, autocommit) in one pipeline; see the module
    docstring. ``on_fields`` is called once with the columns before the first chunk of rows."""
    encoding = conn.info.encoding
    query = statement.encode(encoding)
    params = None if args is None else [None if a is None else a.encode(encoding) for a in args]
    if b"\x00" in query or any(p is not None and b"\x00" in p for p in params or ()):
        raise psycopg.DataError("the statement or a parameter contains a NUL character (\\0), which PostgreSQL "
                                "text cannot hold")
    async with conn.lock:  # what psycopg's own cursors hold while they use the connection
        try:
            outcome, failure = await _exchange(conn, conn.pgconn, Transformer(_LoadContext(adapters, conn)),
                                               query, params, chunk_rows, on_fields, on_rows)
        except BaseException:
            # The pipeline is in an unknown state: nothing may use this connection again.
            await _abandon(conn)
            raise
    if failure is not None:  # the statement failed; the pipeline was drained and the connection is fine
        raise failure
    return outcome


async def _exchange(conn: AsyncConnection[Any], pgconn: PGconn, tx: abc.Transformer, query: bytes,
                    params: list[bytes | None] | None, chunk_rows: int,
                    on_fields: Callable[[list[Field]], None],
                    on_rows: Callable[[list[tuple[Any, ...]]], bool]) -> tuple[ReadOutcome, psycopg.Error | None]:
    pgconn.enter_pipeline_mode()
    pgconn.send_query_params(query, params)
    pgconn.set_chunked_rows_mode(chunk_rows)
    pgconn.pipeline_sync()
    pgconn.send_query_params(_DISCARD_ALL, None)
    pgconn.pipeline_sync()
    await _flush(pgconn)

    fields: list[Field] | None = None
    command: str | None = None
    failure: psycopg.Error | None = None
    stopping = False  # we cancelled the statement ourselves: its rows and its cancel error are dropped
    syncs = 0
    reset = False
    encoding = conn.info.encoding
    while syncs < 2:
        result = await _next_result(pgconn)
        if result is None:  # the end of one query's results
            continue
        status = result.status
        if status == _STATUS.PIPELINE_SYNC:
            syncs += 1
        elif syncs == 1:  # DISCARD ALL's answer
            reset = status == _STATUS.COMMAND_OK
        elif status in (_STATUS.TUPLES_CHUNK, _STATUS.SINGLE_TUPLE, _STATUS.TUPLES_OK):
            if fields is None:
                fields = _fields(result, encoding)
                on_fields(fields)
            if status == _STATUS.TUPLES_OK:
                command = _command(result, encoding)
            if result.ntuples and not stopping:
                tx.set_pgresult(result)
                if not on_rows(tx.load_rows(0, result.ntuples, tuple)):
                    stopping = True
                    await conn.cancel_safe(timeout=5.0)
        elif status in (_STATUS.COMMAND_OK, _STATUS.EMPTY_QUERY):
            command = _command(result, encoding) or None
        elif status == _STATUS.FATAL_ERROR:
            error = psycopg.errors.error_from_result(result, encoding=encoding)
            if not (stopping and isinstance(error, psycopg.errors.QueryCanceled)):
                failure = error
        elif status == _STATUS.PIPELINE_ABORTED:
            pass  # skipped because the statement before it failed: that failure is what counts
        else:  # COPY and the like: the pipeline cannot go on
            raise psycopg.NotSupportedError(f"a statement returning {_STATUS(status).name} is not supported here")
    pgconn.exit_pipeline_mode()
    return ReadOutcome(fields=fields or [], command=command, reset=reset), failure


def _fields(result: PGresult, encoding: str) -> list[Field]:
    out = []
    for i in range(result.nfields):
        name = result.fname(i)
        out.append(Field(name=name.decode(encoding) if name else f"column_{i + 1}", type_oid=result.ftype(i),
                         type_mod=result.fmod(i)))
    return out


def _command(result: PGresult, encoding: str) -> str | None:
    tag = result.command_status
    return tag.decode(encoding) if tag else None


async def _next_result(pgconn: PGconn) -> PGresult | None:
    """The next result, waiting for the socket only when libpq has none complete."""
    while pgconn.is_busy():
        await _ready(pgconn.socket, write=False)
        pgconn.consume_input()
    return pgconn.get_result()


async def _flush(pgconn: PGconn) -> None:
    """Send what libpq has queued (a long statement may not fit the socket buffer at once)."""
    while pgconn.flush():
        await _ready(pgconn.socket, write=True)


async def _ready(fd: int, *, write: bool) -> None:
    """Until ``fd`` is readable (or writable)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    if write:
        loop.add_writer(fd, _set, ready)
    else:
        loop.add_reader(fd, _set, ready)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _set(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _abandon(conn: AsyncConnection[Any]) -> None:
    """Stop whatever the server is running for ``conn`` and close it (bounded; never raises)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.shield(conn.cancel_safe(timeout=5.0)), 6.0)
    with contextlib.suppress(Exception):
        await conn.close()
