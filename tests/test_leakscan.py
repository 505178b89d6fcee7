"""The leak scanner itself must be able to fail, or the suite-wide check proves nothing."""

from __future__ import annotations

import logging
import uuid
from urllib.parse import urlsplit

import leakscan
from helpers import global_uri

from agentpg.app.runtime import Runtime


def test_scanner_finds_passwords_uris_and_tenant_uri_shapes() -> None:
    scanner = leakscan.LeakScanner()
    uri = "postgresql://apg_0123456789abcdef_login:Zx9" + "q" * 40 + "@127.0.0.1:5432/apg_0123456789abcdef"
    scanner.add_uri(uri)
    scanner.record("clean", '{"name": "apg_0123456789abcdef", "status": "ready"}')
    assert scanner.findings() == []
    scanner.record("body", '{"detail": "password Zx9' + "q" * 40 + ' rejected"}')
    scanner.record("log", "connecting to postgresql://apg_x_login@127.0.0.1/db")
    found = scanner.findings()
    assert any(f.startswith("body: a secret") for f in found)
    assert any(f.startswith("log: a tenant connection URI") for f in found)


def test_the_session_scanner_sees_what_agentpg_seals_and_logs(runtime: Runtime,
                                                              leak_scanner: leakscan.LeakScanner) -> None:
    user = f"leak-{uuid.uuid4().hex[:8]}"
    runtime.service.register_user(user)
    password = urlsplit(global_uri(runtime, user)).password
    assert password in leak_scanner.secrets
    logging.getLogger("agentpg.test").info("registered %s", user)
    assert any(source == "log agentpg.test" and user in text for source, text in leak_scanner.outputs)
    runtime.service.delete_user(user)


def test_mcp_results_reach_the_scanner(leak_scanner: leakscan.LeakScanner) -> None:
    from mcp import ClientSession

    assert getattr(ClientSession.send_request, "__name__", "") == "send_request"
    assert ClientSession.send_request.__module__ == "leakscan"  # patched for the whole run
