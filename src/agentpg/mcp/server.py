"""The MCP server agents talk to, built by a factory (no module state) on the SDK's low-level ``Server``.

The same server object backs both transports; only *who is calling* differs, so the factory takes an
``identify`` callable: over streamable HTTP it reads the principal the bearer middleware put on the request
(:mod:`agentpg.mcp.http`), over stdio it re-checks the token the process was started with
(:mod:`agentpg.mcp.stdio`). Every call then goes through :class:`~agentpg.service.Service`, which classifies,
pre-checks, runs and audits it.

Contract of every tool call: the result is either structured content (matching the tool's
``outputSchema`` where it declares one) plus a short text rendering, or an MCP tool error
(``isError: true``) whose text says what went wrong and what to do; never a traceback, connection string,
password or internal role name.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from mcp import types
from mcp.server.lowlevel import Server
from pydantic import BaseModel, ValidationError

from agentpg import __version__
from agentpg.access.classify import RejectedStatement
from agentpg.access.query import QueryLimits, TenantQueries
from agentpg.errors import AgentpgError
from agentpg.mcp import tools
from agentpg.service import Service
from agentpg.settings import Settings
from agentpg.tokens import Principal

log = logging.getLogger(__name__)

#: Who is calling, given the transport's request object (a Starlette ``Request`` over HTTP, None on stdio).
Identify = Callable[[Any], Awaitable[Principal]]

INSTRUCTIONS = """\
agentpg gives you two PostgreSQL databases, named by the `database` argument of every tool:
- "global": your user's database, shared with all of your user's other agents. Tables any agent creates \
there are visible to the others at once. What you may do there (read, write, create, drop, which tables) \
is set by your user; list_databases shows it.
- "agent": your own private database, where you have full rights.
Use `query` for reads (one statement, read-only, rows capped) and `execute` for writes and DDL (one \
statement per call, committed on success). Pass values as params with $1, $2 ... placeholders."""


def limits_from(settings: Settings) -> QueryLimits:
    """The agent-call limits configured in ``settings`` (both transports use them)."""
    return QueryLimits(max_rows=settings.mcp_max_rows, max_result_bytes=settings.mcp_max_result_bytes,
                       statement_timeout_s=settings.mcp_statement_timeout_s)


def build_server(service: Service, queries: TenantQueries, identify: Identify) -> Server[Any, Any]:
    """A fresh MCP server whose tools run as the principal ``identify`` returns for each request."""
    server: Server[Any, Any] = Server("agentpg", version=__version__, instructions=INSTRUCTIONS)
    tool_list = tools.tool_list()

    async def list_tools() -> list[types.Tool]:
        return tool_list

    async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        model = tools.ARGS.get(name)
        if model is None:
            return _error(f"unknown tool {name!r}; the tools are: {', '.join(tools.ARGS)}")
        try:
            args = model.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
                                 for e in exc.errors(include_input=False))
            return _error(f"invalid arguments for {name}: {problems}")
        try:
            principal = await identify(server.request_context.request)
            return await _dispatch(service, queries, principal, args)
        except RejectedStatement as exc:
            return _error(exc.message)
        except AgentpgError as exc:
            return _error(exc.message)
        except Exception as exc:
            # The traceback, not the message: a driver's message may name a host or role.
            reference = uuid.uuid4().hex[:12]
            log.error("MCP tool %s failed unexpectedly with %s (reference %s)\n%s", name, type(exc).__name__,
                      reference, "".join(traceback.format_tb(exc.__traceback__)))
            return _error(f"agentpg hit an internal error and did not complete the call (reference {reference}). "
                          "Retry once; if it persists, report the reference.")

    server.list_tools()(list_tools)  # type: ignore[no-untyped-call]
    server.call_tool(validate_input=False)(call_tool)
    return server


async def _dispatch(service: Service, queries: TenantQueries, principal: Principal,
                    args: BaseModel) -> types.CallToolResult:
    if isinstance(args, tools.QueryArgs | tools.ExecuteArgs):
        tool: Literal["query", "execute"] = "query" if isinstance(args, tools.QueryArgs) else "execute"
        max_rows = args.max_rows if isinstance(args, tools.QueryArgs) else None
        result = await service.agent_sql(queries, principal, tool, args.database, args.sql, args.params,
                                         max_rows=max_rows)
        out = tools.StatementOutput(
            database=args.database, columns=[tools.Column(name=c.name, type=c.type) for c in result.columns],
            rows=result.rows, row_count=result.row_count, truncated=result.truncated,
            duration_ms=result.duration_ms, command=result.command, rows_affected=result.rows_affected)
        return _ok(out, tools.render_statement(out, result.rows_json))
    if isinstance(args, tools.ListTablesArgs):
        listed = tools.TablesOutput.model_validate(
            await service.agent_list_tables(queries, principal, args.database, args.schema_name))
        return _ok(listed, tools.render_tables(listed))
    if isinstance(args, tools.DescribeTableArgs):
        table = tools.TableOutput.model_validate(
            await service.agent_describe_table(queries, principal, args.database, args.table))
        return _ok(table, tools.render_table(table))
    databases = tools.DatabasesOutput(databases=await service.agent_list_databases(principal))
    return _ok(databases, tools.render_databases(databases))


def _ok(structured: BaseModel, text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)],
                                structuredContent=structured.model_dump(mode="json", by_alias=True),
                                isError=False)


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], isError=True)
