"""Support for the REST API tests: a transcript of every exchange, and a real ``agentpg serve`` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import leakscan
from sqlalchemy import select

from agentpg.app.runtime import Runtime
from agentpg.catalog.models import UserGlobalDatabase, Workspace, WorkspaceAgentDatabase


class Transcript:
    """Every HTTP exchange of the API tests: handed to the suite's leak scanner (passwords, keys, URIs) and
    kept here too, so the API tests can also check that no tenant *role name* reaches a response. Role names
    are harvested from the catalog after every creation, so those of users deleted later are known too."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.texts: list[tuple[str, str]] = []
        self.roles: set[str] = set()

    def record_response(self, response: httpx.Response) -> None:
        response.read()
        where = f"HTTP {response.request.method} {response.request.url.path} -> {response.status_code}"
        head = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
        self.record(where, head + "\n" + response.text)
        if response.request.method == "POST" and response.status_code == 201:
            self.roles |= role_names(self.runtime)

    def record(self, where: str, text: str) -> None:
        self.texts.append((where, text))
        leakscan.record(where, text)

    def role_leaks(self) -> list[str]:
        self.roles |= role_names(self.runtime)
        return sorted({f"{where}: names tenant role {role[:8]}…" for where, text in self.texts
                       for role in self.roles if role in text})


def role_names(runtime: Runtime) -> set[str]:
    """Every tenant role agentpg knows of now (login, owner, agent roles)."""
    names: set[str] = set()
    with runtime.service.deps.sessions() as s:
        for rec in [*s.scalars(select(UserGlobalDatabase)), *s.scalars(select(WorkspaceAgentDatabase))]:
            names.update(r for r in (rec.owner_role, rec.login_role) if r)
        names.update(w.agent_role for w in s.scalars(select(Workspace)) if w.agent_role)
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """``agentpg serve`` in a child process on a free loopback port, against the test home."""

    def __init__(self, home: Path, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        kept = ("AGENTPG_WARM_POOL_SIZE", "AGENTPG_USAGE_SYNC_INTERVAL_S", "AGENTPG_BACKUP_ENABLED",
                "AGENTPG_USER_STORAGE_CHECK_INTERVAL_S")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_") or k in kept}
        env.update(AGENTPG_HOME=str(home), AGENTPG_EMBEDDED_FSYNC="false", **(extra_env or {}))
        exe = Path(sys.executable).with_name("agentpg")
        self._log = log_path.open("wb")
        self.process = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agentpg serve exited with {self.process.returncode}: {self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"agentpg serve did not become ready: {self.output()[-2000:]}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.process.terminate()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=10)
        self._log.close()
        return code


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status whose detail mentions each of ``words``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["type"].startswith("urn:agentpg:problem:") and body["title"]
    assert body["detail"] and body["code"]
    for word in words:
        assert word.lower() in body["detail"].lower(), (word, body["detail"])
    return body
