"""The OAuth server's records in the catalog: clients, authorization codes, grants (and their refresh tokens).

Secrets (client secrets, codes, refresh tokens) arrive here raw and are stored only as SHA-256 hashes
(:func:`agentpg.tokens.hash_token`); nothing returned by this module holds one. Every function is
synchronous (a catalog round trip): the edges call them in the threadpool.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from agentpg.access import cache
from agentpg.catalog.models import Workspace
from agentpg.catalog.oauth_models import OAuthClient, OAuthCode, OAuthGrant
from agentpg.lifecycle import workspace_ids
from agentpg.tokens import hash_token

CODE_SECONDS = 120
"""An authorization code is exchanged within this (RFC 6749 recommends at most 10 minutes)."""
REFRESH_DAYS = 30
"""A refresh token not used for this long expires (each use rotates it and restarts the period)."""
UNUSED_CLIENT_HOURS = 24
"""A registered client that never got a code within this is removed (registration is open to anyone)."""


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    secret_hash: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class CodeRecord:
    client_id: str
    user_id: str
    workspace_id: str
    """The catalog's id of the workspace."""
    redirect_uri: str
    scope: str
    resource: str
    code_challenge: str
    code_challenge_method: str


@dataclass(frozen=True)
class GrantRecord:
    id: str
    client_id: str
    user_id: str
    workspace_id: str
    scope: str
    resource: str
    refresh_hash: str | None


@dataclass(frozen=True)
class LiveGrant:
    """Who an access token of a live grant acts as: the workspace's agent (catalog ids)."""

    user_id: str
    workspace_id: str
    scope: frozenset[str]


def _now() -> datetime:
    return datetime.now(UTC)


