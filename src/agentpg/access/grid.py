"""The explorer's table browser: a page of rows narrowed by filters and a search, its row count, and the
foreign keys between rows in both directions.

The contract is :mod:`agentpg.access.browse`'s, unchanged: everything runs inside ONE ``READ ONLY``
transaction with the pinned session (:func:`browse.read_only`), on the connection the caller scoped (the
database's login role, as the REST rows route); table and column names are matched against the tenant's
catalog first and reach SQL only as :class:`psycopg.sql.Identifier`; every value a person typed is a bound
parameter (sent with the "unknown" type, so PostgreSQL itself parses it as the column's type); errors are
:mod:`agentpg.errors` exceptions that carry no server message.

* **Filters** are ANDed. A value that is not valid for its column's type, or an operator the type does not
  have (``<`` on ``json``), raises :class:`BadFilter` naming the filter, found before the page is read
  (one probe statement ``WHERE false`` inside a savepoint; per filter only when that probe fails).
* **Search** is one ``ILIKE`` over the text-like columns (at most :data:`MAX_SEARCH_COLUMNS`).
* **Counts** (:class:`RowCount`): exact on the last page; exact ``count(*)`` when the heap is at most
  ``ReadLimits.count_max_bytes``; else a ``count(*)`` under ``ReadLimits.count_timeout_ms``; else the
  planner's estimate (``EXPLAIN``), shown as "about N". Filtered views are counted the same way.
* **Foreign keys**: outgoing ones say where each key cell points; for incoming ones, each row gets the
  number of referencing rows, capped at :data:`REF_COUNT_CAP`, counted only when cheap (the referencing
  table is small or has an index led by the key) and under the count timeout; else no number.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg import AsyncConnection, sql

from agentpg.access import browse
from agentpg.access.browse import ColumnInfo, ReadLimits
from agentpg.errors import InvalidInput

OPERATORS: Final[dict[str, str]] = {
    "eq": "=", "ne": "≠", "lt": "<", "le": "≤", "gt": ">", "ge": "≥", "contains": "contains",
    "in": "in list", "null": "is null", "notnull": "is not null"}
"""Operator codes (as they travel in URLs) and their labels."""
_SQL_OPS: Final[dict[str, str]] = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
NO_VALUE: Final = frozenset({"null", "notnull"})
MAX_FILTERS: Final = 10
MAX_VALUE_CHARS: Final = 1000
MAX_IN_ITEMS: Final = 100
MAX_SEARCH_CHARS: Final = 200
MAX_SEARCH_COLUMNS: Final = 16
MAX_INCOMING: Final = 8
REF_COUNT_CAP: Final = 1000
_TEXT_TYPES: Final = frozenset({"text", "character varying", "character", "citext", "name", "bpchar", "varchar"})


class BadFilter(InvalidInput):
    """One filter cannot be applied; ``index`` is its position (``None``: the search box)."""

    def __init__(self, message: str, index: int | None) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class Filter:
    column: str
    op: str
    value: str = ""

    @property
    def label(self) -> str:
        return OPERATORS.get(self.op, self.op)


@dataclass(frozen=True)
class RowCount:
    value: int | None
    """None only when even the planner gave no estimate."""
    exact: bool


@dataclass(frozen=True)
class ForeignKey:
    name: str
    table: str
    """The referencing table."""
    columns: tuple[str, ...]
    ref_table: str
    ref_columns: tuple[str, ...]
    cheap_to_count: bool = False
    """The referencing table is small or has an index led by the key: counting referrers is cheap."""


@dataclass(frozen=True)
class Referrers:
    """How many rows of ``fk.table`` point at one row (``key``: its referenced values, as filter text)."""

    fk: ForeignKey
    key: tuple[str, ...] | None
    """None when the row's key holds NULL or a value that cannot travel as text (bytea, json)."""
    count: int | None
    """None when not counted (too costly, or timed out); at most ``REF_COUNT_CAP + 1``."""

    @property
    def capped(self) -> bool:
        return self.count is not None and self.count > REF_COUNT_CAP


@dataclass
class GridPage:
    table: str
    kind: str
    columns: list[ColumnInfo]
    primary_key: list[str]
    rows: list[dict[str, Any]]
    limit: int
    offset: int
    count: RowCount
    truncated: bool
    searched: list[str] = field(default_factory=list)
    outgoing: list[ForeignKey] = field(default_factory=list)
    incoming: list[ForeignKey] = field(default_factory=list)
    referrers: list[list[Referrers]] = field(default_factory=list)
    """One list per row, in ``incoming`` order."""


