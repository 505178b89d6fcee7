"""The classifier's rules as data: which statements are refused and why, which need no more than the
generic checks, which functions an agent may not call (:mod:`agentpg.access.classify` applies them)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from agentpg.access.kinds import StatementKind

# reason -> why it is refused / what to do instead
ADVICE: Final[Mapping[str, str]] = MappingProxyType({
    "transaction_control": "each call runs in its own transaction, committed or rolled back by agentpg",
    "session_state": "session state (role, settings, search_path) is managed by agentpg; schema-qualify names",
    "cursor": "cursors do not survive between calls; use a plain SELECT with ORDER BY and LIMIT/OFFSET",
    "role_management": "roles and memberships are managed by agentpg; ask the operator",
    "ownership_change": "object ownership is managed by agentpg; objects you create stay owned by your role",
    "database_management": "databases are provisioned by agentpg; work inside the database you were given",
    "tablespace_management": "tablespaces are managed by the server operator",
    "extension_management": "extensions are managed by agentpg; ask the operator to enable the extension",
    "language_management": "procedural languages are managed by agentpg; write functions in sql or plpgsql",
    "foreign_data_management": "foreign data wrappers, servers and user mappings are managed by agentpg",
    "replication": "publications and subscriptions are managed by agentpg",
    "server_admin": "server administration commands are not available to agents",
    "notifications": "LISTEN/NOTIFY need a persistent session, which the tools do not keep; use a table",
    "anonymous_code": "anonymous code blocks are refused; send plain SQL, or create a sql/plpgsql function",
    "event_trigger": "event triggers affect the whole database and are managed by agentpg",
    "untrusted_language": "only LANGUAGE sql and LANGUAGE plpgsql functions are allowed",
    "security_definer": "SECURITY DEFINER routines are refused; use SECURITY INVOKER (the default)",
    "vacuum_full": "it rewrites the table under an exclusive lock; use plain VACUUM or ANALYZE",
    "reindex_scope": "reindex individual tables or indexes instead (REINDEX TABLE / REINDEX INDEX)",
    "unsupported_statement": "this kind of statement is not available through agentpg; use ordinary DDL/DML",
})

# Always-refused statement node classes, one reason per line: "reason: Class=LABEL | Class=LABEL ..."
REFUSED_TABLE: Final = """
transaction_control: ConstraintsSetStmt=SET CONSTRAINTS
session_state: DiscardStmt=DISCARD | PrepareStmt=PREPARE | ExecuteStmt=EXECUTE | DeallocateStmt=DEALLOCATE
cursor: DeclareCursorStmt=DECLARE CURSOR | FetchStmt=FETCH/MOVE | ClosePortalStmt=CLOSE
server_admin: AlterSystemStmt=ALTER SYSTEM | LoadStmt=LOAD | CheckPointStmt=CHECKPOINT
role_management: CreateRoleStmt=CREATE ROLE/USER | AlterRoleStmt=ALTER ROLE/USER | DropRoleStmt=DROP ROLE/USER
role_management: AlterRoleSetStmt=ALTER ROLE ... SET | ReassignOwnedStmt=REASSIGN OWNED | DropOwnedStmt=DROP OWNED
role_management: GrantRoleStmt=GRANT/REVOKE of role membership
ownership_change: AlterOwnerStmt=ALTER ... OWNER TO
database_management: CreatedbStmt=CREATE DATABASE | DropdbStmt=DROP DATABASE | AlterDatabaseStmt=ALTER DATABASE
database_management: AlterDatabaseSetStmt=ALTER DATABASE | AlterDatabaseRefreshCollStmt=ALTER DATABASE
tablespace_management: CreateTableSpaceStmt=CREATE TABLESPACE | DropTableSpaceStmt=DROP TABLESPACE
tablespace_management: AlterTableSpaceOptionsStmt=ALTER TABLESPACE | AlterTableMoveAllStmt=ALTER ... TABLESPACE
extension_management: AlterExtensionStmt=ALTER EXTENSION | AlterExtensionContentsStmt=ALTER EXTENSION
language_management: CreatePLangStmt=CREATE LANGUAGE
foreign_data_management: CreateFdwStmt=CREATE FOREIGN DATA WRAPPER | AlterFdwStmt=ALTER FOREIGN DATA WRAPPER
foreign_data_management: CreateForeignServerStmt=CREATE SERVER | AlterForeignServerStmt=ALTER SERVER
foreign_data_management: CreateUserMappingStmt=CREATE USER MAPPING | AlterUserMappingStmt=ALTER USER MAPPING
foreign_data_management: DropUserMappingStmt=DROP USER MAPPING | ImportForeignSchemaStmt=IMPORT FOREIGN SCHEMA
replication: CreatePublicationStmt=CREATE PUBLICATION | AlterPublicationStmt=ALTER PUBLICATION
replication: CreateSubscriptionStmt=CREATE SUBSCRIPTION | AlterSubscriptionStmt=ALTER SUBSCRIPTION
replication: DropSubscriptionStmt=DROP SUBSCRIPTION
notifications: ListenStmt=LISTEN | NotifyStmt=NOTIFY | UnlistenStmt=UNLISTEN
anonymous_code: DoStmt=DO
event_trigger: CreateEventTrigStmt=CREATE EVENT TRIGGER | AlterEventTrigStmt=ALTER EVENT TRIGGER
"""
REFUSED: Final[Mapping[str, tuple[str, str]]] = MappingProxyType({
    cls.strip(): (reason, label.strip())
    for reason, _, items in (line.partition(":") for line in REFUSED_TABLE.strip().splitlines())
    for cls, _, label in (item.partition("=") for item in items.split("|"))
})

# Object types that DROP / ALTER ... RENAME / ALTER ... SET SCHEMA may not touch.
REFUSED_OBJECTS: Final[Mapping[str, str]] = MappingProxyType({
    "OBJECT_ROLE": "role_management", "OBJECT_DATABASE": "database_management",
    "OBJECT_TABLESPACE": "tablespace_management", "OBJECT_EXTENSION": "extension_management",
    "OBJECT_LANGUAGE": "language_management", "OBJECT_FDW": "foreign_data_management",
    "OBJECT_FOREIGN_SERVER": "foreign_data_management", "OBJECT_USER_MAPPING": "foreign_data_management",
    "OBJECT_EVENT_TRIGGER": "event_trigger", "OBJECT_PUBLICATION": "replication",
    "OBJECT_SUBSCRIPTION": "replication", "OBJECT_ACCESS_METHOD": "unsupported_statement",
    "OBJECT_TRANSFORM": "unsupported_statement",
})
OBJECT_LABELS: Final[Mapping[str, str]] = MappingProxyType({
    "MATVIEW": "MATERIALIZED VIEW", "FDW": "FOREIGN DATA WRAPPER", "FOREIGN_SERVER": "SERVER",
    "STATISTIC_EXT": "STATISTICS", "TSCONFIGURATION": "TEXT SEARCH CONFIGURATION",
    "TSDICTIONARY": "TEXT SEARCH DICTIONARY", "OPCLASS": "OPERATOR CLASS", "OPFAMILY": "OPERATOR FAMILY",
})
TABLE_OBJECTS: Final = frozenset({"OBJECT_TABLE", "OBJECT_FOREIGN_TABLE", "OBJECT_MATVIEW"})
RELATION_OBJECTS: Final = TABLE_OBJECTS | {"OBJECT_VIEW", "OBJECT_SEQUENCE", "OBJECT_INDEX"}

# Statements needing no inspection beyond the generic checks: class name -> (kind, command).
_DDL, _WRITE, _OTHER = StatementKind.DDL, StatementKind.WRITE, StatementKind.OTHER
SIMPLE: Final[Mapping[str, tuple[StatementKind, str]]] = MappingProxyType({
    "IndexStmt": (_DDL, "CREATE INDEX"), "ViewStmt": (_DDL, "CREATE VIEW"), "CommentStmt": (_DDL, "COMMENT"),
    "CreateSeqStmt": (_DDL, "CREATE SEQUENCE"), "AlterSeqStmt": (_DDL, "ALTER SEQUENCE"),
    "CompositeTypeStmt": (_DDL, "CREATE TYPE"), "CreateEnumStmt": (_DDL, "CREATE TYPE"),
    "CreateRangeStmt": (_DDL, "CREATE TYPE"), "AlterEnumStmt": (_DDL, "ALTER TYPE"),
    "AlterTypeStmt": (_DDL, "ALTER TYPE"), "CreateDomainStmt": (_DDL, "CREATE DOMAIN"),
    "AlterDomainStmt": (_DDL, "ALTER DOMAIN"), "CreateTrigStmt": (_DDL, "CREATE TRIGGER"),
    "CreatePolicyStmt": (_DDL, "CREATE POLICY"), "AlterPolicyStmt": (_DDL, "ALTER POLICY"),
    "RuleStmt": (_DDL, "CREATE RULE"), "CreateStatsStmt": (_DDL, "CREATE STATISTICS"),
    "AlterStatsStmt": (_DDL, "ALTER STATISTICS"), "AlterDefaultPrivilegesStmt": (_DDL, "ALTER DEFAULT PRIVILEGES"),
    "RefreshMatViewStmt": (_DDL, "REFRESH MATERIALIZED VIEW"), "CreateCastStmt": (_DDL, "CREATE CAST"),
    "AlterTSDictionaryStmt": (_DDL, "ALTER TEXT SEARCH DICTIONARY"),
    "AlterTSConfigurationStmt": (_DDL, "ALTER TEXT SEARCH CONFIGURATION"),
    "TruncateStmt": (_WRITE, "TRUNCATE"), "LockStmt": (_WRITE, "LOCK"), "CallStmt": (_WRITE, "CALL"),
    "VariableShowStmt": (_OTHER, "SHOW"), "ClusterStmt": (_OTHER, "CLUSTER"),
})
TARGET_ATTRS: Final = ("relation", "relations", "view", "sequence", "table", "typevar")

FORBIDDEN_FUNCTIONS: Final = frozenset({
    "set_config", "pg_read_file", "pg_read_binary_file", "pg_stat_file", "lo_import", "lo_export",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_notify",
    "pg_logical_emit_message",
})
FORBIDDEN_PREFIXES: Final = ("dblink", "pg_ls_", "pg_file_", "pg_advisory_", "pg_try_advisory_")
SEQUENCE_CALLS: Final = frozenset({("nextval",), ("setval",)})
ALLOWED_LANGUAGES: Final = frozenset({"sql", "plpgsql"})
FALSE_WORDS: Final = frozenset({"false", "off", "0", "no"})
LITERAL_TOKENS: Final = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
COMMENT_TOKENS: Final = frozenset({"C_COMMENT", "SQL_COMMENT"})
