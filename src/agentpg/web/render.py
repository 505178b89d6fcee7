"""Templates and the faithful rendering of database values.

Jinja2 with autoescaping on for every template, loaded from the package (``agentpg/web/templates``). The
environment is built on first use, not at import. Values are turned into :class:`Cell` objects here, so the
templates only choose markup:

* SQL NULL and the empty string are distinct (``NULL`` badge vs ``""`` marker);
* json/jsonb values show as one compact line that unfolds (``<details>``) into the pretty-printed value;
* long text is cut at :data:`PREVIEW_CHARS` with a ``<details>`` that shows the whole value (no script
  needed); whitespace is kept (``white-space: pre-wrap``);
* bytea (base64 in the rows route, ``\\x`` hex in the SQL box) is labelled as such; arrays show as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from typing import Any, Final, Literal
from urllib.parse import quote, urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from agentpg import __version__
from agentpg.web.security import add_security_headers

PREVIEW_CHARS: Final = 120
PREFIX: Final = "/explorer"

_NUMERIC = ("smallint", "integer", "bigint", "numeric", "real", "double precision", "money", "oid")
_UNSORTABLE = ("json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle")

CellKind = Literal["null", "empty", "json", "text", "number", "bool", "bytes"]


@dataclass(frozen=True)
class Cell:
    kind: CellKind
    text: str
    """What is shown (the preview when ``full`` is set)."""
    full: str | None = None
    """The whole value when ``text`` is only its beginning."""
    note: str = ""


def _base(type_name: str) -> str:
    return type_name.split("(")[0].strip().lower()


def is_json_type(type_name: str) -> bool:
    return _base(type_name).removesuffix("[]") in ("json", "jsonb")


def is_numeric_type(type_name: str) -> bool:
    return _base(type_name) in _NUMERIC


def is_sortable_type(type_name: str) -> bool:
    return _base(type_name).removesuffix("[]") not in _UNSORTABLE


def _fold(text: str, kind: CellKind, note: str = "") -> Cell:
    if len(text) <= PREVIEW_CHARS:
        return Cell(kind, text, note=note)
    return Cell(kind, text[:PREVIEW_CHARS] + "…", full=text, note=note or f"{len(text):,} characters")


def cell(value: Any, type_name: str = "", *, bytes_encoding: str = "base64") -> Cell:
    """One value, as the rows route or the SQL box returned it, ready for the template."""
    if value is None:
        return Cell("null", "NULL")
    if is_json_type(type_name):
        pretty = json.dumps(value, indent=2, ensure_ascii=False)
        if "\n" not in pretty:  # a scalar, [] or {}
            return _fold(pretty, "json")
        compact = json.dumps(value, ensure_ascii=False)
        preview = compact if len(compact) <= PREVIEW_CHARS else compact[:PREVIEW_CHARS] + "…"
        return Cell("json", preview, full=pretty, note=f"{pretty.count(chr(10)) + 1:,} lines")
    if isinstance(value, bool):
        return Cell("bool", "true" if value else "false")
    if isinstance(value, (int, float)):
        return Cell("number", repr(value) if isinstance(value, float) else str(value))
    if isinstance(value, (list, dict)):
        return _fold(json.dumps(value, ensure_ascii=False), "text", "array")
    text = str(value)
    if text == "":
        return Cell("empty", '""')
    if _base(type_name) == "bytea":
        return _fold(text, "bytes", bytes_encoding)
    if is_numeric_type(type_name):
        return Cell("number", text)
    if _base(type_name) in ("vector", "halfvec"):  # pgvector: '[0.1,0.2,…]', often hundreds of numbers
        return _fold(text, "text", f"vector, {text.count(',') + 1:,} dimensions")
    return _fold(text, "text")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "not measured yet"
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


def fmt_cents(cents: int | None) -> str:
    if cents is None:
        return "none"
    return f"${cents / 100:,.2f}"


def fmt_count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


def user_url(user_id: str) -> str:
    return f"{PREFIX}/u/{quote(user_id, safe='')}"


def db_url(user_id: str, workspace_id: str | None) -> str:
    base = user_url(user_id)
    return f"{base}/global" if workspace_id is None else f"{base}/agents/{quote(workspace_id, safe='')}"


def with_query(path: str, **params: Any) -> str:
    kept = {k: v for k, v in params.items() if v is not None and v != ""}
    return f"{path}?{urlencode(kept)}" if kept else path


@cache
def environment() -> Environment:
    env = Environment(loader=PackageLoader("agentpg.web", "templates"), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals.update(user_url=user_url, db_url=db_url, with_query=with_query, cell=cell, fmt_bytes=fmt_bytes,
                       fmt_cents=fmt_cents, fmt_count=fmt_count, is_numeric_type=is_numeric_type,
                       is_sortable_type=is_sortable_type, prefix=PREFIX, version=__version__)
    return env


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("me", getattr(request.state, "explorer_principal", None))
    context.setdefault("user_id", None)
    context.setdefault("active", "")
    context.setdefault("notice", None)
    html = environment().get_template(template).render(**context)
    response = HTMLResponse(html, status_code=status)
    add_security_headers(response)
    return response
