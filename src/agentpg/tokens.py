"""API credentials: random bearer tokens stored as SHA-256 hashes, shown once, revocable.

A token reads ``apg_<kind letter>_<43 url-safe chars>`` (256 bits of randomness), so a leaked one is
recognisable in logs and by secret scanners. Only its hash is stored: SHA-256 is enough for a secret this
long (no dictionary to attack), and lets lookup be one indexed equality.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import Engine, bindparam, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from agentpg.access import cache
from agentpg.catalog.engine import read_engine
from agentpg.catalog.models import Token, User, Workspace
from agentpg.errors import NotFound, Unauthenticated

TokenKind = Literal["admin", "user", "agent"]
ADMIN_PREFIX = "apg_a_"
"""How every admin token starts (the one place it is written)."""
_PREFIX: dict[str, str] = {"admin": ADMIN_PREFIX, "user": "apg_u_", "agent": "apg_g_"}


def new_admin_secret() -> str:
    """A fresh admin token (shown once, kept 0600 in the home)."""
    return ADMIN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling. ``user_id``/``workspace_id`` scope what a user or agent token may reach."""

    kind: TokenKind
    token_id: str | None
    user_id: str | None = None
    workspace_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"


@dataclass(frozen=True)
class IssuedToken:
    """A fresh token. ``secret`` is shown to the caller once and never stored."""

    id: str
    kind: TokenKind
    secret: str
    user_id: str | None
    workspace_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class TokenInfo:
    """A live token as a listing shows it: never its secret (only a hash is stored). ``workspace_id`` is the
    catalog's id of an agent token's workspace."""

    id: str
    kind: TokenKind
    name: str | None
    workspace_id: str | None
    created_at: datetime
    last_used_at: datetime | None


# A live token and, for an agent token, its workspace still active: one statement, one snapshot.
_LIVE_TOKEN = (select(Token.id, Token.kind, Token.user_id, Token.workspace_id)
               .outerjoin(Workspace, Workspace.id == Token.workspace_id)
               .where(Token.token_hash == bindparam("digest"), Token.revoked_at.is_(None),
                      or_(Token.workspace_id.is_(None), Workspace.status == "active")))


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


class TokenStore:
    """Issue, verify and revoke tokens in the catalog. ``admin_secret`` is the platform's admin token."""

    def __init__(self, sessions: sessionmaker[Session], admin_secret: str, *,
                 cache_ttl_s: float = cache.TTL_S, invalidation: cache.Invalidation | None = None) -> None:
        self._sessions = sessions
        bind = sessions.kw.get("bind")
        # Authentication is one autocommit statement (no BEGIN/ROLLBACK) when the factory names its engine.
        self._reads: Engine | None = read_engine(bind) if isinstance(bind, Engine) else None
        self._invalidation = invalidation or cache.Invalidation()
        self._admin_hash = hash_token(admin_secret)
        # Successful lookups only, by hash, for cache_ttl_s: see agentpg.access.cache for what that means.
        self._cache: cache.TtlCache[str, Principal] = cache.TtlCache(self._invalidation, cache_ttl_s)

    def issue(self, kind: Literal["user", "agent"], *, user_id: str, workspace_id: str | None = None,
              name: str | None = None, session: Session | None = None) -> IssuedToken:
        raw = _PREFIX[kind] + secrets.token_urlsafe(32)
        row = Token(kind=kind, token_hash=hash_token(raw), user_id=user_id, workspace_id=workspace_id, name=name,
                    created_at=datetime.now(UTC))
        if session is not None:
            session.add(row)
            session.flush()
        else:
            with self._sessions.begin() as s:
                if s.get(User, user_id) is None:
                    raise NotFound(f"user {user_id!r} does not exist")
                if workspace_id is not None and s.get(Workspace, workspace_id) is None:
                    raise NotFound(f"workspace {workspace_id!r} does not exist")
                s.add(row)
                s.flush()
        return IssuedToken(id=row.id, kind=kind, secret=raw, user_id=user_id, workspace_id=workspace_id,
                           created_at=row.created_at)

    def cached(self, raw: str | None) -> Principal | None:
        """The principal of a token authenticated less than the cache TTL ago, or ``None`` (then call
        :meth:`authenticate`). No I/O: safe to call on an event loop."""
        if not raw or len(raw) > 200:
            return None
        digest = hash_token(raw)
        if hmac.compare_digest(digest, self._admin_hash):
            return Principal(kind="admin", token_id=None)
        return self._cache.get(digest)

    def is_admin_secret(self, raw: str) -> bool:
        """Whether ``raw`` is the admin token (constant time; no catalog read)."""
        return raw.startswith(ADMIN_PREFIX) and hmac.compare_digest(hash_token(raw), self._admin_hash)

    def authenticate(self, raw: str | None) -> Principal:
        """The principal behind a bearer token, or ``Unauthenticated`` (never says which part was wrong).

        A success is remembered for the cache TTL (2 s): a token revoked by another process stops working
        within that; one revoked through this process stops at once."""
        if not raw or len(raw) > 200:
            raise Unauthenticated("a valid bearer token is required")
        digest = hash_token(raw)
        if hmac.compare_digest(digest, self._admin_hash):
            return Principal(kind="admin", token_id=None)
        hit = self._cache.get(digest)
        if hit is not None:
            return hit
        gen = self._invalidation.current()
        if self._reads is not None:
            with self._reads.connect() as conn:
                row = conn.execute(_LIVE_TOKEN, {"digest": digest}).one_or_none()
        else:
            with self._sessions() as s:
                row = s.execute(_LIVE_TOKEN, {"digest": digest}).one_or_none()
        if row is None:
            raise Unauthenticated("a valid bearer token is required")
        principal = Principal(kind=row.kind, token_id=row.id, user_id=row.user_id, workspace_id=row.workspace_id)
        self._cache.put(digest, principal, gen)
        return principal

    def list_live(self, user_id: str, *, workspace_id: str | None = None, limit: int = 200) -> list[TokenInfo]:
        """The user's unrevoked tokens (or only those of one workspace, by catalog id), oldest first."""
        with self._sessions() as s:
            query = select(Token).where(Token.user_id == user_id, Token.revoked_at.is_(None))
            if workspace_id is not None:
                query = query.where(Token.workspace_id == workspace_id)
            rows = list(s.scalars(query.order_by(Token.created_at, Token.id).limit(limit)))
        return [TokenInfo(id=r.id, kind=r.kind, name=r.name, workspace_id=r.workspace_id,  # type: ignore[arg-type]
                          created_at=r.created_at, last_used_at=r.last_used_at) for r in rows]

    def revoke(self, token_id: str, *, user_id: str | None = None) -> None:
        """Revoke a token; ``user_id`` scopes it (another user's token is "not found")."""
        with self._sessions.begin() as s:
            query = update(Token).where(Token.id == token_id, Token.revoked_at.is_(None))
            if user_id is not None:
                query = query.where(Token.user_id == user_id)
            result = s.execute(query.values(revoked_at=datetime.now(UTC)))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(f"token {token_id!r} does not exist")
        self._invalidation.bump()  # after the commit: a lookup racing with it cannot re-store the old answer
