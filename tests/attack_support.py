"""The attacker's tools for tests/test_attack_postgres*.py and test_attack_tools.py: a world of agents
(:func:`open_world`), one agent reached through MCP or directly as its Postgres role, a watcher that records
everything an agent can see of other sessions while something runs, and the user's ways of reading a table
(REST, export, explorer grid, SQL box).

An attack may be blocked at any step: every attacker step here reports whether it ran instead of raising, so
a test fails only on the outcome (the forbidden data reached the attacker, a function became SECURITY
DEFINER, a write happened, another tenant showed), never because a step was refused.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psycopg
from helpers import agent_db_uri, global_uri, with_database, workspace_global_uri
from mcp import ClientSession, types
from mcp_support import http_session, live_server, uid

from agentpg.access.permissions import GlobalDbPermissions
from agentpg.app.runtime import Runtime, admin_token
from agentpg.settings import Settings
from agentpg.web.security import COOKIE, seal_session

Conn = psycopg.Connection[tuple[Any, ...]]
VIAS = ("mcp", "direct")
ORIGIN = {"Origin": "http://testserver"}


def _text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


@dataclass
class Agent:
    """One agent, driven through the MCP tools (``session``) or connected as its own role (``conn``)."""

    name: str
    database: str
    session: ClientSession | None = None
    conn: Conn | None = None
    errors: list[str] = field(default_factory=list)

    async def run(self, statement: str) -> bool:
        """Run one statement; True if it ran, False if anything (agentpg or Postgres) refused it."""
        return await self.rows(statement) is not None

    async def rows(self, statement: str) -> list[list[Any]] | None:
        """The rows of one statement (``[]`` without a result), or None when it was refused."""
        if self.conn is not None:
            try:
                cur = self.conn.execute(statement)  # type: ignore[arg-type]
                return [list(r) for r in cur.fetchall()] if cur.description else []
            except psycopg.Error as exc:
                self.errors.append(f"{statement[:60]}: {str(exc).splitlines()[0] if str(exc) else exc!r}")
                return None
        assert self.session is not None
        message = ""
        for tool in ("execute", "query"):
            result = await self.session.call_tool(tool, {"database": self.database, "sql": statement})
            if not result.is_error:
                content = result.structured_content or {}
                return [list(r) for r in content.get("rows") or []]
            message = _text(result)
            if "query tool" not in message.lower() and "execute tool" not in message.lower():
                break
        self.errors.append(f"{statement[:60]}: {message[:200]}")
        return None

    async def all(self, *statements: str) -> bool:
        """Run statements in order until one is refused; True if all ran."""
        for statement in statements:
            if not await self.run(statement):
                return False
        return True

    async def text(self, statement: str) -> str:
        """Everything one read returns, as one string ("" when refused)."""
        return repr(await self.rows(statement) or [])


@dataclass
class World:
    """One user (agents a, b, d, r, w) and another user (agent c), with a secret only some may read."""

    runtime: Runtime
    base_url: str
    user: str
    other_user: str
    ws: dict[str, str]
    tokens: dict[str, str]
    user_token: str
    admin_token: str
    marker: str
    """The text in ``secret.x`` (lowercase letters and digits: one token whatever parses it)."""
    number: int
    """The number in ``secret.n``."""
    global_db: str
    roles: dict[str, str]
    """Each agent's role in the global database."""
    forbidden: set[str]
    """Names of other tenants' databases and roles: none may ever reach agent a."""

    def leaked(self, *texts: object) -> list[str]:
        """The texts that carry the secret (its text or its number)."""
        return [str(t)[:300] for t in texts
                if self.marker in str(t).lower() or str(self.number) in str(t)]

    def tenant_admin(self, database: str | None = None) -> Conn:
        """A superuser connection to the user's global database (or to ``database``)."""
        return psycopg.connect(with_database(self.runtime.admin_dsn, database or self.global_db), autocommit=True)

    def uri(self, name: str, database: str = "global") -> str:
        ws = self.ws[name]
        return workspace_global_uri(self.runtime, ws) if database == "global" else agent_db_uri(self.runtime, ws)

    @asynccontextmanager
    async def agent(self, name: str, via: str, database: str = "global") -> AsyncIterator[Agent]:
        if via == "direct":
            with psycopg.connect(self.uri(name, database), autocommit=True) as conn:
                agent = Agent(name, database, conn=conn)
                yield agent
        else:
            async with http_session(self.base_url, self.tokens[name]) as session:
                agent = Agent(name, database, session=session)
                yield agent
        if os.environ.get("ATTACK_DEBUG"):  # what was refused, to see which step blocked an attack
            print(f"[{name} via {via}] refused:", *agent.errors, sep="\n  ")


