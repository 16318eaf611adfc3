"""The demo's stale-read instrument on real servers: a Cafe booking on the writer, another Cafe
listing reservations straight from a standby (no sidecar: this checks the instrument, not the
routing). With the standby's replay paused, a booking the writer acknowledged is missing from the
list, and the reader must call that read stale; once replay resumes, the list is fresh again."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from demo_app.cafe import install_schema
from demo_app.load import ListReader, LoadGenerator, OrderLog, ReadLog, WriterGaps
from demo_app.stack import APP_PASSWORD, APP_USER, CafeServer
from tests.harness.pg import APP_DB, PgNode, Topology, free_port

pytestmark = pytest.mark.timeout(120)


def _cafe(node: PgNode) -> Iterator[CafeServer]:
    server = CafeServer(
        f"postgresql+psycopg://{APP_USER}:{APP_PASSWORD}@{node.hostport}/{APP_DB}", free_port()
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def writer_cafe(shared_topology: Topology) -> Iterator[CafeServer]:
    install_schema(shared_topology.a1.dsn(dbname=APP_DB), APP_USER)
    yield from _cafe(shared_topology.a1)


@pytest.fixture
def standby_cafe(shared_topology: Topology, writer_cafe: CafeServer) -> Iterator[CafeServer]:
    shared_topology.a1.wait_caught_up([shared_topology.a2])  # the schema is there
    yield from _cafe(shared_topology.a2)


def _until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s")
        time.sleep(0.05)


def test_reader_flags_a_list_missing_an_acknowledged_booking(
    shared_topology: Topology, writer_cafe: CafeServer, standby_cafe: CafeServer
) -> None:
    a1, a2 = shared_topology.a1, shared_topology.a2
    orders, reads = OrderLog(), ReadLog()
    booker = LoadGenerator(writer_cafe.url, orders, lambda: "test", workers=0)
    # A zero bound: every booking acknowledged before a read starts must be on the page.
    reader = ListReader(standby_cafe.url, orders, reads, lambda: "test", WriterGaps(), bound=0.0)
    opener = urllib.request.build_opener()

    first = booker.place(opener, 0, 1)
    assert first.ok, first.error
    a1.wait_caught_up([a2])
    fresh = reader.read(opener, 0)
    assert fresh.ok and fresh.shown >= 1 and fresh.stale is None, fresh

    a2.execute("SELECT pg_wal_replay_pause()")
    try:
        _until(lambda: a2.query("SELECT pg_is_wal_replay_paused()")[0][0], "a2 paused")
        second = booker.place(opener, 0, 2)
        assert second.ok, second.error
        stale = reader.read(opener, 0)
        assert stale.ok and stale.stale is second, stale
    finally:
        a2.execute("SELECT pg_wal_replay_resume()")
    a1.wait_caught_up([a2])
    again = reader.read(opener, 0)
    assert again.ok and again.stale is None and again.shown >= 2, again
    assert [r.stale is not None for r in reads.snapshot()] == [False, True, False]
