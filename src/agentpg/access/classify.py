"""Pre-flight classification of a single SQL statement, using pglast (Postgres' own parser).

The agent's Postgres role and its grants are the real security boundary: this module only
gives the agent an early, actionable error and tells the MCP tools what kind of statement
they are about to run (read, write, DDL or an allowed utility command).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import pglast
from pglast import ast
from pglast.parser import ParseError, parse_sql_protobuf, scan

MAX_STATEMENT_BYTES: Final = 1024 * 1024


class StatementKind(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    DDL = "ddl"
    OTHER = "other"  # allowed utility: SHOW, EXPLAIN (not executing a write), VACUUM, ANALYZE...


@dataclass(frozen=True)
class Classification:
    kind: StatementKind
    command: str
    tables_read: frozenset[str]
    tables_written: frozenset[str]
    creates_table: bool
    drops_table: bool
    fingerprint: str


class RejectedStatement(ValueError):
    """The statement was refused before reaching the server; ``str(exc)`` says what to do instead."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _refuse(reason: str, message: str) -> RejectedStatement:
    return RejectedStatement(message, reason=reason)


# Why a category of statements is refused, and what the agent should do instead.
_ADVICE: Final[Mapping[str, str]] = MappingProxyType({
    "transaction_control": "each call already runs in its own transaction, which agentpg commits or "
    "rolls back for you; send only the statement itself",
    "session_state": "session state (role, settings, search_path, prepared statements) is managed by "
    "agentpg; schema-qualify names instead of changing settings",
    "cursor": "cursors do not survive between calls; use a plain SELECT with ORDER BY and LIMIT/OFFSET",
    "role_management": "roles, memberships and ownership are managed by agentpg; ask the operator",
    "ownership_change": "object ownership is managed by agentpg; objects you create stay owned by your role",
    "database_management": "databases are provisioned by agentpg; work inside the database you were given",
    "tablespace_management": "tablespaces are managed by the server operator",
    "extension_management": "extensions are managed by agentpg; ask the operator to enable the extension",
    "language_management": "procedural languages are managed by agentpg; write functions in sql or plpgsql",
    "foreign_data_management": "foreign data wrappers, servers and user mappings are managed by agentpg",
    "replication": "publications and subscriptions are managed by agentpg",
    "server_admin": "server administration commands are not available to agents",
    "notifications": "LISTEN/NOTIFY need a persistent session, which the tools do not keep; "
    "record events in a table instead",
    "anonymous_code": "anonymous code blocks are not allowed; send plain SQL statements, or create a "
    "sql/plpgsql function and call it",
    "event_trigger": "event triggers affect the whole database and are managed by agentpg",
    "untrusted_language": "only LANGUAGE sql and LANGUAGE plpgsql functions are allowed",
    "security_definer": "SECURITY DEFINER routines are not allowed; use SECURITY INVOKER (the default)",
    "vacuum_full": "it rewrites the table under an exclusive lock; use plain VACUUM or ANALYZE",
    "reindex_scope": "reindex individual tables or indexes instead (REINDEX TABLE / REINDEX INDEX)",
    "unsupported_statement": "this kind of statement is not available through agentpg",
})

