"""Pre-flight classification of one SQL statement with pglast (Postgres' own parser).

The agent's Postgres role and its grants are the real security boundary: this module only gives the
agent an early, actionable error and tells the MCP tools what kind of statement they are about to run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import pglast
from pglast import ast
from pglast.parser import ParseError, parse_sql_protobuf, scan

from agentpg.access import statement_rules as rules
from agentpg.access.kinds import StatementKind
from agentpg.access.shape import UNKNOWN, Shape, shape_of_parsed

__all__ = ["Classification", "RejectedStatement", "StatementKind", "check_shared", "classify", "normalize_for_audit"]

MAX_STATEMENT_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class Classification:
    kind: StatementKind
    command: str  # "SELECT", "INSERT", "CREATE TABLE", "DROP TABLE", "EXPLAIN ANALYZE DELETE", ...
    tables_read: frozenset[str]  # relations referenced, as written (identifiers folded like Postgres does)
    tables_written: frozenset[str]  # relations written, created, altered or dropped
    creates_table: bool
    drops_table: bool
    fingerprint: str  # pglast fingerprint: stable and literal-free
    extension: str | None = None  # CREATE EXTENSION's name: agentpg installs it on the agent's behalf, or not
    shape: Shape = UNKNOWN  # what the query path needs (rows? DML? wrappable?), from this same parse


class RejectedStatement(ValueError):
    """The statement was refused before reaching the server; ``str(exc)`` says what to do instead."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason  # short machine code, e.g. "multiple_statements", "forbidden_function"

    def __reduce__(self) -> tuple[Any, ...]:  # keep .reason through pickling (it is keyword-only)
        return (_refuse, (self.reason, self.message))


def _refuse(reason: str, message: str) -> RejectedStatement:
    return RejectedStatement(message, reason=reason)


@dataclass
class _Result:
    kind: StatementKind
    command: str
    targets: list[Any] = field(default_factory=list)  # RangeVar nodes written / created / altered
    written: set[str] = field(default_factory=set)  # written names that are not RangeVars (DROP)
    creates_table: bool = False
    drops_table: bool = False


def _refuse_category(reason: str, label: str) -> RejectedStatement:
    return _refuse(reason, f"{label} is not allowed: {rules.ADVICE[reason]}.")


def _walk(root: Any) -> Iterator[Any]:
    """Every ast.Node in root (included), iteratively: trees can be deep."""
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


def _enum_name(value: Any) -> str:
    return str(getattr(value, "name", ""))


def _object_label(objtype: Any) -> str:
    name = _enum_name(objtype).removeprefix("OBJECT_")
    return rules.OBJECT_LABELS.get(name, name.replace("_", " "))


def _relname(rv: Any) -> str:
    return ".".join(p for p in (rv.catalogname, rv.schemaname, rv.relname) if p)


def _relations(*values: Any) -> list[Any]:
    found: list[Any] = []
    for value in values:
        found.extend(v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, ast.RangeVar))
    return found


def _option(options: Any, name: str) -> bool:
    """Whether a Postgres boolean option is on; a bare option (no value) means true."""
    for opt in options or ():
        if isinstance(opt, ast.DefElem) and opt.defname == name:
            arg = opt.arg
            if isinstance(arg, ast.Boolean | ast.Integer):
                return bool(arg.boolval if isinstance(arg, ast.Boolean) else arg.ival)
            return not (isinstance(arg, ast.String) and str(arg.sval).lower() in rules.FALSE_WORDS)
    return False


def _effects(root: Any, result: _Result) -> None:
    """What executing root writes: DML anywhere (CTEs too), SELECT INTO, FOR UPDATE/SHARE, nextval/setval."""
    for node in _walk(root):
        writes = isinstance(node, ast.FuncCall) and _names(node.funcname)[-1:] in rules.SEQUENCE_CALLS
        if isinstance(node, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt | ast.MergeStmt):
            result.targets.extend(_relations(node.relation))
            writes = True
        elif isinstance(node, ast.SelectStmt):
            writes = bool(node.lockingClause) or node.intoClause is not None
            if node.intoClause is not None:
                result.targets.extend(_relations(node.intoClause.rel))
                result.creates_table = True
        if writes and result.kind is StatementKind.READ:
            result.kind = StatementKind.WRITE


