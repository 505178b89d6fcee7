"""Whole-table exports, as both HTTP edges serve them (the REST export route and the console's download)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from agentpg.service.reader import DatabaseRef, Reader

EXPORT_MEDIA = {"csv": "text/csv; charset=utf-8", "json": "application/json"}


def attachment(name: str, fmt: str) -> str:
    """The ``Content-Disposition`` of a download of table ``name`` (RFC 6266: an ASCII fallback name and the
    exact one, percent-encoded)."""
    ascii_name = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in name)
    return f'attachment; filename="{ascii_name}.{fmt}"; filename*=UTF-8\'\'{quote(name, safe="")}.{fmt}'


def csv_cell(value: Any) -> str:
    """NULL is an empty unquoted field; every other value is quoted, so "" (empty text) stays distinct."""
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    return '"' + text.replace('"', '""') + '"'


def csv_line(values: list[Any]) -> str:
    return ",".join(csv_cell(v) for v in values) + "\r\n"


async def export_chunks(reader: Reader, ref: DatabaseRef, table: str, fmt: str) -> AsyncIterator[bytes]:
    """The whole table as CSV (RFC 4180, a header row) or a JSON array, in chunks of one fetch batch."""
    started = False  # one READ ONLY snapshot for the whole export (the reader holds one connection)
    async for columns, rows in reader.export(ref, table):
        names = [c.name for c in columns]
        if fmt == "csv":
            chunk = "" if started else csv_line(names)
            chunk += "".join(csv_line(r) for r in rows)
        else:
            parts = [json.dumps(dict(zip(names, r, strict=True)), ensure_ascii=False, allow_nan=False,
                                separators=(",", ":")) for r in rows]
            chunk = ("[\n" if not started else (",\n" if parts else "")) + ",\n".join(parts)
        started = True
        yield chunk.encode()
    if fmt == "json":
        yield b"\n]\n"
