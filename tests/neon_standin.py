"""A local stand-in for Neon's HTTP API v2: exactly the endpoints the Neon provider uses, real underneath.

Request and response shapes follow Neon's published OpenAPI v2 (``ProjectCreateRequest``, ``CreatedProject``,
``ProjectResponse``, ``ProjectsResponse`` + ``PaginationResponse``, ``OperationResponse``,
``ConnectionURIResponse``, ``BranchesResponse``, ``GeneralError`` = ``{"code", "message"}``), and so do the
statuses: 401 without the Bearer key, 404 for unknown ids, 423 Locked while a project still has running
operations, 429 with ``Retry-After`` when a fault is injected.

Each project is a real database on the test suite's PostgreSQL server, owned by a real role made like
Neon makes a project's owner (``LOGIN INHERIT CREATEROLE CREATEDB BYPASSRLS REPLICATION IN ROLE
neon_superuser``, with ``neon_superuser`` in ``pg_read_all_data`` and ``pg_write_all_data``), so the URIs it
returns really connect. What one server cannot imitate, and how it is bridged:

* Neon lets ``neon_superuser`` members create event triggers; vanilla Postgres only superusers. Tests run
  exactly that one statement as the superuser (see ``test_neon.py``), everything else as the project owner.
* Neon isolates projects physically; here they share a cluster, so names must not collide (409 if they do)
  and deleting a project drops its database and every role its owner created (those it holds ADMIN on).
* No TLS: the URIs carry no ``sslmode=require``. Consumption counters: storage is ``pg_database_size``,
  compute seconds are ``pg_stat_database.active_time``, active seconds the project's age; written and
  transfer bytes have no per-database source in Postgres and are set by tests (:meth:`NeonStandIn.set_usage`).
* A quota exceeded "suspends the compute": the database stops accepting connections until it is raised.
* Branches, point-in-time branches and Neon's branch restore are ``neon_branches.py``: each branch a database
  of its own, its history the backing server's archived WAL (when the stand-in is given an ``Archiver``).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import psycopg
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from neon_branches import Branch, History, branch_json, install
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from agentpg.providers.archive import Archiver
from agentpg.providers.base import DatabasePlan
from agentpg.providers.neon import EVENT_TRIGGER_SQL, NeonProvider

_WORDS = ("shiny", "winter", "bold", "floral", "spring", "quiet", "misty", "dawn", "cloud", "wind", "boat", "king")
_QUOTA_KEYS = ("active_time_seconds", "compute_time_seconds", "written_data_bytes", "data_transfer_bytes",
               "logical_size_bytes")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _slug(prefix: str = "") -> str:
    return f"{prefix}{secrets.choice(_WORDS)}-{secrets.choice(_WORDS)}-{secrets.randbelow(10**8):08d}"


def error(status: int, message: str, code: str = "", headers: dict[str, str] | None = None) -> JSONResponse:
    """Neon's ``GeneralError``."""
    return JSONResponse({"request_id": str(uuid.uuid4()), "code": code, "message": message}, status_code=status,
                        headers=headers)


@dataclass
class Fault:
    method: str | None
    path: re.Pattern[str]
    status: int
    remaining: int
    retry_after: str | None = None


@dataclass
class Operation:
    id: str
    action: str
    created: datetime
    ready_at: float

    def status(self) -> str:
        return "finished" if time.monotonic() >= self.ready_at else "running"


