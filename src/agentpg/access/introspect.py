"""What an agent can learn about a database's tables, asked as the agent's own role (READ ONLY, bound values).

Postgres lets any role with CONNECT read the system catalogs, so these queries reveal names and shapes, not
data; the ``privileges`` they report are the role's own (``has_table_privilege``), which is what an agent
needs to know before it tries a statement.
"""

from __future__ import annotations

from typing import Any

from agentpg.access.query import TenantQueries
from agentpg.errors import NotFound

_KIND = """CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'partitioned table' WHEN 'v' THEN 'view'
    WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table' END"""
_PRIVILEGES = """array_remove(ARRAY[
    CASE WHEN has_table_privilege(c.oid, 'SELECT') THEN 'select' END,
    CASE WHEN has_table_privilege(c.oid, 'INSERT') THEN 'insert' END,
    CASE WHEN has_table_privilege(c.oid, 'UPDATE') THEN 'update' END,
    CASE WHEN has_table_privilege(c.oid, 'DELETE') THEN 'delete' END], NULL)"""
_ESTIMATE = "CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END"

LIST_TABLES = f"""
SELECT c.relname AS name, {_KIND} AS kind, {_ESTIMATE} AS estimated_rows, {_PRIVILEGES} AS privileges,
       obj_description(c.oid, 'pg_class') AS comment
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND n.nspname <> 'agentpg_internal' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
ORDER BY c.relname
"""


def _columns_of(keys: str, relation: str) -> str:
    """SQL: the names of the columns numbered in array ``keys`` of ``relation``, in key order, as JSON."""
    return (f"(SELECT json_agg(a.attname ORDER BY k.ord) FROM unnest({keys}) WITH ORDINALITY AS k(attnum, ord) "
            f"JOIN pg_catalog.pg_attribute a ON a.attrelid = {relation} AND a.attnum = k.attnum)")


_ACTION = "CASE {0} WHEN 'a' THEN 'no action' WHEN 'r' THEN 'restrict' WHEN 'c' THEN 'cascade' " \
          "WHEN 'n' THEN 'set null' WHEN 'd' THEN 'set default' END"

DESCRIBE_TABLE = f"""
SELECT n.nspname AS schema, c.relname AS name, {_KIND} AS kind, {_ESTIMATE} AS estimated_rows,
       {_PRIVILEGES} AS privileges, obj_description(c.oid, 'pg_class') AS comment,
  (SELECT json_agg(json_build_object('name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
                                     'nullable', NOT a.attnotnull, 'default', pg_get_expr(d.adbin, d.adrelid),
                                     'comment', col_description(c.oid, a.attnum)) ORDER BY a.attnum)
     FROM pg_catalog.pg_attribute a
     LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
  (SELECT {_columns_of("con.conkey", "con.conrelid")}
     FROM pg_catalog.pg_constraint con WHERE con.conrelid = c.oid AND con.contype = 'p') AS primary_key,
  (SELECT json_agg(json_build_object(
            'name', con.conname, 'columns', {_columns_of("con.conkey", "con.conrelid")},
            'references', con.confrelid::regclass::text,
            'referenced_columns', {_columns_of("con.confkey", "con.confrelid")},
            'on_update', {_ACTION.format("con.confupdtype")}, 'on_delete', {_ACTION.format("con.confdeltype")},
            'definition', pg_get_constraintdef(con.oid)) ORDER BY con.conname)
     FROM pg_catalog.pg_constraint con WHERE con.conrelid = c.oid AND con.contype = 'f') AS foreign_keys,
  (SELECT json_agg(json_build_object(
            'name', con.conname,
            'type', CASE con.contype WHEN 'u' THEN 'unique' WHEN 'c' THEN 'check' ELSE 'exclusion' END,
            'columns', {_columns_of("con.conkey", "con.conrelid")},
            'definition', pg_get_constraintdef(con.oid)) ORDER BY con.conname)
     FROM pg_catalog.pg_constraint con WHERE con.conrelid = c.oid AND con.contype IN ('u', 'c', 'x')
  ) AS constraints,
  (SELECT json_agg(json_build_object(
            'name', i.relname, 'unique', x.indisunique, 'primary', x.indisprimary, 'method', am.amname,
            'columns', (SELECT json_agg(pg_get_indexdef(x.indexrelid, k, true) ORDER BY k)
                          FROM generate_series(1, x.indnkeyatts::int) AS k),
            'valid', x.indisvalid, 'definition', pg_get_indexdef(x.indexrelid)) ORDER BY i.relname)
     FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid
     JOIN pg_catalog.pg_am am ON am.oid = i.relam
    WHERE x.indrelid = c.oid) AS indexes
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname <> 'agentpg_internal'
"""


async def list_tables(queries: TenantQueries, uri: str, schema: str) -> dict[str, Any]:
    """Tables, views and materialized views of ``schema``, with this role's privileges on each."""
    result = await queries.run(uri, LIST_TABLES, [schema], read_only=True)
    names = [c.name for c in result.columns]
    tables = [dict(zip(names, row, strict=True)) for row in result.rows]
    return {"schema": schema, "tables": tables, "truncated": result.truncated}


async def describe_table(queries: TenantQueries, uri: str, table: str) -> dict[str, Any]:
    """Columns, keys, constraints, indexes, row estimate and this role's own privileges of ``table``
    (``name`` or ``schema.name``, quoted as in SQL when needed). Keys: ``primary_key`` (column names),
    ``foreign_keys`` (name, columns, references, referenced_columns, on_update, on_delete, definition),
    ``constraints`` (name, type unique/check/exclusion, columns, definition), ``indexes`` (name, columns or
    expressions, unique, primary, method, valid, definition), ``privileges`` (select/insert/update/delete,
    as ``has_table_privilege`` answers for this role). Raises ``NotFound`` when no such table is visible."""
    result = await queries.run(uri, DESCRIBE_TABLE, [table], read_only=True)
    if not result.rows:
        raise NotFound(f"no table, view or materialized view named {table!r}; list_tables shows what exists "
                       "(quote mixed-case names as in SQL, e.g. '\"MyTable\"')")
    names = [c.name for c in result.columns]
    described = dict(zip(names, result.rows[0], strict=True))
    for key in ("columns", "primary_key", "foreign_keys", "constraints", "indexes"):
        described[key] = described[key] or []
    return described
