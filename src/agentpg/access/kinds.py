"""What a statement does, in the terms agentpg's permissions use."""

from __future__ import annotations

import enum


class StatementKind(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    DDL = "ddl"
    OTHER = "other"  # allowed utility: SHOW, EXPLAIN (unless it executes a write), VACUUM, ANALYZE, ...
