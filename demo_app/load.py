"""Orders placed like a browser: a form POST to the Cafe's /reserve, following its 303 redirect.

Each worker thread books unique orders one after the other. The order's notes carry a marker
unique to the run, worker and sequence number, so the database can be asked, per order, whether
it is there and how often; its digest is computed the way the app computes it. Each order records
the phase it was attempted in, when, how long the HTTP exchange took, and how it ended.
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
from collections.abc import Callable, Iterable
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

    def cells(self) -> list[str]:
        def opt(v: int | None) -> str:
            return "-" if v is None else str(v)

        return [
            self.phase, str(self.attempted), str(self.acknowledged), str(self.failed), opt(self.in_db),
            opt(self.duplicates), opt(self.lost), f"{self.longest_stall:.2f}s",
        ]  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return dict(zip(TABLE_HEADER, self.cells(), strict=True))


TABLE_HEADER = ("phase", "attempted", "acknowledged", "failed", "in database", "duplicates", "lost",
                "longest stall")  # fmt: skip


def phase_row(phase: str, orders: Iterable[Order], counts: DbCounts | None) -> PhaseRow:
    """One table row. Duplicates: orders whose marker has more than one row, or whose one submission
    reached the database more than once (see demo_app/cafe/schema.py). Lost: acknowledged, not in
    the database."""
    mine = [o for o in orders if o.phase == phase]
    done = [o for o in mine if o.done]
    acked = [o for o in done if o.ok]
    in_db = dup = lost = None
    if counts is not None:
        in_db = sum(1 for o in mine if counts.rows.get(o.marker, 0) > 0)
        dup = sum(1 for o in mine if counts.rows.get(o.marker, 0) > 1 or counts.applied.get(o.digest, 0) > 1)
        lost = sum(1 for o in acked if counts.rows.get(o.marker, 0) == 0)
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
    )


def format_table(rows: Iterable[list[str]], header: Iterable[str] = TABLE_HEADER) -> list[str]:
    head = list(header)
    body = list(rows)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body]
    return lines
