"""Registering and deleting users: the global database's whole life."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import Row, Select, bindparam, select, text
from sqlalchemy.exc import IntegrityError

from agentpg.catalog.engine import read_engine, read_sessions
from agentpg.catalog.models import (
    EnvVar,
    Operation,
    RestoredCopy,
    User,
    UserGlobalDatabase,
    Workspace,
    WorkspaceAgentDatabase,
)
from agentpg.errors import AgentpgError, Conflict, InvalidInput, NotFound
from agentpg.lifecycle.deps import LifecycleDeps, validate_email, validate_id
from agentpg.lifecycle.warm import claim_with_password
from agentpg.providers.base import DatabasePlan, Provisioned, new_password

log = logging.getLogger(__name__)

GLOBAL_DB_URL = "GLOBAL_DB_URL"
AGENT_DB_URL = "AGENT_DB_URL"


def _check_byo_uri(uri: str) -> str:
    """Validate a bring-your-own database URI by parsing and connecting; return its database name."""
    if not isinstance(uri, str) or not uri.startswith(("postgres://", "postgresql://")) or len(uri) > 2048:
        raise InvalidInput("database_url must be a postgresql:// URI of at most 2048 characters")
    try:
        params = conninfo_to_dict(uri)
    except psycopg.ProgrammingError:
        raise InvalidInput("database_url is not a valid PostgreSQL connection URI") from None
    try:
        with psycopg.connect(uri, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        raise InvalidInput("the database at database_url could not be reached with the credentials given") from None
    return str(params.get("dbname") or "postgres")


def register_user(deps: LifecycleDeps, user_id: str, email: str | None = None,
                  database_url: str | None = None) -> None:
    """Create the user and its global database, or fail whole leaving nothing behind.

    ``database_url`` registers a bring-your-own global database (ownership ``user``): recorded sealed,
    never created or dropped by agentpg.
    """
    validate_id(user_id, "user id")
    validate_email(email)
    if database_url is not None:
        _register_byo(deps, user_id, email, _check_byo_uri(database_url), database_url)
        return
    plan = DatabasePlan.fresh(deps.provider.place())
    op_id, record_id = str(uuid.uuid4()), str(uuid.uuid4())
    password = new_password()
    with deps.operation_lease(op_id) as lease:
        try:
            with lease.transaction() as s:
                user = User(id=user_id, email=email, status="provisioning")
                s.add(user)
                s.flush()
                claimed = claim_with_password(s, deps.provider.name)
                warm = claimed[0] if claimed is not None else None
                ready = claimed is not None and claimed[1] is not None
                record = UserGlobalDatabase(id=record_id, user_id=user_id, provider=deps.provider.name,
                                            status="provisioning")
                if claimed is not None:
                    # A claimed database's URI is known now: seal it in this same transaction. With the password
                    # it was made with (sealed in its warm row) nothing is left to do on the server, so this one
                    # commit registers the user (issue 22: a claim is one catalog commit); without, one UPDATE
                    # marks everything ready after the new password is set.
                    plan = claimed[0]
                    if claimed[1] is not None:
                        password = claimed[1].opened(deps)
                    uri = deps.provider.login_uri(plan, password)
                    record.connection_uri_sealed = deps.seal(uri, "user_global_database", record_id,
                                                             "connection_uri")
                    _put_managed_env(deps, s, user_id, None, GLOBAL_DB_URL, uri)
                record.database_name, record.owner_role, record.login_role, record.provider_server = (
                    plan.database, plan.owner_role, plan.login_role, plan.server)
                if ready:
                    user.status, record.status = "active", "ready"
                s.add(record)
                s.add(Operation(id=op_id, kind="register_user", user_id=user_id, state="done" if ready else "pending",
                                plan={"global": plan.to_json(), "warm": warm is not None}))
        except IntegrityError:
            raise Conflict(f"user {user_id!r} already exists") from None
        deps.reached("register_user:intent")
        if ready:
            if deps.on_claim is not None:
                deps.on_claim()
            return
        try:
            if warm is not None:
                if deps.on_claim is not None:
                    deps.on_claim()
                deps.provider.set_login_password(plan, password)
                deps.reached("register_user:provisioned")
            else:
                provisioned = deps.provider.create_database(plan, password)
                deps.reached("register_user:provisioned")
                with lease.transaction() as s:
                    rec = s.get_one(UserGlobalDatabase, record_id)
                    rec.connection_uri_sealed = deps.seal(provisioned.uri, "user_global_database", record_id,
                                                          "connection_uri")
                    rec.provider_server = provisioned.server
                    rec.provider_project_id = provisioned.project_id
                    rec.provider_branch_id = provisioned.branch_id
                    _put_managed_env(deps, s, user_id, None, GLOBAL_DB_URL, provisioned.uri)
            lease.connection.execute(_MARK_REGISTERED, {"user_id": user_id, "op_id": op_id})
            lease.connection.commit()
        except Exception as exc:
            undo_register(deps, op_id, reason=exc)
            raise


# One statement, one round trip: the user active, its database ready, the operation done, atomically.
_MARK_REGISTERED = text("""
    WITH u AS (UPDATE users SET status = 'active', updated_at = now() WHERE id = :user_id),
         d AS (UPDATE user_global_database SET status = 'ready', updated_at = now() WHERE user_id = :user_id)
    UPDATE operations SET state = 'done', updated_at = now() WHERE id = :op_id
