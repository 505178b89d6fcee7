"""The agent tools as MCP sees them: argument and result shapes, annotations, and text renderings.

Arguments and results are Pydantic models, so each tool's ``inputSchema``/``outputSchema`` is their JSON
schema and arguments are validated once, here. Databases are named logically — ``"global"`` and
``"agent"`` — and nothing an agent can pass names a host, DSN, role or another tenant.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal, TypedDict

from mcp import types
from pydantic import BaseModel, ConfigDict, Field

Database = Literal["global", "agent"]
JsonParam = str | int | float | bool | None | list[Any] | dict[str, Any]

_DATABASE = Field(description='"global": your user\'s database, shared by all its agents (what you may do '
                              'there depends on your permissions). "agent": your own private database.')


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListDatabasesArgs(_Args):
    pass


class ListTablesArgs(_Args):
    database: Database = _DATABASE
    schema_name: str = Field(default="public", alias="schema", min_length=1, max_length=63,
                             description="Schema to list (default public).")


class DescribeTableArgs(_Args):
    database: Database = _DATABASE
    table: str = Field(min_length=1, max_length=200,
                       description='Table name, or schema.name; quote mixed-case names as in SQL ("MyTable").')


class QueryArgs(_Args):
    database: Database = _DATABASE
    sql: str = Field(min_length=1, max_length=1_000_000,
                     description="Exactly one read-only SQL statement (SELECT, VALUES, TABLE, EXPLAIN, SHOW); "
                                 "use $1, $2 ... for values.")
    params: list[JsonParam] | None = Field(default=None, max_length=1000,
                                           description="Values for $1, $2 ... (sent separately, never "
                                                       "spliced into the SQL).")
    max_rows: int | None = Field(default=None, ge=1, le=100_000,
                                 description="Return at most this many rows (the server caps it too).")


class ExecuteArgs(_Args):
    database: Database = _DATABASE
    sql: str = Field(min_length=1, max_length=1_000_000,
                     description="Exactly one SQL statement: INSERT, UPDATE, DELETE, MERGE, CREATE, ALTER, "
                                 "DROP ...; use $1, $2 ... for values.")
    params: list[JsonParam] | None = Field(default=None, max_length=1000,
                                           description="Values for $1, $2 ... (sent separately).")


class ExplainArgs(_Args):
    database: Database = _DATABASE
    sql: str = Field(min_length=1, max_length=1_000_000,
                     description="Exactly one statement to plan (SELECT, VALUES, TABLE, INSERT, UPDATE, DELETE, "
                                 "MERGE), without EXPLAIN; use $1, $2 ... for values. A write is never executed.")
    params: list[JsonParam] | None = Field(default=None, max_length=1000,
                                           description="Values for $1, $2 ... (sent separately).")
    analyze: bool = Field(default=False, description="Also run it (EXPLAIN ANALYZE) for actual times and rows: "
                                                     "read-only statements only, with the query tool's limits.")


class CheckpointArgs(_Args):
    database: Literal["global", "agent", "both"] = Field(
        description='"global", "agent", or "both" (one checkpoint of each, taken together: an agent run\'s).')
    name: str | None = Field(default=None, min_length=1, max_length=128,
                             description="A name to find it by later (default: the time).")


class ListCheckpointsArgs(_Args):
    database: Database = _DATABASE


class RestoreArgs(_Args):
    checkpoint_id: str | None = Field(default=None, max_length=64, description="A checkpoint of your agent "
                                                                                "database (list_checkpoints).")
    at: datetime | None = Field(default=None, description="A time in the retention window (ISO 8601, UTC).")
    before_audit_id: int | None = Field(default=None, ge=1, description="Restore to just before this audited "
                                                                       "statement ran (its audit id).")
    mode: Literal["in_place", "new"] = Field(default="in_place", description='"in_place" (the current state is '
                                             'checkpointed first, so this can be undone) or "new" (a copy the '
                                             'user can inspect).')


class CheckpointsOutput(BaseModel):
    checkpoints: list[dict[str, Any]]


class RestoreOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    mode: str
    status: str


class Column(BaseModel):
    name: str
    type: str


class StatementOutput(BaseModel):
    """The structured result of ``query`` and ``execute``."""

    database: Database
    columns: list[Column]
    rows: list[list[Any]]
    row_count: int
    truncated: bool
    duration_ms: float
    command: str | None = None
    rows_affected: int | None = None


class StatementContent(TypedDict):
    """:class:`StatementOutput` as the plain dict sent as ``structuredContent`` (the same keys, in the same
    order): the hot path builds this directly instead of a model per call."""

    database: str
    columns: list[dict[str, str]]
    rows: list[list[Any]]
    row_count: int
    truncated: bool
    duration_ms: float
    command: str | None
    rows_affected: int | None


class ExplainOutput(BaseModel):
    """The structured result of ``explain``."""

    model_config = ConfigDict(extra="allow")  # actual_rows, execution_ms, planning_ms with analyze

    database: Database
    command: str
    analyzed: bool
    total_cost: float | None
    startup_cost: float | None
    estimated_rows: float | None
    node_types: list[str]
    uses_index: bool
    indexes: list[str]
    seq_scans: list[str]
    plan: dict[str, Any]
    plan_truncated: bool
    duration_ms: float


class DatabasesOutput(BaseModel):
    databases: list[dict[str, Any]]


class TablesOutput(BaseModel):
    database: Database
    schema_name: str = Field(alias="schema")
    tables: list[dict[str, Any]]
    truncated: bool


class TableOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    database: Database
    schema_name: str = Field(alias="schema")
    name: str
    kind: str
    columns: list[dict[str, Any]]


_READ = types.ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

ARGS: dict[str, type[_Args]] = {
    "list_databases": ListDatabasesArgs, "list_tables": ListTablesArgs, "describe_table": DescribeTableArgs,
    "query": QueryArgs, "explain": ExplainArgs, "execute": ExecuteArgs, "checkpoint": CheckpointArgs,
    "list_checkpoints": ListCheckpointsArgs, "restore": RestoreArgs,
}


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(by_alias=True)


def tool_list() -> list[types.Tool]:
    """The tools, with truthful annotations: only ``execute`` can change anything.

    ``query`` and ``execute`` return structured content (:class:`StatementOutput`, documented in docs/mcp.md)
    but declare no ``outputSchema``: the SDK client re-validates a declared schema with ``jsonschema`` on
    every call, re-checking the schema itself against the 2020-12 metaschema each time, which cost 6-10 ms
    per call for this schema (2-4 ms for a flattened one) on the hot path. The other three tools keep theirs.
    """
    return [
        types.Tool(name="list_databases", title="List databases",
                   description="The databases you can use: \"global\" (shared by all your user's agents) and "
                               "\"agent\" (yours alone), with what your permissions allow in each.",
                   input_schema=_schema(ListDatabasesArgs), output_schema=_schema(DatabasesOutput),
                   annotations=_READ),
        types.Tool(name="list_tables", title="List tables",
                   description="Tables and views of one schema of a database, with your privileges on each.",
                   input_schema=_schema(ListTablesArgs), output_schema=_schema(TablesOutput), annotations=_READ),
        types.Tool(name="describe_table", title="Describe a table",
                   description="Columns (types, nullability, defaults), primary key, foreign keys, other "
                               "constraints, indexes and estimated row count of one table.",
                   input_schema=_schema(DescribeTableArgs), output_schema=_schema(TableOutput), annotations=_READ),
        types.Tool(name="query", title="Run a read-only query",
                   description="Run ONE read-only SQL statement in a READ ONLY transaction and return its "
                               "rows (at most max_rows; 'truncated' says if there were more). Writes, DDL, "
                               "several statements, transaction control and SET are refused.",
                   input_schema=_schema(QueryArgs), annotations=_READ),
        types.Tool(name="explain", title="Explain a statement's plan",
                   description="The plan and estimated cost of ONE statement (EXPLAIN, FORMAT JSON): total "
                               "cost, estimated rows, node types, which indexes are used, and the plan. Writes "
                               "are planned, never executed. analyze: true also runs a read-only statement "
                               "for actual times. You may explain only what you could run.",
                   input_schema=_schema(ExplainArgs), output_schema=_schema(ExplainOutput), annotations=_READ),
        types.Tool(name="execute", title="Run a write or DDL statement",
                   description="Run ONE SQL statement that may change data or schema (INSERT/UPDATE/DELETE/"
                               "MERGE, CREATE/ALTER/DROP ...), in its own transaction, committed if it "
                               "succeeds. RETURNING rows come back like query results.",
                   input_schema=_schema(ExecuteArgs),
                   annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                                     idempotent_hint=False, open_world_hint=False)),
        types.Tool(name="checkpoint", title="Checkpoint a database",
                   description="Mark the current state of a database (or of both) so it can be restored later: "
                               "take one before risky changes. Instant and free, whatever the size.",
                   input_schema=_schema(CheckpointArgs), output_schema=_schema(CheckpointsOutput),
                   annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                                     idempotent_hint=False, open_world_hint=False)),
        types.Tool(name="list_checkpoints", title="List checkpoints",
                   description="Checkpoints of a database, newest first, with who made them.",
                   input_schema=_schema(ListCheckpointsArgs), output_schema=_schema(CheckpointsOutput),
                   annotations=_READ),
        types.Tool(name="restore", title="Restore your agent database",
                   description="Bring YOUR agent database back to a checkpoint, a time, or just before an "
                               "audited statement (the global database is restored by your user). In place, "
                               "the current state is checkpointed first, so a restore can itself be undone.",
                   input_schema=_schema(RestoreArgs), output_schema=_schema(RestoreOutput),
                   annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                                     idempotent_hint=False, open_world_hint=False)),
    ]


def enabled_tools(all_tools: list[types.Tool], enabled: frozenset[str] | None) -> list[types.Tool]:
    """The tools of ``all_tools`` a workspace's agent is offered (``enabled`` None: all of them)."""
    return all_tools if enabled is None else [t for t in all_tools if t.name in enabled]


