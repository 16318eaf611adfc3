"""The in-flight request queue each server connection keeps (proxy.server.InFlight)."""

from __future__ import annotations

from proxy.server import REQUEST_COMMIT, REQUEST_OTHER, REQUEST_READ, InFlight


def test_requests_are_answered_oldest_first_with_their_send_times() -> None:
    queue = InFlight()
    assert len(queue) == 0
    assert queue.pop() == -1.0
    queue.push(REQUEST_READ)
    queue.push(REQUEST_COMMIT)
    assert len(queue) == 2
    assert queue.kinds() == [REQUEST_READ, REQUEST_COMMIT]
    first = queue.pop()
    assert first > 0.0
    assert queue.kinds() == [REQUEST_COMMIT]
    assert queue.pop() >= first
    assert len(queue) == 0
    assert queue.pop() == -1.0
    # Slots are reused after the queue empties; what was there before does not come back.
    queue.push(REQUEST_OTHER)
    assert queue.kinds() == [REQUEST_OTHER]
    queue.clear()
    assert len(queue) == 0
    assert queue.kinds() == []


def test_a_long_pipeline_keeps_order_and_is_compacted() -> None:
    queue = InFlight()
    kinds = [(REQUEST_READ, REQUEST_OTHER, REQUEST_COMMIT)[i % 3] for i in range(5000)]
    for kind in kinds:
        queue.push(kind)
    for popped in range(1, 3001):
        assert queue.pop() > 0.0
        if popped % 500 == 0:
            assert queue.kinds() == kinds[popped:]
    for kind in kinds[:100]:
        queue.push(kind)
    assert len(queue) == 2100
    assert queue.kinds() == kinds[3000:] + kinds[:100]
    while len(queue):
        queue.pop()
    assert queue.pop() == -1.0
    # Drained, it keeps no more slots than a short pipeline needs: the answered part was dropped.
    assert len(queue._kinds) <= 1024
