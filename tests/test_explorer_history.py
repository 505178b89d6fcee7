"""The explorer's History page (issue 19): a database's checkpoints and audited statements on one timeline, with
"Restore to here" (in place, after a confirmation) and "Restore as a copy".

Over real HTTP against an archived server, like tests/test_undo.py: a private home whose embedded server
(fsync off) is archived by a ``serve`` run in this process (uvicorn). An agent creates a table, makes a
checkpoint and drops the table through MCP; the page shows both; restoring to just before the DROP brings the
table back (the agent sees it again through MCP); a copy from just before it holds it too; bad ids, a missing
confirmation, another user's database and a cross-site form get clear 4xx pages. Then the same page in
Chromium (Playwright, as tests/test_explorer_browser.py): "Restore as a copy" on a checkpoint, and the result.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from browser_support import chromium_browser, save_screenshot
from mcp import ClientSession
from mcp_support import http_session, live_server, ok, uid

from agentpg.app.runtime import admin_token
from agentpg.embedded import EmbeddedPostgres
from agentpg.settings import Settings
from agentpg.web.security import CSP

pytestmark = pytest.mark.timeout(600)
T = TypeVar("T")


@dataclass
class World:
    url: str
    admin: dict[str, str]
    user: str
    workspace: str
    agent_token: str
    user_token: str
    other_user: str
    checkpoint_id: str = ""
    drop_id: int = 0

    @property
    def history(self) -> str:
        return f"/explorer/u/{self.user}/global/history"

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.admin, timeout=120)

    @contextmanager
    def browser(self) -> Iterator[httpx.Client]:
        """A signed-in explorer session (the form's own POST; its forms send this Origin)."""
        with httpx.Client(base_url=self.url, timeout=120, headers={"Origin": self.url}) as client:
            signed = client.post("/explorer/login", data={"token": self.user_token})
            assert signed.status_code == 303, signed.text
            yield client

    def mcp(self, work: Callable[[ClientSession], Awaitable[T]]) -> T:
        """Run ``work`` in an agent's MCP session, on its own loop in a worker thread (Playwright's sync API
        owns this thread's loop in the browser test)."""
        async def call() -> T:
            async with http_session(self.url, self.agent_token) as session:
                return await work(session)

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, call()).result(timeout=120)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    home = Path(tempfile.mkdtemp(prefix="agentpg-history-", dir="/tmp"))
    home.chmod(0o711)
    settings = Settings(home=home, embedded_fsync=False, warm_pool_size=0, usage_sync_interval_s=0, backup_enabled=True)
    try:
        admin = {"Authorization": f"Bearer {admin_token(settings)}"}
        with live_server(settings) as url, httpx.Client(base_url=url, headers=admin, timeout=60) as api:
            deadline = time.monotonic() + 120
            while not all(s["protected"] for s in api.get("/api/backups").json()):
                assert time.monotonic() < deadline, api.get("/api/backups").json()
                time.sleep(0.3)
            user, other = uid("hist"), uid("histother")
            for who in (user, other):
                assert api.post("/api/users", json={"id": who}).status_code == 201
            created = api.post(f"/api/users/{user}/workspaces", json={"id": "agent"})
            assert created.status_code == 201, created.text
            answer = api.put(f"/api/users/{user}/workspaces/agent/global-database-permissions",
                             json={"can_read": True, "can_write": True, "can_create_tables": True,
                                   "can_drop_tables": True})
            assert answer.status_code == 200, answer.text
            user_token = api.post(f"/api/users/{user}/tokens").json()["token"]
            yield World(url, admin, user, "agent", created.json()["agent_token"]["token"], user_token,
                        other)
    finally:
        EmbeddedPostgres(home).stop()  # the server outlives serve (a detached daemon): stop it before its files go
        shutil.rmtree(home, ignore_errors=True)


def checked(world: World, response: httpx.Response, status: int) -> str:
    """The page's HTML, with its status, headers and the absence of secrets checked."""
    assert response.status_code == status, (response.status_code, response.text[:3000])
    assert response.headers["content-security-policy"] == CSP
    html = response.text
    for secret in (world.user_token, world.agent_token, world.admin["Authorization"].split()[1]):
        assert secret not in html
    assert "postgresql://" not in html and "apg_" not in html  # no URI, no internal database or role name
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and " style=" not in html
    return html


