"""``agentpg``: run the service and manage users, workspaces and repairs from a shell.

Every command but ``mcp`` works whether or not ``agentpg serve`` is running (``mcp`` attaches to a running
agentpg and never starts one): each opens its own runtime (starting the
embedded server if it is not up) and closes it. Output never contains a password or URI; ``--json`` gives
machine-readable output. Errors print one line on stderr and exit non-zero.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from agentpg.cli import undo as undo_cli
from agentpg.cli.host import host
from agentpg.cli.host import host as cli_host
from agentpg.errors import AgentpgError, Unauthenticated
from agentpg.service import Service
from agentpg.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Give every AI agent its own Postgres.")
users_app = typer.Typer(no_args_is_help=True, help="Users and their global databases.")
workspaces_app = typer.Typer(no_args_is_help=True, help="Workspaces (agents) and their agent databases.")
postgres_app = typer.Typer(no_args_is_help=True, help="The embedded PostgreSQL server.")
app.add_typer(users_app, name="users")
app.add_typer(workspaces_app, name="workspaces")
pool_app = typer.Typer(no_args_is_help=True, help="The warm pool of ready-made databases.")
app.add_typer(postgres_app, name="postgres")
app.add_typer(pool_app, name="pool")
usage_app = typer.Typer(no_args_is_help=True, help="Costs per database and budgets per user.")
app.add_typer(usage_app, name="usage")
keys_app = typer.Typer(no_args_is_help=True, help="The master key ring that seals every stored secret.")
app.add_typer(keys_app, name="keys")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
T = TypeVar("T")

# Exit codes: 1 = the request was refused (bad input, not found, conflict); 2 = usage; 3 = a server is down.
_EXIT_REFUSED = 1
_EXIT_UNAVAILABLE = 3


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def _service(*, attach_only: bool = False) -> Iterator[Service]:
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _fail(f"invalid setting AGENTPG_{str(first['loc'][0]).upper()}: {first['msg']}", 2) from None
    try:
        with host().open_service(settings, attach_only=attach_only) as service:
            yield service
    except AgentpgError as exc:
        raise _fail(exc.message, _EXIT_UNAVAILABLE if exc.status >= 500 else _EXIT_REFUSED) from None


def _run(action: Callable[[Service], T], *, attach_only: bool = False) -> T:
    with _service(attach_only=attach_only) as service:
        try:
            return action(service)
        except AgentpgError as exc:
            raise _fail(exc.message, _EXIT_UNAVAILABLE if exc.status >= 500 else _EXIT_REFUSED) from None


def _emit(value: Any, as_json: bool, human: Callable[[], str]) -> None:
    if as_json:
        payload = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        typer.echo(json.dumps(payload, indent=2, default=str))
    else:
        typer.echo(human())


undo_cli.register(app, _run, _emit)  # checkpoints, restore, backups


# -- users --------------------------------------------------------------------------------------------


@users_app.command("create")
def users_create(
    user_id: str,
    email: Annotated[str | None, typer.Option(help="The user's email, for the platform's records.")] = None,
    database_url_env: Annotated[str | None, typer.Option(
        help="Bring your own global database: the NAME of an environment variable holding its URI "
             "(read from the environment so it never appears in the process list).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a user and create its global database."""
    url = None
    if database_url_env:
        import os

        url = os.environ.get(database_url_env)
        if not url:
            raise _fail(f"environment variable {database_url_env} is not set", _EXIT_REFUSED)
    info = _run(lambda rt: rt.register_user(user_id, email, url))
    _emit(info, as_json, lambda: f"user {info.id} registered; global database "
          f"{info.global_database.name if info.global_database else '-'} is ready")


@users_app.command("delete")
def users_delete(user_id: str, as_json: JsonOpt = False) -> None:
    """Delete a user, its global database and every workspace's agent database."""
    purge = _run(lambda rt: rt.delete_user(user_id))
    # "none": nothing archived here, or AGENTPG_BACKUP_PURGE_ON_USER_DELETE=window (the data ages out of them)
    _emit({"deleted": user_id, "backup_purge": "scheduled" if purge else "none"}, as_json,
          lambda: f"user {user_id} and all its databases deleted" + (
              "; the backups will be rebased by serve's next archiving round (or run `agentpg backups rebase`)"
              if purge else ""))


@users_app.command("list")
def users_list(as_json: JsonOpt = False) -> None:
    """List users and their global databases."""
    items = _run(lambda rt: _all_pages(lambda cursor: rt.list_users(limit=500, cursor=cursor)))
    _emit([i.model_dump(mode="json") for i in items], as_json, lambda: "\n".join(
        f"{u.id}\t{u.status}\t{u.global_database.name if u.global_database else '-'}\t"
        f"{u.global_database.status if u.global_database else '-'}" for u in items) or "no users")