# Statement node classes that are always refused: class name -> (reason, label).
_REFUSED: Final[Mapping[str, tuple[str, str]]] = MappingProxyType({
    "ConstraintsSetStmt": ("transaction_control", "SET CONSTRAINTS"),
    "DiscardStmt": ("session_state", "DISCARD"),
    "PrepareStmt": ("session_state", "PREPARE"),
    "ExecuteStmt": ("session_state", "EXECUTE"),
    "DeallocateStmt": ("session_state", "DEALLOCATE"),
    "DeclareCursorStmt": ("cursor", "DECLARE CURSOR"),
    "FetchStmt": ("cursor", "FETCH/MOVE"),
    "ClosePortalStmt": ("cursor", "CLOSE"),
    "AlterSystemStmt": ("server_admin", "ALTER SYSTEM"),
    "LoadStmt": ("server_admin", "LOAD"),
    "CheckPointStmt": ("server_admin", "CHECKPOINT"),
    "CreateRoleStmt": ("role_management", "CREATE ROLE/USER/GROUP"),
    "AlterRoleStmt": ("role_management", "ALTER ROLE/USER/GROUP"),
    "AlterRoleSetStmt": ("role_management", "ALTER ROLE ... SET"),
    "DropRoleStmt": ("role_management", "DROP ROLE/USER/GROUP"),
    "GrantRoleStmt": ("role_management", "GRANT/REVOKE of role membership"),
    "ReassignOwnedStmt": ("role_management", "REASSIGN OWNED"),
    "DropOwnedStmt": ("role_management", "DROP OWNED"),
    "AlterOwnerStmt": ("ownership_change", "ALTER ... OWNER TO"),
    "CreatedbStmt": ("database_management", "CREATE DATABASE"),
    "DropdbStmt": ("database_management", "DROP DATABASE"),
    "AlterDatabaseStmt": ("database_management", "ALTER DATABASE"),
    "AlterDatabaseSetStmt": ("database_management", "ALTER DATABASE ... SET"),
    "AlterDatabaseRefreshCollStmt": ("database_management", "ALTER DATABASE ... REFRESH COLLATION"),
    "CreateTableSpaceStmt": ("tablespace_management", "CREATE TABLESPACE"),
    "DropTableSpaceStmt": ("tablespace_management", "DROP TABLESPACE"),
    "AlterTableSpaceOptionsStmt": ("tablespace_management", "ALTER TABLESPACE"),
    "AlterTableMoveAllStmt": ("tablespace_management", "ALTER ... ALL IN TABLESPACE"),
    "CreateExtensionStmt": ("extension_management", "CREATE EXTENSION"),
    "AlterExtensionStmt": ("extension_management", "ALTER EXTENSION"),
    "AlterExtensionContentsStmt": ("extension_management", "ALTER EXTENSION"),
    "CreatePLangStmt": ("language_management", "CREATE LANGUAGE"),
    "CreateFdwStmt": ("foreign_data_management", "CREATE FOREIGN DATA WRAPPER"),
    "AlterFdwStmt": ("foreign_data_management", "ALTER FOREIGN DATA WRAPPER"),
    "CreateForeignServerStmt": ("foreign_data_management", "CREATE SERVER"),
    "AlterForeignServerStmt": ("foreign_data_management", "ALTER SERVER"),
    "CreateUserMappingStmt": ("foreign_data_management", "CREATE USER MAPPING"),
    "AlterUserMappingStmt": ("foreign_data_management", "ALTER USER MAPPING"),
    "DropUserMappingStmt": ("foreign_data_management", "DROP USER MAPPING"),
    "ImportForeignSchemaStmt": ("foreign_data_management", "IMPORT FOREIGN SCHEMA"),
    "CreatePublicationStmt": ("replication", "CREATE PUBLICATION"),
    "AlterPublicationStmt": ("replication", "ALTER PUBLICATION"),
    "CreateSubscriptionStmt": ("replication", "CREATE SUBSCRIPTION"),
    "AlterSubscriptionStmt": ("replication", "ALTER SUBSCRIPTION"),
    "DropSubscriptionStmt": ("replication", "DROP SUBSCRIPTION"),
    "ListenStmt": ("notifications", "LISTEN"),
    "NotifyStmt": ("notifications", "NOTIFY"),
    "UnlistenStmt": ("notifications", "UNLISTEN"),
    "DoStmt": ("anonymous_code", "DO"),
    "CreateEventTrigStmt": ("event_trigger", "CREATE EVENT TRIGGER"),
    "AlterEventTrigStmt": ("event_trigger", "ALTER EVENT TRIGGER"),
})