def _base(type_name: str) -> str:
    return type_name.split("(")[0].strip().lower().rsplit(".", 1)[-1]


def is_text_type(type_name: str) -> bool:
    return _base(type_name) in _TEXT_TYPES


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def key_text(value: Any) -> str | None:
    """A loaded key value as the text a filter (and PostgreSQL's input function) takes; None when it cannot be."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def in_items(value: str) -> list[str]:
    """``a, "b,c", d`` -> ``["a", "b,c", "d"]`` (comma-separated; double quotes keep a comma)."""
    rows = list(csv.reader([value], skipinitialspace=True))
    return [item.strip() for item in rows[0]] if rows else []


# -- WHERE ---------------------------------------------------------------------------------------------


@dataclass
class _Where:
    parts: list[sql.Composable] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    typed: list[tuple[int, sql.Composable, list[Any]]] = field(default_factory=list)
    """Conditions whose values PostgreSQL must parse as the column's type: probed first."""

    def sql(self) -> sql.Composable:
        if not self.parts:
            return sql.SQL("")
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(sql.SQL("({})").format(p) for p in self.parts)


def _condition(i: int, f: Filter, col: ColumnInfo) -> tuple[sql.Composable, list[Any], bool]:
    ident = sql.Identifier(col.name)
    if f.op == "null":
        return sql.SQL("{} IS NULL").format(ident), [], False
    if f.op == "notnull":
        return sql.SQL("{} IS NOT NULL").format(ident), [], False
    if f.op == "contains":
        return sql.SQL("CAST({} AS text) ILIKE %s").format(ident), [_like(f.value)], False
    if f.op == "in":
        items = in_items(f.value)
        if not items or len(items) > MAX_IN_ITEMS:
            raise BadFilter(f"filter {i + 1}: 'in list' takes 1 to {MAX_IN_ITEMS} comma-separated values", i)
        marks = sql.SQL(", ").join(sql.Placeholder() for _ in items)
        return sql.SQL("{} IN ({})").format(ident, marks), list(items), True
    return sql.SQL("{} {} %s").format(ident, sql.SQL(_SQL_OPS[f.op])), [f.value], True


def _build_where(rel_columns: Sequence[ColumnInfo], table: str, filters: Sequence[Filter],
                 search: str | None) -> tuple[_Where, list[str]]:
    by_name = {c.name: c for c in rel_columns}
    if len(filters) > MAX_FILTERS:
        raise BadFilter(f"at most {MAX_FILTERS} filters at once", None)
    where = _Where()
    for i, f in enumerate(filters):
        col = by_name.get(f.column)
        if col is None:
            shown = f.column if len(f.column) <= 60 else f.column[:60] + "…"
            raise BadFilter(f"filter {i + 1}: table {table!r} has no column {shown!r}", i)
        if f.op not in OPERATORS:
            raise BadFilter(f"filter {i + 1}: unknown operator {f.op[:20]!r} (one of {', '.join(OPERATORS)})", i)
        if "\x00" in f.value or len(f.value) > MAX_VALUE_CHARS:
            raise BadFilter(f"filter {i + 1}: a value is at most {MAX_VALUE_CHARS} characters, without NUL", i)
        if f.value == "" and f.op not in NO_VALUE and f.op != "contains" and not is_text_type(col.type):
            raise BadFilter(f"filter {i + 1}: {col.name} {f.label} needs a value (for a missing one use 'is null')", i)
        cond, params, typed = _condition(i, f, col)
        where.parts.append(cond)
        where.params += params
        if typed:
            where.typed.append((i, cond, params))
    searched: list[str] = []
    if search:
        if "\x00" in search or len(search) > MAX_SEARCH_CHARS:
            raise BadFilter(f"the search is at most {MAX_SEARCH_CHARS} characters, without NUL", None)
        searched = [c.name for c in rel_columns if is_text_type(c.type)][:MAX_SEARCH_COLUMNS]
        if not searched:
            raise BadFilter(f"table {table!r} has no text columns to search; use a filter instead", None)
        where.parts.append(sql.SQL(" OR ").join(
            sql.SQL("CAST({} AS text) ILIKE %s").format(sql.Identifier(c)) for c in searched))
        where.params += [_like(search)] * len(searched)
    return where, searched


