"""What the service holds open to reach tenant databases: the pools, the agent query runner, read limits.

Built once by the assembly (:mod:`agentpg.app`) on the event loop that serves, handed to the service with
:meth:`agentpg.service.Service.attach_tenant`, and closed by the assembly after the edges stop. The edges
never touch it: they name a database (an agent's ``"global"``/``"agent"``, or a :class:`DatabaseRef`) and
the service resolves the connection string, which never leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agentpg.access.browse import ReadLimits
from agentpg.access.governor import Governor, GovernorConfig
from agentpg.access.guard import Reaper
from agentpg.access.pools import PoolLimits, TenantPools
from agentpg.access.query import QueryLimits, TenantQueries
from agentpg.errors import AgentpgError
from agentpg.settings import Settings


class HeldConnections:
    """The pooled connections on some databases, named without showing them: an edge takes one before a
    drop or a restore and hands it back to :meth:`agentpg.service.Service.forget_connections` after."""

    __slots__ = ("_uris",)

    def __init__(self, uris: list[str]) -> None:
        self._uris = tuple(uris)

    def __repr__(self) -> str:
        return f"<HeldConnections: {len(self._uris)} database(s)>"


class NotStarted(AgentpgError):
    """The tenant connections are not open yet (the app's lifespan has not run): retry in a moment."""

    status = 503
    code = "starting"


@dataclass
class TenantAccess:
    """The pools every tenant connection of this process goes through, and the runners on top of them."""

    pools: TenantPools
    queries: TenantQueries
    read_limits: ReadLimits = field(default_factory=ReadLimits)
    governor: Governor | None = None

    @classmethod
    def from_settings(cls, settings: Settings, reaper: Reaper, *, read_limits: ReadLimits | None = None,
                      query_limits: QueryLimits | None = None) -> TenantAccess:
        """One connection budget per tenant server (issue 18, when ``AGENTPG_GOVERNOR_ENABLED``) shared by
        the REST, console, MCP and gateway sides."""
        governor = (Governor(GovernorConfig.from_settings(settings), admin_dsn_for=reaper.admin_dsn_for)
                    if settings.governor_enabled else None)
        pools = TenantPools(PoolLimits.from_settings(settings), governor=governor)
        queries = TenantQueries(pools, query_limits or QueryLimits.from_settings(settings),
                                terminate=reaper.terminate)
        return cls(pools=pools, queries=queries, read_limits=read_limits or ReadLimits(), governor=governor)

    @classmethod
    def of(cls, queries: TenantQueries, read_limits: ReadLimits | None = None) -> TenantAccess:
        """Around an existing query runner (tests with their own limits)."""
        return cls(pools=queries.pools, queries=queries, read_limits=read_limits or ReadLimits())

    async def close(self) -> None:
        await self.queries.close()  # and the pools under it