def _query(stmt: Any) -> _Result:
    if not isinstance(stmt, ast.SelectStmt):
        result = _Result(StatementKind.WRITE, type(stmt).__name__.removesuffix("Stmt").upper())
    elif stmt.intoClause is not None:
        result = _Result(StatementKind.WRITE, "SELECT INTO")
    else:
        result = _Result(StatementKind.READ, "VALUES" if stmt.valuesLists else "SELECT")
    _effects(stmt, result)
    return result


def _explain(stmt: Any) -> _Result:
    inner = _classify_stmt(stmt.query)  # also refuses EXPLAIN of a refused statement
    if not _option(stmt.options, "analyze"):
        return _Result(StatementKind.OTHER, "EXPLAIN")  # only plans: nothing is executed
    if inner.kind in (StatementKind.WRITE, StatementKind.DDL):
        inner.command = f"EXPLAIN ANALYZE {inner.command}"
        return inner
    return _Result(StatementKind.OTHER, "EXPLAIN ANALYZE")


def _set(stmt: Any) -> _Result:
    name = stmt.name or ""
    if name in ("TRANSACTION", "SESSION CHARACTERISTICS") or name.startswith("transaction_"):
        raise _refuse_category("transaction_control", "SET TRANSACTION")
    verb = "RESET" if _enum_name(stmt.kind).startswith("VAR_RESET") else "SET"
    label = {"role": "ROLE", "session_authorization": "SESSION AUTHORIZATION"}.get(name, name or "ALL")
    raise _refuse_category("session_state", f"{verb} {label}")


def _transaction(stmt: Any) -> _Result:
    label = _enum_name(stmt.kind).removeprefix("TRANS_STMT_").replace("_", " ")
    label = {"START": "START TRANSACTION", "PREPARE": "PREPARE TRANSACTION"}.get(label, label)
    raise _refuse_category("transaction_control", f"Transaction control ({label or 'BEGIN'})")


def _copy(stmt: Any) -> _Result:
    instead = "Read rows with SELECT and load them with INSERT ... VALUES (many rows per statement)."
    if stmt.is_program:
        raise _refuse("copy_program", "COPY ... PROGRAM is not allowed: it would run a shell command on the "
                      f"database server. {instead}")
    if stmt.filename is not None:
        raise _refuse("copy_file", "COPY to or from a server file is not allowed: agents cannot touch files "
                      f"on the database server. {instead}")
    raise _refuse("copy_stream", f"COPY ... FROM STDIN / TO STDOUT is not supported: the tools do not stream "
                  f"COPY data. {instead}")


def _maintenance(stmt: Any) -> _Result:
    """VACUUM / ANALYZE / REINDEX: fine on your own tables, refused database-wide or with FULL."""
    if isinstance(stmt, ast.VacuumStmt):
        if _option(stmt.options, "full"):
            raise _refuse_category("vacuum_full", "VACUUM FULL")
        return _Result(StatementKind.OTHER, "VACUUM" if stmt.is_vacuumcmd else "ANALYZE")
    scope = _enum_name(stmt.kind).removeprefix("REINDEX_OBJECT_")
    if scope in ("SYSTEM", "DATABASE"):
        raise _refuse_category("reindex_scope", f"REINDEX {scope}")
    return _Result(StatementKind.OTHER, "REINDEX")


def _routine(stmt: Any) -> _Result:
    """CREATE FUNCTION / PROCEDURE and ALTER FUNCTION / PROCEDURE / ROUTINE."""
    bodies: tuple[str, ...]
    if isinstance(stmt, ast.AlterFunctionStmt):
        command, options = f"ALTER {_object_label(stmt.objtype)}", stmt.actions
    else:
        command, options = ("CREATE PROCEDURE" if stmt.is_procedure else "CREATE FUNCTION"), stmt.options
    language, bodies = "sql", ()
    for opt in options or ():
        if not isinstance(opt, ast.DefElem):
            continue
        if opt.defname == "security" and _option((opt,), "security"):
            raise _refuse_category("security_definer", f"{command} ... SECURITY DEFINER")
        if opt.defname == "language" and isinstance(opt.arg, ast.String):
            language = str(opt.arg.sval).lower()
        elif opt.defname == "as":
            bodies = _names(opt.arg if isinstance(opt.arg, tuple) else (opt.arg,))
    if language not in rules.ALLOWED_LANGUAGES:
        raise _refuse_category("untrusted_language", f"{command} ... LANGUAGE {language}")
    if language == "sql":  # best effort: a string-bodied SQL function's body is plain SQL, check it too
        for body in bodies:
            try:
                parsed = _parse(body)
            except RejectedStatement:
                continue
            for raw in parsed:
                _check_functions(raw.stmt)
    return _Result(StatementKind.DDL, command)


