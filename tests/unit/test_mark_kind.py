"""What the commit-outcome ledger marks in the extended protocol: `core.mark_kind` (which statement
texts) and `scan.lone_execution` (which batches: one statement run once, nothing else)."""

from __future__ import annotations

import pytest

from proxy.protocol import messages as m
from proxy.session.core import MARK_COMMIT, MARK_NONE, MARK_WRITE, commit_batch_answer, mark_kind
from proxy.session.scan import lone_execution


def _text(sql: str) -> int:
    parse = m.parse("s1", sql, [])
    return mark_kind(parse, parse.index(b"\x00", 5) + 1)


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("COMMIT", MARK_COMMIT),
        ("commit;", MARK_COMMIT),
        ("END TRANSACTION ", MARK_COMMIT),
        ("  COMMIT", MARK_NONE),  # (conservative: one byte decides, as on the simple path)
        ("commit work", MARK_COMMIT),
        ("COMMIT AND CHAIN", MARK_NONE),
        ("COMMIT PREPARED 'x'", MARK_NONE),
        ("CREATE TABLE t (x int)", MARK_NONE),
        ("INSERT INTO t VALUES ($1)", MARK_WRITE),
        ("update t set x = 1", MARK_WRITE),
        ("DELETE FROM t", MARK_WRITE),
        ("MERGE INTO t USING s ON t.x = s.x WHEN MATCHED THEN DELETE", MARK_WRITE),
        ("INSERT INTO t VALUES ($1) RETURNING x", MARK_NONE),
        ("insert into t values (1); select 1", MARK_NONE),
        ("SELECT 1", MARK_NONE),
        ("", MARK_NONE),
        ("/* c */ INSERT INTO t VALUES (1)", MARK_NONE),  # (conservative: a comment first)
    ],
)
def test_mark_kind(sql: str, kind: int) -> None:
    assert _text(sql) == kind
    assert mark_kind(m.query(sql), 5) == kind  # a simple Query's text alike


def _batch(describe: bool = True, rows: int = 0, portal: str = "") -> bytes:
    tail = (m.describe("P", portal) if describe else b"") + m.execute(portal, rows) + m.sync()
    return m.bind(portal, "s1", values=[b"1"]) + tail


def test_lone_execution_shapes() -> None:
    parse = m.parse("", "INSERT INTO t VALUES ($1)", [])
    for describe in (True, False):
        for rows in (0, 1):
            batch = _batch(describe, rows)
            bind_end = lone_execution(batch, 0)
            assert bind_end == len(m.bind("", "s1", values=[b"1"]))
            assert (len(batch) - bind_end == 22) is describe
            assert lone_execution(parse + batch, len(parse)) == len(parse) + bind_end
    # Not one statement run once: a named portal, two Executes, no Sync, something after Sync,
    # a Describe of the statement, a Flush.
    assert lone_execution(_batch(portal="p"), 0) == -1
    two = m.bind("", "s1") + m.execute() + m.bind("", "s1") + m.execute() + m.sync()
    assert lone_execution(two, 0) == -1
    assert lone_execution(_batch()[:-5], 0) == -1
    assert lone_execution(_batch() + m.query("SELECT 1"), 0) == -1
    assert lone_execution(m.bind("", "s1") + m.describe("S", "s1") + m.execute() + m.sync(), 0) == -1
    assert lone_execution(m.bind("", "s1") + m.execute() + m.message(b"H") + m.sync(), 0) == -1
    assert lone_execution(m.query("COMMIT"), 0) == -1


def test_commit_batch_answer() -> None:
    tag = m.command_complete("COMMIT")
    assert commit_batch_answer(True, False) == m.parse_complete() + m.bind_complete() + tag
    assert commit_batch_answer(False, True) == m.bind_complete() + m.message(b"n") + tag
