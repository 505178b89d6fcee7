"""Repair what crashes left behind: finish or undo abandoned operations, find unowned databases and roles."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

from agentpg.catalog.models import (
    Operation,
    RestoredCopy,
    UserGlobalDatabase,
    WarmDatabase,
    Workspace,
    WorkspaceAgentDatabase,
)
from agentpg.errors import AgentpgError
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.lifecycle.undo import undo_restore
from agentpg.lifecycle.users import finish_delete_user, plan_of, undo_register
from agentpg.lifecycle.warm import discard
from agentpg.lifecycle.workspaces import finish_delete_workspace, undo_create_workspace


@dataclass
class ReconcileReport:
    """What ``reconcile`` found and did. Only names, never secrets."""

    finished: list[str] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    orphan_databases: list[str] = field(default_factory=list)
    orphan_roles: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    refreshed: int = 0
    """Databases whose tenant SQL was re-installed (``upgrade``)."""
    tenant_code: list[str] = field(default_factory=list)
    """Routines tenants defined in a shared database before it was locked down (``upgrade``): a human looks."""

    @property
    def clean(self) -> bool:
        leftover = set(self.orphan_databases + self.orphan_roles) - set(self.dropped)
        return not self.failed and not leftover


def _settle(deps: LifecycleDeps, op: Operation) -> str:
    """Finish a deletion, undo a creation. Returns which of the two happened."""
    if op.kind == "register_user":
        undo_register(deps, op.id, reason=op.error or "abandoned: the process stopped mid-registration")
        return "undone"
    if op.kind == "create_workspace":
        undo_create_workspace(deps, op.id, reason=op.error or "abandoned: the process stopped mid-creation")
        return "undone"
    if op.kind == "delete_user":
        finish_delete_user(deps, op.id)
        return "finished"
    if op.kind == "delete_workspace":
        finish_delete_workspace(deps, op.id)
        return "finished"
    if op.kind == "restore":  # before the swap: the copy is dropped; once it began: the swap is finished
        swapping = op.plan.get("step") == "replacing"
        undo_restore(deps, op.id, reason=op.error or "abandoned: the process stopped mid-restore")
        return "finished" if swapping else "undone"
    raise AgentpgError(f"unknown operation kind {op.kind!r}")


def refresh_tenant_sql(deps: LifecycleDeps, report: ReconcileReport) -> None:
    """Give every platform database today's tenant SQL (rules added since it was made included)."""
    with deps.sessions() as s:
        records: list[UserGlobalDatabase | WorkspaceAgentDatabase] = [
            *s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.ownership_type == "platform",
                                                        UserGlobalDatabase.status == "ready")),
            *s.scalars(select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.ownership_type == "platform",
                                                            WorkspaceAgentDatabase.status == "ready")),
        ]
        plans = [plan_of(rec) for rec in records]
    for plan in plans:
        try:
            found = deps.provider.refresh_tenant_sql(plan)
        except AgentpgError as exc:
            report.failed.append(f"refresh {plan.database}: {exc.message}")
            continue
        report.refreshed += 1
        report.tenant_code.extend(f"{plan.database}: {routine}" for routine in found)


def reconcile(deps: LifecycleDeps, *, fix: bool = False, upgrade: bool = False) -> ReconcileReport:
    """Settle every abandoned operation, then compare the provider's inventory with the catalog.

    An operation whose advisory lock another process holds is in flight and left alone. Creations are
    undone (the caller was never told they succeeded), deletions are finished (the caller asked for them).
    With ``fix``, databases and roles that no record or pending operation owns are dropped. With ``upgrade``,
    every platform database gets today's tenant SQL first (:func:`refresh_tenant_sql`).
    """
    report = ReconcileReport()
    if upgrade:
        refresh_tenant_sql(deps, report)
    with deps.sessions() as s:
        pending = list(s.scalars(select(Operation).where(Operation.state == "pending").order_by(Operation.created_at)))
    for op in pending:
        with deps.operation_lease(op.id) as lease:
            if not lease.acquired:
                report.in_flight.append(op.id)
                continue
            try:
                outcome = _settle(deps, op)
            except AgentpgError as exc:
                report.failed.append(f"{op.kind} {op.id}: {exc.message}")
                continue
            with deps.sessions() as s:
                state = s.get_one(Operation, op.id).state
            where = f"user {op.user_id}" + (f", workspace {op.workspace_id}" if op.workspace_id else "")
            label = f"{op.kind} {op.id} ({where})"
            if state == "pending":
                report.failed.append(f"{label}: still pending")
            else:
                (report.finished if outcome == "finished" else report.undone).append(label)

    with deps.sessions() as s:
        refills = list(s.scalars(select(WarmDatabase.id).where(WarmDatabase.state.in_(("creating", "dropping")))))
    for row_id in refills:  # a refill or trim whose process died: drop what it may have made or left
        with deps.operation_lease(row_id) as lease:
            if lease.acquired:
                try:
                    discard(deps, row_id)
                    report.undone.append(f"warm pool refill {row_id}")
                except AgentpgError as exc:
                    report.failed.append(f"warm pool refill {row_id}: {exc.message}")

    inventory = deps.provider.inventory()  # read before the catalog: anything created later has an intent row
    owned_dbs: set[str] = set()
    owned_roles: set[str] = set()
    with deps.sessions() as s:
        records: list[UserGlobalDatabase | WorkspaceAgentDatabase] = [
            *s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.ownership_type == "platform")),
            *s.scalars(select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.ownership_type == "platform")),
        ]
        for rec in records:
            owned_dbs.add(rec.database_name)
            owned_roles.update(r for r in (rec.owner_role, rec.login_role) if r)
        owned_roles.update(r for r in s.scalars(select(Workspace.agent_role)) if r)
        owned_dbs.update(s.scalars(select(RestoredCopy.database_name)))
        for warm_db in s.scalars(select(WarmDatabase)):
            owned_dbs.add(warm_db.database_name)
            owned_roles.update((warm_db.owner_role, warm_db.login_role))
        for op in s.scalars(select(Operation).where(Operation.state == "pending")):
            for value in op.plan.values():
                if isinstance(value, dict):
                    owned_dbs.add(value.get("database", ""))
                    owned_roles.update((value.get("owner_role", ""), value.get("login_role", "")))
                elif isinstance(value, str):
                    owned_roles.add(value)
                elif isinstance(value, list):
                    for item in value:
                        if isinstance(item, dict):
                            owned_dbs.add(item.get("database", ""))
                            owned_roles.update((item.get("owner_role", ""), item.get("login_role", "")))
                        elif isinstance(item, str):
                            owned_roles.add(item)
    report.orphan_databases = sorted(inventory.databases - owned_dbs)
    report.orphan_roles = sorted(inventory.roles - owned_roles)
    if fix:
        for db in report.orphan_databases:
            deps.provider.drop_orphan(database=db)
            report.dropped.append(db)
        for role in report.orphan_roles:
            deps.provider.drop_orphan(role=role)
            report.dropped.append(role)
    return report
