"""Neon projects through Neon's API, for :class:`~.neon.NeonProvider`: finding a database's project by name,
creating it (safely retried: a POST whose outcome is unknown is followed by a look before another), waiting for
its operations, and asking for its admin URI and default branch.

Kept apart from ``neon.py`` so that module holds the provider contract (its project cache, SQL inside a project,
grants, quotas, undo) while this one holds the bookkeeping of projects as requests to Neon's API (the HTTP client
itself is ``neon_api.py``). The admin URIs it returns are secrets: they are never logged or put in errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agentpg.errors import ProviderError, ProviderUnavailable
from agentpg.providers.base import DatabasePlan
from agentpg.providers.neon_api import AmbiguousRequest, NeonApi

_TERMINAL_OK = frozenset({"finished", "skipped"})


def admin_role_of(plan: DatabasePlan) -> str:
    """The Neon project owner role agentpg asks for: the provider's admin inside the project."""
    return f"{plan.database}_admin"


@dataclass
class NeonProject:
    """What the provider remembers of one database's project; URI and branch are fetched when first needed."""

    project_id: str
    admin_uri: str | None = field(default=None, repr=False)
    branch_id: str | None = None

    @property
    def uri(self) -> str:
        assert self.admin_uri is not None
        return self.admin_uri


class NeonProjects:
    """The project requests of one :class:`~.neon_api.NeonApi` client (in ``org_id`` when given).

    Every method raises ProviderError when Neon refuses or answers without what was asked, and
    ProviderUnavailable when Neon cannot be reached, keeps failing, or an operation outlasts
    ``operation_timeout_s``."""

    def __init__(self, api: NeonApi, *, org_id: str | None, page_size: int, operation_timeout_s: float) -> None:
        self.api, self.org_id = api, org_id
        self.page_size = max(1, min(page_size, 400))
        self.operation_timeout_s = operation_timeout_s

    def list_all(self, search: str | None, what: str) -> list[dict[str, Any]]:
        """Every project ``GET /projects`` lists for ``search``, following the pagination cursor."""
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(10_000):
            params: dict[str, str | int] = {"limit": self.page_size}
            if search:
                params["search"] = search
            if cursor:
                params["cursor"] = cursor
            if self.org_id:
                params["org_id"] = self.org_id
            body = self.api.request("GET", "/projects", params=params, what=what) or {}
            page = [p for p in body.get("projects") or [] if isinstance(p, dict)]
            found.extend(page)
            following = (body.get("pagination") or {}).get("cursor")
            if len(page) < self.page_size or not following or following == cursor:
                break
            cursor = str(following)
        return found

    def find_all(self, database: str) -> list[dict[str, Any]]:
        """The projects named exactly ``database``, oldest first (normally one)."""
        projects = [p for p in self.list_all(database, f"finding the Neon project of database {database}")
                    if p.get("name") == database and p.get("id")]
        return sorted(projects, key=lambda p: str(p.get("created_at") or ""))

    def admin_uri(self, plan: DatabasePlan, project_id: str) -> str:
        body = self.api.request(
            "GET", f"/projects/{project_id}/connection_uri",
            params={"database_name": plan.database, "role_name": admin_role_of(plan)},
            what=f"reading the admin connection of database {plan.database}") or {}
        uri = body.get("uri")
        if not isinstance(uri, str) or "://" not in uri:
            raise ProviderError(f"the Neon API gave no connection URI for database {plan.database}")
        return uri

    def default_branch(self, plan: DatabasePlan, project_id: str) -> str | None:
        body = self.api.request("GET", f"/projects/{project_id}/branches",
                                what=f"reading the branches of database {plan.database}") or {}
        for branch in body.get("branches") or []:
            if isinstance(branch, dict) and branch.get("default"):
                return str(branch.get("id"))
        return None

    def wait(self, plan: DatabasePlan, project_id: str, operations: list[dict[str, Any]]) -> None:
        """Poll until every operation is finished (or skipped); Neon says: connect only after that."""
        pending = {str(op["id"]) for op in operations
                   if isinstance(op, dict) and op.get("id") and op.get("status") not in _TERMINAL_OK}
        deadline = time.monotonic() + self.operation_timeout_s
        interval, last = 0.1, ""
        while pending:
            for op_id in sorted(pending):
                body = self.api.request("GET", f"/projects/{project_id}/operations/{op_id}",
                                        what=f"waiting for the Neon project of database {plan.database}") or {}
                op = body.get("operation") or {}
                status = str(op.get("status") or "")
                if status in _TERMINAL_OK:
                    pending.discard(op_id)
                elif status in ("cancelled", "cancelling"):
                    raise ProviderError(f"Neon cancelled operation {op.get('action') or op_id} of database "
                                        f"{plan.database}")
                elif status in ("failed", "error"):  # not terminal: Neon retries failed operations itself
                    last = f"; its {op.get('action') or 'operation'} has failed {op.get('failures_count', 1)} time(s)"
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ProviderUnavailable(f"the Neon project of database {plan.database} was not ready after "
                                          f"{self.operation_timeout_s:.0f} s{last}")
            time.sleep(interval)
            interval = min(interval * 1.5, 2.0)

    def create(self, plan: DatabasePlan, *, region_id: str, pg_version: int,
               history_retention_s: int | None) -> NeonProject:
        """Find the project of ``plan`` or create it; return it once its operations have finished."""
        what = f"creating the Neon project of database {plan.database}"
        body: dict[str, Any] | None = None
        for _ in range(3):
            existing = self.find_all(plan.database)
            if existing:
                project_id = str(existing[0]["id"])
                ops = self.api.request("GET", f"/projects/{project_id}/operations", params={"limit": 50},
                                       what=what) or {}
                self.wait(plan, project_id, list(ops.get("operations") or []))
                return NeonProject(project_id, self.admin_uri(plan, project_id),
                                   self.default_branch(plan, project_id))
            request: dict[str, Any] = {
                "name": plan.database, "region_id": region_id, "pg_version": pg_version,
                "store_passwords": True,
                "branch": {"name": "main", "database_name": plan.database, "role_name": admin_role_of(plan)}}
            if history_retention_s is not None:
                request["history_retention_seconds"] = history_retention_s
            if self.org_id:
                request["org_id"] = self.org_id
            try:
                body = self.api.request("POST", "/projects", json={"project": request}, what=what,
                                        idempotent=False)
                break
            except AmbiguousRequest:
                continue  # it may exist now: look again before another POST
        if body is None:
            raise ProviderUnavailable(f"{what}: the Neon API kept failing; giving up for now")
        project = body.get("project") or {}
        project_id = str(project.get("id") or "")
        if not project_id:
            raise ProviderError(f"{what}: the Neon API answered without a project id")
        self.wait(plan, project_id, list(body.get("operations") or []))
        admin_uri = next((str(c["connection_uri"]) for c in body.get("connection_uris") or []
                          if isinstance(c, dict) and c.get("connection_uri")
                          and (c.get("connection_parameters") or {}).get("role") == admin_role_of(plan)), None)
        branch_id = (body.get("branch") or {}).get("id")
        return NeonProject(project_id, admin_uri or self.admin_uri(plan, project_id),
                           str(branch_id) if branch_id else None)
