"""Issue 7 item 7: limits. Per-agent concurrency, per-token rate limits with 429 + Retry-After (in-band tool
errors inside an MCP session), failed-auth throttling, body size limits, and no starvation: one agent
hammering with many concurrent calls does not stop another agent's calls."""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import pytest
from mcp_support import MCP_HEADERS, Tenants, http_session, live_server, ok, text

from agentpg.api.ratelimit import TokenBuckets
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio





def test_token_bucket_refills_and_says_when() -> None:
    buckets = TokenBuckets(rate_per_s=2.0, burst=3)
    assert [buckets.take("k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k", now=0.0) == pytest.approx(0.5)
    assert buckets.take("other", now=0.0) == 0.0  # keys are independent
    assert buckets.take("k", now=0.5) == 0.0  # one refilled after 1/rate seconds
    assert buckets.wait("k", now=0.5) == pytest.approx(0.5)
    assert TokenBuckets(rate_per_s=0, burst=1).take("k") == 0.0  # 0 disables
    small = TokenBuckets(rate_per_s=1.0, burst=1, max_keys=2)
    for key in "abc":
        small.take(key, now=0.0)
    assert small.take("a", now=0.0) == 0.0  # forgotten (least recently used): a full bucket again


async def test_a_hammering_agent_does_not_starve_another(settings: Settings, tenants: Tenants) -> None:
    limited = settings.model_copy(update={"warm_pool_size": 0, "mcp_max_concurrent_calls": 4,
                                          "tenant_pool_max_size": 3, "rate_limit_per_s": 10_000.0,
                                          "rate_limit_burst": 10_000})
    with live_server(limited) as base_url:
        stop = asyncio.Event()
        hammer_errors: list[str] = []
        hammer_ok = 0

        async def hammer(session_no: int) -> None:
            nonlocal hammer_ok
            async with http_session(base_url, tenants.token_a) as s:
                async def one() -> None:
                    nonlocal hammer_ok
                    while not stop.is_set():
                        result = await s.call_tool("query", {"database": "global", "sql": "SELECT pg_sleep(0.2)"})
                        if result.is_error:
                            hammer_errors.append(text(result))
                        else:
                            hammer_ok += 1

                await asyncio.gather(*(one() for _ in range(12)))

        hammers = [asyncio.create_task(hammer(i)) for i in range(3)]  # 36 calls at once, from one agent
        await asyncio.sleep(1.0)
        latencies: list[float] = []
        async with http_session(base_url, tenants.token_b) as b:
            for _ in range(15):
                started = time.monotonic()
                await ok(b, "query", database="global", sql="SELECT 1")
                await ok(b, "query", database="agent", sql="SELECT 1")
                latencies.append(time.monotonic() - started)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*hammers), 60)
    assert hammer_ok > 0
    assert hammer_errors, "the hammering agent was never limited"
    for message in hammer_errors:
        assert "too many concurrent calls" in message and "retry" in message, message
    # The other agent's calls all succeeded, promptly.
    assert max(latencies) < 2.0, latencies
    print(f"\nhammer: {hammer_ok} ok, {len(hammer_errors)} refused; other agent's 2 calls: "
          f"max {max(latencies) * 1000:.0f} ms, median {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms")


async def test_a_made_up_forwarded_address_gets_no_fresh_budget(settings: Settings) -> None:
    """A client on this machine (a local user, a gateway child: it shares the network) sending a new
    ``X-Forwarded-For`` per request is still one address to the failed-login budget. Only a proxy named in
    ``trusted_proxies`` may name the client: then each forwarded address has its own budget."""
    tight = settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0, "auth_failures_burst": 3,
                                        "auth_failures_per_s": 0.001})

    async def statuses(url: str, forwarded: bool) -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            return [(await client.get(f"{url}/api/users", headers={
                "Authorization": f"Bearer apg_u_{secrets.token_urlsafe(32)}",
                **({"X-Forwarded-For": f"10.9.{i}.{i}"} if forwarded else {})})).status_code for i in range(6)]

    with live_server(tight) as url:
        assert await statuses(url, forwarded=False) == [401, 401, 401, 429, 429, 429]
        assert set(await statuses(url, forwarded=True)) == {429}
    with live_server(tight.model_copy(update={"trusted_proxies": ["127.0.0.1"]})) as url:
        assert await statuses(url, forwarded=True) == [401] * 6  # six clients behind the proxy, one 401 each


