"""The MCP gateway (issues 5, 17): users pick servers from the operator's catalog, whose
``${GLOBAL_DB_URL}`` is resolved server-side; the server is spawned sandboxed and relayed over streamable
HTTP (``/mcp/servers/{name}``) and stdio (``agentpg mcp --server``).

The spawned server is the real npm package ``@modelcontextprotocol/server-postgres`` (installed by the
fixture below into a test-local directory; node/npm and bubblewrap are installed with apt when missing).
Every response, error, resource URI, stderr and log line is scanned for the exact resolved secrets. The
attacks on the gateway are in ``test_attack_gateway.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import leakscan
import pytest
from install_lock import install_lock, npm_install
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp_support import INIT, MCP_HEADERS, Tenants, gateway_session, live_server, text

from agentpg.app.runtime import Runtime
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio

NPM_PACKAGE = "@modelcontextprotocol/server-postgres"
NPM_VERSION = "0.6.2"



def apt_install(programs: tuple[str, ...], packages: tuple[str, ...]) -> None:
    """Install Debian ``packages`` when one of ``programs`` is missing (tests run as root on a fresh box).
    Under the ``apt`` install lock: another xdist worker may be running apt-get (dpkg allows one at a time)."""
    if all(shutil.which(p) for p in programs):
        return
    if os.geteuid() != 0:
        pytest.fail(f"{', '.join(programs)} missing and the tests are not root: install {' '.join(packages)}",
                    pytrace=False)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with install_lock("apt"):
        if not all(shutil.which(p) for p in programs):  # the holder before us may have installed them
            subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages], check=True,
                           env=env, capture_output=True, timeout=900)
    if not all(shutil.which(p) for p in programs):
        pytest.fail(f"apt-get installed {' '.join(packages)} but {', '.join(programs)} is still not on PATH",
                    pytrace=False)


def _ensure_node() -> None:
    apt_install(("node", "npm"), ("nodejs", "npm"))


def ensure_bwrap() -> None:
    """bubblewrap, the gateway's sandbox tool (Debian's package), as an operator would install it."""
    apt_install(("bwrap",), ("bubblewrap",))


@pytest.fixture(scope="module")
def server_postgres_js() -> str:
    """The entry point of the pinned npm package, installed into a test-local directory (kept per version
    under /tmp so a re-run does not download it again)."""
    _ensure_node()
    ensure_bwrap()
    entry = npm_install(NPM_PACKAGE, NPM_VERSION, "@modelcontextprotocol/server-postgres/dist/index.js")
    return str(entry)



GATEWAY_SETTINGS: dict[str, Any] = {"warm_pool_size": 0, "gateway_idle_timeout_s": 3.0,
                                    "gateway_start_timeout_s": 30.0, "gateway_max_processes": 4}
NOISY_SCRIPT = ("const u = new URL(process.argv[1]); console.error('cannot connect to ' + process.argv[1] + "
                "' as ' + u.username + ' pw ' + u.password + ' enc ' + encodeURIComponent(process.argv[1])); "
                "process.exit(3)")


def catalog_json(server_postgres_js: str) -> str:
    """The operator's catalog of these tests: the design's npm server (pinned, installed ahead), with
    ${GLOBAL_DB_URL}; variants with an env, a secret param, and a server that fails noisily."""
    node = shutil.which("node") or "/usr/bin/node"
    modules = str(Path(server_postgres_js).parents[3])
    pg = {"description": "@modelcontextprotocol/server-postgres 0.6.2", "command": node,
          "args": [server_postgres_js, "${GLOBAL_DB_URL}"], "read_only_paths": [modules]}
    return json.dumps({
        "postgres": pg,
        "postgres-env": {**pg, "env": {"EXTRA_SETTING": "on"}},
        "postgres-token": {**pg, "env": {"API_TOKEN": "${TOKEN}", "LABEL": "${LABEL}"},
                           "params": {"TOKEN": {"pattern": "tok-[a-z0-9]{8,64}", "secret": True},
                                      "LABEL": {"pattern": "[a-z]{1,20}", "description": "a label"}}},
        "noisy": {"command": node, "args": ["-e", NOISY_SCRIPT, "${GLOBAL_DB_URL}"]},
    })


def gateway_settings(settings: Settings, server_postgres_js: str, **more: Any) -> Settings:
    return settings.model_copy(update={**GATEWAY_SETTINGS, "gateway_catalog": catalog_json(server_postgres_js),
                                       **more})


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants, server_postgres_js: str) -> Iterator[str]:
    with live_server(gateway_settings(settings, server_postgres_js)) as url:
        yield url


@pytest.fixture(scope="module")
def log_lines() -> Iterator[list[str]]:
    """Every log line of the module (any logger), to be scanned for the resolved secrets."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    logging.getLogger().addHandler(handler)
    yield lines
    logging.getLogger().removeHandler(handler)


