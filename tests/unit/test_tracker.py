"""ResponseTracker: a fast path's entries kept aside until an answer must be walked, in order with
everything queued before and after them."""

from __future__ import annotations

from proxy.statements import Entry, Expect, ResponseTracker

BATCH = (Entry(Expect.BIND), Entry(Expect.EXECUTE), Entry(Expect.SYNC))


def answer(tracker: ResponseTracker, types: bytes) -> list[tuple[bool, bytes, bytes]]:
    """Feed server message types; (forwarded, bytes before, bytes after) for each."""
    out = []
    for type_byte in types:
        forward, before, after, _failed = tracker.on_server_message(type_byte, 0x49)
        out.append((forward, before, after))
    return out


def test_fast_request_settled_at_once_leaves_nothing() -> None:
    tracker = ResponseTracker()
    tracker.expect_fast(BATCH)
    assert tracker and tracker.fast
    tracker.clear()  # the whole answer ended in ReadyForQuery
    assert not tracker and not tracker.fast and not tracker.skipping


def test_fast_entries_walked_in_order_when_the_answer_is_not_quiet() -> None:
    tracker = ResponseTracker()
    tracker.expect_fast(BATCH)
    # BindComplete, DataRow, CommandComplete, ReadyForQuery: all forwarded, each entry settled.
    assert answer(tracker, b"2DCZ") == [(True, b"", b"")] * 4
    assert not tracker


def test_entries_queued_after_a_fast_request_come_after_it() -> None:
    tracker = ResponseTracker()
    tracker.expect_fast((Entry(Expect.QUERY),))
    # A synthetic answer queued next (nothing before it but the query) is owed after its
    # ReadyForQuery, not at once.
    assert tracker.expect(Expect.SYNTHETIC, data=b"owed") == b""
    assert not tracker.fast
    assert answer(tracker, b"TDCZ")[-1] == (True, b"", b"owed")
    assert not tracker


def test_a_fast_request_after_queued_entries_waits_its_turn() -> None:
    tracker = ResponseTracker()
    tracker.expect(Expect.PARSE_HIDDEN, "s1")  # the sidecar's own Parse, answered first
    tracker.expect_fast(BATCH)
    results = answer(tracker, b"12CZ")
    assert results[0][0] is False  # the injected Parse's ParseComplete is dropped
    assert [r[0] for r in results[1:]] == [True, True, True]
    assert not tracker


def test_clear_empties_both_the_queue_and_the_pending_entries() -> None:
    tracker = ResponseTracker()
    tracker.expect(Expect.QUERY)
    tracker.expect_fast(BATCH)
    tracker.clear()
    assert not tracker
    # Nothing left over: the next fast request's answer starts from its own first entry.
    tracker.expect_fast((Entry(Expect.QUERY),))
    assert answer(tracker, b"CZ") == [(True, b"", b"")] * 2
    assert not tracker


def test_error_in_a_batch_skips_a_query_before_its_sync() -> None:
    """PostgreSQL ignores everything up to Sync after an extended-protocol error, a simple Query
    too: Parse(bad), Query, Sync are answered ErrorResponse, ReadyForQuery."""
    tracker = ResponseTracker()
    tracker.expect(Expect.PARSE)
    tracker.expect(Expect.QUERY)
    tracker.expect(Expect.SYNC)
    assert answer(tracker, b"EZ") == [(True, b"", b"")] * 2
    assert not tracker and tracker.take_skipped() == 1 and tracker.take_skipped() == 0
