"""MCP server configs: validation against the operator's catalog, storage (sealed whole), the built-in
defaults, resolution.

A config is ``{"server": <catalog entry>, "params": {NAME: value}}``: the user picks one of the servers the
operator approved (:mod:`.catalog`) and fills in only the params that entry declares, each matching the
entry's pattern. The user sends no command, argument or environment variable. The entry's ``${NAME}``
placeholders are resolved only when agentpg spawns the server, never shown resolved:

- ``GLOBAL_DB_URL`` → the **calling workspace's own role** in the user's global database (so the agent's
  permissions hold; the owner's URI would bypass them). A bring-your-own global database has no per-agent
  roles: its own URI.
- ``AGENT_DB_URL`` → the calling workspace's agent database.
- ``PARAM`` → the value of the user's param (validated again at every resolution: the catalog may change).

A config stored in the form of earlier versions (``command``/``args``/``env``) is kept but never run: a call
to it is refused with a message saying how to convert it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agentpg.catalog.models import McpServerConfig, User, new_id, utcnow
from agentpg.errors import Conflict, InvalidInput, NotFound
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.service.gateway_catalog import (
    AGENT_DB_URL,
    ENTRY_PATTERN,
    GLOBAL_DB_URL,
    PLACEHOLDER,
    Catalog,
    CatalogEntry,
    EntryLimits,
)

__all__ = ["Catalog", "GatewayTarget", "McpServerInfo", "McpServerList", "McpServerSpec"]

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
HIDDEN = "<hidden>"
_MAX_PARAM = 4096

BUILTIN: dict[str, str] = {
    "postgres-global": "agentpg's own MCP server (in-process); use database \"global\"",
    "postgres-agent": "agentpg's own MCP server (in-process); use database \"agent\"",
}
"""The default config set: names every user has unless they PUT their own config of that name."""


class McpServerSpec(BaseModel):
    """``PUT /api/users/{id}/mcp-servers/{name}``: one of the operator's catalog entries and its params."""

    model_config = ConfigDict(extra="forbid")

    server: str = Field(min_length=1, max_length=64, pattern=ENTRY_PATTERN,
                        description="The name of an entry of the operator's catalog (AGENTPG_GATEWAY_CATALOG).")
    params: dict[str, Annotated[str, Field(max_length=_MAX_PARAM)]] = Field(
        default_factory=dict, max_length=32,
        description="A value for each param the entry declares, matching its pattern; nothing else.")