@contextmanager
def open_world(runtime: Runtime, settings: Settings, prefix: str, agents: Sequence[str],
               permissions: dict[str, dict[str, Any]],
               forbidden: Callable[[dict[str, str], str], set[str]] | None = None) -> Iterator[World]:
    """A :class:`World`: one user with ``agents`` (each a workspace; ``c`` belongs to another user), their
    ``permissions`` (GlobalDbPermissions fields), the user's ``secret`` table, and a live serve; both users
    deleted afterwards. ``forbidden(ws, other_user)`` names what must never reach the attacker."""
    svc = runtime.service
    user, other = uid(prefix), uid(prefix)
    svc.register_user(user)
    svc.register_user(other)
    ws: dict[str, str] = {}
    tokens: dict[str, str] = {}
    for name in agents:
        ws[name] = uid(f"{prefix}{name}")
        _, issued = svc.create_workspace_with_token(other if name == "c" else user, ws[name])
        tokens[name] = issued.secret
    for name, flags in permissions.items():
        svc.set_agent_permissions(ws[name], GlobalDbPermissions.model_validate(flags))
    marker = "zq" + uuid.uuid4().hex[:14]
    number = random.randint(1_900_000_000, 2_100_000_000)
    with psycopg.connect(global_uri(runtime, user), autocommit=True) as conn:  # the user's own data
        conn.execute("CREATE TABLE secret (x text, n int)")
        conn.execute("INSERT INTO secret VALUES (%s, %s)", (marker, number))
    roles = {name: role_of(workspace_global_uri(runtime, ws[name])) for name in ws}
    denied = forbidden(ws, other) if forbidden is not None else set()
    try:
        with live_server(settings.model_copy(update={"warm_pool_size": 0, "mcp_statement_timeout_s": 5.0})) as url:
            yield World(runtime=runtime, base_url=url, user=user, other_user=other, ws=ws, tokens=tokens,
                        user_token=svc.issue_user_token(user).secret, admin_token=admin_token(runtime.settings),
                        marker=marker, number=number, global_db=db_of(global_uri(runtime, user)), roles=roles,
                        forbidden=denied)
    finally:
        svc.delete_user(user)
        svc.delete_user(other)


def db_of(uri: str) -> str:
    return urlsplit(uri).path.lstrip("/")


def role_of(uri: str) -> str:
    return urlsplit(uri).username or ""


WATCH = (
    "SELECT application_name FROM pg_stat_activity",
    "SELECT s::text FROM pg_stat_get_activity(NULL) s",
    "SELECT objid::text, classid::text FROM pg_locks WHERE locktype = 'advisory'",
)


class Watcher:
    """An agent's own connection that, while something runs, polls what it can see of other sessions
    (application names, advisory locks) and receives the notifications of the channels it listens on."""

    def __init__(self, uri: str, channels: Sequence[str] = ()) -> None:
        self.conn: Conn = psycopg.connect(uri, autocommit=True)
        self.seen: list[str] = []
        for channel in channels:
            with suppress(psycopg.Error):
                self.conn.execute(f'LISTEN "{channel}"')  # type: ignore[arg-type]
        self.conn.add_notify_handler(lambda n: self.seen.append(f"notify {n.channel}: {n.payload}"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="attack-watcher", daemon=True)

    def _look(self) -> None:
        for statement in WATCH:
            with suppress(psycopg.Error):
                self.seen.extend(repr(r) for r in self.conn.execute(statement).fetchall())  # type: ignore[arg-type]

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._look()
            time.sleep(0.01)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)
        self._stop.set()
        self._thread.join(10)
        self._look()  # the last look also delivers notifications still queued
        self.conn.close()


