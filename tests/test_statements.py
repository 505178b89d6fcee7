"""The service's statement cache: each distinct text is parsed once, refusals included, and the one parse
carries what the query path needs (its shape)."""

from __future__ import annotations

from unittest import mock

import pytest

from agentpg.access import classify as classify_mod
from agentpg.access.classify import RejectedStatement
from agentpg.access.shape import bounded_statement, shape_of
from agentpg.service.statements import MAX_CACHED_TEXT, Statements


def test_each_text_is_parsed_once_refusals_included() -> None:
    statements = Statements(max_entries=8)
    with mock.patch.object(classify_mod.pglast, "parse_sql", wraps=classify_mod.pglast.parse_sql) as parse:
        first = statements.classify("SELECT id FROM t WHERE id = $1")
        again = statements.classify("SELECT id FROM t WHERE id = $1")
        assert again is first and parse.call_count == 1
        for _ in range(3):
            with pytest.raises(RejectedStatement) as refused:
                statements.classify("SELECT 1; SELECT 2")
            assert refused.value.reason == "multiple_statements"
        assert parse.call_count == 2  # the refusal was parsed once and raised anew each time
    assert statements.audit_text("SELECT 'secret' FROM t") == statements.audit_text("SELECT 'secret' FROM t")
    assert "secret" not in statements.audit_text("SELECT 'secret' FROM t")


def test_the_cache_is_bounded_and_long_texts_are_not_kept() -> None:
    statements = Statements(max_entries=4)
    for i in range(10):
        statements.classify(f"SELECT {i}")
    assert len(statements) == 4
    statements.classify("SELECT " + "1 + " * MAX_CACHED_TEXT + "1")
    assert len(statements) == 4


@pytest.mark.parametrize(("sql", "rows", "dml", "wrap"), [
    ("SELECT 1", True, False, "query"),
    ("SELECT 1 INTO t2", False, False, None),
    ("INSERT INTO t VALUES (1) RETURNING *", True, True, "dml"),
    ("UPDATE t SET x = 1", False, True, None),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", True, False, None),
    ("SHOW work_mem", True, False, None),
])
def test_the_classification_carries_the_shape(sql: str, rows: bool, dml: bool, wrap: str | None) -> None:
    shape = Statements().classify(sql).shape
    assert (shape.returns_rows, shape.is_dml, shape.wrap[0] if shape.wrap else None) == (rows, dml, wrap)
    assert shape == shape_of(sql)  # the same answer as parsing on its own
    bounded = bounded_statement(sql, 1000, shape)
    assert (bounded is not None) == (wrap is not None)
    if bounded is not None:
        assert bounded.text[bounded.offset:].startswith(sql)
