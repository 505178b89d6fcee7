"""The Neon stand-in's branches (``neon_standin.py``): Neon's branch API, real underneath, history included.

Endpoints, following Neon's published API v2 (``BranchCreateRequest``, ``BranchRestoreRequest``; answers with
``branch``, ``endpoints``, ``operations``, ``connection_uris``; ``GeneralError`` otherwise):

* ``POST /projects/{id}/branches`` ``{"branch": {"parent_id", "parent_lsn" | "parent_timestamp", "name"},
  "endpoints": [{"type": "read_write"}]}`` → 201; 404 for an unknown parent, 400 for both points at once or
  a point outside the history, 409 for a name a branch of the project has, 423 while the project has running
  operations;
* ``GET /projects/{id}/branches/{branch_id}``, ``DELETE`` the same → 200 (422 for the default branch or
  one with children);
* ``POST /projects/{id}/branches/{branch_id}/restore`` ``{"source_branch_id", "source_lsn" |
  "source_timestamp", "preserve_under_name"}`` → 200: the branch gets the source's state, keeps its id and
  endpoint (so its URI), its previous state becomes a new branch named ``preserve_under_name`` (required when
  restoring a branch to its own history or when it has children; its children move there).

How it is real: a branch is a database of its own on the backing server (the default branch is the
project's database; the others are ``<database>_b<hex>``, the only visible difference from Neon, where each
branch keeps the database's name and has a host of its own: the URIs that ``connection_uri`` returns name
it). Its history is the backing server's WAL, archived by agentpg's own :class:`~agentpg.providers.archive.Archiver`:
a branch at an LSN or time is materialized by agentpg's point-in-time machinery (a
:class:`~agentpg.providers.side.SideInstance` holding only that database, recovered to the point, then
``pg_dump``/``pg_restore`` as the superuser with owners and privileges kept, the database's own ACL copied),
so it holds exactly the data of that instant. A branch from a head is ``CREATE DATABASE … TEMPLATE`` (its
sessions are ended for that, which Neon would not do). What is not imitated: roles are the cluster's, not the
branch's (Neon keeps roles in a branch's history); a branch's history before it was made is not kept here
(Neon would show its parent's); the work is done before the answer, the operations then run
``operation_delay_s``.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg import sql
from psycopg.conninfo import make_conninfo

from agentpg.errors import AgentpgError
from agentpg.providers.archive import Archiver
from agentpg.providers.base import RecoveryTarget
from agentpg.providers.side import STANDBY_MINIMUMS, SideInstance
from agentpg.providers.walfiles import chain, contiguous_from, parse_lsn, segments

if TYPE_CHECKING:
    from neon_standin import NeonStandIn, Project


@dataclass
class Branch:
    id: str
    name: str
    physical: str
    """The database holding this branch on the backing server."""
    oid: int
    """That database's OID: what its history is kept under in the backing server's WAL."""
    created: datetime
    parent_id: str | None = None
    parent_lsn: str | None = None
    parent_timestamp: str | None = None
    endpoint_id: str | None = None
    default: bool = False


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def branch_json(p: Project, b: Branch) -> dict[str, Any]:
    shape: dict[str, Any] = {
        "id": b.id, "project_id": p.id, "name": b.name, "current_state": "ready", "state_changed_at": _ts(b.created),
        "creation_source": "console", "created_at": _ts(b.created), "updated_at": _ts(b.created), "default": b.default,
        "primary": b.default, "protected": False, "cpu_used_sec": 0, "active_time_seconds": 0,
        "compute_time_seconds": 0, "written_data_bytes": 0, "data_transfer_bytes": 0}
    for key in ("parent_id", "parent_lsn", "parent_timestamp"):
        if getattr(b, key):
            shape[key] = getattr(b, key)
    return shape


class History:
    """Branches made from a point of a database's history (the backing server must be archived)."""

    def __init__(self, admin_dsn: str, archiver: Archiver | None) -> None:
        self.admin_dsn, self.archiver = admin_dsn, archiver

    def _admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def oid(self, physical: str) -> int:
        with self._admin() as conn:
            row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (physical,)).fetchone()
        assert row is not None
        return int(row[0])

    def materialize(self, source: Branch, owner: str, physical: str, *, lsn: str | None,
                    timestamp: datetime | None) -> int:
        """Make database ``physical`` hold ``source`` at ``lsn``/``timestamp`` (neither: now); its OID."""
        if lsn is None and timestamp is None:
            with self._admin() as conn:
                acl = self._acl(conn, source.oid)
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                             (source.physical,))
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE {}").format(
                    sql.Identifier(physical), sql.Identifier(owner), sql.Identifier(source.physical)))
                self._set_acl(conn, physical, acl)
            return self.oid(physical)
        target = RecoveryTarget(lsn=lsn) if lsn is not None else RecoveryTarget(time=timestamp)
        try:
            self._recover(source.oid, owner, physical, target)
        except AgentpgError as exc:  # NotRestorable and the like: outside what the history holds
            raise Refused(400, f"the point is outside the branch's history: {exc.message}") from None
        return self.oid(physical)

    def _recover(self, oid: int, owner: str, physical: str, target: RecoveryTarget) -> None:
        archiver = self.archiver
        if archiver is None:
            raise Refused(400, "stand-in: this stand-in keeps no history (started without an archiver)")
        with self._admin() as conn:
            conf = {str(r[0]): str(r[1]) for r in conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(STANDBY_MINIMUMS),))}
            with conn.transaction():  # recovery stops at the first record after the point: make sure there is one
                conn.execute("SELECT pg_current_xact_id()")
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert row is not None
        archiver.wait_archived(parse_lsn(str(row[0])))
        backup = archiver.start_for(target)
        if backup is None:
            raise Refused(400, "the point is before the oldest history kept")
        links = chain(backup, {b.label: b for b in archiver.backups()})
        assert links is not None
        keep = {o for name, o in backup.databases.items() if name in ("template0", "template1", "postgres")} | {oid}
        wal = contiguous_from(segments(archiver.wal_dir, backup.seg_size), backup.start_segno)
        with SideInstance(archiver) as side:
            assert side.root is not None
            side.build(links, keep, wal, conf, target)
            side.recover(target)
            dsn = make_conninfo(archiver.admin_dsn, host="127.0.0.1", port=str(side.port), dbname="postgres")
            with psycopg.connect(dsn, autocommit=True) as recovered:
                found = recovered.execute("SELECT datname FROM pg_database WHERE oid = %s", (oid,)).fetchone()
                if found is None:
                    raise Refused(400, "the branch did not exist at that point")
                acl = self._acl(recovered, oid)
            dump = side.root / "dump"
            side.dump(str(found[0]), dump)
            with self._admin() as conn:
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
                    sql.Identifier(physical), sql.Identifier(owner)))
            archiver.run_tool([str(archiver.bin_dir / "pg_restore"), "--exit-on-error", "-d",
                               archiver.conninfo(dbname=physical), str(dump)], timeout=600, what="stand-in branch")
        with self._admin() as conn:
            self._set_acl(conn, physical, acl)

    @staticmethod
    def _acl(conn: psycopg.Connection[tuple[Any, ...]], oid: int) -> list[tuple[str | None, str]] | None:
        """The database's own privileges as (grantee or None for PUBLIC, privilege); None: the defaults."""
        row = conn.execute("SELECT datacl IS NULL FROM pg_database WHERE oid = %s", (oid,)).fetchone()
        if row is None or row[0]:
            return None
        return [(r[0], str(r[1])) for r in conn.execute(
            "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END, a.privilege_type "
            "FROM pg_database d, aclexplode(d.datacl) a WHERE d.oid = %s", (oid,))]

    @staticmethod
    def _set_acl(conn: psycopg.Connection[tuple[Any, ...]], physical: str, acl: list[tuple[str | None, str]] | None
                 ) -> None:
        if acl is None:
            return
        db = sql.Identifier(physical)
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
        for grantee, privilege in acl:
            conn.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}").format(
                sql.SQL(privilege), db, sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee)))

    def rename_away(self, physical: str, to: str) -> None:
        with self._admin() as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(physical)))
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (physical,))
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(physical), sql.Identifier(to)))

    def rename(self, physical: str, to: str) -> None:
        with self._admin() as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (physical,))
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(physical), sql.Identifier(to)))

    def drop(self, physical: str) -> None:
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(physical)))