# Object types that DROP / ALTER ... RENAME / ALTER ... SET SCHEMA may not touch.
_REFUSED_OBJECTS: Final[Mapping[str, str]] = MappingProxyType({
    "OBJECT_ROLE": "role_management",
    "OBJECT_DATABASE": "database_management",
    "OBJECT_TABLESPACE": "tablespace_management",
    "OBJECT_EXTENSION": "extension_management",
    "OBJECT_LANGUAGE": "language_management",
    "OBJECT_FDW": "foreign_data_management",
    "OBJECT_FOREIGN_SERVER": "foreign_data_management",
    "OBJECT_USER_MAPPING": "foreign_data_management",
    "OBJECT_EVENT_TRIGGER": "event_trigger",
    "OBJECT_PUBLICATION": "replication",
    "OBJECT_SUBSCRIPTION": "replication",
    "OBJECT_ACCESS_METHOD": "unsupported_statement",
    "OBJECT_TRANSFORM": "unsupported_statement",
})

_OBJECT_LABELS: Final[Mapping[str, str]] = MappingProxyType({
    "MATVIEW": "MATERIALIZED VIEW", "FDW": "FOREIGN DATA WRAPPER", "FOREIGN_SERVER": "SERVER",
    "STATISTIC_EXT": "STATISTICS", "TSCONFIGURATION": "TEXT SEARCH CONFIGURATION",
    "TSDICTIONARY": "TEXT SEARCH DICTIONARY", "TSPARSER": "TEXT SEARCH PARSER",
    "TSTEMPLATE": "TEXT SEARCH TEMPLATE", "OPCLASS": "OPERATOR CLASS", "OPFAMILY": "OPERATOR FAMILY",
    "LARGEOBJECT": "LARGE OBJECT",
})
_RELATION_OBJECTS: Final = frozenset(
    {"OBJECT_TABLE", "OBJECT_FOREIGN_TABLE", "OBJECT_MATVIEW", "OBJECT_VIEW", "OBJECT_SEQUENCE", "OBJECT_INDEX"}
)
_TABLE_OBJECTS: Final = frozenset({"OBJECT_TABLE", "OBJECT_FOREIGN_TABLE", "OBJECT_MATVIEW"})

# DDL statements that need no inspection beyond the generic checks: class name -> command.
_SIMPLE_DDL: Final[Mapping[str, str]] = MappingProxyType({
    "IndexStmt": "CREATE INDEX", "ViewStmt": "CREATE VIEW", "CreateSeqStmt": "CREATE SEQUENCE",
    "AlterSeqStmt": "ALTER SEQUENCE", "CompositeTypeStmt": "CREATE TYPE", "CreateEnumStmt": "CREATE TYPE",
    "CreateRangeStmt": "CREATE TYPE", "AlterEnumStmt": "ALTER TYPE", "AlterTypeStmt": "ALTER TYPE",
    "CreateDomainStmt": "CREATE DOMAIN", "AlterDomainStmt": "ALTER DOMAIN", "CommentStmt": "COMMENT",
    "CreateTrigStmt": "CREATE TRIGGER", "CreatePolicyStmt": "CREATE POLICY",
    "AlterPolicyStmt": "ALTER POLICY", "RuleStmt": "CREATE RULE", "CreateStatsStmt": "CREATE STATISTICS",
    "AlterStatsStmt": "ALTER STATISTICS", "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES",
    "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW", "CreateCastStmt": "CREATE CAST",
    "AlterTSDictionaryStmt": "ALTER TEXT SEARCH DICTIONARY",
    "AlterTSConfigurationStmt": "ALTER TEXT SEARCH CONFIGURATION",
})
_SIMPLE_OTHER: Final[Mapping[str, tuple[StatementKind, str]]] = MappingProxyType({
    "VariableShowStmt": (StatementKind.OTHER, "SHOW"),
    "ClusterStmt": (StatementKind.OTHER, "CLUSTER"),
    "TruncateStmt": (StatementKind.WRITE, "TRUNCATE"),
    "LockStmt": (StatementKind.WRITE, "LOCK"),
    "CallStmt": (StatementKind.WRITE, "CALL"),
})