async def _probe(conn: AsyncConnection[Any], target: sql.Composable, conds: Sequence[sql.Composable],
                 params: list[Any]) -> psycopg.Error | None:
    """Parse the conditions against the table without reading a row; the error PostgreSQL raised, if any."""
    query = sql.SQL("SELECT 1 FROM {} WHERE false AND {}").format(
        target, sql.SQL(" AND ").join(sql.SQL("({})").format(c) for c in conds))
    try:
        async with conn.transaction():  # a savepoint: a refusal leaves the read's transaction usable
            await conn.execute(query, params)
    except (psycopg.DataError, psycopg.ProgrammingError, psycopg.IntegrityError) as exc:
        if isinstance(exc, (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable)):
            raise  # not the filter's fault: translated() says what it is
        return exc
    return None


async def _check_types(conn: AsyncConnection[Any], target: sql.Composable, where: _Where,
                       filters: Sequence[Filter], columns: dict[str, ColumnInfo]) -> None:
    if not where.typed or await _probe(conn, target, [c for _, c, _ in where.typed],
                                       [p for _, _, ps in where.typed for p in ps]) is None:
        return
    for i, cond, params in where.typed:
        exc = await _probe(conn, target, [cond], params)
        if exc is None:
            continue
        f, col = filters[i], columns[filters[i].column]
        if isinstance(exc, psycopg.errors.UndefinedFunction):
            raise BadFilter(f"filter {i + 1}: column {col.name} ({col.type}) has no {f.label!r} comparison; "
                            "use 'contains', 'is null' or 'is not null'", i)
        if isinstance(exc, psycopg.errors.DataError):
            shown = f.value if len(f.value) <= 60 else f.value[:60] + "…"
            raise BadFilter(f"filter {i + 1}: {shown!r} is not a valid {col.type} value for column {col.name}", i)
        raise BadFilter(f"filter {i + 1}: column {col.name} ({col.type}) cannot be compared that way "
                        f"(SQLSTATE {exc.sqlstate})", i)
    raise BadFilter("the filters cannot be applied together", None)  # each alone was fine: unlikely


# -- counts --------------------------------------------------------------------------------------------


async def _timed(conn: AsyncConnection[Any], limits: ReadLimits, query: sql.Composed,
                 params: Sequence[Any]) -> list[tuple[Any, ...]] | None:
    """Run a read under ``count_timeout_ms`` in a savepoint; None when it was cancelled (or is disabled)."""
    if limits.count_timeout_ms <= 0:
        return None
    short = sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(f"{limits.count_timeout_ms}ms"))
    normal = sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(f"{limits.statement_timeout_ms}ms"))
    try:
        async with conn.transaction():
            await conn.execute(short)
            async with conn.cursor() as cur:
                browse._install_loaders(cur)
                await cur.execute(query, params)
                rows = await cur.fetchall()
            await conn.execute(normal)  # a released savepoint keeps SET LOCAL: put the page's timeout back
            return rows
    except psycopg.errors.QueryCanceled:
        return None


async def _estimate(conn: AsyncConnection[Any], target: sql.Composable, where: _Where) -> int | None:
    cur = await conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {}{}").format(target, where.sql()),
                             where.params)
    row = await cur.fetchone()
    try:
        return int(row[0][0]["Plan"]["Plan Rows"]) if row else None
    except (LookupError, TypeError, ValueError):
        return None


async def _count(conn: AsyncConnection[Any], rel: browse._Relation, target: sql.Composable, where: _Where,
                 limits: ReadLimits) -> RowCount:
    query = sql.SQL("SELECT count(*) FROM {}{}").format(target, where.sql())
    if rel.heap_bytes is not None and rel.heap_bytes <= limits.count_max_bytes:
        cur = await conn.execute(query, where.params)
        row = await cur.fetchone()
        return RowCount(int(row[0]) if row else 0, exact=True)
    timed = await _timed(conn, limits, query, where.params)
    if timed:
        return RowCount(int(timed[0][0]), exact=True)
    return RowCount(await _estimate(conn, target, where), exact=False)


# -- foreign keys --------------------------------------------------------------------------------------

