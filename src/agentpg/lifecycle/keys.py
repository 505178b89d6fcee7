"""Master-key rotation, and the one registry of every sealed column in the catalog.

``rotate_keys`` runs in three steps, each safe to interrupt:

1. **Add.** Under a catalog advisory lock (one rotation at a time), read the key file; if it holds one key,
   add a fresh key, make it active and durably replace the file (atomic rename, 0600, fsync) *before*
   anything is sealed under it. A file that already holds several keys is a rotation a crash interrupted:
   it is resumed, no key is added.
2. **Re-seal.** Walk every column of :data:`SEALED_COLUMNS` by primary key and re-seal, in batches of one
   transaction each, the values whose key id is not the active one. Progress needs no table: a value
   already re-sealed no longer matches, so a new run simply picks up what is left.
3. **Retire.** Wait until every catalog transaction that was open when step 2 began has ended (it may have
   sealed under the old key just before the file changed), scan again, and drop from the file only the
   old keys no value uses any more. A last pass re-seals any straggler with the keys still in memory.

Other processes sharing the key file follow it (see :mod:`agentpg.crypto`): they seal under the file's
active key and re-read the file when they meet a key id they do not know.

With ``AGENTPG_SECRET_KEY`` agentpg cannot add a key: the operator lists the new key first
(``NEW,OLD``) for every process, and ``keys rotate`` does steps 2 and 3, reporting old keys as
``removable`` from the variable instead of rewriting anything.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, bindparam, func, select, text, update

from agentpg.catalog.models import (
    Base,
    EnvVar,
    McpServerConfig,
    UserGlobalDatabase,
    WarmDatabase,
    Workspace,
    WorkspaceAgentDatabase,
)
from agentpg.crypto import KeyRing, SealContext
from agentpg.errors import Conflict, SecretError
from agentpg.lifecycle.deps import LifecycleDeps

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every agentpg process sharing a catalog.
_ROTATION_LOCK_KEY = 0x61677470_6B657973
_UNOPENABLE_LISTED = 50


@dataclass(frozen=True)
class SealedColumn:
    """A catalog column holding sealed values, and the associated data its values are bound to.

    The row id in the associated data is always the table's ``id`` primary key.
    """

    model: type[Base]
    column: str
    aad_table: str
    aad_field: str

    def __post_init__(self) -> None:
        if self.column not in self.table.c or "id" not in self.table.c or not self.table.c.id.primary_key:
            raise TypeError(f"{self.model.__name__}.{self.column} is not a sealed column of a table keyed by id")

    @property
    def table(self) -> Table:
        return cast(Table, self.model.__table__)


SEALED_COLUMNS: tuple[SealedColumn, ...] = (
    SealedColumn(UserGlobalDatabase, "connection_uri_sealed", "user_global_database", "connection_uri"),
    SealedColumn(WorkspaceAgentDatabase, "connection_uri_sealed", "workspace_agent_database", "connection_uri"),
    SealedColumn(Workspace, "global_uri_sealed", "workspaces", "global_uri"),
    SealedColumn(EnvVar, "value_sealed", "env_vars", "value"),
    SealedColumn(McpServerConfig, "config_sealed", "mcp_servers", "config"),
    SealedColumn(WarmDatabase, "password_sealed", "warm_databases", "password"),
)
"""Every sealed column. A new sealed column is one line here (``tests/test_keys.py`` fails until it is)."""


@dataclass
class KeyUse:
    id: str
    active: bool
    values: int


@dataclass
class KeyStatus:
    source: str
    """``file`` (``$AGENTPG_HOME/secret.key``) or ``env`` (``AGENTPG_SECRET_KEY``)."""
    path: str | None
    active: str
    keys: list[KeyUse]
    unknown: dict[str, int]
    """Values sealed under key ids the ring does not hold (they cannot be opened)."""
    total: int

    @property
    def rotation_pending(self) -> bool:
        return len(self.keys) > 1

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "active": self.active,
                "keys": [k.__dict__ for k in self.keys], "unknown": self.unknown, "total": self.total,
                "rotation_pending": self.rotation_pending}


@dataclass
class RotationReport:
    source: str
    active: str
    added: str | None
    """The key this run added, or None when it resumed an interrupted rotation (or the ring is env's)."""
    resumed: bool
    resealed: int = 0
    batches: int = 0
    retired: list[str] = field(default_factory=list)
    """Keys removed from the key file."""
    removable: list[str] = field(default_factory=list)
    """``AGENTPG_SECRET_KEY`` only: old keys no value uses, which the operator can now remove."""
    kept: dict[str, int] = field(default_factory=dict)
    """Old keys still in the ring, with how many values still use them."""
    unopenable: list[str] = field(default_factory=list)
    """``table/row id/field`` of values that would not open (first few), never their content."""
    unopenable_count: int = 0
    settled: bool = True
    """False when catalog transactions older than the rotation were still open at the deadline."""
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return self.settled and not self.kept and not self.unopenable_count

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "clean": self.clean}