async def test_rate_limits_answer_429_with_retry_after_and_in_band_on_mcp(settings: Settings,
                                                                         tenants: Tenants) -> None:
    strict = settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 2.0, "rate_limit_burst": 6,
                                         "auth_failures_per_s": 0.5, "auth_failures_burst": 4})
    with live_server(strict) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            user_auth = {"Authorization": f"Bearer {tenants.user1_token}"}
            answers = [await client.get(f"/api/users/{tenants.user1}", headers=user_auth) for _ in range(10)]
            assert [r.status_code for r in answers[:6]] == [200] * 6
            limited = [r for r in answers if r.status_code == 429]
            assert limited, [r.status_code for r in answers]
            body = limited[0].json()
            assert limited[0].headers["content-type"].startswith("application/problem+json")
            assert body["code"] == "rate_limited" and "retry" in body["detail"]
            assert int(limited[0].headers["retry-after"]) >= 1
            # Another user's token has its own bucket; the admin token is not limited.
            other = await client.get(f"/api/users/{tenants.user2}",
                                     headers={"Authorization": f"Bearer {tenants.user2_token}"})
            assert other.status_code == 200
            admin = {"Authorization": f"Bearer {tenants.admin_token}"}
            assert {(await client.get(f"/api/users/{tenants.user1}", headers=admin)).status_code
                    for _ in range(20)} == {200}
            # Health and metrics are never limited.
            assert {(await client.get("/healthz")).status_code for _ in range(20)} == {200}

            # Inside an MCP session a rate-limited call is a tool error saying when to retry; the session lives on.
            async with http_session(base_url, tenants.token_c) as s:
                results = [await s.call_tool("query", {"database": "agent", "sql": "SELECT 1"}) for _ in range(8)]
                refused = [text(r) for r in results if r.is_error]
                assert refused, "no call was rate limited"
                assert all("rate limit" in m and "retry in" in m for m in refused), refused
                await asyncio.sleep(1.5)
                assert (await ok(s, "query", database="agent", sql="SELECT 1"))["rows"] == [[1]]

            # Failed authentication: after the burst of 401s, unproven tokens from this address get 429 ...
            bad = {"Authorization": "Bearer apg_u_" + "x" * 43}
            statuses = [(await client.get("/api/users", headers=bad)).status_code for _ in range(6)]
            assert statuses[:4] == [401] * 4 and statuses[-1] == 429, statuses
            # ... but a token already seen to work still gets through.
            assert (await client.get(f"/api/users/{tenants.user2}",
                                     headers={"Authorization": f"Bearer {tenants.user2_token}"})).status_code == 200


async def test_mcp_bodies_over_the_limit_are_413(settings: Settings, tenants: Tenants) -> None:
    with live_server(settings.model_copy(update={"warm_pool_size": 0})) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            big = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"x": "' + b"a" * (2 << 20) + b'"}}'
            response = await client.post("/mcp", content=big, headers={
                **MCP_HEADERS, "Authorization": f"Bearer {tenants.token_a}"})
            assert response.status_code == 413
            # A huge SQL string inside the limit is refused as a tool error, not a crash.
            async with http_session(base_url, tenants.token_a) as s:
                result = await s.call_tool("query", {"database": "agent", "sql": "SELECT '" + "x" * 900_000 + "'"})
                assert not result.is_error or "retry" not in text(result)