class Secrets:
    """The exact values the gateway resolves for an agent, and every variant that must never come out."""

    def __init__(self, runtime: Runtime, *workspaces: str) -> None:
        self.values: set[str] = set()
        for ws in workspaces:
            for database in ("global", "agent"):
                uri = runtime.service.uris.agent(ws, database)
                parts = urlsplit(uri)
                assert parts.password and parts.username
                without = uri.replace(f":{parts.password}@", "@", 1)
                self.values |= {uri, without, parts.password, quote(parts.password, safe=""), quote(uri, safe=""),
                                quote(without, safe=""), parts.username, without.replace("postgresql://", "postgres://")}

    def check(self, source: str, text: str) -> None:
        leakscan.record(source, text)
        for value in self.values:
            assert value not in text, f"{source}: a resolved secret ({value[:6]}…) reached the agent"
        assert "apg_" not in text, f"{source}: an internal name reached the agent"


def dump(obj: Any) -> str:
    return obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj, default=str)


def put_config(base_url: str, token: str, user: str, name: str, body: dict[str, Any]) -> httpx.Response:
    response = httpx.put(f"{base_url}/api/users/{user}/mcp-servers/{name}", json=body,
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    leakscan.record(f"PUT mcp-servers/{name}", response.text)
    return response


def role_of(runtime: Runtime, workspace: str) -> str:
    return urlsplit(runtime.service.uris.agent(workspace, "global")).username or "?"


def pg_config(_entry: str = "") -> dict[str, Any]:
    return {"server": "postgres", "params": {}}


def children_pids(marker: str = "server-postgres") -> list[int]:
    """Live processes this test process spawned (the in-process gateway's children) whose command line
    holds ``marker`` (a workspace's role name: server-postgres takes the URI as an argument)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == os.getpid() and marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


async def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return bool(predicate())


# -- configs (REST) ----------------------------------------------------------------------------------------


async def test_configs_validate_against_the_catalog(base_url: str, tenants: Tenants) -> None:
    u1, t1 = tenants.user1, tenants.user1_token
    listed = httpx.get(f"{base_url}/api/users/{u1}/mcp-servers", headers={"Authorization": f"Bearer {t1}"}).json()
    assert {i["name"]: i["kind"] for i in listed["items"]} == {"postgres-agent": "builtin",
                                                               "postgres-global": "builtin"}
    # The old command form is gone (the attacks are in test_attack_gateway.py).
    bad = put_config(base_url, t1, u1, "evil", {"command": "node", "args": ["-e", "1"]})
    assert bad.status_code == 422
    bad = put_config(base_url, t1, u1, "pg", {"server": "nope"})
    assert bad.status_code == 422 and "postgres, postgres-env, postgres-token" in bad.json()["detail"]
    bad = put_config(base_url, t1, u1, "pg", {"server": "postgres", "params": {"X": "1"}})
    assert bad.status_code == 422 and "its params: none" in bad.json()["detail"]
    bad = put_config(base_url, t1, u1, "pg", {"server": "postgres-token", "params": {"LABEL": "ok"}})
    assert bad.status_code == 422 and "needs params TOKEN" in bad.json()["detail"]
    bad = put_config(base_url, t1, u1, "pg", {"server": "postgres-token",
                                              "params": {"LABEL": "ok", "TOKEN": "not-a-token"}})
    assert bad.status_code == 422 and "not-a-token" not in bad.text  # a secret param is never echoed
    made = put_config(base_url, t1, u1, "other", {"server": "postgres-token",
                                                  "params": {"TOKEN": "tok-s3cr3tvalue", "LABEL": "shown"}})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["kind"] == "catalog" and body["server"] == "postgres-token"
    assert body["params"] == {"TOKEN": "<hidden>", "LABEL": "shown"}
    assert "tok-s3cr3tvalue" not in made.text
    assert put_config(base_url, t1, u1, "other", pg_config()).status_code == 200
    # Another user's token sees none of it.
    other = httpx.get(f"{base_url}/api/users/{u1}/mcp-servers",
                      headers={"Authorization": f"Bearer {tenants.user2_token}"})
    assert other.status_code == 404
    gone = httpx.delete(f"{base_url}/api/users/{u1}/mcp-servers/other", headers={"Authorization": f"Bearer {t1}"})
    assert gone.status_code == 204
    assert httpx.delete(f"{base_url}/api/users/{u1}/mcp-servers/postgres-global",
                        headers={"Authorization": f"Bearer {t1}"}).status_code == 409
    leakscan.record("GET mcp-servers", json.dumps(listed))


# -- the built-in default, then the npm server over HTTP ------------------------------------------------------


async def test_builtin_default_then_server_postgres_over_http(runtime: Runtime, base_url: str, tenants: Tenants,
                                                              server_postgres_js: str) -> None:
    secrets = Secrets(runtime, tenants.ws_a, tenants.ws_b, tenants.ws_c)
    # The default postgres-global is agentpg's own MCP server, in-process.
    async with gateway_session(base_url, tenants.token_a, "postgres-global") as s:
        assert "execute" in {t.name for t in (await s.list_tools()).tools}
        made = await s.call_tool("execute", {"database": "global",
                                             "sql": "CREATE TABLE gw_items (id int PRIMARY KEY, label text)"})
        assert not made.is_error, text(made)
        await s.call_tool("execute", {"database": "global",
                                      "sql": "INSERT INTO gw_items VALUES (1, 'one'), (2, 'two')"})
    assert not children_pids(), "the built-in default must not spawn a process"

    assert put_config(base_url, tenants.user1_token, tenants.user1, "postgres-global",
                      pg_config(server_postgres_js)).status_code == 201
    async with gateway_session(base_url, tenants.token_a, "postgres-global") as s:
        tools = await s.list_tools()
        secrets.check("tools/list", dump(tools))
        assert [t.name for t in tools.tools] == ["query"]
        result = await s.call_tool("query", {"sql": "SELECT id, label FROM gw_items ORDER BY id"})
        secrets.check("tools/call query", dump(result))
        assert not result.is_error and json.loads(text(result)) == [{"id": 1, "label": "one"},
                                                                    {"id": 2, "label": "two"}]
        resources = await s.list_resources()
        secrets.check("resources/list", dump(resources))
        uris = [str(r.uri) for r in resources.resources]
        assert "agentpg://global/gw_items/schema" in uris, uris
        read = await s.read_resource("agentpg://global/gw_items/schema")
        secrets.check("resources/read", dump(read))
        columns = json.loads(read.contents[0].text)  # type: ignore[union-attr]
        assert {"column_name": "label", "data_type": "text"} in columns
        assert str(read.contents[0].uri) == "agentpg://global/gw_items/schema"
        # Errors from the child are relayed, scrubbed.
        failed = await s.call_tool("query", {"sql": "SELECT * FROM no_such_table"})
        secrets.check("tools/call error", dump(failed))
        assert failed.is_error and "does not exist" in text(failed)
        written = await s.call_tool("query", {"sql": "INSERT INTO gw_items VALUES (3, 'x')"})
        secrets.check("tools/call read-only", dump(written))
        assert written.is_error
        assert (await s.list_prompts()).prompts == []
        # One process per (workspace, server), reused across sessions.
        pids = children_pids(role_of(runtime, tenants.ws_a))
        assert len(pids) == 1
    async with gateway_session(base_url, tenants.token_a, "postgres-global") as s:
        await s.call_tool("query", {"sql": "SELECT 1"})
    assert children_pids(role_of(runtime, tenants.ws_a)) == pids


async def test_agent_permissions_hold_through_the_gateway(runtime: Runtime, base_url: str, tenants: Tenants,
                                                          server_postgres_js: str) -> None:
    """${GLOBAL_DB_URL} is the calling agent's own role: restricting agent b's reads restricts the gateway."""
    assert put_config(base_url, tenants.user1_token, tenants.user1, "pg-perm",
                      pg_config(server_postgres_js)).status_code == 201
    runtime.service.set_agent_permissions(tenants.ws_b, runtime.service.get_agent_permissions(tenants.ws_b)
                                          .model_copy(update={"can_read": False, "can_write": False}))
    try:
        async with gateway_session(base_url, tenants.token_b, "pg-perm") as s:
            await s.call_tool("query", {"sql": "SELECT 1"})
            denied = await s.call_tool("query", {"sql": "SELECT * FROM gw_items"})
            assert denied.is_error and "permission denied" in text(denied), text(denied)
    finally:
        runtime.service.set_agent_permissions(tenants.ws_b, runtime.service.get_agent_permissions(tenants.ws_b)
                                              .model_copy(update={"can_read": True, "can_write": True}))


async def test_two_users_same_name_reach_their_own_databases(runtime: Runtime, base_url: str, tenants: Tenants,
                                                             server_postgres_js: str) -> None:
    secrets = Secrets(runtime, tenants.ws_a, tenants.ws_c)
    assert put_config(base_url, tenants.user2_token, tenants.user2, "postgres-global",
                      pg_config(server_postgres_js)).status_code in (200, 201)
    async with gateway_session(base_url, tenants.token_c, "postgres-global") as s:
        result = await s.call_tool("query", {"sql": "SELECT * FROM gw_items"})
        secrets.check("user2 query", dump(result))
        assert result.is_error and "does not exist" in text(result)
        assert [str(r.uri) for r in (await s.list_resources()).resources] == []
    # user 1's own-name config is not reachable by user 2's agent: 404, like a missing one.
    assert put_config(base_url, tenants.user1_token, tenants.user1, "only-u1",
                      pg_config(server_postgres_js)).status_code in (200, 201)
    for name in ("only-u1", "nowhere"):
        response = httpx.post(f"{base_url}/mcp/servers/{name}", json=INIT, timeout=10,
                              headers={**MCP_HEADERS, "Authorization": f"Bearer {tenants.token_c}"})
        leakscan.record("POST other user's gateway", response.text)
        assert response.status_code == 404, response.text
    for token, status in ((None, 401), (tenants.user1_token, 403), (tenants.admin_token, 403)):
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        assert httpx.post(f"{base_url}/mcp/servers/only-u1", json=INIT, headers={**MCP_HEADERS, **auth},
                          timeout=10).status_code == status
    # Stateless: no session is opened (so none can be hoarded: another user's agent opening many first leaves
    # this agent's requests answered), and a request without initialize, whatever session id it names, is
    # answered by its token and path alone.
    for _ in range(20):
        opened = httpx.post(f"{base_url}/mcp/servers/postgres-global", json=INIT, timeout=30,
                            headers={**MCP_HEADERS, "Authorization": f"Bearer {tenants.token_c}"})
        assert opened.status_code == 200 and "mcp-session-id" not in opened.headers, opened.headers
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    listed = httpx.post(f"{base_url}/mcp/servers/postgres-agent", json=listing, timeout=30,  # in-process
                        headers={**MCP_HEADERS, "Authorization": f"Bearer {tenants.token_a}",
                                 "Mcp-Session-Id": "made-up", "Mcp-Protocol-Version": "2025-06-18"})
    assert listed.status_code == 200 and "query" in listed.text, listed.text


async def test_crash_restart_and_idle_stop(runtime: Runtime, base_url: str, tenants: Tenants,
                                           server_postgres_js: str) -> None:
    secrets = Secrets(runtime, tenants.ws_a)
    role = role_of(runtime, tenants.ws_a)
    assert put_config(base_url, tenants.user1_token, tenants.user1, "postgres-global",
                      pg_config(server_postgres_js)).status_code in (200, 201)
    async with gateway_session(base_url, tenants.token_a, "postgres-global") as s:
        assert not (await s.call_tool("query", {"sql": "SELECT 1"})).is_error
        [pid] = children_pids(role)
        os.kill(pid, signal.SIGKILL)  # dies between calls
        assert await wait_for(lambda: pid not in children_pids(role))
        again = await s.call_tool("query", {"sql": "SELECT 2 AS two"})
        secrets.check("after crash", dump(again))
        assert not again.is_error, text(again)
        [pid2] = children_pids(role)
        assert pid2 != pid
        # Dies mid-call: a clear tool error, the gateway stays up, the next call works.
        call = asyncio.create_task(s.call_tool("query", {"sql": "SELECT pg_sleep(5)"}))
        await asyncio.sleep(1.0)
        os.kill(pid2, signal.SIGKILL)
        crashed = await asyncio.wait_for(call, 20)
        secrets.check("crash mid-call", dump(crashed))
        assert crashed.is_error and "stopped during the call" in text(crashed), text(crashed)
        assert not (await s.call_tool("query", {"sql": "SELECT 3"})).is_error
        # Idle: stopped after gateway_idle_timeout_s (3 s) without calls; the next call starts it again.
        assert children_pids(role)
        assert await wait_for(lambda: not children_pids(role), timeout=10), "the idle child was not stopped"
        assert not (await s.call_tool("query", {"sql": "SELECT 4"})).is_error
        assert len(children_pids(role)) == 1


async def test_concurrency_bound_is_a_clear_error(runtime: Runtime, settings: Settings, tenants: Tenants,
                                                  server_postgres_js: str) -> None:
    bounded = gateway_settings(settings, server_postgres_js, gateway_max_processes=1)
    with live_server(bounded) as url:
        assert put_config(url, tenants.user1_token, tenants.user1, "postgres-global",
                          pg_config(server_postgres_js)).status_code in (200, 201)
        async with gateway_session(url, tenants.token_a, "postgres-global") as a, \
                gateway_session(url, tenants.token_b, "postgres-global") as b:
            slow = asyncio.create_task(a.call_tool("query", {"sql": "SELECT pg_sleep(2)"}))
            await asyncio.sleep(1.0)
            busy = await b.call_tool("query", {"sql": "SELECT 1"})
            leakscan.record("busy", dump(busy))
            assert busy.is_error and "maximum of 1" in text(busy), text(busy)
            assert not (await slow).is_error
            # Once a's child is idle, b's call may replace it.
            assert not (await b.call_tool("query", {"sql": "SELECT 1"})).is_error


# -- stdio: agentpg mcp --server NAME ------------------------------------------------------------------------


async def test_stdio_gateway(runtime: Runtime, agentpg_home: Path, base_url: str, tenants: Tenants,
                             server_postgres_js: str, tmp_path: Path) -> None:
    secrets = Secrets(runtime, tenants.ws_a)
    assert put_config(base_url, tenants.user1_token, tenants.user1, "postgres-global",
                      pg_config(server_postgres_js)).status_code in (200, 201)
    exe = Path(sys.executable).with_name("agentpg")
    params = StdioServerParameters(command=str(exe), args=["mcp", "--server", "postgres-global"],
                                   env={"AGENTPG_HOME": str(agentpg_home), "AGENTPG_AGENT_TOKEN": tenants.token_a,
                                        "AGENTPG_WARM_POOL_SIZE": "0", "AGENTPG_USAGE_SYNC_INTERVAL_S": "0",
                                        "AGENTPG_GATEWAY_CATALOG": catalog_json(server_postgres_js)})
    errlog = (tmp_path / "stderr.log").open("w")
    try:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            tools = await s.list_tools()
            secrets.check("stdio tools/list", dump(tools))
            result = await s.call_tool("query", {"sql": "SELECT label FROM gw_items WHERE id = 2"})
            secrets.check("stdio query", dump(result))
            assert json.loads(text(result)) == [{"label": "two"}]
            resources = await s.list_resources()
            secrets.check("stdio resources/list", dump(resources))
            assert "agentpg://global/gw_items/schema" in [str(r.uri) for r in resources.resources]
            failed = await s.call_tool("query", {"sql": "SELEC"})
            secrets.check("stdio error", dump(failed))
            assert failed.is_error
    finally:
        errlog.close()
    secrets.check("stdio stderr", (tmp_path / "stderr.log").read_text())
    bad = subprocess.run([str(exe), "mcp", "--server", "nowhere"], capture_output=True, text=True, timeout=60,
                         env={**params.env, "PATH": os.environ["PATH"]} if params.env else None, check=False)
    leakscan.record("stdio unknown server", bad.stderr)
    assert bad.returncode == 1 and "not configured" in bad.stderr


# -- scrubbing: stderr, a server that fails to start, the child's environment -----------------------------


async def test_stderr_and_start_failure_are_scrubbed(runtime: Runtime, base_url: str, tenants: Tenants,
                                                     log_lines: list[str]) -> None:
    secrets = Secrets(runtime, tenants.ws_a)
    assert put_config(base_url, tenants.user1_token, tenants.user1, "noisy",
                      {"server": "noisy"}).status_code in (200, 201)
    async with gateway_session(base_url, tenants.token_a, "noisy") as s:
        failed = await s.call_tool("anything", {})
        secrets.check("failed start", dump(failed))
        message = text(failed)
        assert failed.is_error and "did not start" in message and "[redacted]" in message, message
        assert "agentpg://global" in message  # the URI, rewritten
        again = await s.call_tool("anything", {})  # the gateway stays up and says the same
        assert again.is_error and "did not start" in text(again)
    stderr_logged = [line for line in log_lines if "noisy" in line and "stderr" in line]
    assert stderr_logged, "the child's stderr was not logged"
    for line in log_lines:
        secrets.check("log line", line)


async def test_child_environment_is_minimal(runtime: Runtime, base_url: str, tenants: Tenants,
                                            server_postgres_js: str) -> None:
    assert any(k.startswith("AGENTPG_") for k in os.environ)  # conftest sets some: they must not pass
    assert put_config(base_url, tenants.user1_token, tenants.user1, "pg-env",
                      {"server": "postgres-env"}).status_code in (200, 201)
    role = role_of(runtime, tenants.ws_b)
    async with gateway_session(base_url, tenants.token_b, "pg-env") as s:
        assert not (await s.call_tool("query", {"sql": "SELECT 1"})).is_error
        pids = [p for p in children_pids(role)
                if b"EXTRA_SETTING" in Path(f"/proc/{p}/environ").read_bytes()]
        assert len(pids) == 1
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pids[0]}/environ").read_bytes().decode().split("\0") if "=" in item)
    assert environ["EXTRA_SETTING"] == "on"
    assert set(environ) <= {"PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "EXTRA_SETTING"}, sorted(environ)


async def test_secret_param_reaches_the_child_and_is_scrubbed(runtime: Runtime, base_url: str,
                                                              tenants: Tenants) -> None:
    token = "tok-" + "q7" * 12
    assert put_config(base_url, tenants.user1_token, tenants.user1, "pg-token",
                      {"server": "postgres-token", "params": {"TOKEN": token, "LABEL": "abc"}}).status_code == 201
    role = role_of(runtime, tenants.ws_a)
    async with gateway_session(base_url, tenants.token_a, "pg-token") as s:
        echoed = await s.call_tool("query", {"sql": f"SELECT '{token}' AS t"})
        assert not echoed.is_error and token not in dump(echoed) and "[redacted]" in text(echoed)
        [pid] = [p for p in children_pids(role) if token.encode() in Path(f"/proc/{p}/environ").read_bytes()]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"API_TOKEN={token}".encode() in environ and b"LABEL=abc" in environ


def test_scrubber_variants_and_uri_mapping() -> None:
    from agentpg.gateway.scrub import Scrubber

    uri = "postgresql://apg_role_x:p%40ss%2Fw0rd-xyz@127.0.0.1:5433/apg_db_y"
    scrub = Scrubber({"GLOBAL_DB_URL": uri, "MY_TOKEN": "tok-secret-value"})
    samples = [uri, uri.replace(":p%40ss%2Fw0rd-xyz@", "@"), "p%40ss%2Fw0rd-xyz", "p@ss/w0rd-xyz",
               quote(uri, safe=""), "apg_role_x", "apg_db_y", "tok-secret-value", quote("tok-secret-value", safe="")]
    for sample in samples:
        out = scrub.text(f"before {sample} after")
        assert sample not in out and "apg_" not in out and "w0rd" not in out, (sample, out)
    resource = scrub.text("postgres://apg_role_x@127.0.0.1:5433/customers/schema")
    assert resource == "agentpg://global/customers/schema"
    assert scrub.unmap(resource) == "postgres://apg_role_x@127.0.0.1:5433/customers/schema"
    assert scrub.obj({"k postgres://apg_role_x@127.0.0.1:5433/": ["x apg_db_y"]}) == {
        "k agentpg://global/": ["x [redacted]"]}
