"""Shared bits of the benchmarks: a throwaway embedded server, percentiles, JSON + table output."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agentpg.app.runtime import Runtime, open_runtime
from agentpg.settings import Settings


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"n": len(ordered), "p50": round(cuts[49], 3), "p95": round(cuts[94], 3), "p99": round(cuts[98], 3),
            "mean": round(statistics.fmean(ordered), 3), "max": round(ordered[-1], 3)}


@contextmanager
def throwaway_runtime(**overrides: Any) -> Iterator[Runtime]:
    """A runtime on a fresh embedded server in a temporary home, removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="agentpg-bench-", dir="/tmp"))
    home.chmod(0o711)
    settings = Settings(home=home, warm_pool_size=0, **overrides)
    try:
        with open_runtime(settings) as rt:
            try:
                yield rt
            finally:  # also when the benchmark failed: never leave a server running
                if rt.embedded is not None:
                    rt.embedded.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def report(name: str, results: dict[str, dict[str, float]], extra: dict[str, Any] | None = None) -> None:
    """Print the JSON document, then a short table of the same numbers. The machine's load average is
    included: on a shared 2-core machine, figures taken under load are not comparable with quiet ones."""
    import os

    if extra is not None:
        extra.setdefault("loadavg_1_5_15", [round(x, 2) for x in os.getloadavg()])
    print(json.dumps({"benchmark": name, "results": results, **(extra or {})}, indent=2))
    keys = ["n", "p50", "p95", "p99", "mean", "max"]
    width = max([44, *(len(case) + 2 for case in results)])
    print(f"\n{'case':<{width}}" + "".join(f"{k:>10}" for k in keys))
    for case, row in results.items():
        print(f"{case:<{width}}" + "".join(f"{row.get(k, ''):>10}" for k in keys))


class ServeProcess:
    """``agentpg serve`` on a free loopback port against ``home``, for benchmarks that go over real HTTP."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        import os
        import socket
        import subprocess
        import sys

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
        # The per-token rate limit (50/s by default) would cap one agent far below what is measured here.
        env.update({"AGENTPG_HOME": str(home), "AGENTPG_WARM_POOL_SIZE": "0", "AGENTPG_USAGE_SYNC_INTERVAL_S": "0",
                    "AGENTPG_RATE_LIMIT_PER_S": "0", **(extra_env or {})})
        exe = Path(sys.executable).with_name("agentpg")
        self.process = subprocess.Popen([str(exe), "serve", "--port", str(self.port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 60) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("agentpg serve did not become ready")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self, timeout_s: float = 120) -> None:
        """SIGTERM, then wait: a serve that archives may be in the middle of a base backup (hundreds of
        databases just registered make one of several GB)."""
        self.process.terminate()
        self.process.wait(timeout=timeout_s)


# -- MCP clients for the MCP benchmarks (the official SDK's client drives every server) ---------------------


def agentpg_stdio_params(home: Path, token: str) -> Any:
    """``agentpg mcp`` over stdio for one agent (the token goes in the environment, never argv)."""
    import os
    import sys

    from mcp import StdioServerParameters

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update(AGENTPG_HOME=str(home), AGENTPG_AGENT_TOKEN=token, AGENTPG_WARM_POOL_SIZE="0",
               AGENTPG_USAGE_SYNC_INTERVAL_S="0")
    return StdioServerParameters(command=str(Path(sys.executable).with_name("agentpg")), args=["mcp"], env=env)


def bench_agent(rt: Runtime, user: str = "bench", workspace: str = "bench-agent") -> tuple[str, str]:
    """Register a user and one workspace; its agent token and the agent's own global-database URI (a secret:
    for the baselines of this process only, never printed). The table ``items`` (10,000 rows) exists there."""
    import psycopg

    from agentpg.tokens import Principal

    svc = rt.service
    svc.register_user(user)
    _, issued = svc.create_workspace_with_token(user, workspace)
    principal = Principal(kind="agent", token_id=issued.id, user_id=user, workspace_id=workspace)
    uri = svc.agents.target(principal, "global").uri
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price float8)")
        conn.execute("INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 10000) g")
    return issued.secret, uri


def write_json(name: str, doc: dict[str, Any]) -> Path:
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))
    return path


def pyplot() -> Any | None:
    """matplotlib's pyplot on the file-only Agg backend, or None (said on stderr) when the ``bench`` extra
    is not installed: the figures are in the JSON either way."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    return plt
