"""The objects Authlib's authorization server works with: the neutral HTTP request and answer the edges
translate from and to, clients, codes and refresh tokens as Authlib's mixins, the scopes, and the rules for
redirect URIs. No I/O here.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2 import rfc6749
from authlib.oauth2.rfc6749.errors import OAuth2Error
from authlib.oauth2.rfc7591 import InvalidClientMetadataError

from agentpg.service.oauth.store import ClientRecord, CodeRecord, GrantRecord
from agentpg.tokens import hash_token

SCOPE_READ = "mcp:read"
SCOPE_WRITE = "mcp:write"
SCOPES = (SCOPE_READ, SCOPE_WRITE)
"""``mcp:read``: the tools that only read; ``mcp:write``: those that change a database (see :func:`scope_for`)."""
WRITE_TOOLS = frozenset({"execute", "checkpoint", "restore"})
ACCESS_SECONDS = 3600
AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post"]
_FORBIDDEN_SCHEMES = frozenset({"javascript", "data", "file", "vbscript", "about", "blob", "ftp", "ws", "wss"})


def scope_for(tool: str | None) -> str:
    """The scope a ``tools/call`` of ``tool`` needs (None: any other request, which reading covers)."""
    return SCOPE_WRITE if tool in WRITE_TOOLS else SCOPE_READ


@dataclass(frozen=True)
class HttpRequest:
    """An HTTP request as the edge received it. ``base`` is ``scheme://host[:port]`` of this service as the
    client reaches it (``AGENTPG_PUBLIC_URL``, else the request's own); it names the issuer and resource."""

    method: str
    path: str
    base: str
    headers: Mapping[str, str]
    """Case-insensitive when Authlib reads them (``Authorization``): pass the framework's own headers."""
    query: dict[str, list[str]] = field(default_factory=dict)
    form: dict[str, list[str]] = field(default_factory=dict)
    json: dict[str, Any] | None = None

    @property
    def issuer(self) -> str:
        # With the trailing slash, as the MCP SDK renders a root issuer (pydantic URLs); used verbatim everywhere.
        return self.base + "/"

    @property
    def resource(self) -> str:
        return self.base + "/mcp"


@dataclass
class Answer:
    """What to send back: JSON (a dict) or nothing, with headers (``Location`` for a redirect)."""

    status: int
    body: dict[str, Any] | None
    headers: list[tuple[str, str]]

    @property
    def location(self) -> str | None:
        return next((v for k, v in self.headers if k.lower() == "location"), None)


class InvalidTargetError(OAuth2Error):  # type: ignore[misc]
    """RFC 8707 §2: the ``resource`` is not one this server issues tokens for."""

    error = "invalid_target"


def same_resource(given: str, expected: str) -> bool:
    return given.rstrip("/") == expected.rstrip("/")


# -- Authlib's models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Consent:
    """The resource owner's decision: the user, and the workspace (catalog id) whose agent the client becomes."""

    user_id: str
    workspace_id: str

    def get_user_id(self) -> str:
        return self.user_id


@dataclass(frozen=True)
class Subject:
    """Whom a token is issued for (Authlib's "user" at the token endpoint): a grant of one workspace."""

    user_id: str
    workspace_id: str
    grant_id: str
    resource: str
    issuer: str
    refresh_hash: str | None = None
    """The refresh token being rotated (refresh grant only)."""

    def get_user_id(self) -> str:
        return self.user_id


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_redirect_uri_allowed(uri: str) -> None:
    """Refuse a redirect URI a client may not register: no fragment; ``https``, ``http`` to a loopback
    address only (RFC 8252 §7.3), or an app's private-use scheme (§7.1), never a script-bearing one."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        raise InvalidClientMetadataError("a redirect_uri is not a URI") from None
    scheme = parts.scheme.lower()
    if any(c.isspace() or ord(c) < 0x20 or c in "\"'<>;\\" for c in uri):
        raise InvalidClientMetadataError("a redirect_uri contains a character URIs may not")
    if not scheme or parts.fragment or scheme in _FORBIDDEN_SCHEMES or len(uri) > 2000:
        raise InvalidClientMetadataError("a redirect_uri must be absolute, without a fragment, not a script")
    if scheme == "http" and not _is_loopback(parts.hostname):
        raise InvalidClientMetadataError("an http redirect_uri must be a loopback one (127.0.0.1, [::1], localhost)")
    if scheme in ("http", "https") and not parts.hostname:
        raise InvalidClientMetadataError("a redirect_uri names no host")


class Client(rfc6749.ClientMixin):  # type: ignore[misc]
    def __init__(self, record: ClientRecord) -> None:
        self.record = record
        self.metadata = record.metadata

    def get_client_id(self) -> str:
        return self.record.client_id

    def get_default_redirect_uri(self) -> str | None:
        uris = self.metadata.get("redirect_uris") or []
        return str(uris[0]) if len(uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        allowed = [s for s in str(self.metadata.get("scope") or " ".join(SCOPES)).split() if s in SCOPES]
        wanted = scope.split() if scope else allowed
        granted = [s for s in allowed if s in wanted]
        return " ".join(granted) if granted else None  # None: invalid_scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        """Exactly a registered URI; for a loopback one, any port (RFC 8252 §7.3: native apps pick a free
        port when they start)."""
        registered = [str(u) for u in self.metadata.get("redirect_uris") or []]
        if redirect_uri in registered:
            return True
        given = urlsplit(redirect_uri)
        if given.scheme != "http" or not _is_loopback(given.hostname):
            return False
        for uri in registered:
            known = urlsplit(uri)
            if (known.scheme, known.hostname, known.path, known.query) == (
                    given.scheme, given.hostname, given.path, given.query):
                return True
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        known = self.record.secret_hash
        return known is not None and hmac.compare_digest(known, hash_token(client_secret))

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return bool(method == self.metadata.get("token_endpoint_auth_method", "client_secret_basic"))

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in (self.metadata.get("grant_types") or ["authorization_code"])


class CodeModel(rfc6749.AuthorizationCodeMixin):  # type: ignore[misc]
    def __init__(self, record: CodeRecord) -> None:
        self.record = record
        self.code_challenge = record.code_challenge
        self.code_challenge_method = record.code_challenge_method

    def get_redirect_uri(self) -> str:
        return self.record.redirect_uri

    def get_scope(self) -> str:
        return self.record.scope


class RefreshModel(rfc6749.TokenMixin):  # type: ignore[misc]
    def __init__(self, record: GrantRecord) -> None:
        self.record = record

    def check_client(self, client: Client) -> bool:
        return self.record.client_id == client.get_client_id()

    def get_scope(self) -> str:
        return self.record.scope

    def get_expires_in(self) -> int:
        return 0

    def is_expired(self) -> bool:
        return False  # the store returns only unexpired grants

    def is_revoked(self) -> bool:
        return False  # ... and only live ones


# -- requests -------------------------------------------------------------------------------------------------


class Payload(rfc6749.OAuth2Payload):  # type: ignore[misc]
    def __init__(self, values: dict[str, list[str]]) -> None:
        self._values = values

    @property
    def data(self) -> dict[str, str]:
        return {k: v[0] for k, v in self._values.items() if v}

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return defaultdict(list, self._values)


class OAuthRequest(rfc6749.OAuth2Request):  # type: ignore[misc]
    def __init__(self, http: HttpRequest) -> None:
        super().__init__(http.method, http.base + http.path, headers=http.headers)
        self.http = http
        # The authorization endpoint reads the query only (a form cannot override what the client asked).
        self.payload = Payload(http.query if http.method == "GET" or http.path.endswith("/authorize")
                                else http.form)

    @property
    def args(self) -> dict[str, str]:
        return {k: v[0] for k, v in self.http.query.items() if v}

    @property
    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in self.http.form.items() if v}


class JsonPayload(rfc6749.JsonPayload):  # type: ignore[misc]
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    @property
    def data(self) -> dict[str, Any]:
        return self._data


class JsonOAuthRequest(rfc6749.JsonRequest):  # type: ignore[misc]
    def __init__(self, http: HttpRequest) -> None:
        super().__init__(http.method, http.base + http.path, http.headers)
        self.http = http
        self.payload = JsonPayload(http.json or {})


