"""The catalog's tables of the OAuth authorization server (issue 20; :mod:`agentpg.service.oauth`).

Nothing here holds a secret in clear: client secrets, authorization codes and refresh tokens are stored as
SHA-256 hashes (each is 256 random bits, so no dictionary to attack), and access tokens are not stored at
all (they are signed JWTs whose grant is looked up on every use). Every row belongs to a user and, but for
clients, to one workspace; deleting either deletes the rows (``ON DELETE CASCADE``), which ends the grant.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from agentpg.catalog.models import Base, new_id, utcnow


class OAuthClient(Base):
    """A client (a desktop MCP app) registered through RFC 7591 dynamic registration."""

    __tablename__ = "oauth_clients"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The ``client_id`` (random, not a secret)."""
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    """SHA-256 of the client secret of a confidential client; null for a public one (PKCE only)."""
    client_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    """The registered metadata as validated (redirect_uris, client_name, grant_types, ...)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Last time a code was issued to it; a client never used within a day of registering is removed."""


class OAuthCode(Base):
    """An authorization code: single use (taken with ``DELETE … RETURNING``), short-lived, PKCE-bound."""

    __tablename__ = "oauth_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("oauth_clients.id", ondelete="CASCADE"), nullable=False,
                                           index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False,
                                              index=True)
    redirect_uri: Mapped[str] = mapped_column(Text, nullable=False)
    scope: Mapped[str] = mapped_column(String(200), nullable=False)
    resource: Mapped[str] = mapped_column(Text, nullable=False)
    """The RFC 8707 resource (``<base>/mcp``) the tokens will name as their audience."""
    code_challenge: Mapped[str] = mapped_column(String(128), nullable=False)
    code_challenge_method: Mapped[str] = mapped_column(String(8), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class OAuthGrant(Base):
    """What a user approved: one client acting as one workspace's agent with some scopes, for one resource.
    Its refresh token rotates on every use; access tokens name the grant (claim ``gid``), so revoking it (or
    deleting the workspace) ends them at their next request."""

    __tablename__ = "oauth_grants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    client_id: Mapped[str] = mapped_column(ForeignKey("oauth_clients.id", ondelete="CASCADE"), nullable=False,
                                           index=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False,
                                              index=True)
    scope: Mapped[str] = mapped_column(String(200), nullable=False)
    resource: Mapped[str] = mapped_column(Text, nullable=False)
    refresh_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    previous_refresh_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    """The refresh token this one replaced: presenting it again means it leaked, and revokes the grant."""
    refresh_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
