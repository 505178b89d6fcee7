"""Request bodies and the REST-only response shapes (the shared ones live in :mod:`agentpg.schemas`).

Every body is strict: unknown fields are refused (``extra="forbid"``), JSON types are not coerced (``"5"``
is not a limit), and no text may contain a NUL byte (PostgreSQL cannot store one, and it is never wanted).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from agentpg.schemas import WorkspaceInfo

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
"""User and workspace ids (mirrors ``lifecycle.deps.validate_id``; a test keeps them equal)."""
ENV_NAME_PATTERN = r"^[A-Z_][A-Z0-9_]{0,127}$"
MAX_OFFSET = 1_000_000_000


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
Name = Annotated[Text, Field(min_length=1, max_length=255)]
"""A table or column name as the caller spells it; matched exactly (case-sensitive) against the catalog."""


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class UserCreate(Body):
    id: Annotated[Text, Field(min_length=1, max_length=128, description="The platform's id for the user.")]
    email: Annotated[Text, Field(max_length=320)] | None = None


class WorkspaceCreate(Body):
    id: Annotated[Text, Field(min_length=1, max_length=128, description="The platform's id for the workspace.")]
    name: Annotated[Text, Field(max_length=200)] | None = None


class TokenCreate(Body):
    name: Annotated[Text, Field(max_length=200, description="A label for the token, e.g. where it is used.")] \
        | None = None


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