def _alter_table(stmt: Any) -> _Result:
    command = f"ALTER {_object_label(stmt.objtype)}"
    if any(_enum_name(getattr(cmd, "subtype", None)) == "AT_ChangeOwner" for cmd in stmt.cmds or ()):
        raise _refuse_category("ownership_change", f"{command} ... OWNER TO")
    return _Result(StatementKind.DDL, command, targets=_relations(stmt.relation))


def _drop(stmt: Any) -> _Result:
    kind = _enum_name(stmt.removeType)
    if kind in rules.REFUSED_OBJECTS:
        raise _refuse_category(rules.REFUSED_OBJECTS[kind], f"DROP {_object_label(stmt.removeType)}")
    cascade = _enum_name(stmt.behavior) == "DROP_CASCADE"  # may drop dependent tables too
    result = _Result(StatementKind.DDL, f"DROP {_object_label(stmt.removeType)}",
                     drops_table=kind in rules.TABLE_OBJECTS or cascade)
    if kind in rules.RELATION_OBJECTS:
        result.written = {".".join(_names(obj)) for obj in stmt.objects or () if isinstance(obj, tuple)}
    return result


def _rename_or_move(stmt: Any) -> _Result:
    objtype = stmt.renameType if isinstance(stmt, ast.RenameStmt) else stmt.objectType
    if _enum_name(objtype) in rules.REFUSED_OBJECTS:
        raise _refuse_category(rules.REFUSED_OBJECTS[_enum_name(objtype)], f"ALTER {_object_label(objtype)}")
    label = _object_label(objtype)
    if _enum_name(objtype) in ("OBJECT_COLUMN", "OBJECT_ATTRIBUTE"):  # ALTER TABLE/VIEW/TYPE ... RENAME
        label = _object_label(stmt.relationType)
    elif _enum_name(objtype) in ("OBJECT_TABCONSTRAINT", "OBJECT_DOMCONSTRAINT"):  # relationType unset (0)
        label = "TABLE" if stmt.relation is not None else "DOMAIN"
    return _Result(StatementKind.DDL, f"ALTER {label}", targets=_relations(stmt.relation))


def _create_table(stmt: Any) -> _Result:
    base: Any = stmt.base if isinstance(stmt, ast.CreateForeignTableStmt) else stmt
    command = "CREATE FOREIGN TABLE" if base is not stmt else "CREATE TABLE"
    return _Result(StatementKind.DDL, command, targets=_relations(base.relation), creates_table=True)


def _create_table_as(stmt: Any) -> _Result:
    matview = _enum_name(stmt.objtype) == "OBJECT_MATVIEW"
    result = (_Result(StatementKind.WRITE, "SELECT INTO") if stmt.is_select_into
              else _Result(StatementKind.DDL, "CREATE MATERIALIZED VIEW" if matview else "CREATE TABLE AS"))
    result.targets, result.creates_table = _relations(stmt.into.rel), True
    _effects(stmt.query, result)
    return result


def _create_extension(stmt: Any) -> _Result:
    """CREATE EXTENSION [IF NOT EXISTS] name [SCHEMA public]: installed by agentpg (never run as the agent)."""
    for opt in stmt.options or ():
        if not isinstance(opt, ast.DefElem):
            continue
        value = str(opt.arg.sval) if isinstance(opt.arg, ast.String) else None
        if opt.defname == "schema" and value == "public":
            continue
        raise _refuse("extension_option", f"CREATE EXTENSION ... {str(opt.defname).upper()} is not supported: agentpg "
                      "installs allowed extensions in schema public, at the version the server ships. Send "
                      f"CREATE EXTENSION {stmt.extname}.")
    return _Result(StatementKind.DDL, "CREATE EXTENSION")


def _create_schema(stmt: Any) -> _Result:
    result = _Result(StatementKind.DDL, "CREATE SCHEMA")
    for element in stmt.schemaElts or ():  # CREATE SCHEMA s CREATE TABLE ... CREATE VIEW ...
        inner = _classify_stmt(element)
        result.targets.extend(inner.targets)
        result.creates_table = result.creates_table or inner.creates_table
    return result


