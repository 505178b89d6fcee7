"""The attacker at the edges: OAuth (forged and stolen tokens, codes, redirect URIs, scope on refresh, consent
forms), the console (markup in table, column and tool names; cross-origin posts), exports (header injection),
/metrics and MCP scope checks, each with variants.

Each test asserts the safe outcome, never an error string: what must not happen (a write, a redirect to
another site, a secret in an answer) did not. Real servers only (uvicorn on loopback for OAuth/MCP, the
session's ASGI app for the console), real PostgreSQL. Open redirects, forwarded addresses and the gateway's
sessions are tested beside their features (test_mcp_oauth, test_resilience_limits, test_gateway).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import psycopg
import pytest
from helpers import global_uri
from joserfc import jwt
from joserfc.jwk import OctKey
from mcp_support import INIT, MCP_HEADERS, Tenants, live_server, uid
from test_mcp_oauth import REDIRECT

from agentpg.app.runtime import Runtime
from agentpg.service.oauth.keys import SigningKeys
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0})) as url:
        yield url


# -- helpers ------------------------------------------------------------------------------------------------


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def _call(tool: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


async def _sign_in(browser: httpx.AsyncClient, base: str, token: str) -> None:
    answer = await browser.post(f"{base}/explorer/login", data={"token": token}, headers={"Origin": base})
    assert answer.status_code == 303, answer.text[:300]


async def _register(client: httpx.AsyncClient, base: str, uris: list[str] | None = None, **extra: Any) -> str:
    body = {"redirect_uris": uris or [REDIRECT], "client_name": "redteam", "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"], **extra}
    answer = await client.post(f"{base}/oauth/register", json=body)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["client_id"])


def _authorize_url(base: str, client_id: str, challenge: str, redirect: str = REDIRECT, **extra: str) -> str:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect, "state": "st",
              "code_challenge": challenge, "code_challenge_method": "S256", **extra}
    return f"{base}/oauth/authorize?{urlencode(params)}"


async def _consent(browser: httpx.AsyncClient, base: str, url: str, workspace: str) -> httpx.Response:
    page = await browser.get(url)
    assert page.status_code == 200, page.text[:500]
    ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
    assert ticket
    return await browser.post(url, data={"ticket": html.unescape(ticket.group(1)), "decision": "allow",
                                         "workspace": workspace}, headers={"Origin": base})


async def _code(browser: httpx.AsyncClient, base: str, client_id: str, workspace: str,
                scope: str = "mcp:read mcp:write") -> tuple[str, str]:
    verifier, challenge = _pkce()
    answer = await _consent(browser, base, _authorize_url(base, client_id, challenge, scope=scope), workspace)
    assert answer.status_code == 303, answer.text[:300]
    return parse_qs(urlsplit(answer.headers["location"]).query)["code"][0], verifier


async def _grant(browser: httpx.AsyncClient, base: str, workspace: str,
                 scope: str = "mcp:read mcp:write") -> tuple[str, dict[str, Any]]:
    client_id = await _register(browser, base)
    code, verifier = await _code(browser, base, client_id, workspace, scope)
    answer = await browser.post(f"{base}/oauth/token", data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "client_id": client_id,
        "code_verifier": verifier})
    assert answer.status_code == 200, answer.text
    return client_id, dict(answer.json())


async def _mcp(client: httpx.AsyncClient, base: str, token: str, message: Any, path: str = "/mcp",
               **headers: str) -> httpx.Response:
    body = message if isinstance(message, (bytes, str)) else json.dumps(message)
    return await client.post(f"{base}{path}", content=body,
                             headers={**MCP_HEADERS, "Authorization": f"Bearer {token}", **headers})


def _claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# -- OAuth ----------------------------------------------------------------------------------------------------


async def test_oauth_refresh_cannot_widen_scope(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        await _sign_in(browser, base_url, tenants.user1_token)
        client_id, token = await _grant(browser, base_url, tenants.ws_a, scope="mcp:read")
        wider = await browser.post(f"{base_url}/oauth/token", data={
            "grant_type": "refresh_token", "refresh_token": token["refresh_token"], "client_id": client_id,
            "scope": "mcp:read mcp:write"})
        if wider.status_code == 200:  # must not carry write
            access = wider.json()["access_token"]
            table = "rt_" + secrets.token_hex(4)
            made = await _mcp(browser, base_url, access, _call("execute", database="agent",
                                                              sql=f"CREATE TABLE {table} (n int)"))
            assert made.status_code == 403, made.text
        else:
            assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope", wider.text


async def test_oauth_code_is_bound_to_client_verifier_and_single_use(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        await _sign_in(browser, base_url, tenants.user1_token)
        victim = await _register(browser, base_url)
        attacker = await _register(browser, base_url)
        code, verifier = await _code(browser, base_url, victim, tenants.ws_a)
        stolen = await browser.post(f"{base_url}/oauth/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "client_id": attacker,
            "code_verifier": verifier})
        assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
        code, verifier = await _code(browser, base_url, victim, tenants.ws_a)
        for missing in ({}, {"code_verifier": ""}, {"code_verifier": "a" * 43}):
            answer = await browser.post(f"{base_url}/oauth/token", data={
                "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "client_id": victim,
                **missing})
            assert answer.status_code == 400, answer.text
        # Another redirect_uri at the token endpoint than at the authorization (a loopback port change).
        code, verifier = await _code(browser, base_url, victim, tenants.ws_a)
        moved = await browser.post(f"{base_url}/oauth/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": "http://127.0.0.1:1/callback",
            "client_id": victim, "code_verifier": verifier})
        assert moved.status_code == 400, moved.text


async def test_oauth_forged_and_stale_jwts_are_refused(base_url: str, runtime: Runtime, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        await _sign_in(browser, base_url, tenants.user1_token)
        client_id, token = await _grant(browser, base_url, tenants.ws_a)
        good = _claims(token["access_token"])
        assert (await _mcp(browser, base_url, token["access_token"], INIT)).status_code == 200
        header = json.loads(base64.urlsafe_b64decode(token["access_token"].split(".")[0] + "=="))
        keys = SigningKeys(runtime.service.deps.keyring)
        key = keys.signing_key()

        def signed(claims: dict[str, Any], hdr: dict[str, Any] | None = None, k: OctKey = key) -> str:
            return jwt.encode(hdr or header, claims, k, algorithms=["HS256"])

        now = int(time.time())
        forged = {
            "alg none": f"{_b64({'alg': 'none', 'typ': 'at+jwt', 'kid': header['kid']})}.{_b64(good)}.",
            "alg none, signature kept": (f"{_b64({'alg': 'none', 'typ': 'at+jwt', 'kid': header['kid']})}."
                                         f"{_b64(good)}.{token['access_token'].split('.')[2]}"),
            "claims changed, old signature": (f"{token['access_token'].split('.')[0]}."
                                              f"{_b64({**good, 'scope': 'mcp:read mcp:write', 'exp': now + 9999})}."
                                              f"{token['access_token'].split('.')[2]}"),
            "another key": signed(good, k=OctKey.import_key(b"k" * 32)),
            "empty-ish key": signed(good, k=OctKey.import_key(b"\x00" * 32)),
            "expired": signed({**good, "exp": now - 60, "iat": now - 4000}),
            "typ JWT": signed(good, {**header, "typ": "JWT"}),
            "unknown kid": signed(good, {**header, "kid": "apg-nope"}),
            "other audience": signed({**good, "aud": "https://elsewhere.example/mcp"}),
            "other issuer": signed({**good, "iss": "https://elsewhere.example/"}),
            "unknown grant": signed({**good, "gid": "00000000-0000-0000-0000-000000000000"}),
            "no gid": signed({k: v for k, v in good.items() if k != "gid"}),
        }
        for what, raw in forged.items():
            answer = await _mcp(browser, base_url, raw, INIT)
            assert answer.status_code == 401, (what, answer.status_code, answer.text[:200])
        # A revoked grant's access token, re-signed with a fresh expiry, stays dead.
        revoked = await browser.post(f"{base_url}/oauth/revoke", data={"token": token["refresh_token"],
                                                                        "client_id": client_id})
        assert revoked.status_code == 200
        assert (await _mcp(browser, base_url, signed({**good, "exp": now + 600}), INIT)).status_code == 401


async def test_oauth_redirect_uri_tricks_at_authorize(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        await _sign_in(browser, base_url, tenants.user1_token)
        client_id = await _register(browser, base_url)
        challenge = _pkce()[1]
        for trick in ("http://127.0.0.1:8976/callback/evil", "http://127.0.0.1:8976/callbackx",
                      "http://127.0.0.1:8976/callback?next=https://evil.example", "https://127.0.0.1:8976/callback",
                      "http://localhost:8976/callback", "http://127.0.0.1:8976@evil.example/callback",
                      "http://127.0.0.1:8976/CALLBACK", "http://127.0.0.1:8976/callback/../x",
                      "javascript://127.0.0.1:8976/callback", "http://127.0.0.1.evil.example:8976/callback"):
            answer = await browser.get(_authorize_url(base_url, client_id, challenge, trick))
            assert answer.status_code == 400 and "location" not in answer.headers, (trick, answer.status_code)
        # A parser differential: Python reads the host as 127.0.0.1, a browser (WHATWG) as evil.example. If it is
        # accepted, the code must still not travel to a URL whose browser-host is evil.example.
        trick = "http://evil.example\\@127.0.0.1:8976/callback"
        page = await browser.get(_authorize_url(base_url, client_id, challenge, trick))
        if page.status_code == 200:
            answer = await _consent(browser, base_url, _authorize_url(base_url, client_id, challenge, trick),
                                    tenants.ws_a)
            location = answer.headers.get("location", "")
            assert "\\" not in location and urlsplit(location).hostname == "127.0.0.1", location
        else:
            assert page.status_code == 400


async def test_oauth_registration_refuses_dangerous_metadata(base_url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for uri in ("JavaScript:alert(1)", "javascript:alert(1)//http://127.0.0.1/", "data:text/html,<b>x</b>",
                    "vbscript:x", "file:///etc/passwd", "http://localhost.evil.example/cb",
                    "http://127.0.0.1.nip.io/cb", "http://evil.example#@127.0.0.1/cb", "https:///cb",
                    "http://[::ffff:7f00:1].evil.example/cb", " http://127.0.0.1/cb", "http://127.0.0.1/cb\r\nX: y",
                    "blob:https://evil.example/x", "about:blank", "https://ok.example/cb#frag"):
            answer = await client.post(f"{base_url}/oauth/register", json={"redirect_uris": [uri]})
            assert answer.status_code == 400 and answer.json()["error"] == "invalid_client_metadata", (uri, answer.text)
        many = await client.post(f"{base_url}/oauth/register",
                                 json={"redirect_uris": [f"http://127.0.0.1/cb{i}" for i in range(11)]})
        assert many.status_code == 400
        huge = await client.post(f"{base_url}/oauth/register",
                                 json={"redirect_uris": [REDIRECT], "client_name": "x" * 70_000})
        assert huge.status_code in (400, 413)
        deep = await client.post(f"{base_url}/oauth/register", content="[" * 50_000 + "]" * 50_000,
                                 headers={"Content-Type": "application/json"})
        assert 400 <= deep.status_code < 500
        bad_auth = await client.post(f"{base_url}/oauth/register", json={
            "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "private_key_jwt",
            "grant_types": ["client_credentials", "password"]})
        assert bad_auth.status_code == 400


async def test_oauth_consent_page_escapes_the_client_and_cannot_be_framed(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        await _sign_in(browser, base_url, tenants.user1_token)
        evil = '<img src=x onerror=alert(1)>"><script>alert(2)</script>'
        answer = await browser.post(f"{base_url}/oauth/register", json={
            "redirect_uris": ["com.evil.app:/cb'\"<x>"], "client_name": evil, "token_endpoint_auth_method": "none"})
        assert answer.status_code == 400  # quotes and angle brackets are not URI characters
        client_id = await _register(browser, base_url, ["evilapp://cb"], client_name=evil)
        page = await browser.get(_authorize_url(base_url, client_id, _pkce()[1], "evilapp://cb"))
        assert page.status_code == 200
        assert "<img src=x" not in page.text and "<script>alert" not in page.text
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and page.headers["x-frame-options"] == "DENY"
        assert "form-action 'self' evilapp:;" in policy and "\n" not in policy


async def test_oauth_tokens_reach_only_mcp(base_url: str, tenants: Tenants) -> None:
    """An OAuth access token is the workspace's agent on /mcp, nothing more: not the REST API, not the
    explorer, and not the gateway (where no scope is checked)."""
    async with httpx.AsyncClient(timeout=30) as browser:
        await _sign_in(browser, base_url, tenants.user1_token)
        _, token = await _grant(browser, base_url, tenants.ws_a, scope="mcp:read")
        access = token["access_token"]
    async with httpx.AsyncClient(timeout=30) as other:
        rest = await other.get(f"{base_url}/api/users/{tenants.user1}", headers={"Authorization": f"Bearer {access}"})
        assert rest.status_code == 401
        login = await other.post(f"{base_url}/explorer/login", data={"token": access}, headers={"Origin": base_url})
        assert login.status_code in (401, 403) and "set-cookie" not in login.headers
        for name in ("postgres-global", "postgres-agent"):
            gateway = await _mcp(other, base_url, access, INIT, path=f"/mcp/servers/{name}")
            assert gateway.status_code == 401, (name, gateway.status_code, gateway.text[:200])
        refresh = await other.post(f"{base_url}/mcp", content=json.dumps(INIT),
                                   headers={**MCP_HEADERS, "Authorization": f"Bearer {token['refresh_token']}"})
        assert refresh.status_code == 401


async def test_oauth_scope_check_is_not_dodged_by_message_tricks(base_url: str, runtime: Runtime,
                                                                 tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        await _sign_in(browser, base_url, tenants.user1_token)
        _, token = await _grant(browser, base_url, tenants.ws_b, scope="mcp:read")
        access = token["access_token"]
        table = "rt_" + secrets.token_hex(4)
        create = json.dumps({"database": "agent", "sql": f"CREATE TABLE {table} (n int)"})
        head = '{"jsonrpc":"2.0","id":7,'
        tricks = [  # duplicate keys (json.loads and the SDK's parser must agree), escapes, a BOM
            head + '"method":"tools/call","params":{"name":"query","arguments":' + create + ',"name":"execute"}}',
            head + '"method":"tools/list","params":{"name":"execute","arguments":' + create + '},'
            '"method":"tools/call"}',
            head + '"method":"tools\\/call","params":{"n\\u0061me":"execute","arguments":' + create + '}}',
            "\ufeff" + head + '"method":"tools/call","params":{"name":"execute","arguments":' + create + '}}',
        ]
        for body in tricks:
            await _mcp(browser, base_url, access, body.encode())
            await _mcp(browser, base_url, access, body.encode(), **{"MCP-Protocol-Version": "2025-06-18"})
        probe = await _mcp(browser, base_url, tenants.token_b, _call(
            "query", database="agent", sql="SELECT count(*) AS n FROM pg_tables WHERE tablename = $1",
            params=[table]))
        assert probe.json()["result"]["structuredContent"]["rows"] == [[0]], "a read-only token created a table"
        # Control: the same first message with the agent token (every right) does create it, so the probe sees it.
        await _mcp(browser, base_url, tenants.token_b, tricks[0].encode())
        again = await _mcp(browser, base_url, tenants.token_b, _call(
            "query", database="agent", sql="SELECT count(*) AS n FROM pg_tables WHERE tablename = $1",
            params=[table]))
        assert again.json()["result"]["structuredContent"]["rows"] == [[1]]


async def test_oauth_revocation_by_another_client_does_not_end_the_grant(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        await _sign_in(browser, base_url, tenants.user1_token)
        _, token = await _grant(browser, base_url, tenants.ws_a)
        stranger = await _register(browser, base_url)
        for which in ("access_token", "refresh_token"):
            await browser.post(f"{base_url}/oauth/revoke", data={"token": token[which], "client_id": stranger})
        assert (await _mcp(browser, base_url, token["access_token"], INIT)).status_code == 200


async def test_oauth_consent_post_needs_the_users_own_fresh_ticket(base_url: str, tenants: Tenants) -> None:
    """A ticket from user 2's consent page, replayed in user 1's session (or for another request), is refused;
    so is a consent for a workspace named by another user's internal id form."""
    async with httpx.AsyncClient(timeout=30) as one, httpx.AsyncClient(timeout=30) as two:
        await _sign_in(one, base_url, tenants.user1_token)
        await _sign_in(two, base_url, tenants.user2_token)
        client_id = await _register(one, base_url)
        url = _authorize_url(base_url, client_id, _pkce()[1])
        page = await two.get(url)
        ticket = html.unescape(re.search(r'name="ticket" value="([^"]+)"', page.text).group(1))  # type: ignore[union-attr]
        replay = await one.post(url, data={"ticket": ticket, "decision": "allow", "workspace": tenants.ws_a},
                                headers={"Origin": base_url})
        assert replay.status_code == 403
        own = await one.get(url)
        mine = html.unescape(re.search(r'name="ticket" value="([^"]+)"', own.text).group(1))  # type: ignore[union-attr]
        for workspace in (tenants.ws_c, f"{tenants.ws_c}~00000000", f"../{tenants.ws_c}", tenants.ws_a + "\x00"):
            answer = await one.post(url, data={"ticket": mine, "decision": "allow", "workspace": workspace},
                                    headers={"Origin": base_url})
            assert 400 <= answer.status_code < 500 and "location" not in answer.headers, (workspace, answer.status_code)


