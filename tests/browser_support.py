"""Support for the explorer's tests: seeded tenants, the system Chromium (installed by the set-up when it is
missing), page checks (leak scan, passwords, role names) and screenshots.

The browser is Debian's ``chromium`` package driven by Playwright for Python (its wheel bundles the driver;
``playwright install`` is never run: the browser it would download is not needed). When
``/usr/bin/chromium`` is absent, :func:`ensure_chromium` runs ``apt-get update`` and
``apt-get install -y --no-install-recommends chromium`` (as root, as the suite runs in CI) and fails with a
clear message if that fails: the browser tests are never skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import leakscan
import psycopg
from api_support import role_names
from helpers import agent_db_uri, global_uri, workspace_global_uri
from install_lock import install_lock
from psycopg.conninfo import make_conninfo

from agentpg.access import audit as audit_log
from agentpg.app.runtime import Runtime, admin_token
from agentpg.web.security import COOKIE, seal_session

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
DOCS_SCREENSHOT = ROOT / "docs" / "explorer.png"
DOCS_SCREENSHOT_MAX_BYTES = 300 * 1024


def ensure_chromium() -> Path:
    """The system Chromium, installed with apt-get first if it is missing (never skipped). Under the ``apt``
    install lock: another xdist worker may be running apt-get (dpkg allows one at a time)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{CHROMIUM} is missing and there is no apt-get to install Debian's chromium package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"])
    with install_lock("apt"):
        for step in steps if not CHROMIUM.exists() else ():  # the holder before us may have installed it
            done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=1200, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"installing the browser for the explorer tests failed: `{' '.join(step)}` "
                                   f"exited {done.returncode} (the suite must run as root on Debian):\n"
                                   f"{done.stderr[-2000:]}")
    if not CHROMIUM.exists():
        raise RuntimeError(f"apt-get installed chromium but {CHROMIUM} does not exist")
    return CHROMIUM


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


CUSTOMERS = """
CREATE TABLE customers (
  id integer PRIMARY KEY,
  name text NOT NULL,
  email text,
  tier text,
  profile jsonb,
  notes text,
  balance numeric(12,2),
  created_at timestamptz NOT NULL DEFAULT '2024-05-01 12:00:00+00'
)"""
FILL_CUSTOMERS = """
INSERT INTO customers (id, name, email, tier, profile, notes, balance)
SELECT g, 'customer ' || lpad(g::text, 3, '0'),
       CASE WHEN g % 10 = 0 THEN NULL WHEN g % 10 = 5 THEN '' ELSE 'c' || g || '@example.com' END,
       (ARRAY['gold', 'silver', 'bronze'])[1 + g % 3],
       jsonb_build_object('visits', g, 'tags', jsonb_build_array('new', 'vip'), 'address',
                          jsonb_build_object('city', 'Lyon', 'zip', '69001')),
       CASE WHEN g = 1 THEN repeat('a very long note ', 30) || 'THE END' ELSE 'note ' || g END,
       (g * 1.25)::numeric(12,2)
FROM generate_series(1, 250) AS g"""
ORDERS = "CREATE TABLE orders (id integer PRIMARY KEY, customer_id integer REFERENCES customers(id), total numeric)"


@dataclass
class Tenant:
    """A user with two agents (a, b) whose global database holds ``customers`` (250 rows) and ``orders``,
    and a second user with one agent, whose data must stay unreachable."""

    user: str
    ws_a: str
    ws_b: str
    user_token: str
    token_a: str
    token_b: str
    other_user: str
    other_ws: str
    other_token: str
    admin_token: str
    passwords: set[str] = field(default_factory=set)


