"""The platform's and the console's reads of tenant databases, by name: the service's ``reader`` part.

An edge names a database with a :class:`DatabaseRef` (a user's global database, one of its workspaces'
agent databases, or a restored copy) after its own scoping checks; the reader resolves the connection
string inside the service (remembered 2 s, :mod:`agentpg.access.cache`), takes a connection from the
service's tenant pools and reads in a READ ONLY transaction with the read limits
(:mod:`agentpg.access.browse`, :mod:`agentpg.access.grid`). The URI never leaves the service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, LiteralString

from psycopg.adapt import AdaptersMap
from starlette.concurrency import run_in_threadpool

from agentpg.access import browse, grid, page
from agentpg.access.browse import ColumnInfo, ReadLimits, RowsPage, TableInfo, TableList
from agentpg.access.grid import RowCount
from agentpg.service.exports import export_chunks
from agentpg.service.sql_box import SqlLimits, SqlResult, run_sql

if TYPE_CHECKING:
    from agentpg.service.core import Service


@dataclass(frozen=True)
class DatabaseRef:
    """One database to read. Exactly one of: ``user_id`` alone (that user's global database),
    ``workspace_id`` (that workspace's agent database; of ``scope_user`` when given, else of whichever user
    has it, for the admin), or ``user_id`` with ``copy_id`` (a restored copy of that user's)."""

    user_id: str | None = None
    workspace_id: str | None = None
    scope_user: str | None = None
    copy_id: str | None = None

    @classmethod
    def global_db(cls, user_id: str) -> DatabaseRef:
        return cls(user_id=user_id)

    @classmethod
    def agent_db(cls, workspace_id: str, scope_user: str | None) -> DatabaseRef:
        return cls(workspace_id=workspace_id, scope_user=scope_user)

    @classmethod
    def copy(cls, user_id: str, copy_id: str) -> DatabaseRef:
        return cls(user_id=user_id, copy_id=copy_id)


class Reader:
    """Reads for the REST browse routes and the console. Raises :mod:`agentpg.errors` exceptions
    (``NotFound`` for a database of another user or one not ready, ``ReadTimeout``, ``UnreadableTable`` ...)."""

    def __init__(self, service: Service) -> None:
        self._service = service
        # The rows page's table descriptions and loaders: this reader's own (never module state).
        self._descriptions = page.Descriptions(service.deps.invalidation)
        self._adapters: AdaptersMap | None = None

    def _uri_now(self, ref: DatabaseRef) -> str:
        if ref.copy_id is not None:
            assert ref.user_id is not None
            return self._service.uris.copy(ref.user_id, ref.copy_id)
        return self._service.uris.browse(ref.scope_user, ref.user_id, ref.workspace_id)

    async def _uri(self, ref: DatabaseRef) -> str:
        if ref.copy_id is None:  # answered on the event loop when cached (the hot path of the REST rows page)
            hit = self._service.uris.browse_cached(ref.scope_user, ref.user_id, ref.workspace_id)
            if hit is not None:
                return hit
        return await run_in_threadpool(self._uri_now, ref)

    async def check(self, ref: DatabaseRef) -> None:
        """Resolve ``ref`` only: ``NotFound`` when it names nothing this caller may read."""
        await self._uri(ref)

    @property
    def limits(self) -> ReadLimits:
        return self._service.tenant().read_limits

    @asynccontextmanager
    async def _conn(self, ref: DatabaseRef) -> AsyncIterator[Any]:
        uri = await self._uri(ref)
        async with self._service.tenant().pools.connection(uri) as conn:
            yield conn

    async def tables(self, ref: DatabaseRef) -> TableList:
        async with self._conn(ref) as conn:
            return await browse.list_tables(conn, self.limits)

    async def rows(self, ref: DatabaseRef, table: str, *, limit: int, offset: int,
                   columns: Sequence[str] | None = None,
                   order_by: Sequence[tuple[str, bool]] | None = None, count: bool = True) -> RowsPage:
        """One page (:func:`agentpg.access.browse.read_rows`'s contract), in one round trip when the table's
        description is cached (:mod:`agentpg.access.page`); the slow path answers whatever that one does not
        (unknown names, with their hints and messages)."""
        uri = await self._uri(ref)
        pools = self._service.tenant().pools
        if self._adapters is None:
            self._adapters = browse.json_adapters()
        async with pools.connection(uri) as conn:
            fast = await page.read_page(conn, self._adapters, self._descriptions, uri, table, limits=self.limits,
                                        limit=limit, offset=offset, columns=columns, order_by=order_by,
                                        count=count)
            if fast is not None:
                if fast.reset:
                    pools.mark_reset(conn)  # DISCARD ALL ran in the page's round trip: the pool skips its own
                return fast.page
            return await browse.read_rows(conn, table, limits=self.limits, limit=limit, offset=offset,
                                          columns=columns, order_by=order_by, count=count)

    async def check_table(self, ref: DatabaseRef, table: str) -> TableInfo:
        async with self._conn(ref) as conn:
            return await browse.check_table(conn, table, self.limits)

    async def export(self, ref: DatabaseRef, table: str) -> AsyncIterator[tuple[list[ColumnInfo], list[list[Any]]]]:
        """The whole table in batches (:func:`agentpg.access.browse.export_rows`)."""
        async with self._conn(ref) as conn:
            async for batch in browse.export_rows(conn, table, self.limits):
                yield batch

    def export_bytes(self, ref: DatabaseRef, table: str, fmt: str) -> AsyncIterator[bytes]:
        """The whole table encoded as ``fmt`` ("csv" or "json"), from one READ ONLY snapshot."""
        return export_chunks(self, ref, table, fmt)

    async def grid(self, ref: DatabaseRef, table: str, *, limit: int, offset: int,
                   order_by: Sequence[tuple[str, bool]] | None = None, filters: Sequence[grid.Filter] = (),
                   search: str | None = None) -> grid.GridPage:
        """The console's rows page (:func:`agentpg.access.grid.read_grid`); ``grid.BadFilter`` for a filter
        that cannot apply."""
        async with self._conn(ref) as conn:
            return await grid.read_grid(conn, table, limits=self.limits, limit=limit, offset=offset,
                                        order_by=order_by, filters=filters, search=search)

    async def table_counts(self, ref: DatabaseRef) -> dict[str, RowCount]:
        async with self._conn(ref) as conn:
            return await grid.table_counts(conn, self.limits)

    async def catalog_rows(self, ref: DatabaseRef, query: LiteralString,
                           limits: ReadLimits | None = None) -> list[tuple[Any, ...]]:
        """Rows of one of agentpg's own catalog queries (a literal in agentpg's code, never caller text),
        read only, under ``limits`` (default: the read limits)."""
        async with self._conn(ref) as conn, browse.read_only(conn, limits or self.limits):
            with browse.translated():
                cur = await conn.execute(query)
                return list(await cur.fetchall())

    async def run_sql(self, ref: DatabaseRef, statement: str, limits: SqlLimits | None = None) -> SqlResult:
        """The console's SQL box: one read-only statement (:mod:`agentpg.service.sql_box`)."""
        uri = await self._uri(ref)
        return await run_sql(self._service.tenant().pools, uri, statement, limits,
                             classify=self._service.statements.classify,
                             terminate=self._service.reaper.terminate)
