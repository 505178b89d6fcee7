"""The console's views of history and shape: the audit log as a filterable query history, usage over time
(a chart), and a picture of a database's schema (tables and foreign keys).

* Audit filters (agent, tool, outcome, time range, text in the statement) are query parameters, applied by
  the catalog query (:class:`agentpg.access.audit.AuditFilter`), so a filtered view is a link to share and
  pages on with its filters.
* Usage over time comes from the usage sync's daily samples (:mod:`agentpg.usage.history`). The page holds
  them as a table (the text alternative); the vendored Chart.js (``static/chart.umd.min.js``) draws the chart
  from that table's ``data-*`` attributes, in ``static/console.js``: no inline script, the CSP stays strict.
* The schema picture: the tables (from the API's table list) and foreign keys (from ``pg_constraint``, read in
  a READ ONLY transaction) are rendered as lists, which are the text alternative and the data the vendored
  Cytoscape.js (``static/cytoscape.min.js``) lays out and draws.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, cast, get_args

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from agentpg.errors import NotFound
from agentpg.service import ID_PATTERN, AuditFilter, AuditOutcome
from agentpg.web import data
from agentpg.web.render import PREFIX, render
from agentpg.web.routing import Explorer, PageRoute, Session, WorkspaceInPath

router = APIRouter(route_class=PageRoute, include_in_schema=False)

OUTCOMES: Final = get_args(AuditOutcome)
TOOLS: Final = ("query", "execute", "explain", "list_databases", "list_tables", "describe_table", "checkpoint",
                "list_checkpoints", "restore", "install_extension")
HISTORY_DAYS: Final = (30, 90, 365)
_TOOL = re.compile(r"[a-z][a-z0-9_]{0,31}")
Text = Annotated[str | None, Query(max_length=200)]


# -- audit log as query history ------------------------------------------------------------------------------


def _when(text: str | None, label: str, *, end: bool = False) -> datetime | None:
    """A UTC time from ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM[:SS]`` (a date alone as ``until`` means the end
    of that day); ``ValueError`` with the reason otherwise."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{label} must be a date (2026-01-31) or a date and time (2026-01-31T14:30)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if end and re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
        when += timedelta(days=1)
    return when


def _audit_filter(tool: str | None, outcome: str | None, since: str | None, until: str | None,
                  q: str | None) -> AuditFilter:
    """The filters of the audit page's query string; ``ValueError`` names the one that is not valid."""
    if tool and not _TOOL.fullmatch(tool.strip()):
        raise ValueError("tool must be a tool's name, like query or execute")
    if outcome and outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
    if q and "\x00" in q:
        raise ValueError("the text to search cannot contain NUL characters")
    start, end = _when(since, "from"), _when(until, "until", end=True)
    if start and end and start >= end:
        raise ValueError("the time range is empty: from must be before until")
    return AuditFilter(tool=(tool or "").strip() or None, outcome=outcome or None, since=start, until=end,
                       text=(q or "").strip() or None)


@router.get(PREFIX + "/u/{user_id}/audit")
def audit(request: Request, user_id: str, s: Session,
          cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,19}$")] = None,
          agent: Annotated[str | None, Query(max_length=128)] = None,
          tool: Annotated[str | None, Query(max_length=32)] = None,
          outcome: Annotated[str | None, Query(max_length=16)] = None,
          since: Annotated[str | None, Query(max_length=32)] = None,
          until: Annotated[str | None, Query(max_length=32)] = None, q: Text = None,
          limit: Annotated[int, Query(ge=1, le=500)] = 100) -> Response:
    """The audit log of what each agent ran through MCP, newest first, narrowed by the filters given."""
    workspace_id = agent or None
    if workspace_id is not None and not re.fullmatch(ID_PATTERN, workspace_id):
        raise NotFound(f"workspace {workspace_id!r} does not exist")
    data.get_user(s.ctx, s.principal, user_id)
    if workspace_id is not None:
        data.get_workspace(s.ctx, s.principal, user_id, workspace_id)
    filters = {"agent": workspace_id, "tool": tool, "outcome": outcome, "since": since, "until": until, "q": q}
    error, entries = None, None
    try:
        where = _audit_filter(tool, outcome, since, until, q)
    except ValueError as exc:
        error = str(exc)
    else:
        entries = s.ctx.service.list_audit(user_id, workspace_id=workspace_id, limit=limit, cursor=cursor,
                                           where=where)
    agents_page = data.workspaces(s.ctx, s.principal, user_id, None, 500)
    return render(request, "audit.html", title="Audit log", user_id=user_id, active="audit", entries=entries,
                  agents=agents_page.items, agent=workspace_id, cursor=cursor, limit=limit, filters=filters,
                  filtered=any(v for k, v in filters.items() if k != "agent"), error=error, tools=TOOLS,
                  outcomes=OUTCOMES, status=422 if error else 200)