_HANDLERS: Final[Mapping[str, Callable[[Any], _Result]]] = MappingProxyType({
    "SelectStmt": _query, "InsertStmt": _query, "UpdateStmt": _query, "DeleteStmt": _query,
    "MergeStmt": _query, "ExplainStmt": _explain, "VariableSetStmt": _set, "TransactionStmt": _transaction,
    "CopyStmt": _copy, "VacuumStmt": _maintenance, "ReindexStmt": _maintenance, "CreateFunctionStmt": _routine,
    "AlterFunctionStmt": _routine, "AlterTableStmt": _alter_table, "DropStmt": _drop,
    "RenameStmt": _rename_or_move, "AlterObjectSchemaStmt": _rename_or_move, "CreateStmt": _create_table,
    "CreateForeignTableStmt": _create_table, "CreateTableAsStmt": _create_table_as,
    "CreateSchemaStmt": _create_schema, "CreateExtensionStmt": _create_extension,
    "GrantStmt": lambda s: _Result(StatementKind.DDL, "GRANT" if s.is_grant else "REVOKE"),
    "DefineStmt": lambda s: _Result(StatementKind.DDL, f"CREATE {_object_label(s.kind)}"),
})


def _classify_stmt(stmt: Any) -> _Result:
    name = type(stmt).__name__
    if name in rules.REFUSED:
        raise _refuse_category(*rules.REFUSED[name])
    if name in _HANDLERS:
        return _HANDLERS[name](stmt)
    if name in rules.SIMPLE:
        kind, command = rules.SIMPLE[name]
        attrs = (getattr(stmt, a, None) for a in rules.TARGET_ATTRS)
        targets = [] if kind is StatementKind.OTHER else _relations(*attrs)
        return _Result(kind, command, targets=targets)
    label = "".join(f" {c}" if c.isupper() else c for c in name.removesuffix("Stmt")).strip().upper()
    raise _refuse_category("unsupported_statement", f"This kind of statement ({label})")


def _function_refs(root: Any) -> Iterator[tuple[str, ...]]:
    """Names of functions called or referenced (operators, aggregates, casts, triggers) in root."""
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
        name = parts[-1].lower() if parts else ""  # any schema: pg_catalog.set_config, public.dblink, ...
        if name in rules.FORBIDDEN_FUNCTIONS or (name.startswith(rules.FORBIDDEN_PREFIXES) and "_xact_" not in name):
            raise _refuse("forbidden_function", f"Calling {name}() is not allowed for agents: it touches server "
                          "files, session or server state, or reaches outside this database. Work with plain "
                          "SQL on your tables instead (transaction-level advisory locks are fine).")


def _parse(sql: str) -> tuple[Any, ...]:
    if "\x00" in sql:  # libpg_query stops at a NUL: whatever follows would never be checked
        raise _refuse("nul_byte", "The statement contains a NUL (\\0) character; remove it and retry.")
    if len(sql) > MAX_STATEMENT_BYTES or len(sql.encode("utf-8")) > MAX_STATEMENT_BYTES:
        raise _refuse("statement_too_large", f"The statement is too large (limit {MAX_STATEMENT_BYTES} bytes); "
                      "split the work into several smaller statements.")
    try:
        # Serialising to protobuf first enforces libpg_query's nesting limit: parse_sql() converts the
        # tree recursively in C and crashes the whole process on very deep trees (e.g. 1-1-1-...-1).
        parse_sql_protobuf(sql)
        return tuple(pglast.parse_sql(sql))
    except ParseError as exc:
        message = str(exc.args[0]) if exc.args else str(exc)
        if any(s in message for s in ("nested too deeply", "stack depth", "memory exhausted")):
            raise _refuse("too_complex", "The statement is nested too deeply to analyse; simplify it (fewer "
                          "nested expressions, UNIONs or JOINs) or split it.") from None
        where = ""
        if len(exc.args) > 1 and isinstance(exc.args[1], int):  # a 0-based character index
            pos = exc.args[1]
            line, column = sql.count("\n", 0, pos) + 1, pos - sql.rfind("\n", 0, pos)
            where = f" at character {pos + 1} (line {line}, column {column})"
        raise _refuse("syntax_error", f"Syntax error: {message}{where}. Fix the SQL and retry.") from None


