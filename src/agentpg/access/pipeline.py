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
- **Reading is bounded** (``max_pending_bytes``): libpq keeps a message whole in memory before it hands over
  a row, so one huge value (``SELECT repeat('x', 2e8)``) would cost its full size, several times over, before
  any byte cap could look at it. After every read from the socket, the bytes libpq has taken in since the
  last complete result (a chunk of rows) are counted (the kernel's TCP byte counter minus what is still
  unread); past the bound, :class:`ResultTooLarge` is raised and the connection abandoned as above. What
  libpq holds for one call is thus at most the bound plus one socket read — and one read is bounded only by
  libpq's buffer, which it enlarges to a message's announced length. So the caller bounds rows at the server
  where it can (:func:`agentpg.access.shape.bounded_statement`); where it cannot, ``look_ahead`` reads the
  headers of the messages waiting in the socket (``MSG_PEEK``, plain TCP only) before libpq takes them, and a
  row announcing more than the bound ends the read before libpq has read any of it (a header that arrives
  during libpq's read is missed: then only the bound above applies).

:func:`stream_in_transaction` is the same exchange for a statement inside a transaction the caller opened
(a write's ``RETURNING`` rows): no reset, and the statement runs to completion whatever ``on_rows`` says.
:func:`batch_and_reset` sends several statements in one implicit transaction, then the reset, still in one
round trip (the platform's REST rows page: settings, page, description and count).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import sys
import termios
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, abc, pq
from psycopg.adapt import AdaptersMap, Transformer
from psycopg.pq.abc import PGconn, PGresult

_STATUS = pq.ExecStatus
_DISCARD_ALL = b"DISCARD ALL"


class ResultTooLarge(psycopg.InterfaceError):
    """More than ``max_pending_bytes`` of one result chunk (or one row) arrived before it was complete: the
    read was abandoned (the connection is closed; the caller terminates its backend)."""

    def __init__(self, pending: int, limit: int) -> None:
        super().__init__(f"more than {limit} bytes of the result were pending ({pending} read)")
        self.pending = pending
        self.limit = limit


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
                         on_rows: Callable[[list[tuple[Any, ...]]], bool],
                         max_pending_bytes: int | None = None, look_ahead: bool = False) -> ReadOutcome:
    """Run ``statement`` then ``DISCARD ALL`` on ``conn`` (idle, autocommit) in one pipeline; see the module
    docstring. ``on_fields`` is called once with the columns before the first chunk of rows. ``look_ahead``:
    also read the headers of waiting messages before libpq takes them (for statements whose rows the server
    does not bound)."""
    return await _run(conn, adapters, statement, args, chunk_rows=chunk_rows, on_fields=on_fields,
                      on_rows=on_rows, max_pending_bytes=max_pending_bytes, reset=True, look_ahead=look_ahead)


async def stream_in_transaction(conn: AsyncConnection[Any], adapters: AdaptersMap, statement: str,
                                args: Sequence[str | None] | None, *, chunk_rows: int,
                                on_fields: Callable[[list[Field]], None],
                                on_rows: Callable[[list[tuple[Any, ...]]], bool],
                                max_pending_bytes: int | None = None, look_ahead: bool = False) -> ReadOutcome:
    """Run ``statement`` on ``conn``, inside the transaction block the caller opened, in one pipeline ending in
    a ``Sync`` (which leaves the block open); every row is read (``on_rows`` returning False only means the
    rows are dropped). A failure is raised after the pipeline is drained: the block is then failed, and the
    caller rolls it back."""
    return await _run(conn, adapters, statement, args, chunk_rows=chunk_rows, on_fields=on_fields,
                      on_rows=on_rows, max_pending_bytes=max_pending_bytes, reset=False, look_ahead=look_ahead)


async def _run(conn: AsyncConnection[Any], adapters: AdaptersMap, statement: str,
               args: Sequence[str | None] | None, *, chunk_rows: int, on_fields: Callable[[list[Field]], None],
               on_rows: Callable[[list[tuple[Any, ...]]], bool], max_pending_bytes: int | None,
               reset: bool, look_ahead: bool) -> ReadOutcome:
    encoding = conn.info.encoding
    query = statement.encode(encoding)
    params = None if args is None else [None if a is None else a.encode(encoding) for a in args]
    if b"\x00" in query or any(p is not None and b"\x00" in p for p in params or ()):
        raise psycopg.DataError("the statement or a parameter contains a NUL character (\\0), which PostgreSQL "
                                "text cannot hold")
    async with conn.lock:  # what psycopg's own cursors hold while they use the connection
        pgconn = conn.pgconn
        # Headers can be read off the socket only when its bytes are the protocol's own (not encrypted).
        frames = look_ahead and not pgconn.ssl_in_use and not pgconn.used_gssapi
        intake = _Intake.of(pgconn.socket, max_pending_bytes, frames=frames)
        try:
            outcome, failure = await _exchange(conn, conn.pgconn, Transformer(_LoadContext(adapters, conn)),
                                               query, params, chunk_rows, on_fields, on_rows, reset=reset,
                                               intake=intake)
        except BaseException:
            # The pipeline is in an unknown state: nothing may use this connection again.
            await _abandon(conn)
            raise
        finally:
            if intake is not None:
                intake.close()
    if failure is not None:  # the statement failed; the pipeline was drained and the connection is fine
        raise failure
    return outcome


async def _exchange(conn: AsyncConnection[Any], pgconn: PGconn, tx: abc.Transformer, query: bytes,
                    params: list[bytes | None] | None, chunk_rows: int,
                    on_fields: Callable[[list[Field]], None],
                    on_rows: Callable[[list[tuple[Any, ...]]], bool], *, reset: bool,
                    intake: _Intake | None) -> tuple[ReadOutcome, psycopg.Error | None]:
    pgconn.enter_pipeline_mode()
    pgconn.send_query_params(query, params)
    pgconn.set_chunked_rows_mode(chunk_rows)
    pgconn.pipeline_sync()
    if reset:
        pgconn.send_query_params(_DISCARD_ALL, None)
        pgconn.pipeline_sync()
    await _flush(pgconn)

    fields: list[Field] | None = None
    command: str | None = None
    failure: psycopg.Error | None = None
    stopping = False  # we cancelled the statement ourselves: its rows and its cancel error are dropped
    dropping = False  # a write's rows past the limits: read and dropped, the statement runs on
    syncs = 0
    was_reset = False
    encoding = conn.info.encoding
    while syncs < (2 if reset else 1):
        result = await _next_result(pgconn, intake)
        if result is None:  # the end of one query's results
            continue
        if intake is not None:
            intake.mark()
        status = result.status
        if status == _STATUS.PIPELINE_SYNC:
            syncs += 1
        elif syncs == 1:  # DISCARD ALL's answer
            was_reset = status == _STATUS.COMMAND_OK
        elif status in (_STATUS.TUPLES_CHUNK, _STATUS.SINGLE_TUPLE, _STATUS.TUPLES_OK):
            if fields is None:
                fields = _fields(result, encoding)
                on_fields(fields)
            if status == _STATUS.TUPLES_OK:
                command = _command(result, encoding)
            if result.ntuples and not stopping:
                tx.set_pgresult(result)
                rows = tx.load_rows(0, result.ntuples, tuple)
                if dropping:  # still counted (on_rows counts what it drops), never kept
                    on_rows(rows)
                elif not on_rows(rows):
                    if reset:
                        stopping = True
                        await conn.cancel_safe(timeout=5.0)
                    else:
                        dropping = True
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
    return ReadOutcome(fields=fields or [], command=command, reset=was_reset), failure


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


async def _next_result(pgconn: PGconn, intake: _Intake | None = None) -> PGresult | None:
    """The next result, waiting for the socket only when libpq has none complete."""
    while pgconn.is_busy():
        await _ready(pgconn.socket, write=False)
        if intake is not None:
            intake.before_read()
        pgconn.consume_input()
        if intake is not None:
            intake.after_read()
    return pgconn.get_result()


#: Type bytes of the messages a server sends (protocol 3); a DataRow is ``D``.
_BACKEND_MESSAGES = frozenset(b"123ACDEGHIKNRSTVWZcdnstv")
_DATA_ROW = ord("D")
#: Most bytes of the socket's queue peeked at once to read message headers.
_PEEK_MAX = 64 << 10
#: ``struct tcp_info``'s ``tcpi_bytes_received`` (Linux 4.1+): a u64 at this offset.
_TCPI_BYTES_RECEIVED = 128
_TCP_INFO_SIZE = 136


class _Intake:
    """How many bytes libpq has taken from the socket since the last complete result, and the bound on it.

    Exact on Linux TCP sockets: the kernel's count of bytes received minus those not yet read. Elsewhere (a
    Unix socket, another OS), the bytes waiting before each read are added up (a lower bound: data arriving
    during libpq's read is missed)."""

    def __init__(self, sock: socket.socket, limit: int, *, frames: bool = False) -> None:
        self._sock = sock
        self._limit = limit
        self._tcp = sys.platform == "linux"
        self._taken = 0
        if self._tcp:
            self._taken = self._consumed()
        self._mark = self._taken
        self._next: int | None = self._taken if frames and self._tcp else None
        """Stream offset of the next message header not yet looked at (None: not looking, or lost track)."""

    @classmethod
    def of(cls, fd: int, limit: int | None, *, frames: bool = False) -> _Intake | None:
        if limit is None:
            return None
        try:
            # A socket object over libpq's own fd, detached (never closed) in :meth:`close`. The family given
            # spares the syscalls that would detect it; TCP_INFO failing tells a non-TCP socket apart.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
        except (OSError, ValueError):
            return None
        try:
            return cls(sock, limit, frames=frames)
        except BaseException:
            sock.detach()  # never let the object close libpq's socket
            raise

    def _waiting(self) -> int:
        buf = fcntl.ioctl(self._sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])

    def _consumed(self) -> int:
        """Bytes read from the socket so far (0, and the fallback from then on, where that cannot be known)."""
        try:
            info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            if len(info) >= _TCPI_BYTES_RECEIVED + 8:
                return int(struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0]) - self._waiting()
        except OSError:
            pass
        self._tcp = False
        return self._taken

    def before_read(self) -> None:
        if not self._tcp:
            with contextlib.suppress(OSError):
                self._taken += self._waiting()
        elif self._next is not None:
            self._look_ahead()

    def _look_ahead(self) -> None:
        """Read the headers of the messages waiting in the socket (peeking, before libpq takes them): a row
        message announcing more than the bound ends the read before libpq has read (or allocated) any of it.
        Once libpq has read past a header not looked at (it arrived during libpq's read), stop looking."""
        nxt = self._next
        if nxt is None:
            return
        try:
            waiting = self._waiting()
            head = self._consumed()
            offset = nxt - head
            if offset < 0 or not self._tcp:
                self._next = None
                return
            size = min(waiting, _PEEK_MAX)
            if offset + 5 > size:
                return
            data = self._sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            self._next = None
            return
        while offset + 5 <= len(data):
            kind, length = data[offset], int.from_bytes(data[offset + 1:offset + 5], "big")
            if kind not in _BACKEND_MESSAGES or length < 4:  # not a message boundary after all
                self._next = None
                return
            if kind == _DATA_ROW and length > self._limit:
                raise ResultTooLarge(length, self._limit)
            offset += 1 + length
        self._next = head + offset

    def after_read(self) -> None:
        if self._tcp:
            self._taken = max(self._taken, self._consumed())
        pending = self._taken - self._mark
        if pending > self._limit:
            raise ResultTooLarge(pending, self._limit)

    def mark(self) -> None:
        """A complete result was handed over: what libpq holds from here on is the next one (nothing was read
        since :meth:`after_read`, so its count stands)."""
        self._mark = self._taken

    def close(self) -> None:
        self._sock.detach()  # the fd is libpq's: leave it open


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


