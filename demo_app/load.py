"""Orders placed like a browser: a form POST to the Cafe's /reserve, following its 303 redirect.

Each worker thread books unique orders one after the other. The order's notes carry a marker
unique to the run, worker and sequence number, so the database can be asked, per order, whether
it is there and how often; its digest is computed the way the app computes it. Each order records
the phase it was attempted in, when, how long the HTTP exchange took, and how it ended.

Readers load the Cafe's reservations list (/orders) like a browser, and each read is judged as it
ends: served (the list came back) or failed, and whether it was stale beyond the bound (see
`stale_beyond_bound`).
"""

from __future__ import annotations

import html
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from .cafe import order_digest

REQUEST_TIMEOUT = 60.0
_ERROR_DETAIL = re.compile(r'id="error">(.*?)</p>', re.S)
_BASE_DAY = datetime(2031, 6, 1, 18, 0, tzinfo=UTC)


@dataclass
class Order:
    seq: int
    worker: int
    phase: str
    marker: str  # the whole of the order's notes (ordrtxt)
    digest: str
    start: float  # wall clock
    end: float | None = None
    status: int | None = None  # final HTTP status; None: no HTTP answer (or still pending)
    ok: bool = False  # acknowledged: the thank-you page came back with this order's reference
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.end is not None

    @property
    def latency(self) -> float:
        return (self.end if self.end is not None else time.time()) - self.start