def restore(client: httpx.Client, world: World, **form: str) -> httpx.Response:
    return client.post(world.history + "/restore", data=form, follow_redirects=False)


async def _count(s: ClientSession) -> list[list[Any]]:
    return list((await ok(s, "query", database="global", sql="SELECT count(*) FROM keep"))["rows"])


def test_history_shows_the_drop_and_restores_before_it(world: World) -> None:
    async def make_history(s: ClientSession) -> str:
        await ok(s, "execute", database="global", sql="CREATE TABLE keep (id int PRIMARY KEY, note text)")
        await ok(s, "execute", database="global",
                 sql="INSERT INTO keep SELECT g, 'n' || g FROM generate_series(1, 7) g")
        made = (await ok(s, "checkpoint", database="global", name="before the cleanup"))["checkpoints"]
        await ok(s, "execute", database="global", sql="DROP TABLE keep")
        await ok(s, "execute", database="agent", sql="CREATE TABLE mine (n int)")
        return str(made[0]["id"])

    world.checkpoint_id = world.mcp(make_history)
    with world.browser() as web:
        html = checked(world, web.get(world.history), 200)
        assert '<h1>History</h1>' in html and 'aria-current="page">History</a>' in html
        assert "before the cleanup" in html and "agent agent" in html and "DROP TABLE keep" in html
        assert "CREATE TABLE mine" not in html  # the agent database's statement is on its own page
        drop = re.search(r'data-audit="(\d+)">\s*<td class="time">[^<]*</td>\s*<td><span class="badge">execute'
                         r'</span>\s*<code>DROP TABLE keep', html)
        assert drop is not None, html
        world.drop_id = int(drop.group(1))
        agent_page = checked(world, web.get(f"/explorer/u/{world.user}/agents/agent/history"), 200)
        assert "CREATE TABLE mine" in agent_page and "DROP TABLE keep" not in agent_page

        # In place asks first: the confirmation page; sent without the box ticked, it asks again (422).
        confirm = checked(world, restore(web, world, before_audit=str(world.drop_id), mode="in_place"), 200)
        assert "Restore in place?" in confirm and "DROP TABLE keep" in confirm and 'name="confirm"' in confirm
        again = restore(web, world, before_audit=str(world.drop_id), mode="in_place", step="confirm")
        assert "Tick the box" in checked(world, again, 422)
        still_dropped = world.mcp(lambda s: s.call_tool("query", {"database": "global",
                                                                   "sql": "SELECT count(*) FROM keep"}))
        assert still_dropped.is_error

        done = restore(web, world, before_audit=str(world.drop_id), mode="in_place", step="confirm", confirm="yes")
        assert done.status_code == 303, done.text
        assert done.headers["location"].startswith(world.history + "?restored=in_place&undo=")
        result = checked(world, web.get(done.headers["location"]), 200)
        assert "Restored" in result and "before restore" in result and "Undo this restore" in result
    assert world.mcp(_count) == [[7]]  # the agent sees the table again, through its own pooled path


def test_restore_as_a_copy_just_before_a_statement(world: World) -> None:
    assert world.drop_id, "runs after the test that makes the history"
    with world.browser() as web:
        made = restore(web, world, before_audit=str(world.drop_id), mode="new")  # no confirmation: nothing replaced
        assert made.status_code == 303, made.text
        copy_id = made.headers["location"].split("copy=")[1]
        page = checked(world, web.get(made.headers["location"]), 200)
        assert "Restored as a copy" in page and copy_id in page and "<code>keep</code>" in page
        assert f"just before audited statement #{world.drop_id}" in page
        assert "Restored copies of this database" in page
    with world.api() as api:
        assert api.delete(f"/api/users/{world.user}/restored-copies/{copy_id}").status_code == 204


