"""Which MCP tools a workspace's agent is offered (issue 20): chosen by the platform, checked on every call.

Stored in the catalog (``workspaces.mcp_tools``: null means every tool, including tools a later agentpg
adds; a list means exactly those). ``tools/list`` shows an agent only its enabled tools and a call of any
other is refused before anything runs. The per-call lookup is remembered like the other hot-path lookups
(:mod:`agentpg.access.cache`: 2 s, dropped at once by a change made in this process), so a change made
through another process is seen within 2 s.

The tool names live here, in the service layer (the REST edge validates against them, the MCP edge declares
one tool per name; tests/test_mcp_tools_extra.py checks both agree).
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from agentpg.access import cache
from agentpg.catalog.models import Workspace
from agentpg.errors import InvalidInput, NotFound, PermissionDenied
from agentpg.lifecycle import workspace_ids
from agentpg.lifecycle.deps import LifecycleDeps, validate_id

#: Every agent tool, in the order ``tools/list`` gives them.
AGENT_TOOLS: Final = ("list_databases", "list_tables", "describe_table", "query", "explain", "execute",
                      "checkpoint", "list_checkpoints", "restore")


class McpToolsChoice(BaseModel):
    """The body of ``PUT /api/workspaces/{id}/mcp-tools``."""

    model_config = ConfigDict(extra="forbid")

    tools: list[str] | None = Field(
        max_length=len(AGENT_TOOLS) * 4,
        description="The tools this workspace's agent is offered (names from `available`); null offers every "
                    "tool, including ones a later agentpg adds. An empty list offers none.")


class McpTools(BaseModel):
    """A workspace's tool choice, as stored and as it applies."""

    tools: list[str] = Field(description="The tools offered to this workspace's agent, in tools/list order.")
    all_tools: bool = Field(description="True when no choice is stored: every tool is offered.")
    available: list[str] = Field(description="Every tool agentpg has.")


def _canonical(names: list[str]) -> list[str]:
    """``names`` validated, deduplicated, in :data:`AGENT_TOOLS` order. ``InvalidInput`` names the unknown
    ones and the valid list."""
    unknown = sorted({n for n in names if n not in AGENT_TOOLS})
    if unknown:
        raise InvalidInput(f"unknown tool name(s): {', '.join(repr(n[:64]) for n in unknown[:10])}; the tools "
                           f"are: {', '.join(AGENT_TOOLS)}")
    chosen = set(names)
    return [n for n in AGENT_TOOLS if n in chosen]


def _describe(stored: list[str] | None) -> McpTools:
    if stored is None:
        return McpTools(tools=list(AGENT_TOOLS), all_tools=True, available=list(AGENT_TOOLS))
    kept = set(stored)  # a name a later agentpg dropped is simply not offered
    return McpTools(tools=[n for n in AGENT_TOOLS if n in kept], all_tools=False, available=list(AGENT_TOOLS))


class ToolChoice:
    """Reads and sets workspaces' tool choices; :meth:`enabled` is the cached per-call lookup."""

    def __init__(self, deps: LifecycleDeps) -> None:
        self.deps = deps
        # (enabled tools,) by catalog workspace id; None inside means every tool.
        self._enabled: cache.TtlCache[str, tuple[frozenset[str] | None]] = cache.TtlCache(deps.invalidation)

    def get(self, workspace_id: str, *, user_id: str | None = None) -> McpTools:
        """The choice of the workspace the platform calls ``workspace_id`` (of ``user_id`` when given).
        Raises ``NotFound`` (also for another user's), ``Conflict`` (admin, id held by several users)."""
        validate_id(workspace_id, "workspace id")
        with self.deps.sessions() as s:
            ws = workspace_ids.find(s, workspace_id, user_id)
            if ws is None or ws.status != "active":
                raise NotFound(f"workspace {workspace_id!r} does not exist")
            return _describe(ws.mcp_tools)

    def set(self, workspace_id: str, tools: list[str] | None, *, user_id: str | None = None) -> McpTools:
        """Store the choice (None: every tool); the agent's next ``tools/list`` and call see it. Raises
        ``InvalidInput`` for an unknown tool name (naming the valid ones), as :meth:`get` otherwise."""
        validate_id(workspace_id, "workspace id")
        chosen = None if tools is None else _canonical(tools)
        with self.deps.sessions.begin() as s:
            ws = workspace_ids.find(s, workspace_id, user_id, for_update=True)
            if ws is None or ws.status != "active":
                raise NotFound(f"workspace {workspace_id!r} does not exist")
            ws.mcp_tools = chosen
        self.deps.invalidation.bump()  # every process-local hot-path entry: this agent's next call looks again
        return _describe(chosen)

    def enabled_cached(self, workspace_id: str) -> tuple[frozenset[str] | None] | None:
        """The cached answer of :meth:`enabled` (no I/O, for the event loop), or None on a miss."""
        return self._enabled.get(workspace_id)

    def remember(self, workspace_id: str, stored: list[str] | None, gen: int) -> None:
        """Cache the choice ``stored`` (the ``mcp_tools`` column) read by another hot-path lookup of the same
        workspace row while the cache generation was ``gen``: the agent's calls then need one lookup, not two."""
        self._enabled.put(workspace_id, (None if stored is None else frozenset(stored),), gen)

    def enabled(self, workspace_id: str) -> frozenset[str] | None:
        """The tools the agent of catalog workspace ``workspace_id`` may use (None: all). Cached (2 s).
        Raises ``PermissionDenied`` for a workspace that no longer exists (its token is about to stop
        working too)."""
        hit = self._enabled.get(workspace_id)
        if hit is not None:
            return hit[0]
        gen = self.deps.invalidation.current()
        with self.deps.sessions() as s:
            row = s.execute(select(Workspace.status, Workspace.mcp_tools)
                            .where(Workspace.id == workspace_id)).one_or_none()
        if row is None or row.status != "active":
            raise PermissionDenied("this agent's workspace no longer exists")
        self.remember(workspace_id, row.mcp_tools, gen)
        return None if row.mcp_tools is None else frozenset(row.mcp_tools)