class OrderLog:
    """Every order of the run, in the order they were attempted (append-only, thread-safe)."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._orders: list[Order] = []

    def add(self, order: Order) -> None:
        with self._lock:
            self._orders.append(order)

    def snapshot(self, start: int = 0) -> list[Order]:
        with self._lock:
            return self._orders[start:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._orders)


class LoadGenerator:
    """`workers` threads placing orders at `base_url` until `stop()`."""

    def __init__(
        self,
        base_url: str,
        log: OrderLog,
        phase: Callable[[], str],
        workers: int = 4,
        pause: float = 0.1,
        worker_offset: int = 0,
        on_done: Callable[[Order], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.log = log
        self.phase = phase
        self.pause = pause
        self.on_done = on_done
        self._stop = threading.Event()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(worker_offset + i,), name=f"load-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> LoadGenerator:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = REQUEST_TIMEOUT + 5) -> int:
        """Stop and wait for the orders in flight; returns how many workers are still stuck."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self._threads)

    def _next_seq(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def _work(self, worker: int) -> None:
        opener = urllib.request.build_opener()  # follows the 303 to /thanks like a browser
        while not self._stop.is_set():
            self.place(opener, worker, self._next_seq())
            self._stop.wait(self.pause)

    def place(self, opener: urllib.request.OpenerDirector, worker: int, seq: int) -> Order:
        name = f"Guest {worker}-{seq}"
        people = 1 + seq % 6
        when = _BASE_DAY + timedelta(minutes=15 * seq + worker)
        marker = f"drill {self.log.run_id} w{worker} #{seq}"
        digest = order_digest(name, people, when, marker)
        order = Order(seq, worker, self.phase(), marker, digest, time.time())
        self.log.add(order)
        when_local = when.strftime("%Y-%m-%dT%H:%M")  # what a datetime-local input sends
        form = {"name": name, "people": str(people), "when": when_local, "notes": marker}
        data = urllib.parse.urlencode(form).encode()
        try:
            with opener.open(self.base_url + "/reserve", data=data, timeout=REQUEST_TIMEOUT) as resp:
                resp.read()
                order.status = resp.status
                ref = urllib.parse.parse_qs(urllib.parse.urlsplit(resp.url).query).get("ref", [""])[0]
                order.ok = resp.status == 200 and ref == order.digest
                if not order.ok:
                    order.error = f"unexpected answer {resp.status} {resp.url}"
        except urllib.error.HTTPError as exc:
            order.status = exc.code
            body = exc.read().decode(errors="replace")
            match = _ERROR_DETAIL.search(body)
            detail = html.unescape(match.group(1).strip()) if match else str(exc.reason)
            order.error = f"HTTP {exc.code}: {detail}"
        except (OSError, ValueError) as exc:  # connection refused, timeout, ...
            order.error = f"{type(exc).__name__}: {exc}"
        order.end = time.time()
        if self.on_done is not None:
            self.on_done(order)
        return order


# ---------------------------------------------------------------------------------------------
# Reading the reservations list
# ---------------------------------------------------------------------------------------------


class WriterGaps:
    """Spans of wall-clock time without a writer behind the sidecar, from a fault that takes the
    writer away until the sidecar is up again with an empty spool (an open span has no end yet).
    A booking answered in such a span may have been acknowledged from the spool, whose records
    are in no database until replay: the stale-read rule leaves such bookings out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[list[float | None]] = []  # [start, end or None]

    def open(self, at: float | None = None) -> None:
        with self._lock:
            if not self._spans or self._spans[-1][1] is not None:
                self._spans.append([time.time() if at is None else at, None])

    def close(self, at: float | None = None) -> None:
        with self._lock:
            if self._spans and self._spans[-1][1] is None:
                self._spans[-1][1] = time.time() if at is None else at

    def overlaps(self, start: float, end: float) -> bool:
        with self._lock:
            return any(s is not None and s <= end and (e is None or start <= e) for s, e in self._spans)


@dataclass
class Read:
    worker: int
    phase: str
    start: float  # wall clock, before the request is sent
    end: float | None = None
    status: int | None = None  # HTTP status; None: no HTTP answer (or still pending)
    ok: bool = False  # served: the reservations list came back
    shown: int = 0  # this run's bookings on the page
    stale: Order | None = None  # served without this booking, which it had to show
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.end is not None

    @property
    def latency(self) -> float:
        return (self.end if self.end is not None else time.time()) - self.start


class ReadLog:
    """Every read of the run, in the order they were started (append-only, thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reads: list[Read] = []

    def add(self, read: Read) -> None:
        with self._lock:
            self._reads.append(read)

    def snapshot(self) -> list[Read]:
        with self._lock:
            return list(self._reads)


def reference_booking(orders: Sequence[Order], before: float, gaps: WriterGaps) -> Order | None:
    """The newest booking acknowledged by a writer at or before `before`: acknowledged (its
    thank-you page came back) at `end <= before`, and answered outside every writer gap (so not
    from the spool). None: no such booking."""
    best: Order | None = None
    for order in orders:
        end = order.end
        if not order.ok or end is None or end > before:
            continue
        if best is not None and best.end is not None and end <= best.end:
            continue
        if not gaps.overlaps(order.start, end):
            best = order
    return best


def stale_beyond_bound(
    start: float, shown: set[str], orders: Sequence[Order], gaps: WriterGaps, bound: float
) -> Order | None:
    """Whether a read of the reservations list that started at `start` and showed the bookings
    `shown` (markers) was stale beyond `bound` seconds: returns the booking it had to show and did
    not (None: not stale).

    It had to show X = `reference_booking(orders, start - bound, gaps)`: the newest booking that a
    writer acknowledged at least `bound` before the read began. A replica within the sidecar's
    lag bound holds every commit the writer had `max_replica_lag` (plus the age of the sidecar's
    last probe) earlier, and commits are replayed in order, so it holds X and everything before it.
    The page lists the newest bookings only: X may have scrolled off. So the page also passes if
    it shows any booking placed after X was acknowledged (that booking committed after X did: a
    database showing it has X). Cost: two passes over the run's bookings per read."""
    reference = reference_booking(orders, start - bound, gaps)
    if reference is None or reference.marker in shown:
        return None
    acknowledged = reference.end
    assert acknowledged is not None
    if any(o.start > acknowledged and o.marker in shown for o in orders):
        return None
    return reference


class ListReader:
    """`readers` threads loading `base_url`/orders like a browser until `stop()`; each read ends
    judged against the bookings in `orders` (`stale_beyond_bound`, with `gaps` and `bound`)."""

    def __init__(
        self,
        base_url: str,
        orders: OrderLog,
        reads: ReadLog,
        phase: Callable[[], str],
        gaps: WriterGaps,
        bound: float,
        readers: int = 1,
        pause: float = 0.5,
        on_done: Callable[[Read], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.orders = orders
        self.reads = reads
        self.phase = phase
        self.gaps = gaps
        self.bound = bound
        self.pause = pause
        self.on_done = on_done
        # The notes of this run's bookings, as the page shows them (Jinja escapes none of these
        # characters).
        self._marker = re.compile(rf"drill {re.escape(orders.run_id)} w\d+ #\d+")
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"reader-{i}", daemon=True)
            for i in range(readers)
        ]

    def start(self) -> ListReader:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = REQUEST_TIMEOUT + 5) -> int:
        """Stop and wait for the reads in flight; returns how many readers are still stuck."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return sum(t.is_alive() for t in self._threads)

    def _work(self, worker: int) -> None:
        opener = urllib.request.build_opener()
        while not self._stop.is_set():
            self.read(opener, worker)
            self._stop.wait(self.pause)

    def read(self, opener: urllib.request.OpenerDirector, worker: int) -> Read:
        read = Read(worker, self.phase(), time.time())
        self.reads.add(read)
        try:
            with opener.open(self.base_url + "/orders", timeout=REQUEST_TIMEOUT) as resp:
                body = resp.read().decode(errors="replace")
                read.status = resp.status
            if read.status == 200 and 'id="orders"' in body:
                read.ok = True
                shown = set(self._marker.findall(body))
                read.shown = len(shown)
                read.stale = stale_beyond_bound(read.start, shown, self.orders.snapshot(), self.gaps,
                                                self.bound)  # fmt: skip
            else:
                read.error = f"unexpected answer {read.status}: no reservations table"
        except urllib.error.HTTPError as exc:
            read.status = exc.code
            body = exc.read().decode(errors="replace")
            match = _ERROR_DETAIL.search(body)
            detail = html.unescape(match.group(1).strip()) if match else str(exc.reason)
            read.error = f"HTTP {exc.code}: {detail}"
        except (OSError, ValueError) as exc:  # connection refused, timeout, ...
            read.error = f"{type(exc).__name__}: {exc}"
        read.end = time.time()
        if self.on_done is not None:
            self.on_done(read)
        return read


# ---------------------------------------------------------------------------------------------
# What the database holds
# ---------------------------------------------------------------------------------------------


@dataclass
class DbCounts:
    rows: dict[str, int]  # marker -> rows in cafe.ordersraw with that marker as notes
    applied: dict[str, int]  # digest -> INSERTs of it that reached the database (cafe.orders_applied)


def db_counts(conninfo: str, orders: Iterable[Order]) -> DbCounts:
    """Count, on one node (the writer), each order's rows by marker and its applications by digest."""
    orders = list(orders)
    markers = [o.marker for o in orders]
    digests = [o.digest for o in orders]
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT ordrtxt, count(*) FROM cafe.ordersraw WHERE ordrtxt = ANY(%s) GROUP BY 1", (markers,)
        ).fetchall()
        applied = conn.execute(
            "SELECT ordrdgst, count(*) FROM cafe.orders_applied WHERE ordrdgst = ANY(%s) GROUP BY 1",
            (digests,),
        ).fetchall()
    return DbCounts({str(m): int(n) for m, n in rows}, {str(d).strip(): int(n) for d, n in applied})


