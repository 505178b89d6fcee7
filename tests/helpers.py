"""Test helpers that read what agentpg holds, the way only an operator with the key could."""

from __future__ import annotations

from sqlalchemy import select

from agentpg.app.runtime import Runtime
from agentpg.catalog.models import EnvVar, UserGlobalDatabase, Workspace, WorkspaceAgentDatabase


def _opened(rt: Runtime, model: type[UserGlobalDatabase] | type[WorkspaceAgentDatabase], key: str,
            table: str) -> str:
    deps = rt.service.deps
    column = model.user_id if model is UserGlobalDatabase else model.workspace_id  # type: ignore[attr-defined]
    with deps.sessions() as s:
        rec = s.scalars(select(model).where(column == key)).one()
        assert rec.connection_uri_sealed
        return deps.open(rec.connection_uri_sealed, table, rec.id, "connection_uri")


def global_uri(rt: Runtime, user_id: str) -> str:
    return _opened(rt, UserGlobalDatabase, user_id, "user_global_database")


def agent_db_uri(rt: Runtime, workspace_id: str) -> str:
    return _opened(rt, WorkspaceAgentDatabase, workspace_id, "workspace_agent_database")


def workspace_global_uri(rt: Runtime, workspace_id: str) -> str:
    """The URI of the workspace's own role in its user's global database."""
    deps = rt.service.deps
    with deps.sessions() as s:
        ws = s.get_one(Workspace, workspace_id)
        assert ws.global_uri_sealed
        return deps.open(ws.global_uri_sealed, "workspaces", ws.id, "global_uri")


def env_value(rt: Runtime, user_id: str, name: str, workspace_id: str | None = None) -> str:
    deps = rt.service.deps
    with deps.sessions() as s:
        var = s.scalars(select(EnvVar).where(EnvVar.user_id == user_id, EnvVar.name == name,
                                             EnvVar.workspace_id.is_(None) if workspace_id is None
                                             else EnvVar.workspace_id == workspace_id)).one()
        return deps.open(var.value_sealed, "env_vars", var.id, "value")


def with_database(uri: str, dbname: str) -> str:
    """The same credentials aimed at another database (an attacker's first try)."""
    return uri.rsplit("/", 1)[0] + "/" + dbname


def stubborn_function(*args: str) -> str:
    """``CREATE FUNCTION stubborn(<args>)``: a plpgsql loop that swallows every cancel (statement_timeout's and
    agentpg's own), so only termination ends it. The arguments (e.g. ``"tag text"``) let a caller mark its
    statement for pg_stat_activity."""
    return f"""
CREATE FUNCTION stubborn({", ".join(args)}) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  LOOP
    BEGIN
      PERFORM pg_sleep(0.05);
    EXCEPTION WHEN query_canceled THEN
      NULL;
    END;
  END LOOP;
END $$"""
