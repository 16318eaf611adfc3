"""The demo's reads of the Cafe's reservations list: the stale-read rule, the table's read columns,
the drill's verdict, and the reader against the Cafe's own page template over real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import jinja2
import pytest

from demo_app.cafe import templates
from demo_app.demo import PHASES, STALE_BOUND, STANDBY_PHASE, drill_problems
from demo_app.load import (
    TABLE_HEADER,
    ListReader,
    Order,
    OrderLog,
    PhaseRow,
    Read,
    ReadLog,
    WriterGaps,
    format_table,
    phase_row,
    reference_booking,
    stale_beyond_bound,
)
from demo_app.stack import sidecar_config
from sidecar_config import parse_config

BOUND = 6.0
T0 = 1_000_000.0  # a wall-clock origin; every time below is relative to it


def booking(n: int, start: float, end: float | None, ok: bool = True, phase: str = "p") -> Order:
    return Order(n, 0, phase, f"drill run00000 w0 #{n}", f"{n:020x}", T0 + start,
                 None if end is None else T0 + end, 200 if ok else 503, ok)  # fmt: skip


def read(phase: str, ok: bool | None, stale: Order | None = None) -> Read:
    """ok None: still waiting."""
    r = Read(0, phase, T0)
    if ok is not None:
        r.end, r.ok, r.stale = T0 + 1, ok, stale
    return r


# ---------------------------------------------------------------------------------------------
# Writer gaps
# ---------------------------------------------------------------------------------------------


def test_writer_gaps_closed_and_open_spans() -> None:
    gaps = WriterGaps()
    assert not gaps.overlaps(T0, T0 + 100)
    gaps.open(T0 + 10)
    gaps.open(T0 + 11)  # already open: the first start stands
    gaps.close(T0 + 20)
    assert gaps.overlaps(T0 + 5, T0 + 10)  # ends as the gap begins
    assert gaps.overlaps(T0 + 12, T0 + 13)
    assert gaps.overlaps(T0 + 19, T0 + 30)
    assert not gaps.overlaps(T0 + 1, T0 + 9.9)
    assert not gaps.overlaps(T0 + 20.1, T0 + 25)
    gaps.open(T0 + 40)  # open: runs until now and beyond
    assert gaps.overlaps(T0 + 39, T0 + 40.5)
    assert gaps.overlaps(T0 + 1000, T0 + 1001)
    assert not gaps.overlaps(T0 + 30, T0 + 39)


# ---------------------------------------------------------------------------------------------
# The stale-read rule
# ---------------------------------------------------------------------------------------------


def test_reference_is_the_newest_writer_acknowledged_booking_before_the_bound() -> None:
    orders = [
        booking(1, 0.0, 1.0),
        booking(2, 0.5, 3.0),
        booking(3, 2.5, 2.8),  # acknowledged before #2: not the newest
        booking(4, 3.0, 3.5, ok=False),  # an error page: nothing was promised
        booking(5, 3.6, 9.0),  # acknowledged after the bound
        booking(6, 3.7, None, ok=False),  # still waiting
    ]
    gaps = WriterGaps()
    assert reference_booking(orders, T0 + 4.0, gaps) is orders[1]
    assert reference_booking(orders, T0 + 3.0, gaps) is orders[1]  # at the bound counts
    assert reference_booking(orders, T0 + 0.9, gaps) is None
    # #2 was answered while there was no writer (it may be in the spool, in no database yet).
    gaps.open(T0 + 2.9)
    gaps.close(T0 + 3.1)
    assert reference_booking(orders, T0 + 4.0, gaps) is orders[2]  # the newest answered outside it
    gaps.open(T0 + 2.6)  # a second gap: #3 too
    gaps.close(T0 + 2.7)
    assert reference_booking(orders, T0 + 4.0, gaps) is orders[0]


def test_page_showing_the_reference_is_fresh() -> None:
    orders = [booking(1, 0.0, 1.0), booking(2, 1.0, 2.0), booking(3, 20.0, 21.0)]
    shown = {orders[0].marker, orders[1].marker}  # #3 is too recent to be required
    assert stale_beyond_bound(T0 + 2.0 + BOUND, shown, orders, WriterGaps(), BOUND) is None


def test_page_missing_the_reference_is_stale() -> None:
    orders = [booking(1, 0.0, 1.0), booking(2, 1.0, 2.0)]
    shown = {orders[0].marker}
    missing = stale_beyond_bound(T0 + 2.0 + BOUND, shown, orders, WriterGaps(), BOUND)
    assert missing is orders[1]
    # Just inside the bound the same page is allowed to lack #2.
    assert stale_beyond_bound(T0 + 1.9 + BOUND, shown, orders, WriterGaps(), BOUND) is None


def test_reference_scrolled_off_but_a_later_booking_shown_is_fresh() -> None:
    # The page lists the newest bookings only: #1 may be off it, but #3 was placed after #1 was
    # acknowledged, so it committed after #1 and a database showing #3 has #1.
    orders = [booking(1, 0.0, 1.0), booking(2, 0.5, 1.5), booking(3, 1.2, 30.0)]
    start = T0 + 1.0 + BOUND
    assert stale_beyond_bound(start, {orders[2].marker}, orders, WriterGaps(), BOUND) is None
    # #2 was placed before #1 was acknowledged: showing it proves nothing about #1.
    assert stale_beyond_bound(start, {orders[1].marker}, orders, WriterGaps(), BOUND) is orders[0]


def test_spooled_bookings_are_not_required() -> None:
    orders = [booking(1, 0.0, 1.0), booking(2, 5.0, 10.0)]  # #2 answered during the outage
    gaps = WriterGaps()
    gaps.open(T0 + 4.0)
    shown = {orders[0].marker}
    assert stale_beyond_bound(T0 + 30.0, shown, orders, gaps, BOUND) is None
    assert stale_beyond_bound(T0 + 30.0, set(), orders, gaps, BOUND) is orders[0]


def test_no_booking_yet_is_never_stale() -> None:
    assert stale_beyond_bound(T0 + 100.0, set(), [], WriterGaps(), BOUND) is None
    assert (
        stale_beyond_bound(T0 + 100.0, set(), [booking(1, 0.0, 1.0, ok=False)], WriterGaps(), BOUND) is None
    )


def test_demo_bound_is_the_sidecars_lag_bound_plus_probe_slack() -> None:
    assert 5.0 < STALE_BOUND <= 7.0


# ---------------------------------------------------------------------------------------------
# Table and verdict
# ---------------------------------------------------------------------------------------------


def test_phase_row_read_columns() -> None:
    reads = [
        read("a", True),
        read("a", True),
        read("a", True, stale=booking(1, 0.0, 1.0)),
        read("a", False),
        read("a", None),  # still waiting: in no column
        read("b", True),
    ]
    row = phase_row("a", [booking(1, 0.0, 1.0, phase="a")], None, reads)
    assert (row.reads, row.reads_served, row.reads_failed, row.reads_stale, row.reads_pending) == (
        4,
        3,
        1,
        1,
        1,
    )
    cells = row.cells()
    assert len(cells) == len(TABLE_HEADER)
    assert row.as_dict()["reads"] == "4"
    assert row.as_dict()["reads served"] == "3"
    assert row.as_dict()["reads failed"] == "1"
    assert row.as_dict()["reads stale"] == "1"
    assert row.as_dict()["in database"] == "-"
    # Without reads the old columns are unchanged and the read columns are zeros.
    plain = phase_row("a", [booking(1, 0.0, 1.0, phase="a")], None)
    assert plain.cells()[:8] == ["a", "1", "1", "0", "-", "-", "-", "1.00s"]
    assert plain.cells()[8:] == ["0", "0", "0", "0"]


def test_table_header_lists_the_read_columns() -> None:
    assert TABLE_HEADER[-4:] == ("reads", "reads served", "reads failed", "reads stale")
    assert len(set(TABLE_HEADER)) == len(TABLE_HEADER)  # the status page keys rows by header
    lines = format_table([phase_row("warm-up", [], None, [read("warm-up", True)]).cells()])
    assert lines[0].startswith("| phase ") and "| reads stale |" in lines[0]
    assert lines[2].split("|")[-3].strip() == "0" and lines[2].split("|")[-5].strip() == "1"


def _rows(**by_phase: dict[str, int]) -> list[PhaseRow]:
    rows = []
    for phase in PHASES:
        row = PhaseRow(phase, 10, 10, 0, 0, 10, 0, 0, 1.0, reads=5, reads_served=5)
        for key, value in by_phase.get(phase.replace(" ", "_").replace(",", ""), {}).items():
            setattr(row, key, value)
        rows.append(row)
    return rows


def _total(rows: list[PhaseRow]) -> PhaseRow:
    total = PhaseRow("total", 0, 0, 0, 0, 0, 0, 0, 0.0)
    for r in rows:
        total.reads_stale += r.reads_stale
        total.lost = (total.lost or 0) + (r.lost or 0)
        total.duplicates = (total.duplicates or 0) + (r.duplicates or 0)
    return total


def test_verdict_passes_with_served_fresh_reads() -> None:
    rows = _rows()
    assert drill_problems(rows, _total(rows), checked=True, outage_spooled=3) == []


def test_verdict_fails_on_a_stale_read() -> None:
    rows = _rows(recovery={"reads_stale": 2})
    problems = drill_problems(rows, _total(rows), checked=True, outage_spooled=3)
    assert problems == [f"2 reads served stale beyond the bound ({STALE_BOUND:g}s)"]


def test_verdict_fails_when_no_read_was_served_without_a_writer() -> None:
    key = STANDBY_PHASE.replace(" ", "_").replace(",", "")
    rows = _rows(**{key: {"reads": 2, "reads_served": 0, "reads_failed": 2}})
    problems = drill_problems(rows, _total(rows), checked=True, outage_spooled=3)
    assert problems == [
        f"no read of the reservations list was served in {STANDBY_PHASE!r} (2 failed): reads did not go to b1"
    ]
    # The old rules still hold, next to the new ones.
    problems = drill_problems(rows, _total(rows), checked=False, outage_spooled=0)
    assert problems[:2] == ["no writer to check after recovery",
                            "the sidecar spooled no booking during the full outage"]  # fmt: skip


def test_standby_phase_sits_between_the_two_failovers() -> None:
    assert PHASES.index("in-region failover") < PHASES.index(STANDBY_PHASE) < PHASES.index("region failover")


# ---------------------------------------------------------------------------------------------
# The demo's sidecar config
# ---------------------------------------------------------------------------------------------


def test_demo_config_spells_out_routing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAFE_DB_PASSWORD", "x")
    node = SimpleNamespace(hostport="127.0.0.1:5432")
    topo = cast(Any, SimpleNamespace(a1=node, a2=SimpleNamespace(hostport="127.0.0.1:5433"),
                                     b1=SimpleNamespace(hostport="127.0.0.1:5434")))  # fmt: skip
    data = sidecar_config(topo, tmp_path, "sqlite", max_replica_lag="3s")
    assert data["routing"] == {"reads": "failover", "max_replica_lag": "3s"}
    cfg = parse_config(data, "demo.yaml")
    assert cfg.routing.reads == "failover" and cfg.routing.max_replica_lag == 3.0


# ---------------------------------------------------------------------------------------------
# The reader against the Cafe's reservations page over HTTP
# ---------------------------------------------------------------------------------------------


class _Page:
    """Serves the Cafe's own /orders template with `rows`, or its error page with `error`."""

    def __init__(self) -> None:
        env = jinja2.Environment(autoescape=True)
        self.orders = env.from_string(templates.LAYOUT.replace("{BODY}", templates.ORDERS))
        self.error_page = env.from_string(templates.LAYOUT.replace("{BODY}", templates.ERROR))
        self.rows: list[SimpleNamespace] = []
        self.error: str | None = None

    def show(self, orders: list[Order]) -> None:
        self.rows = [
            SimpleNamespace(ordrid=o.seq, ordrname=f"Guest <{o.seq}>", ordrppl=2, ordrtxt=o.marker,
                            ordrdgst=o.digest, ordrdttm=datetime(2031, 6, 1, 18, 0, tzinfo=UTC))
            for o in orders
        ]  # fmt: skip

    def render(self) -> tuple[int, bytes]:
        if self.error is not None:
            return 503, self.error_page.render(detail=self.error).encode()
        return 200, self.orders.render(rows=self.rows, total=len(self.rows)).encode()