""")


def find_user(deps: LifecycleDeps, user_id: str) -> tuple[User, UserGlobalDatabase | None] | None:
    """The user (any status, ``provisioning`` included: the caller decides) and its global database record,
    read in one autocommit statement (one snapshot, one round trip); ``None`` when there is no such user.
    The objects are detached: read them, do not change them. Raises ``CatalogUnavailable``."""
    with read_sessions(deps.engine)() as s:
        row = s.execute(select(User, UserGlobalDatabase)
                        .outerjoin(UserGlobalDatabase, UserGlobalDatabase.user_id == User.id)
                        .where(User.id == user_id)).one_or_none()
    return None if row is None else (row[0], row[1])


def read_user(deps: LifecycleDeps, user_id: str) -> Row[Any] | None:
    """The user's public fields and its global database's, as plain values in one row: ``id, email, status,
    created_at, database_name, database_status, ownership_type, provider, database_created_at,
    current_period_cost_cents`` (the database's all null when it has no record); ``None`` when there is no
    such user. One autocommit statement, as :func:`find_user`, but a Core read of ten columns: building the
    two ORM objects is most of that read's cost (~0.7 ms of CPU against ~0.3 here). Raises
    ``CatalogUnavailable``."""
    with read_engine(deps.engine).connect() as conn:
        return conn.execute(_READ_USER, {"user_id": user_id}).one_or_none()


def _read_user_query() -> Select[Any]:
    user, db = User.__table__.c, UserGlobalDatabase.__table__.c
    return (select(user.id, user.email, user.status, user.created_at, db.database_name,
                   db.status.label("database_status"), db.ownership_type, db.provider,
                   db.created_at.label("database_created_at"), db.current_period_cost_cents)
            .select_from(User.__table__.outerjoin(UserGlobalDatabase.__table__, db.user_id == user.id))
            .where(user.id == bindparam("user_id")))


# A constant statement (no state): building it costs ~0.1 ms, as much as the rest of the read's Python.
_READ_USER = _read_user_query()


def list_users(deps: LifecycleDeps, *, limit: int, after: str | None = None
               ) -> list[tuple[User, UserGlobalDatabase | None]]:
    """Up to ``limit`` registered users (``provisioning`` ones left out) with id greater than ``after``, by
    id, each with its global database record: one autocommit statement (was one more per user). Detached
    objects, as :func:`find_user`'s."""
    query = (select(User, UserGlobalDatabase)
             .outerjoin(UserGlobalDatabase, UserGlobalDatabase.user_id == User.id)
             .where(User.status != "provisioning").order_by(User.id).limit(limit))
    if after:
        query = query.where(User.id > after)
    with read_sessions(deps.engine)() as s:
        return [(u, rec) for u, rec in s.execute(query)]


def provision(deps: LifecycleDeps, plan: DatabasePlan, claimed_warm: bool) -> Provisioned:
    """Make the database of ``plan`` usable: a claimed warm one only needs a fresh password."""
    if claimed_warm:
        if deps.on_claim is not None:
            deps.on_claim()
        return deps.provider.set_login_password(plan, new_password())
    return deps.provider.create_database(plan, new_password())


def _register_byo(deps: LifecycleDeps, user_id: str, email: str | None, dbname: str, uri: str) -> None:
    try:
        with deps.sessions.begin() as s:
            s.add(User(id=user_id, email=email, status="active"))
            s.flush()
            record = UserGlobalDatabase(user_id=user_id, database_name=dbname, ownership_type="user",
                                        provider="external", status="ready")
            s.add(record)
            s.flush()
            record.connection_uri_sealed = deps.seal(uri, "user_global_database", record.id, "connection_uri")
            _put_managed_env(deps, s, user_id, None, GLOBAL_DB_URL, uri)
    except IntegrityError:
        raise Conflict(f"user {user_id!r} already exists") from None


def _put_managed_env(deps: LifecycleDeps, s: Any, user_id: str, workspace_id: str | None, name: str,
                     value: str) -> None:
    var_id = str(uuid.uuid4())  # known before the INSERT, so the value is sealed to its row in one step
    s.add(EnvVar(id=var_id, user_id=user_id, workspace_id=workspace_id, name=name, managed=True,
                 value_sealed=deps.seal(value, "env_vars", var_id, "value")))


def undo_register(deps: LifecycleDeps, op_id: str, reason: BaseException | str) -> None:
    """Take a registration back: drop what the provider may have made, then the catalog rows.

    If the provider cannot be reached, the operation stays pending (with the error) for ``reconcile``;
    the catalog rows go anyway, so the user is never half-registered.
    """
    with deps.sessions.begin() as s:
        op = s.get_one(Operation, op_id)
        plan = DatabasePlan.from_json(op.plan["global"])
        user_id = op.user_id
        user = s.get(User, user_id)
        if user is not None and user.status == "provisioning":
            s.delete(user)
        op.error = _describe(reason)
    try:
        deps.provider.drop_database(plan)
    except AgentpgError as exc:
        log.warning("registration of %s undone in the catalog; database %s left for reconcile: %s",
                    user_id, plan.database, exc.message)
        return
    with deps.sessions.begin() as s:
        s.get_one(Operation, op_id).state = "undone"


def _describe(reason: BaseException | str) -> str:
    if isinstance(reason, AgentpgError):
        return reason.message
    if isinstance(reason, BaseException):
        return type(reason).__name__
    return reason


def delete_user(deps: LifecycleDeps, user_id: str, *, rebase_backups: bool = False) -> bool:
    """Drop the user's global database and every agent database of every workspace, then the records.
    ``rebase_backups``: once the databases are dropped, ask for a rebase of the archived servers' backups
    (providers/rebase.py; part of the saga: a deletion finished by ``reconcile`` asks too). Returns whether one
    was asked for (False: nothing is archived here)."""
    validate_id(user_id, "user id")
    op_id = str(uuid.uuid4())
    with deps.operation_lease(op_id):
        with deps.sessions.begin() as s:
            user = s.get(User, user_id, with_for_update=True)
            if user is None:
                raise NotFound(f"user {user_id!r} does not exist")
            if user.status == "provisioning":
                raise Conflict(f"user {user_id!r} is still being registered; try again in a moment")
            user.status = "deleting"
            plan = {**deletion_plan(s, user_id), "rebase_backups": rebase_backups}
            for rec in s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)):
                rec.status = "deleting"
            for arec in s.scalars(select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.user_id == user_id)):
                arec.status = "deleting"
            s.add(Operation(id=op_id, kind="delete_user", user_id=user_id, plan=plan))
        deps.reached("delete_user:intent")
        return finish_delete_user(deps, op_id)