@dataclass
class Project:
    id: str
    name: str
    region_id: str
    pg_version: int
    database: str
    role: str
    password: str = field(repr=False)
    org_id: str | None
    created: datetime
    branch_id: str = field(default_factory=lambda: _slug("br-"))
    endpoint_id: str = field(default_factory=lambda: _slug("ep-"))
    operations: list[Operation] = field(default_factory=list)
    quota: dict[str, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    suspended: bool = False
    branches: dict[str, Branch] = field(default_factory=dict)
    history_retention_seconds: int = 86400

    def busy(self) -> bool:
        return any(op.status() != "finished" for op in self.operations)


class NeonStandIn:
    """The stand-in's state and its FastAPI app. ``faults``/``requests`` are for tests to steer and inspect."""

    def __init__(self, admin_dsn: str, api_key: str, *, operation_delay_s: float = 0.2,
                 archiver: Archiver | None = None) -> None:
        self.admin_dsn, self.api_key = admin_dsn, api_key
        self.operation_delay_s = operation_delay_s
        params = conninfo_to_dict(admin_dsn)
        self.host, self.port = str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)
        self.projects: dict[str, Project] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []
        self.passwords: list[str] = []
        """Every project owner password handed out: secrets agentpg's outputs must never contain."""
        self._lock = threading.RLock()
        self.history = History(admin_dsn, archiver)
        self.app = self._build()

    # -- test knobs ------------------------------------------------------------------------------------

    def inject(self, status: int, path: str = ".*", *, method: str | None = None, times: int = 1,
               retry_after: str | None = None) -> None:
        """The next ``times`` requests matching ``method`` and ``path`` (a regex on the path after /api/v2)
        answer ``status`` instead of being served."""
        with self._lock:
            self.faults.append(Fault(method, re.compile(path), status, times, retry_after))

    def set_usage(self, project_id: str, **counters: int) -> None:
        with self._lock:
            self.projects[project_id].usage.update(counters)

    def by_name(self, name: str) -> list[Project]:
        with self._lock:
            return [p for p in self.projects.values() if p.name == name]

    def calls(self, method: str, path: str) -> list[int]:
        """Statuses answered to requests matching ``method`` and the ``path`` regex, in order."""
        return [status for m, p, status in self.requests if m == method and re.fullmatch(path, p)]

    # -- the real databases ----------------------------------------------------------------------------

    def _admin(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.admin_dsn, autocommit=True)

    def _provision(self, project: Project) -> None:
        with self._admin() as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'neon_superuser'").fetchone() is None:
                with contextlib.suppress(psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                    conn.execute("CREATE ROLE neon_superuser CREATEDB CREATEROLE NOLOGIN REPLICATION BYPASSRLS "
                                 "IN ROLE pg_read_all_data, pg_write_all_data")
            verifier = conn.pgconn.encrypt_password(project.password.encode(), project.role.encode(),
                                                    b"scram-sha-256").decode()
            conn.execute(sql.SQL("CREATE ROLE {} WITH LOGIN INHERIT CREATEROLE CREATEDB BYPASSRLS REPLICATION "
                                 "PASSWORD {} IN ROLE neon_superuser").format(sql.Identifier(project.role),
                                                                            sql.Literal(verifier)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(project.database),
                                                                      sql.Identifier(project.role)))

    def _destroy(self, project: Project) -> None:
        for branch in project.branches.values():
            self.history.drop(branch.physical)
        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(project.database)))
            made = [r[0] for r in conn.execute(
                "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
                "JOIN pg_roles o ON o.oid = m.member WHERE o.rolname = %s AND m.admin_option", (project.role,))]
            for role in [*made, project.role]:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))

    def _counters(self, project: Project) -> dict[str, int]:
        with self._admin() as conn:
            row = conn.execute("SELECT pg_database_size(d.datname), coalesce(s.active_time, 0) FROM pg_database d "
                               "LEFT JOIN pg_stat_database s ON s.datid = d.oid WHERE d.datname = %s",
                               (project.database,)).fetchone()
        size, active_ms = (int(row[0]), float(row[1])) if row else (0, 0.0)
        counters = {"synthetic_storage_size": size, "compute_time_seconds": int(active_ms / 1000),
                    "active_time_seconds": int((_now() - project.created).total_seconds()),
                    "written_data_bytes": 0, "data_transfer_bytes": 0, "data_storage_bytes_hour": 0,
                    "logical_size": size}
        counters.update(project.usage)
        return counters

    def _enforce_quota(self, project: Project, counters: dict[str, int]) -> None:
        """Over any quota, the compute is suspended: the database refuses connections (and drops its own)."""
        over = any(project.quota.get(k) and counters.get("logical_size" if k == "logical_size_bytes" else k, 0)
                   >= project.quota[k] for k in _QUOTA_KEYS)
        if over == project.suspended:
            return
        db = sql.Identifier(project.database)
        with self._admin() as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(db, sql.SQL(str(not over))))
            if over:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                             (project.database,))
        project.suspended = over

    # -- JSON shapes (OpenAPI v2) ----------------------------------------------------------------------

    def _uri(self, project: Project) -> str:
        return (f"postgresql://{quote(project.role, safe='')}:{quote(project.password, safe='')}@{self.host}:"
                f"{self.port}/{quote(project.database, safe='')}")

    def _list_item(self, p: Project) -> dict[str, Any]:
        return {"id": p.id, "platform_id": "aws", "region_id": p.region_id, "name": p.name,
                "provisioner": "k8s-neonvm", "pg_version": p.pg_version, "proxy_host": self.host,
                "branch_logical_size_limit": 0, "branch_logical_size_limit_bytes": 0, "store_passwords": True,
                "active_time": 0, "cpu_used_sec": 0, "creation_source": "console", "created_at": _ts(p.created),
                "updated_at": _ts(p.created), "owner_id": "stand-in", "settings": {"quota": dict(p.quota)},
                **({"org_id": p.org_id} if p.org_id else {})}

    def _project(self, p: Project) -> dict[str, Any]:
        counters = self._counters(p)
        self._enforce_quota(p, counters)
        start = _now().replace(day=1, hour=0, minute=0, second=0)
        end = (start + timedelta(days=32)).replace(day=1)
        return {**self._list_item(p), "history_retention_seconds": p.history_retention_seconds,
                "consumption_period_start": _ts(start), "consumption_period_end": _ts(end),
                **{k: v for k, v in counters.items() if k != "logical_size"}}

    def _operation(self, p: Project, op: Operation) -> dict[str, Any]:
        return {"id": op.id, "project_id": p.id, "branch_id": p.branch_id, "endpoint_id": p.endpoint_id,
                "action": op.action, "status": op.status(), "failures_count": 0, "created_at": _ts(op.created),
                "updated_at": _ts(_now()), "total_duration_ms": int(self.operation_delay_s * 1000)}

    def _branch(self, p: Project) -> dict[str, Any]:
        return branch_json(p, p.branches[p.branch_id])

    def _endpoint(self, p: Project) -> dict[str, Any]:
        return {"host": self.host, "id": p.endpoint_id, "project_id": p.id, "branch_id": p.branch_id,
                "region_id": p.region_id, "autoscaling_limit_min_cu": 0.25, "autoscaling_limit_max_cu": 0.25,
                "type": "read_write", "current_state": "idle" if p.suspended else "active", "pooler_enabled": False,
                "pooler_mode": "transaction", "disabled": False, "passwordless_access": True,
                "creation_source": "console", "created_at": _ts(p.created), "updated_at": _ts(p.created),
                "settings": {}, "proxy_host": self.host, "suspend_timeout_seconds": 0, "provisioner": "k8s-neonvm"}

    # -- the HTTP API ----------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="Neon API v2 stand-in", openapi_url=None, docs_url=None, redoc_url=None)
        prefix = "/api/v2"

        @app.middleware("http")
        async def gate(request: Request, call_next: Any) -> Response:
            path = request.url.path.removeprefix(prefix)
            response: Response
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                response = error(401, "authentication required")
            else:
                response = self._fault(request.method, path) or await call_next(request)
            with self._lock:
                self.requests.append((request.method, path, response.status_code))
            return response

        @app.post(prefix + "/projects", status_code=201, response_model=None)
        async def create_project(request: Request) -> dict[str, Any] | JSONResponse:
            body = await _body(request)
            spec = body.get("project") if isinstance(body, dict) else None
            if not isinstance(spec, dict):
                return error(400, "request body must be an object with a 'project' object")
            branch = spec.get("branch") or {}
            database = str(branch.get("database_name") or "neondb")
            role = str(branch.get("role_name") or f"{database}_owner")
            version = spec.get("pg_version", 17)
            if not isinstance(version, int) or not 14 <= version <= 18:
                return error(400, "pg_version must be one of 14, 15, 16, 17, 18")
            project = Project(id=_slug(), name=str(spec.get("name") or ""), database=database, role=role,
                              region_id=str(spec.get("region_id") or "aws-us-east-2"), pg_version=version,
                              password=secrets.token_urlsafe(24), org_id=spec.get("org_id"), created=_now())
            project.name = project.name or project.id
            with self._admin() as conn:
                taken = conn.execute("SELECT EXISTS (SELECT FROM pg_database WHERE datname = %s) OR EXISTS "
                                     "(SELECT FROM pg_roles WHERE rolname = %s)", (database, role)).fetchone()
            if taken and taken[0]:
                return error(409, "stand-in: that database or role name is taken in the shared test cluster")
            retention = spec.get("history_retention_seconds", 86400)
            if not isinstance(retention, int) or not 0 <= retention <= 2592000:
                return error(400, "history_retention_seconds must be between 0 and 2592000")
            project.history_retention_seconds = retention
            self._provision(project)
            project.branches[project.branch_id] = Branch(project.branch_id, "main", database,
                                                         self.history.oid(database), project.created,
                                                         endpoint_id=project.endpoint_id, default=True)
            ready = time.monotonic() + self.operation_delay_s
            project.operations = [Operation(str(uuid.uuid4()), action, project.created, ready)
                                  for action in ("create_timeline", "start_compute")]
            with self._lock:
                self.projects[project.id] = project
                self.passwords.append(project.password)
            params = {"database": database, "password": project.password, "role": role, "host": self.host,
                      "pooler_host": self.host}
            return {"project": self._project(project),
                    "connection_uris": [{"connection_uri": self._uri(project), "connection_parameters": params}],
                    "roles": [{"branch_id": project.branch_id, "name": role, "password": project.password,
                               "protected": False, "created_at": _ts(project.created),
                               "updated_at": _ts(project.created)}],
                    "databases": [{"id": 1, "branch_id": project.branch_id, "name": database, "owner_name": role,
                                   "created_at": _ts(project.created), "updated_at": _ts(project.created)}],
                    "operations": [self._operation(project, op) for op in project.operations],
                    "branch": self._branch(project), "endpoints": [self._endpoint(project)]}

        @app.get(prefix + "/projects", response_model=None)
        def list_projects(cursor: str | None = None, limit: int = 10, search: str | None = None,
                          org_id: str | None = None) -> Response | dict[str, Any]:
            if not 1 <= limit <= 400:
                return error(400, "limit must be between 1 and 400")
            with self._lock:
                items = list(self.projects.values())
            if search:
                items = [p for p in items if search in p.name or search in p.id]
            if cursor:
                ids = [p.id for p in items]
                items = items[ids.index(cursor) + 1:] if cursor in ids else []
            page = items[:limit]
            return {"projects": [self._list_item(p) for p in page],
                    "pagination": {"cursor": page[-1].id if page else (cursor or "")},
                    "applications": {}, "integrations": {}}

        @app.get(prefix + "/projects/{project_id}", response_model=None)
        def get_project(project_id: str) -> dict[str, Any] | JSONResponse:
            project = self._get(project_id)
            return error(404, "project not found") if project is None else {"project": self._project(project)}

        @app.patch(prefix + "/projects/{project_id}", response_model=None)
        async def update_project(project_id: str, request: Request) -> dict[str, Any] | JSONResponse:
            project = self._get(project_id)
            if project is None:
                return error(404, "project not found")
            if project.busy():
                return _locked()
            body = await _body(request)
            spec = body.get("project") if isinstance(body, dict) else None
            if not isinstance(spec, dict):
                return error(400, "request body must be an object with a 'project' object")
            quota = (spec.get("settings") or {}).get("quota")
            if quota is not None:
                if not isinstance(quota, dict) or any(k not in _QUOTA_KEYS or not isinstance(v, int) or v < 0
                                                      for k, v in quota.items()):
                    return error(400, "settings.quota takes non-negative integers for " + ", ".join(_QUOTA_KEYS))
                project.quota = {k: v for k, v in quota.items() if v}
            if spec.get("name"):
                project.name = str(spec["name"])
            return {"project": self._project(project), "operations": []}

        @app.delete(prefix + "/projects/{project_id}", response_model=None)
        def delete_project(project_id: str) -> dict[str, Any] | JSONResponse:
            project = self._get(project_id)
            if project is None:
                return error(404, "project not found")
            if project.busy():
                return _locked()
            shape = self._list_item(project)
            self._destroy(project)
            with self._lock:
                self.projects.pop(project_id, None)
            return {"project": shape}

        @app.get(prefix + "/projects/{project_id}/operations", response_model=None)
        def list_operations(project_id: str, limit: int = 10, cursor: str | None = None) -> Any:
            project = self._get(project_id)
            if project is None:
                return error(404, "project not found")
            ops = [self._operation(project, op) for op in project.operations][:limit]
            return {"operations": ops, "pagination": {"cursor": ops[-1]["id"] if ops else ""}}

        @app.get(prefix + "/projects/{project_id}/operations/{operation_id}", response_model=None)
        def get_operation(project_id: str, operation_id: str) -> Any:
            project = self._get(project_id)
            op = next((o for o in project.operations if o.id == operation_id), None) if project else None
            return error(404, "operation not found") if op is None or project is None \
                else {"operation": self._operation(project, op)}

        install(app, self, prefix)

        @app.get(prefix + "/projects/{project_id}/connection_uri", response_model=None)
        def connection_uri(project_id: str, database_name: str, role_name: str, branch_id: str | None = None,
                           pooled: bool = False) -> Any:
            project = self._get(project_id)
            if project is None:
                return error(404, "project not found")
            if database_name != project.database or role_name != project.role:
                return error(404, "no stored password for that role and database")  # SQL-made roles have none
            branch = project.branches.get(branch_id or project.branch_id)
            if branch is None or branch.endpoint_id is None:
                return error(404 if branch is None else 400, "no such branch" if branch is None
                             else "the branch has no endpoint")
            return {"uri": self._uri(project).rsplit("/", 1)[0] + "/" + quote(branch.physical, safe="")}

        return app

    def _get(self, project_id: str) -> Project | None:
        with self._lock:
            return self.projects.get(project_id)

    def _fault(self, method: str, path: str) -> JSONResponse | None:
        with self._lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.method in (None, method) and fault.path.fullmatch(path):
                    fault.remaining -= 1
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                    if fault.status == 423:
                        return _locked()
                    message = "too many requests" if fault.status == 429 else "injected failure"
                    return error(fault.status, message, headers=headers)
        return None

    def cleanup(self) -> None:
        """Drop every project still there (the shared server must end as it began)."""
        with self._lock:
            projects = list(self.projects.values())
            self.projects.clear()
        for project in projects:
            self._destroy(project)


def _locked() -> JSONResponse:
    return error(423, "project already has running operations, scheduling of new ones is prohibited")


async def _body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


class StandInServer:
    """Runs a :class:`NeonStandIn` with uvicorn on a free loopback port, in a thread of the test process."""

    def __init__(self, standin: NeonStandIn) -> None:
        self.standin = standin
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/api/v2"
        config = uvicorn.Config(standin.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="neon-standin", daemon=True)

    def start(self) -> StandInServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the Neon stand-in did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


class EmulatedNeon(NeonProvider):
    """The real provider; only the event trigger (a ``neon_superuser`` right on Neon) is made as superuser."""

    def __init__(self, superuser_dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._superuser_dsn = superuser_dsn

    def _install_event_trigger(self, conn: Any, plan: DatabasePlan) -> None:
        with psycopg.connect(self._superuser_dsn, dbname=plan.database, autocommit=True) as su:
            su.execute(EVENT_TRIGGER_SQL)
