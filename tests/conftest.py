"""Shared fixtures: one real embedded PostgreSQL server for the whole run, started by the suite itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import leakscan
import psycopg
import pytest
from api_support import LiveServer, Transcript
from leakscan import leak_scanner  # noqa: F401 - the suite-wide secret-leak check (autouse)
from mcp_support import PROCESS_INVALIDATION, Tenants, make_tenants

from agentpg.app.runtime import Runtime, open_runtime
from agentpg.embedded import EmbeddedPostgres
from agentpg.settings import Settings


def pytest_configure(config: pytest.Config) -> None:
    # Servers the tests start (uvicorn, the CLI) must not fill a warm pool behind the tests' backs:
    # several tests count the databases on the shared server. The warm pool has its own tests.
    os.environ["AGENTPG_WARM_POOL_SIZE"] = "0"
    os.environ["AGENTPG_USAGE_SYNC_INTERVAL_S"] = "0"  # budgets have their own tests
    # Nor check storage: the session's servers would otherwise judge every user against the default limit and
    # lift a block that tests/test_storage_limit.py's own server (with its small limit) has just set.
    os.environ["AGENTPG_USER_STORAGE_CHECK_INTERVAL_S"] = "0"
    # Continuous archiving (a slot, pg_receivewal, base backups of the shared server) has its own tests with
    # their own server (tests/test_archive.py); a test that wants it on sets it.
    os.environ.setdefault("AGENTPG_BACKUP_ENABLED", "false")


@pytest.fixture(scope="session")
def agentpg_home() -> Iterator[Path]:
    """A fresh AGENTPG_HOME the unprivileged server user can traverse (0711), removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="agentpg-test-", dir="/tmp"))
    home.chmod(0o711)
    server = EmbeddedPostgres(home, fsync=False)
    server.ensure_running()
    yield home
    server.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(agentpg_home: Path) -> Settings:
    return Settings(home=agentpg_home, embedded_fsync=False)


@pytest.fixture(scope="session")
def runtime(settings: Settings, agentpg_home: Path) -> Iterator[Runtime]:
    with open_runtime(settings, invalidation=PROCESS_INVALIDATION) as rt:
        yield rt
        leakscan.sweep(rt, agentpg_home)


@pytest.fixture()
def admin(runtime: Runtime) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A superuser connection to the tenant server, for the test to inspect what really exists."""
    with psycopg.connect(runtime.admin_dsn, autocommit=True) as conn:
        yield conn


def run_cli(home: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real ``agentpg`` console script in a child process against the test home."""
    kept = ("AGENTPG_WARM_POOL_SIZE", "AGENTPG_USAGE_SYNC_INTERVAL_S", "AGENTPG_BACKUP_ENABLED",
            "AGENTPG_USER_STORAGE_CHECK_INTERVAL_S")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_") or k in kept}
    full_env["AGENTPG_HOME"] = str(home)
    full_env.update(env or {})
    exe = Path(sys.executable).with_name("agentpg")
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                            check=False)
    leakscan.record(f"cli {' '.join(args[:2])} stdout", result.stdout)
    leakscan.record(f"cli {' '.join(args[:2])} stderr", result.stderr)
    return result


# -- REST API (tests/test_api*.py) --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def api_transcript(runtime: Runtime) -> Iterator[Transcript]:
    """Every API response of the run; each is also handed to the suite's leak scanner. At the end, no
    response may name a tenant role (the scanner already covers passwords, keys and URIs)."""
    transcript = Transcript(runtime)
    yield transcript
    leaks = transcript.role_leaks()
    if leaks:
        pytest.fail("API responses named tenant roles:\n" + "\n".join(leaks[:50]), pytrace=False)


@pytest.fixture(scope="session")
def admin_token(runtime: Runtime) -> str:
    from agentpg.app.runtime import admin_token as read_admin_token

    return read_admin_token(runtime.settings)


@pytest.fixture(scope="session")
def api_client(settings: Settings, runtime: Runtime, api_transcript: Transcript) -> Iterator[Any]:
    """httpx against the ASGI app in this process, with its lifespan run (runtime, tenant pools)."""
    import warnings

    from agentpg.app.asgi import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette nudges towards httpx2; httpx is what the project uses
        from starlette.testclient import TestClient

    with TestClient(create_app(settings, invalidation=PROCESS_INVALIDATION)) as client:
        client.event_hooks["response"] = [api_transcript.record_response]
        yield client


@pytest.fixture()
def web(api_client: Any) -> Iterator[Any]:
    """The session's ASGI client (the explorer's pages) with an empty cookie jar before and after the test."""
    api_client.cookies.clear()
    yield api_client
    api_client.cookies.clear()


@pytest.fixture(scope="session")
def live_server(agentpg_home: Path, runtime: Runtime, api_transcript: Transcript,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A real ``agentpg serve`` (uvicorn) process on a free loopback port, against the test home."""
    server = LiveServer(agentpg_home, tmp_path_factory.mktemp("live") / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        output = server.output()
        api_transcript.record("agentpg serve output", output)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is the clean exit here.
    assert code in (0, -15) and "Application shutdown complete" in output, output[-3000:]


@pytest.fixture
def anyio_backend() -> str:
    """The async tests run on asyncio (the MCP SDK's and uvicorn's loop)."""
    return "asyncio"


@pytest.fixture(scope="module")
def tenants(runtime: Runtime) -> Iterator[Tenants]:
    """Two agents of one user and one agent of another, with tokens (modules may define their own)."""
    t = make_tenants(runtime)
    yield t
    runtime.service.delete_user(t.user1)
    runtime.service.delete_user(t.user2)


@pytest.fixture(scope="module")
def victims(api_client: Any, admin_token: str, runtime: Runtime) -> Iterator[tuple[str, str, dict[str, str]]]:
    """A user whose global database holds ``victims`` (3 rows), for bad-input and fuzz tests that must show
    nothing changed; yields (user, its global URI, admin headers)."""
    from api_support import bearer, uid
    from helpers import global_uri

    admin_h = bearer(admin_token)
    user = uid("victim")
    assert api_client.post("/api/users", json={"id": user}, headers=admin_h).status_code == 201
    uri = global_uri(runtime, user)
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE victims (id int PRIMARY KEY, name text, doc json)")
        conn.execute("""INSERT INTO victims VALUES (1, 'a', '{"k": 1}'), (2, 'b', null), (3, 'c', '[]')""")
    yield user, uri, admin_h
    api_client.delete(f"/api/users/{user}", headers=admin_h)
