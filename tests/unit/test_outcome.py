"""The commit-outcome ledger's pure parts, with bytes only: marker ids, the marker query, the
parser of its answer, and what the service reports (the database side: tests/integration/
test_commit_outcome.py)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.outcome import CommitOutcomeLedger, MarkerAnswer, MarkerIds, marker_query, marker_statement
from proxy.outcome_answer import (
    COMBINED_READ_ONLY,
    COMBINED_WROTE,
    COMMIT_ID_AT,
    PREPARE_MARKED_COMMIT,
    marked_commit_query,
)
from proxy.protocol import messages as m
from sidecar_config import parse_config


def test_marker_ids_are_uuids_with_a_process_prefix_and_a_counter() -> None:
    ids = MarkerIds(prefix=0x0123456789ABCDEF)
    assert ids.next() == "01234567-89ab-cdef-0000-000000000001"
    assert ids.next() == "01234567-89ab-cdef-0000-000000000002"
    drawn = {MarkerIds().next() for _ in range(100)}  # a random prefix per process (instance)
    assert len(drawn) == 100 and all(str(uuid.UUID(d)) == d for d in drawn)


def test_marker_ids_count_on_across_their_text_blocks() -> None:
    """The text of all but the last byte is made once per 256 ids: the ids stay the counter's,
    in order, across those blocks and across the fourth group."""
    ids = MarkerIds(prefix=0x0123456789ABCDEF)
    ids._n = (1 << 48) - 300
    drawn = [ids.next() for _ in range(600)]
    counters = [int(d.replace("-", "")[16:], 16) for d in drawn]
    assert counters == list(range((1 << 48) - 299, (1 << 48) + 301))
    assert all(d.startswith("01234567-89ab-cdef-") and str(uuid.UUID(d)) == d for d in drawn)
    assert drawn[-1] == "01234567-89ab-cdef-0001-00000000012c"
    ids._n = (1 << 64) - 1  # wraps (in some centuries) rather than growing past 64 bits
    assert ids.next() == "01234567-89ab-cdef-0000-000000000000"


def test_a_marked_commit_query_from_the_ids_bytes_is_the_one_made_from_the_id() -> None:
    """`next_commit_query` builds the Query from bytes kept per 256 ids: the same Query as
    `marked_commit_query` of the same id, across blocks, with the id where `COMMIT_ID_AT` says."""
    texts, queries = MarkerIds(prefix=0x0123456789ABCDEF), MarkerIds(prefix=0x0123456789ABCDEF)
    texts._n = queries._n = (1 << 48) - 300
    for _ in range(600):
        marker = texts.next()
        query = queries.next_commit_query()
        assert query == marked_commit_query(marker)
        assert query[COMMIT_ID_AT : COMMIT_ID_AT + 36].decode() == marker


def test_the_marker_query_is_one_simple_query() -> None:
    marker = "01234567-89ab-cdef-0000-000000000001"
    assert marker_statement(marker) == b"SELECT pgsidecar.mark_commit('" + marker.encode() + b"'::uuid)"
    assert marker_query(marker) == m.query(marker_statement(marker).decode())


@pytest.mark.parametrize(
    "bad", ["", "x" * 36, "01234567-89AB-cdef-0000-000000000001", "1'); DROP TABLE t; --"]
)
def test_only_marker_ids_reach_the_sql_text(bad: str) -> None:
    with pytest.raises(ValueError):
        marker_statement(bad)


def _feed(parser: MarkerAnswer, data: bytes) -> list[bool]:
    return [parser.feed(type_byte, body) for type_byte, body in _messages(data)]


def _messages(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    offset = 0
    while offset < len(data):
        length = int.from_bytes(data[offset + 1 : offset + 5], "big")
        out.append((data[offset], data[offset + 5 : offset + 1 + length]))
        offset += 1 + length
    return out


def _answer(value: str) -> bytes:
    return (
        m.row_description(["mark_commit"], type_oid=16)
        + m.data_row([value])
        + m.command_complete("SELECT 1")
        + m.ready_for_query(m.TX_IN_BLOCK)
    )


def test_the_answer_says_whether_the_marker_was_written() -> None:
    written, not_written = MarkerAnswer(), MarkerAnswer()
    assert _feed(written, _answer("t")) == [False, False, False, True]
    assert (written.marked, written.error, written.done) == (True, None, True)
    _feed(not_written, _answer("f"))
    assert (not_written.marked, not_written.error) == (False, None)


def test_an_error_answer_keeps_the_fields_for_the_client() -> None:
    parser = MarkerAnswer()
    aborted = m.error_response("25P02", "current transaction is aborted")
    data = aborted + m.ready_for_query(m.TX_FAILED)
    assert _feed(parser, data) == [False, True]
    assert parser.marked is None and parser.error is not None and parser.error["C"] == "25P02"


def test_asynchronous_messages_are_not_part_of_the_answer() -> None:
    notification = m.message(b"A", (42).to_bytes(4, "big") + b"chan\x00payload\x00")
    status = m.parameter_status("application_name", "x")
    assert MarkerAnswer.passes_through(notification[0]) and MarkerAnswer.passes_through(status[0])
    assert not MarkerAnswer.passes_through(ord("D"))
    parser = MarkerAnswer()
    answer = _answer("t")
    assert _feed(parser, notification + status + answer)[-1] is True and parser.marked is True


def test_the_marked_commit_is_one_batch_of_two_prepared_statements() -> None:
    """Bind and Execute of the marker with the id as its one text parameter, then of the COMMIT,
    then one Sync; the preparation closes both names first (Close of a missing statement succeeds)."""
    marker = "01234567-89ab-cdef-0000-000000000001"
    assert marked_commit_query(marker) == (
        m.bind("", "pgsidecar_mark_commit", (), [marker.encode()]) + m.execute()
        + m.bind("", "pgsidecar_commit") + m.execute() + m.sync()
    )  # fmt: skip
    assert (
        m.close("S", "pgsidecar_mark_commit") + m.close("S", "pgsidecar_commit")
        + m.parse("pgsidecar_mark_commit", "SELECT pgsidecar.mark_commit($1::uuid)")
        + m.parse("pgsidecar_commit", "COMMIT")
    ) == PREPARE_MARKED_COMMIT  # fmt: skip


def test_a_marked_commits_answer_ends_at_the_commits_bind() -> None:
    """The batch's answer: the preparation's, the marker's, then the COMMIT's BindComplete, which
    ends the marker's part (the COMMIT's CommandComplete and ReadyForQuery are the client's)."""
    prepared = m.message(b"3") * 2 + m.message(b"1") * 2
    for wrote, data in ((True, prepared + COMBINED_WROTE), (False, COMBINED_READ_ONLY)):
        parser = MarkerAnswer(combined=True)
        fed = _feed(parser, data)
        assert fed[-1] is True and not any(fed[:-1])
        assert (parser.marked, parser.error) == (wrote, None)
    failed = MarkerAnswer(combined=True)
    error = m.error_response("42883", "function pgsidecar.mark_commit(uuid) does not exist")
    assert _feed(failed, m.message(b"3") * 2 + error + m.ready_for_query(m.TX_FAILED)) == [False] * 3 + [True]
    assert failed.error is not None and failed.error["C"] == "42883"
    with pytest.raises(ValueError):
        MarkerAnswer().feed(ord("2"), b"")  # (a separate marker is a simple Query's)