@contextmanager
def watching(uri: str, channels: Sequence[str] = ()) -> Iterator[Watcher]:
    with Watcher(uri, channels) as watcher:
        yield watcher


def as_user(client: Any, world: World) -> None:
    """The explorer session of the user (signed in with its user token)."""
    client.cookies.set(COOKIE, seal_session(world.runtime.service, world.user_token))


def user_reads(client: Any, world: World, table: str, workspace: str | None = None) -> list[str]:
    """The user reads ``table`` every way agentpg offers (REST rows, REST export, explorer grid, SQL box);
    the bodies of the answers, whatever their status."""
    admin_h = {"Authorization": f"Bearer {world.admin_token}"}
    quoted = '"' + table.replace('"', '""') + '"'
    if workspace is None:
        rest = f"/api/users/{world.user}/global-database"
        page = f"/explorer/u/{world.user}/global"
    else:
        rest = f"/api/workspaces/{workspace}/database"
        page = f"/explorer/u/{world.user}/agents/{workspace}"
    bodies = [client.post(f"{rest}/query", json={"table": table, "limit": 10}, headers=admin_h).text,
              client.get(f"{rest}/tables/{table}/export", params={"format": "csv"}, headers=admin_h).text]
    as_user(client, world)
    try:
        bodies.append(client.get(f"{page}/table", params={"name": table}).text)
        bodies.append(client.post(f"{page}/sql", data={"sql": f"SELECT * FROM public.{quoted}"},
                                  headers=ORIGIN).text)
    finally:
        client.cookies.clear()
    return bodies


def sql_box(client: Any, world: World, statement: str) -> tuple[int, str]:
    """The user runs ``statement`` in the explorer's SQL box on the global database."""
    as_user(client, world)
    try:
        response = client.post(f"/explorer/u/{world.user}/global/sql", data={"sql": statement}, headers=ORIGIN)
    finally:
        client.cookies.clear()
    return response.status_code, str(response.text)


def maintain(world: World, tables: Sequence[str], database: str | None = None) -> list[str]:
    """What the operator (and autovacuum) runs: ANALYZE, VACUUM, REINDEX, CLUSTER as the superuser, each
    allowed to fail. Returns the failures (for messages)."""
    failures: list[str] = []
    with world.tenant_admin(database) as adm:
        for table in tables:
            if adm.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone() == (None,):
                continue
            indexes = [r[0] for r in adm.execute(
                "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = %s::regclass",
                (f"public.{table}",)).fetchall()]
            statements = [f"ANALYZE public.{table}", f"VACUUM (ANALYZE) public.{table}",
                          f"REINDEX TABLE public.{table}"]
            statements += [f"CLUSTER public.{table} USING {index.split('.')[-1]}" for index in indexes]
            for statement in statements:
                try:
                    adm.execute(statement)  # type: ignore[arg-type]
                except psycopg.Error as exc:
                    failures.append(f"{statement}: {str(exc).splitlines()[0]}")
        with suppress(psycopg.Error):
            adm.execute("ANALYZE")  # the whole database, as autovacuum would
    return failures


def relation_rows(world: World, table: str, database: str | None = None) -> str:
    """Everything in ``table`` (as the superuser), "" when it does not exist."""
    with world.tenant_admin(database) as adm:
        if adm.execute("SELECT to_regclass(%s)", (f"public.{table}",)).fetchone() == (None,):
            return ""
        return repr(adm.execute(f"SELECT t::text FROM public.{table} t").fetchall())  # type: ignore[arg-type]


def is_invoker(options: Sequence[str] | None) -> bool:
    for option in options or ():
        key, _, value = option.partition("=")
        if key == "security_invoker":
            return value.lower() in ("true", "on", "1", "yes", "t", "y")
    return False