_FORBIDDEN_FUNCTIONS: Final = frozenset({
    "set_config", "pg_read_file", "pg_read_binary_file", "pg_stat_file", "lo_import", "lo_export",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_notify",
})
_FORBIDDEN_PREFIXES: Final = ("dblink", "pg_ls_", "pg_file_", "pg_advisory_", "pg_try_advisory_")
_SEQUENCE_CALLS: Final = frozenset({("nextval",), ("setval",)})
_ALLOWED_LANGUAGES: Final = frozenset({"sql", "plpgsql"})
_FALSE_WORDS: Final = frozenset({"false", "off", "0", "no", "f", "n"})


@dataclass
class _Result:
    kind: StatementKind
    command: str
    targets: list[Any] = field(default_factory=list)  # RangeVar nodes the statement writes/creates
    written: set[str] = field(default_factory=set)  # written names that are not RangeVars (DROP)
    creates_table: bool = False
    drops_table: bool = False


def _walk(root: Any) -> Iterator[Any]:
    """Every ast.Node below (and including) root, iteratively (trees can be deep)."""
    stack: list[Any] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.Node):
            yield item
            stack.extend(getattr(item, member) for member in item)
        elif isinstance(item, tuple):
            stack.extend(item)


def _names(parts: Any) -> tuple[str, ...]:
    return tuple(p.sval for p in parts or () if isinstance(p, ast.String) and p.sval is not None)


def _object_label(objtype: Any) -> str:
    name = str(getattr(objtype, "name", objtype)).removeprefix("OBJECT_")
    return _OBJECT_LABELS.get(name, name.replace("_", " "))


def _relname(rv: Any) -> str:
    return ".".join(p for p in (rv.catalogname, rv.schemaname, rv.relname) if p)


def _truthy(arg: Any) -> bool:
    """Postgres option value: a bare option (no value) means true."""
    if arg is None:
        return True
    if isinstance(arg, ast.Boolean):
        return bool(arg.boolval)
    if isinstance(arg, ast.Integer):
        return arg.ival != 0
    return not (isinstance(arg, ast.String) and str(arg.sval).lower() in _FALSE_WORDS)


def _option(options: Any, name: str) -> bool:
    return any(isinstance(d, ast.DefElem) and d.defname == name and _truthy(d.arg) for d in options or ())


def _refuse_category(reason: str, label: str) -> RejectedStatement:
    return _refuse(reason, f"{label} is not allowed: {_ADVICE[reason]}.")


def _check_object_type(objtype: Any, verb: str) -> None:
    reason = _REFUSED_OBJECTS.get(getattr(objtype, "name", ""))
    if reason is not None:
        raise _refuse_category(reason, f"{verb} {_object_label(objtype)}")


def _relations(*values: Any) -> list[Any]:
    found: list[Any] = []
    for value in values:
        items = value if isinstance(value, tuple) else (value,)
        found.extend(v for v in items if isinstance(v, ast.RangeVar))
    return found


def _effects(root: Any, result: _Result) -> None:
    """Record what executing `root` writes: DML anywhere (also in CTEs), SELECT INTO, row locks, nextval."""
    for node in _walk(root):
        if isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt):
            result.kind = StatementKind.WRITE if result.kind is StatementKind.READ else result.kind
            result.targets.extend(_relations(node.relation))
        elif isinstance(node, ast.SelectStmt) and (node.intoClause is not None or node.lockingClause):
            result.kind = StatementKind.WRITE if result.kind is StatementKind.READ else result.kind
            if node.intoClause is not None:
                result.targets.extend(_relations(node.intoClause.rel))
                result.creates_table = True
        elif isinstance(node, ast.FuncCall) and _names(node.funcname)[-1:] in _SEQUENCE_CALLS:
            result.kind = StatementKind.WRITE if result.kind is StatementKind.READ else result.kind