# -- limits ---------------------------------------------------------------------------------------------------


# -- REST and console ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(runtime: Runtime) -> Iterator[tuple[str, str]]:
    """A user whose global database holds tables, columns and values meant to break HTML and headers."""
    svc = runtime.service
    user = uid("rtx")
    svc.register_user(user)
    token = svc.issue_user_token(user).secret
    with psycopg.connect(global_uri(runtime, user), autocommit=True) as conn:
        conn.execute('CREATE TABLE "<img src=x onerror=alert(1)>" ("<script>alert(2)</script>" text PRIMARY KEY, '
                     '"b\'""><svg/onload=alert(3)>" text)')
        conn.execute('INSERT INTO "<img src=x onerror=alert(1)>" VALUES '
                     "('<script>alert(4)</script>', 'javascript:alert(5)'), ('x', '</textarea><svg onload=alert(6)>')")
        conn.execute('CREATE TABLE "a""; filename=evil.exe\r\nX-Injected: 1" (id int PRIMARY KEY)')
        conn.execute('CREATE TABLE "ref" (id int PRIMARY KEY, t text REFERENCES "<img src=x onerror=alert(1)>")')
        conn.execute("INSERT INTO ref VALUES (1, '<script>alert(4)</script>')")
    yield user, token
    svc.delete_user(user)