@dataclass
class PhaseRow:
    phase: str
    attempted: int
    acknowledged: int
    failed: int
    pending: int
    in_db: int | None  # None: no writer to ask
    duplicates: int | None
    lost: int | None
    longest_stall: float
    reads: int = 0  # reads of the reservations list attempted in the phase (and answered)
    reads_served: int = 0
    reads_failed: int = 0
    reads_stale: int = 0  # served, but stale beyond the bound: must be 0
    reads_pending: int = 0

    def cells(self) -> list[str]:
        def opt(v: int | None) -> str:
            return "-" if v is None else str(v)

        return [
            self.phase, str(self.attempted), str(self.acknowledged), str(self.failed), opt(self.in_db),
            opt(self.duplicates), opt(self.lost), f"{self.longest_stall:.2f}s", str(self.reads),
            str(self.reads_served), str(self.reads_failed), str(self.reads_stale),
        ]  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(TABLE_HEADER, self.cells(), strict=True))


TABLE_HEADER = ("phase", "attempted", "acknowledged", "failed", "in database", "duplicates", "lost",
                "longest stall", "reads", "reads served", "reads failed", "reads stale")  # fmt: skip


def phase_row(phase: str, orders: Iterable[Order], counts: DbCounts | None,
              reads: Iterable[Read] = ()) -> PhaseRow:  # fmt: skip
    """One table row. Duplicates: orders whose marker has more than one row, or whose one submission
    reached the database more than once (see demo_app/cafe/schema.py). Lost: acknowledged, not in
    the database. Reads: those of the phase that have ended (a read still waiting is in none of
    the read columns, only in `reads_pending`)."""
    mine = [o for o in orders if o.phase == phase]
    done = [o for o in mine if o.done]
    acked = [o for o in done if o.ok]
    in_db = dup = lost = None
    if counts is not None:
        in_db = sum(1 for o in mine if counts.rows.get(o.marker, 0) > 0)
        dup = sum(1 for o in mine if counts.rows.get(o.marker, 0) > 1 or counts.applied.get(o.digest, 0) > 1)
        lost = sum(1 for o in acked if counts.rows.get(o.marker, 0) == 0)
    my_reads = [r for r in reads if r.phase == phase]
    ended = [r for r in my_reads if r.done]
    return PhaseRow(
        phase=phase,
        attempted=len(mine),
        acknowledged=len(acked),
        failed=len(done) - len(acked),
        pending=len(mine) - len(done),
        in_db=in_db,
        duplicates=dup,
        lost=lost,
        longest_stall=max((o.latency for o in done), default=0.0),
        reads=len(ended),
        reads_served=sum(1 for r in ended if r.ok),
        reads_failed=sum(1 for r in ended if not r.ok),
        reads_stale=sum(1 for r in ended if r.ok and r.stale is not None),
        reads_pending=len(my_reads) - len(ended),
    )


def format_table(rows: Iterable[list[str]], header: Iterable[str] = TABLE_HEADER) -> list[str]:
    head = list(header)
    body = list(rows)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body]
    return lines
