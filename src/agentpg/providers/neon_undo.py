"""Undo on Neon (issue 19) through Neon's own branch API; composed by :class:`~.neon.NeonProvider` (``.undo``).

How the undo part of the provider contract (:mod:`.base`) maps onto Neon:

* **A checkpoint** (``mark_point``) is the default branch's WAL position and time, read as the project's admin
  (``SELECT pg_current_wal_insert_lsn(), clock_timestamp()``): one query, nothing written or copied. It is recorded
  as ``"<lsn>@<unix ms>"``: the time tells which branch holds that LSN after later in-place restores (below).
* **restore_database(plan, target, into)** creates a point-in-time branch named ``into.database`` in the
  project of ``plan`` (``POST /projects/{id}/branches`` with ``parent_id`` and ``parent_lsn`` or
  ``parent_timestamp``, and a read-write endpoint). Neon branches are copy-on-write: about a second whatever
  the size. From then on the provider treats ``into.database`` as a database: its SQL goes to the branch's
  endpoint (so agents' grants are re-applied there), a restored copy is read there (:meth:`copy_uri`), and
  dropping it deletes the branch.
* **replace_database(plan, restored)** is Neon's documented in-place restore,
  ``POST /projects/{id}/branches/{default}/restore`` from the restored branch's head with
  ``preserve_under_name``: the default branch keeps its id, its compute endpoint and so every connection string
  (its compute restarts, ending sessions); its previous state is kept as branch ``"<restored> replaced at
  <unix ms>"``, and the restored branch is deleted. Restoring from the restored branch (not from the past
  point directly) swaps in exactly what was prepared, grants included. Neon's other flow, ``set_as_default``
  on the restored branch, moves the default flag but not the compute: the host, and every stored URI, would
  change.
* **History across in-place restores.** The default branch's history restarts at each in-place restore; what
  came before lives on in the preserved branches. A point (a checkpoint's time, or a time) is looked up on the
  earliest preserved branch replaced after it, else on the default branch.

Every step is idempotent: a half-made branch of an earlier attempt is deleted and made again; a rerun of the
swap sees the preserved branch and only cleans up. Limits: Neon keeps roles in a branch's history, so a point
before an agent's role was created (or a password changed) brings the role back as it was then; the preserved
branches stay (storage) until they leave the history window or the project is deleted; finding a copy by name
in another process costs one request per agentpg project (at most once a minute).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from agentpg.errors import ProviderError, ProviderUnavailable
from agentpg.providers.base import (
    GRANTS_LOCK_KEY,
    NAME_PREFIX,
    ArchiveStatus,
    DatabasePlan,
    NotRestorable,
    RecoveryTarget,
)
from agentpg.providers.neon_api import AmbiguousRequest
from agentpg.providers.neon_projects import NeonProject, admin_role_of

if TYPE_CHECKING:
    from agentpg.providers.neon import NeonProvider

log = logging.getLogger(__name__)

REPLACED = " replaced at "
_PRESERVED = re.compile(r" replaced at (\d{10,16})$")
_SCAN_EVERY_S = 60.0


@dataclass(frozen=True)
class _Copy:
    """A restored branch: where it lives, and the database (project name) it was restored from."""

    project_id: str
    branch_id: str
    source: str


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class NeonUndo:
    """Checkpoints and point-in-time restores of the Neon provider's databases (see the module docstring)."""

    def __init__(self, provider: NeonProvider) -> None:
        self._p = provider
        self._copies: dict[str, _Copy] = {}
        self._lock = threading.Lock()
        self._scanned_at = float("-inf")

    # -- status and checkpoints -------------------------------------------------------------------------

    def archive_status(self) -> list[ArchiveStatus]:
        """Neon keeps every project's history itself (its ``history_retention_seconds``): protected. The
        window is known here only when agentpg sets it (``history_retention_s``); else it is per project."""
        window = self._p.history_retention_s
        now = datetime.now(UTC)
        return [ArchiveStatus(server=None, protected=True, synchronous=True, latest=now,
                              earliest=now - timedelta(seconds=window) if window else None)]

    def mark_point(self, plan: DatabasePlan) -> tuple[str, datetime]:
        """``"<lsn>@<unix ms>"`` of the default branch now, and the compute's time. ProviderError or
        ProviderUnavailable when the compute cannot be asked."""
        with self._p._sql(plan, f"marking a checkpoint of {plan.database}") as conn:
            # The insert position, not the write one: with asynchronous commit the latter may still be behind
            # transactions that have committed, and a branch at it would miss them.
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text, clock_timestamp()").fetchone()
        assert row is not None
        at: datetime = row[1]
        return f"{row[0]}@{int(at.timestamp() * 1000)}", at

    # -- restore --------------------------------------------------------------------------------------

    def restore_database(self, plan: DatabasePlan, target: RecoveryTarget, into: DatabasePlan) -> None:
        """A branch ``into.database`` of ``plan``'s project as of ``target`` (see the module docstring).
        NotRestorable when the point is outside the project's history; ProviderError, ProviderUnavailable."""
        if into.database == plan.database:
            raise ProviderError("a database cannot be restored into itself; restore into a new one and replace")
        ref, project = self._p._project_body(plan, f"reading the history window of database {plan.database}")
        default = self._p._must(plan, uri=False, branch=True).branch_id
        if default is None:
            raise ProviderError(f"the Neon project of database {plan.database} has no default branch")
        point, at = self._point(plan, target, project)
        what = f"restoring database {plan.database}"
        branch: dict[str, Any] | None = None
        for _ in range(3):
            branches = self._branches(ref.project_id, what)
            for half_made in [b for b in branches if b.get("name") == into.database]:
                self._delete_branch(plan, ref.project_id, str(half_made["id"]), what)
            request = {"branch": {"parent_id": self._holder(branches, default, at), "name": into.database, **point},
                       "endpoints": [{"type": "read_write"}]}
            try:
                body = self._p.api.request("POST", f"/projects/{ref.project_id}/branches", json=request, what=what,
                                           idempotent=False) or {}
            except AmbiguousRequest:
                found = [b for b in self._branches(ref.project_id, what) if b.get("name") == into.database]
                if not found:
                    continue
                body = {"branch": found[0], "operations": self._pending(ref.project_id, what)}
            branch = body.get("branch") or {}
            self._p.projects.wait(plan, ref.project_id, list(body.get("operations") or []))
            break
        if not branch or not branch.get("id"):
            raise ProviderUnavailable(f"{what}: the Neon API kept failing; giving up for now")
        copy = _Copy(ref.project_id, str(branch["id"]), plan.database)
        with self._lock:
            self._copies[into.database] = copy
        restored = DatabasePlan(into.database, plan.owner_role, plan.login_role)
        with self._p._sql(restored, f"preparing the restored database {into.database}") as conn, conn.transaction():
            # The caller re-applies every current agent's grants; those of roles gone since are dropped.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (GRANTS_LOCK_KEY,))
            conn.execute("DELETE FROM agentpg_internal.agent_grants g "
                         "WHERE NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = g.role_name)")

    def _point(self, plan: DatabasePlan, target: RecoveryTarget,
               project: dict[str, Any]) -> tuple[dict[str, str], datetime]:
        """The branch request's ``parent_lsn``/``parent_timestamp``, and the point's time; NotRestorable
        when it is in the future, before the project existed or outside its history window."""
        now = datetime.now(UTC)
        if target.lsn is not None:
            lsn, _, ms = target.lsn.partition("@")
            at = datetime.fromtimestamp(int(ms) / 1000, UTC) if ms.isdigit() else now
            point = {"parent_lsn": lsn}
        else:
            assert target.time is not None
            at = target.time if target.time.tzinfo else target.time.replace(tzinfo=UTC)
            if at > now:
                raise NotRestorable(f"{at.isoformat()} is in the future")
            point = {"parent_timestamp": _iso(at)}
        window = project.get("history_retention_seconds")
        if isinstance(window, int) and at < now - timedelta(seconds=window):
            raise NotRestorable(f"that point is outside Neon's history window of database {plan.database} "
                                f"({window} s)")
        created = _parse_time(project.get("created_at"))
        if created is not None and at < created:
            raise NotRestorable(f"database {plan.database} did not exist at that point")
        return point, at

    @staticmethod
    def _holder(branches: list[dict[str, Any]], default: str, at: datetime) -> str:
        """The branch whose history holds instant ``at``: the earliest preserved one replaced after it."""
        at_ms = at.timestamp() * 1000
        preserved = sorted((int(m.group(1)), str(b["id"])) for b in branches if b.get("id")
                           and (m := _PRESERVED.search(str(b.get("name") or ""))))
        return next((branch_id for ms, branch_id in preserved if ms > at_ms), default)

    def replace_database(self, plan: DatabasePlan, restored: DatabasePlan) -> None:
        """Restore the default branch from branch ``restored.database`` (Neon's restore, previous state
        preserved), then delete that branch. A rerun after a crash finds the preserved branch and only cleans
        up. ProviderError when neither the preserved nor the restored branch exists."""
        ref = self._p._must(plan, uri=False, branch=True)
        what = f"restoring database {plan.database} in place"
        prefix = restored.database + REPLACED
        for _ in range(3):
            branches = self._branches(ref.project_id, what)
            if any(str(b.get("name") or "").startswith(prefix) for b in branches):
                break  # the swap is done (an earlier run, or the one below)
            source = next((b for b in branches if b.get("name") == restored.database), None)
            if source is None:
                raise ProviderError(f"neither database {plan.database} restored nor its restored branch "
                                    f"{restored.database} exists")
            request = {"source_branch_id": str(source["id"]),
                       "preserve_under_name": f"{prefix}{int(time.time() * 1000)}"}
            try:
                body = self._p.api.request("POST", f"/projects/{ref.project_id}/branches/{ref.branch_id}/restore",
                                           json=request, what=what, idempotent=False) or {}
            except AmbiguousRequest:
                continue  # look again before another POST
            self._p.projects.wait(plan, ref.project_id, list(body.get("operations") or []))
            break
        else:
            raise ProviderUnavailable(f"{what}: the Neon API kept failing; giving up for now")
        self.drop_copy(restored.database, plan=plan)

    # -- restored copies ------------------------------------------------------------------------------

    def known(self, name: str) -> NeonProject | None:
        """The restored branch named ``name`` that this process knows, as the provider's project record
        (its admin URI asked for now). None when it knows none by that name."""
        with self._lock:
            copy = self._copies.get(name)
        if copy is None:
            return None
        return NeonProject(copy.project_id, self._branch_uri(copy), copy.branch_id)

    def copy_uri(self, uri: str, name: str) -> str:
        """``uri`` (a login URI of the copy's source: role and password) at the endpoint of restored branch
        ``name``. A secret. ProviderError when no such branch exists."""
        copy = self._find(name)
        if copy is None:
            raise ProviderError(f"the restored copy {name} has no Neon branch")
        admin = urlsplit(self._branch_uri(copy))
        login = urlsplit(uri)
        userinfo = login.netloc.rsplit("@", 1)[0]
        host = admin.netloc.rsplit("@", 1)[-1]
        return urlunsplit((admin.scheme, f"{userinfo}@{host}", admin.path, admin.query or login.query, ""))

    def drop_copy(self, name: str, plan: DatabasePlan | None = None) -> bool:
        """Delete the restored branch ``name`` (its endpoint goes with it); False if there is none. Neon
        refuses to delete a branch that has children: that is logged and the branch kept."""
        copy = self._find(name)
        if copy is None:
            return False
        plan = plan or DatabasePlan(copy.source, f"{copy.source}_owner", f"{copy.source}_login")
        try:
            self._delete_branch(plan, copy.project_id, copy.branch_id, f"dropping the restored copy {name}")
        except ProviderUnavailable:
            raise
        except ProviderError as exc:
            log.warning("the restored branch %s of database %s was kept: %s", name, copy.source, exc.message)
        with self._lock:
            self._copies.pop(name, None)
        self._p._forget(name)
        return True

    def _find(self, name: str) -> _Copy | None:
        with self._lock:
            copy = self._copies.get(name)
        return copy or self._scan().get(name)

    def _scan(self) -> dict[str, _Copy]:
        """Every restored branch of every agentpg project (one request per project), at most once a minute:
        what another process made, found by name."""
        with self._lock:
            if time.monotonic() - self._scanned_at < _SCAN_EVERY_S:
                return {}
            self._scanned_at = time.monotonic()
        found: dict[str, _Copy] = {}
        for project in self._p.projects.list_all(NAME_PREFIX, "finding restored copies"):
            source = str(project.get("name") or "")
            if not source.startswith(NAME_PREFIX) or not project.get("id"):
                continue
            for b in self._branches(str(project["id"]), f"finding the restored copies of database {source}"):
                name = str(b.get("name") or "")
                if name.startswith(NAME_PREFIX) and not b.get("default") and not _PRESERVED.search(name):
                    found[name] = _Copy(str(project["id"]), str(b["id"]), source)
        with self._lock:
            self._copies.update(found)
        return found

    # -- Neon requests --------------------------------------------------------------------------------

    def _branches(self, project_id: str, what: str) -> list[dict[str, Any]]:
        body = self._p.api.request("GET", f"/projects/{project_id}/branches", what=what) or {}
        return [b for b in body.get("branches") or [] if isinstance(b, dict)]

    def _pending(self, project_id: str, what: str) -> list[dict[str, Any]]:
        body = self._p.api.request("GET", f"/projects/{project_id}/operations", params={"limit": 50},
                                   what=what) or {}
        return [op for op in body.get("operations") or [] if isinstance(op, dict)]

    def _delete_branch(self, plan: DatabasePlan, project_id: str, branch_id: str, what: str) -> None:
        body = self._p.api.request("DELETE", f"/projects/{project_id}/branches/{branch_id}", ok_missing=True,
                                   what=what) or {}
        self._p.projects.wait(plan, project_id, list(body.get("operations") or []))

    def _branch_uri(self, copy: _Copy) -> str:
        """The project admin's URI on the branch's endpoint (Neon's ``connection_uri`` with ``branch_id``)."""
        source = DatabasePlan(copy.source, f"{copy.source}_owner", f"{copy.source}_login")
        body = self._p.api.request(
            "GET", f"/projects/{copy.project_id}/connection_uri",
            params={"branch_id": copy.branch_id, "database_name": copy.source, "role_name": admin_role_of(source)},
            what=f"reading the connection of a restored branch of database {copy.source}") or {}
        uri = body.get("uri")
        if not isinstance(uri, str) or "://" not in uri:
            raise ProviderError(f"the Neon API gave no connection URI for a restored branch of {copy.source}")
        return uri
