"""The exception tree every layer raises and every edge translates.

Each class carries a message a person can act on and an HTTP-ish ``status`` so the REST, MCP and CLI edges
map it the same way. Messages never contain a connection string, password or key: callers pass
identifiers (user ids, workspace ids, database names), never DSNs.
"""

from __future__ import annotations


class AgentpgError(Exception):
    """Root of agentpg's own errors. ``status`` is the HTTP status an edge should answer with."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(AgentpgError):
    """The caller sent something malformed: an empty id, an odd character, a bad limit."""

    status = 422
    code = "invalid_input"


class NotFound(AgentpgError):
    """The thing does not exist, or belongs to another tenant (we never tell which)."""

    status = 404
    code = "not_found"


class Conflict(AgentpgError):
    """The thing already exists, or is in a state that forbids the request (e.g. being deleted)."""

    status = 409
    code = "conflict"


class PermissionDenied(AgentpgError):
    """Authenticated, but this credential may not do that (an agent token on a REST route)."""

    status = 403
    code = "forbidden"


class Unauthenticated(AgentpgError):
    """No credential, or one we do not know."""

    status = 401
    code = "unauthenticated"


class ProviderError(AgentpgError):
    """A database server (embedded, fleet member, Neon) refused or failed an operation."""

    status = 502
    code = "provider_error"


class ProviderUnavailable(ProviderError):
    """The database server could not be reached at all. Retrying later may work."""

    status = 503
    code = "provider_unavailable"


class CatalogUnavailable(AgentpgError):
    """agentpg's own metadata database could not be reached."""

    status = 503
    code = "catalog_unavailable"


class Busy(AgentpgError):
    """agentpg's own capacity for concurrent changes is in use; the request waited its turn and gave up.
    Retrying shortly works (the REST edge says so with ``Retry-After``)."""

    status = 503
    code = "busy"


class SecretError(AgentpgError):
    """A sealed value would not open: wrong key, tampered, or moved to another row."""

    status = 500
    code = "secret_error"
