"""What a tenant statement returns, and how its values become JSON: the result types of the query path
(:mod:`agentpg.access.query`), the row collector that applies the row and byte caps as rows stream in, and
the conversions of parameters (untyped text) and values (JSON)."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from psycopg import AsyncRawCursor

from agentpg.errors import AgentpgError

JsonValue = None | bool | int | float | str | list[Any] | dict[str, Any]
Outcome = Literal["denied", "timeout", "error"]

MAX_PARAMS = 1000
"""Most bound parameters one statement may have."""


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str


@dataclass(frozen=True)
class StatementResult:
    """What one statement returned. ``rows`` hold JSON-safe values; ``row_count`` is ``len(rows)``;
    ``rows_affected`` is the server's count for INSERT/UPDATE/DELETE/MERGE (and rows seen for RETURNING).
    A read's ``columns`` are known even when no row matched; a write's RETURNING columns come with its first
    row (psycopg's streaming does not expose an empty result's description)."""

    columns: list[ColumnInfo]
    rows: list[list[JsonValue]]
    truncated: bool
    duration_ms: float
    command: str | None = None
    rows_affected: int | None = None
    truncated_by: Literal["max_rows", "max_result_bytes"] | None = None
    rows_json: list[str] | None = None
    """Each row of ``rows`` as compact JSON (computed anyway to count result bytes), for text renderings."""

    @property
    def row_count(self) -> int:
        return len(self.rows)


class StatementFailed(AgentpgError):
    """Postgres refused or failed the statement. ``outcome`` is ``denied`` (privilege, read-only),
    ``timeout`` or ``error``; ``condition`` is a literal-free label for the audit log (SQLSTATE + name)."""

    status = 422
    code = "statement_failed"

    def __init__(self, message: str, *, outcome: Outcome, condition: str) -> None:
        super().__init__(message)
        self.outcome: Outcome = outcome
        self.condition = condition


#: OIDs of the types whose values, as psycopg loads them, are JSON as they are (bool, char, name, int8, int2,
#: int4, text, oid, bpchar, varchar): their columns skip :func:`json_value`.
_JSON_READY_TYPES = frozenset({16, 18, 19, 20, 21, 23, 25, 26, 1042, 1043})


def _row_encoder() -> Callable[[list[JsonValue]], str]:
    """Compact JSON of one row, built once. Every ``json.dumps`` call builds its C encoder afresh, which costs
    more than encoding a short row; CPython's ``c_make_encoder`` (what ``JSONEncoder.iterencode`` calls) is
    kept instead, with the pure ``JSONEncoder`` as the fallback where it is missing or differs."""
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is not None:
        try:
            fast = make(None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)
            if "".join(fast([1, "é", None, 1.5, True], 0)) == '[1,"é",null,1.5,true]':
                return lambda row: "".join(fast(row, 0))
        except TypeError:  # another signature: use the documented path
            pass
    return encoder.encode


_encode_row = _row_encoder()


@dataclass
class RowCollector:
    """Keeps rows until a limit is reached; counts (but drops) the rest."""

    max_rows: int
    max_bytes: int
    rows: list[list[JsonValue]] = field(default_factory=list)
    rows_json: list[str] = field(default_factory=list)
    size: int = 0
    seen: int = 0
    truncated_by: Literal["max_rows", "max_result_bytes"] | None = None
    convert: list[int] | None = None
    """Positions of the columns whose values need :func:`json_value` (None: unknown, so all)."""
    columns: list[ColumnInfo] = field(default_factory=list)
    """The result's columns, once known."""

    def describe(self, type_oids: Sequence[int]) -> None:
        """The result's column types are known: convert only the values that need it (most are plain already)."""
        self.convert = [i for i, oid in enumerate(type_oids) if oid not in _JSON_READY_TYPES]

    def add_rows(self, raws: Sequence[Sequence[Any]]) -> bool:
        """Take a chunk of rows, as :meth:`add` would one by one (the same rows kept, the same truncation),
        column by column rather than row by row; False once the result is full."""
        self.seen += len(raws)
        if self.truncated_by is not None:
            return False
        room = self.max_rows - len(self.rows)
        rows = [list(raw) for raw in (raws[:room] if len(raws) > room else raws)]
        if self.convert is None:
            rows = [[json_value(v) for v in row] for row in rows]
        else:
            for i in self.convert:
                for row in rows:
                    row[i] = json_value(row[i])
        texts = [_encode_row(row) for row in rows]
        size, limit = self.size, self.max_bytes
        for kept, text in enumerate(texts):
            if size + len(text) > limit:
                self.truncated_by = "max_result_bytes"
                del rows[kept:], texts[kept:]
                break
            size += len(text)
        else:
            if len(raws) > room:
                self.truncated_by = "max_rows"
        self.rows.extend(rows)
        self.rows_json.extend(texts)
        self.size = size
        return self.truncated_by is None

    def add(self, raw: Sequence[Any]) -> bool:
        """Take one row; False once the result is full (the caller may stop fetching)."""
        self.seen += 1
        if self.truncated_by is not None:
            return False
        if len(self.rows) >= self.max_rows:
            self.truncated_by = "max_rows"
            return False
        if self.convert is None:
            row = [json_value(v) for v in raw]
        else:
            row = list(raw)
            for i in self.convert:
                row[i] = json_value(row[i])
        text = _encode_row(row)
        size = len(text)
        if self.size + size > self.max_bytes:
            self.truncated_by = "max_result_bytes"
            return False
        self.rows.append(row)
        self.rows_json.append(text)
        self.size += size
        return True


def columns_of(cur: AsyncRawCursor[Any]) -> list[ColumnInfo]:
    return [ColumnInfo(name=c.name, type=c.type_display) for c in cur.description or ()]


def bind_params(params: Sequence[JsonValue] | None) -> list[str | None] | None:
    """Parameters as untyped text: null → NULL, booleans → true/false, numbers and strings as written,
    arrays and objects as JSON text (for json/jsonb). None (not an empty list) means "no parameters"."""
    if params is None:
        return None
    if len(params) > MAX_PARAMS:
        raise StatementFailed(f"too many parameters ({len(params)}); at most {MAX_PARAMS} per statement",
                              outcome="error", condition="too_many_params")
    out: list[str | None] = []
    for value in params:
        if value is None or isinstance(value, str):
            out.append(value)
        elif isinstance(value, bool):
            out.append("true" if value else "false")
        elif isinstance(value, int | float):
            out.append(repr(value) if isinstance(value, float) else str(value))
        else:
            out.append(json.dumps(value, ensure_ascii=False))
    return out


def json_value(value: Any) -> JsonValue:
    """A database value as JSON: numbers stay numbers when exact, times are ISO 8601, bytes are ``\\x`` hex,
    anything else is its text form."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        if value == value.to_integral_value() and abs(value) < 2**63:
            return int(value)
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)
