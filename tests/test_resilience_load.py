"""Issue 7 item 3: concurrency. 200 MCP sessions of 20 agents of one user write to and read the global
database at once; the same user id registered from many requests at once.

``AGENTPG_LOAD_SESSIONS`` / ``AGENTPG_LOAD_AGENTS`` / ``AGENTPG_LOAD_ROWS`` scale the load (defaults 200 / 20 / 3;
the long form, e.g. 1000 / 50 / 20, is documented in docs/limits.md).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from mcp import ClientSession
from mcp_support import http_session, live_server, ok, text, uid
from sqlalchemy import func, select

from agentpg.app.runtime import Runtime, admin_token
from agentpg.catalog.models import User, UserGlobalDatabase
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio

SESSIONS = int(os.environ.get("AGENTPG_LOAD_SESSIONS", "200"))
AGENTS = int(os.environ.get("AGENTPG_LOAD_AGENTS", "20"))
ROWS = int(os.environ.get("AGENTPG_LOAD_ROWS", "3"))
#: The documented back-pressure errors: the tenant pool is busy, or the agent has too many calls running.
BACK_PRESSURE = ("too many concurrent calls",)



@pytest.fixture(scope="module")
def crowd(runtime: Runtime) -> Iterator[tuple[str, list[str]]]:
    user = uid("lu")
    runtime.service.register_user(user)
    tokens = [runtime.service.create_workspace_with_token(user, uid("lw"))[1].secret for _ in range(AGENTS)]
    yield user, tokens
    runtime.service.delete_user(user)


async def _call(s: ClientSession, tool: str, errors: list[str], **arguments: Any) -> dict[str, Any]:
    """Call until it succeeds; back-pressure errors are retried (and counted), anything else is recorded."""
    for _ in range(200):
        result = await asyncio.wait_for(s.call_tool(tool, arguments), 60)
        if not result.is_error:
            assert result.structured_content is not None
            return result.structured_content
        message = text(result)
        errors.append(message)
        if not any(p in message for p in BACK_PRESSURE):
            raise AssertionError(f"unexpected tool error: {message}")
        await asyncio.sleep(0.05)
    raise AssertionError("still refused after 200 attempts")


async def test_200_sessions_of_20_agents_share_the_global_database(settings: Settings,
                                                                    crowd: tuple[str, list[str]]) -> None:
    _, tokens = crowd
    errors: list[str] = []
    with live_server(settings.model_copy(update={"warm_pool_size": 0})) as base_url:
        async with http_session(base_url, tokens[0]) as s:
            await ok(s, "execute", database="global",
                     sql="CREATE TABLE crowd (agent int, session int, seq int, PRIMARY KEY (agent, session, seq))")
        start = asyncio.Event()
        written = asyncio.Event()
        done_writing = 0
        seen_by_agent: dict[int, int] = {}

        async def session(n: int) -> None:
            nonlocal done_writing
            agent = n % AGENTS
            async with http_session(base_url, tokens[agent]) as s:
                opened.append(n)
                await start.wait()
                for seq in range(ROWS):
                    out = await _call(s, "execute", errors, database="global",
                                      sql="INSERT INTO crowd VALUES ($1, $2, $3)", params=[agent, n, seq])
                    assert out["rows_affected"] == 1
                # Read what the others have committed so far (at least our own rows).
                mine = await _call(s, "query", errors, database="global",
                                   sql="SELECT count(*) FROM crowd WHERE session = $1", params=[n])
                assert mine["rows"] == [[ROWS]]
                done_writing += 1
                if done_writing == SESSIONS:
                    written.set()
                await asyncio.wait_for(written.wait(), 120)
                # Every agent sees every other agent's committed rows.
                seen = await _call(s, "query", errors, database="global",
                                   sql="SELECT count(DISTINCT agent), count(*) FROM crowd")
                seen_by_agent[n] = seen["rows"][0][1]
                assert seen["rows"] == [[AGENTS, SESSIONS * ROWS]], seen["rows"]

        opened: list[int] = []
        began = time.monotonic()
        tasks = [asyncio.create_task(session(n)) for n in range(SESSIONS)]
        # All sessions open (initialize) at once, then all start writing at once.
        while len(opened) < SESSIONS and not any(t.done() for t in tasks) and time.monotonic() - began < 120:
            await asyncio.sleep(0.05)
        open_s = time.monotonic() - began
        began = time.monotonic()
        start.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 240)
        elapsed = time.monotonic() - began
    unexpected = [e for e in errors if not any(p in e for p in BACK_PRESSURE)]
    assert unexpected == []
    assert len(seen_by_agent) == SESSIONS
    calls = SESSIONS * (ROWS + 2)
    print(f"\nload: {SESSIONS} sessions / {AGENTS} agents, {SESSIONS * ROWS} rows, {calls} calls in {elapsed:.1f} s "
          f"({calls / elapsed:.0f} calls/s), {len(errors)} back-pressure retries; sessions opened in {open_s:.1f} s")


def test_concurrent_registration_of_one_user_id(settings: Settings, runtime: Runtime,
                                                admin: psycopg.Connection[tuple[object, ...]]) -> None:
    user = uid("race")
    count_sql = "SELECT count(*) FROM pg_database WHERE datname LIKE 'apg\\_%'"
    before = admin.execute(count_sql).fetchone()
    token = admin_token(settings)
    with live_server(settings.model_copy(update={"warm_pool_size": 0})) as base_url:

        async def register_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                         headers={"Authorization": f"Bearer {token}"}) as client:
                return list(await asyncio.gather(*(client.post("/api/users", json={"id": user})
                                                   for _ in range(16))))

        responses = asyncio.run(register_all())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 1 and set(statuses) <= {201, 409}, statuses
    for r in responses:
        if r.status_code == 409:
            assert r.headers["content-type"].startswith("application/problem+json")
    with runtime.service.deps.sessions() as s:
        assert s.scalar(select(func.count()).select_from(User).where(User.id == user)) == 1
        assert s.scalar(select(func.count()).select_from(UserGlobalDatabase)
                        .where(UserGlobalDatabase.user_id == user)) == 1
    after = admin.execute(count_sql).fetchone()
    assert before is not None and after is not None and after[0] == before[0] + 1
    runtime.service.delete_user(user)