def test_console_escapes_hostile_names_and_values(web: Any, hostile: tuple[str, str]) -> None:
    user, token = hostile
    assert web.post("/explorer/login", data={"token": token}, headers={"Origin": "http://testserver"},
                    follow_redirects=False).status_code == 303
    base = f"/explorer/u/{user}/global"
    name = "<img src=x onerror=alert(1)>"
    pages = [base, f"{base}/schema", f"{base}/table?{urlencode({'name': name})}",
             f"{base}/table?{urlencode({'name': 'ref'})}",
             f"{base}/table?{urlencode({'name': name, 'q': '<script>alert(7)</script>'})}",
             f"{base}/sql?{urlencode({'table': name})}"]
    for url in pages:
        answer = web.get(url, follow_redirects=False)
        assert answer.status_code in (200, 422), (url, answer.status_code, answer.text[:300])
        _assert_no_injected_markup(url, answer.text)
        if url == base:  # the hostile table really is on the page, escaped
            assert "&lt;img src=x onerror=alert(1)&gt;" in answer.text
    sql = web.post(f"{base}/sql", data={"sql": 'SELECT * FROM "<img src=x onerror=alert(1)>"'},
                   headers={"Origin": "http://testserver"})
    assert sql.status_code == 200
    _assert_no_injected_markup("sql box", sql.text)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {k for k, _ in attrs}
        if tag in ("img", "svg", "iframe", "object", "embed") or (tag == "script" and "src" not in names):
            self.bad.append(tag)
        self.bad += [f"{tag}[{k}]" for k in names if k.startswith("on")]
        self.bad += [f"{tag}[{k}={v}]" for k, v in attrs if k in ("href", "src", "action") and v
                     and v.strip().lower().startswith("javascript:")]