def make_tenant(runtime: Runtime, *, seed_directly: bool) -> Tenant:
    """Register the users; with ``seed_directly`` create the tables as agent a's own role (else the test does
    it through MCP, which also fills the audit log)."""
    svc = runtime.service
    user, other = uid("xu"), uid("xo")
    ws_a, ws_b, ws_o = uid("research"), uid("support"), uid("xw")
    svc.register_user(user, f"{user}@example.com")
    svc.register_user(other)
    _, a = svc.create_workspace_with_token(user, ws_a, "Research agent")
    _, b = svc.create_workspace_with_token(user, ws_b, "Support bot")
    svc.create_workspace_with_token(other, ws_o, "Other agent")
    t = Tenant(user=user, ws_a=ws_a, ws_b=ws_b, user_token=svc.issue_user_token(user).secret, token_a=a.secret,
               token_b=b.secret, other_user=other, other_ws=ws_o, other_token=svc.issue_user_token(other).secret,
               admin_token=admin_token(runtime.settings))
    uris = [global_uri(runtime, user), global_uri(runtime, other), agent_db_uri(runtime, ws_a),
            agent_db_uri(runtime, ws_o), *(workspace_global_uri(runtime, w) for w in (ws_a, ws_b, ws_o))]
    t.passwords = {p for p in (urlsplit(u).password for u in uris) if p}
    with psycopg.connect(global_uri(runtime, other), autocommit=True) as conn:
        conn.execute("CREATE TABLE other_secrets (id int PRIMARY KEY, secret text)")
        conn.execute("INSERT INTO other_secrets VALUES (1, 'OTHER-USER-SECRET-VALUE')")
    if seed_directly:
        with psycopg.connect(workspace_global_uri(runtime, ws_a), autocommit=True) as conn:
            for statement in (CUSTOMERS, FILL_CUSTOMERS, ORDERS, "INSERT INTO orders VALUES (1, 1, 9.5)"):
                conn.execute(statement)
        # Agents cannot define functions in the shared database; the operator (a trusted principal) can: a
        # function that writes, for the SQL box's READ ONLY test.
        dbname = urlsplit(global_uri(runtime, user)).path.lstrip("/")
        with psycopg.connect(make_conninfo(runtime.admin_dsn, dbname=dbname), autocommit=True) as conn:
            conn.execute("CREATE FUNCTION public.touch_customers() RETURNS integer LANGUAGE sql AS "
                         "'UPDATE public.customers SET tier = tier RETURNING 1'")
        for outcome, statement in (("ok", "SELECT * FROM customers WHERE id = $1"),
                                   ("denied", "DROP TABLE customers")):
            audit_log.record(svc.deps.sessions, audit_log.AuditRecord(
                user_id=user, workspace_id=ws_a, tool="query" if outcome == "ok" else "execute", outcome=outcome,
                duration_ms=3.0, database="global", statement=statement, rows=1 if outcome == "ok" else None,
                error=None if outcome == "ok" else "42501 InsufficientPrivilege"))
    return t


def drop_tenant(runtime: Runtime, t: Tenant) -> None:
    for user in (t.user, t.other_user):
        try:
            runtime.service.delete_user(user)
        except Exception:  # noqa: S112 - best effort: a failed test may have left it half-made
            continue


def check_page(runtime: Runtime, t: Tenant, source: str, html: str, *, echoes_ids: bool = False,
               admin: bool = False) -> None:
    """Hand the page to the suite's leak scanner, and check it shows no password, role name or other user's
    data (``echoes_ids``: a "not found" page may repeat the id the caller typed, nothing more)."""
    leakscan.record(source, html)
    for password in t.passwords:
        assert password not in html, f"{source}: a tenant password appears in the page"
    for role in role_names(runtime):
        assert role not in html, f"{source}: a tenant role name appears in the page"
    assert not re.search(r"postgres(?:ql)?://", html), f"{source}: a connection string appears in the page"
    for token in (t.user_token, t.admin_token, t.token_a, t.token_b, t.other_token):
        assert token not in html, f"{source}: a token appears in the page"
    if admin:  # the admin token may see every user (still no secret)
        return
    assert "OTHER-USER-SECRET-VALUE" not in html, f"{source}: another user's data"
    if not echoes_ids:
        assert t.other_ws not in html and "Other agent" not in html, f"{source}: another user's agent"


def save_screenshot(png: bytes, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(png)
    return path


def publish_docs_screenshot(path: Path) -> None:
    """Copy one screenshot to docs/explorer.png (for the README) when it is missing or asked for
    (``AGENTPG_UPDATE_DOCS_SCREENSHOT=1``), so ordinary runs do not rewrite a committed file."""
    assert path.stat().st_size < DOCS_SCREENSHOT_MAX_BYTES, f"{path} is {path.stat().st_size} bytes"
    if not DOCS_SCREENSHOT.exists() or os.environ.get("AGENTPG_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(path, DOCS_SCREENSHOT)


@contextmanager
def chromium_browser() -> Iterator[Any]:
    """Real Chromium (installed by the test set-up if missing), headless; closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(ensure_chromium()), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def watch_errors(tab: Any, problems: list[str], *, failed_loads_expected: bool = True) -> None:
    """Collect script errors and console errors (a CSP violation is one) of ``tab`` into ``problems``. A 4xx
    page makes Chromium log "Failed to load resource": expected where a test asks for one."""
    tab.on("console", lambda m: problems.append(m.text) if m.type == "error" and not (
        failed_loads_expected and m.text.startswith("Failed to load resource")) else None)
    tab.on("pageerror", lambda e: problems.append(str(e)))


def sign_in(tab: Any, base_url: str, token: str, user: str) -> None:
    """Through the sign-in form, as a person would; lands on the user's databases."""
    tab.goto(base_url + "/")
    tab.fill("#token", token)
    tab.click("button:has-text('Sign in')")
    tab.wait_for_url(f"**/explorer/u/{user}")


def as_user(client: Any, runtime: Runtime, token: str) -> None:
    """A signed-in session without going through the form (the form has its own test)."""
    client.cookies.set(COOKIE, seal_session(runtime.service, token))
