"""The platform's reads of a tenant database: its tables, a page of rows, a whole-table export.

Contract, for every function here:

* it runs inside ONE transaction that is ``READ ONLY``, with ``SET LOCAL statement_timeout`` (10 s by
  default; per FETCH for exports) and a pinned ``search_path = pg_catalog, pg_temp`` so an object a tenant
  created can never shadow a built-in the platform's SQL relies on. ``TimeZone``, ``DateStyle`` and
  ``IntervalStyle`` are pinned too, so values render the same for every tenant;
* names the caller gives (table, columns, sort keys) are matched against the tenant's own catalog first
  (schema ``public``); SQL is built only from matched names, with :class:`psycopg.sql.Identifier`; values
  (limit, offset, the name being looked up) are bound parameters;
* values come back JSON-ready, faithfully (see :func:`json_value`): timestamps as ISO 8601 text (UTC,
  ``+00:00``), numeric and money as strings (no float rounding), json/jsonb as JSON, bytea as standard
  base64 (padded), uuid/inet/interval (ISO 8601 duration)/ranges and any other type as its PostgreSQL text,
  arrays as (nested) lists, NULL as ``null``, float NaN/Infinity as the strings ``"NaN"``/``"Infinity"``;
* errors are :mod:`agentpg.errors` exceptions whose messages carry no URI, role name or server message.

The connection is the database's full-rights login role (``Service.platform_uri``); READ ONLY is what makes
these reads reads, whatever a view or a policy in the tenant's database tries to do.
"""

from __future__ import annotations

import base64
import difflib
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import AsyncConnection, AsyncCursor, AsyncServerCursor, sql
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Loader
from psycopg.types.string import TextLoader
from pydantic import BaseModel, ConfigDict

from agentpg.errors import AgentpgError, InvalidInput, NotFound, PermissionDenied, ProviderUnavailable

log = logging.getLogger(__name__)

SCHEMA = "public"
RelKind = Literal["table", "partitioned table", "view", "materialized view", "foreign table"]
_KINDS: dict[str, RelKind] = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view",
                              "f": "foreign table"}


class ReadTimeout(AgentpgError):
    """The read ran past its statement timeout and the server cancelled it."""

    status = 504
    code = "read_timeout"


class UnreadableTable(AgentpgError):
    """The tenant's database refused the read for a reason of its own (a failing view, a bad cast...)."""

    status = 422
    code = "unreadable"


@dataclass(frozen=True)
class ReadLimits:
    """How much one platform read may cost."""

    statement_timeout_ms: int = 10_000
    idle_in_transaction_ms: int = 60_000
    """An export's transaction stays open while the client reads; a stalled client is cut off after this."""
    count_max_bytes: int = 32 * 1024 * 1024
    """Tables (heap) up to this size get an exact ``count(*)`` with each page; larger ones get ``null``."""
    count_timeout_ms: int = 500
    """The explorer's grid counts a larger table (or a view) within this time, else shows the planner's
    estimate; 0 skips that count. Also bounds its "referenced by" counts (:mod:`agentpg.access.grid`)."""
    max_page_bytes: int = 16 * 1024 * 1024
    """A page stops early (``truncated``) once its values add up to about this many bytes."""
    export_batch_rows: int = 500


# -- public shapes -------------------------------------------------------------------------------------


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnInfo(_Shape):
    name: str
    type: str
    """The SQL type as ``format_type`` spells it, e.g. ``character varying(20)``, ``integer[]``."""
    nullable: bool
    default: str | None
    """The default expression's SQL text, schema-qualified (``nextval('public.t_id_seq'::regclass)``); null
    when none."""
    generated: str | None = None
    """The expression of a ``GENERATED ALWAYS AS (...) STORED`` column."""
    identity: Literal["always", "by default"] | None = None


class TableInfo(_Shape):
    name: str
    kind: RelKind
    columns: list[ColumnInfo]
    primary_key: list[str]
    """Column names of the primary key in key order; empty when the table has none."""
    estimated_rows: int | None
    """The planner's estimate (``pg_class.reltuples``); null when never analysed, or for a view."""


class TableList(_Shape):
    tables: list[TableInfo]


