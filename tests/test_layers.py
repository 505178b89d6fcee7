"""The layering of docs/architecture.md holds: an import contract (import-linter, configured in
pyproject.toml) and the rule that no edge handles a tenant connection string."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "agentpg"
EDGES = ("api", "mcp", "web", "gateway", "cli")


def test_import_contracts_hold() -> None:
    """Edges import only the service (and the kernel); imports go down; only app/ knows every edge."""
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=SRC.parents[1],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "KEPT" in done.stdout


def test_no_edge_asks_for_a_connection_string() -> None:
    """The service's URI lookups are its own: an edge names databases (DatabaseRef, "global"/"agent")."""
    lookups = re.compile(r"\.uris\.\w+\(|target\.uri\b|service\.tenant\(\)")
    found = [f"{path.relative_to(SRC)}:{n}: {line.strip()}"
             for edge in EDGES for path in sorted((SRC / edge).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if lookups.search(line)]
    assert not found, "edges that reach for a URI:\n" + "\n".join(found)


def test_no_module_level_caches_or_state() -> None:
    """Nothing is created at import time: no module-level lru_cache, no global statement (the caches are
    objects the service owns: Statements, the TtlCaches on its Invalidation)."""
    offenders = [f"{path.relative_to(SRC)}:{n}: {line.strip()}"
                 for path in sorted(SRC.rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.match(r"(_?\w+\s*=\s*functools\.lru_cache|\s+global\s+\w)", line)]
    assert not offenders, "\n".join(offenders)
