"""The gateway edge, given what it shares with the mcp edge: the MCP server of agentpg's own tools and the
agent door (Host/Origin, token). Wired here so neither edge imports the other."""

from __future__ import annotations

from agentpg.gateway.http import GatewayHttp
from agentpg.mcp.http import HostAndOriginCheck, McpHttp, admit_agent, security_settings
from agentpg.mcp.server import build_server
from agentpg.settings import Settings


def gateway_for(settings: Settings, mcp: McpHttp | None = None) -> GatewayHttp:
    """``/mcp/servers/{name}`` with the same door and own-tools server as ``/mcp``."""
    return GatewayHttp(settings, tools_server=build_server, admit=admit_agent,
                       security=HostAndOriginCheck(security_settings(settings)))
