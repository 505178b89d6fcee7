"""The agent tools' call logic (:class:`ToolCalls`), and the SDK ``Server`` built on it for streamable HTTP.

Both transports run the same :class:`ToolCalls`; only *who is calling* differs, so it takes an ``identify``
callable: over streamable HTTP it reads the principal the bearer middleware put on the request
(:mod:`agentpg.mcp.http`, through :func:`build_server`), over stdio it re-checks the token the process was
started with (:mod:`agentpg.mcp.stdio`, through :mod:`agentpg.mcp.jsonrpc`). Every call then goes through
:class:`~agentpg.service.Service`, which classifies, pre-checks, runs and audits it.

Contract of every tool call: the result is either structured content (matching the tool's
``outputSchema`` where it declares one) plus a short text rendering, or an MCP tool error
(``isError: true``) whose text says what went wrong and what to do; never a traceback, connection string,
password or internal role name.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, cast

from mcp import types
from mcp.server import CacheHint, Server, ServerRequestContext
from pydantic import BaseModel, ValidationError

from agentpg.errors import AgentpgError
from agentpg.mcp import tools
from agentpg.service import Principal, QueryLimits, RejectedStatement, Service, StatementResult, __version__
from agentpg.settings import Settings

log = logging.getLogger(__name__)

#: Who is calling, given the transport's request object (a Starlette ``Request`` over HTTP, None on stdio).
Identify = Callable[[Any], Awaitable[Principal]]

#: A ``CallToolResult`` in wire form: exactly the dict the SDK would send for it (``model_dump(by_alias=True,
#: exclude_none=True, mode="json")``), built without models on the hot path.
WireResult = dict[str, Any]

_COMPLETE = {"resultType": "complete"}

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
    return QueryLimits.from_settings(settings)


class ToolCalls:
    """Runs one tool call for any transport: validates the arguments, identifies the caller, dispatches to
    the service and maps every failure to a tool error."""

    def __init__(self, service: Service, identify: Identify) -> None:
        self.service = service
        self.identify = identify
        # tools/list in wire form, all tools and per choice of tools (issue 20: a workspace's choice)
        self.tools = tools.tool_list()
        self._all_tools: WireResult = {"tools": [t.model_dump(by_alias=True, exclude_none=True, mode="json")
                                                 for t in self.tools]}

    async def offered_tools(self, request: Any = None) -> list[types.Tool]:
        """The tools the caller's workspace offers it (its user's choice; all by default)."""
        return tools.enabled_tools(self.tools, await self.service.agent_tools(await self.identify(request)))

    async def tools_result(self, request: Any = None) -> WireResult:
        """A ``tools/list`` result in wire form: :meth:`offered_tools`. Never raises for an unknown caller
        or an unreachable catalog: it then lists every tool (each call is still checked)."""
        try:
            enabled = await self.service.agent_tools(await self.identify(request))
        except AgentpgError as exc:
            log.info("tools/list without the workspace's choice of tools (%s)", exc.code)
            return self._all_tools
        if enabled is None:
            return self._all_tools
        return {"tools": [t for t in self._all_tools["tools"] if t["name"] in enabled]}

    async def call(self, name: str, arguments: Mapping[str, Any] | None, request: Any = None) -> WireResult:
        """The result of tool ``name`` in wire form. ``request`` is handed to ``identify``.

        Never raises for anything the call does: unknown tool, invalid arguments, a refusal or failure become
        a tool error (``isError: true``); an unexpected exception is logged with its traceback under a
        reference id that the (generic) error text names. Cancellation (``CancelledError``) propagates.
        """
        model = tools.ARGS.get(name)
        if model is None:
            return tool_error(f"unknown tool {name!r}; the tools are: {', '.join(tools.ARGS)}")
        try:
            args = model.model_validate(arguments if arguments is not None else {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}"
                                 for e in exc.errors(include_input=False))
            return tool_error(f"invalid arguments for {name}: {problems}")
        try:
            principal = await self.identify(request)
            await self.service.check_agent_tool(principal, name)  # the workspace's choice of tools (issue 20)
            return await self._dispatch(principal, args)
        except (RejectedStatement, AgentpgError) as exc:
            return tool_error(exc.message)
        except Exception as exc:
            # The traceback, not the message: a driver's message may name a host or role.
            reference = uuid.uuid4().hex[:12]
            log.error("MCP tool %s failed unexpectedly with %s (reference %s)\n%s", name, type(exc).__name__,
                      reference, "".join(traceback.format_tb(exc.__traceback__)))
            return tool_error(f"agentpg hit an internal error and did not complete the call (reference "
                              f"{reference}). Retry once; if it persists, report the reference.")

    async def _dispatch(self, principal: Principal, args: BaseModel) -> WireResult:
        agents = self.service.agents
        if isinstance(args, tools.QueryArgs | tools.ExecuteArgs):
            tool: Literal["query", "execute"] = "query" if isinstance(args, tools.QueryArgs) else "execute"
            max_rows = args.max_rows if isinstance(args, tools.QueryArgs) else None
            result = await agents.sql(principal, tool, args.database, args.sql, args.params,
                                             max_rows=max_rows)
            return statement_result(args.database, result)
        if isinstance(args, tools.ExplainArgs):
            explained = tools.ExplainOutput.model_validate(await agents.explain(
                principal, args.database, args.sql, args.params, analyze=args.analyze))
            return _model_result(explained, tools.render_explain(explained))
        if isinstance(args, tools.ListTablesArgs):
            listed = tools.TablesOutput.model_validate(
                await agents.list_tables(principal, args.database, args.schema_name))
            return _model_result(listed, tools.render_tables(listed))
        if isinstance(args, tools.DescribeTableArgs):
            table = tools.TableOutput.model_validate(
                await agents.describe_table(principal, args.database, args.table))
            return _model_result(table, tools.render_table(table))
        if isinstance(args, tools.CheckpointArgs | tools.ListCheckpointsArgs):
            made = (await agents.checkpoint(principal, args.database, args.name)
                    if isinstance(args, tools.CheckpointArgs)
                    else await agents.list_checkpoints(principal, args.database))
            listed_cps = tools.CheckpointsOutput(checkpoints=[c.model_dump(mode="json") for c in made])
            return _model_result(listed_cps, tools.render_checkpoints(listed_cps))
        if isinstance(args, tools.RestoreArgs):
            outcome = await agents.restore(principal, args.checkpoint_id, args.at,
                                                  args.before_audit_id, args.mode)
            restored = tools.RestoreOutput.model_validate(outcome.model_dump(mode="json"))
            return _model_result(restored, json.dumps(restored.model_dump(mode="json")))
        databases = tools.DatabasesOutput(databases=await self.service.agents.list_databases(principal))
        return _model_result(databases, tools.render_databases(databases))


def statement_result(database: str, result: StatementResult) -> WireResult:
    """A ``query``/``execute`` result in wire form. The structured part is built as a plain dict (the hot
    path: no model per call); it equals ``tools.StatementOutput(...).model_dump(mode="json")`` field for
    field, since ``rows`` already hold JSON values (tests/test_mcp_jsonrpc.py checks the two agree)."""
    structured: tools.StatementContent = {
        "database": database, "columns": [{"name": c.name, "type": c.type} for c in result.columns],
        "rows": result.rows, "row_count": len(result.rows), "truncated": result.truncated,
        "duration_ms": result.duration_ms, "command": result.command, "rows_affected": result.rows_affected}
    return {"content": [{"type": "text", "text": tools.render_statement(structured, result.rows_json)}],
            "structuredContent": structured, "isError": False}


def _model_result(structured: BaseModel, text: str) -> WireResult:
    return {"content": [{"type": "text", "text": text}],
            "structuredContent": structured.model_dump(mode="json", by_alias=True), "isError": False}


def tool_error(message: str) -> WireResult:
    """An MCP tool error (``isError: true``) saying ``message``, in wire form."""
    return {"content": [{"type": "text", "text": message}], "isError": True}


def build_server(service: Service, identify: Identify) -> Server[Any]:
    """A fresh SDK MCP server (streamable HTTP, the stdio fallback and the gateway's built-in child) whose
    tools run as the principal ``identify`` returns for each request (given ``ctx.request``: the Starlette
    request over HTTP, None otherwise). It answers both protocol eras; the SDK stamps ``resultType`` and
    the 2026-07-28 ``_meta`` on every result."""
    calls = ToolCalls(service, identify)
    schemas = {tool.name: tool.input_schema for tool in calls.tools}

    # Both handlers hand the SDK the wire dict, plus the ``resultType`` a model would default (2026-07-28
    # requires it; the 2025 surface drops it). The runner takes a mapping as a handler result (its
    # HandlerResult is ``BaseModel | dict | None``) and validates and dumps every result against the protocol
    # surface itself; a model built here was validated, dumped and validated again: ~65 us of CPU per call.
    async def list_tools(ctx: ServerRequestContext[Any],
                         _params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        # The workspace's choice of tools; never raises (tools_result lists every tool if it cannot tell).
        return cast(types.ListToolsResult, {**await calls.tools_result(ctx.request), **_COMPLETE})

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        return cast(types.CallToolResult, {**await calls.call(params.name, params.arguments, ctx.request),
                                           **_COMPLETE})

    # get_tool_input_schema: without it every 2026 tools/call runs tools/list to check Mcp-Param headers.
    return Server("agentpg", version=__version__, instructions=INSTRUCTIONS, on_list_tools=list_tools,
                  on_call_tool=call_tool, get_tool_input_schema=schemas.get,
                  cache_hints={"tools/list": CacheHint(ttl_ms=0, scope="private")})
