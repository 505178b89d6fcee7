"""Both MCP protocol eras on the real service (issue 20): the SDK 2.x client in mode "legacy" (2025
``initialize`` handshake) and "2026-07-28" (per-request envelope) over HTTP and stdio; an **mcp 1.x**
client (a venv with mcp==1.30.0, made once under the temp dir) over HTTP and stdio; the 2026 wire rules
checked raw; a disconnect cancelling the statement; and two ``serve`` instances behind one address (a
round-robin TCP proxy in the test) answering one agent's interleaved requests, since /mcp is stateless.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import psycopg
import pytest
from install_lock import install_lock
from mcp import Client, ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION
from mcp_support import MCP_HEADERS, Tenants, http_session, live_server, mcp_answer, ok, refused

from agentpg.app.runtime import Runtime
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"
MCP1_VERSION = "1.30.0"
AGENTPG = str(Path(sys.executable).with_name("agentpg"))


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0})) as url:
        yield url


def _envelope(params: dict[str, Any]) -> dict[str, Any]:
    return {**params, "_meta": {types.PROTOCOL_VERSION_META_KEY: MODERN, types.CLIENT_CAPABILITIES_META_KEY: {}}}


async def _modern(client: httpx.AsyncClient, url: str, token: str, method: str, params: dict[str, Any],
                  request_id: int | str = 1, **headers: str) -> httpx.Response:
    """A raw 2026-07-28 request: the envelope in ``_meta`` and the routing headers the spec asks for."""
    routing = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if "name" in params:
        routing["Mcp-Name"] = params["name"]
    return await client.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": request_id, "method": method,
                                                 "params": _envelope(params)},
                             headers={**MCP_HEADERS, "Authorization": f"Bearer {token}", **routing, **headers})


async def _round(session: ClientSession, table: str) -> None:
    """What every client below does: list, write, read back, be refused."""
    assert {t.name for t in (await session.list_tools()).tools} >= {"query", "execute", "list_tables"}
    await ok(session, "execute", database="agent", sql=f"CREATE TABLE {table} (n int)")
    await ok(session, "execute", database="agent", sql=f"INSERT INTO {table} VALUES ($1)", params=[7])
    assert (await ok(session, "query", database="agent", sql=f"SELECT n FROM {table}"))["rows"] == [[7]]
    await refused(session, "query", database="agent", sql=f"DROP TABLE {table}")


@pytest.mark.parametrize("mode", ["legacy", MODERN, "auto"])
async def test_sdk2_client_in_each_era_over_http(base_url: str, tenants: Tenants, mode: str) -> None:
    async with http_session(base_url, tenants.token_a, mode=mode) as session:
        assert session.protocol_version == (LATEST_HANDSHAKE_VERSION if mode == "legacy" else MODERN)
        await _round(session, f"eras_http_{mode.replace('-', '_')}")


@pytest.mark.parametrize("mode", ["legacy", MODERN])
async def test_sdk2_client_in_each_era_over_stdio(agentpg_home: Path, tenants: Tenants, mode: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update(AGENTPG_HOME=str(agentpg_home), AGENTPG_AGENT_TOKEN=tenants.token_b)
    params = StdioServerParameters(command=AGENTPG, args=["mcp"], env=env)
    with open(os.devnull, "w") as errlog:
        async with Client(stdio_client(params, errlog=errlog), mode=mode) as client:  # type: ignore[arg-type]
            assert client.protocol_version == (LATEST_HANDSHAKE_VERSION if mode == "legacy" else MODERN)
            await _round(client.session, f"eras_stdio_{mode.replace('-', '_')}")


async def test_2026_wire_rules_over_http(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        url, token = base_url, tenants.token_c
        found = await _modern(client, url, token, "server/discover", {})
        assert found.status_code == 200 and found.headers["content-type"].startswith("application/json")
        discovered = found.json()["result"]
        assert discovered["supportedVersions"] == [MODERN] and "tools" in discovered["capabilities"]
        assert discovered["resultType"] == "complete" and "global" in discovered["instructions"]
        assert discovered["_meta"][types.SERVER_INFO_META_KEY]["name"] == "agentpg"
        called = await _modern(client, url, token, "tools/call",
                               {"name": "query", "arguments": {"database": "agent", "sql": "SELECT 2 AS two"}})
        result = called.json()["result"]  # plain JSON (not an event stream) for a 2026 call that ends quickly
        assert result["resultType"] == "complete" and result["structuredContent"]["rows"] == [[2]]
        listed = (await _modern(client, url, token, "tools/list", {})).json()["result"]
        assert listed["resultType"] == "complete" and "ttlMs" in listed and len(listed["tools"]) >= 8
        for removed in ("ping", "initialize"):  # 2026-07-28 has neither
            gone = await _modern(client, url, token, removed, {})
            assert gone.status_code == 404 and gone.json()["error"]["code"] == types.METHOD_NOT_FOUND
        lying = await _modern(client, url, token, "tools/call", {"name": "query", "arguments": {}},
                              **{"Mcp-Name": "execute"})
        assert lying.status_code == 400 and lying.json()["error"]["code"] == types.HEADER_MISMATCH
        future = await client.post(f"{url}/mcp", headers={
            **MCP_HEADERS, "Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2099-01-01",
            "Mcp-Method": "tools/list"}, json={"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {
                "_meta": {types.PROTOCOL_VERSION_META_KEY: "2099-01-01", types.CLIENT_CAPABILITIES_META_KEY: {}}}})
        assert future.status_code == 400 and future.json()["error"]["code"] == types.UNSUPPORTED_PROTOCOL_VERSION
        assert future.json()["error"]["data"]["supported"] == [MODERN]
        # The 2025 era on the same path needs no initialize first (stateless).
        legacy = await client.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 4, "method": "tools/list"},
                                   headers={**MCP_HEADERS, "Authorization": f"Bearer {token}",
                                            "MCP-Protocol-Version": LATEST_HANDSHAKE_VERSION})
        assert legacy.status_code == 200 and "resultType" not in mcp_answer(legacy)["result"]
        unauthenticated = await _modern(client, url, "apg_wrong", "server/discover", {})
        assert unauthenticated.status_code == 401 and "Bearer" in unauthenticated.headers["www-authenticate"]


def _sleeping_backends(runtime: Runtime) -> int:
    with psycopg.connect(runtime.admin_dsn, autocommit=True) as conn:
        # LIKE: agentpg sends a query wrapped in its row-size check (access.shape.bounded_statement).
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%(SELECT pg_sleep(29)%' "
                           "AND pid <> pg_backend_pid() AND state = 'active'").fetchone()
    return int(row[0]) if row else 0


async def _until(runtime: Runtime, count: int) -> int:
    for _ in range(200):
        if (found := await asyncio.to_thread(_sleeping_backends, runtime)) == count:
            return found
        await asyncio.sleep(0.05)
    return await asyncio.to_thread(_sleeping_backends, runtime)


@pytest.mark.parametrize("era", ["legacy", MODERN])
async def test_a_disconnect_cancels_the_call_and_its_statement(runtime: Runtime, base_url: str,
                                                               tenants: Tenants, era: str) -> None:
    arguments = {"database": "agent", "sql": "SELECT pg_sleep(29)"}
    async with httpx.AsyncClient(timeout=60) as client:
        if era == MODERN:
            call = _modern(client, base_url, tenants.token_a, "tools/call", {"name": "query", "arguments": arguments})
        else:
            call = client.post(f"{base_url}/mcp", headers={**MCP_HEADERS, "Authorization": f"Bearer {tenants.token_a}"},
                               json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                     "params": {"name": "query", "arguments": arguments}})
        slow = asyncio.ensure_future(call)
        assert await _until(runtime, 1) == 1
        slow.cancel()  # the client goes away: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await slow
    assert await _until(runtime, 0) == 0  # cancelled in Postgres, not just abandoned


@pytest.fixture(scope="module")
def mcp1_python() -> str:
    """A Python with mcp==1.30.0 (a 2025-era client), in a venv kept per version under the temp dir."""
    venv = Path(tempfile.gettempdir()) / f"agentpg-test-mcp1-{MCP1_VERSION}"
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import importlib.metadata as m; assert m.version('mcp') == '{MCP1_VERSION}'"]
    with install_lock(venv.name):  # checked under the lock: another worker may be filling (or --clear-ing) it
        if not python.exists() or subprocess.run(check, capture_output=True, check=False).returncode != 0:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
            done = subprocess.run([str(python), "-m", "pip", "install", "-q", f"mcp=={MCP1_VERSION}"],
                                  capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                pytest.fail(f"pip install mcp=={MCP1_VERSION} failed:\n{done.stderr[-2000:]}", pytrace=False)
    return str(python)


def test_mcp1_client_over_http_and_stdio(mcp1_python: str, base_url: str, agentpg_home: Path,
                                         tenants: Tenants) -> None:
    script = str(Path(__file__).with_name("mcp1_client.py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = [[mcp1_python, script, "http", f"{base_url}/mcp", tenants.token_c],
            [mcp1_python, script, "stdio", AGENTPG, str(agentpg_home), tenants.token_c]]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                                         env=env, check=False), runs))
    for run in done:
        assert run.returncode == 0, run.stderr[-3000:]
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        assert seen["protocol_version"] in HANDSHAKE_PROTOCOL_VERSIONS and seen["server"] == "agentpg"
        assert "query" in seen["tools"] and seen["rows"] == [[42]]
        assert seen["answered_error"] is False and seen["refused_error"] is True


@asynccontextmanager
async def _round_robin(backends: list[str]) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP proxy on a loopback port that sends each new connection to the next backend in turn; yields
    its URL and how many connections each backend got."""
    targets = [(u.split("//")[1].split(":")[0], int(u.rsplit(":", 1)[1])) for u in backends]
    served = [0] * len(targets)
    turn = itertools.count()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = next(turn) % len(targets)
        served[index] += 1
        up_reader, up_writer = await asyncio.open_connection(*targets[index])
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", served


