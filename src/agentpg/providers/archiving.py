"""Wiring of continuous archiving: which servers are archived (settings), and ``serve``'s job that drives it."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import timedelta

from agentpg.embedded import EmbeddedPostgres, client_bin
from agentpg.errors import AgentpgError
from agentpg.periodic import PeriodicJob
from agentpg.providers.archive import Archiver
from agentpg.providers.base import Provider
from agentpg.providers.fleet import FleetProvider
from agentpg.providers.local import LocalProvider
from agentpg.settings import Settings

log = logging.getLogger(__name__)

#: How often ``serve`` checks the receivers (a dead one is restarted then) and whether a base backup is due.
TICK_S = 30.0


def _dir_name(server: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", server)


def attach_archivers(settings: Settings, provider: Provider, embedded: EmbeddedPostgres | None) -> list[Archiver]:
    """Give each server of ``provider`` its :class:`Archiver` (``AGENTPG_BACKUP_ENABLED``: unset archives the
    embedded server only, true external servers too, false none). Nothing is started here."""
    if settings.backup_enabled is False or (embedded is None and settings.backup_enabled is not True):
        return []
    if isinstance(provider, LocalProvider):
        members = {provider.server_name: provider}
    elif isinstance(provider, FleetProvider):
        members = dict(provider.members)
    else:
        return []
    root = settings.backup_root()
    if embedded is not None:
        work_dir, server_bin = embedded.root / "restore", embedded.server_bin()
    else:
        work_dir, server_bin = settings.home / "restore", client_bin()
    home_files = [settings.home / "secret.key", settings.home / "admin-token"]
    if embedded is not None:
        home_files.insert(0, embedded.password_file)
    archivers = []
    for name, member in members.items():
        archiver = Archiver(
            server=name, admin_dsn=member._admin_dsn, directory=root / _dir_name(name), work_dir=work_dir,
            bin_dir=client_bin(), server_bin_dir=server_bin, os_user=settings.postgres_os_user,
            synchronous=settings.backup_synchronous, retention=timedelta(days=settings.backup_retention_days),
            interval=timedelta(hours=settings.backup_interval_h), wal_trigger_mb=settings.backup_wal_trigger_mb,
            sync_files=settings.embedded_fsync or embedded is None, home_files=home_files)
        member.archiver = archiver
        archivers.append(archiver)
    return archivers


class ArchiveJob:
    """``serve``'s archiving: every :data:`TICK_S`, one :meth:`Archiver.tick` per server (one process per
    server at a time: the archiver's advisory lock); :meth:`stop` stops the receivers."""

    def __init__(self, archivers: Sequence[Archiver], interval_s: float = TICK_S) -> None:
        self.archivers = list(archivers)
        self._job = PeriodicJob("archiving", self._work, interval_s if self.archivers else 0, first_run_now=True,
                                log_traceback=False)

    def _work(self) -> None:
        for archiver in self.archivers:
            try:
                archiver.tick(stopping=self._job.stopping)
            except AgentpgError as exc:
                archiver.last_error = exc.message
                log.warning("archiving server %s: %s", archiver.server, exc.message)

    def start(self) -> None:
        self._job.start()

    def request_stop(self) -> None:
        """Tell a round in progress to end (a base backup's tool is terminated); returns at once."""
        self._job.request_stop()

    def stop(self) -> None:
        self._job.stop()
        for archiver in self.archivers:
            archiver.stop()