def _all_pages(fetch: Callable[[str | None], Any]) -> list[Any]:
    """Every item of a cursor-paged listing: ``fetch(cursor)`` returns a page with ``items`` and
    ``next_cursor`` (None on the last page)."""
    items: list[Any] = []
    cursor: str | None = None
    while True:
        page = fetch(cursor)
        items.extend(page.items)
        if not page.next_cursor:
            return items
        cursor = page.next_cursor


# -- workspaces ---------------------------------------------------------------------------------------


@workspaces_app.command("create")
def workspaces_create(user_id: str, workspace_id: str,
                      name: Annotated[str | None, typer.Option(help="A display name.")] = None,
                      as_json: JsonOpt = False) -> None:
    """Create a workspace (one agent) with its own agent database."""
    info = _run(lambda rt: rt.create_workspace(user_id, workspace_id, name))
    _emit(info, as_json, lambda: f"workspace {info.id} of user {info.user_id} created; agent database "
          f"{info.database.name if info.database else '-'} is ready")


@workspaces_app.command("delete")
def workspaces_delete(workspace_id: str, as_json: JsonOpt = False) -> None:
    """Delete a workspace and its agent database."""
    _run(lambda rt: rt.delete_workspace(workspace_id))
    _emit({"deleted": workspace_id}, as_json, lambda: f"workspace {workspace_id} and its database deleted")


@workspaces_app.command("list")
def workspaces_list(user_id: Annotated[str | None, typer.Argument()] = None, as_json: JsonOpt = False) -> None:
    """List workspaces, of one user or of all."""
    items = _run(lambda rt: _all_pages(
        lambda cursor: rt.list_workspaces(user_id, limit=500, cursor=cursor)))
    _emit([i.model_dump(mode="json") for i in items], as_json, lambda: "\n".join(
        f"{w.id}\t{w.user_id}\t{w.status}\t{w.database.name if w.database else '-'}" for w in items)
        or "no workspaces")


# -- operations ---------------------------------------------------------------------------------------


@app.command()
def reconcile(fix: Annotated[bool, typer.Option("--fix", help="Drop databases and roles no record owns.")] = False,
              upgrade: Annotated[bool, typer.Option(
                  "--upgrade", help="First re-install agentpg's SQL in every tenant database (after an upgrade "
                                    "of agentpg: databases made earlier get today's isolation rules).")] = False,
              as_json: JsonOpt = False) -> None:
    """Finish or undo operations a crash left half-done; report (and with --fix drop) unowned databases."""
    report = _run(lambda rt: rt.reconcile(fix=fix, upgrade=upgrade))
    data = {**report.__dict__, "clean": report.clean}

    def human() -> str:
        lines = [f"finished: {len(report.finished)}, undone: {len(report.undone)}, "
                 f"in flight: {len(report.in_flight)}, failed: {len(report.failed)}"]
        lines += [f"  failed {f}" for f in report.failed]
        lines += [f"orphan database: {d}" for d in report.orphan_databases]
        lines += [f"orphan role: {r}" for r in report.orphan_roles]
        lines += [f"dropped: {d}" for d in report.dropped]
        if upgrade:
            lines.append(f"tenant SQL refreshed in {report.refreshed} databases")
            lines += [f"routine a tenant defined in a shared database (review, then drop it): {r}"
                      for r in report.tenant_code]
        if (report.orphan_databases or report.orphan_roles) and not fix:
            lines.append("run `agentpg reconcile --fix` to drop the orphans")
        return "\n".join(lines)

    _emit(data, as_json, human)
    if not report.clean:  # something still needs a human (or --fix): say so to scripts too
        raise typer.Exit(_EXIT_REFUSED)


