"""MCP server configs: validation, storage (the whole JSON sealed), the built-in defaults, resolution.

A config is ``{command, args, env}`` for a stdio MCP server. ``${NAME}`` in ``args`` and ``env`` values names
one of the user's env vars; it is resolved only when agentpg spawns the server, never shown resolved:

- ``GLOBAL_DB_URL`` → the **calling workspace's own role** in the user's global database (so the agent's
  permissions hold; the owner's URI would bypass them). A bring-your-own global database has no per-agent
  roles: its own URI.
- ``AGENT_DB_URL`` → the calling workspace's agent database.
- any other name → the user's own (sealed) env var of that name.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agentpg.catalog.models import EnvVar, McpServerConfig, User, new_id, utcnow
from agentpg.errors import Conflict, InvalidInput, NotFound
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.lifecycle.users import AGENT_DB_URL, GLOBAL_DB_URL

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
HIDDEN = "<hidden>"

BUILTIN: dict[str, str] = {
    "postgres-global": "agentpg's own MCP server (in-process); use database \"global\"",
    "postgres-agent": "agentpg's own MCP server (in-process); use database \"agent\"",
}
"""The default config set: names every user has unless they PUT their own config of that name."""

#: env names a config may not set: they would change how the child finds or loads code.
_FORBIDDEN_ENV = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONSTARTUP", "NODE_OPTIONS"})


class McpServerSpec(BaseModel):
    """``PUT /api/users/{id}/mcp-servers/{name}``: a stdio MCP server."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1, max_length=64,
                         description="A command from the operator's allow-list (default npx, uvx, node, python).")
    args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=64,
        description="Arguments; may contain ${NAME} placeholders (shown as written, resolved only at spawn).")
    env: dict[str, Annotated[str, Field(max_length=16384)]] = Field(
        default_factory=dict, max_length=64,
        description="Extra environment of the child; values may contain ${NAME} placeholders.")


