"""The OAuth 2.1 authorization server, built on Authlib's, without any web framework.

Authlib (``authlib.oauth2``) does the protocol: the authorization-code grant with PKCE (RFC 7636, S256
only, required of every client), refresh tokens (rotated on every use), dynamic client registration
(RFC 7591), revocation (RFC 7009), the error answers (RFC 6749 §5.2) and RFC 9068 JWT access tokens. This
module gives it agentpg's storage (:class:`~agentpg.service.oauth.store.OAuthStore`), its signing keys
(:mod:`agentpg.service.oauth.keys`), RFC 8707 resource indicators (Authlib has none: the ``resource`` of the
authorization request is checked, kept with the code and becomes the token's ``aud``), and works on the
neutral request/answer shape of :mod:`agentpg.service.oauth.models`, which the edges translate from and to Starlette.

Authlib is synchronous and does catalog I/O through the store: call everything here in the threadpool.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from authlib.oauth2 import rfc6749
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7591 import ClientRegistrationEndpoint, InvalidClientMetadataError
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact

from agentpg.service.oauth.keys import ALGORITHM, SigningKeys
from agentpg.service.oauth.models import (
    ACCESS_SECONDS,
    AUTH_METHODS,
    SCOPES,
    Answer,
    Client,
    CodeModel,
    Consent,
    HttpRequest,
    InvalidTargetError,
    JsonOAuthRequest,
    OAuthRequest,
    RefreshModel,
    Subject,
    check_redirect_uri_allowed,
    same_resource,
)
from agentpg.service.oauth.store import ClientRecord, CodeRecord, GrantRecord, OAuthStore

# -- grants and endpoints -----------------------------------------------------------------------------------


def _check_resource(request: OAuthRequest, redirect_uri: str | None = None) -> None:
    """RFC 8707: at most one ``resource``, and it must be this service's ``/mcp`` (absent: that is meant)."""
    given = request.payload.datalist.get("resource", [])
    if len(given) > 1 or (given and not same_resource(given[0], request.http.resource)):
        raise InvalidTargetError(f"this server issues tokens for {request.http.resource} only",
                                 redirect_uri=redirect_uri)


class _CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS
    server: OAuthServer

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        _check_resource(self.request, redirect_uri)
        return redirect_uri

    def save_authorization_code(self, code: str, request: OAuthRequest) -> None:
        consent: Consent = request.user
        data = request.payload.data
        self.server.store.add_code(code, CodeRecord(
            client_id=request.client.get_client_id(), user_id=consent.user_id, workspace_id=consent.workspace_id,
            redirect_uri=data.get("redirect_uri") or request.client.get_default_redirect_uri(),
            scope=request.scope, resource=request.http.resource, code_challenge=data["code_challenge"],
            code_challenge_method=data.get("code_challenge_method", "S256")))

    def query_authorization_code(self, code: str, client: Client) -> CodeModel | None:
        _check_resource(self.request)
        record = self.server.store.take_code(code, client.get_client_id())
        if record is not None and not same_resource(record.resource, self.request.http.resource):
            raise InvalidTargetError("the code was issued for another resource")
        return CodeModel(record) if record is not None else None

    def delete_authorization_code(self, authorization_code: CodeModel) -> None:
        pass  # taken (deleted) when it was read: see OAuthStore.take_code

    def authenticate_user(self, authorization_code: CodeModel) -> Subject:
        record = authorization_code.record
        return Subject(user_id=record.user_id, workspace_id=record.workspace_id, grant_id=str(uuid.uuid4()),
                       resource=record.resource, issuer=self.request.http.issuer)


