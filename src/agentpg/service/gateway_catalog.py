"""The operator's gateway catalog: the only MCP servers the gateway will ever start.

Users no longer send a command. The operator lists, in ``AGENTPG_GATEWAY_CATALOG`` (a JSON file path or
inline JSON), the servers users may run — pinned and installed ahead — and a user's config only picks one
entry and fills in the parameters that entry declares::

    {"postgres": {"description": "The reference Postgres MCP server (read-only SQL)",
                  "command": "/usr/bin/node",
                  "args": ["/opt/mcp/node_modules/@modelcontextprotocol/server-postgres/dist/index.js",
                           "${GLOBAL_DB_URL}"],
                  "env": {},
                  "params": {"SCHEMA": {"description": "…", "pattern": "[a-z_][a-z0-9_]{0,62}",
                                        "secret": false}},
                  "read_only_paths": ["/opt/mcp/node_modules"],
                  "limits": {"memory_mb": 512}}}

``args`` and ``env`` values may hold ``${GLOBAL_DB_URL}``, ``${AGENT_DB_URL}`` and ``${PARAM}`` for a
declared param; they are substituted in one pass (a value is never re-read for placeholders). Each param
value must fully match its ``pattern``. ``read_only_paths`` are what the sandbox shows besides the system
directories (:mod:`.sandbox`). The catalog is checked when loaded: a bad one is refused whole, with the
reason.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentpg.errors import AgentpgError

PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
GLOBAL_DB_URL = "GLOBAL_DB_URL"
AGENT_DB_URL = "AGENT_DB_URL"
DATABASE_PLACEHOLDERS = frozenset({GLOBAL_DB_URL, AGENT_DB_URL})
ENTRY_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_ENTRY = re.compile(ENTRY_PATTERN)
_PARAM = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
#: env names (any case) that change how a program finds or loads code; not even the operator may set them
#: through an entry, since the values can come from a user's params.
FORBIDDEN_ENV = frozenset({"PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONSTARTUP",
                           "PYTHONHOME", "PYTHONUSERBASE", "NODE_OPTIONS", "NODE_PATH", "BASH_ENV", "ENV",
                           "GCONV_PATH", "PERL5LIB", "PERL5OPT", "RUBYOPT", "RUBYLIB", "HOME", "TMPDIR",
                           "IFS", "SHELLOPTS", "PS4", "LOCPATH", "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF",
                           "MALLOC_CONF", "GLIBC_TUNABLES"})
FORBIDDEN_ENV_PREFIXES = ("LD_", "AGENTPG_", "DYLD_", "PYTHON", "NODE_", "NPM_CONFIG_", "BASH_FUNC_")
_HARMLESS_ENV = frozenset({"NODE_ENV", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING"})


class CatalogError(AgentpgError):
    """The operator's catalog is missing, unreadable or invalid: nothing of it is used."""

    status = 503
    code = "gateway_catalog_invalid"


def env_name_forbidden(name: str) -> bool:
    upper = name.upper()
    if upper in _HARMLESS_ENV:
        return False
    return upper in FORBIDDEN_ENV or upper.startswith(FORBIDDEN_ENV_PREFIXES)


class ParamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=500)
    pattern: str = Field(min_length=1, max_length=1000,
                         description="A regular expression the whole value must match.")
    secret: bool = False
    """Shown as ``<hidden>`` and scrubbed from what the server writes back."""


class EntryLimits(BaseModel):
    """Per-entry overrides of the sandbox's resource limits (``AGENTPG_GATEWAY_LIMIT_*``)."""

    model_config = ConfigDict(extra="forbid")

    cpu_s: int | None = Field(default=None, ge=1, le=86_400)
    memory_mb: int | None = Field(default=None, ge=16, le=1_048_576)
    address_space_mb: int | None = Field(default=None, ge=64, le=1_048_576)
    processes: int | None = Field(default=None, ge=1, le=100_000)
    file_size_mb: int | None = Field(default=None, ge=1, le=1_048_576)
    open_files: int | None = Field(default=None, ge=16, le=1_048_576)


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=1000)
    command: str = Field(min_length=2, max_length=4096)
    args: list[Annotated[str, Field(max_length=8192)]] = Field(default_factory=list, max_length=256)
    env: dict[str, Annotated[str, Field(max_length=16384)]] = Field(default_factory=dict, max_length=64)
    params: dict[str, ParamSpec] = Field(default_factory=dict, max_length=32)
    read_only_paths: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=64)
    limits: EntryLimits = Field(default_factory=EntryLimits)

    def placeholders(self) -> list[str]:
        names: list[str] = []
        for text in [*self.args, *self.env.values()]:
            for found in PLACEHOLDER.findall(text):
                if found not in names:
                    names.append(found)
        return names


