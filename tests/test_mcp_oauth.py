"""OAuth for remote MCP clients (issue 20): agentpg as the authorization server of its own ``/mcp``.

Against a real ``serve`` app (uvicorn on loopback, in this process) over HTTP: the MCP SDK 2.x client's
``OAuthClientProvider`` runs the whole flow (401 → protected-resource metadata → server metadata → dynamic
registration → authorize with PKCE, the "browser" being an HTTP client holding the explorer's session
cookie → token → tools on /mcp as the workspace's agent); then raw requests check the metadata documents,
the 401/403 challenges, audience and scope checks, refresh rotation and reuse detection, PKCE, revocation,
a deleted workspace, sign-in via the explorer, and that bad input is a 4xx OAuth error.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import httpx2
import pytest
from leakscan import LeakScanner
from mcp import ClientSession
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from mcp_support import MCP_HEADERS, Tenants, http_session, live_server, ok, uid

from agentpg.app.runtime import Runtime
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio

REDIRECT = "http://127.0.0.1:8976/callback"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0})) as url:
        yield url


def _call(tool: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


def _claims(jwt: str) -> dict[str, Any]:
    part = jwt.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


async def _signed_in(client: httpx.AsyncClient, base: str, token: str) -> None:
    """Sign the "browser" in to the explorer (its session cookie is what the consent page needs)."""
    answer = await client.post(f"{base}/explorer/login", data={"token": token}, headers={"Origin": base})
    assert answer.status_code == 303 and "agentpg_explorer=" in answer.headers["set-cookie"]


async def _consent(browser: httpx.AsyncClient, base: str, url: str, workspace: str | None,
                   decision: str = "allow") -> str:
    """Open the authorization URL in the signed-in "browser", pick ``workspace`` and decide; the redirect."""
    page = await browser.get(url)
    assert page.status_code == 200, page.text[:500]
    policy = page.headers["Content-Security-Policy"]  # unframeable; the form may lead to the client only
    assert "frame-ancestors 'none'" in policy and "form-action 'self' http://127.0.0.1:8976;" in policy
    ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
    action = re.search(r'<form method="post" action="([^"]+)" class="stack" id="consent-form">', page.text)
    assert ticket and action
    form = {"ticket": html.unescape(ticket.group(1)), "decision": decision}
    if workspace is not None:
        form["workspace"] = workspace
    answer = await browser.post(base + html.unescape(action.group(1)), data=form, headers={"Origin": base})
    assert answer.status_code == 303, answer.text[:500]
    return answer.headers["location"]


@dataclass
class Grant:
    client_id: str
    access: str
    refresh: str
    scope: str


async def _register(client: httpx.AsyncClient, base: str, **extra: Any) -> dict[str, Any]:
    body = {"redirect_uris": [REDIRECT], "client_name": "raw test client", "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"], **extra}
    answer = await client.post(f"{base}/oauth/register", json=body)
    assert answer.status_code == 201, answer.text
    assert "client_secret" not in answer.json()
    return dict(answer.json())


def _authorize_url(base: str, client_id: str, challenge: str, **extra: str) -> str:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "st",
              "code_challenge": challenge, "code_challenge_method": "S256", "resource": f"{base}/mcp", **extra}
    return f"{base}/oauth/authorize?{urlencode(params)}"


def _watch(scanner: LeakScanner, access: str, refresh: str | None) -> None:
    """Have the suite's leak scanner look for these tokens in every log record and recorded output (a JWT by
    its signature, the part that makes it usable)."""
    scanner.add_plaintext(access.rsplit(".", 1)[-1])
    if refresh:
        scanner.add_plaintext(refresh)


async def _flow(browser: httpx.AsyncClient, base: str, workspace: str, *, scope: str = "mcp:read mcp:write",
                resource_base: str | None = None, scanner: LeakScanner | None = None) -> Grant:
    """The flow by hand: register, consent, exchange the code. ``resource_base``: reach the server by
    another name (the tokens' audience is then that name's /mcp)."""
    at = resource_base or base
    client = await _register(browser, at)
    verifier, challenge = _pkce()
    location = await _consent(browser, at, _authorize_url(at, client["client_id"], challenge, scope=scope),
                              workspace)
    query = parse_qs(urlsplit(location).query)
    assert location.startswith(REDIRECT) and query["state"] == ["st"] and query["iss"] == [f"{at}/"]
    answer = await browser.post(f"{at}/oauth/token", data={
        "grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": REDIRECT,
        "client_id": client["client_id"], "code_verifier": verifier, "resource": f"{at}/mcp"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    token = answer.json()
    if scanner is not None:
        _watch(scanner, token["access_token"], token["refresh_token"])
    assert token["token_type"] == "Bearer" and token["expires_in"] == 3600 and token["scope"] == scope
    return Grant(client["client_id"], token["access_token"], token["refresh_token"], scope)


async def _mcp(client: httpx.AsyncClient, base: str, token: str, message: dict[str, Any]) -> httpx.Response:
    return await client.post(f"{base}/mcp", json=message, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"})


class _Storage:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


async def test_sdk_client_runs_the_whole_flow_and_acts_as_the_workspace_agent(
        base_url: str, tenants: Tenants, leak_scanner: LeakScanner) -> None:
    storage = _Storage()
    opened: list[str] = []
    async with httpx.AsyncClient(timeout=30) as browser:
        await _signed_in(browser, base_url, tenants.user1_token)

        async def redirect_handler(url: str) -> None:
            opened.append(await _consent(browser, base_url, url, tenants.ws_a))

        async def callback_handler() -> AuthorizationCodeResult:
            query = parse_qs(urlsplit(opened[-1]).query)
            return AuthorizationCodeResult(code=query["code"][0], state=query["state"][0], iss=query["iss"][0])

        auth = OAuthClientProvider(
            server_url=f"{base_url}/mcp", storage=storage, redirect_handler=redirect_handler,
            callback_handler=callback_handler,
            client_metadata=OAuthClientMetadata(redirect_uris=[REDIRECT], client_name="SDK desktop client"))
        async with httpx2.AsyncClient(auth=auth, timeout=30) as http, \
                streamable_http_client(f"{base_url}/mcp", http_client=http) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            await ok(session, "execute", database="agent", sql="CREATE TABLE oauth_made (n int)")
            await ok(session, "execute", database="agent", sql="INSERT INTO oauth_made VALUES (42)")
    assert len(opened) == 1  # one consent, then the tokens did the rest
    assert storage.client is not None and storage.client.client_secret is not None  # RFC 7591 default: basic
    assert storage.tokens is not None and storage.tokens.refresh_token
    _watch(leak_scanner, storage.tokens.access_token, storage.tokens.refresh_token)
    claims = _claims(storage.tokens.access_token)
    assert claims["aud"] == f"{base_url}/mcp" and claims["iss"] == f"{base_url}/"
    assert claims["scope"] == "mcp:read mcp:write" and claims["sub"] == tenants.user1
    # The same agent as the workspace's agent token: its table is in that agent database.
    async with http_session(base_url, tenants.token_a) as agent:
        assert (await ok(agent, "query", database="agent", sql="SELECT n FROM oauth_made"))["rows"] == [[42]]


async def test_discovery_documents_and_401_challenges(base_url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        root = await client.get(f"{base_url}/.well-known/oauth-protected-resource")
        inserted = await client.get(f"{base_url}/.well-known/oauth-protected-resource/mcp")
        assert root.status_code == inserted.status_code == 200 and root.json() == inserted.json()
        assert root.json() == {"resource": f"{base_url}/mcp", "authorization_servers": [f"{base_url}/"],
                               "scopes_supported": ["mcp:read", "mcp:write"], "bearer_methods_supported": ["header"],
                               "resource_name": "agentpg"}
        meta = (await client.get(f"{base_url}/.well-known/oauth-authorization-server")).json()
        assert meta["issuer"] == f"{base_url}/" and meta["code_challenge_methods_supported"] == ["S256"]
        assert meta["token_endpoint"] == f"{base_url}/oauth/token"
        assert meta["authorization_endpoint"] == f"{base_url}/oauth/authorize"
        assert meta["registration_endpoint"] == f"{base_url}/oauth/register"
        assert meta["authorization_response_iss_parameter_supported"] is True
        metadata_url = f'resource_metadata="{base_url}/.well-known/oauth-protected-resource/mcp"'
        bare = await client.post(f"{base_url}/mcp", json=INIT, headers=MCP_HEADERS)
        assert bare.status_code == 401
        assert bare.headers["www-authenticate"] == f'Bearer scope="mcp:read mcp:write", {metadata_url}'
        wrong = await _mcp(client, base_url, "eyJhbGciOiJIUzI1NiJ9.e30.c2ln", INIT)
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        assert metadata_url in wrong.headers["www-authenticate"]
        assert (await client.get(f"{base_url}/.well-known/oauth-protected-resource",
                                 headers={"Host": "evil.example"})).status_code == 421
        # An allowed name with something after its port (the SDK matched "localhost:*" by prefix): the
        # metadata would have named evil.example as its issuer.
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-authorization-server"):
            for host in ("localhost:1@evil.example", "127.0.0.1:80/evil.example", "localhost:8080 evil"):
                answer = await client.get(f"{base_url}{path}", headers={"Host": host})
                assert answer.status_code == 421 and "evil" not in answer.text, (path, host, answer.text)


async def test_audience_scope_refresh_and_revocation(base_url: str, tenants: Tenants,
                                                      leak_scanner: LeakScanner) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        await _signed_in(browser, base_url, tenants.user1_token)
        reader = await _flow(browser, base_url, tenants.ws_b, scope="mcp:read", scanner=leak_scanner)
        read = await _mcp(browser, base_url, reader.access, _call("query", database="agent", sql="SELECT 1 AS one"))
        assert read.status_code == 200 and read.json()["result"]["structuredContent"]["rows"] == [[1]]
        write = await _mcp(browser, base_url, reader.access, _call("execute", database="agent", sql="CREATE TABLE x()"))
        assert write.status_code == 403 and write.json()["error"] == "insufficient_scope"
        assert write.headers["www-authenticate"].startswith('Bearer error="insufficient_scope", scope="mcp:write"')
        # A token for another resource: the same server reached as localhost is another resource (its audience
        # is http://localhost:<port>/mcp), so the token is refused at 127.0.0.1.
        other = base_url.replace("127.0.0.1", "localhost")
        await _signed_in(browser, other, tenants.user1_token)  # cookies are per host name
        elsewhere = await _flow(browser, base_url, tenants.ws_b, resource_base=other)
        assert _claims(elsewhere.access)["aud"] == f"{other}/mcp"
        assert (await _mcp(browser, other, elsewhere.access, INIT)).status_code == 200
        refused = await _mcp(browser, base_url, elsewhere.access, INIT)
        assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]
        # ... and the authorization server issues no token for a resource that is not its /mcp.
        target = await browser.post(f"{base_url}/oauth/token", data={
            "grant_type": "refresh_token", "refresh_token": reader.refresh, "client_id": reader.client_id,
            "resource": "https://elsewhere.example/mcp"})
        assert target.status_code == 400 and target.json()["error"] == "invalid_target"
        # Refresh rotates; the old refresh token used again revokes the grant (it leaked).
        fresh = await browser.post(f"{base_url}/oauth/token", data={
            "grant_type": "refresh_token", "refresh_token": reader.refresh, "client_id": reader.client_id})
        assert fresh.status_code == 200, fresh.text
        renewed = fresh.json()
        _watch(leak_scanner, renewed["access_token"], renewed["refresh_token"])
        assert renewed["refresh_token"] != reader.refresh and renewed["scope"] == "mcp:read"
        assert (await _mcp(browser, base_url, renewed["access_token"], INIT)).status_code == 200
        replay = await browser.post(f"{base_url}/oauth/token", data={
            "grant_type": "refresh_token", "refresh_token": reader.refresh, "client_id": reader.client_id})
        assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
        assert (await _mcp(browser, base_url, renewed["access_token"], INIT)).status_code == 401
        # RFC 7009: revoking the access token ends its grant.
        full = await _flow(browser, base_url, tenants.ws_b)
        assert (await _mcp(browser, base_url, full.access, INIT)).status_code == 200
        revoked = await browser.post(f"{base_url}/oauth/revoke", data={"token": full.access,
                                                                        "client_id": full.client_id})
        assert revoked.status_code == 200
        assert (await _mcp(browser, base_url, full.access, INIT)).status_code == 401


async def test_pkce_is_required_and_checked(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        await _signed_in(browser, base_url, tenants.user1_token)
        client = await _register(browser, base_url)
        verifier, challenge = _pkce()
        plain = _authorize_url(base_url, client["client_id"], challenge, code_challenge_method="plain")
        no_pkce = _authorize_url(base_url, client["client_id"], challenge).replace(f"code_challenge={challenge}", "")
        for url in (plain, no_pkce):
            answer = await browser.get(url)
            assert answer.status_code == 302
            error = parse_qs(urlsplit(answer.headers["location"]).query)
            assert error["error"] == ["invalid_request"] and error["state"] == ["st"]
        location = await _consent(browser, base_url, _authorize_url(base_url, client["client_id"], challenge),
                                  tenants.ws_a)
        code = parse_qs(urlsplit(location).query)["code"][0]
        exchange = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
                    "client_id": client["client_id"]}
        wrong = await browser.post(f"{base_url}/oauth/token", data={**exchange, "code_verifier": _pkce()[0]})
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
        spent = await browser.post(f"{base_url}/oauth/token", data={**exchange, "code_verifier": verifier})
        assert spent.status_code == 400 and spent.json()["error"] == "invalid_grant"  # a code is tried once
        denied = await _consent(browser, base_url, _authorize_url(base_url, client["client_id"], challenge), None,
                                decision="deny")
        assert parse_qs(urlsplit(denied).query)["error"] == ["access_denied"]


async def test_a_refused_request_never_bounces_the_browser_to_another_site(base_url: str, tenants: Tenants) -> None:
    """Registration is open, so anyone can register ``https://evil.example/...``: a request refused before any
    sign-in or consent shows its error here instead of redirecting there (agentpg's address is no open
    redirector, RFC 9700 §4.11.2), whether signed in or not. A loopback client still gets its error back (the
    PKCE test above)."""
    evil = "https://evil.example/landing"
    async with httpx.AsyncClient(timeout=30) as browser:
        client = await _register(browser, base_url, redirect_uris=[evil])
        challenge = _pkce()[1]
        for signed_in in (False, True):
            if signed_in:
                await _signed_in(browser, base_url, tenants.user1_token)
            for extra in ({"scope": "not-a-scope"}, {"code_challenge_method": "plain"}):
                url = _authorize_url(base_url, client["client_id"], challenge, redirect_uri=evil, **extra)
                answer = await browser.get(url)
                assert answer.status_code == 422 and "location" not in answer.headers, answer.headers
                assert "authorization request was refused" in html.unescape(answer.text)
        # A valid request from that client still reaches the consent page, which names where it goes back to.
        page = await browser.get(_authorize_url(base_url, client["client_id"], challenge, redirect_uri=evil))
        assert page.status_code == 200 and "evil.example" in page.text


async def test_deleted_workspace_ends_its_tokens(base_url: str, runtime: Runtime, tenants: Tenants) -> None:
    workspace = uid("wo")
    runtime.service.create_workspace(tenants.user1, workspace)
    async with httpx.AsyncClient(timeout=30) as browser:
        await _signed_in(browser, base_url, tenants.user1_token)
        grant = await _flow(browser, base_url, workspace)
        assert (await _mcp(browser, base_url, grant.access, INIT)).status_code == 200
        runtime.service.delete_workspace(workspace, user_id=tenants.user1)
        assert (await _mcp(browser, base_url, grant.access, INIT)).status_code == 401
        again = await browser.post(f"{base_url}/oauth/token", data={
            "grant_type": "refresh_token", "refresh_token": grant.refresh, "client_id": grant.client_id})
        assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


async def test_agent_tokens_unchanged_and_other_tokens_refused(base_url: str, tenants: Tenants) -> None:
    async with http_session(base_url, tenants.token_c) as agent:
        assert (await ok(agent, "query", database="agent", sql="SELECT 3 AS n"))["rows"] == [[3]]
    async with httpx.AsyncClient(timeout=30) as client:
        user = await _mcp(client, base_url, tenants.user2_token, INIT)
        assert user.status_code == 403
        revoked_shape = await _mcp(client, base_url, "apg_g_" + "x" * 43, INIT)
        assert revoked_shape.status_code == 401


async def test_sign_in_through_the_explorer_and_consent_rules(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as browser:
        client = await _register(browser, base_url)
        url = _authorize_url(base_url, client["client_id"], _pkce()[1])
        away = await browser.get(url)
        assert away.status_code == 303 and away.headers["location"].startswith("/?reason=signin&next=%2Foauth")
        login_page = await browser.get(base_url + away.headers["location"])
        assert 'name="next" value="/oauth/authorize?' in login_page.text
        back = await browser.post(f"{base_url}/explorer/login", headers={"Origin": base_url},
                                  data={"token": tenants.user2_token, "next": url.removeprefix(base_url)})
        assert back.status_code == 303 and back.headers["location"] == url.removeprefix(base_url)
        page = await browser.get(url)
        assert page.status_code == 200 and tenants.ws_c in page.text and tenants.ws_a not in page.text
        ticket = html.unescape(re.search(r'name="ticket" value="([^"]+)"', page.text).group(1))  # type: ignore[union-attr]
        form = {"ticket": ticket, "decision": "allow", "workspace": tenants.ws_a}  # another user's workspace
        assert (await browser.post(url, data=form)).status_code == 403  # no Origin: the CSRF check
        other = await browser.post(url, data=form, headers={"Origin": base_url})
        assert other.status_code == 400 and "no active workspace" in other.text
        forged = await browser.post(url + "&scope=mcp:read", data={**form, "workspace": tenants.ws_c},
                                    headers={"Origin": base_url})
        assert forged.status_code == 403  # the ticket is for the request that was shown, not another
        evil = await browser.post(f"{base_url}/explorer/login", headers={"Origin": base_url},
                                  data={"token": tenants.user2_token, "next": "//evil.example/"})
        assert evil.status_code == 303 and not evil.headers["location"].startswith("//")
        unknown = await browser.get(_authorize_url(base_url, "apgc_unknown", _pkce()[1]))
        assert unknown.status_code == 400 and "location" not in unknown.headers  # never redirected
        unregistered = await browser.get(_authorize_url(base_url, client["client_id"], _pkce()[1]).replace(
            "8976", "8976%2Fevil"))
        assert unregistered.status_code == 400


async def test_bad_input_is_a_4xx_oauth_error(base_url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        token = f"{base_url}/oauth/token"
        cases = [
            (await client.post(token, json={"grant_type": "authorization_code"}), "invalid_request"),
            (await client.post(token, content="grant_type=a&grant_type=b",
                               headers={"Content-Type": "application/x-www-form-urlencoded"}), "invalid_request"),
            (await client.post(token, data={"grant_type": "password", "username": "u"}), "unsupported_grant_type"),
            (await client.post(token, data={"grant_type": "authorization_code", "code": "x", "client_id": "nope"}),
             "invalid_client"),
            (await client.post(token, content=b"\xff\xfe", headers={
                "Content-Type": "application/x-www-form-urlencoded"}), "invalid_request"),
            (await client.post(f"{base_url}/oauth/register", content="[]",
                               headers={"Content-Type": "application/json"}), "invalid_client_metadata"),
            (await client.post(f"{base_url}/oauth/register", json={"redirect_uris": ["javascript:alert(1)"]}),
             "invalid_client_metadata"),
            (await client.post(f"{base_url}/oauth/register", json={"redirect_uris": ["http://evil.example/cb"]}),
             "invalid_client_metadata"),
            (await client.post(f"{base_url}/oauth/register", json={"redirect_uris": [REDIRECT], "scope": "admin"}),
             "invalid_client_metadata"),
            (await client.post(f"{base_url}/oauth/revoke", data={"token": "x"}), "invalid_client"),
        ]
        for answer, error in cases:
            assert 400 <= answer.status_code < 500 and answer.json()["error"] == error, (answer.status_code,
                                                                                         answer.text)