class OAuthStore:
    """Catalog access for :class:`agentpg.service.oauth.server.OAuthServer`."""

    def __init__(self, sessions: sessionmaker[Session], invalidation: cache.Invalidation) -> None:
        self._sessions = sessions
        self._invalidation = invalidation
        self._live: cache.TtlCache[str, LiveGrant] = cache.TtlCache(invalidation)

    # -- clients ---------------------------------------------------------------------------------------

    def add_client(self, client_id: str, secret: str | None, metadata: dict[str, Any]) -> None:
        """Store a registered client; first removes clients registered long ago that never got a code, and
        expired codes, so open registration cannot fill the catalog."""
        now = _now()
        with self._sessions.begin() as s:
            s.execute(delete(OAuthClient).where(OAuthClient.last_used_at.is_(None),
                                                OAuthClient.created_at < now - timedelta(hours=UNUSED_CLIENT_HOURS)))
            s.execute(delete(OAuthCode).where(OAuthCode.expires_at < now))
            s.add(OAuthClient(id=client_id, secret_hash=hash_token(secret) if secret else None,
                              client_metadata=metadata, created_at=now))

    def client(self, client_id: str) -> ClientRecord | None:
        if not client_id or len(client_id) > 64:
            return None
        with self._sessions() as s:
            row = s.get(OAuthClient, client_id)
            if row is None:
                return None
            return ClientRecord(client_id=row.id, secret_hash=row.secret_hash, metadata=dict(row.client_metadata))

    # -- authorization codes -----------------------------------------------------------------------------

    def workspace_catalog_id(self, user_id: str, workspace_id: str) -> str | None:
        """The catalog's id of ``user_id``'s *active* workspace ``workspace_id`` (its public id), or None."""
        with self._sessions() as s:
            ws = workspace_ids.find(s, workspace_id, user_id)
            return ws.id if ws is not None and ws.status == "active" else None

    def add_code(self, code: str, record: CodeRecord) -> None:
        now = _now()
        with self._sessions.begin() as s:
            s.add(OAuthCode(code_hash=hash_token(code), client_id=record.client_id, user_id=record.user_id,
                            workspace_id=record.workspace_id, redirect_uri=record.redirect_uri,
                            scope=record.scope, resource=record.resource, code_challenge=record.code_challenge,
                            code_challenge_method=record.code_challenge_method,
                            expires_at=now + timedelta(seconds=CODE_SECONDS)))
            s.execute(update(OAuthClient).where(OAuthClient.id == record.client_id).values(last_used_at=now))

    def take_code(self, code: str, client_id: str) -> CodeRecord | None:
        """The code's record, deleted in the same statement (so it can be exchanged once, even by two
        requests racing), or None if unknown, expired or another client's."""
        if not code or len(code) > 200:
            return None
        with self._sessions.begin() as s:
            row = s.execute(delete(OAuthCode).where(OAuthCode.code_hash == hash_token(code))
                            .returning(OAuthCode.client_id, OAuthCode.user_id, OAuthCode.workspace_id,
                                       OAuthCode.redirect_uri, OAuthCode.scope, OAuthCode.resource,
                                       OAuthCode.code_challenge, OAuthCode.code_challenge_method,
                                       OAuthCode.expires_at)).one_or_none()
        if row is None or row.client_id != client_id or row.expires_at < _now():
            return None
        return CodeRecord(client_id=row.client_id, user_id=row.user_id, workspace_id=row.workspace_id,
                          redirect_uri=row.redirect_uri, scope=row.scope, resource=row.resource,
                          code_challenge=row.code_challenge, code_challenge_method=row.code_challenge_method)

    # -- grants and refresh tokens -------------------------------------------------------------------------

    def add_grant(self, grant: GrantRecord, refresh_token: str | None) -> None:
        now = _now()
        with self._sessions.begin() as s:
            s.add(OAuthGrant(id=grant.id, client_id=grant.client_id, user_id=grant.user_id,
                             workspace_id=grant.workspace_id, scope=grant.scope, resource=grant.resource,
                             refresh_hash=hash_token(refresh_token) if refresh_token else None,
                             refresh_expires_at=now + timedelta(days=REFRESH_DAYS), created_at=now,
                             last_used_at=now))

    def grant_by_refresh(self, refresh_token: str) -> GrantRecord | None:
        """The live grant whose current refresh token this is. A refresh token that was already rotated
        away is a leaked one (RFC 9700 §4.14.2): its grant is revoked, and None returned."""
        if not refresh_token or len(refresh_token) > 200:
            return None
        digest = hash_token(refresh_token)
        now = _now()
        with self._sessions.begin() as s:
            row = s.scalars(select(OAuthGrant).where(or_(OAuthGrant.refresh_hash == digest,
                                                         OAuthGrant.previous_refresh_hash == digest))).first()
            if row is None or row.revoked_at is not None:
                return None
            if row.refresh_hash != digest:
                row.revoked_at = now
                self._invalidation.bump()
                return None
            workspace = s.get(Workspace, row.workspace_id)
            if row.refresh_expires_at < now or workspace is None or workspace.status != "active":
                return None
            return GrantRecord(id=row.id, client_id=row.client_id, user_id=row.user_id,
                               workspace_id=row.workspace_id, scope=row.scope, resource=row.resource,
                               refresh_hash=row.refresh_hash)

    def rotate_refresh(self, grant_id: str, old_hash: str, new_token: str) -> bool:
        """Replace the grant's refresh token, if it is still ``old_hash`` (False: a concurrent refresh won)."""
        now = _now()
        with self._sessions.begin() as s:
            result = s.execute(update(OAuthGrant).where(OAuthGrant.id == grant_id,
                                                        OAuthGrant.refresh_hash == old_hash,
                                                        OAuthGrant.revoked_at.is_(None))
                               .values(refresh_hash=hash_token(new_token), previous_refresh_hash=old_hash,
                                       refresh_expires_at=now + timedelta(days=REFRESH_DAYS), last_used_at=now))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def revoke_grant(self, grant_id: str, *, client_id: str | None = None, user_id: str | None = None) -> bool:
        """Revoke a grant (scoped to a client or a user when given); False if there was none to revoke."""
        with self._sessions.begin() as s:
            query = update(OAuthGrant).where(OAuthGrant.id == grant_id, OAuthGrant.revoked_at.is_(None))
            if client_id is not None:
                query = query.where(OAuthGrant.client_id == client_id)
            if user_id is not None:
                query = query.where(OAuthGrant.user_id == user_id)
            done = bool(s.execute(query.values(revoked_at=_now())).rowcount)  # type: ignore[attr-defined]
        self._invalidation.bump()  # after the commit, like TokenStore.revoke
        return done

    def live_grant_cached(self, grant_id: str) -> LiveGrant | None:
        """:meth:`live_grant`'s answer of less than the cache TTL ago (no I/O)."""
        return self._live.get(grant_id)

    def live_grant(self, grant_id: str) -> LiveGrant | None:
        """The grant's agent if the grant is not revoked and its workspace is active, else None. Remembered
        for the cache TTL (2 s): a revocation or deletion by this process ends it at once (they call
        the service's :class:`~agentpg.access.cache.Invalidation`), one by another process within 2 s."""
        hit = self._live.get(grant_id)
        if hit is not None:
            return hit
        gen = self._invalidation.current()
        with self._sessions() as s:
            row = s.execute(select(OAuthGrant.user_id, OAuthGrant.workspace_id, OAuthGrant.scope)
                            .join(Workspace, Workspace.id == OAuthGrant.workspace_id)
                            .where(OAuthGrant.id == grant_id, OAuthGrant.revoked_at.is_(None),
                                   Workspace.status == "active")).one_or_none()
        if row is None:
            return None
        live = LiveGrant(user_id=row.user_id, workspace_id=row.workspace_id, scope=frozenset(row.scope.split()))
        self._live.put(grant_id, live, gen)
        return live