# -- text renderings (the short form clients show a model that does not read structuredContent) ------------


def _row_line(row: list[Any]) -> str:
    return json.dumps(row, ensure_ascii=False, separators=(", ", ": "), default=str)


def render_statement(out: StatementContent, row_lines: list[str] | None = None) -> str:
    """``row_lines``: the rows already as JSON text (the query path has them), else rendered here."""
    row_count, columns, rows_affected = out["row_count"], out["columns"], out["rows_affected"]
    head = f"{row_count} row{'s' if row_count != 1 else ''}" if columns or not out["command"] else out["command"]
    if rows_affected is not None:
        head += f" ({rows_affected} row{'s' if rows_affected != 1 else ''} affected)"
    head += f" in {out['duration_ms']:g} ms"
    if out["truncated"]:
        head += "; TRUNCATED, more rows exist: narrow the query (WHERE, LIMIT, fewer columns)"
    if not columns:
        return head
    rows = out["rows"]
    if row_lines is None or len(row_lines) != len(rows):
        row_lines = [_row_line(r) for r in rows]
    return "\n".join([head, "columns: " + ", ".join(f"{c['name']} ({c['type']})" for c in columns), *row_lines])


def render_databases(out: DatabasesOutput) -> str:
    lines = []
    for db in out.databases:
        perms = db.get("permissions")
        if perms is None:
            access = "full access"
        else:
            flags = [k for k in ("can_read", "can_write", "can_create_tables", "can_drop_tables") if perms.get(k)]
            access = ", ".join(flags) or "no rights"
            if perms.get("allowed_tables") is not None:
                access += "; only tables: " + (", ".join(perms["allowed_tables"]) or "none")
        lines.append(f"{db['name']}: {db['description']} ({access})")
    return "\n".join(lines)


