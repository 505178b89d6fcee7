"""Request bodies and the REST-only response shapes (the shared ones live in :mod:`agentpg.schemas`).

Every body is strict: unknown fields are refused (``extra="forbid"``), JSON types are not coerced (``"5"``
is not a limit), and no text may contain a NUL byte (PostgreSQL cannot store one, and it is never wanted).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agentpg.service import (
    MAX_OFFSET,
    Body,
    Name,
    Text,
    WorkspaceInfo,
)


class EnvValue(Body):
    value: Annotated[Text, Field(max_length=65_536)]


class SortKey(Body):
    column: Name
    direction: Literal["asc", "desc"] = "asc"


class QueryRequest(Body):
    """A page of a table. Without ``order_by`` rows come in primary-key order (unspecified without one)."""

    table: Name
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    offset: Annotated[int, Field(ge=0, le=MAX_OFFSET)] = 0
    order_by: Annotated[list[SortKey], Field(max_length=16)] | None = None
    columns: Annotated[list[Name], Field(min_length=1, max_length=1600,
                                         description="Columns to return, in this order; default all.")] | None = None
    count: Annotated[Literal["auto", "none"], Field(
        description="`auto`: `total` counts the table when that is cheap (its heap within the server's count "
                    "bound); `none`: no count, so `total` is known only on the last page. A client that pages "
                    "by `offset` and stops at a short page needs no count, and saves reading the table.")] = "auto"

    @field_validator("columns")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("each column may be listed once")
        return value


class TokenOut(BaseModel):
    """A fresh token. ``token`` is the secret: shown this once, stored only as a hash."""

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: Literal["user", "agent"]
    token: str
    user_id: str | None
    workspace_id: str | None
    name: str | None
    created_at: datetime


class WorkspaceCreated(WorkspaceInfo):
    agent_token: TokenOut
    """The workspace's first agent token (for its MCP connection), shown this once."""
    mcp_config: dict[str, Any] = Field(
        default_factory=dict,
        description="The MCP client configurations (`http`, `stdio`: each a whole `mcpServers` document to "
                    "paste) with this first agent token filled in; `GET …/mcp-config` gives them later with a "
                    "placeholder instead.")
