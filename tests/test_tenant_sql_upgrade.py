"""`agentpg reconcile --upgrade`: databases made by an older agentpg get today's isolation rules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import psycopg
import pytest
from helpers import workspace_global_uri
from mcp_support import uid
from psycopg.conninfo import make_conninfo

from agentpg.app.runtime import Runtime


@contextmanager
def _shared_database(runtime: Runtime) -> Iterator[tuple[str, str, str]]:
    """A user whose global database has one agent (so it is shared): the agent's URI, the database's name, and
    an admin DSN to it; the user is deleted afterwards."""
    user, ws = uid("up"), uid("upw")
    runtime.service.register_user(user)
    runtime.service.create_workspace_with_token(user, ws)
    try:
        agent_uri = workspace_global_uri(runtime, ws)
        dbname = urlsplit(agent_uri).path.lstrip("/")
        yield agent_uri, dbname, make_conninfo(runtime.admin_dsn, dbname=dbname)
    finally:
        runtime.service.delete_user(user)


def test_upgrade_locks_down_a_shared_database_made_before_the_rules(runtime: Runtime) -> None:
    with _shared_database(runtime) as (agent_uri, dbname, admin_dsn):
        # Make it look like a database of the previous release: languages open, no guard, not marked shared.
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute("GRANT USAGE ON LANGUAGE sql, plpgsql TO PUBLIC")
            admin.execute("DROP EVENT TRIGGER agentpg_guard")
            admin.execute("DELETE FROM agentpg_internal.config WHERE key = 'shared'")
        with psycopg.connect(agent_uri, autocommit=True) as agent:
            agent.execute("CREATE FUNCTION old_helper(i int) RETURNS int LANGUAGE sql AS 'SELECT i + 1'")

        report = runtime.service.reconcile(upgrade=True)

        assert report.refreshed >= 2 and not report.failed, report
        assert f"{dbname}: public.old_helper(integer)" in report.tenant_code
        with psycopg.connect(agent_uri, autocommit=True) as agent:
            for statement in ("CREATE FUNCTION newer() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                              "DO $$ BEGIN PERFORM 1; END $$"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    agent.execute(statement)
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            assert admin.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname = 'agentpg_guard'"
                                 ).fetchone() == (1,)


def test_upgrade_brings_revokes_added_since_to_a_database_already_shared(runtime: Runtime) -> None:
    """A database locked down by an earlier agentpg (marked shared) lacks what was added to the lock-down since:
    here the scan statistics a view's author could read back. ``reconcile --upgrade`` revokes them too."""
    with _shared_database(runtime) as (agent_uri, _, admin_dsn):
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            assert admin.execute("SELECT value FROM agentpg_internal.config WHERE key = 'shared'").fetchone() == ("on",)
            admin.execute("GRANT SELECT ON pg_catalog.pg_stat_user_tables TO PUBLIC")  # as an older lock-down left it
            admin.execute("GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_numscans(oid) TO PUBLIC")
        with psycopg.connect(agent_uri, autocommit=True) as agent:
            assert agent.execute("SELECT count(*) >= 0 FROM pg_stat_user_tables").fetchone() == (True,)

        report = runtime.service.reconcile(upgrade=True)

        assert report.refreshed >= 2 and not report.failed, report
        with psycopg.connect(agent_uri, autocommit=True) as agent:
            for statement in ("SELECT count(*) FROM pg_stat_user_tables",
                              "SELECT pg_stat_get_numscans('pg_class'::regclass)"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    agent.execute(statement)
