"""An agent's side of MCP for the benchmarks that load serve like many agents (fair_sharing.py): the official
SDK's streamable-HTTP client, one call, and what its answer was (the documented wording of each refusal).

``SAMPLES`` keeps the first message of each kind this process saw, for the report: what an agent read.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

SAMPLES: dict[str, str] = {}
"""The first tool error message of each kind this process saw (for the report: what the caller read)."""


_SSL = ssl.create_default_context()  # one context for every client (loading the CA bundle per client is slow)


def http_client(token: str) -> httpx2.AsyncClient:
    """An agent's HTTP client for the SDK's MCP transport (which takes an httpx2 client)."""
    return httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=90, verify=_SSL,
                              limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None))


@asynccontextmanager
async def mcp_session(base_url: str, client: httpx2.AsyncClient) -> AsyncIterator[ClientSession]:
    async with streamable_http_client(f"{base_url}/mcp", http_client=client, terminate_on_close=False) \
            as (read, write), ClientSession(read, write, read_timeout_seconds=90) as session:
        await session.initialize()
        yield session


def kind_of_text(message: str) -> str:
    """The kind of a tool error, from the documented wording (docs/limits.md, docs/mcp.md)."""
    for needle, kind in (("server is busy", "busy (server_busy)"), ("cannot be reached", "connect failure"),
                         ("too many concurrent calls on this database", "busy (pool_exhausted)"),
                         ("too many concurrent calls from this agent", "agent call limit"),
                         ("rate limit", "rate limited"), ("temp_file_limit", "temp_file_limit"),
                         ("too large", "result too large"), ("cancelled", "cancelled (time limit)"),
                         ("busy", "busy (other)")):
        if needle in message:
            return kind
    return "other: " + message[:100]


def kind_of_exc(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return "client timeout"
    if isinstance(exc, httpx.TransportError):
        return f"HTTP transport: {type(exc).__name__}"
    return f"{type(exc).__name__}: {str(exc)[:80]}"


async def call(session: ClientSession, tool: str, database: str, sql: str,
               params: list[Any] | None = None) -> tuple[str, float]:
    args: dict[str, Any] = {"database": database, "sql": sql}
    if params is not None:
        args["params"] = params
    started = time.perf_counter()
    try:
        result = await session.call_tool(tool, args)
    except Exception as exc:  # the session itself failed (transport, HTTP status): it cannot be used further
        return "client: " + kind_of_exc(exc), (time.perf_counter() - started) * 1000
    ms = (time.perf_counter() - started) * 1000
    if not result.is_error:
        return "ok", ms
    message = " ".join(getattr(c, "text", "") for c in result.content)
    kind = kind_of_text(message)
    SAMPLES.setdefault(kind, message[:240])
    return kind, ms

