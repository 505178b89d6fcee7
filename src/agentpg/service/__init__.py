"""The service: the one façade every edge (api, mcp, web, gateway, cli) calls, and its public vocabulary.

Edges import from here only (and from :mod:`agentpg.errors` and :mod:`agentpg.settings`, the kernel every
layer shares); a test (``tests/test_layers.py``) keeps it so. The names below are what the edges may
use: the :class:`Service` and its parts' result and argument shapes. Connection strings never leave the
service: an edge names a database (an agent's ``"global"``/``"agent"``, or a :class:`DatabaseRef`).
"""

from __future__ import annotations

from agentpg import __version__
from agentpg.access.audit import AuditEntryInfo, AuditFilter, AuditOutcome, AuditPage
from agentpg.access.browse import ColumnInfo, ReadLimits, RowsPage, TableInfo, TableList
from agentpg.access.classify import RejectedStatement, StatementKind
from agentpg.access.grid import (
    MAX_FILTERS,
    MAX_SEARCH_CHARS,
    NO_VALUE,
    OPERATORS,
    REF_COUNT_CAP,
    BadFilter,
    Filter,
    ForeignKey,
    GridPage,
    Referrers,
    RowCount,
    linkable,
    row_key,
)
from agentpg.access.permissions import GlobalDbPermissions, GlobalDbPermissionsSet
from agentpg.access.pools import is_connection_lost
from agentpg.access.query import QueryLimits
from agentpg.access.results import StatementResult
from agentpg.envvars import EnvVarInfo, EnvVarList
from agentpg.lifecycle.undo import TargetSpec
from agentpg.lifecycle.workspace_ids import public_id as public_workspace_id
from agentpg.providers.base import RebaseResult
from agentpg.schemas import (
    ENV_NAME_PATTERN,
    ID_PATTERN,
    MAX_OFFSET,
    Body,
    DatabaseInfo,
    Name,
    StatusInfo,
    Text,
    TokenCreate,
    UsageReport,
    UserCreate,
    UserInfo,
    UserPage,
    WorkspaceCreate,
    WorkspaceInfo,
    WorkspacePage,
)
from agentpg.service.authz import Caller, not_an_agent, own_user, require_admin, user_scope
from agentpg.service.client_configs import client_configs
from agentpg.service.core import Service
from agentpg.service.exports import EXPORT_MEDIA, attachment
from agentpg.service.gateway_configs import (
    NAME_PATTERN,
    GatewayTarget,
    McpServerInfo,
    McpServerList,
    McpServerSpec,
)
from agentpg.service.reader import DatabaseRef
from agentpg.service.sql_box import SqlFailed, SqlLimits, SqlRefused, SqlResult
from agentpg.service.tenant import HeldConnections, NotStarted, TenantAccess
from agentpg.service.tool_choice import AGENT_TOOLS, McpTools, McpToolsChoice
from agentpg.service.undo import (
    ArchiveInfo,
    CheckpointInfo,
    OperationInfo,
    RestoredCopyInfo,
    RestoreResult,
)
from agentpg.tokens import IssuedToken, Principal, TokenInfo

__all__ = [
    "AGENT_TOOLS",
    "ENV_NAME_PATTERN",
    "EXPORT_MEDIA",
    "ID_PATTERN",
    "MAX_FILTERS",
    "MAX_OFFSET",
    "MAX_SEARCH_CHARS",
    "NAME_PATTERN",
    "NO_VALUE",
    "OPERATORS",
    "REF_COUNT_CAP",
    "ArchiveInfo",
    "AuditEntryInfo",
    "AuditFilter",
    "AuditOutcome",
    "AuditPage",
    "BadFilter",
    "Body",
    "Caller",
    "CheckpointInfo",
    "ColumnInfo",
    "DatabaseInfo",
    "DatabaseRef",
    "EnvVarInfo",
    "EnvVarList",
    "Filter",
    "ForeignKey",
    "GatewayTarget",
    "GlobalDbPermissions",
    "GlobalDbPermissionsSet",
    "GridPage",
    "HeldConnections",
    "IssuedToken",
    "McpServerInfo",
    "McpServerList",
    "McpServerSpec",
    "McpTools",
    "McpToolsChoice",
    "Name",
    "NotStarted",
    "OperationInfo",
    "Principal",
    "QueryLimits",
    "ReadLimits",
    "RebaseResult",
    "Referrers",
    "RejectedStatement",
    "RestoreResult",
    "RestoredCopyInfo",
    "RowCount",
    "RowsPage",
    "Service",
    "SqlFailed",
    "SqlLimits",
    "SqlRefused",
    "SqlResult",
    "StatementKind",
    "StatementResult",
    "StatusInfo",
    "TableInfo",
    "TableList",
    "TargetSpec",
    "TenantAccess",
    "Text",
    "TokenCreate",
    "TokenInfo",
    "UsageReport",
    "UserCreate",
    "UserInfo",
    "UserPage",
    "WorkspaceCreate",
    "WorkspaceInfo",
    "WorkspacePage",
    "__version__",
    "attachment",
    "client_configs",
    "is_connection_lost",
    "linkable",
    "not_an_agent",
    "own_user",
    "public_workspace_id",
    "require_admin",
    "row_key",
    "user_scope",
]
