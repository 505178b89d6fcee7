"""Shared fixtures: one real embedded PostgreSQL server for the whole run, started by the suite itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import leakscan
import psycopg
import pytest

from agentpg.embedded import EmbeddedPostgres
from agentpg.runtime import Runtime, open_runtime
from agentpg.settings import Settings

from leakscan import leak_scanner  # noqa: F401 - the suite-wide secret-leak check (autouse)


def pytest_configure(config: pytest.Config) -> None:
    # Servers the tests start (uvicorn, the CLI) must not fill a warm pool behind the tests' backs:
    # several tests count the databases on the shared server. The warm pool has its own tests.
    os.environ["AGENTPG_WARM_POOL_SIZE"] = "0"


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
    with open_runtime(settings) as rt:
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
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("AGENTPG_") or k == "AGENTPG_WARM_POOL_SIZE"}
    full_env["AGENTPG_HOME"] = str(home)
    full_env.update(env or {})
    exe = Path(sys.executable).with_name("agentpg")
    result = subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                            check=False)
    leakscan.record(f"cli {' '.join(args[:2])} stdout", result.stdout)
    leakscan.record(f"cli {' '.join(args[:2])} stderr", result.stderr)
    return result
