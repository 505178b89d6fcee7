"""The explorer's read-only SQL box: one statement the user types, run so that it can only read.

In order, for every statement:

1. **Classified** by :func:`agentpg.access.classify.classify` (pglast, Postgres' own parser), exactly as an
   agent's statement is: several statements, transaction control, ``SET``, ``COPY``, ``DO``, forbidden
   functions (``set_config``, ``pg_read_file``, ``dblink``…) are refused with the classifier's message. Then
   the box's own rules: only a read (``SELECT``/``VALUES``/``TABLE``/``WITH``, or ``EXPLAIN`` of one), and only
   of relations in schema ``public`` (no system catalogs, no ``agentpg_internal``: nothing about roles).
2. **Not as a superuser**: the connection's role is asked (``is_superuser``) and a superuser's credentials
   (possible for a database the platform brought) are refused outright.
3. **Run** by :class:`agentpg.access.query.TenantQueries` through the app's tenant pools: one statement over
   the extended protocol (the server itself refuses a second one), in its own transaction made
   ``READ ONLY`` before the statement runs (so Postgres refuses any write, whatever a function tries), with
   ``SET LOCAL statement_timeout`` and a cancel from outside if it overruns, streamed and capped at
   :attr:`SqlLimits.max_rows` rows / :attr:`SqlLimits.max_result_bytes` bytes, and always rolled back.
4. **Scrubbed**: every value, column name and message has agentpg's internal names (``apg_…`` roles and
   databases, the connection's own role) replaced, so the page never shows a role name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

from agentpg.access.classify import Classification, RejectedStatement, StatementKind, classify
from agentpg.access.pools import TenantPools
from agentpg.access.query import QueryLimits, TenantQueries, Terminate
from agentpg.access.results import ColumnInfo, StatementFailed
from agentpg.errors import AgentpgError, PermissionDenied

MAX_SQL_CHARS: Final = 100_000
INTERNAL: Final = "[internal name]"
_INTERNAL_NAME = re.compile(r"\bapg_[A-Za-z0-9_]+")


@dataclass(frozen=True)
class SqlLimits:
    max_rows: int = 1000
    max_result_bytes: int = 4_000_000
    statement_timeout_s: float = 10.0
    cancel_grace_s: float = 2.0


class SqlRefused(AgentpgError):
    """The statement was refused before it reached the database."""

    status = 422
    code = "sql_refused"


class SqlFailed(AgentpgError):
    """The database refused or failed the statement (its message, scrubbed)."""

    status = 422
    code = "sql_failed"


@dataclass(frozen=True)
class SqlResult:
    columns: list[ColumnInfo]
    rows: list[list[Any]]
    truncated: bool
    truncated_by: str | None
    duration_ms: float
    command: str


class Scrubber:
    """Replaces agentpg's internal names (and the connection's role, whatever the provider calls it)."""

    def __init__(self, uri: str) -> None:
        self.role = unquote(urlsplit(uri).username or "")

    def text(self, value: str) -> str:
        value = _INTERNAL_NAME.sub(INTERNAL, value)
        if len(self.role) >= 3 and self.role in value:
            value = value.replace(self.role, INTERNAL)
        return value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        return value


def _outside_public(name: str) -> bool:
    parts = name.split(".")
    if len(parts) > 1:
        return parts[-2] != "public"
    return name.startswith("pg_")


def check_statement(statement: str, classify: Callable[[str], Classification] = classify) -> Classification:
    """The statement's classification if the box may run it (a read, or EXPLAIN of one), else ``SqlRefused``."""
    if not statement.strip():
        raise SqlRefused("type one SELECT statement to run")
    if len(statement) > MAX_SQL_CHARS:
        raise SqlRefused(f"the statement is longer than {MAX_SQL_CHARS:,} characters")
    try:
        c = classify(statement)
    except RejectedStatement as exc:
        raise SqlRefused(exc.message) from None
    if not (c.kind is StatementKind.READ or (c.kind is StatementKind.OTHER and c.command.startswith("EXPLAIN"))):
        raise SqlRefused(f"the SQL box only reads, and {c.command} is not a read: it runs SELECT (or EXPLAIN of "
                         "a SELECT). Agents change data through MCP's execute tool.")
    outside = sorted(n for n in c.tables_read if _outside_public(n))
    if outside:
        raise SqlRefused("the SQL box reads your tables in schema public only; system catalogs and other "
                         f"schemas are not available here ({', '.join(outside)}). A table of yours whose "
                         "name starts with pg_ can be named public.pg_…")
    return c


async def _refuse_superuser(pools: TenantPools, uri: str) -> None:
    async with pools.connection(uri) as conn:
        cur = await conn.execute("SELECT pg_catalog.current_setting('is_superuser')")
        row = cast("tuple[Any, ...] | None", await cur.fetchone())
    if row is None or row[0] != "off":
        raise PermissionDenied("this database's credentials are a superuser's, and the SQL box never runs as a "
                               "superuser; read its tables through the table browser instead")


async def run_sql(pools: TenantPools, uri: str, statement: str, limits: SqlLimits | None = None, *,
                  classify: Callable[[str], Classification] = classify,
                  terminate: Terminate | None = None) -> SqlResult:
    """Check, then run ``statement`` read-only on ``uri`` (see the module docstring). ``classify``: the
    service's cached one (:class:`agentpg.service.statements.Statements`); ``terminate``: the service's reaper."""
    limits = limits or SqlLimits()
    checked = check_statement(statement, classify)
    await _refuse_superuser(pools, uri)
    scrub = Scrubber(uri)
    queries = TenantQueries(pools, QueryLimits(max_rows=limits.max_rows, max_result_bytes=limits.max_result_bytes,
                                               statement_timeout_s=limits.statement_timeout_s,
                                               cancel_grace_s=limits.cancel_grace_s), terminate=terminate)
    try:
        result = await queries.run(uri, statement, None, read_only=True, shape=checked.shape)
    except StatementFailed as exc:
        raise SqlFailed(scrub.text(exc.message).replace("your agent role", "the explorer's session")) from None
    return SqlResult(columns=[ColumnInfo(name=scrub.text(c.name), type=c.type) for c in result.columns],
                     rows=[scrub.value(r) for r in result.rows], truncated=result.truncated,
                     truncated_by=result.truncated_by, duration_ms=result.duration_ms, command=checked.command)
