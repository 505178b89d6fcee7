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