def test_anything_else_in_the_answer_is_a_protocol_error() -> None:
    with pytest.raises(ValueError):
        MarkerAnswer().feed(ord("G"), b"")  # CopyInResponse
    done = MarkerAnswer()
    _feed(done, _answer("t"))
    with pytest.raises(ValueError):
        done.feed(ord("Z"), b"I")


def _service(commit_outcome: str = "marker") -> CommitOutcomeLedger:
    config = parse_config(
        {"upstream": {"regions": [{"name": "r", "hosts": ["127.0.0.1:5432"]}]},
         "failover": {"commit_outcome": commit_outcome}}
    )  # fmt: skip
    host: Any = SimpleNamespace(config=config, topology=SimpleNamespace(writer=None))

    async def no_connections(user: str, database: str) -> Any:
        raise AssertionError("no connection expected")

    return CommitOutcomeLedger(host, no_connections)


def test_the_service_reports_per_pool_and_in_one_line() -> None:
    service = _service()
    assert service.summary() == "unchecked"
    service.watch("app", "db1")
    service.watch("app", "db2")
    assert not service.ready("app", "db1") and service.new_marker("app", "db1") is None
    service._set_status(("app", "db1"), "marker")
    assert service.summary() == "unchecked"
    service._set_status(("app", "db2"), "marker")
    assert service.summary() == "marker"
    assert service.ready("app", "db1")
    assert service.new_marker("app", "db1") != service.new_marker("app", "db1")
    service._set_status(("app", "db2"), "unavailable: no ledger")
    assert service.summary() == "unavailable: no ledger (app@db2)"
    assert service.status("app", "db2") == "unavailable: no ledger"


def test_off_in_the_config_is_never_ready() -> None:
    service = _service("off")
    service.watch("app", "db")
    service._set_status(("app", "db"), "marker")
    assert service.summary() == "off (config)" and service.status("app", "db") == "off (config)"
    assert not service.ready("app", "db") and service.new_marker("app", "db") is None
