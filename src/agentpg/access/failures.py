"""How a tenant statement's failure reads: the server's message (primary, detail, hint, position) with
agentpg's internal role and database names replaced by words, never a URI; the timeout, temp-file and
result-size messages say what to do next."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

import psycopg

from agentpg.access.pools import is_connection_lost
from agentpg.access.results import StatementFailed
from agentpg.access.shape import ROW_TOO_LARGE
from agentpg.errors import AgentpgError, ProviderUnavailable

_INTERNAL_NAME = re.compile(r'"?\b(apg_[A-Za-z0-9_]+)\b"?')


def scrub(text: str, uri: str) -> str:
    """``text`` without agentpg's internal names: the URI's role becomes "your agent role", its database
    "this database", any other ``apg_…`` name "an internal name"."""
    parts = urlsplit(uri)
    role, database = unquote(parts.username or ""), unquote(parts.path.lstrip("/"))

    def word(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == role:
            return "your agent role"
        if name == database:
            return "this database"
        return "an internal name"

    return _INTERNAL_NAME.sub(word, text)


def timeout_message(elapsed_s: float) -> str:
    return (f"The statement was cancelled after {elapsed_s:.1f} s: it exceeded the time limit. Narrow it "
            "(WHERE, LIMIT), add an index, or split the work into smaller statements.")


def oversize_row(exc: psycopg.Error) -> bool:
    return (isinstance(exc, psycopg.errors.InvalidTextRepresentation)
            and ROW_TOO_LARGE in (exc.diag.message_primary or ""))


def too_large_message(max_result_bytes: int, pending: int | None) -> str:
    read = "" if pending is None else f" (agentpg stopped reading it at {pending:,} bytes)"
    return (f"The result is too large: its first row alone is over the {max_result_bytes:,}-byte limit of one "
            f"call's result{read}, so no row can be returned. Select fewer or narrower columns: e.g. "
            "left(col, 1000), length(col) or octet_length(col) instead of the whole value.")


def failure_of(exc: psycopg.Error, uri: str, elapsed_s: float, *, offset: int = 0,
             length: int | None = None) -> AgentpgError:
    state = exc.sqlstate
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return StatementFailed(timeout_message(elapsed_s), outcome="timeout", condition="57014 QueryCanceled")
    if is_connection_lost(exc):  # no server answer, the connection broke, or the server is shutting down
        return ProviderUnavailable("the connection to the database was lost or could not be made (the server may "
                                   "be restarting); retry shortly. A write that was under way may or may not "
                                   "have been applied: check before repeating it")
    if state is None:  # a client-side error
        return StatementFailed(f"the statement could not be sent: {scrub(str(exc), uri)}", outcome="error",
                               condition=type(exc).__name__)
    diag = exc.diag
    message = f"Postgres refused the statement: {diag.message_primary or type(exc).__name__}"
    where = diag.statement_position or ""
    position = int(where) - offset if where.isdigit() else 0
    if 0 < position <= (length if length is not None else position):  # not in agentpg's wrapping of it
        message += f" (at character {position})"
    if diag.message_detail:
        message += f"\nDetail: {diag.message_detail}"
    if diag.message_hint:
        message += f"\nHint: {diag.message_hint}"
    if state == "53400" and "temp_file_limit" in (diag.message_primary or ""):
        limit = _temp_limit_text(diag.message_primary or "")
        message += (f"\nagentpg limits the temporary files a statement may hold on disk{limit}: this one sorted, "
                    "hashed or materialized more than that on disk. Narrow it (WHERE, LIMIT, fewer columns), "
                    "add an index that avoids the sort, or split the work into smaller statements.")
    if state == "53200":
        message += ("\nThe statement needed more memory than the server gives one session (agentpg bounds it, so "
                    "that one statement cannot take the machine from every other tenant). Narrow it (WHERE, "
                    "LIMIT, fewer or smaller values), or split the work into smaller statements.")
    message += f"\nSQLSTATE {state}"
    denied = state == "42501" or state.startswith("25")  # insufficient privilege; read-only / txn state
    return StatementFailed(scrub(message, uri), outcome="denied" if denied else "error",
                           condition=f"{state} {type(exc).__name__}")


def _temp_limit_text(primary: str) -> str:
    """" (2 MB)" from Postgres' "temporary file size exceeds temp_file_limit (2048kB)"; else ""."""
    match = re.search(r"temp_file_limit\"? \((\d+)kB\)", primary)
    if match is None:
        return ""
    kib = int(match.group(1))
    return f" ({kib // 1024} MB)" if kib % 1024 == 0 else f" ({kib} kB)"
