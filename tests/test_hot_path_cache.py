"""The hot path's short caches (agentpg.access.cache): what they may remember, and what makes them forget.

* a token's principal is remembered for at most the TTL: a revocation another process makes (a catalog write
  this process hears nothing of) is refused once the TTL has passed, and a failure is never remembered;
* a change made through this process (revoke, permissions) is seen by the very next call;
* a stale cached permission can only make a refusal less precise: Postgres' grants still refuse.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp_support import uid
from sqlalchemy import func, select, update

from agentpg.access.permissions import GlobalDbPermissions, PermissionRefused
from agentpg.access.pools import TenantPools
from agentpg.access.query import TenantQueries
from agentpg.access.results import StatementFailed
from agentpg.app.runtime import Runtime
from agentpg.catalog.models import Token, UserGlobalDatabase, Workspace
from agentpg.errors import Unauthenticated
from agentpg.lifecycle import users
from agentpg.mcp.server import limits_from
from agentpg.providers.base import AgentPermissions
from agentpg.service import TenantAccess
from agentpg.tokens import TokenStore

pytestmark = pytest.mark.anyio



def _agent(runtime: Runtime) -> tuple[str, str, str, str]:
    svc = runtime.service
    user, ws = uid("cu"), uid("cw")
    svc.register_user(user)
    _, issued = svc.create_workspace_with_token(user, ws)
    return user, ws, issued.id, issued.secret


def test_a_token_revoked_elsewhere_is_refused_after_the_ttl(runtime: Runtime) -> None:
    user, ws, token_id, secret = _agent(runtime)
    store = TokenStore(runtime.service.deps.sessions, "not-the-admin-token-" * 3, cache_ttl_s=0.5)
    assert store.authenticate(secret).workspace_id == ws
    # Another process revokes it: a catalog write this process is not told about.
    with runtime.service.deps.sessions.begin() as s:
        s.execute(update(Token).where(Token.id == token_id).values(revoked_at=func.now()))
    assert store.authenticate(secret).workspace_id == ws  # within the TTL: the remembered answer
    time.sleep(0.6)
    with pytest.raises(Unauthenticated):
        store.authenticate(secret)
    assert store.cached(secret) is None  # a refusal is never remembered
    with pytest.raises(Unauthenticated):
        store.authenticate(secret)
    runtime.service.delete_user(user)


def test_a_revocation_through_this_process_is_immediate(runtime: Runtime) -> None:
    user, _, token_id, secret = _agent(runtime)
    # Another store sharing the service's invalidation (as every cache of one service does).
    store = TokenStore(runtime.service.deps.sessions, "not-the-admin-token-" * 3, cache_ttl_s=60,
                       invalidation=runtime.service.deps.invalidation)
    store.authenticate(secret)
    assert store.cached(secret) is not None
    runtime.service.revoke_token(token_id)  # through the service's own store: the other one sees it at once
    assert store.cached(secret) is None
    with pytest.raises(Unauthenticated):
        store.authenticate(secret)
    runtime.service.delete_user(user)


async def test_permission_changes_and_stale_entries(runtime: Runtime) -> None:
    svc = runtime.service
    user, ws, _, secret = _agent(runtime)
    principal = svc.tokens.authenticate(secret)
    queries = TenantQueries(TenantPools(), limits_from(runtime.settings))
    svc.attach_tenant(TenantAccess.of(queries))
    try:
        await svc.agents.sql(principal, "execute", "global", "CREATE TABLE cached_t (x int)")
        await svc.agents.sql(principal, "execute", "global", "INSERT INTO cached_t VALUES (1)")
        assert svc.agents.target_cached(principal, "global") is not None
        # Changed through this process: the next call's refusal is agentpg's own, precise one.
        svc.set_agent_permissions(ws, GlobalDbPermissions(can_write=False))
        with pytest.raises(PermissionRefused, match="can_write is false"):
            await svc.agents.sql(principal, "execute", "global", "INSERT INTO cached_t VALUES (2)")
        svc.set_agent_permissions(ws, GlobalDbPermissions())
        await svc.agents.sql(principal, "execute", "global", "INSERT INTO cached_t VALUES (3)")
        # Changed by "another process" (grants and catalog, no invalidation here): the cached permissions
        # still say can_write, but the role's grants refuse the write; only the message is the server's.
        gen = svc.deps.invalidation.current()
        with svc.deps.sessions() as s:
            role = s.get(Workspace, ws).agent_role  # type: ignore[union-attr]
            glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user)).one()
            plan = users.plan_of(glob)
        assert role is not None
        svc.deps.provider.set_agent_permissions(plan, role, AgentPermissions(can_write=False))
        assert svc.deps.invalidation.current() == gen and svc.agents.target_cached(principal, "global") is not None
        with pytest.raises(StatementFailed) as refused:
            await svc.agents.sql(principal, "execute", "global", "INSERT INTO cached_t VALUES (4)")
        assert refused.value.outcome == "denied"
        rows = await svc.agents.sql(principal, "query", "global", "SELECT count(*) FROM cached_t")
        assert rows.rows == [[2]]
    finally:
        await queries.close()
        svc.delete_user(user)


def test_the_audit_writer_keeps_order_applies_back_pressure_and_flushes() -> None:
    """Write-behind: entries arrive in order, a full queue makes submit wait (never drop), flush drains."""
    import asyncio

    from agentpg.access.audit import AuditRecord, AuditWriter

    written: list[AuditRecord] = []

    class SlowCatalogWriter(AuditWriter):
        def _store(self, entries: list[AuditRecord]) -> None:
            time.sleep(0.01)  # a slow catalog: the 2-entry queue fills
            written.extend(entries)

    writer = SlowCatalogWriter(None, interval_s=0.005, max_pending=2, batch=2)  # type: ignore[arg-type]

    async def calls() -> None:
        for i in range(20):
            await writer.submit(AuditRecord(user_id="u", workspace_id="w", tool="query", outcome="ok",
                                            duration_ms=1.0, rows=i))

    asyncio.run(calls())
    writer.flush()
    assert [entry.rows for entry in written] == list(range(20))
    writer.close()


_cell = st.one_of(st.none(), st.integers(-10**6, 10**6), st.text(max_size=12), st.floats(allow_nan=True),
                  st.booleans())


@given(rows=st.lists(st.lists(_cell, min_size=2, max_size=2).map(tuple), max_size=40),
       max_rows=st.integers(0, 30), max_bytes=st.integers(0, 400), chunk=st.integers(1, 7),
       typed=st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_chunk_of_rows_is_kept_exactly_as_row_by_row(rows: list[tuple[object, ...]], max_rows: int,
                                                       max_bytes: int, chunk: int, typed: bool) -> None:
    """The read path hands the collector whole chunks; it must keep the same rows, JSON and truncation
    reason as taking them one at a time (what writes still do)."""
    from agentpg.access.results import RowCollector

    one, many = RowCollector(max_rows, max_bytes), RowCollector(max_rows, max_bytes)
    if typed:  # column 0 int4 (JSON as it is), column 1 of a type whose values need converting (float8)
        one.describe([23, 701])
        many.describe([23, 701])
    for row in rows:
        if not one.add(row):
            break
    for start in range(0, len(rows), chunk):
        if not many.add_rows(rows[start:start + chunk]):
            break
    assert (many.rows, many.rows_json, many.truncated_by, many.size) == \
        (one.rows, one.rows_json, one.truncated_by, one.size)
