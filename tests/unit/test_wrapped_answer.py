"""`WrappedAnswer`: the answers to BEGIN + an autocommit write + marker + COMMIT, rewritten into the
statement's own (the byte-for-byte comparison with PostgreSQL is in
tests/integration/test_commit_outcome_autocommit.py)."""

from __future__ import annotations

from proxy.outcome_answer import WrappedAnswer
from proxy.protocol import messages as m

NOTICE = b"N\x00\x00\x00\x0aSWARN\x00\x00"
ERROR = b"E\x00\x00\x00\x0bC23505\x00\x00"


def test_committed_relays_the_statement_s_answer_as_it_came() -> None:
    wrapped = WrappedAnswer()
    tag = m.command_complete("UPDATE 3")
    wrapped.hold(m.B_NOTICE, NOTICE)
    wrapped.hold(m.B_COMMAND_COMPLETE, tag)
    assert wrapped.committed_answer() == NOTICE + tag
    wrapped.hold_commit(m.B_NOTICE, NOTICE)
    assert wrapped.answer() == NOTICE + tag + NOTICE


def test_a_failed_commit_drops_the_statement_s_tag() -> None:
    wrapped = WrappedAnswer()
    wrapped.hold(m.B_COMMAND_COMPLETE, m.command_complete("INSERT 0 1"))
    wrapped.hold_commit(m.B_ERROR, ERROR)
    assert wrapped.answer() == ERROR
    assert wrapped.committed_answer() is None


def test_without_its_tag_or_after_an_error_nothing_is_known_committed() -> None:
    wrapped = WrappedAnswer()
    wrapped.hold(m.B_NOTICE, NOTICE)
    assert wrapped.committed_answer() is None  # the row count never came
    wrapped.hold(m.B_ERROR, ERROR)
    assert wrapped.statement_failed and wrapped.committed_answer() is None
    assert wrapped.answer() == NOTICE + ERROR
