"""Tenant connection strings: where the service finds them, and the only place it does.

Every method returns a secret (a URI with a password) for the access layer inside the service: the pools,
the query runner, the reader. None of them is reachable from an edge (``tests/test_layers.py`` checks that
no edge asks for one). A workspace of another user is "not found".
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from agentpg.access import cache
from agentpg.catalog.models import UserGlobalDatabase, Workspace, WorkspaceAgentDatabase
from agentpg.errors import InvalidInput, NotFound
from agentpg.lifecycle import undo
from agentpg.lifecycle.deps import LifecycleDeps, validate_id


class Uris:
    def __init__(self, deps: LifecycleDeps, *, find_workspace: Callable[[Session, str, str | None], Workspace],
                 get_user: Callable[[str], object]) -> None:
        self.deps = deps
        self._find_workspace = find_workspace
        self._get_user = get_user
        self._browse: cache.TtlCache[tuple[str | None, str | None, str | None], str] = \
            cache.TtlCache(deps.invalidation)

    def restored_database(self, user_id: str, workspace_id: str | None) -> list[str]:
        """Every URI agentpg may hold pooled sessions on for one database (its login role's, and in a global
        database each agent's own): after a restore in place, the edges drop those pools. Secrets."""
        uris: list[str] = []
        with self.deps.sessions() as s:
            if workspace_id is None:
                for ws in s.scalars(select(Workspace).where(Workspace.user_id == user_id)):
                    if ws.global_uri_sealed is not None:
                        uris.append(self.deps.open(ws.global_uri_sealed, "workspaces", ws.id, "global_uri"))
                catalog_id = None
            else:
                catalog_id = self._find_workspace(s, workspace_id, user_id).id
        uris.append(self.platform(user_id, catalog_id))
        return uris

    def copy(self, user_id: str, copy_id: str) -> str:
        """The READ ONLY browse URI of a restored copy of ``user_id`` (a secret, for the access layer)."""
        validate_id(user_id, "user id")
        return undo.copy_uri(self.deps, user_id, copy_id)

    def platform(self, user_id: str, workspace_id: str | None = None) -> str:
        """The full-rights URI of a user's global database, or of one of its workspaces' agent databases.

        Used for the platform's own reads (REST tables/rows, explorer), always inside READ ONLY transactions.
        A workspace of another user is "not found".
        """
        with self.deps.sessions() as s:
            rec: UserGlobalDatabase | WorkspaceAgentDatabase | None
            if workspace_id is None:
                rec = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)).one_or_none()
                table, what = "user_global_database", f"user {user_id!r}"
            else:
                rec = s.scalars(select(WorkspaceAgentDatabase).where(
                    WorkspaceAgentDatabase.workspace_id == workspace_id,
                    WorkspaceAgentDatabase.user_id == user_id)).one_or_none()
                table, what = "workspace_agent_database", f"workspace {workspace_id!r}"
            if rec is None or rec.status != "ready" or rec.connection_uri_sealed is None:
                raise NotFound(f"{what} has no ready database")
            return self.deps.open(rec.connection_uri_sealed, table, rec.id, "connection_uri")

    def browse_cached(self, scope_user: str | None, user_id: str | None, workspace_id: str | None) -> str | None:
        """What :meth:`browse` returned for these arguments less than the cache TTL ago (no I/O)."""
        return self._browse.get((scope_user, user_id, workspace_id))

    def browse(self, scope_user: str | None, user_id: str | None, workspace_id: str | None) -> str:
        """The REST browse routes' URI: a user's global database (``user_id``) or a workspace's agent
        database (``workspace_id``, of ``scope_user`` when given: another user's is "not found").
        Remembered for the cache TTL: the routes read with it in READ ONLY transactions only."""
        key = (scope_user, user_id, workspace_id)
        hit = self._browse.get(key)
        if hit is not None:
            return hit
        gen = self.deps.invalidation.current()
        if workspace_id is None:
            assert user_id is not None
            self._get_user(user_id)  # validates the id, and "does not exist" reads better than "not ready"
            uri = self.platform(user_id)
        else:
            with self.deps.sessions() as s:
                ws = self._find_workspace(s, workspace_id, scope_user)
            uri = self.platform(ws.user_id, ws.id)
        self._browse.put(key, uri, gen)
        return uri

    def agent(self, workspace_id: str, database: str) -> str:
        """The URI an agent's calls run with: its own role in the global database, or its agent database.

        ``database`` is the logical name, ``"global"`` or ``"agent"``.
        """
        with self.deps.sessions() as s:
            ws = s.get(Workspace, workspace_id)
            if ws is None or ws.status != "active":
                raise NotFound(f"workspace {workspace_id!r} does not exist")
            if database == "agent":
                user_id = ws.user_id
            elif database == "global":
                if ws.global_uri_sealed is not None:
                    return self.deps.open(ws.global_uri_sealed, "workspaces", ws.id, "global_uri")
                # A bring-your-own global database has no per-agent roles: its own URI is all there is.
                return self.platform(ws.user_id)
            else:
                raise InvalidInput('database must be "global" (the user\'s shared database) or "agent" '
                                   "(this workspace's own)")
        return self.platform(user_id, workspace_id)

    def databases(self, user_id: str, workspace_id: str | None = None) -> list[str]:
        """Platform URIs of a user's databases (all, or one workspace's), for closing pools before a drop.

        Secrets, like :meth:`platform`: for the access layer only.
        """
        validate_id(user_id, "user id")
        with self.deps.sessions() as s:
            ws_ids = [self._find_workspace(s, workspace_id, user_id).id] if workspace_id is not None else list(
                s.scalars(select(Workspace.id).where(Workspace.user_id == user_id)))
        targets: list[str | None] = ([] if workspace_id is not None else [None]) + list(ws_ids)
        uris = []
        for target in targets:
            try:
                uris.append(self.platform(user_id, target))
            except NotFound:
                continue
        return uris

