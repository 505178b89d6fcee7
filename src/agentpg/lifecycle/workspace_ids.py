"""Workspace ids are scoped per user: two users may each have a workspace ``w``.

The platform names a workspace (its *public id*, :func:`~agentpg.lifecycle.deps.validate_id`'s alphabet);
the catalog keys it by an *internal id* that is unique across users, so every table that references a
workspace (agent database, permissions, env vars, tokens, audit, operations) and every query by id stays
as it was, and nothing can mix two users' workspaces up:

- the internal id is the public id itself, unless another user already holds that id: then it is
  ``<public id>~<8 hex>`` (``~`` is not in the id alphabet, so the public id is everything before it,
  :func:`public_id`, and no platform id can ever name an internal one);
- creating ``w`` for a user therefore answers exactly as for an id nobody has used (201, a workspace of
  that user's own) when another user has a ``w``: a user token cannot learn which ids other users hold
  (issue 17). Only the user's *own* ``w`` is "already exists";
- :func:`find` resolves a public id within a user (user tokens: their own user; the user-scoped routes)
  or, for the admin token on ``/api/workspaces/{id}``, across users: when two users share the id, that is
  a 409 naming the user-scoped form ``/api/users/{user_id}/workspaces/{id}``.

Creations of one public id are serialized (a transaction-level advisory lock on it), so a user never gets
two workspaces with one public id and two users creating ``w`` at once both succeed.

Limit: the internal form needs 9 more characters, and ids are at most 128: a public id longer than 119
characters that another user already holds is refused as taken (409), as before.
"""

from __future__ import annotations

import secrets
import zlib

from sqlalchemy import ColumnElement, or_, select, text
from sqlalchemy.orm import Session

from agentpg.catalog.models import Workspace
from agentpg.errors import Conflict

SEPARATOR = "~"
_SUFFIX_BYTES = 4
MAX_SCOPED_LENGTH = 128 - 1 - 2 * _SUFFIX_BYTES
_LOCK_NAMESPACE = 0x61706777  # "apgw": this module's advisory locks, apart from other users of the catalog


def public_id(internal_id: str) -> str:
    """The platform's id of a workspace, from its catalog id."""
    return internal_id.split(SEPARATOR, 1)[0]


def lock_public_id(s: Session, public: str) -> None:
    """Serialize, until the end of ``s``'s transaction, with every other creation of ``public``."""
    s.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"),
              {"ns": _LOCK_NAMESPACE, "key": zlib.crc32(public.encode()) - 2**31})


def internal_id_for_new(s: Session, user_id: str, public: str) -> str:
    """The catalog id a new workspace ``public`` of ``user_id`` gets, inside the creating transaction (after
    :func:`lock_public_id`). ``Conflict`` if the user already has a workspace ``public``. Index lookups
    only (the user's workspaces, primary keys): this is on the provisioning path."""
    if s.scalar(select(Workspace.id).where(Workspace.user_id == user_id, _named(public)).limit(1)) is not None:
        raise Conflict(f"workspace {public!r} already exists")
    if s.get(Workspace, public) is None:
        return public
    if len(public) > MAX_SCOPED_LENGTH:
        raise Conflict(f"workspace {public!r} already exists")
    while True:
        candidate = f"{public}{SEPARATOR}{secrets.token_hex(_SUFFIX_BYTES)}"
        if s.get(Workspace, candidate) is None:
            return candidate


def find(s: Session, public: str, user_id: str | None, *, for_update: bool = False) -> Workspace | None:
    """The workspace ``public`` of ``user_id``; with ``user_id`` None (the admin token), the one workspace
    of any user with that id, ``Conflict`` if several users have one, ``None`` if none has."""
    query = select(Workspace).where(_named(public))
    if user_id is not None:
        query = query.where(Workspace.user_id == user_id)
    if for_update:
        query = query.with_for_update(of=Workspace)
    rows = list(s.scalars(query.order_by(Workspace.user_id).limit(2)))
    if len(rows) > 1:
        raise Conflict(f"workspace id {public!r} is used by more than one user; name the user: "
                       f"/api/users/{{user_id}}/workspaces/{public}")
    return rows[0] if rows else None


def _named(public: str) -> ColumnElement[bool]:
    """Catalog ids whose public id is ``public``."""
    return or_(Workspace.id == public, Workspace.id.startswith(public + SEPARATOR, autoescape=True))