@dataclass
class BatchResult:
    """One statement's answer in :func:`batch_and_reset`: its columns and its rows (loaded)."""

    fields: list[Field]
    rows: list[tuple[Any, ...]]


async def batch_and_reset(conn: AsyncConnection[Any], adapters: AdaptersMap,
                          statements: Sequence[tuple[str, Sequence[str | None]]], *,
                          reset: bool = True) -> tuple[list[BatchResult], bool]:
    """Run ``statements`` on ``conn`` (idle, autocommit) up to ONE ``Sync`` (so in one transaction: the implicit
    one, or a ``BEGIN`` … ``COMMIT`` block the statements open and close), then, when ``reset``, ``DISCARD
    ALL`` after its own ``Sync``: one write, one round trip.

    Each statement goes over the extended protocol with its parameters as untyped text, and its rows are
    read whole (text format, loaded with ``adapters``). Returns each statement's result and whether the
    session was reset. The first statement that fails makes the server skip the rest up to the ``Sync``: its
    error is raised as the psycopg error for its SQLSTATE, after the pipeline is drained and a block the
    statements left open (failed) is rolled back, so the connection is idle and usable. Anything that leaves
    the pipeline unfinished (the connection breaking, the task being cancelled) cancels the batch, closes the
    connection (the pool replaces it) and re-raises."""
    encoding = conn.info.encoding
    encoded = [(text.encode(encoding), [None if a is None else a.encode(encoding) for a in args])
               for text, args in statements]
    if any(b"\x00" in q or any(p is not None and b"\x00" in p for p in ps) for q, ps in encoded):
        raise psycopg.DataError("a statement or a parameter contains a NUL character (\\0), which PostgreSQL "
                                "text cannot hold")
    async with conn.lock:
        pgconn = conn.pgconn
        try:
            results, failure, was_reset = await _batch(pgconn, Transformer(_LoadContext(adapters, conn)),
                                                       encoded, encoding, reset=reset)
        except BaseException:
            await _abandon(conn)  # the pipeline is in an unknown state: nothing may use this connection again
            raise
    if failure is not None:
        if conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            await conn.rollback()  # the block failed, and the reset after it with it (25P02): end the block
        raise failure
    return results, was_reset