def _assert_no_injected_markup(where: str, text: str) -> None:
    parser = _Tags()
    parser.feed(text)
    assert not parser.bad, (where, parser.bad)


def test_export_content_disposition_cannot_be_injected(api_client: Any, hostile: tuple[str, str]) -> None:
    user, token = hostile
    name = 'a"; filename=evil.exe\r\nX-Injected: 1'
    from urllib.parse import quote
    answer = api_client.get(f"/api/users/{user}/global-database/tables/{quote(name, safe='')}/export",
                            headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text[:300]
    disposition = answer.headers["content-disposition"]
    assert "x-injected" not in {k.lower() for k in answer.headers}
    assert "\r" not in disposition and "\n" not in disposition
    shape = r'attachment; filename="[A-Za-z0-9_.-]+"; filename\*=UTF-8\'\'[A-Za-z0-9%_.~-]+'
    assert re.fullmatch(shape, disposition), disposition
    for odd in ("..%2F..%2Fetc%2Fpasswd", "%2e%2e", "pg_catalog.pg_authid", "..", "%00"):
        res = api_client.get(f"/api/users/{user}/global-database/tables/{odd}/export",
                             headers={"Authorization": f"Bearer {token}"})
        assert 400 <= res.status_code < 500, (odd, res.status_code)


def test_console_posts_refuse_cross_site_variants(web: Any, runtime: Runtime, hostile: tuple[str, str]) -> None:
    user, token = hostile
    assert web.post("/explorer/login", data={"token": token}, headers={"Origin": "http://testserver"},
                    follow_redirects=False).status_code == 303
    target = f"/explorer/u/{user}/manage/workspaces"
    for headers in ({"Origin": "null"}, {"Origin": "http://testserver.evil.example"},
                    {"Origin": "http://testserver:81"}, {"Origin": "https://testserver"},
                    {"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "cross-site"}, {}):
        answer = web.post(target, data={"id": "csrf-" + secrets.token_hex(3)}, headers=headers,
                          follow_redirects=False)
        assert answer.status_code == 403, (headers, answer.status_code)
    plain = web.post(target, content="id=csrf-plain", headers={"Origin": "http://testserver",
                                                               "Content-Type": "text/plain"},
                     follow_redirects=False)
    assert 400 <= plain.status_code < 500
    assert runtime.service.list_workspaces(user, limit=100).items == []


def test_metrics_name_no_ids_or_tokens(api_client: Any, hostile: tuple[str, str]) -> None:
    user, token = hostile
    marker = "rtmark" + secrets.token_hex(4)
    api_client.get(f"/api/users/{user}", headers={"Authorization": f"Bearer {token}"})
    api_client.get(f"/api/users/{marker}/workspaces/{marker}", headers={"Authorization": f"Bearer {token}"})
    api_client.get(f"/{marker}/{token}")
    api_client.request("PROPFIND", f"/api/users/{marker}")
    metrics = api_client.get("/metrics").text
    for secret in (user, token, marker, token[:16]):
        assert secret not in metrics, secret


# -- gateway ------------------------------------------------------------------------------------------------