@app.command()
def home() -> None:
    """Print the agentpg home (AGENTPG_HOME, or the default) without creating or starting anything, e.g.
    ``cat "$(agentpg home)/admin-token"``."""
    try:
        settings = Settings()
    except ValidationError as exc:
        raise _fail(f"invalid settings: {exc.errors()[0]['msg']}", 2) from None
    typer.echo(str(settings.home))


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Where the data lives, whether Postgres and the catalog answer, and how much is provisioned."""
    info, gateway = _run(lambda rt: (rt.status(), host().gateway_status(rt.settings)))
    data = {**info.model_dump(mode="json"), **gateway}
    _emit(data, as_json, lambda: "\n".join(f"{k}: {v}" for k, v in data.items()))


@app.command()
def serve(host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="TCP port.")] = 8080) -> None:
    """Run the HTTP service (REST API, MCP, health, metrics) with uvicorn."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # psycopg_pool logs every checkout and return at INFO: two records per agent call, for nothing an
    # operator acts on. Its warnings (connections failing, pools growing short) still come through.
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    # The SDK's stateless /mcp transport logs "Terminating session: None" at INFO after every request.
    logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)
    try:
        settings = Settings()
    except ValidationError as exc:
        raise _fail(f"invalid settings: {exc.errors()[0]['msg']}", 2) from None
    # uvicorn's "auto" choices pick uvloop and httptools (both dependencies): httptools' C parser answered
    # an MCP call ~0.2 ms sooner than h11 in bench measurements.
    cli_host().serve_http(settings, host, port)


@app.command("mcp")
def mcp_stdio(token: Annotated[str | None, typer.Option(
        envvar="AGENTPG_AGENT_TOKEN", show_default=False,
        help="The workspace's agent token (prefer the AGENTPG_AGENT_TOKEN variable: options show in `ps`).",
)] = None, server: Annotated[str | None, typer.Option(
        "--server", show_default=False,
        help="Relay one of the user's MCP server configs (the gateway, docs/gateway.md) instead of agentpg's "
             "own tools, e.g. postgres-global.",
)] = None) -> None:
    """Serve MCP over stdio for one agent (its workspace's databases), e.g. as an MCP client's command."""
    if not token:
        raise _fail("an agent token is required: set AGENTPG_AGENT_TOKEN or pass --token", 2)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # stderr
    def serve(rt: Service) -> None:
        try:
            host().serve_stdio(rt, token, server)
        except Unauthenticated:
            raise Unauthenticated(f"this agent token is unknown to {_where(rt.settings)}: it was never issued "
                                  "there, was revoked, or its workspace was deleted (issue one with POST "
                                  "/api/workspaces/{id}/tokens)") from None

    # Attach only: `agentpg mcp` serves the agents of an agentpg that `agentpg serve` set up; it never makes
    # a home or starts a server of its own, and says which home it looked in when something is missing.
    _run(serve, attach_only=True)


def _where(settings: Settings) -> str:
    """Which agentpg a process reached, in words: its home, or the server/catalog variable it used."""
    if settings.catalog_url is not None:
        return f"the agentpg whose catalog is AGENTPG_CATALOG_URL (home {settings.home})"
    if settings.postgres_url is not None:
        return f"the agentpg on the server of AGENTPG_POSTGRES_URL (home {settings.home})"
    if settings.fleet:
        return f"the agentpg on the first server of AGENTPG_FLEET (home {settings.home})"
    return f"the agentpg whose home is {settings.home} (AGENTPG_HOME)"


@postgres_app.command("stop")
def postgres_stop() -> None:
    """Stop the embedded PostgreSQL server (it starts again on the next command)."""
    settings = Settings()
    if settings.postgres_url is not None:
        raise _fail("AGENTPG_POSTGRES_URL is set: agentpg does not manage that server", _EXIT_REFUSED)
    host().stop_embedded(settings)
    typer.echo("embedded PostgreSQL stopped")


@postgres_app.command("start")
def postgres_start() -> None:
    """Start the embedded PostgreSQL server if it is not running."""
    _run(lambda rt: None)
    typer.echo("embedded PostgreSQL is running")


@pool_app.command("fill")
def pool_fill(size: Annotated[int | None, typer.Option(help="Target size (default AGENTPG_WARM_POOL_SIZE).")] = None,
              as_json: JsonOpt = False) -> None:
    """Create warm databases until the pool holds SIZE (serve does this in the background)."""
    made = _run(lambda rt: rt.admin.fill_warm_pool(size))
    _emit({"created": made}, as_json, lambda: f"{made} warm database(s) created")


@pool_app.command("drain")
def pool_drain(as_json: JsonOpt = False) -> None:
    """Drop every ready warm database."""
    dropped = _run(lambda rt: rt.admin.drain_warm_pool())
    _emit({"dropped": dropped}, as_json, lambda: f"{dropped} warm database(s) dropped")


# -- keys ---------------------------------------------------------------------------------------------


