"""The service's one cache of parsed statements: each distinct statement text is parsed once.

An agent's call needs two things from its SQL before it reaches Postgres: its classification (what it does,
what it touches, its fingerprint; :func:`agentpg.access.classify.classify`) and its audit text (literals
replaced by ``$n``; :func:`~agentpg.access.classify.normalize_for_audit`). Agents repeat their statements, so
both are remembered per text, in one bounded LRU owned by the service (no module state). A refusal is
remembered too and raised again, so a statement that cannot pass costs one parse, not one per call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from agentpg.access.classify import Classification, RejectedStatement, classify, normalize_for_audit

MAX_CACHED_TEXT = 4096
"""Longer statements are parsed every time (rare; keeps the cache's memory bounded: 4 KiB times the entries)."""


@dataclass
class _Parsed:
    audit_text: str | None = None
    classification: Classification | None = None
    refusal: tuple[str, str] | None = None
    """A refusal's message and reason: raised anew each time (one exception object would grow its traceback)."""


class Statements:
    """``classify`` and ``audit_text`` of statement texts, each computed at most once per cached text."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[str, _Parsed] = OrderedDict()
        self._lock = threading.Lock()  # the SQL box and the CLI call from worker threads

    def _entry(self, statement: str) -> _Parsed:
        if len(statement) > MAX_CACHED_TEXT:
            return _Parsed()
        with self._lock:
            entry = self._entries.get(statement)
            if entry is None:
                entry = self._entries[statement] = _Parsed()
                if len(self._entries) > self._max_entries:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(statement)
            return entry

    def classify(self, statement: str) -> Classification:
        """What :func:`~agentpg.access.classify.classify` says; raises its ``RejectedStatement``."""
        entry = self._entry(statement)
        if entry.refusal is not None:
            raise RejectedStatement(entry.refusal[0], reason=entry.refusal[1])
        if entry.classification is None:
            try:
                entry.classification = classify(statement)
            except RejectedStatement as exc:
                entry.refusal = (exc.message, exc.reason)
                raise
        return entry.classification

    def audit_text(self, statement: str) -> str:
        """The statement as the audit log keeps it: literals replaced, comments dropped."""
        entry = self._entry(statement)
        if entry.audit_text is None:
            entry.audit_text = normalize_for_audit(statement)
        return entry.audit_text

    def __len__(self) -> int:
        return len(self._entries)
