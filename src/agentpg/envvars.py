"""A user's environment variables: names visible, values sealed, the managed ones untouchable.

Values are sealed with the key ring, bound to their row (associated data ``env_vars/<row id>/value``), and
are never returned by anything here: the platform writes them and reads only the names. ``GLOBAL_DB_URL``
and ``AGENT_DB_URL`` hold tenant connection URIs; agentpg alone writes them (on registration and workspace
creation), so they are listed by name and refused for writing or deleting here.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agentpg.catalog.models import EnvVar, User, new_id, utcnow
from agentpg.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from agentpg.lifecycle import workspace_ids
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.lifecycle.users import AGENT_DB_URL, GLOBAL_DB_URL

NAME_PATTERN = r"[A-Z_][A-Z0-9_]{0,127}"
"""What an environment variable name may be: upper-case letters, digits and ``_``, not starting with a digit."""
_NAME = re.compile(NAME_PATTERN)
MANAGED_NAMES = frozenset({GLOBAL_DB_URL, AGENT_DB_URL})
MAX_VALUE_CHARS = 65_536


class EnvVarInfo(BaseModel):
    """One variable as the platform may see it: its name, never its value."""

    model_config = ConfigDict(extra="forbid")

    name: str
    managed: bool
    """Written by agentpg (a database URI); cannot be read, written or deleted through the API."""
    workspace_id: str | None
    """Null for the user's own variables; the workspace for a workspace's (``AGENT_DB_URL``)."""
    created_at: datetime
    updated_at: datetime | None


class EnvVarList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[EnvVarInfo]


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput("an environment variable name is 1 to 128 of A-Z 0-9 _ and does not start with a digit")
    if name in MANAGED_NAMES:
        raise PermissionDenied(f"{name} is managed by agentpg (it holds a database URI): it cannot be read, "
                               "written or deleted through the API")
    return name


def _validate_value(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS or "\x00" in value:
        raise InvalidInput(f"an environment variable value is text of at most {MAX_VALUE_CHARS} characters "
                           "without NUL bytes")
    return value


def _info(var: EnvVar) -> EnvVarInfo:
    return EnvVarInfo(name=var.name, managed=var.managed,
                      workspace_id=workspace_ids.public_id(var.workspace_id) if var.workspace_id else None,
                      created_at=var.created_at, updated_at=var.updated_at)


def _active_user(s: Session, user_id: str) -> None:
    validate_id(user_id, "user id")
    user = s.get(User, user_id)
    if user is None or user.status != "active":
        raise NotFound(f"user {user_id!r} does not exist")


def list_env(deps: LifecycleDeps, user_id: str) -> EnvVarList:
    """The user's variables and its workspaces', by (workspace, name): names and flags only."""
    with deps.sessions() as s:
        _active_user(s, user_id)
        rows = s.scalars(select(EnvVar).where(EnvVar.user_id == user_id)
                         .order_by(EnvVar.workspace_id.is_not(None), EnvVar.workspace_id, EnvVar.name))
        return EnvVarList(items=[_info(v) for v in rows])


def put_env(deps: LifecycleDeps, user_id: str, name: str, value: str) -> tuple[EnvVarInfo, bool]:
    """Create or replace one of the user's own variables; returns it and whether it was created."""
    validate_name(name)
    _validate_value(value)
    for _attempt in range(2):  # a concurrent PUT of the same new name makes one insert fail: retry as update
        try:
            with deps.sessions.begin() as s:
                _active_user(s, user_id)
                var = s.scalars(select(EnvVar).where(EnvVar.user_id == user_id, EnvVar.workspace_id.is_(None),
                                                     EnvVar.name == name).with_for_update()).one_or_none()
                created = var is None
                if var is None:
                    var_id = new_id()
                    var = EnvVar(id=var_id, user_id=user_id, workspace_id=None, name=name, managed=False,
                                 value_sealed=deps.seal(value, "env_vars", var_id, "value"))
                    s.add(var)
                else:
                    var.value_sealed = deps.seal(value, "env_vars", var.id, "value")
                    var.updated_at = utcnow()
                s.flush()
                return _info(var), created
        except IntegrityError:
            continue
    raise Conflict(f"{name} is being written concurrently; try again")


def delete_env(deps: LifecycleDeps, user_id: str, name: str) -> None:
    validate_name(name)
    with deps.sessions.begin() as s:
        _active_user(s, user_id)
        var = s.scalars(select(EnvVar).where(EnvVar.user_id == user_id, EnvVar.workspace_id.is_(None),
                                             EnvVar.name == name)).one_or_none()
        if var is None:
            raise NotFound(f"environment variable {name} does not exist")
        s.delete(var)
