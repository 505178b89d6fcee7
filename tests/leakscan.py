"""A pytest plugin, active for the whole suite, that fails the run if any secret agentpg made leaks out.

Secrets collected: every plaintext agentpg seals (tenant URIs, hence their passwords), every value a sweep
of the catalog opens at the end (covering what child processes sealed), the embedded server's admin
password and the master keys. Outputs scanned: every log record (any logger, DEBUG and up, with exception
text), every AgentpgError message, everything a test records through :func:`record` (CLI output, HTTP
responses and headers, MCP messages, /metrics), and the embedded server's own log file.

Two checks: a collected password, key or URI appears verbatim; or anything shaped like a connection URI of
an agentpg role (``postgres…://…apg_…``) appears at all, collected or not.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import text

from agentpg.app.runtime import Runtime
from agentpg.crypto import KeyRing, SealContext
from agentpg.errors import AgentpgError
from agentpg.lifecycle.keys import SEALED_COLUMNS

_TOKEN = re.compile(r"[A-Za-z0-9_\-]{40,}")
_TENANT_URI = re.compile(r"postgres(?:ql)?://[^\s\"'<>]*apg_", re.IGNORECASE)


@dataclass
class LeakScanner:
    secrets: set[str] = field(default_factory=set)
    uris: set[str] = field(default_factory=set)
    outputs: list[tuple[str, str]] = field(default_factory=list)

    def add_uri(self, uri: str) -> None:
        parts = urlsplit(uri)
        if parts.password:
            self.secrets.add(parts.password)
            self.uris.add(uri)
            self.uris.add(uri.replace(":" + parts.password + "@", "@", 1))

    def add_plaintext(self, value: str) -> None:
        if value.startswith(("postgres://", "postgresql://")):
            self.add_uri(value)
        elif len(value) >= 16:
            self.secrets.add(value)

    def record(self, source: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if text:
            self.outputs.append((source, text))

    def findings(self) -> list[str]:
        found: list[str] = []
        for source, output in self.outputs:
            for token in _TOKEN.findall(output):
                if any(secret in token for secret in self.secrets if len(secret) >= 40) or token in self.secrets:
                    found.append(f"{source}: a secret ({token[:4]}…) appears")
            for secret in (s for s in self.secrets if len(s) < 40):
                if secret in output:
                    found.append(f"{source}: a secret ({secret[:4]}…) appears")
            if _TENANT_URI.search(output):
                found.append(f"{source}: a tenant connection URI appears")
            for uri in self.uris:
                if uri in output:
                    found.append(f"{source}: a collected URI appears")
        return sorted(set(found))


class _Handler(logging.Handler):
    def __init__(self, scanner: LeakScanner) -> None:
        super().__init__(level=logging.DEBUG)
        self.scanner = scanner

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.scanner.record(f"log {record.name}", text)


_ACTIVE: list[LeakScanner] = []


def record(source: str, text: str | bytes) -> None:
    """Hand an output (CLI stdout, an HTTP body, an MCP message…) to the suite's scanner."""
    if _ACTIVE:
        _ACTIVE[-1].record(source, text)


def add_uri(uri: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1].add_uri(uri)


@pytest.fixture(scope="session", autouse=True)
def leak_scanner() -> Iterator[LeakScanner]:
    scanner = LeakScanner()
    _ACTIVE.append(scanner)
    mp = pytest.MonkeyPatch()
    real_seal = KeyRing.seal
    real_error_init = AgentpgError.__init__

    def seal(self: KeyRing, plaintext: str, context: object) -> str:
        scanner.add_plaintext(plaintext)
        return real_seal(self, plaintext, context)  # type: ignore[arg-type]

    def error_init(self: AgentpgError, message: str) -> None:
        scanner.record(f"error {type(self).__name__}", message)
        real_error_init(self, message)

    from mcp import ClientSession

    real_send_request = ClientSession.send_request

    async def send_request(self: ClientSession, *args: Any, **kwargs: Any) -> Any:
        # Every MCP result any test's SDK client receives (HTTP, stdio, gateway): tools, resources, prompts.
        result = await real_send_request(self, *args, **kwargs)
        if getattr(self, "agentpg_upstream", False):
            # The gateway's own session to a child it spawned: the child's raw output, which holds the secret
            # by design and is scrubbed before it goes anywhere; the agent's session (recorded) gets that.
            return result
        scanner.record("mcp result", result.model_dump_json() if hasattr(result, "model_dump_json") else str(result))
        return result

    mp.setattr(ClientSession, "send_request", send_request)
    mp.setattr(KeyRing, "seal", seal)
    mp.setattr(AgentpgError, "__init__", error_init)
    handler = _Handler(scanner)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        yield scanner
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        mp.undo()
        _ACTIVE.remove(scanner)
    problems = scanner.findings()
    if problems:
        pytest.fail("secrets leaked during the run:\n" + "\n".join(problems[:50]), pytrace=False)


def sweep(runtime: Runtime, home: Path) -> None:
    """Collect what child processes sealed (from the catalog), the keys, and scan the server's own log.

    Called by the ``runtime`` fixture just before it closes, while the catalog is still reachable.
    """
    if not _ACTIVE:
        return
    scanner = _ACTIVE[-1]
    ring = runtime.keyring
    for key in ring.keys.values():
        scanner.secrets.add(base64.urlsafe_b64encode(key).decode().rstrip("="))
    for secret_file in (home / "postgres" / "admin-password", home / "admin-token"):
        if secret_file.exists():
            scanner.secrets.add(secret_file.read_text().strip())
    with runtime.engine.connect() as conn:
        for spec in SEALED_COLUMNS:  # the one registry of sealed columns, so a new one is scanned too
            table, column, fieldname = spec.aad_table, spec.column, spec.aad_field
            rows = conn.execute(text(f"SELECT id, {column} FROM {table} WHERE {column} IS NOT NULL")).all()
            for row_id, sealed in rows:
                try:
                    scanner.add_plaintext(ring.open(sealed, SealContext(table, row_id, fieldname)))
                except Exception:  # noqa: S112 - a test may have tampered with a value on purpose
                    continue
    server_log = home / "postgres" / "postgres.log"
    if server_log.exists():
        scanner.record("postgres server log", server_log.read_text(errors="replace"))