@pytest.fixture
def page() -> Iterator[tuple[_Page, str]]:
    content = _Page()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = content.render() if self.path == "/orders" else (404, b"")
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield content, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_reader_judges_the_cafe_page(page: tuple[_Page, str]) -> None:
    import time
    import urllib.request

    content, url = page
    log = OrderLog()
    now = time.time()

    def mine(n: int, start: float, end: float) -> Order:
        return Order(n, 1, "p", f"drill {log.run_id} w1 #{n}", f"{n:020x}", now + start, now + end, 200, True)

    old, older = mine(2, -20.0, -19.0), mine(1, -30.0, -29.0)
    recent = mine(3, -1.0, -0.5)  # within the bound: need not be shown yet
    for o in (older, old, recent):
        log.add(o)
    foreign = Order(9, 1, "p", "drill ffffffff w1 #9", "9" * 20, now, now, 200, True)  # another run's
    reads = ReadLog()
    reader = ListReader(url, log, reads, lambda: "p", WriterGaps(), BOUND)
    opener = urllib.request.build_opener()

    content.show([old, older, foreign])
    fresh = reader.read(opener, 0)
    assert fresh.ok and fresh.stale is None and fresh.shown == 2 and fresh.error is None

    content.show([older])  # a replica that has not replayed #2, acknowledged 19 s ago
    stale = reader.read(opener, 0)
    assert stale.ok and stale.stale is old

    content.error = "no database writer is available"
    failed = reader.read(opener, 1)
    assert not failed.ok and failed.stale is None
    assert (
        failed.error == "HTTP 503: We could not reach our reservation book: no database writer is available"
    )

    assert reads.snapshot() == [fresh, stale, failed]
    row = phase_row("p", log.snapshot(), None, reads.snapshot())
    assert (row.reads, row.reads_served, row.reads_failed, row.reads_stale) == (3, 2, 1, 1)