def render_tables(out: TablesOutput) -> str:
    if not out.tables:
        return f"no tables in schema {out.schema_name} of the {out.database} database"
    lines = [f"{len(out.tables)} relation(s) in {out.database}.{out.schema_name}:"]
    for t in out.tables:
        rows = "" if t.get("estimated_rows") is None else f", ~{t['estimated_rows']} rows"
        privileges = ", ".join(t.get("privileges") or []) or "no access"
        lines.append(f"- {t['name']} ({t['kind']}{rows}; you may: {privileges})")
    return "\n".join(lines)


def render_table(out: TableOutput) -> str:
    extra = out.model_extra or {}
    lines = [f"{out.schema_name}.{out.name} ({out.kind}"
             + ("" if extra.get("estimated_rows") is None else f", ~{extra['estimated_rows']} rows") + ")"]
    for c in out.columns:
        default = f" default {c['default']}" if c.get("default") else ""
        lines.append(f"  {c['name']} {c['type']}{'' if c.get('nullable') else ' not null'}{default}")
    if extra.get("primary_key"):
        lines.append("primary key: " + ", ".join(extra["primary_key"]))
    for key, label in (("foreign_keys", "foreign key"), ("constraints", "constraint"), ("indexes", "index")):
        for item in extra.get(key) or []:
            lines.append(f"{label} {item['name']}: {item['definition']}")
    if "privileges" in extra:
        lines.append("you may: " + (", ".join(extra["privileges"] or []) or "nothing (no privileges on it)"))
    return "\n".join(lines)


def render_explain(out: ExplainOutput) -> str:
    extra = out.model_extra or {}
    head = (f"{out.command} plan: total cost {out.total_cost}, ~{out.estimated_rows} rows"
            + (f"; actual {extra.get('actual_rows')} rows in {extra.get('execution_ms')} ms" if out.analyzed
               else " (estimates; nothing was executed)"))
    lines = [head, "nodes: " + ", ".join(out.node_types)]
    lines.append("indexes used: " + ", ".join(out.indexes) if out.uses_index else "no index used")
    if out.seq_scans:
        lines.append("sequential scans of: " + ", ".join(out.seq_scans))
    lines.append("plan" + (" (deepest levels cut)" if out.plan_truncated else "") + ": "
                 + json.dumps(out.plan, ensure_ascii=False, separators=(",", ":"), default=str))
    return "\n".join(lines)


def render_checkpoints(out: CheckpointsOutput) -> str:
    if not out.checkpoints:
        return "No checkpoints yet."
    return "\n".join(f"{c['id']}  {c['created_at']}  {c['database']}  {c['name']}  (by {c['created_by']})"
                     for c in out.checkpoints)
