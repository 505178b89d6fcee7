"""Issue 17, class 1: the gateway must never run a user's code on the host, and a server it does run
(an operator's catalog entry) must be sandboxed.

The test is the attacker. With a **user token** it tries to store configs that would run its own code
(inline ``python -c``/``node -e``, ``npx``/``uvx`` of a package, a path, shell metacharacters and
``${…}`` in params, loader/interpreter env names in any case): each must be refused at ``PUT`` (422), must
not be stored, and must never run. A config stored in the old command form (as earlier versions saved
it) must be refused at call time and never run.

Then it plays a **malicious catalog entry** (the operator allowed it, the test made it evil on purpose: a
small node MCP server whose tools run any shell command and read any file, inside the sandbox) and checks
outcomes: it cannot read ``$AGENTPG_HOME/admin-token``, ``secret.key``, the Postgres data directory,
the project's files or serve's ``/proc/<pid>/environ``; it does not see serve's processes (when
namespaces work); it runs as a non-root uid that is neither the Postgres server's nor another child's;
a fork bomb, a huge file, a huge allocation and a busy loop all end bounded; nothing of it survives its
stop. Every check runs in the best sandbox this host allows (``auto``) and in the fallback without
namespaces (``none``).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import leakscan
import pytest
from mcp import ClientSession
from mcp_support import INIT, MCP_HEADERS, Tenants, gateway_session, live_server, text
from sqlalchemy import delete
from test_gateway import ensure_bwrap, server_postgres_js  # noqa: F401  (the npm server fixture)

import agentpg
from agentpg.app.runtime import Runtime
from agentpg.catalog.models import McpServerConfig, new_id, utcnow
from agentpg.embedded import EmbeddedPostgres
from agentpg.gateway.sandbox import Limits, Sandbox, SandboxMode
from agentpg.service.gateway_catalog import CatalogError, load_catalog
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio

#: The attacker's MCP server (no dependencies): newline-delimited JSON-RPC on stdio, tools ``sh`` (run a
#: shell command) and ``read`` (a file, base64), ``id`` (its uid). It is the worst a catalog entry can be.
EVIL_JS = r"""
const { execFileSync } = require('child_process');
const fs = require('fs');
const rl = require('readline').createInterface({ input: process.stdin });
const send = (m) => process.stdout.write(JSON.stringify(m) + '\n');
const tool = (name) => ({ name, inputSchema: { type: 'object' } });
rl.on('line', (line) => {
  let m; try { m = JSON.parse(line); } catch (e) { return; }
  if (m.id === undefined) return;
  const reply = (result) => send({ jsonrpc: '2.0', id: m.id, result });
  if (m.method === 'initialize') return reply({ protocolVersion: m.params.protocolVersion,
    capabilities: { tools: {} }, serverInfo: { name: 'evil', version: '1' } });
  if (m.method === 'tools/list') return reply({ tools: [tool('sh'), tool('read')] });
  if (m.method === 'tools/call') {
    const a = m.params.arguments || {};
    let out;
    if (m.params.name === 'read') {
      try { out = 'OK ' + fs.readFileSync(a.path).toString('base64'); } catch (e) { out = 'ERR ' + e.code; }
    } else {
      try {
        out = 'OUT ' + execFileSync('/bin/sh', ['-c', a.cmd], { timeout: a.timeout || 30000, encoding: 'utf8',
                                                                 stdio: ['ignore', 'pipe', 'pipe'] });
      } catch (e) {
        out = 'FAIL status=' + e.status + ' signal=' + e.signal + ' ' + (e.stdout || '') + (e.stderr || e.code || '');
      }
    }
    return send({ jsonrpc: '2.0', id: m.id, result: { content: [{ type: 'text', text: String(out) }] } });
  }
  send({ jsonrpc: '2.0', id: m.id, error: { code: -32601, message: 'no such method' } });
});
"""

EVIL_LIMITS = {"processes": 40, "file_size_mb": 4, "memory_mb": 256, "cpu_s": 60}
LABEL_PATTERN = "[A-Za-z0-9_-]{1,32}"


@pytest.fixture(scope="module")
def evil_dir() -> Iterator[Path]:
    """Where the operator "installed" the evil server: world-readable, outside agentpg's home."""
    directory = Path(tempfile.mkdtemp(prefix="agentpg-attack-", dir="/tmp"))
    directory.chmod(0o755)
    script = directory / "evil.js"
    script.write_text(EVIL_JS)
    script.chmod(0o644)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def attack_catalog(evil_dir: Path, server_js: str) -> str:
    node = shutil.which("node") or "/usr/bin/node"
    evil = {"description": "made malicious on purpose by the test", "command": node,
            "args": [str(evil_dir / "evil.js"), "${GLOBAL_DB_URL}"], "read_only_paths": [str(evil_dir)],
            "limits": EVIL_LIMITS}
    return json.dumps({
        "evil": evil,
        "evil-cpu": {**evil, "limits": {**EVIL_LIMITS, "cpu_s": 3}},
        "echo": {**evil, "args": [str(evil_dir / "evil.js"), "${LABEL}"],
                 "params": {"LABEL": {"pattern": LABEL_PATTERN, "description": "a label"}}},
        "postgres": {"command": node, "args": [server_js, "${GLOBAL_DB_URL}"],
                     "read_only_paths": [str(Path(server_js).parents[3])]},
    })


