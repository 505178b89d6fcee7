"""Creating and deleting workspaces: the agent database's whole life, and the agent's role in the global one."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agentpg.catalog.models import (
    AgentGlobalDbPermissions,
    Operation,
    User,
    UserGlobalDatabase,
    Workspace,
    WorkspaceAgentDatabase,
)
from agentpg.errors import AgentpgError, Conflict, InvalidInput, NotFound
from agentpg.lifecycle import workspace_ids
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.lifecycle.users import AGENT_DB_URL, _describe, _put_managed_env, plan_of, provision
from agentpg.lifecycle.warm import claim
from agentpg.providers.base import NAME_PREFIX, AgentPermissions, DatabasePlan, new_password, opaque_name

log = logging.getLogger(__name__)


def permissions_of(row: AgentGlobalDbPermissions | None) -> AgentPermissions:
    if row is None:
        return AgentPermissions()
    return AgentPermissions(row.can_read, row.can_write, row.can_create_tables, row.can_drop_tables,
                            tuple(row.allowed_tables) if row.allowed_tables is not None else None)


def create_workspace(deps: LifecycleDeps, user_id: str, workspace_id: str, name: str | None = None) -> None:
    """Create the workspace, its agent database, and its own LOGIN role in the user's global database."""
    validate_id(user_id, "user id")
    validate_id(workspace_id, "workspace id")
    if name is not None and (not isinstance(name, str) or len(name) > 200 or "\x00" in name):
        raise InvalidInput("workspace name must be text of at most 200 characters")
    plan = DatabasePlan.fresh(deps.provider.place())
    agent_role = f"{opaque_name()}_agent"
    op_id = str(uuid.uuid4())
    with deps.operation_lease(op_id):
        try:
            with deps.sessions.begin() as s:
                user = s.get(User, user_id, with_for_update={"read": True})
                if user is None:
                    raise NotFound(f"user {user_id!r} does not exist")
                if user.status != "active":
                    raise Conflict(f"user {user_id!r} is {user.status}; workspaces can be added once it is active")
                glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)).one()
                global_plan = plan_of(glob).to_json() if glob.ownership_type == "platform" else None
                workspace_ids.lock_public_id(s, workspace_id)  # ids are per user: see workspace_ids
                workspace_id = workspace_ids.internal_id_for_new(s, user_id, workspace_id)
                s.add(Workspace(id=workspace_id, user_id=user_id, name=name, status="provisioning",
                                agent_role=agent_role if global_plan else None))
                s.flush()
                warm = claim(s, deps.provider.name)
                if warm is not None:
                    plan = warm
                s.add(WorkspaceAgentDatabase(workspace_id=workspace_id, user_id=user_id,
                                             database_name=plan.database, owner_role=plan.owner_role,
                                             login_role=plan.login_role, provider=deps.provider.name,
                                             provider_server=plan.server, status="provisioning"))
                s.add(AgentGlobalDbPermissions(workspace_id=workspace_id, user_id=user_id))
                s.add(Operation(id=op_id, kind="create_workspace", user_id=user_id, workspace_id=workspace_id,
                                plan={"agent": plan.to_json(), "global": global_plan, "warm": warm is not None,
                                      "agent_role": agent_role if global_plan else None}))
        except IntegrityError:
            raise Conflict(f"workspace {workspace_ids.public_id(workspace_id)!r} already exists") from None
        deps.reached("create_workspace:intent")
        try:
            provisioned = provision(deps, plan, warm is not None)
            deps.reached("create_workspace:agent_db")
            global_uri = None
            if global_plan is not None:
                global_uri = deps.provider.create_agent_role(DatabasePlan.from_json(global_plan), agent_role,
                                                             new_password(), AgentPermissions())
            with deps.sessions.begin() as s:
                ws = s.get_one(Workspace, workspace_id)
                record = s.scalars(select(WorkspaceAgentDatabase)
                                   .where(WorkspaceAgentDatabase.workspace_id == workspace_id)).one()
                record.connection_uri_sealed = deps.seal(provisioned.uri, "workspace_agent_database", record.id,
                                                         "connection_uri")
                record.provider_server = provisioned.server
                record.provider_project_id = provisioned.project_id
                record.provider_branch_id = provisioned.branch_id
                record.status = "ready"
                if global_uri is not None:
                    ws.global_uri_sealed = deps.seal(global_uri, "workspaces", ws.id, "global_uri")
                _put_managed_env(deps, s, user_id, workspace_id, AGENT_DB_URL, provisioned.uri)
                ws.status = "active"
                s.get_one(Operation, op_id).state = "done"
        except Exception as exc:
            undo_create_workspace(deps, op_id, reason=exc)
            raise