_FOREIGN_KEYS = """
SELECT con.conname, con.conrelid = %(oid)s, con.confrelid = %(oid)s, src.relname, tgt.relname,
       ARRAY(SELECT a.attname FROM pg_catalog.unnest(con.conkey) WITH ORDINALITY AS k(n, o)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o),
       ARRAY(SELECT a.attname FROM pg_catalog.unnest(con.confkey) WITH ORDINALITY AS k(n, o)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o),
       (src.relkind = 'r' AND pg_catalog.pg_relation_size(src.oid) <= %(small)s)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = con.conrelid AND i.indkey[0] = con.conkey[1])
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class src ON src.oid = con.conrelid
JOIN pg_catalog.pg_namespace sn ON sn.oid = src.relnamespace
JOIN pg_catalog.pg_class tgt ON tgt.oid = con.confrelid
JOIN pg_catalog.pg_namespace tn ON tn.oid = tgt.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0 AND (con.conrelid = %(oid)s OR con.confrelid = %(oid)s)
  AND sn.nspname = %(schema)s AND tn.nspname = %(schema)s
ORDER BY src.relname, con.conname
"""


async def _foreign_keys(conn: AsyncConnection[Any], oid: int,
                        limits: ReadLimits) -> tuple[list[ForeignKey], list[ForeignKey]]:
    cur = await conn.execute(_FOREIGN_KEYS, {"oid": oid, "small": limits.count_max_bytes, "schema": browse.SCHEMA})
    outgoing: list[ForeignKey] = []
    incoming: list[ForeignKey] = []
    for name, out, inc, src, tgt, cols, ref_cols, cheap in await cur.fetchall():
        fk = ForeignKey(name, src, tuple(cols), tgt, tuple(ref_cols), bool(cheap))
        if out:
            outgoing.append(fk)
        if inc:
            incoming.append(fk)
    return outgoing, incoming[:MAX_INCOMING]


def linkable(type_name: str) -> bool:
    """Whether values of this type can travel as filter text (not bytea: base64 here; not json; no arrays)."""
    return _base(type_name) not in ("bytea", "json", "jsonb") and not type_name.endswith("]")


def row_key(row: dict[str, Any], columns: Sequence[str]) -> tuple[str, ...] | None:
    """The row's values in ``columns`` as filter text, or None when one is NULL or cannot travel as text."""
    parts = [key_text(row.get(c)) for c in columns]
    return tuple(p for p in parts if p is not None) if all(p is not None for p in parts) else None


async def _referrers(conn: AsyncConnection[Any], fk: ForeignKey, rows: list[dict[str, Any]],
                     types: dict[str, str], limits: ReadLimits) -> list[Referrers]:
    if not all(linkable(types.get(c, "")) for c in fk.ref_columns):
        return [Referrers(fk, None, None) for _ in rows]
    keys = [row_key(r, fk.ref_columns) for r in rows]
    wanted = sorted({k for k in keys if k is not None})
    counts: dict[tuple[str, ...], int] = {}
    if wanted and fk.cheap_to_count:
        p_cols = sql.SQL(", ").join(sql.Identifier("p", c) for c in fk.ref_columns)
        match = sql.SQL(" AND ").join(sql.SQL("r.{} = p.{}").format(sql.Identifier(c), sql.Identifier(rc))
                                      for c, rc in zip(fk.columns, fk.ref_columns, strict=True))
        one = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() for _ in fk.ref_columns))
        query = sql.SQL("SELECT {cols}, (SELECT count(*) FROM (SELECT 1 FROM {src} r WHERE {match} LIMIT {cap}) s) "
                        "FROM {tgt} p WHERE ({cols}) IN ({keys})").format(
            cols=p_cols, src=sql.Identifier(browse.SCHEMA, fk.table), match=match,
            cap=sql.Literal(REF_COUNT_CAP + 1), tgt=sql.Identifier(browse.SCHEMA, fk.ref_table),
            keys=sql.SQL(", ").join(one for _ in wanted))
        for rec in await _timed(conn, limits, query, [v for k in wanted for v in k]) or []:
            key = row_key({str(i): browse.json_value(v) for i, v in enumerate(rec[:-1])},
                          [str(i) for i in range(len(rec) - 1)])
            if key is not None:
                counts[key] = int(rec[-1])
    return [Referrers(fk, k, counts.get(k) if k is not None else None) for k in keys]