@dataclass
class Attack:
    url: str
    mode: str
    sandbox: Sandbox
    settings: Settings


@pytest.fixture(scope="module", params=["auto", "none"])
def attack(request: pytest.FixtureRequest, settings: Settings, tenants: Tenants, evil_dir: Path,
           server_postgres_js: str) -> Iterator[Attack]:  # noqa: F811
    ensure_bwrap()
    mode = str(request.param)
    served = settings.model_copy(update={
        "warm_pool_size": 0, "gateway_idle_timeout_s": 2.0, "gateway_start_timeout_s": 30.0,
        "gateway_max_processes": 8, "gateway_sandbox": mode,
        "gateway_catalog": attack_catalog(evil_dir, server_postgres_js)})
    sandbox = Sandbox(home=served.home, requested=served.gateway_sandbox, uid_base=served.gateway_uid_base,
                      uid_count=served.gateway_uid_count, postgres_os_user=served.postgres_os_user)
    with live_server(served) as url:
        yield Attack(url=url, mode=mode, sandbox=sandbox, settings=served)


def put(url: str, token: str, user: str, name: str, body: Any) -> httpx.Response:
    response = httpx.put(f"{url}/api/users/{user}/mcp-servers/{name}", json=body,
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)
    leakscan.record(f"PUT mcp-servers/{name}", response.text)
    return response


def stored_names(url: str, token: str, user: str) -> set[str]:
    listed = httpx.get(f"{url}/api/users/{user}/mcp-servers", headers={"Authorization": f"Bearer {token}"},
                       timeout=30)
    assert listed.status_code == 200, listed.text
    return {item["name"] for item in listed.json()["items"]}


async def sh(s: ClientSession, cmd: str, timeout_ms: int = 30000) -> str:
    return text(await s.call_tool("sh", {"cmd": cmd, "timeout": timeout_ms}))


async def read(s: ClientSession, path: str) -> bytes | None:
    """The file's bytes as the sandboxed server could read them, or None when it could not."""
    out = text(await s.call_tool("read", {"path": path}))
    if out.startswith("OK "):
        return base64.b64decode(out[3:])
    assert out.startswith("ERR"), out
    return None


