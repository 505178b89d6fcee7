"""The first hour (issue 21): what a new user pastes and runs works as given.

Everything runs for real: ``agentpg serve`` and ``agentpg mcp`` as child processes of the console script,
in a fresh AGENTPG_HOME agentpg creates itself; the README's quickstart block as written, in bash; the
official MCP SDK client over stdio and streamable HTTP, with the configurations agentpg and the README give.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import leakscan
import pytest
from api_support import free_port
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from agentpg.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
AGENTPG = str(Path(sys.executable).with_name("agentpg"))


def _base_env(**extra: str) -> dict[str, str]:
    """This process's environment without any AGENTPG_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update(extra)
    return env


def _fresh_home_path() -> Path:
    """A home path that does not exist yet, under /tmp (which the server user can traverse)."""
    return Path(tempfile.gettempdir()) / f"agentpg-first-hour-{uuid.uuid4().hex[:10]}"


@dataclass
class Fresh:
    """``agentpg serve`` on a free port, in a home it created itself."""

    home: Path
    url: str
    admin: str
    process: subprocess.Popen[bytes]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fresh]:
    home = _fresh_home_path()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("first-hour") / "serve.log"
    env = _base_env(AGENTPG_HOME=str(home), AGENTPG_PUBLIC_URL=url, AGENTPG_EMBEDDED_FSYNC="false",
                    AGENTPG_WARM_POOL_SIZE="0", AGENTPG_USAGE_SYNC_INTERVAL_S="0")
    with log_path.open("wb") as log:
        process = subprocess.Popen([AGENTPG, "serve", "--host", "127.0.0.1", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "agentpg serve did not become ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        admin = (home / "admin-token").read_text().strip()
        yield Fresh(home=home, url=url, admin=admin, process=process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        leakscan.record("first-hour serve log", log_path.read_text(errors="replace"))
        EmbeddedPostgres(home).stop()
        shutil.rmtree(home, ignore_errors=True)


def _mcp(home: Path | None, token: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    """``agentpg mcp`` as an MCP client would start it, with stdin closed at once."""
    env = _base_env(**extra)
    if home is not None:
        env["AGENTPG_HOME"] = str(home)
    if token is not None:
        env["AGENTPG_AGENT_TOKEN"] = token
    result = subprocess.run([AGENTPG, "mcp"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    leakscan.record("first-hour agentpg mcp stderr", result.stderr)
    return result


def _user_with_agents(fresh: Fresh, n: int = 2) -> tuple[str, list[dict[str, Any]]]:
    """A new user of the fresh serve and ``n`` workspaces: their creation answers."""
    user = f"u-{uuid.uuid4().hex[:8]}"
    assert httpx.post(f"{fresh.url}/api/users", json={"id": user}, headers=fresh.headers(),
                      timeout=60).status_code == 201
    created = []
    for i in range(n):
        response = httpx.post(f"{fresh.url}/api/users/{user}/workspaces", json={"id": f"{user}-w{i}"},
                              headers=fresh.headers(), timeout=60)
        assert response.status_code == 201, response.text
        created.append(response.json())
    return user, created


@asynccontextmanager
async def _stdio(server: dict[str, Any]) -> AsyncIterator[ClientSession]:
    """An SDK session with the stdio server of a pasted ``mcpServers`` entry, exactly as configured."""
    params = StdioServerParameters(command=server["command"], args=server["args"], env=server["env"])
    with open(os.devnull, "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


@asynccontextmanager
async def _http(server: dict[str, Any]) -> AsyncIterator[ClientSession]:
    """An SDK session with the HTTP server of a pasted ``mcpServers`` entry, exactly as configured."""
    async with httpx2.AsyncClient(headers=server["headers"], timeout=60) as client, \
            streamable_http_client(server["url"], http_client=client) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        yield session


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def _fill(document: Any, replacements: dict[str, str]) -> Any:
    """``document`` (JSON) with each placeholder string replaced."""
    text = json.dumps(document)
    for old, new in replacements.items():
        text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    return json.loads(text)


def _readme_block(heading: str, language: str, index: int = 0) -> str:
    """The ``index``-th fenced ``language`` block of the README section that starts with ``heading``."""
    text = README.read_text()
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)
    return str(blocks[index])


# -- 1. the README's quickstart, as written ------------------------------------------------------------


def test_readme_quickstart_runs_as_written(fresh: Fresh, tmp_path: Path) -> None:
    """The quickstart block, run by bash as written, reaches "agents created tables" with a real agent.

    Only what the README itself names is adapted: AGENTPG_HOME and AGENTPG_PUBLIC_URL (the fresh serve's),
    and the directory it runs in holds the repository's .venv and examples/ (it writes customers.csv)."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("the quickstart runs the repository's .venv; this run uses another environment")
    block = _readme_block("## Quickstart", "sh")
    assert "agentpg serve" not in block.split("\n", 1)[0]  # it uses the serve the set-up command started
    for name in (".venv", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = _base_env(AGENTPG_HOME=str(fresh.home), AGENTPG_PUBLIC_URL=fresh.url)
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if not p.startswith(str(ROOT)))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    leakscan.record("quickstart stdout", done.stdout)
    leakscan.record("quickstart stderr", done.stderr)
    out = done.stdout
    assert done.returncode == 0, (out[-3000:], done.stderr[-3000:])
    assert '"id":"alice"' in out.replace(" ", "")
    assert '"stdio"' in out and "<AGENT_TOKEN>" in out  # mcp-config: both forms, the token a placeholder
    assert "agent B reads A's customers" in out and "Linus" in out and "scratch is not there" in out
    assert re.search(r'"name":\s*"customers"', out)  # the tables route lists what agent A created
    assert out.index('"Linus"') < out.rindex('"Ada"')  # rows ordered by name, descending
    csv_rows = (tmp_path / "customers.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0] == '"id","name","plan"'
    # Usage right after registration: the global database's storage is measured, not null until a sync.
    assert re.search(r'"storage_bytes":\s*[1-9]\d*', out), out
    assert '"budget_cents":500' in out.replace(" ", "")
    assert httpx.get(f"{fresh.url}/api/users/alice", headers=fresh.headers(), timeout=30).status_code == 404


def _readme_cli_commands() -> list[str]:
    """The README's command-line block as single commands: ``a | b`` alternatives and ``[--opt]`` expanded."""
    commands: list[str] = []
    for line in _readme_block("## Command line", "bash").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split(" | ")
        prefix = " ".join(words[0].split()[:2])
        for i, alternative in enumerate(words):
            command = alternative if i == 0 else f"{prefix} {alternative}"
            optional = re.search(r" \[(--[a-z-]+)\]", command)
            if optional:
                commands += [command.replace(optional.group(0), ""), command.replace(optional.group(0),
                                                                                     f" {optional.group(1)}")]
            else:
                commands.append(command)
    return commands


def test_readme_command_line_runs_as_written(fresh: Fresh, tmp_path: Path) -> None:
    """Each command of the README's command-line block, run by bash against the fresh home (alternatives
    expanded; the deletion last so the commands naming alice find her). Not run here: ``keys rotate`` (it
    re-seals the running serve's secrets: tests/test_keys.py) and ``mcp`` (the tests above)."""
    commands = _readme_cli_commands()
    assert "agentpg usage show alice" in commands and "agentpg reconcile --fix" in commands
    skipped = {"agentpg keys rotate", "agentpg mcp"}
    last = [c for c in commands if c.startswith("agentpg users delete")]
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = _base_env(AGENTPG_HOME=str(fresh.home))
    outputs = {}
    for command in [c for c in commands if c not in skipped and c not in last] + last:
        done = subprocess.run(["bash", "-c", f'export PATH="$PWD/.venv/bin:$PATH"; {command}'], cwd=tmp_path,
                              capture_output=True, text=True, env=env, timeout=300, check=False)
        leakscan.record(f"readme cli {command}", done.stdout + done.stderr)
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        outputs[command] = done.stdout
    assert "user alice registered" in outputs["agentpg users create alice --email alice@example.com"]
    assert "research-agent" in outputs["agentpg workspaces list alice"]
    assert outputs["agentpg home"].strip() == str(fresh.home)
    assert "deleted" in outputs["agentpg users delete alice"]


# -- 2. every MCP client config agentpg prints (and the README shows) works when pasted ---------------------


@pytest.mark.anyio
async def test_mcp_config_forms_work_when_pasted(fresh: Fresh) -> None:
    _, (first, second) = _user_with_agents(fresh)
    token_b = second["agent_token"]["token"]
    # Creating a workspace: both forms with its token filled in, usable as they are.
    filled = first["mcp_config"]
    server = filled["stdio"]["mcpServers"]["agentpg"]
    assert Path(server["command"]).is_absolute() and server["args"] == ["mcp"]
    assert server["env"]["AGENTPG_HOME"] == str(fresh.home)
    async with _stdio(server) as a:
        result = await a.call_tool("execute", {"database": "global", "sql": "CREATE TABLE pasted (id int)"})
        assert not result.is_error, _text(result)
    async with _http(filled["http"]["mcpServers"]["agentpg"]) as a:
        assert {t.name for t in (await a.list_tools()).tools} >= {"query", "execute", "describe_table"}
    # GET …/mcp-config: the same with a placeholder; the token pasted in, each form works.
    response = httpx.get(f"{fresh.url}/api/workspaces/{second['id']}/mcp-config", headers=fresh.headers(),
                         timeout=30)
    assert response.status_code == 200
    config = response.json()
    assert "apg_g_" not in response.text and "<AGENT_TOKEN>" in config["notes"]["token"]
    assert config["mcpServers"] == config["http"]["mcpServers"]
    assert config["http"]["mcpServers"]["agentpg"]["url"] == f"{fresh.url}/mcp"
    pasted = _fill(config, {"<AGENT_TOKEN>": token_b})
    async with _stdio(pasted["stdio"]["mcpServers"]["agentpg"]) as b:
        result = await b.call_tool("query", {"database": "global", "sql": "SELECT count(*) FROM pasted"})
        assert not result.is_error, _text(result)
    async with _http(pasted["http"]["mcpServers"]["agentpg"]) as b:
        result = await b.call_tool("list_tables", {"database": "global"})
        assert "pasted" in _text(result)


@pytest.mark.anyio
async def test_readme_desktop_client_configs_work(fresh: Fresh) -> None:
    """The README's Cursor (HTTP) and Claude Desktop (stdio) configs, with only the install path, the home,
    the URL and the token put in."""
    _, (created,) = _user_with_agents(fresh, 1)
    token = created["agent_token"]["token"]
    section = "## Agents: MCP"
    cursor = json.loads(_readme_block(section, "json", 0))
    claude = json.loads(_readme_block(section, "json", 1))
    cursor = _fill(cursor, {"http://127.0.0.1:8080": fresh.url, "<AGENT_TOKEN>": token})
    claude = _fill(claude, {"/srv/agentpg/.venv/bin/agentpg": AGENTPG, "/var/lib/agentpg": str(fresh.home),
                            "<AGENT_TOKEN>": token})
    async with _http(cursor["mcpServers"]["agentpg"]) as session:
        result = await session.call_tool("list_databases", {})
        assert not result.is_error, _text(result)
    async with _stdio(claude["mcpServers"]["agentpg"]) as session:
        result = await session.call_tool("list_databases", {})
        assert not result.is_error, _text(result)


# -- 3. agentpg mcp attaches only, and says exactly what is wrong -----------------------------------------


def test_agentpg_mcp_never_makes_a_home(fresh: Fresh) -> None:
    missing = _fresh_home_path()
    result = _mcp(missing, "apg_g_whatever")
    assert result.returncode != 0 and result.stdout == ""
    assert f"no agentpg home at {missing}" in result.stderr and "AGENTPG_HOME" in result.stderr, result.stderr
    assert not missing.exists()  # nothing was created
    default = Path("/var/lib/agentpg") if os.geteuid() == 0 else None
    if default is not None and not default.exists():  # AGENTPG_HOME unset: the default home, named as such
        result = _mcp(None, "apg_g_whatever")
        assert result.returncode != 0 and str(default) in result.stderr
        assert "AGENTPG_HOME is unset" in result.stderr, result.stderr
        assert not default.exists()


def test_agentpg_mcp_names_an_unknown_token_and_its_home(fresh: Fresh) -> None:
    result = _mcp(fresh.home, "apg_g_" + "x" * 40)
    assert result.returncode == 1 and result.stdout == ""
    assert f"unknown to the agentpg whose home is {fresh.home}" in result.stderr, result.stderr


def test_agentpg_mcp_never_starts_a_server() -> None:
    home = _fresh_home_path()
    env = _base_env(AGENTPG_HOME=str(home), AGENTPG_EMBEDDED_FSYNC="false", AGENTPG_WARM_POOL_SIZE="0")
    try:
        started = subprocess.run([AGENTPG, "postgres", "start"], capture_output=True, text=True, env=env,
                                 timeout=180, check=False)
        assert started.returncode == 0, started.stderr
        stopped = subprocess.run([AGENTPG, "postgres", "stop"], capture_output=True, text=True, env=env,
                                 timeout=120, check=False)
        assert stopped.returncode == 0, stopped.stderr
        result = _mcp(home, "apg_g_whatever")
        assert result.returncode == 3 and result.stdout == ""
        assert f"no PostgreSQL server runs for the agentpg home {home}" in result.stderr, result.stderr
        assert "agentpg serve" in result.stderr
        assert not EmbeddedPostgres(home).is_running()
    finally:
        EmbeddedPostgres(home).stop()
        shutil.rmtree(home, ignore_errors=True)


def test_agentpg_home_prints_without_creating(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    done = subprocess.run([AGENTPG, "home"], capture_output=True, text=True, timeout=60, check=False,
                          env=_base_env(AGENTPG_HOME=str(missing)))
    assert done.returncode == 0 and done.stdout.strip() == str(missing) and not missing.exists()


# -- 4. the home's permissions -----------------------------------------------------------------------------


def test_a_home_agentpg_creates_is_reachable(fresh: Fresh) -> None:
    expected = 0o711 if os.geteuid() == 0 else 0o700
    assert stat.S_IMODE(fresh.home.stat().st_mode) == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_a_tight_existing_home_is_not_loosened() -> None:
    home = Path(tempfile.mkdtemp(prefix="agentpg-tight-", dir="/tmp"))  # 0700, like a folder of the operator
    try:
        done = subprocess.run([AGENTPG, "postgres", "start"], capture_output=True, text=True, timeout=120,
                              check=False, env=_base_env(AGENTPG_HOME=str(home), AGENTPG_EMBEDDED_FSYNC="false"))
        assert done.returncode == 3, done.stderr
        assert f"chmod o+x {home}" in done.stderr and "0700" in done.stderr, done.stderr
        assert stat.S_IMODE(home.stat().st_mode) == 0o700  # unchanged
        assert not (home / "postgres").exists()
    finally:
        shutil.rmtree(home, ignore_errors=True)


# -- 5. the small defects ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_describe_table_names_indexes(fresh: Fresh) -> None:
    _, (created,) = _user_with_agents(fresh, 1)
    server = created["mcp_config"]["http"]["mcpServers"]["agentpg"]
    async with _http(server) as session:
        sql = "CREATE TABLE customers (id int PRIMARY KEY, email text UNIQUE, name text)"
        assert not (await session.call_tool("execute", {"database": "agent", "sql": sql})).is_error
        await session.call_tool("execute", {"database": "agent", "sql": "CREATE INDEX by_name ON customers (name)"})
        described = _text(await session.call_tool("describe_table", {"database": "agent", "table": "customers"}))
    assert "index by_name:" in described and "indexe" not in described, described


def test_a_body_without_json_content_type_is_told_so(fresh: Fresh) -> None:
    body = json.dumps({"id": f"u-{uuid.uuid4().hex[:8]}"})
    form = httpx.post(f"{fresh.url}/api/users", content=body, timeout=30,  # what curl -d sends by default
                      headers={**fresh.headers(), "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415, form.text
    detail = form.json()["detail"]
    assert "Content-Type: application/json" in detail and "application/x-www-form-urlencoded" in detail
    assert "dictionary" not in detail


def test_a_too_long_id_is_counted_in_characters(fresh: Fresh) -> None:
    response = httpx.post(f"{fresh.url}/api/users", json={"id": "x" * 200}, headers=fresh.headers(), timeout=30)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "at most 128 characters, not 200" in detail and "items" not in detail, detail


@pytest.mark.anyio
async def test_allowed_tables_that_do_not_exist_are_accepted_with_a_warning(fresh: Fresh) -> None:
    _, (created,) = _user_with_agents(fresh, 1)
    url = f"{fresh.url}/api/workspaces/{created['id']}/global-database-permissions"
    response = httpx.put(url, json={"can_create_tables": True, "allowed_tables": ["nope", "orders"]},
                         headers=fresh.headers(), timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["missing_tables"] == ["nope", "orders"] and "nope, orders" in body["warning"]
    assert body["allowed_tables"] == ["nope", "orders"]
    # Matched by name: the agent may create one of them, and then it is no longer missing.
    async with _http(created["mcp_config"]["http"]["mcpServers"]["agentpg"]) as session:
        made = await session.call_tool("execute", {"database": "global", "sql": "CREATE TABLE orders (id int)"})
        assert not made.is_error, _text(made)
    again = httpx.put(url, json={"can_create_tables": True, "allowed_tables": ["nope", "orders"]},
                      headers=fresh.headers(), timeout=30).json()
    assert again["missing_tables"] == ["nope"]
    full = httpx.put(url, json={}, headers=fresh.headers(), timeout=30).json()
    assert full["missing_tables"] == [] and full.get("warning") is None


@pytest.mark.anyio
async def test_budget_zero_reads_plainly(fresh: Fresh) -> None:
    user, (created,) = _user_with_agents(fresh, 1)
    put = httpx.put(f"{fresh.url}/api/users/{user}/budget", json={"budget_cents": 0}, headers=fresh.headers(),
                    timeout=60)
    assert put.status_code == 200, put.text
    async with _http(created["mcp_config"]["http"]["mcpServers"]["agentpg"]) as session:
        result = await session.call_tool("execute", {"database": "agent", "sql": "CREATE TABLE t (id int)"})
    message = _text(result)
    assert result.is_error and "budget is 0 cents" in message and "cost 0 cents" not in message, message
    assert "reads still work" in message


def test_usage_is_measured_right_after_registration(fresh: Fresh) -> None:
    user, _ = _user_with_agents(fresh, 1)
    usage = httpx.get(f"{fresh.url}/api/users/{user}/usage", headers=fresh.headers(), timeout=60).json()
    assert usage["global_database"]["storage_bytes"] > 0 and usage["global_database"]["last_sync"] is not None
    (agent,) = usage["agent_databases"]
    assert agent["storage_bytes"] > 0
    assert usage["total_cost_cents"] == usage["global_database"]["cost_cents"] + agent["cost_cents"]
