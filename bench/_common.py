"""Shared bits of the benchmarks: a throwaway embedded server, percentiles, JSON + table output."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agentpg.runtime import Runtime, open_runtime
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
            yield rt
            if rt.embedded is not None:
                rt.embedded.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def report(name: str, results: dict[str, dict[str, float]], extra: dict[str, Any] | None = None) -> None:
    """Print the JSON document, then a short table of the same numbers."""
    print(json.dumps({"benchmark": name, "results": results, **(extra or {})}, indent=2))
    keys = ["n", "p50", "p95", "p99", "mean", "max"]
    print(f"\n{'case':<44}" + "".join(f"{k:>10}" for k in keys))
    for case, row in results.items():
        print(f"{case:<44}" + "".join(f"{row.get(k, ''):>10}" for k in keys))


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
        env.update(AGENTPG_HOME=str(home), AGENTPG_WARM_POOL_SIZE="0", AGENTPG_USAGE_SYNC_INTERVAL_S="0",
                   **(extra_env or {}))
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

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