class _RefreshGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotation (OAuth 2.1 §4.3.1: public clients' refresh tokens rotate)
    server: OAuthServer

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshModel | None:
        _check_resource(self.request)
        record = self.server.store.grant_by_refresh(refresh_token)
        if record is not None and not same_resource(record.resource, self.request.http.resource):
            raise InvalidTargetError("the refresh token was issued for another resource")
        return RefreshModel(record) if record is not None else None

    def authenticate_user(self, refresh_token: RefreshModel) -> Subject:
        record = refresh_token.record
        return Subject(user_id=record.user_id, workspace_id=record.workspace_id, grant_id=record.id,
                       resource=record.resource, issuer=self.request.http.issuer, refresh_hash=record.refresh_hash)

    def revoke_old_credential(self, refresh_token: RefreshModel) -> None:
        pass  # replaced in save_token (OAuthStore.rotate_refresh), atomically


class _S256Only(CodeChallenge):  # type: ignore[misc]
    """PKCE for every client, S256 only (OAuth 2.1 §4.1.1; the MCP spec requires it of clients)."""

    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = ["S256"]

    def validate_code_challenge(self, grant: _CodeGrant, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge") or data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("PKCE is required: send code_challenge with code_challenge_method=S256",
                                      redirect_uri=redirect_uri)
        super().validate_code_challenge(grant, redirect_uri)


class _Registration(ClientRegistrationEndpoint):  # type: ignore[misc]
    """Open dynamic registration: a desktop MCP client registers itself the first time it connects."""

    server: OAuthServer

    def authenticate_token(self, request: JsonOAuthRequest) -> bool:
        return True  # no initial access token: the user's consent is what protects a workspace

    def get_server_metadata(self) -> dict[str, Any]:
        return {"scopes_supported": list(SCOPES), "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
                "token_endpoint_auth_methods_supported": AUTH_METHODS}

    def generate_client_id(self, request: JsonOAuthRequest) -> str:
        return "apgc_" + secrets.token_urlsafe(24)

    def generate_client_secret(self, request: JsonOAuthRequest) -> str | None:
        if request.payload.data.get("token_endpoint_auth_method") == "none":
            return None  # a public client: PKCE is its proof
        return secrets.token_urlsafe(32)

    def generate_client_info(self, request: JsonOAuthRequest) -> dict[str, Any]:
        info: dict[str, Any] = super().generate_client_info(request)
        if info.get("client_secret") is None:
            info.pop("client_secret", None)
            info.pop("client_secret_expires_at", None)
        return info

    def save_client(self, client_info: dict[str, Any], client_metadata: dict[str, Any],
                    request: JsonOAuthRequest) -> Client:
        uris = client_metadata.get("redirect_uris")
        if not isinstance(uris, list) or not uris or len(uris) > 10:
            raise InvalidClientMetadataError("give 1 to 10 redirect_uris")
        for uri in uris:
            check_redirect_uri_allowed(str(uri))
        client_metadata.setdefault("token_endpoint_auth_method", "client_secret_basic")
        client_metadata.setdefault("grant_types", ["authorization_code"])
        client_metadata.setdefault("response_types", ["code"])
        if len(str(client_metadata)) > 16_000:
            raise InvalidClientMetadataError("the client metadata is larger than 16 kB")
        record = ClientRecord(client_id=client_info["client_id"], secret_hash=None, metadata=client_metadata)
        self.server.store.add_client(record.client_id, client_info.get("client_secret"), client_metadata)
        return Client(record)


@dataclass(frozen=True)
class _Revocable:
    grant_id: str
    client_id: str

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.get_client_id()


class _Revocation(RevocationEndpoint):  # type: ignore[misc]
    """RFC 7009: revoking either token of a grant revokes the grant (its access tokens stop at once)."""

    CLIENT_AUTH_METHODS = AUTH_METHODS
    server: OAuthServer

    def query_token(self, token_string: str, token_type_hint: str | None) -> _Revocable | None:
        claims = self.server.jwt_claims(token_string)
        if claims is not None and isinstance(claims.get("gid"), str) and isinstance(claims.get("client_id"), str):
            return _Revocable(grant_id=str(claims["gid"]), client_id=str(claims["client_id"]))
        record = self.server.store.grant_by_refresh(token_string)
        return _Revocable(grant_id=record.id, client_id=record.client_id) if record is not None else None

    def revoke_token(self, token: _Revocable, request: OAuthRequest) -> None:
        self.server.store.revoke_grant(token.grant_id, client_id=token.client_id)


class _AccessTokens(JWTBearerTokenGenerator):  # type: ignore[misc]
    """RFC 9068 access tokens: ``aud`` the resource, ``sub`` the user, ``gid`` the grant, ``iss`` this server."""

    def __init__(self, keys: SigningKeys) -> None:
        super().__init__(issuer="", alg=ALGORITHM, refresh_token_generator=self._refresh_token,
                         expires_generator=ACCESS_SECONDS)
        self._keys = keys

    @staticmethod
    def _refresh_token(**_: Any) -> str:
        return "apg_r_" + secrets.token_urlsafe(32)

    def get_jwks(self) -> KeySet:
        return KeySet([self._keys.signing_key()])  # a set: joserfc then names the key (kid) in the header

    def get_audiences(self, client: Client, user: Subject, scope: str) -> str:
        return user.resource

    def get_extra_claims(self, client: Client, grant_type: str, user: Subject, scope: str) -> dict[str, Any]:
        return {"iss": user.issuer, "gid": user.grant_id}  # iss: per request (the public URL or the Host's)


# -- the server ---------------------------------------------------------------------------------------------


class OAuthServer(rfc6749.AuthorizationServer):  # type: ignore[misc]
    """Authlib's authorization server on agentpg's store. Methods take :class:`HttpRequest`, give :class:`Answer`."""

    def __init__(self, store: OAuthStore, keys: SigningKeys) -> None:
        super().__init__(scopes_supported=list(SCOPES))
        # Authlib logs every token it issues (``Issue token {...}``) at DEBUG: keep its loggers above that, so
        # AGENTPG_LOG_LEVEL=DEBUG can never write a token to a log.
        logging.getLogger("authlib").setLevel(logging.INFO)
        self.store = store
        self.keys = keys
        self.register_token_generator("default", _AccessTokens(keys))
        self.register_grant(_CodeGrant, [_S256Only(required=True)])
        self.register_grant(_RefreshGrant)
        self.register_endpoint(_Registration)
        self.register_endpoint(_Revocation)

    def query_client(self, client_id: str) -> Client | None:
        record = self.store.client(client_id) if isinstance(client_id, str) else None
        return Client(record) if record is not None else None

    def save_token(self, token: dict[str, Any], request: OAuthRequest) -> None:
        subject: Subject = request.user
        refresh = token.get("refresh_token")
        if subject.refresh_hash is None:  # a new grant, from a code
            self.store.add_grant(GrantRecord(
                id=subject.grant_id, client_id=request.client.get_client_id(), user_id=subject.user_id,
                workspace_id=subject.workspace_id, scope=str(token.get("scope") or ""), resource=subject.resource,
                refresh_hash=None), refresh)
        elif refresh is None or not self.store.rotate_refresh(subject.grant_id, subject.refresh_hash, refresh):
            raise InvalidGrantError("the refresh token was used concurrently; use the newest one")

    def create_oauth2_request(self, request: HttpRequest | OAuthRequest) -> OAuthRequest:
        return request if isinstance(request, OAuthRequest) else OAuthRequest(request)

    def create_json_request(self, request: HttpRequest) -> JsonOAuthRequest:
        return JsonOAuthRequest(request)

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Answer:
        return Answer(status, body if isinstance(body, dict) else None, list(headers or []))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def jwt_claims(self, raw: str) -> dict[str, Any] | None:
        """The claims of an access token this server signed (see :func:`verify_signature`), else None."""
        return verify_signature(self.keys, raw)


def verify_signature(keys: SigningKeys, raw: str) -> dict[str, Any] | None:
    """The claims of a JWT access token this server signed (signature, algorithm and RFC 9068 ``typ``
    checked, nothing else: the caller validates the claims), or None."""
    if not raw or len(raw) > 4096 or raw.count(".") != 2:
        return None
    try:
        header = extract_compact(raw.encode("ascii")).headers()
        keyset = keys.verification_keys(header.get("kid"))
        if keyset is None or header.get("typ") != "at+jwt":  # RFC 9068 §4: the type must be checked
            return None
        return dict(jwt.decode(raw, keyset, algorithms=[ALGORITHM]).claims)
    except (JoseError, ValueError, UnicodeError):
        return None


def validate_claims(claims: dict[str, Any], *, issuer: str, resource: str) -> bool:
    """RFC 9068 §4: issuer and audience are this server's and this resource, the token has not expired,
    and the claims agentpg relies on are there."""
    registry = jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": issuer}, aud={"essential": True, "value": resource},
        exp={"essential": True}, sub={"essential": True}, client_id={"essential": True},
        gid={"essential": True}, scope={"essential": True}, leeway=5)
    try:
        registry.validate(claims)
    except JoseError:
        return False
    return isinstance(claims["gid"], str) and len(claims["gid"]) <= 36 and isinstance(claims["scope"], str)