def undo_create_workspace(deps: LifecycleDeps, op_id: str, reason: BaseException | str) -> None:
    """Take a workspace creation back; like :func:`~agentpg.lifecycle.users.undo_register`."""
    with deps.sessions.begin() as s:
        op = s.get_one(Operation, op_id)
        plan = op.plan
        ws = s.get(Workspace, op.workspace_id) if op.workspace_id else None
        if ws is not None and ws.status == "provisioning":
            s.delete(ws)
        op.error = _describe(reason)
    try:
        if plan.get("global") and plan.get("agent_role"):
            deps.provider.drop_agent_role(DatabasePlan.from_json(plan["global"]), plan["agent_role"])
        deps.provider.drop_database(DatabasePlan.from_json(plan["agent"]))
    except AgentpgError as exc:
        log.warning("workspace creation undone in the catalog; its database is left for reconcile: %s",
                    exc.message)
        return
    with deps.sessions.begin() as s:
        s.get_one(Operation, op_id).state = "undone"


def delete_workspace(deps: LifecycleDeps, workspace_id: str, *, user_id: str | None = None) -> None:
    """Drop the workspace's agent database and its role in the global database, then its records.

    ``workspace_id`` is the platform's (public) id. ``user_id``, when given, scopes the lookup: another
    user's workspace is "not found"; without it, an id two users share is a ``Conflict`` (see workspace_ids).
    """
    validate_id(workspace_id, "workspace id")
    op_id = str(uuid.uuid4())
    with deps.operation_lease(op_id):
        with deps.sessions.begin() as s:
            ws = workspace_ids.find(s, workspace_id, user_id, for_update=True)
            if ws is None:
                raise NotFound(f"workspace {workspace_id!r} does not exist")
            if ws.status == "provisioning":
                raise Conflict(f"workspace {workspace_id!r} is still being created; try again in a moment")
            workspace_id = ws.id  # the catalog's id from here on
            ws.status = "deleting"
            glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == ws.user_id)).one()
            arec = s.scalars(select(WorkspaceAgentDatabase)
                             .where(WorkspaceAgentDatabase.workspace_id == workspace_id)).one_or_none()
            drop = None
            if arec is not None:
                arec.status = "deleting"
                if arec.ownership_type == "platform":
                    drop = plan_of(arec).to_json()
            global_plan = plan_of(glob).to_json() if glob.ownership_type == "platform" else None
            s.add(Operation(id=op_id, kind="delete_workspace", user_id=ws.user_id, workspace_id=workspace_id,
                            plan={"agent": drop, "global": global_plan, "agent_role": ws.agent_role}))
        deps.reached("delete_workspace:intent")
        finish_delete_workspace(deps, op_id)


def finish_delete_workspace(deps: LifecycleDeps, op_id: str) -> None:
    """The idempotent second half of a workspace deletion."""
    with deps.sessions() as s:
        op = s.get_one(Operation, op_id)
        plan, workspace_id = op.plan, op.workspace_id
    role = plan.get("agent_role")
    if plan.get("global") and role and role.startswith(NAME_PREFIX):
        deps.provider.drop_agent_role(DatabasePlan.from_json(plan["global"]), role)
    if plan.get("agent"):
        deps.provider.drop_database(DatabasePlan.from_json(plan["agent"]))
    with deps.sessions.begin() as s:
        ws = s.get(Workspace, workspace_id)
        if ws is not None:
            s.delete(ws)
        s.get_one(Operation, op_id).state = "done"