# -- reading ------------------------------------------------------------------------------------------


def key_usage(engine: Engine) -> dict[str, int]:
    """How many sealed values use each key id, over every sealed column."""
    counts: Counter[str] = Counter()
    with engine.connect() as conn:
        for spec in SEALED_COLUMNS:
            col = spec.table.c[spec.column]
            kid = func.split_part(col, ".", 2)
            for key_id, n in conn.execute(select(kid, func.count()).where(col.is_not(None), col != "")
                                          .group_by(kid)):
                counts[str(key_id)] += int(n)
    return dict(counts)


def key_status(deps: LifecycleDeps) -> KeyStatus:
    """The ring as the key file (or the environment) has it now, and how many values use each key."""
    ring = deps.keyring
    if ring.file is not None:
        ring = ring.file.parse()
    usage = key_usage(deps.engine)
    keys = [KeyUse(id=kid, active=kid == ring.active, values=usage.get(kid, 0))
            for kid in sorted(ring.keys, key=lambda k: (k != ring.active, k))]
    return KeyStatus(source="file" if deps.keyring.file else "env",
                     path=str(deps.keyring.file.path) if deps.keyring.file else None, active=ring.active,
                     keys=keys, unknown={k: n for k, n in usage.items() if k not in ring.keys},
                     total=sum(usage.values()))


# -- rotating -----------------------------------------------------------------------------------------


ENV_REFUSAL = (
    "the key ring comes from AGENTPG_SECRET_KEY, which agentpg cannot rewrite. To rotate: make a new key "
    "(base64 of 32 random bytes, e.g. `openssl rand -base64 32`), set AGENTPG_SECRET_KEY=NEW,OLD (comma-"
    "separated: the first key seals, every listed key opens) for every agentpg process and restart them, "
    "then run `agentpg keys rotate` again: it re-seals every value under NEW and reports when OLD can be "
    "removed from the list"
)


