"""What the edges call for OAuth (through ``Service.oauth``): the authorization server's endpoints, the
consent step, and the check of an access token on ``/mcp``.

Everything here is synchronous (catalog I/O, and Authlib is synchronous): call it in the threadpool, except
:meth:`OAuthService.access_cached`, which does no I/O. Nothing returned holds a secret except the token
endpoint's and the registration endpoint's own answers (the tokens and the client secret they issue).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc6749.errors import OAuth2Error

from agentpg.access import cache
from agentpg.crypto import KeyRing, SealContext
from agentpg.errors import AgentpgError, SecretError
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.service.oauth.keys import SigningKeys
from agentpg.service.oauth.models import ACCESS_SECONDS, AUTH_METHODS, SCOPES, Answer, Consent, HttpRequest
from agentpg.service.oauth.server import OAuthServer, validate_claims, verify_signature
from agentpg.service.oauth.store import OAuthStore
from agentpg.tokens import Principal, hash_token

AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/token"  # noqa: S105 - a path, not a password
REGISTER_PATH = "/oauth/register"
REVOKE_PATH = "/oauth/revoke"
TICKET_SECONDS = 900
"""How long a consent page may stay open before its form is refused (sign in / reload to get a new one)."""


class OAuthProblem(AgentpgError):
    """An authorization request that cannot be answered by redirecting to the client (an unknown client, a
    redirect URI it did not register): shown to the person in the browser instead (RFC 6749 §4.1.2.1)."""

    status = 400
    code = "invalid_request"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ConsentView:
    """What the consent page shows about a valid authorization request."""

    client_name: str
    client_id: str
    redirect_to: str
    """Where the browser goes back to (scheme and host of the redirect URI)."""
    scopes: tuple[str, ...]
    resource: str


@dataclass(frozen=True)
class Access:
    """An OAuth access token's agent and the scopes it carries."""

    principal: Principal
    scopes: frozenset[str]
    client_id: str


_TICKET = SealContext("oauth_consent", "form", "ticket")


