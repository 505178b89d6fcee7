"""The MCP client configurations agentpg hands out: streamable HTTP and stdio, each pasteable as it is.

Both are complete ``{"mcpServers": {...}}`` documents (the shape of Claude Desktop's
``claude_desktop_config.json``, Cursor's ``.cursor/mcp.json`` and most MCP clients). The stdio one names the
absolute path of this installation's ``agentpg`` and the environment ``agentpg mcp`` needs to find the
running agentpg: ``AGENTPG_HOME`` always, and the name of every server, catalog or key variable the running
process was configured with (their values are secrets, so they appear as placeholders, never as values).
The token is the placeholder ``<AGENT_TOKEN>`` unless the caller has just been given the token itself (the
answer to creating a workspace), where it is filled in.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from agentpg.settings import Settings

TOKEN_PLACEHOLDER = "<AGENT_TOKEN>"  # noqa: S105 - a placeholder, not a secret
SERVER_NAME = "agentpg"


def agentpg_command() -> str:
    """The absolute path of the ``agentpg`` console script of this installation (the venv's, not PATH's)."""
    beside = Path(sys.executable).with_name("agentpg")
    if beside.is_file():
        return str(beside)
    found = shutil.which("agentpg")
    return str(Path(found).absolute()) if found else str(beside)


def stdio_env(settings: Settings, token: str) -> dict[str, str]:
    """The environment ``agentpg mcp`` needs to reach the agentpg these settings describe."""
    env = {"AGENTPG_HOME": str(settings.home)}
    for var, is_set in (("AGENTPG_POSTGRES_URL", settings.postgres_url is not None),
                        ("AGENTPG_FLEET", bool(settings.fleet)),
                        ("AGENTPG_CATALOG_URL", settings.catalog_url is not None),
                        ("AGENTPG_SECRET_KEY", settings.secret_key is not None)):
        if is_set:
            env[var] = f"<the {var} of agentpg serve>"
    if settings.provider == "neon":
        env["AGENTPG_PROVIDER"] = "neon"
        env["AGENTPG_NEON_API_KEY"] = "<the AGENTPG_NEON_API_KEY of agentpg serve>"
    if settings.catalog_database != "agentpg_catalog":
        env["AGENTPG_CATALOG_DATABASE"] = settings.catalog_database
    env["AGENTPG_AGENT_TOKEN"] = token
    return env


def client_configs(settings: Settings, base_url: str, token: str | None = None) -> dict[str, Any]:
    """``mcpServers`` (the HTTP form, as before), ``http`` and ``stdio`` (each a whole pasteable document)
    and ``notes`` (where the token goes and how to get one; where the stdio form works)."""
    value = token or TOKEN_PLACEHOLDER
    http = {"type": "http", "url": base_url.rstrip("/") + "/mcp", "headers": {"Authorization": f"Bearer {value}"}}
    stdio = {"command": agentpg_command(), "args": ["mcp"], "env": stdio_env(settings, value)}
    if token:
        note = "filled in: the agent token issued with this workspace (shown this once)"
    else:
        note = (f"replace {TOKEN_PLACEHOLDER} with the workspace's agent token: agent_token.token of the answer "
                "to POST /api/users/{user}/workspaces (shown once), or a new one from POST "
                "/api/workspaces/{id}/tokens")
    return {"mcpServers": {SERVER_NAME: http},
            "http": {"mcpServers": {SERVER_NAME: http}},
            "stdio": {"mcpServers": {SERVER_NAME: stdio}},
            "notes": {"token": note,
                      "stdio": "for an MCP client on the machine agentpg serve runs on: agentpg mcp reaches the "
                               "running agentpg through AGENTPG_HOME and never starts a server of its own"}}