class ResultColumn(_Shape):
    name: str
    type: str


class RowsPage(_Shape):
    """One page of a table. ``rows`` are objects keyed by column name, in ``columns`` order."""

    table: str
    columns: list[ResultColumn]
    rows: list[dict[str, Any]]
    limit: int
    offset: int
    total: int | None
    """Exact row count when it is cheap: always on the last page (offset + rows), otherwise when the table's
    heap is at most ``ReadLimits.count_max_bytes`` (one ``count(*)``) and the caller did not ask to skip the
    count. Null for larger tables and views."""
    truncated: bool
    """True when the page stopped before ``limit`` rows because it reached the page byte cap; continue from
    ``offset + len(rows)``."""


# -- value loading -------------------------------------------------------------------------------------


class _FloatLoader(Loader):
    """float4/float8: a JSON number when finite, else PostgreSQL's text (``NaN``, ``Infinity``)."""

    def load(self, data: Buffer) -> float | str:
        text = bytes(data).decode()
        value = float(text)
        return value if math.isfinite(value) else text


def _json_float(text: str) -> float | str:
    value = float(text)
    return value if math.isfinite(value) else text  # a json number beyond double range stays exact, as text


class _JsonLoader(Loader):
    def load(self, data: Buffer) -> Any:
        return json.loads(bytes(data).decode(), parse_float=_json_float)


# Timestamps are ASCII in every DateStyle, so they are decoded as such, and each loader is one call: these
# ran for every value of a page's timestamp columns, and three nested calls per value were ~10 % of a page.


class _TimestampLoader(Loader):
    """``2024-05-01 12:00:00.5`` -> ``2024-05-01T12:00:00.5``; ``infinity`` and BC dates unchanged."""

    def load(self, data: Buffer) -> str:
        text = str(data, "ascii", "replace")
        if text[:1].isdigit() and not text.endswith(" BC"):
            return text.replace(" ", "T", 1)
        return text


def _with_colon_offset(text: str) -> str:
    # PostgreSQL writes whole-hour offsets as "+00"; ISO 8601 extended format wants "+00:00".
    if len(text) >= 3 and text[-3] in "+-" and text[-2:].isdigit():
        return text + ":00"
    return text


class _TimestamptzLoader(Loader):
    """As :class:`_TimestampLoader`, and a whole-hour offset gets its minutes (``+00`` -> ``+00:00``)."""

    def load(self, data: Buffer) -> str:
        text = str(data, "ascii", "replace")
        if text[:1].isdigit() and not text.endswith(" BC"):
            text = text.replace(" ", "T", 1)
            if text[-3] in "+-" and text[-2:].isdigit():
                return text + ":00"
        return text


class _TimetzLoader(TextLoader):
    def load(self, data: Buffer) -> str:
        return _with_colon_offset(_text(super().load(data)))


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# Types psycopg already turns into JSON-native values (int, bool, str) or that json_value handles (bytea).
_NATIVE = frozenset({"int2", "int4", "int8", "oid", "bool", "text", "varchar", "bpchar", "name", '"char"',
                     "bytea", "int2vector", "oidvector"})
_CUSTOM: dict[str, type[Loader]] = {"float4": _FloatLoader, "float8": _FloatLoader, "json": _JsonLoader,
                                    "jsonb": _JsonLoader, "timestamp": _TimestampLoader,
                                    "timestamptz": _TimestamptzLoader, "timetz": _TimetzLoader}


def _install_loaders(cur: AsyncCursor[Any] | AsyncServerCursor[Any] | AdaptersMap) -> None:
    """Per cursor or on an adapters map of its own (never per connection: pooled connections are shared with
    the MCP edge)."""
    adapters = cur if isinstance(cur, AdaptersMap) else cur.adapters
    for info in psycopg.adapters.types:
        if info.name in _NATIVE:
            continue
        adapters.register_loader(info.oid, _CUSTOM.get(info.name, TextLoader))


def json_adapters() -> AdaptersMap:
    """A new adapters map that loads values as :func:`json_value` expects (what each read's cursor gets), for
    rows loaded outside a cursor (:mod:`agentpg.access.page`). Build it once per owner, not per read."""
    adapters = AdaptersMap(psycopg.adapters)
    _install_loaders(adapters)
    return adapters