def _classify(sql: str) -> Classification:
    if not isinstance(sql, str):
        raise _refuse("invalid_input", "The statement must be a string of SQL text.")
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse("invalid_text", "The statement is not valid Unicode (it contains lone surrogate "
                      "characters); send UTF-8 text.") from None
    stmts = _parse(sql)
    if not stmts:
        raise _refuse("empty_statement", "Refused an empty statement (only whitespace, comments or ';'); "
                      "send one SQL statement.")
    if len(stmts) > 1:
        raise _refuse("multiple_statements", f"Refused {len(stmts)} statements in one call: send one statement "
                      "per call (a single trailing ';' is fine).")
    stmt = stmts[0].stmt
    result = _classify_stmt(stmt)
    _check_functions(stmt)
    nodes = list(_walk(stmt))
    for node in nodes:  # refused statements nested in allowed ones: CREATE TABLE AS EXECUTE, rule actions...
        if type(node).__name__ in rules.REFUSED:
            raise _refuse_category(*rules.REFUSED[type(node).__name__])
    target_ids = {id(node) for node in result.targets}
    ctes = {node.ctename for node in nodes if isinstance(node, ast.CommonTableExpr)}
    read = {
        _relname(node) for node in nodes
        if isinstance(node, ast.RangeVar) and id(node) not in target_ids
        and not (node.schemaname is None and node.catalogname is None and node.relname in ctes)
    }
    written = frozenset(result.written | {_relname(node) for node in result.targets})
    extension = str(stmt.extname) if isinstance(stmt, ast.CreateExtensionStmt) else None
    return Classification(result.kind, result.command, frozenset(read), written, result.creates_table,
                          result.drops_table, pglast.fingerprint(sql), extension, shape_of_parsed(stmts, sql))


# Statements that define code someone else would run (another agent, the owner role through ANALYZE or a
# refresh, the platform's readers): refused in the shared global database, where agents are not alone.
_SHARED_CODE: Final = frozenset({
    "CREATE FUNCTION", "CREATE PROCEDURE", "ALTER FUNCTION", "ALTER PROCEDURE", "ALTER ROUTINE",
    "CREATE TRIGGER", "CREATE RULE", "CREATE OPERATOR", "CREATE AGGREGATE", "CREATE CAST",
    "REFRESH MATERIALIZED VIEW",  # runs the view's query as the owner role (creating it runs it as its author)
})


def check_shared(c: Classification) -> None:
    """Refuse, with why, a statement that defines code in the shared global database.

    The database refuses them too (no USAGE on the languages, an event trigger); this is the clearer error.
    Raises RejectedStatement.
    """
    if c.command in ("GRANT", "REVOKE", "ALTER DEFAULT PRIVILEGES"):
        raise _refuse("shared_privileges", f"{c.command} is not allowed in the global database: who may read and "
                      "write what there follows each agent's permissions, which the user sets "
                      "(PUT /api/workspaces/{id}/global-database-permissions).")
    if c.command in _SHARED_CODE:
        raise _refuse("shared_code", f"{c.command} is not allowed in the global database: code defined there "
                      "would run with the rights of other agents or of the database owner. Use plain SQL "
                      "(views, constraints and indexes on built-in functions are fine; re-create a materialized "
                      "view instead of refreshing it), or create functions in your agent database.")


def classify(sql: str) -> Classification:
    """Classify exactly one SQL statement, or raise RejectedStatement with an actionable message."""
    try:
        return _classify(sql)
    except RejectedStatement:
        raise
    except Exception as exc:  # a parser quirk must surface as a clean refusal, never as a crash
        raise _refuse("analysis_failed", f"agentpg could not analyse this statement ({type(exc).__name__}); "
                      "simplify it or split it into smaller statements.") from exc


def _scrub(text: str) -> str:
    """Replace every literal token left in text by $n (numbered after existing $n), and drop comments."""
    tokens = scan(text)
    counter = max((int(text[t.start + 1:t.end + 1]) for t in tokens if t.name == "PARAM"), default=0)
    out: list[str] = []
    position = 0
    for token in tokens:
        gap = text[position:token.start]
        out.append(gap if not gap or gap.isspace() else " ")
        if token.name in rules.LITERAL_TOKENS:
            counter += 1
            out.append(f"${counter}")
        else:
            out.append(" " if token.name in rules.COMMENT_TOKENS else text[token.start:token.end + 1])
        position = token.end + 1
    return "".join(out).strip()


def normalize_for_audit(sql: str) -> str:
    """The statement with every literal replaced by $n and comments removed; never the literal values."""
    opaque = f"<statement not shown: {len(sql) if isinstance(sql, str) else 0} characters>"
    try:
        if "\x00" in sql or len(sql) > MAX_STATEMENT_BYTES:
            return opaque
        sql.encode("utf-8")
        try:
            normalized = pglast.normalize(sql)  # replaces constants pg_stat_statements-style...
        except ParseError:
            normalized = sql
        return _scrub(normalized) or opaque  # ...but leaves DDL literals (defaults, COMMENT, ...): scrub
    except Exception:
        return opaque
