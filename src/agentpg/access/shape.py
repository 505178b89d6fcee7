"""What the query path needs to know about a statement's form, from one parse.

:class:`Shape` says whether the statement returns rows, whether it is DML, and whether (and where) it can
be wrapped in the server-side row-size check (:func:`bounded_statement`). The classifier computes it from
the parse it already made (:attr:`agentpg.access.classify.Classification.shape`), and the service caches
the classification per statement text, so an agent's repeated statement is parsed once; :func:`shape_of`
parses for the callers that have no classification (agentpg's own introspection statements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pglast
from pglast import ast

#: What the server's refusal of a row over the read bound says (an ``int4`` cast error carrying the row's size).
ROW_TOO_LARGE = "agentpg:row-too-large:"


@dataclass(frozen=True)
class Shape:
    returns_rows: bool
    """SELECT/VALUES/TABLE (not SELECT INTO), SHOW, EXPLAIN, CALL, and DML with RETURNING."""
    is_dml: bool
    wrap: tuple[Literal["query", "dml"], int] | None = None
    """(kind, end of the statement in characters, before any ``;``) if it can be wrapped in the row check."""


UNKNOWN = Shape(returns_rows=True, is_dml=False)
"""Unparseable text: counted as row-returning and not DML (the server will say what is wrong with it)."""


def shape_of(statement: str) -> Shape:
    """The shape of ``statement``'s (first) statement; parses it (prefer a classification's ``shape``)."""
    try:
        parsed = pglast.parse_sql(statement)
    except Exception:
        return UNKNOWN
    return shape_of_parsed(parsed, statement)


def shape_of_parsed(parsed: Any, statement: str) -> Shape:
    """The shape from pglast's parse of ``statement`` (a sequence of ``RawStmt``)."""
    if not parsed:
        return UNKNOWN
    raw = parsed[0]
    stmt = raw.stmt
    if isinstance(stmt, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt):
        returns_rows, is_dml = stmt.returningClause is not None, True
    elif isinstance(stmt, ast.SelectStmt):
        returns_rows, is_dml = stmt.intoClause is None, False
    else:
        returns_rows, is_dml = isinstance(stmt, ast.ExplainStmt | ast.VariableShowStmt | ast.CallStmt), False
    return Shape(returns_rows, is_dml, _wrap_plan(parsed, statement) if returns_rows else None)


def _wrap_plan(parsed: Any, statement: str) -> tuple[Literal["query", "dml"], int] | None:
    if len(parsed) != 1:
        return None
    raw = parsed[0]
    stmt = raw.stmt
    kind: Literal["query", "dml"]
    if isinstance(stmt, ast.SelectStmt):
        if stmt.intoClause is not None or _modifies(stmt.withClause):
            return None
        kind = "query"
    elif isinstance(stmt, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
        if stmt.returningClause is None or stmt.withClause is not None:
            return None
        kind = "dml"
    else:
        return None
    if not raw.stmt_len:  # to the end of the text
        return kind, len(statement)
    end_byte = (raw.stmt_location or 0) + raw.stmt_len
    return kind, len(statement.encode("utf-8")[:end_byte].decode("utf-8", errors="ignore"))


def _modifies(with_clause: ast.WithClause | None) -> bool:
    """A ``WITH`` holding INSERT/UPDATE/DELETE/MERGE (which must stay at the top level)."""
    if with_clause is None:
        return False
    return any(isinstance(getattr(cte, "ctequery", None), ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt
                          | ast.MergeStmt) for cte in with_clause.ctes or ())


@dataclass(frozen=True)
class BoundedStatement:
    """An agent statement wrapped so the server itself refuses to send a row over the read bound."""

    text: str
    offset: int
    """Characters before the agent's statement in ``text`` (error positions are moved back by this much)."""


def bounded_statement(statement: str, row_bound: int, shape: Shape | None = None) -> BoundedStatement | None:
    """``statement`` wrapped so that the server raises an error instead of sending a row whose size is over
    ``row_bound`` bytes (serve never has to take in a value it would only throw away); None for statements
    that cannot be wrapped (not one statement, not a query or DML ``RETURNING``, a query with data-modifying
    ``WITH``). Still one statement, same columns (names, types, modifiers) and, for a query, same row order
    (a subquery with ORDER BY is not flattened)::

        SELECT _apg.* FROM (<query>) AS _apg WHERE <row size check>
        WITH _apg AS (<INSERT/UPDATE/DELETE … RETURNING>) SELECT _apg.* FROM _apg WHERE <row size check>
    """
    plan = (shape or shape_of(statement)).wrap
    if plan is None:
        return None
    kind, end = plan
    # pg_column_size of the whole row: its values' size in memory, detoasted and decompressed (a whole-row
    # value is flattened); the text sent is about as large (text, json), at most a few times larger (bytea
    # hex, arrays of small numbers). Cheaper than measuring the text form (0.3 vs 0.7 us a row).
    check = (f"WHERE CASE WHEN pg_catalog.pg_column_size(_apg.*) <= {int(row_bound)} THEN true "
             f"ELSE pg_catalog.int4(pg_catalog.concat('{ROW_TOO_LARGE}', pg_catalog.pg_column_size(_apg.*))) "
             "IS NULL END")
    if kind == "query":
        prefix, suffix = "SELECT _apg.* FROM (", f"\n) AS _apg {check}"
    else:
        prefix, suffix = "WITH _apg AS (", f"\n) SELECT _apg.* FROM _apg {check}"
    return BoundedStatement(text=prefix + statement[:end] + suffix, offset=len(prefix))
