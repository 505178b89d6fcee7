"""Scrub what a gateway child writes back of the secrets it was started with.

For every resolved placeholder value the scrubber removes, wherever it appears in text (tool results,
resource URIs and contents, prompts, error messages, stderr): the full value and, for a connection URI,
the URI without its password, the password, the role and database names, each also percent-encoded.

Database URIs are rewritten to an opaque form first: ``postgres://role@host:port/...`` (any scheme spelling,
with or without the password, as server-postgres writes its resource URIs) becomes
``agentpg://global/...`` (``GLOBAL_DB_URL``), ``agentpg://agent/...`` (``AGENT_DB_URL``) or
``agentpg://<var>/...``; :meth:`Scrubber.unmap` turns such a URI back into the child's on ``resources/read``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote, urlsplit

REDACTED = "[redacted]"
_LABELS = {"GLOBAL_DB_URL": "global", "AGENT_DB_URL": "agent"}
_MIN_SECRET = 4


class Scrubber:
    def __init__(self, secrets: dict[str, str]) -> None:
        needles: set[str] = set()
        self._rewrites: list[tuple[re.Pattern[str], str]] = []
        self._reverse: dict[str, str] = {}
        for var, value in secrets.items():
            if not value:
                continue
            needles.add(value)
            parts = urlsplit(value) if "://" in value else None
            if parts is not None and parts.hostname:
                user = parts.username or ""
                host = parts.netloc.rsplit("@", 1)[-1]
                opaque = f"agentpg://{_LABELS.get(var, var.lower())}"
                user_part = re.escape(user) + "|" + re.escape(quote(unquote(user), safe="")) if user else ""
                pattern = (r"[A-Za-z][A-Za-z0-9+.-]*://" + (f"(?:{user_part})(?::[^@/\\s]*)?@" if user else "")
                           + re.escape(host))
                self._rewrites.append((re.compile(pattern), opaque))
                self._reverse[opaque] = f"postgres://{user}@{host}" if user else f"postgres://{host}"
                without = value.replace(f":{parts.password}@", "@", 1) if parts.password else value
                needles.add(without)
                for piece in (parts.password, unquote(parts.password or ""), user, unquote(user),
                              parts.path.lstrip("/")):
                    if piece and len(piece) >= _MIN_SECRET:
                        needles.add(piece)
            for needle in list(needles):
                needles.add(quote(needle, safe=""))
                needles.add(quote(needle, safe=":/@"))
        self._needles = sorted((n for n in needles if len(n) >= _MIN_SECRET), key=len, reverse=True)

    def text(self, value: str) -> str:
        for pattern, opaque in self._rewrites:
            def keep(match: re.Match[str], opaque: str = opaque) -> str:
                self._reverse[opaque] = match.group(0)
                return opaque
            value = pattern.sub(keep, value)
        for needle in self._needles:
            if needle in value:
                value = value.replace(needle, REDACTED)
        return value

    def obj(self, value: Any) -> Any:
        """A JSON-like value with every string (keys too) scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self.obj(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.obj(v) for v in value]
        return value

    def unmap(self, uri: str) -> str:
        """An opaque ``agentpg://…`` URI the agent got back → the child's own URI."""
        for opaque, original in self._reverse.items():
            if uri == opaque or uri.startswith(opaque + "/"):
                return original + uri[len(opaque):]
        return uri