@keys_app.command("rotate")
def keys_rotate(batch_size: Annotated[int, typer.Option(min=1, max=100_000,
                                                        help="Values re-sealed per transaction.")] = 500,
                as_json: JsonOpt = False) -> None:
    """Add a new master key, re-seal every secret under it, then retire the old key once nothing uses it.

    Safe to interrupt: run it again and it resumes. Prints key ids and counts, never key material.
    """
    report = _run(lambda rt: rt.admin.rotate_keys(batch_size=batch_size))

    def human() -> str:
        lines = [f"added master key {report.added}; it is now active" if report.added
                 else f"active master key: {report.active}" + (" (resumed an interrupted rotation)"
                                                               if report.resumed else ""),
                 f"re-sealed {report.resealed} value(s) in {report.batches} batch(es) in {report.seconds:.1f}s"]
        if report.retired:
            lines.append(f"retired master key(s): {', '.join(report.retired)}")
        if report.removable:
            lines.append(f"no value uses key(s) {', '.join(report.removable)} any more: remove them from "
                         "AGENTPG_SECRET_KEY (keep the active key first) and restart every agentpg process")
        for kid, n in report.kept.items():
            lines.append(f"kept master key {kid}: {n} value(s) still use it")
        if not report.settled:
            lines.append("catalog transactions older than the rotation were still open; "
                         "run `agentpg keys rotate` again to finish")
        if report.unopenable_count:
            lines.append(f"{report.unopenable_count} value(s) do not open with any key in the ring "
                         "(fix or delete these rows, then run `agentpg keys rotate` again):")
            lines += [f"  {where}" for where in report.unopenable]
        return "\n".join(lines)

    _emit(report.to_json(), as_json, human)
    if not report.clean:
        raise typer.Exit(_EXIT_REFUSED)


@keys_app.command("status")
def keys_status(as_json: JsonOpt = False) -> None:
    """Key ids, which one is active, and how many sealed values use each (never key material)."""
    info = _run(lambda rt: rt.admin.key_status())

    def human() -> str:
        lines = [f"key ring: {info.path if info.path else 'AGENTPG_SECRET_KEY'}", "KEY\tACTIVE\tVALUES"]
        lines += [f"{k.id}\t{'*' if k.active else ''}\t{k.values}" for k in info.keys]
        lines += [f"{kid}\tMISSING\t{n}  (sealed under a key the ring does not hold)"
                  for kid, n in info.unknown.items()]
        if info.rotation_pending:
            lines.append("a rotation is in progress or was interrupted: run `agentpg keys rotate` to finish it")
        return "\n".join(lines)

    _emit(info.to_json(), as_json, human)


@usage_app.command("sync")
def usage_sync(as_json: JsonOpt = False) -> None:
    """Sample every database's usage, update costs and totals, and enforce budgets now."""
    report = _run(lambda rt: rt.sync_usage())
    _emit(report.__dict__, as_json, lambda: "another instance is syncing right now" if report.skipped else
          f"synced {report.databases} databases of {report.users} users; "
          f"read-only now: {len(report.made_read_only)}, writes restored: {len(report.writes_restored)}, "
          f"failed: {len(report.failed)}" + "".join(f"\n  failed {f}" for f in report.failed))


@usage_app.command("show")
def usage_show(user_id: str, as_json: JsonOpt = False) -> None:
    """A user's cost this period: global database, each agent database, backup storage, total, budget."""
    info = _run(lambda rt: rt.usage(user_id))
    _emit(info, as_json, lambda: "\n".join(
        [f"user {info.user_id}: {info.total_cost_cents} cents this period"
         + (f" of {info.budget_cents} ({info.percent_of_budget}%)" if info.budget_cents is not None else "")
         + f", {info.status}" + (", read-only" if info.read_only else "")]
        + ([f"  global  {info.global_database.cost_cents} cents"] if info.global_database else [])
        + [f"  agent {a.workspace_id}  {a.cost_cents} cents" for a in info.agent_databases]
        + [f"  backups  {info.backups.cost_cents} cents ({info.backups.bytes / 2**20:.1f} MB: this user's share of "
           "its servers' base backups and WAL)"]))


@usage_app.command("budget")
def usage_budget(user_id: str, budget_cents: Annotated[int | None, typer.Argument(
        help="Budget in cents for the period; omit to remove the budget.")] = None,
                 as_json: JsonOpt = False) -> None:
    """Set a user's budget (enforced at once against the last synced total)."""
    info = _run(lambda rt: rt.set_budget(user_id, budget_cents))
    _emit(info, as_json, lambda: f"budget of {user_id} is {info.budget_cents} cents; status {info.status}")


def main() -> None:  # pragma: no cover - console entry for python -m
    app(prog_name="agentpg")


if __name__ == "__main__":  # pragma: no cover
    main()