def deletion_plan(s: Any, user_id: str) -> dict[str, Any]:
    """Everything platform-owned that deleting this user must drop: databases and agent roles."""
    drops: list[dict[str, str | None]] = []
    roles: list[str] = []
    global_plan: dict[str, str | None] | None = None
    glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)).one_or_none()
    if glob is not None and glob.ownership_type == "platform" and glob.owner_role and glob.login_role:
        global_plan = plan_of(glob).to_json()
        drops.append(plan_of(glob).to_json())
    for ws in s.scalars(select(Workspace).where(Workspace.user_id == user_id)):
        if ws.agent_role:
            roles.append(ws.agent_role)
    for arec in s.scalars(select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.user_id == user_id)):
        if arec.ownership_type == "platform" and arec.owner_role and arec.login_role:
            drops.append(plan_of(arec).to_json())
    for copy in s.scalars(select(RestoredCopy).where(RestoredCopy.user_id == user_id)):  # restored "as new"
        name = copy.database_name
        drops.append(DatabasePlan(name, f"{name}_owner", f"{name}_login", copy.provider_server).to_json())
    return {"global": global_plan, "drop": drops, "agent_roles": roles}


def plan_of(record: UserGlobalDatabase | WorkspaceAgentDatabase) -> DatabasePlan:
    assert record.owner_role is not None and record.login_role is not None
    return DatabasePlan(record.database_name, record.owner_role, record.login_role, record.provider_server)


def finish_delete_user(deps: LifecycleDeps, op_id: str) -> bool:
    """The idempotent second half of a user deletion; ``reconcile`` calls it for an interrupted one. Returns
    whether a rebase of the backups was asked for."""
    with deps.sessions() as s:
        op = s.get_one(Operation, op_id)
        plan, user_id = op.plan, op.user_id
    global_plan = DatabasePlan.from_json(plan["global"]) if plan.get("global") else None
    for role in plan.get("agent_roles", []):
        if global_plan is not None:
            deps.provider.drop_agent_role(global_plan, role)
    for index, item in enumerate(plan.get("drop", [])):
        deps.provider.drop_database(DatabasePlan.from_json(item))
        if index == 0:
            deps.reached("delete_user:first_drop")
    # After the drops (a backup started before them would still hold the data), before "done" (a crash in
    # between: reconcile asks again; a second request is served by the same rebase).
    rebased = bool(plan.get("rebase_backups")) and bool(deps.provider.request_backup_rebase(f"deletion {op_id}"))
    with deps.sessions.begin() as s:
        user = s.get(User, user_id)
        if user is not None:
            s.delete(user)
        s.get_one(Operation, op_id).state = "done"
    return rebased