async def _batch(pgconn: PGconn, tx: abc.Transformer, statements: list[tuple[bytes, list[bytes | None]]],
                 encoding: str, *, reset: bool) -> tuple[list[BatchResult], psycopg.Error | None, bool]:
    pgconn.enter_pipeline_mode()
    for query, params in statements:
        pgconn.send_query_params(query, params)
    pgconn.pipeline_sync()
    if reset:
        pgconn.send_query_params(_DISCARD_ALL, None)
        pgconn.pipeline_sync()
    await _flush(pgconn)
    results: list[BatchResult] = []
    failure: psycopg.Error | None = None
    syncs, was_reset = 0, False
    while syncs < (2 if reset else 1):
        result = await _next_result(pgconn)
        if result is None:  # the end of one statement's results
            continue
        status = result.status
        if status == _STATUS.PIPELINE_SYNC:
            syncs += 1
        elif syncs == 1:  # DISCARD ALL's answer
            was_reset = status == _STATUS.COMMAND_OK
        elif status == _STATUS.TUPLES_OK:
            tx.set_pgresult(result)
            rows = tx.load_rows(0, result.ntuples, tuple) if result.ntuples else []
            results.append(BatchResult(fields=_fields(result, encoding), rows=rows))
        elif status in (_STATUS.COMMAND_OK, _STATUS.EMPTY_QUERY):
            results.append(BatchResult(fields=[], rows=[]))
        elif status == _STATUS.FATAL_ERROR:
            if failure is None:
                failure = psycopg.errors.error_from_result(result, encoding=encoding)
        elif status == _STATUS.PIPELINE_ABORTED:
            pass  # skipped because a statement before it failed: that failure is what counts
        else:  # COPY and the like: the pipeline cannot go on
            raise psycopg.NotSupportedError(f"a statement returning {_STATUS(status).name} is not supported here")
    pgconn.exit_pipeline_mode()
    return results, failure, was_reset