def _slug(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}-{secrets.token_hex(3)}-{secrets.randbelow(10**8):08d}"


def _point(body: dict[str, Any], lsn_key: str, ts_key: str) -> tuple[str | None, datetime | None]:
    lsn, stamp = body.get(lsn_key), body.get(ts_key)
    if lsn is not None and stamp is not None:
        raise Refused(400, f"give {lsn_key} or {ts_key}, not both")
    if lsn is not None:
        try:
            parse_lsn(str(lsn))
        except ValueError:
            raise Refused(400, f"{lsn_key} is not an LSN") from None
        return str(lsn), None
    if stamp is None:
        return None, None
    try:
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        raise Refused(400, f"{ts_key} must be an ISO 8601 date-time") from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when > datetime.now(UTC):
        raise Refused(400, f"{ts_key} is in the future")
    return None, when


def install(app: FastAPI, stand: NeonStandIn, prefix: str) -> None:
    """Add the branch endpoints to the stand-in's app."""
    from neon_standin import Operation, _body, _locked, error

    def project_or_error(project_id: str) -> Project:
        project = stand._get(project_id)
        if project is None:
            raise Refused(404, "project not found")
        return project

    def operations(project: Project, branch: Branch, *actions: str) -> list[dict[str, Any]]:
        ready = time.monotonic() + stand.operation_delay_s
        ops = [Operation(str(uuid.uuid4()), action, datetime.now(UTC), ready) for action in actions]
        project.operations.extend(ops)
        return [{**stand._operation(project, op), "branch_id": branch.id} for op in ops]

    def answer(work: Any) -> Any:
        try:
            return work()
        except Refused as refused:
            return error(refused.status, refused.message) if refused.status != 423 else _locked()

    def endpoint(project: Project, branch: Branch) -> dict[str, Any]:
        return {**stand._endpoint(project), "id": branch.endpoint_id, "branch_id": branch.id}

    @app.get(prefix + "/projects/{project_id}/branches", response_model=None)
    def list_branches(project_id: str) -> Any:
        def work() -> Any:
            project = project_or_error(project_id)
            return {"branches": [branch_json(project, b) for b in list(project.branches.values())]}
        return answer(work)

    @app.post(prefix + "/projects/{project_id}/branches", status_code=201, response_model=None)
    async def create_branch(project_id: str, request: Request) -> Any:
        body = await _body(request)
        body = body if isinstance(body, dict) else {}
        spec = body.get("branch") or {}
        wants_endpoint = any(isinstance(e, dict) and e.get("type") == "read_write" for e in body.get("endpoints") or [])

        def work() -> Any:
            project = project_or_error(project_id)
            if project.busy():
                raise Refused(423, "locked")
            parent = project.branches.get(str(spec.get("parent_id") or project.branch_id))
            if parent is None:
                raise Refused(404, "parent branch not found")
            lsn, stamp = _point(spec, "parent_lsn", "parent_timestamp")
            if spec.get("name") and any(b.name == spec["name"] for b in project.branches.values()):
                raise Refused(409, "a branch with that name already exists")
            physical = f"{project.database}_b{secrets.token_hex(4)}"
            oid = stand.history.materialize(parent, project.role, physical, lsn=lsn, timestamp=stamp)
            branch = Branch(_slug("br-"), str(spec.get("name") or _slug("br-")), physical, oid, datetime.now(UTC),
                            parent_id=parent.id, parent_lsn=lsn, parent_timestamp=spec.get("parent_timestamp"),
                            endpoint_id=_slug("ep-") if wants_endpoint else None)
            project.branches[branch.id] = branch
            ops = operations(project, branch, "create_branch", *(("start_compute",) if wants_endpoint else ()))
            uris = [{"connection_uri": stand._uri(project).rsplit("/", 1)[0] + "/" + physical,
                     "connection_parameters": {"database": project.database, "role": project.role}}]
            return JSONResponse({"branch": branch_json(project, branch), "operations": ops,
                                 "endpoints": [endpoint(project, branch)] if wants_endpoint else [],
                                 "roles": [], "databases": [], "connection_uris": uris if wants_endpoint else []},
                                status_code=201)
        return await _run(work, answer)

    @app.get(prefix + "/projects/{project_id}/branches/{branch_id}", response_model=None)
    def get_branch(project_id: str, branch_id: str) -> Any:
        def work() -> Any:
            project = project_or_error(project_id)
            branch = project.branches.get(branch_id)
            if branch is None:
                raise Refused(404, "branch not found")
            return {"branch": branch_json(project, branch)}
        return answer(work)

    @app.delete(prefix + "/projects/{project_id}/branches/{branch_id}", response_model=None)
    def delete_branch(project_id: str, branch_id: str) -> Any:
        def work() -> Any:
            project = project_or_error(project_id)
            branch = project.branches.get(branch_id)
            if branch is None:
                raise Refused(404, "branch not found")
            if project.busy():
                raise Refused(423, "locked")
            if branch.default:
                raise Refused(422, "cannot delete the project's default branch")
            if any(b.parent_id == branch.id for b in project.branches.values()):
                raise Refused(422, "branch has children; delete them first")
            stand.history.drop(branch.physical)
            project.branches.pop(branch.id, None)
            return {"branch": branch_json(project, branch),
                    "operations": operations(project, branch, "delete_timeline")}
        return answer(work)

    @app.post(prefix + "/projects/{project_id}/branches/{branch_id}/restore", response_model=None)
    async def restore_branch(project_id: str, branch_id: str, request: Request) -> Any:
        body = await _body(request)
        body = body if isinstance(body, dict) else {}

        def work() -> Any:
            project = project_or_error(project_id)
            branch = project.branches.get(branch_id)
            source = project.branches.get(str(body.get("source_branch_id") or ""))
            if branch is None or source is None:
                raise Refused(404, "branch not found")
            lsn, stamp = _point(body, "source_lsn", "source_timestamp")
            children = [b for b in project.branches.values() if b.parent_id == branch.id]
            preserve = str(body.get("preserve_under_name") or "")
            if source is branch and lsn is None and stamp is None:
                raise Refused(400, "restoring a branch to its own history needs source_lsn or source_timestamp")
            if (source is branch or children) and not preserve:
                raise Refused(400, "preserve_under_name is required")
            if preserve and any(b.name == preserve for b in project.branches.values()):
                raise Refused(409, "a branch with that name already exists")
            if project.busy():
                raise Refused(423, "locked")
            fresh = f"{project.database}_b{secrets.token_hex(4)}"
            oid = stand.history.materialize(source, project.role, fresh, lsn=lsn, timestamp=stamp)
            if preserve:
                kept = Branch(_slug("br-"), preserve, f"{project.database}_b{secrets.token_hex(4)}", branch.oid,
                              datetime.now(UTC), parent_id=branch.parent_id)
                stand.history.rename_away(branch.physical, kept.physical)
                project.branches[kept.id] = kept
                for child in children:
                    child.parent_id = kept.id
            else:
                stand.history.drop(branch.physical)
            stand.history.rename(fresh, branch.physical)
            branch.oid = oid
            return {"branch": branch_json(project, branch),
                    "operations": operations(project, branch, "restore_branch", "apply_config", "restart_compute")}
        return await _run(work, answer)


async def _run(work: Any, answer: Any) -> Any:
    """Run the (blocking) work off the event loop, like FastAPI does for a sync endpoint."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(answer, work)