def _query(stmt: Any) -> _Result:
    command = {"InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE", "MergeStmt": "MERGE"}
    name = type(stmt).__name__
    if name != "SelectStmt":
        result = _Result(StatementKind.WRITE, command[name])
    elif stmt.intoClause is not None:
        result = _Result(StatementKind.WRITE, "SELECT INTO")
    else:
        result = _Result(StatementKind.READ, "VALUES" if stmt.valuesLists else "SELECT")
    _effects(stmt, result)
    return result


def _explain(stmt: Any) -> _Result:
    inner = _classify_stmt(stmt.query)
    if _option(stmt.options, "analyze"):
        if inner.kind in (StatementKind.WRITE, StatementKind.DDL):
            inner.command = f"EXPLAIN ANALYZE {inner.command}"
            return inner
        return _Result(StatementKind.OTHER, "EXPLAIN ANALYZE")
    return _Result(StatementKind.OTHER, "EXPLAIN")  # plans only: nothing is executed or written


def _set(stmt: Any) -> _Result:
    name = stmt.name or ""
    if name in ("TRANSACTION", "SESSION CHARACTERISTICS") or name.startswith("transaction_"):
        raise _refuse_category("transaction_control", "SET TRANSACTION")
    verb = "RESET" if stmt.kind is not None and stmt.kind.name.startswith("VAR_RESET") else "SET"
    label = {"role": "ROLE", "session_authorization": "SESSION AUTHORIZATION"}.get(name, name or "ALL")
    raise _refuse_category("session_state", f"{verb} {label}")


def _transaction(stmt: Any) -> _Result:
    label = stmt.kind.name.removeprefix("TRANS_STMT_").replace("_", " ") if stmt.kind else "BEGIN"
    raise _refuse_category("transaction_control", f"Transaction control ({label})")


def _copy(stmt: Any) -> _Result:
    if stmt.is_program:
        raise _refuse("copy_program", "COPY ... PROGRAM is not allowed: it would run a shell command on the "
                      "database server. Read rows with SELECT and load them with INSERT ... VALUES.")
    if stmt.filename is not None:
        raise _refuse("copy_file", "COPY to or from a server file is not allowed: agents cannot touch files "
                      "on the database server. Read rows with SELECT and load them with INSERT ... VALUES.")
    raise _refuse("copy_stream", "COPY ... FROM STDIN / TO STDOUT is not supported: the tools do not stream "
                  "COPY data. Read rows with SELECT and load them with INSERT ... VALUES (many rows each).")


def _vacuum(stmt: Any) -> _Result:
    command = "VACUUM" if stmt.is_vacuumcmd else "ANALYZE"
    if _option(stmt.options, "full"):
        raise _refuse_category("vacuum_full", "VACUUM FULL")
    return _Result(StatementKind.OTHER, command)


def _reindex(stmt: Any) -> _Result:
    kind = getattr(stmt.kind, "name", "")
    if kind in ("REINDEX_OBJECT_SYSTEM", "REINDEX_OBJECT_DATABASE"):
        raise _refuse_category("reindex_scope", f"REINDEX {kind.removeprefix('REINDEX_OBJECT_')}")
    return _Result(StatementKind.OTHER, "REINDEX")


def _check_security(options: Any, label: str) -> None:
    for opt in options or ():
        if isinstance(opt, ast.DefElem) and opt.defname == "security" and _truthy(opt.arg):
            raise _refuse_category("security_definer", f"{label} ... SECURITY DEFINER")


def _create_function(stmt: Any) -> _Result:
    command = "CREATE PROCEDURE" if stmt.is_procedure else "CREATE FUNCTION"
    language, bodies = "sql", []
    for opt in stmt.options or ():
        if isinstance(opt, ast.DefElem) and opt.defname == "language" and isinstance(opt.arg, ast.String):
            language = str(opt.arg.sval).lower()
        elif isinstance(opt, ast.DefElem) and opt.defname == "as":
            bodies = list(_names(opt.arg if isinstance(opt.arg, tuple) else (opt.arg,)))
    if language not in _ALLOWED_LANGUAGES:
        raise _refuse_category("untrusted_language", f"{command} ... LANGUAGE {language}")
    _check_security(stmt.options, command)
    if language == "sql":  # best effort: the body of a string-bodied SQL function is plain SQL too
        for body in bodies:
            try:
                parsed = _parse(body)
            except RejectedStatement:
                continue
            for raw in parsed:
                _check_functions(raw.stmt)
    return _Result(StatementKind.DDL, command)


