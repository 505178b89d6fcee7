"""Helpers for the MCP tests: a real ``agentpg serve`` app on a loopback port, SDK client sessions, tenants."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import uvicorn
from mcp import Client, ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from starlette.types import ASGIApp

from agentpg.access.cache import Invalidation
from agentpg.app.asgi import create_app, server_options
from agentpg.app.runtime import Runtime, admin_token
from agentpg.settings import Settings

MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
"""What a streamable-HTTP MCP client sends with every POST."""
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
"""A raw MCP initialize request, for tests that speak HTTP to /mcp without the SDK."""


def mcp_answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message a streamable-HTTP POST was answered with: the JSON body, or the one ``message``
    event of an SSE answer (the spec allows either; agentpg's /mcp sends JSON, a gateway child may not)."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
        assert len(data) == 1, response.text
        return dict(json.loads(data[0]))
    return dict(response.json())


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PROCESS_INVALIDATION = Invalidation()
"""The cache generation every service this test process opens shares (the runtime fixture's and each app's):
a change a test makes through one is seen at once by the others, as within one ``serve``."""


@contextmanager
def live_server(settings: Settings, wrap: Callable[[ASGIApp], ASGIApp] | None = None) -> Iterator[str]:
    """``create_app(settings)`` (wrapped by ``wrap``, e.g. a test proxy's header rewrite) served by uvicorn in
    a thread of this process; yields its base URL."""
    port = free_port()
    app: ASGIApp = create_app(settings, invalidation=PROCESS_INVALIDATION)
    server = uvicorn.Server(uvicorn.Config(wrap(app) if wrap is not None else app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on", **server_options(settings)))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def archived_server(prefix: str) -> Iterator[tuple[Settings, str, httpx.Client]]:
    """``serve`` on an embedded server of its own with continuous archiving (undo needs it), once every server
    is protected: its settings, base URL and an admin REST client. The server (a detached daemon that outlives
    serve) is stopped and its home removed afterwards."""
    from agentpg.embedded import EmbeddedPostgres

    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    home.chmod(0o711)
    settings = Settings(home=home, embedded_fsync=False, warm_pool_size=0, usage_sync_interval_s=0, backup_enabled=True)
    try:
        with live_server(settings) as url:
            admin = {"Authorization": f"Bearer {admin_token(settings)}"}
            with httpx.Client(base_url=url, headers=admin, timeout=60) as api:
                deadline = time.monotonic() + 120
                while not all(s["protected"] for s in api.get("/api/backups").json()):
                    assert time.monotonic() < deadline, api.get("/api/backups").json()
                    time.sleep(0.5)
                yield settings, url, api
    finally:
        EmbeddedPostgres(home).stop()
        shutil.rmtree(home, ignore_errors=True)


@asynccontextmanager
async def http_session(base_url: str, token: str, path: str = "/mcp", timeout: float = 30,
                       mode: str = "legacy") -> AsyncIterator[ClientSession]:
    """A ready SDK 2.x client session over streamable HTTP, authenticated with ``token``; ``path`` is
    ``/mcp`` (agentpg's own tools) or ``/mcp/servers/<name>`` (a gateway server). ``mode`` is the era:
    "legacy" (the 2025 ``initialize`` handshake), "2026-07-28" (the per-request envelope) or "auto"."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as client:
        transport = streamable_http_client(f"{base_url}{path}", http_client=client)
        if mode == "legacy":
            async with transport as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                yield session
        else:
            async with Client(transport, mode=mode) as modern:  # type: ignore[arg-type]
                yield modern.session


def gateway_session(base_url: str, token: str, name: str,
                    timeout: float = 90) -> AbstractAsyncContextManager[ClientSession]:
    """:func:`http_session` on the gateway's server ``name`` (``/mcp/servers/<name>``)."""
    return http_session(base_url, token, f"/mcp/servers/{name}", timeout)


def text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def ok(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured result."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: Any) -> str:
    """Call a tool that must fail as a tool error; its message (checked to leak nothing internal)."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, f"expected a tool error, got: {text(result)}"
    message = text(result)
    assert "Traceback" not in message and "postgresql://" not in message and "apg_" not in message, message
    return message


@dataclass
class Tenants:
    """Two agents (a, b) of one user, and one agent (c) of another user, with their tokens."""

    user1: str
    user2: str
    ws_a: str
    ws_b: str
    ws_c: str
    token_a: str
    token_b: str
    token_c: str
    user1_token: str
    user2_token: str
    admin_token: str
    extra: dict[str, str] = field(default_factory=dict)


def make_tenants(runtime: Runtime) -> Tenants:
    svc = runtime.service
    user1, user2 = uid("mu"), uid("mu")
    ws_a, ws_b, ws_c = uid("wa"), uid("wb"), uid("wc")
    svc.register_user(user1)
    svc.register_user(user2)
    tokens = {}
    for user, ws in ((user1, ws_a), (user1, ws_b), (user2, ws_c)):
        _, issued = svc.create_workspace_with_token(user, ws)
        tokens[ws] = issued.secret
    admin = admin_token(runtime.settings)
    return Tenants(user1=user1, user2=user2, ws_a=ws_a, ws_b=ws_b, ws_c=ws_c, token_a=tokens[ws_a],
                   token_b=tokens[ws_b], token_c=tokens[ws_c],
                   user1_token=svc.issue_user_token(user1).secret, user2_token=svc.issue_user_token(user2).secret,
                   admin_token=admin)


def rss_kib() -> int:
    """This process's resident set size (VmRSS), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")
