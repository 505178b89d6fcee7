"""The REST rows page in one round trip: settings, the page, the table's description and its count, then the
session's reset, all in one pipeline (:func:`agentpg.access.pipeline.batch_and_reset`).

The contract is :func:`agentpg.access.browse.read_rows`'s (same answers, same errors); this is its fast
path. How it stays exact:

* The page's SQL needs the table's columns and primary key (its default order) before it is sent. They come
  from a :class:`Descriptions` cache its owner (the service's reader) keeps, so a hit costs no catalog round
  trip. The cache is never trusted: the same pipeline re-reads the table's description **in the same
  transaction as the page** (the page's ``AccessShareLock`` holds off any DDL until the transaction ends, so
  what it reads is the table the page read). A description that changed (a column added or dropped, another
  primary key) means the page is thrown away and read again with the new one: a stale entry costs one more
  round trip, never a wrong answer. A miss costs one round trip more (the description, read alone).
* The transaction is :func:`~agentpg.access.browse.read_only`'s: ``BEGIN``, ``SET TRANSACTION READ ONLY``
  and the same ``SET LOCAL`` pins (``statement_timeout``, ``search_path = pg_catalog, pg_temp``,
  ``TimeZone``, ...), the page, the description, ``COMMIT``, all before one ``Sync``. A transaction cannot
  turn read-write once it has taken a snapshot, so nothing the page runs (a view's function) can turn it
  back. ``DISCARD ALL`` follows after its own ``Sync``: whatever the tenant's code changed in the session is
  gone before the pool reuses it (on a failure, the block is rolled back and the pool resets as usual).
* Identifiers only through :class:`psycopg.sql.Identifier`; values (limit, offset, the table's name, the
  count's size bound) as bound parameters, the pinned settings as ``read_only`` writes them (our constants).
  Names the caller gives are checked against the description before any SQL is built.
* Anything unusual (an unknown table or column, a sequence named as a table, a description that changed
  twice, a missing relation or column in the page's own SQL) answers ``None``: the caller then runs
  :func:`~agentpg.access.browse.read_rows`, which resolves the names afresh and raises the usual errors
  (``NotFound`` with a hint, ``InvalidInput`` naming the column, ``UnreadableTable``...). Other server
  errors are translated here exactly as ``read_rows`` translates them.

The count: the description statement counts the table when it is a table or materialized view whose heap is
at most ``count_max_bytes`` (the ``count(*)`` is an init plan PostgreSQL runs only when that holds). It runs
even when the page turns out to be the last one (whose total needs no count); on such small tables a count
costs about what the page's own scan does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.adapt import AdaptersMap

from agentpg.access.browse import SCHEMA, ReadLimits, ResultColumn, RowsPage, page_rows, pinned_session, translated
from agentpg.access.cache import Invalidation, TtlCache
from agentpg.access.pipeline import batch_and_reset

#: Relation kinds the rows page reads (``browse._KINDS``); anything else (a sequence...) goes the slow way.
_READABLE = frozenset({"r", "p", "v", "m", "f"})
#: SQLSTATEs that may mean "the caller named something that is not there": the slow path tells which.
_NAMING_ERRORS = frozenset({"42P01", "42703"})

# The relation's kind, its columns (attnum, name, SQL type) and its primary key (attnums, in key order); $1 is
# its name in schema public. Arrays, not JSON: this runs with every page, and building JSON cost more than the
# page's own SELECT. {count} is the conditional count (or NULL), built with the table's identifier.
_DESCRIBE = sql.SQL("""
SELECT c.relkind, a.nums, a.names, a.types,
       (SELECT i.indkey::pg_catalog.int2[] FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       {count}
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL (
    SELECT pg_catalog.array_agg(t.attnum ORDER BY t.attnum) AS nums,
           pg_catalog.array_agg(t.attname ORDER BY t.attnum) AS names,
           pg_catalog.array_agg(pg_catalog.format_type(t.atttypid, t.atttypmod) ORDER BY t.attnum) AS types
    FROM pg_catalog.pg_attribute t WHERE t.attrelid = c.oid AND t.attnum > 0 AND NOT t.attisdropped) a
WHERE n.nspname = $2 AND c.relname = $1
""")
_COUNT = sql.SQL("CASE WHEN c.relkind IN ('r', 'm') AND pg_catalog.pg_relation_size(c.oid) <= $3 "
                 "THEN (SELECT pg_catalog.count(*) FROM {table}) END")


@dataclass(frozen=True)
class Description:
    """What the page's SQL is built from: the relation's kind, its columns (name, SQL type as ``format_type``
    spells it) in order, and its primary key's columns in key order."""

    kind: str
    columns: tuple[tuple[str, str], ...]
    primary_key: tuple[str, ...]


class Descriptions:
    """Table descriptions by (database, table), for one owner (the service's reader): never module state.

    Entries go stale at the owner's next :meth:`Invalidation.bump` or after ``ttl_s``; staleness is harmless
    (every page re-reads its description), so the TTL only bounds how long a dropped table is remembered.
    The owner also keeps the SQL text of recent pages here (:meth:`statements`): composing it was ~5 % of a
    page's CPU, and it depends only on names and settings, never on a database's contents."""

    def __init__(self, invalidation: Invalidation, ttl_s: float = 60.0, max_entries: int = 10_000) -> None:
        self._cache: TtlCache[tuple[str, str], Description] = TtlCache(invalidation, ttl_s, max_entries)
        self._statements: dict[tuple[object, ...], _Statements] = {}
        self._max_statements = max_entries

    def statements(self, key: tuple[object, ...], build: Callable[[], _Statements]) -> _Statements:
        """The SQL for ``key``, built once (a bounded memo: oldest entries go first)."""
        found = self._statements.get(key)
        if found is None:
            found = build()
            if len(self._statements) >= self._max_statements:
                del self._statements[next(iter(self._statements))]
            self._statements[key] = found
        return found

    def get(self, database: str, table: str) -> Description | None:
        return self._cache.get((database, table))

    def put(self, database: str, table: str, description: Description, gen: int) -> None:
        self._cache.put((database, table), description, gen)

    def drop(self, database: str, table: str) -> None:
        self._cache.put((database, table), _GONE, self._cache.invalidation.current())

    def generation(self) -> int:
        return self._cache.invalidation.current()


#: A placeholder that never matches a real relation (kind ""), so a dropped entry reads as a miss.
_GONE = Description(kind="", columns=(), primary_key=())


@dataclass(frozen=True)
class _Statements:
    """One page's SQL text: the transaction's opening (``BEGIN READ ONLY`` and the pins), the page, the pins
    to send again after it, and the description with its conditional count."""

    begin: tuple[tuple[str, Sequence[str | None]], ...]
    page: str
    repin: tuple[tuple[str, Sequence[str | None]], ...]
    describe: str


@dataclass(frozen=True)
class PageRead:
    """The fast path's answer: the page, and whether the session was reset in its round trip."""

    page: RowsPage
    reset: bool


def _description(row: tuple[Any, ...] | None) -> Description | None:
    if row is None:
        return None
    kind, nums, names, types, key = row[0], row[1] or [], row[2] or [], row[3] or [], row[4] or []
    by_num = dict(zip(nums, names, strict=True))
    return Description(kind=str(kind), columns=tuple(zip(map(str, names), map(str, types), strict=True)),
                       primary_key=tuple(str(by_num[k]) for k in key))


def _begin(conn: AsyncConnection[Any], limits: ReadLimits) -> list[tuple[str, Sequence[str | None]]]:
    """``BEGIN READ ONLY`` and the pinned settings (``SET LOCAL``...), as
    :func:`~agentpg.access.browse.read_only` sends them (its ``SET TRANSACTION READ ONLY`` is in the ``BEGIN``:
    one statement less). (``set_config()`` would take the timeout as a bound value, but tenant databases
    revoke it from every role.)"""
    pins = [statement for statement in pinned_session(conn, limits) if statement != _READ_ONLY]
    return [("BEGIN READ ONLY", []), *((statement, []) for statement in pins)]


_READ_ONLY = "SET TRANSACTION READ ONLY"


_COMMIT: tuple[str, Sequence[str | None]] = ("COMMIT", [])
_REPIN = ("SET LOCAL search_path", "SET LOCAL statement_timeout")


async def describe(conn: AsyncConnection[Any], adapters: AdaptersMap, table: str,
                   limits: ReadLimits) -> Description | None:
    """The table's description read now (one round trip, pinned settings, no reset needed: catalog reads run
    no tenant code); ``None`` when schema public has no relation of that name."""
    query = _DESCRIBE.format(count=sql.SQL("NULL")).as_string(conn)  # a miss: no need to keep its text
    with translated(table):
        results, _ = await batch_and_reset(conn, adapters, [*_begin(conn, limits), (query, [table, SCHEMA]),
                                                            _COMMIT], reset=False)
    rows = results[-2].rows
    return _description(rows[0] if rows else None)


def _page_sql(conn: AsyncConnection[Any], table: str, names: Sequence[str],
              order: Sequence[tuple[str, bool]]) -> str:
    target = sql.Identifier(SCHEMA, table)
    order_sql: sql.Composable = sql.SQL("")
    if order:
        order_sql = sql.SQL(" ORDER BY ") + sql.SQL(", ").join(
            sql.Identifier(col) + sql.SQL(" DESC" if desc else " ASC") for col, desc in order)
    return sql.SQL("SELECT {cols} FROM {table}{order} LIMIT $1 OFFSET $2").format(
        cols=sql.SQL(", ").join(sql.Identifier(n) for n in names), table=target, order=order_sql).as_string(conn)


def _statements(conn: AsyncConnection[Any], table: str, wanted: Sequence[str], order: Sequence[tuple[str, bool]],
                limits: ReadLimits) -> _Statements:
    begin = tuple(_begin(conn, limits))
    return _Statements(
        begin=begin, page=_page_sql(conn, table, wanted, order),
        # The page may have run the tenant's code (a view's function, a policy) that changed settings for the
        # rest of the transaction: pin again what the next statement (the description) uses.
        repin=tuple(s for s in begin if s[0].startswith(_REPIN)),
        describe=_DESCRIBE.format(count=_COUNT.format(table=sql.Identifier(SCHEMA, table))).as_string(conn))


async def read_page(conn: AsyncConnection[Any], adapters: AdaptersMap, descriptions: Descriptions,
                    database: str, table: str, *, limits: ReadLimits, limit: int, offset: int,
                    columns: Sequence[str] | None = None,
                    order_by: Sequence[tuple[str, bool]] | None = None, count: bool = True) -> PageRead | None:
    """One page of ``table`` as :func:`~agentpg.access.browse.read_rows` answers it, or ``None`` when the slow
    path must answer (see the module docstring). ``database`` keys the description cache (the URI: never
    shown). Without ``count`` the description's count never runs (its size bound is -1). Raises what
    ``read_rows`` raises for server errors (``ReadTimeout``, ``UnreadableTable``, ``PermissionDenied``,
    ``ProviderUnavailable``, ``InvalidInput`` for an unsortable ``order_by``)."""
    gen = descriptions.generation()
    desc = descriptions.get(database, table)
    if desc is None or desc.kind not in _READABLE:
        desc = await describe(conn, adapters, table, limits)
        if desc is None or desc.kind not in _READABLE:
            return None
        descriptions.put(database, table, desc, gen)
    for _ in range(2):  # a description that changed since it was cached: once more with the new one
        by_name = dict(desc.columns)
        wanted = list(columns) if columns is not None else [n for n, _ in desc.columns]
        order = list(order_by) if order_by else [(c, False) for c in desc.primary_key]
        if any(c not in by_name for c in wanted) or any(c not in by_name for c, _ in order):
            descriptions.drop(database, table)  # the slow path names the column (or finds it, if we were stale)
            return None
        statements = descriptions.statements(
            (table, tuple(wanted), tuple(order), limits.statement_timeout_ms, limits.idle_in_transaction_ms,
             conn.info.encoding),
            partial(_statements, conn, table, wanted, order, limits))
        begin = statements.begin
        try:
            with translated(table, reading=True, sorting=bool(order_by)):
                try:
                    results, reset = await batch_and_reset(conn, adapters, [
                        *begin,
                        (statements.page, [str(limit), str(offset)]),
                        *statements.repin,
                        (statements.describe, [table, SCHEMA, str(limits.count_max_bytes if count else -1)]),
                        _COMMIT,
                    ])
                except psycopg.Error as exc:
                    if exc.sqlstate in _NAMING_ERRORS:
                        raise _SlowPath from None
                    raise
        except _SlowPath:
            descriptions.drop(database, table)
            return None
        page_result, described = results[len(begin)], results[-2]
        now = _description(described.rows[0] if described.rows else None)
        if now is None or now.kind not in _READABLE:
            descriptions.drop(database, table)
            return None
        if now != desc:  # the page was built from a stale description: its rows may not be what was asked
            descriptions.put(database, table, now, gen)
            desc = now
            continue
        rows, truncated = page_rows(wanted, page_result.rows, limits.max_page_bytes)
        total: int | None = None
        if not truncated and len(rows) < limit and (rows or offset == 0):
            total = offset + len(rows)
        else:
            counted = described.rows[0][5]
            total = int(counted) if counted is not None else None
        # Built without validation: every value has its type already (names and types from the catalog, rows
        # from page_rows), and validating 100 row objects again was ~5 % of a page's CPU.
        columns_out = [ResultColumn.model_construct(name=n, type=by_name[n]) for n in wanted]
        return PageRead(RowsPage.model_construct(table=table, columns=columns_out, rows=rows, limit=limit,
                                                 offset=offset, total=total, truncated=truncated), reset)
    descriptions.drop(database, table)
    return None


class _SlowPath(Exception):
    """Internal: a naming error the slow path explains better."""
