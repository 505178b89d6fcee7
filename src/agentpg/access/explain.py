"""The ``explain`` tool's statement and summary: a plan and its estimated cost, never a write executed.

An agent's statement is explained as it would run (same classifier, same permissions, same role); what
this module adds is how: :func:`explain_text` wraps the (already classified) statement in
``EXPLAIN (FORMAT JSON[, ANALYZE])`` and proves by parsing that the wrapping is one ``EXPLAIN`` of exactly
that statement with exactly those options. The caller runs it through the ``query`` path, i.e. in a READ
ONLY transaction with the query limits: Postgres plans a write there (``EXPLAIN`` without ``ANALYZE``
only initialises the executor, which is where table and function privileges are checked) but would refuse
to execute it, so even a wrapping mistake could not write.

:func:`summarize` turns Postgres' JSON plan into what an agent reads first (cost, rows, node types, index
use) and bounds the plan itself (:data:`MAX_PLAN_BYTES`) by cutting its deepest levels.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import pglast
from pglast import ast

from agentpg.access.classify import Classification, RejectedStatement, StatementKind

#: The JSON plan returned is at most about this large; deeper levels are cut (``plan_truncated``) past it.
MAX_PLAN_BYTES: Final = 64 * 1024
#: Node types listed in the summary (distinct, in plan order).
MAX_NODE_TYPES: Final = 12

_PREFIX: Final = "EXPLAIN (FORMAT JSON) "
_PREFIX_ANALYZE: Final = "EXPLAIN (ANALYZE, FORMAT JSON) "
_POSITION = re.compile(r"\(at character (\d+)\)")


def _refuse(reason: str, message: str) -> RejectedStatement:
    return RejectedStatement(message, reason=reason)


def check_explainable(c: Classification, *, analyze: bool) -> None:
    """Refuse what ``explain`` does not take: an ``EXPLAIN`` itself, statements Postgres cannot explain
    (DDL, utility commands), and ``analyze`` of anything but a read (ANALYZE executes the statement).
    Raises :class:`RejectedStatement`."""
    if c.command.startswith("EXPLAIN"):
        raise _refuse("explain_nested", "Pass the statement itself, without EXPLAIN: the explain tool adds it "
                      "(set analyze: true to run a read-only statement and see actual times and rows).")
    if c.kind not in (StatementKind.READ, StatementKind.WRITE):
        raise _refuse("not_explainable", f"{c.command} has no plan to show: explain takes SELECT, VALUES, "
                      "TABLE, INSERT, UPDATE, DELETE and MERGE statements.")
    if analyze and c.kind is not StatementKind.READ:
        raise _refuse("analyze_write", f"analyze: true executes the statement, and {c.command} changes data, "
                      "so it is refused: explain it without analyze (the plan and estimated cost; nothing is "
                      "executed), or run it with the execute tool.")


def explain_text(statement: str, *, analyze: bool) -> tuple[str, int]:
    """The ``EXPLAIN`` to run for ``statement`` and how many characters precede it (for error positions).

    ``statement`` must already have passed the classifier as exactly one statement. The result is parsed
    again: it must be one ``ExplainStmt`` whose options are exactly ``format json`` (and ``analyze``), so no
    text can turn the wrapping into something else. Raises :class:`RejectedStatement` otherwise.
    """
    prefix = _PREFIX_ANALYZE if analyze else _PREFIX
    text = prefix + statement
    try:
        parsed = pglast.parse_sql(text)
    except Exception:
        parsed = ()
    stmt = parsed[0].stmt if len(parsed) == 1 else None
    options = (sorted(o.defname for o in stmt.options or ()) if isinstance(stmt, ast.ExplainStmt) else None)
    if options != (["analyze", "format"] if analyze else ["format"]):
        raise _refuse("not_explainable", "This statement cannot be explained as it is written; send one plain "
                      "SELECT, INSERT, UPDATE, DELETE or MERGE statement (no leading ';').")
    return text, len(prefix)


def shift_positions(message: str, offset: int) -> str:
    """A server error message about the ``EXPLAIN`` with its "(at character N)" moved back to the agent's
    statement (a position inside agentpg's prefix is dropped)."""
    def shift(match: re.Match[str]) -> str:
        position = int(match.group(1)) - offset
        return f"(at character {position})" if position > 0 else ""

    return _POSITION.sub(shift, message)


def summarize(document: Any, *, analyze: bool) -> dict[str, Any]:
    """The summary and the bounded plan of one ``EXPLAIN (FORMAT JSON)`` result (the single value of its
    single row). Keys: ``total_cost``, ``startup_cost``, ``estimated_rows``, ``node_types``, ``uses_index``,
    ``indexes``, ``seq_scans``, ``plan``, ``plan_truncated``; with ``analyze`` also ``actual_rows``,
    ``execution_ms`` and ``planning_ms``. Raises ``ValueError`` if ``document`` is not such a result."""
    if isinstance(document, str):
        document = json.loads(document)
    if not (isinstance(document, list) and document and isinstance(document[0], dict)
            and isinstance(document[0].get("Plan"), dict)):
        raise ValueError("not an EXPLAIN (FORMAT JSON) result")
    top: dict[str, Any] = document[0]
    root: dict[str, Any] = top["Plan"]
    node_types: list[str] = []
    indexes: list[str] = []
    seq_scans: list[str] = []
    for node in _nodes(root):
        kind = str(node.get("Node Type", "?"))
        if kind not in node_types:
            node_types.append(kind)
        index = node.get("Index Name")
        if isinstance(index, str) and index not in indexes:
            indexes.append(index)
        relation = node.get("Relation Name")
        if kind == "Seq Scan" and isinstance(relation, str) and relation not in seq_scans:
            seq_scans.append(relation)
    plan, truncated = bound_plan(top)
    summary: dict[str, Any] = {
        "total_cost": root.get("Total Cost"), "startup_cost": root.get("Startup Cost"),
        "estimated_rows": root.get("Plan Rows"), "node_types": node_types[:MAX_NODE_TYPES],
        "uses_index": bool(indexes), "indexes": indexes, "seq_scans": seq_scans,
        "plan": plan, "plan_truncated": truncated}
    if analyze:
        summary.update(actual_rows=root.get("Actual Rows"), execution_ms=top.get("Execution Time"),
                       planning_ms=top.get("Planning Time"))
    return summary


def _nodes(root: dict[str, Any]) -> list[dict[str, Any]]:
    """Every plan node, parents before children (iterative: a plan can be deep)."""
    out: list[dict[str, Any]] = []
    stack = [root]
    while stack:
        node = stack.pop()
        out.append(node)
        children = node.get("Plans")
        if isinstance(children, list):
            stack.extend(reversed([c for c in children if isinstance(c, dict)]))
    return out


def bound_plan(top: dict[str, Any], limit: int = MAX_PLAN_BYTES) -> tuple[dict[str, Any], bool]:
    """``top`` (one EXPLAIN result) if its JSON is within ``limit`` bytes, else a copy cut at the deepest
    depth that fits; each cut node says how many nodes were left out (``"Plans Omitted"``)."""
    if _size(top) <= limit:
        return top, False
    for depth in (16, 8, 4, 2, 1, 0):
        cut = {**top, "Plan": _cut(top["Plan"], depth)}
        if _size(cut) <= limit:
            return cut, True
    root = top["Plan"]
    return {"Plan": {"Node Type": root.get("Node Type"), "Total Cost": root.get("Total Cost"),
                     "Plan Rows": root.get("Plan Rows"), "Plans Omitted": len(_nodes(root)) - 1}}, True


def _cut(node: dict[str, Any], depth: int) -> dict[str, Any]:
    children = node.get("Plans")
    if not isinstance(children, list):
        return node
    if depth <= 0:
        out = {k: v for k, v in node.items() if k != "Plans"}
        out["Plans Omitted"] = sum(len(_nodes(c)) for c in children if isinstance(c, dict))
        return out
    return {**node, "Plans": [_cut(c, depth - 1) if isinstance(c, dict) else c for c in children]}


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str))