# -- the page ------------------------------------------------------------------------------------------


async def read_grid(conn: AsyncConnection[Any], table: str, *, limits: ReadLimits, limit: int, offset: int,
                    order_by: Sequence[tuple[str, bool]] | None = None, filters: Sequence[Filter] = (),
                    search: str | None = None) -> GridPage:
    """One page of ``table`` narrowed by ``filters`` (ANDed) and ``search``, with its count and foreign keys.

    Raises ``NotFound`` (no such table, with a "did you mean"), :class:`BadFilter` (an unknown column or
    operator, a value that is not valid for the column's type, an operator the type lacks, a search on a
    table without text columns), ``InvalidInput`` (an unknown or unsortable sort column), ``ReadTimeout``,
    ``UnreadableTable``. ``limit``/``offset`` are validated by the caller.
    """
    async with browse.read_only(conn, limits):
        with browse.translated(table):
            rel = await browse._resolve(conn, table)
        columns = rel.info.columns
        target = sql.Identifier(browse.SCHEMA, rel.info.name)
        where, searched = _build_where(columns, rel.info.name, filters, search)
        with browse.translated(table, reading=True):
            await _check_types(conn, target, where, filters, {c.name: c for c in columns})
        query = sql.SQL("SELECT {cols} FROM {table}{where}{order} LIMIT %s OFFSET %s").format(
            cols=sql.SQL(", ").join(sql.Identifier(c.name) for c in columns), table=target, where=where.sql(),
            order=browse._order_by(rel, order_by))
        rows: list[dict[str, Any]] = []
        truncated, budget = False, limits.max_page_bytes
        with browse.translated(table, reading=True, sorting=bool(order_by)):
            async with conn.cursor() as cur:
                browse._install_loaders(cur)
                await cur.execute(query, [*where.params, limit, offset])
                names = [c.name for c in columns]
                for record in await cur.fetchall():
                    row = {n: browse.json_value(v) for n, v in zip(names, record, strict=True)}
                    budget -= browse._size(row)
                    if budget < 0 and rows:
                        truncated = True
                        break
                    rows.append(row)
        with browse.translated(table, reading=True):
            if not truncated and len(rows) < limit and (rows or offset == 0):
                count = RowCount(offset + len(rows), exact=True)
            else:
                count = await _count(conn, rel, target, where, limits)
            outgoing, incoming = await _foreign_keys(conn, rel.oid, limits)
            types = {c.name: c.type for c in columns}
            per_fk = [await _referrers(conn, fk, rows, types, limits) for fk in incoming]
    referrers = [[refs[i] for refs in per_fk] for i in range(len(rows))]
    return GridPage(table=rel.info.name, kind=rel.info.kind, columns=columns, primary_key=rel.info.primary_key,
                    rows=rows, limit=limit, offset=offset, count=count, truncated=truncated, searched=searched,
                    outgoing=outgoing, incoming=incoming, referrers=referrers)


async def table_counts(conn: AsyncConnection[Any], limits: ReadLimits, *,
                       max_estimates: int = 200) -> dict[str, RowCount]:
    """Each relation's row count for the tables panel: exact for tables while their heaps add up to at most
    ``count_max_bytes``; else ``reltuples`` when analysed, else the planner's estimate (first
    ``max_estimates`` relations). Raises what :func:`browse.translated` raises."""
    out: dict[str, RowCount] = {}
    budget = limits.count_max_bytes
    async with browse.read_only(conn, limits):
        with browse.translated(reading=True):
            for rel in await browse._relations(conn):
                target = sql.Identifier(browse.SCHEMA, rel.info.name)
                if rel.heap_bytes is not None and rel.heap_bytes <= budget:
                    budget -= rel.heap_bytes
                    cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target))
                    row = await cur.fetchone()
                    out[rel.info.name] = RowCount(int(row[0]) if row else 0, exact=True)
                elif rel.info.estimated_rows is not None:
                    out[rel.info.name] = RowCount(rel.info.estimated_rows, exact=False)
                elif max_estimates > 0:
                    max_estimates -= 1
                    try:
                        async with conn.transaction():  # a savepoint: a broken view costs its count only
                            out[rel.info.name] = RowCount(await _estimate(conn, target, _Where()), exact=False)
                    except psycopg.Error:
                        continue
    return out