class McpServerInfo(BaseModel):
    """One config as the platform sees it: placeholders as written, never resolved. Env values that are
    not made only of placeholders are write-only (``<hidden>``): they may be secrets the user typed."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["stdio", "builtin"]
    command: str | None
    args: list[str]
    env: dict[str, str]
    placeholders: list[str]
    description: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class McpServerList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[McpServerInfo]


@dataclass(frozen=True)
class GatewayTarget:
    """What the gateway runs for one (workspace, name): resolved values — secrets, never to be shown."""

    workspace_id: str
    user_id: str
    name: str
    builtin: bool
    command: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    secrets: dict[str, str] = field(default_factory=dict)
    """placeholder name → resolved value, for the scrubber."""

    @property
    def fingerprint(self) -> str:
        """Changes when the resolved config changes (the running child is then replaced)."""
        blob = json.dumps([self.builtin, self.command, self.args, self.env], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput("an MCP server name is 1 to 64 of a-z 0-9 . _ - and starts with a letter or digit")
    return name


def placeholders(spec: McpServerSpec) -> list[str]:
    names: list[str] = []
    for text in [*spec.args, *spec.env.values()]:
        for found in PLACEHOLDER.findall(text):
            if found not in names:
                names.append(found)
    return names


def validate_spec(spec: McpServerSpec, allowed_commands: Iterable[str], known: set[str]) -> None:
    allowed = list(allowed_commands)
    if spec.command not in allowed:
        raise InvalidInput(f"command {spec.command!r} is not allowed; the operator allows: {', '.join(allowed)} "
                           "(AGENTPG_GATEWAY_ALLOWED_COMMANDS)")
    if PLACEHOLDER.search(spec.command) or "/" in spec.command:
        raise InvalidInput("the command is a bare name from the allow-list, without placeholders or a path")
    for text in [*spec.args, *spec.env.keys(), *spec.env.values()]:
        if "\x00" in text:
            raise InvalidInput("args and env may not contain NUL bytes")
    for key in spec.env:
        if not _ENV_NAME.fullmatch(key):
            raise InvalidInput(f"env name {key[:40]!r} is not a valid variable name")
        if key in _FORBIDDEN_ENV or key.startswith("AGENTPG_"):
            raise InvalidInput(f"env name {key} may not be set for a gateway server")
        if PLACEHOLDER.search(key):
            raise InvalidInput("env names may not contain placeholders")
    for name in placeholders(spec):
        if not _VAR_NAME.fullmatch(name):
            raise InvalidInput(f"placeholder ${{{name[:40]}}} is not a variable name (A-Z 0-9 _)")
        if name not in known:
            raise InvalidInput(f"placeholder ${{{name}}} names no env var of this user; known: "
                               f"{', '.join(sorted(known))}")


def _user_var_names(deps: LifecycleDeps, user_id: str) -> set[str]:
    with deps.sessions() as s:
        names = set(s.scalars(select(EnvVar.name).where(EnvVar.user_id == user_id, EnvVar.workspace_id.is_(None))))
    return names | {GLOBAL_DB_URL, AGENT_DB_URL}


def _active_user(deps: LifecycleDeps, user_id: str) -> None:
    validate_id(user_id, "user id")
    with deps.sessions() as s:
        user = s.get(User, user_id)
        if user is None or user.status != "active":
            raise NotFound(f"user {user_id!r} does not exist")


def _open(deps: LifecycleDeps, row: McpServerConfig) -> McpServerSpec:
    return McpServerSpec.model_validate_json(deps.open(row.config_sealed, "mcp_servers", row.id, "config"))


def _only_placeholders(value: str) -> bool:
    return bool(value) and PLACEHOLDER.sub("", value) == ""


def _info(name: str, spec: McpServerSpec, row: McpServerConfig) -> McpServerInfo:
    env = {k: (v if _only_placeholders(v) else HIDDEN) for k, v in spec.env.items()}
    return McpServerInfo(name=name, kind="stdio", command=spec.command, args=list(spec.args), env=env,
                         placeholders=placeholders(spec), created_at=row.created_at, updated_at=row.updated_at)


def _builtin_info(name: str) -> McpServerInfo:
    return McpServerInfo(name=name, kind="builtin", command=None, args=[], env={}, placeholders=[],
                         description=BUILTIN[name])


def list_configs(deps: LifecycleDeps, user_id: str) -> McpServerList:
    _active_user(deps, user_id)
    with deps.sessions() as s:
        rows = list(s.scalars(select(McpServerConfig).where(McpServerConfig.user_id == user_id)
                              .order_by(McpServerConfig.name)))
    items = {row.name: _info(row.name, _open(deps, row), row) for row in rows}
    for name in BUILTIN:
        items.setdefault(name, _builtin_info(name))
    return McpServerList(items=[items[k] for k in sorted(items)])


def put_config(deps: LifecycleDeps, user_id: str, name: str, spec: McpServerSpec,
               allowed_commands: Iterable[str]) -> tuple[McpServerInfo, bool]:
    validate_name(name)
    _active_user(deps, user_id)
    validate_spec(spec, allowed_commands, _user_var_names(deps, user_id))
    plaintext = spec.model_dump_json()
    for _attempt in range(2):
        try:
            with deps.sessions.begin() as s:
                row = s.scalars(select(McpServerConfig).where(McpServerConfig.user_id == user_id,
                                                              McpServerConfig.name == name)
                                .with_for_update()).one_or_none()
                created = row is None
                if row is None:
                    row_id = new_id()
                    row = McpServerConfig(id=row_id, user_id=user_id, name=name, created_at=utcnow(),
                                          config_sealed=deps.seal(plaintext, "mcp_servers", row_id, "config"))
                    s.add(row)
                else:
                    row.config_sealed = deps.seal(plaintext, "mcp_servers", row.id, "config")
                    row.updated_at = utcnow()
                s.flush()
                return _info(name, spec, row), created
        except IntegrityError:
            continue
    raise Conflict(f"MCP server {name} is being written concurrently; try again")


def delete_config(deps: LifecycleDeps, user_id: str, name: str) -> None:
    validate_name(name)
    _active_user(deps, user_id)
    with deps.sessions.begin() as s:
        row = s.scalars(select(McpServerConfig).where(McpServerConfig.user_id == user_id,
                                                      McpServerConfig.name == name)).one_or_none()
        if row is None:
            if name in BUILTIN:
                raise Conflict(f"{name} is a built-in default; PUT a config of that name to replace it")
            raise NotFound(f"MCP server {name!r} does not exist")
        s.delete(row)


def resolve(deps: LifecycleDeps, user_id: str, workspace_id: str, name: str,
            agent_uri: Callable[[str], str]) -> GatewayTarget:
    """The resolved config ``name`` of ``user_id`` for ``workspace_id``. ``agent_uri("global"|"agent")`` is the
    workspace's own URI. NotFound for a name this user has no config of (another user's is not visible)."""
    validate_name(name)
    with deps.sessions() as s:
        row = s.scalars(select(McpServerConfig).where(McpServerConfig.user_id == user_id,
                                                      McpServerConfig.name == name)).one_or_none()
        spec = _open(deps, row) if row is not None else None
    if spec is None:
        if name in BUILTIN:
            return GatewayTarget(workspace_id=workspace_id, user_id=user_id, name=name, builtin=True)
        raise NotFound(f"MCP server {name!r} is not configured for your user")
    secrets: dict[str, str] = {}
    for var in placeholders(spec):
        if var == GLOBAL_DB_URL:
            secrets[var] = agent_uri("global")
        elif var == AGENT_DB_URL:
            secrets[var] = agent_uri("agent")
        else:
            with deps.sessions() as s:
                env = s.scalars(select(EnvVar).where(EnvVar.user_id == user_id, EnvVar.workspace_id.is_(None),
                                                     EnvVar.name == var)).one_or_none()
                if env is None:
                    raise InvalidInput(f"MCP server {name} uses ${{{var}}}, which is no longer set for your user")
                secrets[var] = deps.open(env.value_sealed, "env_vars", env.id, "value")

    def sub(text: str) -> str:
        return PLACEHOLDER.sub(lambda m: secrets[m.group(1)], text)

    return GatewayTarget(workspace_id=workspace_id, user_id=user_id, name=name, builtin=False,
                         command=spec.command, args=tuple(sub(a) for a in spec.args),
                         env=tuple(sorted((k, sub(v)) for k, v in spec.env.items())), secrets=secrets)