def _alter_function(stmt: Any) -> _Result:
    command = f"ALTER {_object_label(stmt.objtype)}"
    _check_security(stmt.actions, command)
    return _Result(StatementKind.DDL, command)


def _alter_table(stmt: Any) -> _Result:
    command = f"ALTER {_object_label(stmt.objtype)}"
    for cmd in stmt.cmds or ():
        if isinstance(cmd, ast.AlterTableCmd) and getattr(cmd.subtype, "name", "") == "AT_ChangeOwner":
            raise _refuse_category("ownership_change", f"{command} ... OWNER TO")
    return _Result(StatementKind.DDL, command, targets=_relations(stmt.relation))


def _drop(stmt: Any) -> _Result:
    _check_object_type(stmt.removeType, "DROP")
    kind = getattr(stmt.removeType, "name", "")
    cascade = getattr(stmt.behavior, "name", "") == "DROP_CASCADE"
    result = _Result(StatementKind.DDL, f"DROP {_object_label(stmt.removeType)}",
                     drops_table=kind in _TABLE_OBJECTS or cascade)
    if kind in _RELATION_OBJECTS:
        result.written = {".".join(_names(obj)) for obj in stmt.objects or () if isinstance(obj, tuple)}
    return result


def _rename_or_move(stmt: Any) -> _Result:
    objtype = stmt.renameType if isinstance(stmt, ast.RenameStmt) else stmt.objectType
    _check_object_type(objtype, "ALTER")
    return _Result(StatementKind.DDL, f"ALTER {_object_label(objtype)}", targets=_relations(stmt.relation))


def _create_table(stmt: Any) -> _Result:
    base: Any = stmt.base if isinstance(stmt, ast.CreateForeignTableStmt) else stmt
    command = "CREATE FOREIGN TABLE" if base is not stmt else "CREATE TABLE"
    return _Result(StatementKind.DDL, command, targets=_relations(base.relation), creates_table=True)


def _create_table_as(stmt: Any) -> _Result:
    matview = getattr(stmt.objtype, "name", "") == "OBJECT_MATVIEW"
    command = "SELECT INTO" if stmt.is_select_into else (
        "CREATE MATERIALIZED VIEW" if matview else "CREATE TABLE AS")
    kind = StatementKind.WRITE if stmt.is_select_into else StatementKind.DDL
    result = _Result(kind, command, targets=_relations(stmt.into.rel), creates_table=True)
    _effects(stmt.query, result)
    return result


def _create_schema(stmt: Any) -> _Result:
    result = _Result(StatementKind.DDL, "CREATE SCHEMA")
    for element in stmt.schemaElts or ():
        inner = _classify_stmt(element)
        result.targets.extend(inner.targets)
        result.creates_table = result.creates_table or inner.creates_table
    return result


def _grant(stmt: Any) -> _Result:
    return _Result(StatementKind.DDL, "GRANT" if stmt.is_grant else "REVOKE")


def _define(stmt: Any) -> _Result:
    return _Result(StatementKind.DDL, f"CREATE {_object_label(stmt.kind)}")