class OAuthService:
    """The authorization server of one process, on the catalog and key ring of ``deps``."""

    def __init__(self, deps: LifecycleDeps) -> None:
        self.store = OAuthStore(deps.sessions, deps.invalidation)
        self._invalidation = deps.invalidation
        self._keyring: KeyRing = deps.keyring
        self.server = OAuthServer(self.store, SigningKeys(deps.keyring))
        self._access: cache.TtlCache[tuple[str, str], Access] = cache.TtlCache(deps.invalidation)

    # -- discovery ------------------------------------------------------------------------------------------

    @staticmethod
    def metadata(base: str) -> dict[str, Any]:
        """RFC 8414 authorization server metadata for the service at ``base``."""
        return {"issuer": base + "/", "authorization_endpoint": base + AUTHORIZE_PATH,
                "token_endpoint": base + TOKEN_PATH, "registration_endpoint": base + REGISTER_PATH,
                "revocation_endpoint": base + REVOKE_PATH, "scopes_supported": list(SCOPES),
                "response_types_supported": ["code"], "response_modes_supported": ["query"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "token_endpoint_auth_methods_supported": AUTH_METHODS,
                "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
                "code_challenge_methods_supported": ["S256"],
                "authorization_response_iss_parameter_supported": True}

    # -- the authorization endpoint (the explorer's consent page calls these) --------------------------------

    def check_authorization(self, http: HttpRequest) -> ConsentView | Answer:
        """The consent page's facts for a valid request; an :class:`Answer` redirecting to the client for an
        invalid one it can be told about; :class:`OAuthProblem` for one it cannot."""
        try:
            grant = self.server.get_consent_grant(http)
        except OAuth2Error as error:
            return self._error(http, error)
        client = grant.request.client
        name = str(client.metadata.get("client_name") or "An MCP client")[:100]
        redirect = grant.request.payload.data.get("redirect_uri") or client.get_default_redirect_uri()
        target = redirect.split("?")[0][:200]
        return ConsentView(client_name=name, client_id=client.get_client_id(), redirect_to=target,
                           scopes=tuple(str(grant.request.scope).split()), resource=http.resource)

    def authorize(self, http: HttpRequest, user_id: str, workspace_id: str | None) -> Answer:
        """The user's decision: ``workspace_id`` (the user's own, by its public id) approves, None denies.
        Answers the redirect to the client, with a code or ``access_denied`` (and ``iss``, RFC 9207)."""
        try:
            grant = self.server.get_consent_grant(http)
        except OAuth2Error as error:
            return self._error(http, error)
        consent = None
        if workspace_id is not None:
            catalog_id = self.store.workspace_catalog_id(user_id, workspace_id)
            if catalog_id is None:
                raise OAuthProblem("invalid_request", f"you have no active workspace {workspace_id!r}")
            consent = Consent(user_id=user_id, workspace_id=catalog_id)
        answer: Answer = self.server.create_authorization_response(grant.request, grant_user=consent, grant=grant)
        return _with_issuer(answer, http)

    def _error(self, http: HttpRequest, error: OAuth2Error) -> Answer:
        answer: Answer = self.server.handle_error_response(None, error)
        if answer.location is None:
            raise OAuthProblem(str(error.error), str(error.description or "the authorization request is invalid"))
        return _with_issuer(answer, http)

    def consent_ticket(self, principal: Principal, http: HttpRequest) -> str:
        """A sealed value for the consent form: binds its POST to this signed-in session (the token it was
        signed in with) and to exactly this authorization request, for :data:`TICKET_SECONDS`."""
        payload = {"u": principal.user_id, "t": principal.token_id, "q": _query_digest(http),
                   "e": int(time.time()) + TICKET_SECONDS}
        return self._keyring.seal(json.dumps(payload), _TICKET)

    def check_consent_ticket(self, ticket: str, principal: Principal, http: HttpRequest) -> bool:
        try:
            payload = json.loads(self._keyring.open(ticket, _TICKET)) if 0 < len(ticket) < 2000 else None
        except (SecretError, ValueError):
            return False
        return (isinstance(payload, dict) and payload.get("u") == principal.user_id
                and payload.get("t") == principal.token_id and payload.get("q") == _query_digest(http)
                and isinstance(payload.get("e"), int) and payload["e"] > time.time())

    # -- the token, registration and revocation endpoints -----------------------------------------------------

    def token(self, http: HttpRequest) -> Answer:
        return self._answer(lambda: self.server.create_token_response(http))

    def register(self, http: HttpRequest) -> Answer:
        return self._answer(lambda: self.server.create_endpoint_response("client_registration", http))

    def revoke(self, http: HttpRequest) -> Answer:
        return self._answer(lambda: self.server.create_endpoint_response("revocation", http))

    def _answer(self, call: Callable[[], Any]) -> Answer:
        """Authlib's answer; an error it raises rather than answers (``insecure_transport``: plain HTTP to
        a host that is not loopback, before any request is read) is answered the same way, as JSON."""
        try:
            answer: Answer = call()
        except OAuth2Error as error:
            answer = self.server.handle_error_response(None, error)
        return answer

    # -- the resource server side: an access token presented to /mcp ---------------------------------------

    def access_cached(self, raw: str, base: str) -> Access | None:
        """:meth:`access`'s answer for this token at this resource of less than the cache TTL ago (no I/O)."""
        return self._access.get((hash_token(raw), base))

    def access(self, raw: str, base: str) -> Access | None:
        """The agent an access token acts as at the ``/mcp`` of ``base``, or None: not signed here, expired,
        issued for another resource (``aud``) or by another issuer, or its grant revoked or its workspace
        deleted. Remembered 2 s (like agent tokens: :mod:`agentpg.access.cache`)."""
        key = (hash_token(raw), base)
        hit = self._access.get(key)
        if hit is not None:
            return hit
        gen = self._invalidation.current()
        claims = verify_signature(self.server.keys, raw)
        if claims is None or not validate_claims(claims, issuer=base + "/", resource=base + "/mcp"):
            return None
        live = self.store.live_grant(claims["gid"])
        if live is None:
            return None
        scopes = frozenset(claims["scope"].split()) & live.scope
        access = Access(principal=Principal(kind="agent", token_id=claims["gid"], user_id=live.user_id,
                                            workspace_id=live.workspace_id),
                        scopes=scopes, client_id=str(claims["client_id"]))
        self._access.put(key, access, gen)
        return access


def _query_digest(http: HttpRequest) -> str:
    canonical = json.dumps(sorted((k, v) for k, vs in http.query.items() for v in vs))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _with_issuer(answer: Answer, http: HttpRequest) -> Answer:
    """RFC 9207: every authorization response redirecting to the client names the issuer."""
    location = answer.location
    if location is None:
        return answer
    located = add_params_to_uri(location, [("iss", http.issuer)])
    headers = [(k, v) for k, v in answer.headers if k.lower() != "location"] + [("Location", located)]
    return Answer(answer.status, answer.body, headers)


__all__ = ["ACCESS_SECONDS", "Access", "Answer", "ConsentView", "HttpRequest", "OAuthProblem", "OAuthService"]
