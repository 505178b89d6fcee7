"""Point-in-time restore of one tenant database of a local server, and the in-place swap.

:func:`restore_database` recovers the server's backups in a :class:`~.side.SideInstance` holding only that
database (cost: that database's size plus the WAL it replays, not the server's size), dumps it with
``pg_dump -Fc -Z0``, and loads it into a new database on the running server (:func:`_load`), then makes it a
tenant database again (ownership, tenant SQL, grants). :func:`replace_database` swaps it in by renames that a
rerun finishes from whatever state a crash left.

**Who loads what.** Loading runs code the tenant wrote: an index expression's function while the index is
built (as the table's owner), a CHECK constraint's or a domain's while rows are copied, a generated column's.
So schema ``public`` (everything a tenant can define) is loaded as the database's owner role
(``pg_restore --role``), the rights its objects have anyway; never as the admin, which would run that code as a
superuser. Only what agentpg itself installs is loaded as the admin: the extensions first (the tenant's
objects may use their types), and schema ``agentpg_internal`` (its grants and settings) last, before the tenant
SQL is installed again.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from agentpg.errors import ProviderError
from agentpg.providers.base import ArchiveStatus, DatabasePlan, NotRestorable, RecoveryTarget
from agentpg.providers.local_roles import fence
from agentpg.providers.side import STANDBY_MINIMUMS, SideInstance
from agentpg.providers.tenant_sql import BOOTSTRAP
from agentpg.providers.walfiles import chain, contiguous_from, parse_lsn, segments

if TYPE_CHECKING:
    from agentpg.providers.local import LocalProvider

log = logging.getLogger(__name__)
Conn = psycopg.Connection[tuple[Any, ...]]
_LOAD_TIMEOUT_S = 6 * 3600.0
REPLACED_SUFFIX = "_replaced"


def archive_status(provider: LocalProvider) -> ArchiveStatus:
    if provider.archiver is None:
        return ArchiveStatus(server=provider.server_name, protected=False,
                             reason="archiving is off for this server (AGENTPG_BACKUP_ENABLED)")
    return provider.archiver.status()


def mark_point(provider: LocalProvider, plan: DatabasePlan, label: str) -> tuple[str, datetime]:
    """A named restore point (``pg_create_restore_point``; labels are cut to its 63 bytes): LSN, server time."""
    if provider.archiver is None or not provider.archiver.backups():
        raise NotRestorable(f"server {provider.server_name!r} is not archived yet: no checkpoint can be made")
    try:
        with provider._admin() as conn:
            row = conn.execute("SELECT pg_create_restore_point(%s)::text, clock_timestamp()",
                               (label.encode()[:63].decode(errors="ignore"),)).fetchone()
    except psycopg.Error as exc:
        raise ProviderError(f"marking a checkpoint of {plan.database} failed: {exc.diag.message_primary}") from None
    assert row is not None
    return str(row[0]), row[1]


def restore_database(provider: LocalProvider, plan: DatabasePlan, target: RecoveryTarget,
                     into: DatabasePlan) -> None:
    archiver = provider.archiver
    if archiver is None:
        raise NotRestorable(f"server {provider.server_name!r} is not archived: nothing to restore from")
    if into.database == plan.database:
        raise ProviderError("a database cannot be restored into itself; restore into a new one and replace")
    with provider._admin() as conn:
        row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (plan.database,)).fetchone()
        current_oid = int(row[0]) if row else None
        conf = {str(r[0]): str(r[1]) for r in conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(STANDBY_MINIMUMS),))}
        preload = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
        if preload and preload[0]:
            conf["shared_preload_libraries"] = str(preload[0])
        if target.time is not None:
            when = target.time if target.time.tzinfo else target.time.replace(tzinfo=UTC)
            now_row = conn.execute("SELECT now()").fetchone()
            assert now_row is not None
            if when > now_row[0]:
                raise NotRestorable(f"{when.isoformat()} is in the future")
            target = RecoveryTarget(time=when)
        elif parse_lsn(target.lsn or "0/0") > _lsn(conn, "SELECT pg_current_wal_insert_lsn()::text"):
            raise NotRestorable(f"WAL position {target.lsn} has not been written yet")
        # Recovery stops at the first record after an LSN, the first commit after a time: make sure one is
        # in the WAL (a quiet server may have written nothing since), and that the backups hold it.
        with conn.transaction():
            conn.execute("SELECT pg_current_xact_id()")
        needed = _lsn(conn, "SELECT pg_current_wal_insert_lsn()::text")
    archiver.wait_archived(needed)
    backup = archiver.start_for(target)
    if backup is None:
        usable, _ = archiver.restorable()
        since = f" ({usable[0].finished.isoformat(timespec='seconds')})" if usable else ""
        raise NotRestorable(f"{target.lsn or target.time} is before the oldest restorable point{since} of server "
                            f"{provider.server_name!r}: older backups were removed (the retention window, or a "
                            "rebase after a user's deletion)")
    links = chain(backup, {b.label: b for b in archiver.backups()})
    assert links is not None  # restorable() checked it
    keep = {oid for name, oid in backup.databases.items() if name in ("template0", "template1", "postgres")}
    keep |= {oid for oid in (backup.databases.get(plan.database), current_oid) if oid is not None}
    wal = contiguous_from(segments(archiver.wal_dir, backup.seg_size), backup.start_segno)
    if target.lsn is not None:  # what follows the target is not needed
        last = parse_lsn(target.lsn) // backup.seg_size + 1
        wal = [seg for seg in wal if seg.segno <= last]
    started = time.monotonic()
    try:
        with SideInstance(archiver) as side:
            assert side.root is not None
            side.build(links, keep, wal, conf, target)
            side.recover(target)
            dump = side.root / "dump"
            fd = os.open(dump, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            side.dump(plan.database, dump)
            recovered = time.monotonic()
            _load(provider, dump, plan, into)
    except OSError as exc:  # disk full, a backup file deleted under us by retention, …
        raise ProviderError(f"restoring {plan.database} failed: {exc.strerror or exc}") from None
    log.info("restored %s as %s (recovery %.1f s, load %.1f s)", plan.database, into.database,
             recovered - started, time.monotonic() - recovered)


def _lsn(conn: Conn, query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def _load(provider: LocalProvider, dump: Path, plan: DatabasePlan, into: DatabasePlan) -> None:
    archiver = provider.archiver
    assert archiver is not None
    db = sql.Identifier(into.database)
    try:
        with provider._admin(tag=into.database) as conn:
            fence(conn, into.database)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(db))
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
    except psycopg.Error as exc:
        raise ProviderError(f"creating database {into.database} for the restore failed: "
                            f"{exc.diag.message_primary}") from None
    listing = archiver.run_tool([str(archiver.bin_dir / "pg_restore"), "-l", str(dump)], timeout=600,
                                what="listing the restored dump")
    entries = [line for line in listing.splitlines() if line.strip() and not line.startswith(";")]
    extensions = [line for line in entries if _is_extension(line)]
    # A materialized view's query is an agent's: it is re-created empty (refresh it to fill it).
    rest = [line for line in entries if not _is_extension(line) and "MATERIALIZED VIEW DATA" not in line]
    _restore(archiver, dump, into.database, extensions, "extensions")
    try:
        with provider._admin(into.database, tag=into.database) as conn:
            conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(plan.owner_role)))
            # pg_restore -n leaves out the schema's own entry (it has no namespace): made here, as BOOTSTRAP does.
            conn.execute("CREATE SCHEMA agentpg_internal")
    except psycopg.Error as exc:
        raise ProviderError(f"preparing the restored database {into.database} failed: "
                            f"{exc.diag.message_primary}") from None
    _restore(archiver, dump, into.database, rest, "the tenant's objects", schema="public", role=plan.owner_role)
    _restore(archiver, dump, into.database, rest, "agentpg's grants and settings", schema="agentpg_internal")
    shared: list[bool] = []

    def make_tenant(conn: Conn) -> None:
        shared.clear()
        row = conn.execute("SELECT to_regclass('agentpg_internal.config') IS NOT NULL").fetchone()
        if row is not None and row[0]:
            was = conn.execute("DELETE FROM agentpg_internal.config WHERE key = 'shared' RETURNING value").fetchone()
            shared.append(was is not None and was[0] == "on")
        conn.execute(BOOTSTRAP)
        conn.execute("TRUNCATE agentpg_internal.adopting")
        provider._install_extensions(conn, provider.extensions)
        conn.execute("INSERT INTO agentpg_internal.config VALUES ('owner_role', %s), ('login_role', %s) "
                     "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (plan.owner_role, plan.login_role))
        _hand_to_owner(conn, plan.owner_role)
        conn.execute("DELETE FROM agentpg_internal.agent_grants g "
                     "WHERE NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = g.role_name)")
        granted = conn.execute("SELECT EXISTS (SELECT 1 FROM agentpg_internal.agent_grants)").fetchone()
        if any(shared) or (granted is not None and granted[0]):
            # The built-ins' REVOKEs are privileges (--no-acl left them out): lock the database down again.
            conn.execute("SELECT agentpg_internal.lock_down_shared()")
            conn.execute("SELECT agentpg_internal.revoke_shared_builtins()")

    provider._changing_grants(into.database, "making the restored database a tenant database", make_tenant,
                              tag=into.database)
    try:
        with provider._admin() as conn:
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, sql.Identifier(plan.login_role)))
    except psycopg.Error as exc:
        raise ProviderError(f"granting the restored database {into.database} failed: "
                            f"{exc.diag.message_primary}") from None


def _is_extension(entry: str) -> bool:
    """A ``pg_restore -l`` line of an extension (``<id>; <oid> <oid> EXTENSION - <name> <owner>``) or its
    comment (``… COMMENT - EXTENSION <name> …``)."""
    fields = entry.split(maxsplit=6)
    return len(fields) >= 6 and (fields[3:5] == ["EXTENSION", "-"] or fields[3:6] == ["COMMENT", "-", "EXTENSION"])


def _restore(archiver: Any, dump: Path, database: str, entries: list[str], what: str, *, schema: str | None = None,
             role: str | None = None) -> None:
    """``pg_restore`` of ``entries`` (lines of its ``-l`` listing) of ``dump``, only those in ``schema`` when
    given, as ``role`` when given (the admin connects, then ``SET ROLE``: every object is created by, owned
    by, and every expression evaluated as that role)."""
    if not entries:
        return
    list_file = dump.with_name("restore.list")
    list_file.write_text("\n".join(entries) + "\n")
    jobs = str(max(1, min(4, (os.cpu_count() or 1))))
    args = [str(archiver.bin_dir / "pg_restore"), "--no-owner", "--no-acl", "--exit-on-error", "-j", jobs,
            "-L", str(list_file)]
    if schema is not None:
        args += ["-n", schema]
    if role is not None:
        args += ["--role", role]
    archiver.run_tool([*args, "-d", archiver.conninfo(dbname=database), str(dump)], timeout=_LOAD_TIMEOUT_S,
                      what=f"loading the restored database ({what})")


def _hand_to_owner(conn: Conn, owner: str) -> None:
    """Give every object of schema public (what ``--no-owner`` left to the admin) to the owner role, as the
    adopt trigger does for new ones; extensions' objects stay the admin's."""
    role = sql.Identifier(owner)
    conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(role))
    conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
    not_extension = ("NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = {cls}::regclass AND e.objid = {oid} "
                     "AND e.deptype = 'e')")
    rels = conn.execute(
        "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace "
        "AND c.relkind IN ('r','p','v','m','f','S') AND " + not_extension.format(cls="'pg_class'", oid="c.oid") +
        " AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass "
        "AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))").fetchall()
    for (name,) in rels:
        conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.SQL(name), role))
    procs = conn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND "
        + not_extension.format(cls="'pg_proc'", oid="p.oid")).fetchall()
    for (name,) in procs:
        conn.execute(sql.SQL("ALTER ROUTINE {} OWNER TO {}").format(sql.SQL(name), role))
    types = conn.execute(
        "SELECT t.oid::regtype::text FROM pg_type t LEFT JOIN pg_class c ON c.oid = t.typrelid "
        "WHERE t.typnamespace = 'public'::regnamespace AND (t.typtype IN ('d', 'e', 'r') "
        "OR (t.typtype = 'c' AND c.relkind = 'c')) AND " + not_extension.format(cls="'pg_type'", oid="t.oid")
    ).fetchall()
    for (name,) in types:
        conn.execute(sql.SQL("ALTER TYPE {} OWNER TO {}").format(sql.SQL(name), role))


def replace_database(provider: LocalProvider, plan: DatabasePlan, restored: DatabasePlan) -> None:
    """Swap ``restored`` into ``plan``'s place; each state is read from pg_database, so a rerun finishes."""
    name, new, old = plan.database, restored.database, plan.database + REPLACED_SUFFIX
    if len(old.encode()) > 63:
        raise ProviderError(f"database name {name} is too long to be replaced in place")
    try:
        with provider._admin() as conn:
            for _ in range(4):
                present = {str(r[0]) for r in conn.execute(
                    "SELECT datname FROM pg_database WHERE datname = ANY(%s)", ([name, new, old],))}
                if name in present and new in present:  # 1: set the original aside
                    if old in present:  # an older swap's leftover (the restored one renamed away earlier)
                        _drop(conn, old)
                    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
                    _terminate(conn, [name, new])
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(name), sql.Identifier(old)))
                elif new in present and old in present:  # 2: the restored one takes the name
                    _terminate(conn, [new])
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(new), sql.Identifier(name)))
                    conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
                elif name in present and old in present:  # 3: drop the original
                    _drop(conn, old)
                elif name in present:  # done
                    return
                elif new in present:  # the original was gone already: just take its name
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(new), sql.Identifier(name)))
                else:
                    raise ProviderError(f"neither {name} nor its restored copy {new} exists")
    except psycopg.Error as exc:
        raise ProviderError(f"replacing database {name} by its restored copy failed: "
                            f"{exc.diag.message_primary}") from None


def _terminate(conn: Conn, names: list[str]) -> None:
    conn.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                 "WHERE datname = ANY(%s) AND pid <> pg_backend_pid()", (names,))


def _drop(conn: Conn, name: str) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

