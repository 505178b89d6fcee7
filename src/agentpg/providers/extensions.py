"""Which PostgreSQL extensions tenant databases get: the operator's allow-list, and what it may never hold.

Extensions are installed by agentpg's admin, so their objects belong to a trusted role: their functions are
trusted code, evaluated by whoever calls them. That holds only for extensions whose functions keep within
the caller's rights and the caller's database. :data:`NEVER_ALLOWED` names the ones that do not, with why;
:func:`check_allowed` refuses them whatever the operator lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType
from typing import Final

#: ``AGENTPG_TENANT_EXTENSIONS`` when unset. Each is skipped (and said so) where the server lacks it; the
#: embedded server ships all but ``pgcrypto``.
DEFAULT_EXTENSIONS: Final = ("vector", "pg_trgm", "citext", "hstore", "ltree", "fuzzystrmatch", "unaccent",
                             "btree_gin", "btree_gist", "pgcrypto")

_OUTSIDE = "reaches outside the tenant's database (other databases, servers or files)"
_SERVER = "reads the server's internals or raw pages, across every tenant"
_SQL = "runs SQL text, or arbitrary code, with the rights of whoever calls it"
_TRIGGERS = "provides trigger functions; triggers are code another agent's writes would run"

NEVER_ALLOWED: Final = MappingProxyType({
    "dblink": _OUTSIDE, "postgres_fdw": _OUTSIDE, "file_fdw": _OUTSIDE, "adminpack": _OUTSIDE,
    "plpython3u": _SQL, "plperlu": _SQL, "pltclu": _SQL, "plperl": _SQL, "pltcl": _SQL, "plv8": _SQL,
    "tablefunc": _SQL, "refint": _SQL,
    "pageinspect": _SERVER, "pg_surgery": _SERVER, "pg_walinspect": _SERVER, "pg_buffercache": _SERVER,
    "pg_visibility": _SERVER, "pg_freespacemap": _SERVER, "pgrowlocks": _SERVER, "pgstattuple": _SERVER,
    "amcheck": _SERVER, "pg_prewarm": _SERVER, "pg_logicalinspect": _SERVER, "pg_stat_statements": _SERVER,
    "tcn": _TRIGGERS, "insert_username": _TRIGGERS, "moddatetime": _TRIGGERS, "autoinc": _TRIGGERS,
    "lo": "manages large objects, which agents may not use in a shared database",
})


class ExtensionNotAllowed(ValueError):
    """An extension the operator listed (or an agent asked for) that agentpg never installs for tenants."""


def check_allowed(names: Iterable[str]) -> tuple[str, ...]:
    """The names, deduplicated, in order; raises :class:`ExtensionNotAllowed` naming any never-allowed one."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name or name in out:
            continue
        if name in NEVER_ALLOWED:
            raise ExtensionNotAllowed(f"extension {name!r} can never be installed for tenants: it "
                                      f"{NEVER_ALLOWED[name]}")
        out.append(name)
    return tuple(out)