_HANDLERS: Final[Mapping[str, Callable[[Any], _Result]]] = MappingProxyType({
    "SelectStmt": _query, "InsertStmt": _query, "UpdateStmt": _query, "DeleteStmt": _query,
    "MergeStmt": _query, "ExplainStmt": _explain, "VariableSetStmt": _set,
    "TransactionStmt": _transaction, "CopyStmt": _copy, "VacuumStmt": _vacuum, "ReindexStmt": _reindex,
    "CreateFunctionStmt": _create_function, "AlterFunctionStmt": _alter_function,
    "AlterTableStmt": _alter_table, "DropStmt": _drop, "RenameStmt": _rename_or_move,
    "AlterObjectSchemaStmt": _rename_or_move, "CreateStmt": _create_table,
    "CreateForeignTableStmt": _create_table, "CreateTableAsStmt": _create_table_as,
    "CreateSchemaStmt": _create_schema, "GrantStmt": _grant, "DefineStmt": _define,
})


def _classify_stmt(stmt: Any) -> _Result:
    name = type(stmt).__name__
    if name in _REFUSED:
        raise _refuse_category(*_REFUSED[name])
    handler = _HANDLERS.get(name)
    if handler is not None:
        return handler(stmt)
    if name in _SIMPLE_DDL:
        targets = _relations(*(getattr(stmt, a, None) for a in ("relation", "view", "sequence", "table")))
        return _Result(StatementKind.DDL, _SIMPLE_DDL[name], targets=targets)
    if name in _SIMPLE_OTHER:
        kind, command = _SIMPLE_OTHER[name]
        targets = _relations(getattr(stmt, "relations", None)) if kind is StatementKind.WRITE else []
        return _Result(kind, command, targets=targets)
    label = "".join(f" {c}" if c.isupper() else c for c in name.removesuffix("Stmt")).strip().upper()
    raise _refuse_category("unsupported_statement", f"{label or name} statements")


def _forbidden_function(parts: tuple[str, ...]) -> str | None:
    """Match on the last name component, whatever the schema (pg_catalog., public.dblink ...)."""
    if not parts:
        return None
    name = parts[-1].lower()
    if name in _FORBIDDEN_FUNCTIONS:
        return name
    if name.startswith(_FORBIDDEN_PREFIXES) and "_xact_" not in name:
        return name
    return None


def _function_refs(root: Any) -> Iterator[tuple[str, ...]]:
    for node in _walk(root):
        if isinstance(node, ast.FuncCall | ast.CreateTrigStmt):
            yield _names(node.funcname)
        elif isinstance(node, ast.ObjectWithArgs):
            yield _names(node.objname)
        elif isinstance(node, ast.DefineStmt):  # CREATE OPERATOR (function = f), CREATE AGGREGATE (sfunc = f)
            for opt in node.definition or ():
                if isinstance(opt, ast.DefElem) and isinstance(opt.arg, ast.TypeName):
                    yield _names(opt.arg.names)


def _check_functions(root: Any) -> None:
    for parts in _function_refs(root):
        name = _forbidden_function(parts)
        if name is not None:
            raise _refuse("forbidden_function", f"Calling {name}() is not allowed for agents: it reads server "
                          "files, changes session or server state, or reaches outside this database. Use "
                          "plain SQL on your own tables instead (xact-level advisory locks are fine).")


def _parse(sql: str) -> tuple[Any, ...]:
    if "\x00" in sql:  # libpg_query stops at NUL: text after it would never be checked
        raise _refuse("nul_byte", "The statement contains a NUL (\\0) character; remove it and retry.")
    if len(sql) > MAX_STATEMENT_BYTES or len(sql.encode("utf-8")) > MAX_STATEMENT_BYTES:
        raise _refuse("statement_too_large", f"The statement is too large (limit {MAX_STATEMENT_BYTES} "
                      "bytes); split the work into several smaller statements.")
    try:
        # Parsing to protobuf first enforces libpg_query's nesting limit; parse_sql() converts the
        # tree recursively in C and would crash the process on a very deeply nested statement.
        parse_sql_protobuf(sql)
        return tuple(pglast.parse_sql(sql))
    except ParseError as exc:
        message = str(exc.args[0]) if exc.args else str(exc)
        if "nested too deeply" in message or "stack depth" in message or "memory exhausted" in message:
            raise _refuse("too_complex", "The statement is nested too deeply to analyse; simplify it "
                          "(fewer nested expressions, unions or joins) or split it.") from None
        where = ""
        if len(exc.args) > 1 and isinstance(exc.args[1], int):
            position = exc.args[1]
            line = sql.count("\n", 0, position) + 1
            column = position - (sql.rfind("\n", 0, position) + 1) + 1
            where = f" at character {position + 1} (line {line}, column {column})"
        raise _refuse("syntax_error", f"Syntax error: {message}{where}. Fix the SQL and retry.") from None