@dataclass(frozen=True)
class Catalog:
    entries: dict[str, CatalogEntry]
    source: str
    """Where it came from (a path, ``inline`` or ``unset``), for messages."""

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> CatalogEntry | None:
        return self.entries.get(name)


def _check_entry(name: str, entry: CatalogEntry, home: Path) -> None:
    where = f"gateway catalog entry {name!r}"
    if not _ENTRY.fullmatch(name):
        raise CatalogError(f"{where}: a name is 1 to 64 of a-z 0-9 . _ - ")
    if not os.path.isabs(entry.command) or PLACEHOLDER.search(entry.command):
        raise CatalogError(f"{where}: command must be an absolute path fixed by the operator, without "
                           "placeholders")
    for param, spec in entry.params.items():
        if not _PARAM.fullmatch(param) or param in DATABASE_PLACEHOLDERS:
            raise CatalogError(f"{where}: param {param!r} must be A-Z 0-9 _ (starting with a letter) and not "
                               "GLOBAL_DB_URL/AGENT_DB_URL")
        try:
            re.compile(spec.pattern)
        except re.error as exc:
            raise CatalogError(f"{where}: param {param}'s pattern does not compile ({exc})") from None
    known = set(entry.params) | DATABASE_PLACEHOLDERS
    for used in entry.placeholders():
        if used not in known:
            raise CatalogError(f"{where}: placeholder ${{{used}}} is neither GLOBAL_DB_URL, AGENT_DB_URL nor a "
                               "declared param")
    for key in entry.env:
        if not _ENV_NAME.fullmatch(key) or env_name_forbidden(key):
            raise CatalogError(f"{where}: env name {key!r} may not be set for a gateway server")
    for text in [entry.command, *entry.args, *entry.env, *entry.env.values(), *entry.read_only_paths]:
        if "\x00" in text:
            raise CatalogError(f"{where}: NUL bytes are not allowed")
    resolved_home = home.resolve()
    for raw in entry.read_only_paths:
        path = Path(raw)
        if not path.is_absolute() or PLACEHOLDER.search(raw):
            raise CatalogError(f"{where}: read_only_paths must be absolute paths")
        real = path.resolve()
        if real == Path("/") or real == resolved_home or resolved_home in real.parents \
                or real in resolved_home.parents:
            raise CatalogError(f"{where}: read_only_path {raw} would expose agentpg's home ({home}) to the "
                               "server")


def parse_catalog(text: str, source: str, home: Path) -> Catalog:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"the gateway catalog ({source}) is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(raw, dict):
        raise CatalogError(f"the gateway catalog ({source}) must be a JSON object: entry name → entry")
    entries: dict[str, CatalogEntry] = {}
    for name, body in raw.items():
        try:
            entry = CatalogEntry.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise CatalogError(f"gateway catalog entry {name!r}: {loc or 'entry'}: {first['msg']}") from None
        _check_entry(str(name), entry, home)
        entries[str(name)] = entry
    return Catalog(entries=entries, source=source)


def load_catalog(value: str | None, home: Path) -> Catalog:
    """``AGENTPG_GATEWAY_CATALOG``: unset → an empty catalog (only the built-in defaults exist); a value
    starting with ``{`` → inline JSON; else a path to a JSON file."""
    if value is None or not value.strip():
        return Catalog(entries={}, source="unset")
    text = value.strip()
    if text.startswith("{"):
        return parse_catalog(text, "inline AGENTPG_GATEWAY_CATALOG", home)
    try:
        content = Path(text).read_text()
        mode = os.stat(text).st_mode
    except OSError as exc:
        raise CatalogError(f"the gateway catalog file {text} cannot be read: {exc.strerror}") from None
    if mode & 0o022:  # whoever may write it chooses what agentpg runs
        raise CatalogError(f"the gateway catalog file {text} is writable by group or others; chmod go-w it")
    return parse_catalog(content, text, home)


class CatalogSource:
    """The catalog of one process, read again when its file changes (inline JSON is parsed once)."""

    def __init__(self, value: str | None, home: Path) -> None:
        self._value = value
        self._home = home
        self._stamp: tuple[float, int] | None = None
        self._catalog: Catalog | None = None

    def _file_stamp(self) -> tuple[float, int] | None:
        text = (self._value or "").strip()
        if not text or text.startswith("{"):
            return None
        try:
            st = os.stat(text)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def get(self) -> Catalog:
        stamp = self._file_stamp()
        if self._catalog is None or stamp != self._stamp:
            self._catalog = load_catalog(self._value, self._home)
            self._stamp = stamp
        return self._catalog
