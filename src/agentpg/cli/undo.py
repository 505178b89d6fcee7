"""``agentpg checkpoints …``, ``agentpg restore …``, ``agentpg backups …`` (issue 19; docs/undo.md)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from agentpg.cli.host import host
from agentpg.service import Service, TargetSpec

T = TypeVar("T")
Run = Callable[[Callable[[Service], Any]], Any]
Emit = Callable[[Any, bool, Callable[[], str]], None]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
WorkspaceOpt = Annotated[str | None, typer.Option(
    "--workspace", "-w", help="A workspace's agent database instead of the user's global database.")]


def register(app: typer.Typer, run: Run, emit: Emit) -> None:
    """Add the undo commands to ``app``; ``run``/``emit`` are the CLI's runtime and output helpers."""
    checkpoints_app = typer.Typer(no_args_is_help=True, help="Named points in time of one database.")
    backups_app = typer.Typer(no_args_is_help=True, help="Continuous archiving: what the backups protect.")
    app.add_typer(checkpoints_app, name="checkpoints")
    app.add_typer(backups_app, name="backups")

    @checkpoints_app.command("create")
    def checkpoints_create(user_id: str, workspace: WorkspaceOpt = None,
                           name: Annotated[str | None, typer.Option(help="A name (default: the time).")] = None,
                           as_json: JsonOpt = False) -> None:
        """Mark the database's current state (milliseconds, whatever its size)."""
        made = run(lambda rt: rt.undo.create_checkpoint(user_id, workspace, name, "admin"))
        emit(made.model_dump(mode="json"), as_json, lambda: f"checkpoint {made.id} ({made.name}) at {made.created_at}")

    @checkpoints_app.command("list")
    def checkpoints_list(user_id: str, workspace: WorkspaceOpt = None, as_json: JsonOpt = False) -> None:
        """The database's checkpoints, newest first."""
        items = run(lambda rt: rt.undo.list_checkpoints(user_id, workspace))
        emit([i.model_dump(mode="json") for i in items], as_json, lambda: "\n".join(
            f"{c.id}\t{c.created_at}\t{c.name}\t{c.created_by}" + ("\texpired" if c.expired else "")
            for c in items) or "no checkpoints")

    @app.command("restore")
    def restore(user_id: str, workspace: WorkspaceOpt = None,
                checkpoint: Annotated[str | None, typer.Option(help="A checkpoint's id.")] = None,
                at: Annotated[datetime | None, typer.Option(help="A time in the retention window (ISO 8601, "
                                                                  "UTC unless it says otherwise).")] = None,
                before_audit: Annotated[int | None, typer.Option(
                    help="An audit entry's id: restore to just before that statement ran.")] = None,
                mode: Annotated[str, typer.Option(help='"in_place" (the current state is checkpointed first) or '
                                                       '"new" (a copy to inspect).')] = "in_place",
                as_json: JsonOpt = False) -> None:
        """Restore one database to a checkpoint, a time, or just before an audited statement."""
        if sum(v is not None for v in (checkpoint, at, before_audit)) != 1:
            raise typer.BadParameter("give exactly one of --checkpoint, --at, --before-audit")
        if mode not in ("in_place", "new"):
            raise typer.BadParameter('--mode is "in_place" or "new"')
        chosen: Literal["in_place", "new"] = "new" if mode == "new" else "in_place"
        spec = TargetSpec(checkpoint_id=checkpoint, at=at, before_audit_id=before_audit)
        result = run(lambda rt: rt.undo.restore(user_id, workspace, spec, chosen))

        def human() -> str:
            if result.restored_copy is not None:
                return f"restored as copy {result.restored_copy.id} (agentpg restored-copies)"
            return f"restored in place; to undo it, restore to checkpoint {result.undo_checkpoint_id}"
        emit(result.model_dump(mode="json"), as_json, human)

    @app.command("recover")
    def recover(from_dir: Annotated[Path, typer.Option("--from", help="The backup directory (what "
                                                       "AGENTPG_BACKUP_DIR was), e.g. restored from another disk.")],
                as_json: JsonOpt = False) -> None:
        """Disaster recovery: rebuild the whole embedded server (catalog and every tenant) in AGENTPG_HOME from
        the backup directory alone, to the latest archived point. AGENTPG_HOME must not hold a server yet."""
        from agentpg.errors import AgentpgError
        from agentpg.settings import Settings

        settings = Settings()
        try:
            done = host().recover(from_dir, settings)  # before any runtime: there is no server yet
        except AgentpgError as exc:
            typer.echo(f"error: {exc.message}", err=True)
            raise typer.Exit(1) from None
        emit(done.__dict__, as_json, lambda: f"recovered {settings.home} from base backup {done.base_backup} and "
             f"{done.wal_segments} WAL segments; last transaction replayed at {done.last_transaction}; "
             "start it with `agentpg serve`")

    @backups_app.command("status")
    def backups_status(as_json: JsonOpt = False) -> None:
        """Per server: protected or not (and why), the restorable window, size, recovery mode."""
        items = run(lambda rt: rt.undo.archive_status())
        emit([i.model_dump(mode="json") for i in items], as_json, lambda: "\n".join(
            f"{i.server or 'server'}: " + (f"protected from {i.earliest} to {i.latest}, {i.base_backups} base "
                                            f"backups, {i.bytes:,} bytes"
                                            + (", synchronous" if i.synchronous else "")
                                            if i.protected else f"NOT protected: {i.reason}")
            + (" (rebase pending)" if i.rebase_pending else "") for i in items))

    @backups_app.command("rebase")
    def backups_rebase(as_json: JsonOpt = False) -> None:
        """Purge what deleted users left in the backups: take a fresh full base backup of every archived server
        now, verify it, then delete every older base backup and WAL segment. EVERY tenant loses the points
        before it (their checkpoints are listed as expired; a restore there is refused). Safe to run again."""
        done = run(lambda rt: rt.undo.rebase_backups())
        rows = [{**d.__dict__, "restorable_from": d.restorable_from.isoformat()} for d in done]
        emit(rows, as_json, lambda: "\n".join(
            f"{d.server or 'server'}: rebased on full base backup {d.base_backup}; restorable from "
            f"{d.restorable_from}; deleted {d.deleted_base_backups} base backups and {d.deleted_wal_segments} WAL "
            f"segments ({d.bytes_before:,} -> {d.bytes_after:,} bytes)" for d in done) or "nothing is archived")