def _classify(sql: str) -> Classification:
    if not isinstance(sql, str):
        raise _refuse("invalid_input", "The statement must be a string of SQL text.")
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse("invalid_text", "The statement is not valid Unicode text (lone surrogate "
                      "characters); re-encode it as UTF-8 and retry.") from None
    stmts = _parse(sql)
    if not stmts:
        raise _refuse("empty_statement", "Refused an empty statement (only whitespace, comments or ';'); "
                      "send one SQL statement.")
    if len(stmts) > 1:
        raise _refuse("multiple_statements", f"Refused {len(stmts)} statements in one call: send one "
                      "statement per call (a trailing ';' is fine).")
    stmt = stmts[0].stmt
    result = _classify_stmt(stmt)
    _check_functions(stmt)
    target_ids = {id(node) for node in result.targets}
    nodes = list(_walk(stmt))
    ctes = {n.ctename for n in nodes if isinstance(n, ast.CommonTableExpr)}
    read: set[str] = set()
    written = set(result.written) | {_relname(node) for node in result.targets}
    for node in nodes:
        if not isinstance(node, ast.RangeVar) or id(node) in target_ids:
            continue
        if node.schemaname is None and node.catalogname is None and node.relname in ctes:
            continue  # a reference to a WITH query, not a relation
        read.add(_relname(node))
    return Classification(
        kind=result.kind,
        command=result.command,
        tables_read=frozenset(read),
        tables_written=frozenset(written),
        creates_table=result.creates_table,
        drops_table=result.drops_table,
        fingerprint=pglast.fingerprint(sql),
    )


def classify(sql: str) -> Classification:
    """Classify exactly one SQL statement, or raise RejectedStatement with an actionable message."""
    try:
        return _classify(sql)
    except RejectedStatement:
        raise
    except Exception as exc:  # never let a parser quirk escape as anything but a clean refusal
        raise _refuse("analysis_failed", "agentpg could not analyse this statement "
                      f"({type(exc).__name__}); simplify it or split it into smaller statements.") from exc


_LITERAL_TOKENS: Final = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
_COMMENT_TOKENS: Final = frozenset({"C_COMMENT", "SQL_COMMENT"})


def _scrub(text: str) -> str:
    """Replace every literal token pglast.normalize() left in place by $n, and drop comments."""
    tokens = scan(text)
    params = [int(text[t.start + 1:t.end + 1]) for t in tokens if t.name == "PARAM"]
    counter = max(params, default=0)
    out: list[str] = []
    position = 0
    for token in tokens:
        gap = text[position:token.start]
        out.append(gap if gap.isspace() or not gap else " ")
        if token.name in _LITERAL_TOKENS:
            counter += 1
            out.append(f"${counter}")
        elif token.name in _COMMENT_TOKENS:
            out.append(" ")
        else:
            out.append(text[token.start:token.end + 1])
        position = token.end + 1
    return "".join(out).strip()


def normalize_for_audit(sql: str) -> str:
    """The statement with every literal replaced by $n (and comments removed), for the audit log."""
    opaque = f"<statement not shown: {len(sql) if isinstance(sql, str) else 0} characters>"
    try:
        if "\x00" in sql or len(sql) > MAX_STATEMENT_BYTES:
            return opaque
        sql.encode("utf-8")
        try:
            normalized = pglast.normalize(sql)
        except ParseError:
            normalized = sql  # still scrubbed token by token below
        return _scrub(normalized) or opaque
    except Exception:
        return opaque
