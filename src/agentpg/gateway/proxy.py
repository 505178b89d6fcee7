"""The MCP server facing the agent: a low-level SDK ``Server`` whose handlers forward to the child's
``ClientSession`` and scrub every answer (:mod:`.scrub`) before it goes back.

Relayed: tools (list, call), resources (list, templates, read — opaque ``agentpg://`` URIs mapped back to
the child's), prompts (list, get). A capability the child lacks lists as empty. A tool call that fails in
the child (or the child dies mid-call) is a tool error (``isError``), scrubbed; any other failure is a
JSON-RPC error with a scrubbed message. The gateway itself stays up either way.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from mcp import ClientSession, types
from mcp.server import Server, ServerRequestContext
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

from agentpg.errors import AgentpgError, PermissionDenied
from agentpg.gateway.children import Child, Children
from agentpg.service import GatewayTarget, Principal, Service, __version__
from agentpg.service.gateway_catalog import CatalogSource
from agentpg.settings import Settings

log = logging.getLogger(__name__)

#: Who is calling and which server they want, given the transport's request (None on stdio).
Identify = Callable[[Any], Awaitable[tuple[Principal, str]]]
ToolsServer = Callable[[Service, Callable[[Any], Awaitable[Principal]]], Server[Any]]
"""Builds the MCP server of agentpg's own tools for one caller (the mcp edge's, given by the assembly)."""
M = TypeVar("M", bound=BaseModel)
Paged = types.PaginatedRequestParams | None


class Gateway:
    """Resolution (through the service) and the children, shared by both transports of one process."""

    def __init__(self, service: Service, settings: Settings, tools_server: ToolsServer) -> None:
        self.service = service
        self.settings = settings
        self._tools_server = tools_server
        self.catalog = CatalogSource(settings.gateway_catalog, settings.home)
        self.children = Children(settings, self._builtin_server)

    def _builtin_server(self, target: GatewayTarget) -> Server[Any]:
        principal = Principal(kind="agent", token_id=None, user_id=target.user_id,
                              workspace_id=target.workspace_id)

        async def identify(_request: Any) -> Principal:
            return principal

        return self._tools_server(self.service, identify)

    async def target(self, principal: Principal, name: str) -> GatewayTarget:
        return await asyncio.to_thread(lambda: self.service.gateway_target(principal, name, self.catalog.get()))

    @asynccontextmanager
    async def use(self, principal: Principal, name: str) -> AsyncIterator[Child]:
        target = await self.target(principal, name)
        async with self.children.use(target) as child:
            yield child


def _fail(message: str) -> MCPError:
    return MCPError(types.INTERNAL_ERROR, message)


def _scrubbed(child: Child, result: BaseModel, model: type[M]) -> M:
    return model.model_validate(child.scrubber.obj(result.model_dump(mode="json", by_alias=True,
                                                                     exclude_none=True)))


def _tool_error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


def build_gateway_server(gateway: Gateway, identify: Identify) -> Server[Any]:
    """The SDK server an agent talks to (both protocol eras); each request is relayed to the child that
    ``identify`` (given ``ctx.request``) names, and every answer scrubbed."""

    @asynccontextmanager
    async def child_session(ctx: ServerRequestContext[Any]) -> AsyncIterator[Child]:
        try:
            principal, name = await identify(ctx.request)
            async with gateway.use(principal, name) as child:
                if child.session is None:
                    raise _fail(f"MCP server {name} is not running; retry")
                yield child
        except AgentpgError as exc:
            raise _fail(exc.message) from None
        except MCPError:
            raise
        except Exception as exc:  # never relay an unknown exception's text: it may hold what we scrub
            reference = uuid.uuid4().hex[:12]
            log.warning("gateway request failed with %s (reference %s)", type(exc).__name__, reference)
            raise _fail(f"the gateway could not complete the request (reference {reference}); retry") from None

    async def relay(ctx: ServerRequestContext[Any], call: Callable[[ClientSession], Awaitable[M]], model: type[M],
                    capability: str | None = None, empty: M | None = None) -> M:
        async with child_session(ctx) as child:
            caps = child.capabilities
            if capability is not None and empty is not None and (caps is None or getattr(caps, capability) is None):
                return empty
            try:
                return _scrubbed(child, await child.request(call), model)
            except MCPError as exc:
                raise _fail(child.scrubber.text(exc.error.message)) from None
            except Exception as exc:
                raise _fail(_unexpected(child, exc)) from None

    async def list_tools(ctx: ServerRequestContext[Any], _params: Paged) -> types.ListToolsResult:
        return await relay(ctx, lambda s: s.list_tools(), types.ListToolsResult, "tools",
                           types.ListToolsResult(tools=[]))

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        name, arguments = params.name, params.arguments
        try:
            async with child_session(ctx) as child:
                started = time.monotonic()
                try:
                    result = await child.request(lambda s: s.call_tool(name, arguments))
                except MCPError as exc:
                    if child.stopping:
                        return _tool_error(_unexpected(child, exc))
                    return _tool_error(child.scrubber.text(exc.error.message))
                except Exception as exc:
                    return _tool_error(_unexpected(child, exc))
                log.info("gateway %s tools/call %r: %s in %d ms", child.label, name[:64],
                         "error" if result.is_error else "ok", (time.monotonic() - started) * 1000)
                return _scrubbed(child, result, types.CallToolResult)
        except MCPError as exc:
            return _tool_error(exc.error.message)

    async def list_resources(ctx: ServerRequestContext[Any], _params: Paged) -> types.ListResourcesResult:
        return await relay(ctx, lambda s: s.list_resources(), types.ListResourcesResult, "resources",
                           types.ListResourcesResult(resources=[]))

    async def list_resource_templates(ctx: ServerRequestContext[Any],
                                      _params: Paged) -> types.ListResourceTemplatesResult:
        return await relay(ctx, lambda s: s.list_resource_templates(), types.ListResourceTemplatesResult,
                           "resources", types.ListResourceTemplatesResult(resource_templates=[]))

    async def read_resource(ctx: ServerRequestContext[Any],
                            params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        async with child_session(ctx) as child:
            try:
                original = child.scrubber.unmap(str(params.uri))
                result = await child.request(lambda s: s.read_resource(original))
            except MCPError as exc:
                raise _fail(child.scrubber.text(exc.error.message)) from None
            except Exception as exc:
                raise _fail(_unexpected(child, exc)) from None
            out: list[types.TextResourceContents | types.BlobResourceContents] = []
            for item in result.contents:
                if isinstance(item, types.TextResourceContents):
                    out.append(types.TextResourceContents(uri=params.uri, text=child.scrubber.text(item.text),
                                                          mime_type=item.mime_type))
                else:
                    text = base64.b64decode(item.blob).decode("utf-8", "replace")
                    if child.scrubber.text(text) != text:  # a secret inside binary content: refuse, not mangle
                        raise _fail("the resource's content contains a secret and was withheld")
                    out.append(types.BlobResourceContents(uri=params.uri, blob=item.blob, mime_type=item.mime_type))
            return types.ReadResourceResult(contents=out)

    async def list_prompts(ctx: ServerRequestContext[Any], _params: Paged) -> types.ListPromptsResult:
        return await relay(ctx, lambda s: s.list_prompts(), types.ListPromptsResult, "prompts",
                           types.ListPromptsResult(prompts=[]))

    async def get_prompt(ctx: ServerRequestContext[Any], params: types.GetPromptRequestParams) -> types.GetPromptResult:
        name, arguments = params.name, params.arguments
        return await relay(ctx, lambda s: s.get_prompt(name, arguments), types.GetPromptResult)

    return Server("agentpg-gateway", version=__version__, on_list_tools=list_tools, on_call_tool=call_tool,
                  on_list_resources=list_resources, on_list_resource_templates=list_resource_templates,
                  on_read_resource=read_resource, on_list_prompts=list_prompts, on_get_prompt=get_prompt)


def _unexpected(child: Child, exc: Exception) -> str:
    reference = uuid.uuid4().hex[:12]
    log.warning("gateway call to %s failed with %s (reference %s): %s", child.label, type(exc).__name__, reference,
                child.scrubber.text(str(exc))[:500])
    if child.stopping or child.session is None:
        return (f"MCP server {child.target.name} stopped during the call (reference {reference}); "
                "it is started again on the next call")
    return f"the call to MCP server {child.target.name} failed (reference {reference}); retry"


def require_agent(principal: Principal) -> Principal:
    if principal.kind != "agent" or principal.workspace_id is None:
        raise PermissionDenied("the MCP gateway is for agent tokens (one workspace's)")
    return principal