def own_processes() -> set[int]:
    """Live processes this test process (serve runs in it) started."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) == os.getpid():
                found.add(int(entry.name))
    return found


def uids_running(marker: str) -> set[int]:
    """Real uids of the live processes whose command line holds ``marker``."""
    uids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() not in (entry / "cmdline").read_bytes():
                    continue
                status = (entry / "status").read_text()
            except OSError:
                continue
            uids |= {int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:")}
    return uids


# -- a user token tries to run its own code: refused at PUT, never stored, never run ---------------------


CODE_CONFIGS: list[Any] = [
    {"command": "python", "args": ["-c", "print(open('/var/lib/agentpg/admin-token').read())"]},
    {"command": "python3", "args": ["-c", "import os; os.system('id')"]},
    {"command": "node", "args": ["-e", "require('fs').readFileSync('/var/lib/agentpg/secret.key')"]},
    {"command": "npx", "args": ["-y", "some-attacker-package"]},
    {"command": "uvx", "args": ["some-attacker-package"]},
    {"command": "/bin/sh", "args": ["-c", "cat /var/lib/agentpg/admin-token"]},
    {"command": "bash", "args": ["-c", "env"]},
    {"server": "/bin/sh"},
    {"server": "../evil"},
    {"server": "python"},
    {"server": "node -e 1"},
    {"server": "evil", "command": "/bin/sh"},
    {"server": "evil", "args": ["-e", "process.exit(0)"]},
    {"server": "echo", "params": {"LABEL": "ok"}, "args": ["--inspect"]},
    "python -c 'import os'",
    ["node", "-e", "1"],
]
#: params that would be shell or placeholder injection if anything ever interpreted them.
BAD_LABELS = ["x; cat /etc/passwd", "$(id)", "`id`", "a|b", "a && b", "x\nid", "x > /tmp/f", "--inspect=0.0.0.0:9229",
              "-e", "${GLOBAL_DB_URL}", "${AGENTPG_SECRET_KEY}", "$HOME", "${LABEL}", "../../etc/passwd",
              "a'b", 'a"b', "x\x00y", "", "a" * 33]
ENV_NAMES = ["PATH", "path", "Path", "PYTHONPATH", "pythonpath", "BASH_ENV", "bash_env", "GCONV_PATH", "gconv_path",
             "LD_PRELOAD", "ld_preload", "Ld_Preload", "LD_LIBRARY_PATH", "NODE_OPTIONS", "node_options",
             "PYTHONSTARTUP", "AGENTPG_SECRET_KEY", "HOME", "ENV"]


async def test_user_code_is_refused_at_put(attack: Attack, tenants: Tenants) -> None:
    url, token, user = attack.url, tenants.user1_token, tenants.user1
    before = own_processes()
    marker = f"{tempfile.gettempdir()}/agentpg-attack-ran-{uuid.uuid4().hex}"
    attempts: list[tuple[str, Any]] = [(f"code-{i}", body) for i, body in enumerate(CODE_CONFIGS)]
    attempts += [(f"label-{i}", {"server": "echo", "params": {"LABEL": label}}) for i, label in enumerate(BAD_LABELS)]
    for i, name in enumerate(ENV_NAMES):
        attempts.append((f"env-{i}", {"server": "echo", "params": {"LABEL": "ok"}, "env": {name: marker}}))
        attempts.append((f"envparam-{i}", {"server": "echo", "params": {"LABEL": "ok", name: marker}}))
    attempts.append(("inline-node", {"command": "node",
                                     "args": ["-e", f"require('fs').writeFileSync('{marker}','x')"]}))
    for name, body in attempts:
        response = put(url, token, user, name, body)
        assert response.status_code == 422, (name, body, response.status_code, response.text)
    # Outcome: nothing was stored, nothing can be reached, nothing ran.
    stored = stored_names(url, token, user)
    assert not stored & {name for name, _ in attempts}, stored
    for name in ("code-0", "label-1", "env-0", "inline-node"):
        refused = httpx.post(f"{url}/mcp/servers/{name}", json=INIT, timeout=30,
                             headers={**MCP_HEADERS, "Authorization": f"Bearer {tenants.token_a}"})
        assert refused.status_code == 404, refused.text
    assert not Path(marker).exists()
    assert own_processes() <= before
    # The messages say what is allowed.
    unknown = put(url, token, user, "x", {"server": "nope"}).json()["detail"]
    assert "echo, evil, evil-cpu, postgres" in unknown
    undeclared = put(url, token, user, "x", {"server": "echo", "params": {"LABEL": "ok", "PATH": "/"}}).json()
    assert "its params: LABEL" in undeclared["detail"]
    # A well-formed param is accepted and reaches the server as one argv item, never interpreted.
    assert put(url, token, user, "echo-ok", {"server": "echo", "params": {"LABEL": "fine_label-1"}}).status_code in (
        200, 201)


async def test_a_config_stored_in_the_old_form_never_runs(attack: Attack, runtime: Runtime,
                                                          tenants: Tenants) -> None:
    """A config an earlier version stored (``command``/``args``/``env``) is refused at call time."""
    marker = Path(tempfile.gettempdir()) / f"agentpg-attack-legacy-{uuid.uuid4().hex}"
    legacy = {"command": "node", "args": ["-e", f"require('fs').writeFileSync('{marker}', 'ran')"], "env": {}}
    deps = runtime.service.deps
    name = f"legacy-{attack.mode}"
    with deps.sessions.begin() as s:
        row_id = new_id()
        s.add(McpServerConfig(id=row_id, user_id=tenants.user1, name=name, created_at=utcnow(),
                              config_sealed=deps.seal(json.dumps(legacy), "mcp_servers", row_id, "config")))
    before = own_processes()
    try:
        listed = httpx.get(f"{attack.url}/api/users/{tenants.user1}/mcp-servers", timeout=30,
                           headers={"Authorization": f"Bearer {tenants.user1_token}"}).json()["items"]
        [info] = [i for i in listed if i["name"] == name]
        assert info["kind"] == "refused" and "old form" in info["error"]
        refused = httpx.post(f"{attack.url}/mcp/servers/{name}", json=INIT, timeout=30,
                             headers={**MCP_HEADERS, "Authorization": f"Bearer {tenants.token_a}"})
        leakscan.record("legacy config call", refused.text)
        assert refused.status_code == 422 and "old form" in refused.text, refused.text
        time.sleep(0.5)
        assert not marker.exists(), "a legacy config was run"
        assert own_processes() <= before
    finally:
        with deps.sessions.begin() as s:
            s.execute(delete(McpServerConfig).where(McpServerConfig.id == row_id))


# -- a malicious catalog entry, sandboxed ---------------------------------------------------------------


async def test_malicious_entry_cannot_read_agentpg_or_the_host(attack: Attack, agentpg_home: Path,
                                                               runtime: Runtime, tenants: Tenants) -> None:
    mode = attack.sandbox.detect()
    if attack.mode == "auto" and os.geteuid() == 0:
        assert mode.namespaces, f"bubblewrap installed but not used: {mode.reason}"
    assert put(attack.url, tenants.user1_token, tenants.user1, "evil", {"server": "evil"}).status_code in (200, 201)
    secrets = {agentpg_home / "admin-token", agentpg_home / "secret.key"}
    for path in secrets:
        assert path.exists() and path.stat().st_size > 0, path
    data_dir = EmbeddedPostgres(agentpg_home).data_dir
    assert (data_dir / "PG_VERSION").exists()
    project_file = Path(agentpg.__file__).resolve().parents[2] / "pyproject.toml"
    assert project_file.exists()
    serve = os.getpid()
    serve_environ = Path(f"/proc/{serve}/environ").read_bytes()
    async with gateway_session(attack.url, tenants.token_a, "evil") as s:
        for path in [*secrets, data_dir / "PG_VERSION", data_dir / "global" / "pg_control", data_dir / "pg_hba.conf"]:
            got = await read(s, str(path))
            assert got is None or got != path.read_bytes(), f"the sandboxed server read {path}"
            assert got is None, f"{path} is readable from the sandbox"
        listing = await sh(s, f"ls -la {agentpg_home} {data_dir} 2>&1; cat {agentpg_home}/* 2>&1")
        for path in secrets:
            assert path.read_text().strip() not in listing
        assert "PG_VERSION" not in listing
        for proc in (f"/proc/{serve}/environ", f"/proc/{serve}/cmdline", "/proc/1/environ", f"/proc/{serve}/mem"):
            got = await read(s, proc)
            assert got is None or (got != serve_environ and b"AGENTPG_" not in got), proc
        uid = int((await sh(s, "id -u")).split()[-1])
        assert uid != 0 and uid != os.getuid()
        assert uid != pwd.getpwnam(attack.settings.postgres_os_user).pw_uid
        env = (await read(s, "/proc/self/environ")) or b""
        names = {item.split(b"=", 1)[0].decode() for item in env.split(b"\0") if b"=" in item}
        assert names <= {"PATH", "HOME", "TMPDIR", "LANG", "PWD"}, names
        assert not any(name.startswith("AGENTPG") for name in names)
        if mode.namespaces:
            project = await read(s, str(project_file))
            assert project is None, "the project's files are visible in the sandbox"
            root = (await sh(s, "ls /")).split()[1:]
            assert not {"work", "root", "var", "home", "opt"} & set(root), root
            assert "No such file" in await sh(s, f"ls /work /root {agentpg_home} 2>&1 || true")
            pids = [int(p) for p in (await sh(s, "ls /proc")).split()[1:] if p.isdigit()]
            assert len(pids) < 10, pids  # only the sandbox's own processes
            assert (await read(s, f"/proc/{serve}/status")) is None or serve in pids
            assert "unshare failed" in await sh(s, "unshare -U true 2>&1 || true") or not mode.disable_userns
        # Writes land nowhere that matters.
        wrote = await sh(s, f"echo x > {agentpg_home}/owned 2>&1; echo x > /usr/owned 2>&1; echo done")
        assert "done" in wrote
        assert not (agentpg_home / "owned").exists() and not Path("/usr/owned").exists()
    # Another user's child runs as another uid, and cannot reach the first one.
    assert put(attack.url, tenants.user2_token, tenants.user2, "evil", {"server": "evil"}).status_code in (200, 201)
    role_a = urlsplit(runtime.service.uris.agent(tenants.ws_a, "global")).username or "?"
    async with gateway_session(attack.url, tenants.token_c, "evil") as other, \
            gateway_session(attack.url, tenants.token_a, "evil") as mine:
        uid_c = int((await sh(other, "id -u")).split()[-1])
        uid_a = int((await sh(mine, "id -u")).split()[-1])
        assert uid_c != uid_a and uid_c != 0
        pid_a = (await sh(mine, "echo $PPID")).split()[-1]
        if mode.namespaces:  # a's command line holds a's database URI: c does not even see a's processes
            seen = await sh(other, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
            assert role_a not in seen
        else:  # known limit without namespaces: /proc/<pid>/cmdline is world-readable (docs/gateway.md)
            assert "Operation not permitted" in await sh(other, f"kill -9 {pid_a} 2>&1 || true")
        assert await read(other, f"/proc/{pid_a}/environ") is None or mode.namespaces


async def test_malicious_entry_hits_its_limits(attack: Attack, tenants: Tenants) -> None:
    assert put(attack.url, tenants.user1_token, tenants.user1, "evil", {"server": "evil"}).status_code in (200, 201)
    assert put(attack.url, tenants.user1_token, tenants.user1, "evil-cpu",
               {"server": "evil-cpu"}).status_code in (200, 201)
    async with gateway_session(attack.url, tenants.token_a, "evil") as s:
        uid = int((await sh(s, "id -u")).split()[-1])
        # A huge file ends at the file-size limit (SIGXFSZ).
        big = await sh(s, "head -c 50000000 /dev/zero > $HOME/big; stat -c %s $HOME/big")
        assert int(big.split()[-1]) <= EVIL_LIMITS["file_size_mb"] * 1024 * 1024, big
        # A huge allocation fails (data-size limit) instead of taking the host's memory.
        alloc = await sh(s, "node -e \"Buffer.alloc(1<<30).fill(1); console.log('ALLOCATED')\" 2>&1")
        assert "ALLOCATED" not in alloc and "allocation failed" in alloc, alloc
        # Spawning without end stops at the process limit (processes and threads of this uid) ...
        spawned = await sh(s, "for i in $(seq 500); do sleep 60 & echo $i; done", timeout_ms=20000)
        assert "Cannot fork" in spawned, spawned[-300:]
        last = max(int(word) for word in spawned.split() if word.isdigit())
        running = len(Sandbox.processes_of(uid))
        assert last < EVIL_LIMITS["processes"] and running <= EVIL_LIMITS["processes"], (last, running)
        # ... and so does a fork bomb, which ends bounded.
        bomb = await sh(s, "b() { b | b & }; b; sleep 2; echo bombed", timeout_ms=8000)
        assert len(Sandbox.processes_of(uid)) <= EVIL_LIMITS["processes"], bomb[-300:]
        print(f"sandbox {attack.mode}: {last} sleeps spawned before the process limit; {running} processes")
    # Its stop (idle after 2 s) takes everything that ran as its uid with it.
    deadline = time.monotonic() + 20
    while Sandbox.processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert Sandbox.processes_of(uid) == [], "processes of a stopped child survived"
    # A busy loop is killed at the CPU limit (3 s) and the next call gets a fresh server.
    async with gateway_session(attack.url, tenants.token_a, "evil-cpu") as s:
        spun = await sh(s, "while :; do :; done", timeout_ms=60000)
        assert "signal=SIG" in spun, spun  # killed by the CPU limit, not ended by the call's timeout
        assert (await sh(s, "echo alive")).endswith("alive\n")


async def test_the_designs_flow_still_runs_sandboxed(attack: Attack, tenants: Tenants,
                                                     server_postgres_js: str) -> None:  # noqa: F811
    """The npm server with ${GLOBAL_DB_URL} works inside the sandbox, as its own uid."""
    assert put(attack.url, tenants.user1_token, tenants.user1, "pg", {"server": "postgres"}).status_code in (200, 201)
    started = time.monotonic()
    async with gateway_session(attack.url, tenants.token_a, "pg") as s:
        result = await s.call_tool("query", {"sql": "SELECT current_user = session_user AS ok, 41 + 1 AS answer"})
        elapsed = time.monotonic() - started
        assert not result.is_error, text(result)
        assert json.loads(text(result)) == [{"ok": True, "answer": 42}]
        uids = uids_running(server_postgres_js)
        assert uids and 0 not in uids
        if os.geteuid() == 0:
            base = attack.settings.gateway_uid_base
            assert all(base <= uid < base + attack.settings.gateway_uid_count for uid in uids), uids
    print(f"sandbox {attack.mode}: first call (start + initialize + query) in {elapsed * 1000:.0f} ms")


# -- the operator's side: a catalog that would weaken the sandbox is refused; status says what runs -------


def test_a_weakening_catalog_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    node = "/usr/bin/node"
    bad: list[dict[str, Any]] = [
        {"x": {"command": "node", "args": []}},  # not an absolute path
        {"x": {"command": node, "args": ["${SECRET_KEY}"]}},  # undeclared placeholder
        {"x": {"command": node, "env": {"ld_preload": "/x.so"}}},
        {"x": {"command": node, "env": {"NODE_OPTIONS": "--require /x.js"}}},
        {"x": {"command": node, "env": {"Path": "/x"}}},
        {"x": {"command": node, "env": {"BASH_ENV": "/x"}}},
        {"x": {"command": node, "read_only_paths": [str(home)]}},  # would expose agentpg's home
        {"x": {"command": node, "read_only_paths": [str(home.parent)]}},
        {"x": {"command": node, "read_only_paths": ["/"]}},
        {"x": {"command": node, "params": {"P": {"pattern": "("}}}},
        {"x": {"command": node, "params": {"P": {"description": "no pattern"}}}},
        {"x": {"command": node, "unknown": 1}},
        {"X Y": {"command": node}},
    ]
    for catalog in bad:
        with pytest.raises(CatalogError):
            load_catalog(json.dumps(catalog), home)
    good = load_catalog(json.dumps({"ok": {"command": node, "env": {"NODE_ENV": "production"}}}), home)
    assert good.names() == ["ok"]
    # A catalog file anyone else may write is refused: its writer would choose what agentpg runs.
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"ok": {"command": node}}))
    path.chmod(0o644)
    assert load_catalog(str(path), home).names() == ["ok"]
    path.chmod(0o666)
    with pytest.raises(CatalogError):
        load_catalog(str(path), home)


def test_status_shows_the_sandbox(agentpg_home: Path, evil_dir: Path) -> None:

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update({"AGENTPG_HOME": str(agentpg_home), "AGENTPG_WARM_POOL_SIZE": "0",
                "AGENTPG_USAGE_SYNC_INTERVAL_S": "0",
                "AGENTPG_GATEWAY_CATALOG": attack_catalog(evil_dir, "/nowhere/a/b/c/index.js")})
    exe = Path(sys.executable).with_name("agentpg")
    done = subprocess.run([str(exe), "status", "--json"], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["gateway_catalog"].startswith("4 entries")
    ensure_bwrap()
    if os.geteuid() == 0:
        assert "bubblewrap namespaces" in status["gateway_sandbox"], status
        assert "own unprivileged uid per child" in status["gateway_sandbox"]
    done = subprocess.run([str(exe), "status"], capture_output=True, text=True, timeout=120, check=False,
                          env={**env, "AGENTPG_GATEWAY_SANDBOX": "none"})
    assert "gateway_sandbox: DEGRADED: NO namespaces" in done.stdout, done.stdout


# -- nothing of a child outlives agentpg -----------------------------------------------------------------


def test_children_die_with_agentpg(attack: Attack, agentpg_home: Path, tenants: Tenants, evil_dir: Path,
                                   server_postgres_js: str) -> None:  # noqa: F811
    """``agentpg mcp --server`` killed with SIGKILL (no chance to clean up): its sandboxed child dies too."""

    assert put(attack.url, tenants.user1_token, tenants.user1, "evil", {"server": "evil"}).status_code in (200, 201)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update({"AGENTPG_HOME": str(agentpg_home), "AGENTPG_AGENT_TOKEN": tenants.token_b,
                "AGENTPG_WARM_POOL_SIZE": "0", "AGENTPG_USAGE_SYNC_INTERVAL_S": "0",
                "AGENTPG_GATEWAY_SANDBOX": attack.mode,
                "AGENTPG_GATEWAY_CATALOG": attack_catalog(evil_dir, server_postgres_js)})
    exe = Path(sys.executable).with_name("agentpg")
    proc = subprocess.Popen([str(exe), "mcp", "--server", "evil"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    call = {"name": "sh", "arguments": {"cmd": "id -u; echo \"$HOME\"; sleep 300 >/dev/null 2>&1 & echo started"}}
    try:
        for message in (INIT, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call}):
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
            if "id" in message:
                answer = json.loads(proc.stdout.readline())
        text = answer["result"]["content"][0]["text"]
        uid, home = int(text.split()[1]), Path(text.split()[2])
        assert uid != 0 and Sandbox.processes_of(uid), text
        # Without namespaces the child's home is a directory of its own on the host; with them, a private tmpfs.
        assert (home.name.startswith("agentpg-gateway-") and home.is_dir()) == (attack.mode == "none"), text
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 10
    while Sandbox.processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if attack.mode == "none":
        # Without namespaces the background `sleep` (not the server: it has PDEATHSIG) may outlive agentpg, and
        # the child's home stays behind: the next agentpg's start-up kills the one and removes the other.
        attack.sandbox.detect()
        assert not home.exists(), f"the killed agentpg's child left its home {home}"
    left = Sandbox.processes_of(uid)
    assert left == [], f"processes of the killed agentpg's child survived: {left}"


def test_the_no_user_namespace_mode_isolates_too(agentpg_home: Path, settings: Settings) -> None:
    """Where unprivileged user namespaces are off (AppArmor, sysctl), bwrap runs as root and the child drops
    to its uid inside: the same view, the same uid rules. (This host has user namespaces, so ``auto`` never
    picks this mode here: it is exercised directly.)"""
    ensure_bwrap()
    if os.geteuid() != 0:
        pytest.skip("bwrap as root needs root")
    sandbox = Sandbox(home=agentpg_home, requested="auto", uid_base=settings.gateway_uid_base,
                      uid_count=settings.gateway_uid_count, postgres_os_user=settings.postgres_os_user)
    limits = Limits(cpu_s=5, memory_mb=64, address_space_mb=1024, processes=8, file_size_mb=1, open_files=64)
    script = (f"id -u; cat {agentpg_home}/admin-token 2>&1; ls / | tr '\\n' ' '; echo; ls /proc | grep -c '^[0-9]'; "
              "grep CapEff /proc/self/status")
    launch = sandbox._plan(SandboxMode(kind="bwrap-root", own_uid=True), "/bin/sh", ["-c", script], {}, [], limits)
    try:
        done = subprocess.run(launch.argv, env=launch.env, cwd=launch.cwd, capture_output=True, text=True,
                              timeout=30, check=False)
    finally:
        launch.release(sandbox)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert int(lines[0]) == launch.uid and launch.uid not in (0, pwd.getpwnam(settings.postgres_os_user).pw_uid)
    assert "No such file" in lines[1]
    assert not {"work", "root", "var", "home"} & set(lines[2].split()), lines[2]
    assert int(lines[3]) < 6
    assert lines[4].split()[1] == "0000000000000000"  # no capabilities left