def json_value(value: Any) -> Any:
    """A loaded value as JSON: bytes become base64; the loaders above already made everything else native."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


def page_rows(names: Sequence[str], records: Sequence[Sequence[Any]], max_bytes: int
              ) -> tuple[list[dict[str, Any]], bool]:
    """Loaded records as JSON objects keyed by ``names``, stopping (``True``: truncated) once they add up to
    about ``max_bytes`` (at least one row is kept)."""
    rows: list[dict[str, Any]] = []
    budget = max_bytes
    keys = 2 + sum(len(n) + 4 for n in names)  # what _size counts for a row's braces and keys
    for record in records:
        row: dict[str, Any] = {}
        size = keys
        for name, v in zip(names, record, strict=True):
            kind = type(v)  # the common values inline (this loop is most of a page's CPU), the rest as before
            if kind is str:
                size += len(v) + 3
            elif v is None or kind is int or kind is bool:
                size += 8
            else:
                v = json_value(v)
                size += _size(v)
            row[name] = v
        budget -= size
        if budget < 0 and rows:
            return rows, True
        rows.append(row)
    return rows, False


def _size(value: Any) -> int:
    """Roughly how many bytes ``value`` adds to a JSON page (for the page cap; cheap, not exact)."""
    if isinstance(value, (str, bytes)):
        return len(value) + 3
    if isinstance(value, (list, tuple)):
        return 2 + sum(_size(v) for v in value)
    if isinstance(value, dict):
        return 2 + sum(len(k) + 4 + _size(v) for k, v in value.items())
    return 8


# -- transactions and errors ---------------------------------------------------------------------------

_PIN_SESSION = sql.SQL(
    "SET TRANSACTION READ ONLY; "
    "SET LOCAL statement_timeout = {stmt}; "
    "SET LOCAL idle_in_transaction_session_timeout = {idle}; "
    "SET LOCAL search_path = pg_catalog, pg_temp; "
    "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'iso_8601'; "
    "SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex'"
)


def pinned_session(conn: AsyncConnection[Any], limits: ReadLimits) -> list[str]:
    """What :func:`read_only` sends after its ``BEGIN``, one statement per item (a pipeline's statements go
    over the extended protocol, one command each)."""
    return _pinned(limits).as_string(conn).split("; ")  # our constants: no "; " inside a value


def _pinned(limits: ReadLimits) -> sql.Composed:
    return _PIN_SESSION.format(stmt=sql.Literal(f"{limits.statement_timeout_ms}ms"),
                               idle=sql.Literal(f"{limits.idle_in_transaction_ms}ms"))


@asynccontextmanager
async def read_only(conn: AsyncConnection[Any], limits: ReadLimits) -> AsyncIterator[None]:
    """One READ ONLY transaction with the session pinned (see the module docstring)."""
    if not conn.autocommit:
        # The pool resets a returned connection with DISCARD ALL, which fails inside the implicit transaction
        # a non-autocommit connection opens on its next statement; in autocommit, transaction() is an explicit
        # BEGIN/COMMIT and the reset runs on its own. (Better set once in the pool's connect kwargs.)
        await conn.set_autocommit(True)
    async with conn.transaction():
        # No parameters, so psycopg sends this as one simple-protocol round trip; the values are our ints.
        await conn.execute(_pinned(limits))
        yield


@contextmanager
def translated(table: str | None = None, *, reading: bool = False, sorting: bool = False) -> Iterator[None]:
    """Turn the server's errors into agentpg's, without passing its message (it may name a role) through.

    ``reading``: the table was found already, so a missing relation now is the table's own doing (a view or
    function naming something absent), not the caller's.
    """
    try:
        yield
    except psycopg.errors.QueryCanceled:
        raise ReadTimeout("the read took longer than the statement timeout and was cancelled; "
                          "ask for fewer rows or columns") from None
    except psycopg.errors.UndefinedTable as exc:
        if reading:
            raise UnreadableTable(f"the database could not read table {table!r} (SQLSTATE {exc.sqlstate})") from None
        raise NotFound(f"table {table!r} does not exist in this database") from None
    except psycopg.errors.InsufficientPrivilege:
        raise PermissionDenied(f"the platform may not read table {table!r}") from None
    except psycopg.errors.UndefinedFunction as exc:
        if sorting:
            raise InvalidInput("order_by names a column whose type has no sort order (json, xml, point...)") from None
        raise UnreadableTable(f"the database could not read table {table!r} ({exc.sqlstate})") from None
    except psycopg.OperationalError:
        raise ProviderUnavailable("the database server cannot be reached right now; retry shortly") from None
    except psycopg.Error as exc:
        raise UnreadableTable(f"the database could not read table {table!r} "
                              f"(SQLSTATE {exc.sqlstate or 'unknown'})") from None


# -- catalog -------------------------------------------------------------------------------------------

# One round trip for the relations, their columns and their primary keys (a REST read resolves its table on
# every call; three queries here were a third of that route's time).
_RELATIONS = sql.SQL("""
SELECT c.oid, c.relname, c.relkind,
       CASE WHEN c.reltuples < 0 OR c.relkind IN ('v', 'f') THEN NULL ELSE c.reltuples::bigint END,
       CASE WHEN c.relkind IN ('r', 'm') THEN pg_catalog.pg_relation_size(c.oid) END,
       (SELECT pg_catalog.json_agg(pg_catalog.json_build_array(
                   a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), NOT a.attnotnull,
                   CASE WHEN a.attgenerated = '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END,
                   CASE WHEN a.attgenerated <> '' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END,
                   a.attidentity) ORDER BY a.attnum)
        FROM pg_catalog.pg_attribute a
        LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       (SELECT pg_catalog.array_agg(a.attname ORDER BY k.ord)
        FROM pg_catalog.pg_index i
        CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indisprimary AND i.indrelid = c.oid)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') {filter}