@contextmanager
def _rotation_lock(engine: Engine) -> Iterator[None]:
    """A session advisory lock on its own autocommit connection: one rotation per catalog at a time."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _ROTATION_LOCK_KEY}).scalar())
        if not got:
            raise Conflict("another `agentpg keys rotate` is running against this catalog; "
                           "let it finish (run `agentpg keys status` to follow it)")
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _ROTATION_LOCK_KEY})


def _reseal_batch(deps: LifecycleDeps, spec: SealedColumn, ring: KeyRing, after: Any,
                  limit: int) -> tuple[int, Any, list[str]]:
    """Re-seal up to ``limit`` values of ``spec`` with ids after ``after`` (None: from the first) in one
    transaction.

    Returns (values re-sealed, the last id seen or None when the column is done, values that did not open).
    Rows another transaction holds are skipped (a later pass takes them), so this never waits or deadlocks.
    """
    table = spec.table
    col, pk = table.c[spec.column], table.c.id
    query = select(pk, col).where(col.is_not(None), col != "", func.split_part(col, ".", 2) != ring.active)
    if after is not None:
        query = query.where(pk > after)
    with deps.engine.begin() as conn:
        rows = conn.execute(query.order_by(pk).limit(limit).with_for_update(skip_locked=True)).all()
        if not rows:
            return 0, None, []
        changes: list[dict[str, Any]] = []
        bad: list[str] = []
        for row_id, sealed in rows:
            context = SealContext(spec.aad_table, str(row_id), spec.aad_field)
            try:
                plaintext = ring.open(sealed, context)
            except SecretError:
                bad.append(f"{spec.aad_table}/{row_id}/{spec.aad_field}")
                continue
            changes.append({"k_id": row_id, "k_old": sealed, "k_new": ring.seal(plaintext, context)})
        if changes:
            values: dict[str, Any] = {spec.column: bindparam("k_new")}
            if "updated_at" in table.c:  # re-sealing is not a change of the record
                values["updated_at"] = table.c.updated_at
            conn.execute(update(table).where(pk == bindparam("k_id"), col == bindparam("k_old")).values(values),
                         changes)
    return len(changes), rows[-1][0], bad


def _reseal_pass(deps: LifecycleDeps, ring: KeyRing, batch_size: int, report: RotationReport) -> list[str]:
    """One walk over every sealed column; returns the values that did not open."""
    bad: list[str] = []
    for spec in SEALED_COLUMNS:
        after: Any = None
        while True:
            n, last, unopened = _reseal_batch(deps, spec, ring, after, batch_size)
            bad += unopened
            if n:
                report.resealed += n
                report.batches += 1
                log.debug("re-sealed %d value(s) of %s.%s", n, spec.aad_table, spec.column)
                deps.reached("keys_rotate:batch")
            if last is None:
                break
            after = last
    return bad


def _db_clock(engine: Engine) -> datetime:
    with engine.connect() as conn:
        return cast(datetime, conn.execute(text("SELECT clock_timestamp()")).scalar_one())


def _open_older_transactions(conn: Connection, since: datetime) -> int:
    return int(conn.execute(text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND xact_start < :since"),
        {"since": since}).scalar_one())


def _wait_for_older_transactions(engine: Engine, since: datetime, deadline: float, poll_s: float) -> bool:
    """Wait until no catalog transaction that began before ``since`` is open; False at the deadline."""
    while True:
        with engine.connect() as conn:
            if _open_older_transactions(conn, since) == 0:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def rotate_keys(deps: LifecycleDeps, *, batch_size: int = 500, settle_timeout_s: float = 60.0,
                poll_s: float = 0.2) -> RotationReport:
    """Rotate the master key (see the module docstring). Never logs or returns key material or plaintext.

    Raises :class:`Conflict` when another rotation holds the lock, or when the ring comes from
    ``AGENTPG_SECRET_KEY`` and holds a single key (the message says what the operator should do).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    started = time.monotonic()
    key_file = deps.keyring.file
    if key_file is None and len(deps.keyring.keys) == 1:
        raise Conflict(ENV_REFUSAL)
    with _rotation_lock(deps.engine):
        if key_file is None:
            ring = deps.keyring.detached()
            report = RotationReport(source="env", active=ring.active, added=None, resumed=False)
        else:
            ring = key_file.parse()  # the file as it is now, under the lock, not as this process read it
            added = None
            if len(ring.keys) == 1:
                ring = ring.with_new_key()
                key_file.write(ring)  # durable before anything is sealed under the new key
                added = ring.active
                log.info("added master key %s to %s; it is now active", added, key_file.path)
                deps.reached("keys_rotate:ring_written")
            else:
                log.info("resuming the rotation to master key %s", ring.active)
            deps.keyring.refresh()
            report = RotationReport(source="file", active=ring.active, added=added, resumed=added is None)

        since = _db_clock(deps.engine)
        deadline = time.monotonic() + settle_timeout_s
        while True:
            resealed_before = report.resealed
            bad = _reseal_pass(deps, ring, batch_size, report)
            if report.resealed > resealed_before and time.monotonic() < deadline:
                continue  # until a pass finds nothing to do
            report.settled = _wait_for_older_transactions(deps.engine, since, deadline, poll_s)
            usage = key_usage(deps.engine)
            stale = sum(n for kid, n in usage.items() if kid != ring.active)
            if (report.settled and stale <= len(bad)) or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)  # rows held by other transactions, or values they sealed meanwhile

        old = sorted(kid for kid in ring.keys if kid != ring.active)
        report.kept = {kid: usage[kid] for kid in old if usage.get(kid)}
        unused = [kid for kid in old if not usage.get(kid)] if report.settled else []
        if not report.settled:
            report.kept = {kid: usage.get(kid, 0) for kid in old}
        if key_file is None:
            report.removable = unused
        elif unused:
            key_file.write(ring.only(set(ring.keys) - set(unused)))
            report.retired = unused
            log.info("retired master key(s) %s from %s", ", ".join(unused), key_file.path)
            # A value sealed under a retired key by a very late writer: we still hold that key here.
            bad = _reseal_pass(deps, ring, batch_size, report)
        report.unopenable_count = len(bad)
        report.unopenable = bad[:_UNOPENABLE_LISTED]
    report.seconds = round(time.monotonic() - started, 3)
    return report