async def test_two_serve_instances_behind_one_address(settings: Settings, tenants: Tenants) -> None:
    """Each request on a new connection, so consecutive requests alternate between the instances; one
    agent's session (either era) works across both, its calls interleaved."""
    instance = settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0})
    with live_server(instance) as first, live_server(instance) as second:
        async with _round_robin([first, second]) as (url, served):
            for mode in ("legacy", MODERN):
                headers = {"Authorization": f"Bearer {tenants.token_b}"}
                async with httpx2.AsyncClient(headers=headers, timeout=30,
                                              limits=httpx2.Limits(max_keepalive_connections=0)) as http, \
                        Client(streamable_http_client(f"{url}/mcp", http_client=http),  # type: ignore[arg-type]
                               mode=mode) as client:
                    table = f"twice_{mode.replace('-', '_')}"
                    await ok(client.session, "execute", database="agent", sql=f"CREATE TABLE {table} (n int)")
                    await asyncio.gather(*(ok(client.session, "execute", database="agent",
                                              sql=f"INSERT INTO {table} VALUES ($1)", params=[n]) for n in range(6)))
                    counted = await ok(client.session, "query", database="agent", sql=f"SELECT count(*) FROM {table}")
                    assert counted["rows"] == [[6]]
            assert min(served) >= 4, served  # both instances answered a share of the requests