ORDER BY c.relname
""")
_ONE_RELATION = sql.SQL("AND c.relname = %(name)s")

_IDENTITY: dict[str, Literal["always", "by default"]] = {"a": "always", "d": "by default"}


@dataclass(frozen=True)
class _Relation:
    oid: int
    info: TableInfo
    heap_bytes: int | None


async def _relations(conn: AsyncConnection[Any], name: str | None = None) -> list[_Relation]:
    query = _RELATIONS.format(filter=_ONE_RELATION if name is not None else sql.SQL(""))
    cur = await conn.execute(query, {"schema": SCHEMA, "name": name})  # the name is a bound value
    return [_Relation(oid, TableInfo(name=relname, kind=_KINDS[kind], columns=[
                ColumnInfo(name=col, type=typ, nullable=nullable, default=default, generated=generated,
                           identity=_IDENTITY.get(identity))
                for col, typ, nullable, default, generated, identity in columns or []],
                primary_key=list(keys or []), estimated_rows=estimate), size)
            for oid, relname, kind, estimate, size, columns, keys in await cur.fetchall()]


async def list_tables(conn: AsyncConnection[Any], limits: ReadLimits) -> TableList:
    """Every table, view and materialized view in schema ``public``, by name, with columns and keys."""
    async with read_only(conn, limits):
        with translated():
            return TableList(tables=[r.info for r in await _relations(conn)])


async def _resolve(conn: AsyncConnection[Any], table: str) -> _Relation:
    found = await _relations(conn, table)
    if found:
        return found[0]
    cur = await conn.execute("SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                             "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r','p','v','m','f')",
                             (SCHEMA,))
    names = [r[0] for r in await cur.fetchall()]
    hint = difflib.get_close_matches(table, names, n=1)
    raise NotFound(f"table {table!r} does not exist in this database"
                   + (f"; did you mean {hint[0]!r}?" if hint else ""))


def _pick_columns(rel: _Relation, wanted: Sequence[str] | None, what: str) -> list[ColumnInfo]:
    by_name = {c.name: c for c in rel.info.columns}
    if wanted is None:
        return rel.info.columns
    unknown = [c for c in wanted if c not in by_name]
    if unknown:
        raise InvalidInput(f"{what}: table {rel.info.name!r} has no column "
                           + ", ".join(repr(c) for c in unknown))
    return [by_name[c] for c in wanted]


def _order_by(rel: _Relation, order_by: Sequence[tuple[str, bool]] | None) -> sql.Composable:
    """``(column, descending)`` pairs; by default the primary key, so pages are stable."""
    keys = list(order_by) if order_by else [(c, False) for c in rel.info.primary_key]
    if not keys:
        return sql.SQL("")
    _pick_columns(rel, [c for c, _ in keys], "order_by")
    return sql.SQL(" ORDER BY ") + sql.SQL(", ").join(
        sql.Identifier(col) + sql.SQL(" DESC" if desc else " ASC") for col, desc in keys)


async def read_rows(conn: AsyncConnection[Any], table: str, *, limits: ReadLimits, limit: int, offset: int,
                    columns: Sequence[str] | None = None,
                    order_by: Sequence[tuple[str, bool]] | None = None, count: bool = True) -> RowsPage:
    """One page of ``table``: ``limit`` rows from ``offset``, in ``order_by`` order (default: primary key;
    without one, PostgreSQL's order, which may differ between pages). Unknown table → ``NotFound``;
    unknown column → ``InvalidInput`` naming it. ``limit``/``offset`` are validated by the caller. Without
    ``count`` the table is not counted: ``total`` is then known only on the last page."""
    async with read_only(conn, limits):
        with translated(table):
            rel = await _resolve(conn, table)
        cols = _pick_columns(rel, columns, "columns")
        target = sql.Identifier(SCHEMA, rel.info.name)
        query = sql.SQL("SELECT {cols} FROM {table}{order} LIMIT %s OFFSET %s").format(
            cols=sql.SQL(", ").join(sql.Identifier(c.name) for c in cols), table=target,
            order=_order_by(rel, order_by))
        with translated(table, reading=True, sorting=bool(order_by)):
            async with conn.cursor() as cur:
                _install_loaders(cur)
                await cur.execute(query, (limit, offset))
                rows, truncated = page_rows([c.name for c in cols], await cur.fetchall(), limits.max_page_bytes)
            total: int | None = None
            if not truncated and len(rows) < limit and (rows or offset == 0):
                total = offset + len(rows)
            elif count and rel.heap_bytes is not None and rel.heap_bytes <= limits.count_max_bytes:
                cur2 = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target))
                counted = await cur2.fetchone()
                total = int(counted[0]) if counted else None
    return RowsPage(table=rel.info.name, columns=[ResultColumn(name=c.name, type=c.type) for c in cols],
                    rows=rows, limit=limit, offset=offset, total=total, truncated=truncated)


async def check_table(conn: AsyncConnection[Any], table: str, limits: ReadLimits) -> TableInfo:
    """The table's description, or ``NotFound`` (so an export can fail before its response starts)."""
    async with read_only(conn, limits):
        with translated(table):
            return (await _resolve(conn, table)).info


async def export_rows(conn: AsyncConnection[Any], table: str, limits: ReadLimits
                      ) -> AsyncIterator[tuple[list[ColumnInfo], list[list[Any]]]]:
    """The whole table, in primary-key order when it has one, as batches of JSON-ready rows.

    A server-side cursor inside one READ ONLY transaction, so memory stays at one batch and the export is a
    consistent snapshot. Each FETCH has the statement timeout; a client that stops reading for longer than
    ``idle_in_transaction_ms`` loses the export. The first item carries the columns and may have no rows.
    """
    async with read_only(conn, limits):
        with translated(table):
            rel = await _resolve(conn, table)
        query = sql.SQL("SELECT {cols} FROM {table}{order}").format(
            cols=sql.SQL(", ").join(sql.Identifier(c.name) for c in rel.info.columns),
            table=sql.Identifier(SCHEMA, rel.info.name), order=_order_by(rel, None))
        first = True
        with translated(table, reading=True):
            async with conn.cursor(name="agentpg_export") as cur:
                _install_loaders(cur)
                await cur.execute(query)
                while True:
                    batch = await cur.fetchmany(limits.export_batch_rows)
                    if batch or first:
                        yield rel.info.columns, [[json_value(v) for v in rec] for rec in batch]
                    first = False
                    if len(batch) < limits.export_batch_rows:
                        return
