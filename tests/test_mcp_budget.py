"""Over budget, an agent's MCP ``execute`` says why it is refused; its reads keep working."""

from __future__ import annotations

import psycopg
import pytest
from helpers import workspace_global_uri
from mcp_support import http_session, live_server, ok, refused, uid
from test_budgets import EXPENSIVE, wait_for_stats

from agentpg.app.runtime import Runtime
from agentpg.settings import Settings
from agentpg.usage.budgets import sync_usage

pytestmark = pytest.mark.anyio



async def test_execute_over_budget_is_refused_with_the_reason(runtime: Runtime, settings: Settings) -> None:
    svc = runtime.service
    user, ws = uid("mb"), uid("wb")
    svc.register_user(user)
    _, token = svc.create_workspace_with_token(user, ws)
    with psycopg.connect(workspace_global_uri(runtime, ws), autocommit=True) as conn:
        conn.execute("CREATE TABLE notes AS SELECT g AS id FROM generate_series(1, 300) g")
    wait_for_stats(runtime, user, 300)
    sync_usage(svc.deps, EXPENSIVE)
    svc.set_budget(user, 1)
    with live_server(settings.model_copy(update={"warm_pool_size": 0})) as url:
        async with http_session(url, token.secret) as session:
            message = await refused(session, "execute", database="global", sql="INSERT INTO notes VALUES (0)")
            assert "budget exceeded" in message and "reads still work" in message
            rows = await ok(session, "query", database="global", sql="SELECT count(*) AS n FROM notes")
            assert rows["rows"] == [[300]]
            svc.set_budget(user, None)
            done = await ok(session, "execute", database="global", sql="INSERT INTO notes VALUES (0)")
            assert done["rows_affected"] == 1
    svc.delete_user(user)
