"""``agentpg``'s entry point: the CLI edge, run with the assembly as its host (:class:`agentpg.cli.host.CliHost`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agentpg.app.runtime import open_runtime
from agentpg.cli.host import hosted_by
from agentpg.cli.main import app as cli_app
from agentpg.service import Service
from agentpg.settings import Settings


class AppHost:
    """Opens the runtime's service and starts the servers for the CLI's commands."""

    @contextmanager
    def open_service(self, settings: Settings, *, attach_only: bool = False) -> Iterator[Service]:
        with open_runtime(settings, attach_only=attach_only) as runtime:
            yield runtime.service

    def serve_http(self, settings: Settings, host: str, port: int) -> None:
        import uvicorn

        from agentpg.app.asgi import create_app, server_options

        # uvicorn's "auto" choices pick uvloop and httptools (both dependencies): httptools' C parser answered
        # an MCP call ~0.2 ms sooner than h11 in bench measurements.
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info", **server_options(settings))

    def serve_stdio(self, service: Service, token: str, server: str | None) -> None:
        from agentpg.app.stdio import run_stdio

        run_stdio(service, token, server)

    def gateway_status(self, settings: Settings) -> dict[str, Any]:
        from agentpg.gateway.children import gateway_status

        return dict(gateway_status(settings))

    def stop_embedded(self, settings: Settings) -> None:
        from agentpg.embedded import EmbeddedPostgres

        EmbeddedPostgres(settings.home, os_user=settings.postgres_os_user).stop()

    def recover(self, from_dir: Path, settings: Settings) -> Any:
        from agentpg.providers.recover import recover_embedded

        return recover_embedded(from_dir, settings.home, os_user=settings.postgres_os_user,
                                fsync=settings.embedded_fsync)


def main() -> None:
    """The ``agentpg`` command."""
    with hosted_by(AppHost()):
        cli_app()