def test_bad_requests_get_clear_pages(world: World) -> None:
    assert world.drop_id, "runs after the test that makes the history"
    with world.browser() as web:
        for form, status, words in (
                ({"checkpoint": "not-a-checkpoint", "mode": "new"}, 404, "does not exist"),
                ({"checkpoint": "0b1e6a9e-4c3f-4a52-9d4e-2b7c9f1d0a11", "mode": "new"}, 404, "does not exist"),
                ({"before_audit": "abc", "mode": "new"}, 422, "positive whole number"),
                ({"before_audit": "9" * 30, "mode": "new"}, 422, "positive whole number"),
                ({"before_audit": "999999999", "mode": "in_place"}, 404, "not a statement on this database"),
                ({"before_audit": str(2**63 - 2), "mode": "new"}, 404, "not a statement on this database"),
                ({"before_audit": str(2**63 - 1), "mode": "new"}, 422, "positive whole number"),
                ({"before_audit": str(world.drop_id), "checkpoint": world.checkpoint_id, "mode": "new"}, 422,
                 "name one point"),
                ({"mode": "new"}, 422, "name one point"),
                ({"checkpoint": world.checkpoint_id, "mode": "sideways"}, 422, "restore as a copy")):
            html = checked(world, restore(web, world, **form), status)
            assert words in html and 'role="alert"' in html, form
        # The DROP ran on the global database: it is no point of the agent database's history.
        wrong_db = web.post(f"/explorer/u/{world.user}/agents/agent/history/restore",
                            data={"before_audit": str(world.drop_id), "mode": "new"})
        assert "not a statement on this database" in checked(world, wrong_db, 404)
        # Another user's database is "not found"; a form from another site is refused before any work.
        assert web.get(f"/explorer/u/{world.other_user}/global/history").status_code == 404
        forged = web.post(world.history + "/restore", data={"checkpoint": world.checkpoint_id, "mode": "new"},
                          headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403
        for cursor in ("x", "9" * 19):  # not a number; past bigint
            assert "cursor" in checked(world, web.get(world.history, params={"cursor": cursor}), 422)
    with world.api() as api:
        assert api.get(f"/api/users/{world.user}/restored-copies").json()["items"] == []


def test_restore_as_a_copy_in_a_browser(world: World) -> None:
    assert world.checkpoint_id, "runs after the test that makes the history"
    problems: list[str] = []
    with chromium_browser() as browser:
        tab = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        tab.on("pageerror", lambda e: problems.append(str(e)))
        tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        tab.set_default_timeout(60_000)
        tab.goto(world.url + "/")
        tab.fill("#token", world.user_token)
        tab.get_by_role("button", name="Sign in").click()
        tab.locator("#databases tbody tr").nth(0).get_by_role("link", name="Tables").click()
        tab.get_by_role("link", name="History", exact=True).click()
        tab.get_by_role("heading", name="History", level=1).wait_for()
        save_screenshot(tab.screenshot(full_page=True), "20-history")
        row = tab.locator(f'tr[data-checkpoint="{world.checkpoint_id}"]')
        row.get_by_role("button", name="Restore as a copy").click()
        result = tab.locator("#history-result")
        result.get_by_role("heading", name="Restored as a copy").wait_for()
        assert "keep" in result.inner_text() and "before the cleanup" in result.inner_text()
        copy_id = tab.locator("#copy-id").inner_text()
        save_screenshot(tab.screenshot(full_page=True), "21-history-copy")
        # In place asks first (a page, no script): seen here on a phone in dark mode, then cancelled.
        tab.set_viewport_size({"width": 390, "height": 844})
        tab.emulate_media(color_scheme="dark")
        row.get_by_role("button", name="Restore to here").click()
        tab.get_by_role("heading", name="Restore in place?").wait_for()
        assert tab.get_by_label("I understand").is_visible()
        save_screenshot(tab.screenshot(full_page=True), "22-history-confirm")
        tab.get_by_role("link", name="Cancel").click()
        tab.get_by_role("heading", name="History", level=1).wait_for()
        browser.close()
    assert not problems, problems
    with world.api() as api:
        assert api.delete(f"/api/users/{world.user}/restored-copies/{copy_id}").status_code == 204