class McpServerInfo(BaseModel):
    """One config as the platform sees it: secret params are write-only (``<hidden>``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["catalog", "builtin", "refused"]
    """``refused``: stored in the old command form, or its entry left the catalog; calls to it are refused."""
    server: str | None = None
    params: dict[str, str] = Field(default_factory=dict)
    description: str | None = None
    error: str | None = None
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
    server: str = ""
    command: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    read_only_paths: tuple[str, ...] = ()
    limits: EntryLimits = field(default_factory=EntryLimits)
    secrets: dict[str, str] = field(default_factory=dict)
    """placeholder name → resolved value, for the scrubber."""

    @property
    def fingerprint(self) -> str:
        """Changes when the resolved config changes (the running child is then replaced)."""
        blob = json.dumps([self.builtin, self.command, self.args, self.env, self.read_only_paths,
                           self.limits.model_dump()], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput("an MCP server name is 1 to 64 of a-z 0-9 . _ - and starts with a letter or digit")
    return name


def _entry(catalog: Catalog, server: str) -> CatalogEntry:
    entry = catalog.get(server)
    if entry is None:
        available = ", ".join(catalog.names()) or "none (the operator has not set AGENTPG_GATEWAY_CATALOG)"
        raise InvalidInput(f"server {server[:64]!r} is not in the operator's catalog; available: {available}")
    return entry


def validate_spec(spec: McpServerSpec, catalog: Catalog) -> CatalogEntry:
    """The entry ``spec`` names, once every param is declared by it and matches its pattern."""
    entry = _entry(catalog, spec.server)
    declared = ", ".join(sorted(entry.params)) or "none"
    for key, value in spec.params.items():
        param = entry.params.get(key)
        if param is None:
            raise InvalidInput(f"param {key[:64]!r} is not declared by catalog entry {spec.server}; its params: "
                               f"{declared}")
        if "\x00" in value or "${" in value:
            raise InvalidInput(f"param {key} may not contain NUL bytes or '${{'")
        if value.startswith("-"):
            raise InvalidInput(f"param {key} may not start with '-' (the server would read it as an option)")
        if not re.fullmatch(param.pattern, value):
            shown = "" if param.secret else f" {value[:40]!r}"
            raise InvalidInput(f"param {key}{shown} does not match the pattern of catalog entry {spec.server}: "
                               f"{param.pattern}")
    missing = sorted(set(entry.params) - set(spec.params))
    if missing:
        raise InvalidInput(f"catalog entry {spec.server} needs params {', '.join(missing)}")
    return entry


def _active_user(deps: LifecycleDeps, user_id: str) -> None:
    validate_id(user_id, "user id")
    with deps.sessions() as s:
        user = s.get(User, user_id)
        if user is None or user.status != "active":
            raise NotFound(f"user {user_id!r} does not exist")


_LEGACY = ("stored in the old form (command/args/env), which the gateway no longer runs: users pick a server "
           "from the operator's catalog now; PUT it again as {\"server\": ..., \"params\": {...}}")


def _open(deps: LifecycleDeps, row: McpServerConfig) -> McpServerSpec | None:
    """The stored spec; ``None`` for a config stored in the old ``command``/``args``/``env`` form."""
    raw: Any = json.loads(deps.open(row.config_sealed, "mcp_servers", row.id, "config"))
    if not isinstance(raw, dict) or "server" not in raw:
        return None
    return McpServerSpec.model_validate(raw)


def _info(name: str, spec: McpServerSpec | None, row: McpServerConfig, catalog: Catalog) -> McpServerInfo:
    if spec is None:
        return McpServerInfo(name=name, kind="refused", error=f"MCP server {name} is {_LEGACY}",
                             created_at=row.created_at, updated_at=row.updated_at)
    entry = catalog.get(spec.server)
    params = {k: (HIDDEN if entry is None or k not in entry.params or entry.params[k].secret else v)
              for k, v in spec.params.items()}
    error: str | None = None
    try:
        validate_spec(spec, catalog)
    except InvalidInput as exc:
        error = exc.message
    return McpServerInfo(name=name, kind="refused" if error else "catalog", server=spec.server, params=params,
                         description=entry.description if entry is not None else None, error=error,
                         created_at=row.created_at, updated_at=row.updated_at)


def _builtin_info(name: str) -> McpServerInfo:
    return McpServerInfo(name=name, kind="builtin", description=BUILTIN[name])


def list_configs(deps: LifecycleDeps, user_id: str, catalog: Catalog) -> McpServerList:
    _active_user(deps, user_id)
    with deps.sessions() as s:
        rows = list(s.scalars(select(McpServerConfig).where(McpServerConfig.user_id == user_id)
                              .order_by(McpServerConfig.name)))
    items = {row.name: _info(row.name, _open(deps, row), row, catalog) for row in rows}
    for name in BUILTIN:
        items.setdefault(name, _builtin_info(name))
    return McpServerList(items=[items[k] for k in sorted(items)])


def put_config(deps: LifecycleDeps, user_id: str, name: str, spec: McpServerSpec,
               catalog: Catalog) -> tuple[McpServerInfo, bool]:
    validate_name(name)
    _active_user(deps, user_id)
    validate_spec(spec, catalog)
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
                return _info(name, spec, row, catalog), created
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
            agent_uri: Callable[[str], str], catalog: Catalog) -> GatewayTarget:
    """The resolved config ``name`` of ``user_id`` for ``workspace_id``. ``agent_uri("global"|"agent")`` is the
    workspace's own URI. NotFound for a name this user has no config of (another user's is not visible);
    InvalidInput for a config that may not run (old form, entry gone from the catalog, params now invalid)."""
    validate_name(name)
    with deps.sessions() as s:
        row = s.scalars(select(McpServerConfig).where(McpServerConfig.user_id == user_id,
                                                      McpServerConfig.name == name)).one_or_none()
        if row is None:
            if name in BUILTIN:
                return GatewayTarget(workspace_id=workspace_id, user_id=user_id, name=name, builtin=True)
            raise NotFound(f"MCP server {name!r} is not configured for your user")
        spec = _open(deps, row)
    if spec is None:
        raise InvalidInput(f"MCP server {name} is {_LEGACY}; catalog entries: "
                           f"{', '.join(catalog.names()) or 'none'}")
    try:
        entry = validate_spec(spec, catalog)
    except InvalidInput as exc:
        raise InvalidInput(f"MCP server {name} cannot run: {exc.message}") from None
    values: dict[str, str] = dict(spec.params)
    secrets: dict[str, str] = {k: v for k, v in spec.params.items() if entry.params[k].secret}
    used = entry.placeholders()
    for var, database in ((GLOBAL_DB_URL, "global"), (AGENT_DB_URL, "agent")):
        if var in used:
            values[var] = secrets[var] = agent_uri(database)

    def sub(text: str) -> str:  # one pass: a substituted value is never read for placeholders again
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)

    return GatewayTarget(workspace_id=workspace_id, user_id=user_id, name=name, builtin=False, server=spec.server,
                         command=entry.command, args=tuple(sub(a) for a in entry.args),
                         env=tuple(sorted((k, sub(v)) for k, v in entry.env.items())),
                         read_only_paths=tuple(entry.read_only_paths), limits=entry.limits, secrets=secrets)
