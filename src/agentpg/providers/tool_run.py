"""Running one of PostgreSQL's client tools (``pg_basebackup``, ``pg_receivewal --endpos`` …) for the archiver:
bounded in time, stopped when ``serve`` stops, and never with the admin password in what it raises.

Why stoppable: a base backup of a server that just received hundreds of new databases copies gigabytes and
takes minutes; ``serve`` stopping (a deploy, SIGTERM) must not wait for it. A backup is written to a temporary
directory and renamed only when complete, so an interrupted one leaves nothing that counts.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

from agentpg.errors import ProviderError

POLL_S = 0.1
"""How often a running tool's caller looks whether it should stop."""


class ToolInterrupted(ProviderError):
    """The tool was stopped because its caller is stopping (``serve`` shutting down); nothing it made counts."""


def run_tool(args: Sequence[str], *, env: Mapping[str, str], timeout_s: float, what: str, server: str,
             secret: str | None = None, stopping: threading.Event | None = None) -> str:
    """Run ``args`` to completion and return its output (stdout, then stderr).

    Raises :class:`ToolInterrupted` as soon as ``stopping`` is set (the tool is terminated, then killed),
    :class:`~agentpg.errors.ProviderError` when it runs past ``timeout_s`` (killed) or exits non-zero (with
    the tail of its output, ``secret`` masked)."""
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen(list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(env)) as proc:
        while True:
            if stopping is not None and stopping.is_set():
                _end(proc)
                raise ToolInterrupted(f"{what} on server {server!r} was stopped: agentpg is shutting down")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _end(proc)
                raise ProviderError(f"{what} on server {server!r} timed out after {timeout_s:.0f}s")
            try:
                # Called again after a timeout, communicate() loses no output (subprocess's documented contract).
                out, err = proc.communicate(timeout=min(POLL_S, remaining) if stopping is not None else remaining)
                break
            except subprocess.TimeoutExpired:
                continue
    output = (out + err).decode(errors="replace")
    if proc.returncode != 0:
        tail = output.strip()[-1500:]
        if secret:
            tail = tail.replace(secret, "***")
        raise ProviderError(f"{what} on server {server!r} failed: {tail}")
    return output


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers; reaped either way."""
    proc.terminate()
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
