"""What the CLI needs from the assembly: the one place that opens a service and starts the servers.

The CLI is an edge: it calls the service and never builds one. ``agentpg``'s entry point
(:func:`agentpg.app.commands.main`) runs the Typer app inside :func:`hosted_by`, which makes its
:class:`CliHost` the one :func:`host` returns for that run (a context variable: set per run by the entry
point, empty otherwise, so nothing is decided at import time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Protocol

from agentpg.service import Service
from agentpg.settings import Settings


class CliHost(Protocol):
    def open_service(self, settings: Settings, *, attach_only: bool = False) -> AbstractContextManager[Service]:
        """The runtime's service for the block (raises ``AgentpgError`` when it cannot be opened)."""
        ...

    def serve_http(self, settings: Settings, host: str, port: int) -> None:
        """``agentpg serve``: the whole app on ``host:port`` until interrupted."""
        ...

    def serve_stdio(self, service: Service, token: str, server: str | None) -> None:
        """``agentpg mcp``: agentpg's tools (or the gateway's ``server``) on stdin/stdout until EOF."""
        ...

    def gateway_status(self, settings: Settings) -> dict[str, Any]:
        ...

    def stop_embedded(self, settings: Settings) -> None:
        ...

    def recover(self, from_dir: Path, settings: Settings) -> Any:
        """Disaster recovery of the embedded server from a backup directory (``RecoveryDone``)."""
        ...


_CURRENT: ContextVar[CliHost | None] = ContextVar("agentpg_cli_host", default=None)


@contextmanager
def hosted_by(cli_host: CliHost) -> Iterator[None]:
    """Run the CLI's commands inside the block with ``cli_host``."""
    token = _CURRENT.set(cli_host)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def host() -> CliHost:
    """The host of this run (:func:`hosted_by`); ``RuntimeError`` outside the entry point."""
    current = _CURRENT.get()
    if current is None:
        raise RuntimeError("agentpg's CLI runs through its entry point (agentpg.app.commands:main)")
    return current


Opener = Callable[..., AbstractContextManager[Service]]