# -- usage over time --------------------------------------------------------------------------------------


@router.get(PREFIX + "/u/{user_id}/usage")
def usage(request: Request, user_id: str, s: Session,
          days: Annotated[int, Query(ge=1, le=366)] = 90) -> Response:
    """This period's cost of each database, the total and the budget; the cost and storage of each day."""
    report = data.usage(s.ctx, s.principal, user_id)
    names = {ws.id: ws.name for ws in data.workspaces(s.ctx, s.principal, user_id, None, 500).items}
    history = s.ctx.service.usage_history(user_id, days)
    return render(request, "usage.html", title="Usage and budget", user_id=user_id, active="usage", report=report,
                  names=names, history=history, days=days, day_choices=HISTORY_DAYS)


# -- schema picture ---------------------------------------------------------------------------------------

_FOREIGN_KEYS = """
SELECT c.relname, con.conname,
       CASE WHEN rn.nspname = 'public' THEN r.relname ELSE rn.nspname || '.' || r.relname END,
       (SELECT string_agg(a.attname, ', ' ORDER BY k.n) FROM unnest(con.conkey) WITH ORDINALITY AS k(num, n)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num),
       (SELECT string_agg(a.attname, ', ' ORDER BY k.n) FROM unnest(con.confkey) WITH ORDINALITY AS k(num, n)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.num)
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_class r ON r.oid = con.confrelid
JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace
WHERE n.nspname = 'public' AND con.contype = 'f'
ORDER BY 1, 2
"""

MAX_DRAWN_TABLES: Final = 300
"""Beyond this many tables the picture would be unreadable (and slow to lay out): only the lists are shown."""


@dataclass(frozen=True)
class ForeignKey:
    table: str
    name: str
    references: str
    columns: str
    referenced_columns: str


async def _foreign_keys(s: Explorer, user_id: str, workspace_id: str | None) -> list[ForeignKey]:
    ref = await run_in_threadpool(data.database_ref, s.ctx, s.principal, user_id, workspace_id)
    rows = cast("list[tuple[str, str, str, str | None, str | None]]",
                await s.ctx.service.reader.catalog_rows(ref, _FOREIGN_KEYS))
    return [ForeignKey(table=t, name=n, references=r, columns=c or "", referenced_columns=rc or "")
            for t, n, r, c, rc in rows]


async def schema(request: Request, user_id: str, s: Session, workspace_id: WorkspaceInPath) -> Response:
    """The database's tables and the foreign keys between them: a picture, and the same as lists."""
    if workspace_id is None:
        await run_in_threadpool(data.get_user, s.ctx, s.principal, user_id)
        workspace = None
    else:
        workspace = await run_in_threadpool(data.get_workspace, s.ctx, s.principal, user_id, workspace_id)
    listed, _ = await data.tables(s.ctx, s.principal, user_id, workspace_id)
    keys = await _foreign_keys(s, user_id, workspace_id) if listed.tables else []
    context: dict[str, Any] = {"workspace": workspace, "workspace_id": workspace_id, "tab": "schema"}
    return render(request, "schema.html", title="Schema", user_id=user_id, active="databases",
                  tables=listed.tables, keys=keys, drawn=0 < len(listed.tables) <= MAX_DRAWN_TABLES,
                  max_drawn=MAX_DRAWN_TABLES, **context)


for _base in (PREFIX + "/u/{user_id}/global", PREFIX + "/u/{user_id}/agents/{workspace_id}"):
    router.add_api_route(_base + "/schema", schema, methods=["GET"])