def test_stdio_from_a_file_uses_the_sdk_server_in_the_2026_era(agentpg_home: Path, tenants: Tenants,
                                                                tmp_path: Path, mode: str = MODERN) -> None:
    """stdin a file (not a pipe): the SDK's ``Server.run`` answers, and its first request decides the era (the
    2025 era there is the SDK's own, unchanged; ``mode`` selects it when run by hand). (At
    the file's end the SDK server closes the connection and answers a call still running "Connection closed":
    this fallback is for a terminal, where the end of input means the person is done.)"""
    call = {"name": "query", "arguments": {"database": "agent", "sql": "SELECT 5 AS five"}}
    if mode == MODERN:
        messages = [{"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": _envelope({})},
                    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": _envelope(call)}]
    else:
        hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        messages = [{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello},
                    {"jsonrpc": "2.0", "method": "notifications/initialized"},
                    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(m) + "\n" for m in messages))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update(AGENTPG_HOME=str(agentpg_home), AGENTPG_AGENT_TOKEN=tenants.token_c)
    with requests.open("rb") as stdin, (tmp_path / "answers.jsonl").open("wb") as stdout:
        done = subprocess.run([AGENTPG, "mcp"], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env,
                              timeout=120, check=False)
    answers = {a["id"]: a for a in map(json.loads, (tmp_path / "answers.jsonl").read_text().splitlines())}
    assert done.returncode == 0 and set(answers) == {1, 2}, (done.stderr[-2000:], answers)
    first = answers[1]["result"]
    assert first["supportedVersions"] == [MODERN] if mode == MODERN else first["protocolVersion"] == "2025-06-18"
    assert ("resultType" in first) == (mode == MODERN)
    assert "result" in answers[2] or answers[2]["error"]["message"] == "Connection closed", answers[2]
