"""`pgsidecar demo [--once]`: the Cafe through pgsidecar, and a failover drill under live load.

Starts region A (writer a1 + synchronous standby a2) and region B (standby b1), a local DynamoDB
(moto) for the outage spool, pgsidecar in front of the three, the Cafe app, the status page, a load
generator that books tables through the Cafe's HTTP form like a browser, and readers that keep
loading the Cafe's reservations list. Then, phase by phase:

1. warm-up;
2. in-region failover: a1 crashes, a2 is promoted ~2 s later (b1 then follows a2, synchronously);
3. region A down, B not promoted: a2 crashes (a1 is already down) and b1, region B's standby, stays
   a standby: bookings are held, then (past `failover.hold_timeout`) acknowledged from the spool,
   while the reservations list keeps loading from b1 (`routing.reads: failover`);
4. region failover: b1 is promoted, the sidecar replays the spool on it and follows it;
5. full outage: b1 crashes, no database anywhere; once `failover.hold_timeout` has passed, the
   sidecar acknowledges bookings from its durable spool (reads have nowhere to go: they fail);
6. recovery: b1 comes back, the sidecar replays the spool, then lets traffic through.

The console shows a timeline: each phase and fault as it happens, and each phase's result once,
when its orders have their answers and the database can be asked: orders attempted, acknowledged
(the thank-you page came back), failed, in the database (asked of the writer directly),
duplicates, lost, the longest stall, and the reads of the reservations list (attempted, served,
failed, served stale beyond the bound). After recovery the whole table, every phase judged
against the recovered writer. The sidecar's and the local DynamoDB endpoint's own output go to
log files the demo names at start (kept after it exits). With `--once` the demo exits then: 0
only if no acknowledged order was lost, none was applied twice, the outage phase did acknowledge
orders (otherwise the demo would not have shown the spool at all), no read was served stale
beyond the bound, and reads were served while region A was down and b1 not yet promoted.
Without it the stack stays up until Ctrl-C. Everything started is stopped on the way out.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from .cluster import APP_DB, set_sync_standbys
from .load import (
    TABLE_HEADER,
    DbCounts,
    ListReader,
    LoadGenerator,
    Order,
    OrderLog,
    PhaseRow,
    Read,
    ReadLog,
    WriterGaps,
    db_counts,
    format_table,
    phase_row,
)
from .stack import DemoStack, SidecarStatus
from .status import StatusServer

WARMUP = 4.0
PROMOTION_DELAY = 2.0  # fault -> promotion, as an operator or Aurora would take
STEADY_AFTER = 3.0  # load on the new writer before the next phase
HOLD_TIMEOUT = 5.0  # failover.hold_timeout: longer than a promotion, short enough for a demo
OUTAGE_SPOOLING = 5.0  # outage time past hold_timeout, while the spool acknowledges bookings
STANDBY_SPOOLING = 3.0  # region A down, b1 not promoted: time past hold_timeout (spooling, reads on b1)
REPLAY_TIMEOUT = 30.0
WORKERS = 4
PAUSE = 0.1  # between a worker's orders: a busy cafe, not a benchmark on two shared cores
READERS = 2
READ_PAUSE = 0.5  # between a reader's loads of the reservations list
MAX_REPLICA_LAG = 5.0  # routing.max_replica_lag
CHECK_INTERVAL = 0.25  # failover.check_interval (the stack's default)
# A read may be served from the view of the sidecar's last probe: up to a check interval plus a
# probe round trip old (generous on two loaded cores).
STALE_BOUND = MAX_REPLICA_LAG + 4 * CHECK_INTERVAL

PHASES = ("warm-up", "in-region failover", "region A down, B not promoted", "region failover",
          "full outage", "recovery")  # fmt: skip
STANDBY_PHASE = PHASES[2]
PHASE_WIDTH = max(len(p) for p in PHASES)


_say_lock = threading.Lock()


def say(text: str = "") -> None:
    # Rows are printed by reporter threads while the drill goes on: one line at a time.
    with _say_lock:
        print(text, flush=True)


def row_summary(row: PhaseRow) -> str:
    """A phase's result as one line of the timeline."""

    def opt(value: int | None) -> str:
        return "?" if value is None else str(value)

    return (f"{row.phase}: {row.acknowledged}/{row.attempted} acknowledged, {row.failed} failed, "
            f"{opt(row.in_db)} in the database, {opt(row.duplicates)} duplicates, {opt(row.lost)} lost, "
            f"longest stall {row.longest_stall:.2f}s; reads {row.reads_served}/{row.reads} served, "
            f"{row.reads_failed} failed, {row.reads_stale} stale")  # fmt: skip


class Drill:
    """Runs the phases against a started `DemoStack` and feeds the status page."""

    def __init__(self, stack: DemoStack) -> None:
        self.stack = stack
        self.t0 = time.time()
        self.log = OrderLog()
        self.reads = ReadLog()
        self.gaps = WriterGaps()  # no writer: bookings answered then may come from the spool
        self._lock = threading.Lock()
        self._samples: list[list[Any]] = []  # [t, latency, ok, phase] in completion order
        self.phases: list[tuple[str, float]] = []
        self.events: list[tuple[float, str]] = []
        self.rows: list[PhaseRow] = []
        self.verdict: str | None = None
        self.load: LoadGenerator | None = None
        self.reader: ListReader | None = None
        self.max_spool_pending = 0
        self.spooled = 0  # transactions the sidecar spooled during the full outage
        self.urls: dict[str, str] = {}
        self._reporter: threading.Thread | None = None

    # -- bookkeeping ------------------------------------------------------------------------------

    def rel(self, at: float | None = None) -> float:
        return (time.time() if at is None else at) - self.t0

    @property
    def phase(self) -> str:
        with self._lock:
            return self.phases[-1][0] if self.phases else "starting"

    def begin(self, name: str) -> None:
        with self._lock:
            self.phases.append((name, self.rel()))
        say(f"  {self.rel():6.1f}s  -- {name}")

    def event(self, text: str) -> None:
        with self._lock:
            self.events.append((self.rel(), text))
        say(f"  {self.rel():6.1f}s       {text}")

    def _done(self, order: Order) -> None:
        with self._lock:
            sample = [round(self.rel(order.start), 3), round(order.latency, 4), order.ok, order.phase]
            self._samples.append(sample)

    def _read_done(self, read: Read) -> None:
        if read.stale is not None:
            missing = read.stale
            say(f"  {self.rel(read.start):6.1f}s       STALE read of the reservations list: "
                f"{missing.marker!r}, acknowledged at {self.rel(missing.end):.1f}s, missing")  # fmt: skip

    def sidecar_status(self) -> SidecarStatus:
        assert self.stack.sidecar is not None
        status = self.stack.sidecar.status()
        self.max_spool_pending = max(self.max_spool_pending, status.spool_pending)
        return status

    def status_json(self, since: int) -> dict[str, Any]:
        """The status page's data; `since`: how many samples the page already has."""
        with self._lock:
            samples = self._samples[since:]
            phases = [{"name": n, "t": round(t, 3)} for n, t in self.phases]
            events = [{"t": round(t, 3), "text": x} for t, x in self.events]
        orders = self.log.snapshot()
        reads = [r for r in self.reads.snapshot() if r.done]
        return {
            "now": round(self.rel(), 3),
            "phase": self.phase,
            "phases": phases,
            "events": events,
            "samples": samples,
            "pending": [[round(self.rel(o.start), 3), round(o.latency, 3)] for o in orders if not o.done],
            "counts": {
                "attempted": len(orders),
                "acknowledged": sum(o.ok for o in orders),
                "reads": len(reads),
                "reads_served": sum(r.ok for r in reads),
                "reads_failed": sum(not r.ok for r in reads),
                "reads_stale": sum(r.ok and r.stale is not None for r in reads),
            },
            "sidecar": self.sidecar_status().as_dict(),
            "header": list(TABLE_HEADER),
            "table": [r.as_dict() for r in self.rows],
            "verdict": self.verdict,
            "urls": self.urls,
        }

    # -- waiting ----------------------------------------------------------------------------------

    def wait_for(self, what: str, check: Callable[[SidecarStatus], bool], timeout: float) -> SidecarStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.sidecar_status()
            if check(status):
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not within {timeout:g}s (sidecar: {status})")
            time.sleep(0.1)

    def wait_writer(self, hostport: str, timeout: float = 15.0) -> None:
        self.wait_for(f"sidecar uses {hostport}", lambda s: s.state == "up" and s.writer_host == hostport,
                      timeout)  # fmt: skip

    def settle(self, phase: str, timeout: float) -> None:
        """Until the orders placed and the reads started in `phase` have their answer (bounded)."""
        deadline = time.monotonic() + timeout
        while any(not o.done for o in self.log.snapshot() if o.phase == phase) or any(
            not r.done for r in self.reads.snapshot() if r.phase == phase
        ):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def counts(self, writer: str | None) -> DbCounts | None:
        """Each order's rows and applications, read directly on `writer` (host:port)."""
        assert self.stack.topo is not None
        node = next((n for n in self.stack.topo.nodes if n.hostport == writer), None)
        if node is None:
            return None
        try:
            return db_counts(node.dsn(dbname=APP_DB), self.log.snapshot())
        except psycopg.Error:
            return None  # it went down in between (the next fault): the caller asks again

    def report(self, phase: str, after: threading.Thread | None = None, at: float | None = None) -> None:
        """Print `phase`'s row once its orders have their answers (and the rows before it), stamped
        `at` (seconds into the drill; default: when it is printed)."""
        self.settle(phase, 2 * HOLD_TIMEOUT + 5)  # a held request, then a held reconnect
        if after is not None:
            after.join()
        # The database is asked once the sidecar has a writer again and an empty spool: mid-failover
        # there is nobody to ask, and mid-recovery the writer may still lack spooled orders that
        # are about to be replayed.
        counts = None
        deadline = time.monotonic() + 60
        while counts is None and time.monotonic() < deadline:
            try:
                status = self.wait_for("writer", lambda s: s.state == "up" and s.spool_pending == 0, 60)
            except RuntimeError:
                break
            counts = self.counts(status.writer_host)
            if counts is None:
                time.sleep(0.2)
        row = phase_row(phase, self.log.snapshot(), counts, self.reads.snapshot())
        self.rows.append(row)
        waiting = row.pending + row.reads_pending
        note = f" ({waiting} still waiting)" if waiting else ""
        say(f"  {self.rel() if at is None else at:6.1f}s  == {row_summary(row)}{note}")

    def next_phase(self, name: str) -> None:
        """End the current phase and start `name` (new orders count for it). The ended phase's
        result is printed first when the database can be asked now (a writer, nothing spooled):
        its last orders are answered within moments. Otherwise (the end of the outage: its orders
        are in the spool) it is printed in the background once replay has put them in the
        database, so the drill does not wait before the next step."""
        previous = self.phase
        start = self.rel()
        with self._lock:
            self.phases.append((name, start))
        status = self.sidecar_status()
        if status.state == "up" and status.spool_pending == 0 and self._reporter is None:
            self.report(previous, at=start)
        else:
            self._reporter = threading.Thread(
                target=self.report, args=(previous, self._reporter), name=f"report-{previous}", daemon=True
            )
            self._reporter.start()
        say(f"  {start:6.1f}s  -- {name}")

    # -- the phases -------------------------------------------------------------------------------

    def run(self) -> bool:
        stack = self.stack
        assert stack.topo is not None and stack.cafe is not None
        topo = stack.topo
        a1, a2, b1 = topo.a1, topo.a2, topo.b1
        self.load = LoadGenerator(
            stack.cafe.url, self.log, lambda: self.phase, workers=WORKERS, pause=PAUSE, on_done=self._done
        ).start()
        self.reader = ListReader(stack.cafe.url, self.log, self.reads, lambda: self.phase, self.gaps,
                                 STALE_BOUND, readers=READERS, pause=READ_PAUSE,
                                 on_done=self._read_done).start()  # fmt: skip
        say(f"\nfailover drill: {WORKERS} browsers booking tables through {stack.cafe.url}/reserve, "
            f"{READERS} reading {stack.cafe.url}/orders")  # fmt: skip
        say("(-- a phase begins; == a phase's result, once its orders are answered and counted)\n")

        self.begin(PHASES[0])
        time.sleep(WARMUP)

        self.next_phase(PHASES[1])
        fault = time.monotonic()
        self.gaps.open()
        a1.crash()
        self.event("a1 (region A writer) crashed")
        time.sleep(max(0.0, fault + PROMOTION_DELAY - time.monotonic()))
        a2.promote()
        self.event("a2 promoted (region A)")
        promoted = time.monotonic()
        self.wait_writer(a2.hostport)
        self.gaps.close()
        self.event("sidecar follows a2")
        # b1 follows the new writer, synchronously: the region failover must not lose anything
        # either. (If b1 had WAL a2 never got, repoint() re-clones it from a2.)
        b1.repoint(a2)
        set_sync_standbys(a2, ["b1"])
        self.event("b1 re-pointed to a2 (sync)")
        time.sleep(max(0.0, promoted + STEADY_AFTER - time.monotonic()))

        self.next_phase(PHASES[2])
        a2.wait_caught_up([b1])
        spooled_before = self.sidecar_status().spool_records.get("spooled", 0)
        fault_at = time.time()
        self.gaps.open(fault_at)
        a2.crash()
        self.event("region A down: a2 crashed (a1 already down); b1 (region B standby) not promoted")
        self.watch_standby_phase(fault_at, time.monotonic() + HOLD_TIMEOUT + STANDBY_SPOOLING)
        spooled = self.sidecar_status().spool_records.get("spooled", 0) - spooled_before
        served, failed, waiting = self.reads_since(fault_at)
        self.event(f"{spooled} bookings acknowledged from the spool; reads of the list since a2 crashed: "
                   f"{served} served from b1, {failed} failed, {waiting} waiting")  # fmt: skip

        self.next_phase(PHASES[3])
        records_before = self.sidecar_status().spool_records
        b1.promote()
        self.event("b1 promoted (region B)")
        promoted = time.monotonic()
        status = self.wait_for(
            "spool replayed on b1", lambda s: s.state == "up" and s.writer_host == b1.hostport
            and s.spool_pending == 0, REPLAY_TIMEOUT,
        )  # fmt: skip
        self.gaps.close()
        replayed = status.spool_records.get("replayed", 0) - records_before.get("replayed", 0)
        self.event(f"sidecar follows b1; spool replayed {replayed}")
        time.sleep(max(0.0, promoted + STEADY_AFTER - time.monotonic()))

        self.next_phase(PHASES[4])
        spooled_before = self.sidecar_status().spool_records.get("spooled", 0)
        self.gaps.open()
        b1.crash()
        self.event("b1 crashed: no writer in any region")
        outage_end = time.monotonic() + HOLD_TIMEOUT + OUTAGE_SPOOLING
        while time.monotonic() < outage_end:
            self.sidecar_status()  # keeps max_spool_pending current
            time.sleep(0.25)

        self.spooled = self.sidecar_status().spool_records.get("spooled", 0) - spooled_before
        self.event(f"{self.spooled} bookings acknowledged from the spool")
        self.next_phase(PHASES[5])
        b1.start()
        self.event("b1 restarted")
        records_before = self.sidecar_status().spool_records
        status = self.wait_for(
            "spool replayed and cluster up",
            lambda s: s.state == "up" and s.spool_pending == 0,
            REPLAY_TIMEOUT,
        )
        self.gaps.close()
        replayed = status.spool_records.get("replayed", 0) - records_before.get("replayed", 0)
        self.event(f"sidecar up on b1; spool replayed {replayed}")
        time.sleep(STEADY_AFTER)
        stuck = self.load.stop() + self.reader.stop()
        if stuck:
            say(f"                 ({stuck} load workers or readers still waiting for an answer)")
        self.report(PHASES[5], self._reporter)
        return self.judge()

    def reads_since(self, at: float) -> tuple[int, int, int]:
        """(served, failed, waiting) among the reads started at or after `at` (wall clock)."""
        mine = [r for r in self.reads.snapshot() if r.start >= at]
        served = sum(r.done and r.ok for r in mine)
        failed = sum(r.done and not r.ok for r in mine)
        return served, failed, len(mine) - served - failed

    def watch_standby_phase(self, fault_at: float, until: float) -> None:
        """Region A down, b1 not promoted, until `until` (monotonic): say when the first read after
        the fault is served, and when bookings start to be spooled."""
        served_said = spooling_said = False
        while time.monotonic() < until:
            status = self.sidecar_status()
            if not served_said and self.reads_since(fault_at)[0]:
                served_said = True
                self.event("reads of the reservations list served from b1 (no writer anywhere)")
            if not spooling_said and status.state == "outage":
                spooling_said = True
                self.event("hold_timeout passed: bookings acknowledged from the spool")
            time.sleep(0.1)

    def judge(self) -> bool:
        """The final table, every phase judged against the recovered writer."""
        status = self.wait_for("writer", lambda s: s.state == "up" and s.spool_pending == 0, REPLAY_TIMEOUT)
        counts = self.counts(status.writer_host)
        orders = self.log.snapshot()
        reads = self.reads.snapshot()
        final = [phase_row(p, orders, counts, reads) for p in PHASES]
        total = phase_row("total", [_relabel(o, "total") for o in orders], counts,
                          [_relabel(r, "total") for r in reads])  # fmt: skip
        total.longest_stall = max(r.longest_stall for r in final)
        say("\nafter recovery (every phase checked on the recovered writer):\n")
        for line in format_table([r.cells() for r in [*final, total]]):
            say(line)
        status = self.sidecar_status()
        records = ", ".join(f"{k} {v}" for k, v in sorted(status.spool_records.items()))
        say(f"\nspool: max pending {self.max_spool_pending}; records: {records or '-'}")
        self.rows = [*final, total]
        problems = drill_problems(final, total, checked=counts is not None, outage_spooled=self.spooled)
        failures = [o for o in orders if o.done and not o.ok]
        if failures:
            say("failed orders (the app showed an error page; not acknowledged, so not promised):")
            for o in failures[:8]:
                say(f"  {o.phase:<{PHASE_WIDTH}} {(o.error or '')[:200]}")
            if len(failures) > 8:
                say(f"  ... and {len(failures) - 8} more")
        failed_reads = [r for r in reads if r.done and not r.ok]
        if failed_reads:
            say("failed reads (the reservations list showed an error page):")
            for phase in PHASES:
                mine = [r for r in failed_reads if r.phase == phase]
                if mine:
                    say(f"  {phase:<{PHASE_WIDTH}} {len(mine)}x, e.g. {(mine[0].error or '')[:160]}")
        stale = [r for r in reads if r.ok and r.stale is not None]
        for r in stale[:8]:
            missing = r.stale
            assert missing is not None and missing.end is not None
            say(f"stale read at {self.rel(r.start):.1f}s ({r.phase}): {missing.marker!r}, acknowledged "
                f"at {self.rel(missing.end):.1f}s, missing")  # fmt: skip
        self.verdict = ("PASS: every acknowledged order is in the database exactly once; no read was stale "
                        f"beyond {STALE_BOUND:g}s; the list kept loading from b1 while region A was down"
                        if not problems else "FAIL: " + "; ".join(problems))  # fmt: skip
        say("\n" + self.verdict)
        return not problems


def drill_problems(
    rows: Sequence[PhaseRow], total: PhaseRow, checked: bool, outage_spooled: int
) -> list[str]:
    """Why the drill failed (empty: it passed). `rows`: one per phase of PHASES; `total`: all of
    them; `checked`: the recovered writer could be asked; `outage_spooled`: bookings the sidecar
    spooled during the full outage."""
    problems = []
    if not checked:
        problems.append("no writer to check after recovery")
    if total.lost:
        problems.append(f"{total.lost} acknowledged orders lost")
    if total.duplicates:
        problems.append(f"{total.duplicates} orders applied more than once")
    if outage_spooled == 0:
        # Nothing lost is easy when nothing is accepted: the outage must have shown the spool.
        problems.append("the sidecar spooled no booking during the full outage")
    if total.reads_stale:
        problems.append(f"{total.reads_stale} reads served stale beyond the bound ({STALE_BOUND:g}s)")
    standby = next((r for r in rows if r.phase == STANDBY_PHASE), None)
    if standby is None or standby.reads_served == 0:
        # Reads kept flowing without a writer is what the phase is there to show.
        failed = standby.reads_failed if standby is not None else 0
        problems.append(f"no read of the reservations list was served in {STANDBY_PHASE!r} "
                        f"({failed} failed): reads did not go to b1")  # fmt: skip
    return problems


_Item = TypeVar("_Item", Order, Read)


def _relabel(item: _Item, phase: str) -> _Item:
    from dataclasses import replace

    return replace(item, phase=phase)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _raise_exit(signum: int, frame: object) -> None:
    # An exception, so the finally blocks stop every PostgreSQL, sidecar and thread we started.
    raise SystemExit(128 + signum)


def run_demo(once: bool = False, spool: str = "dynamodb", cafe_port: int = 8080) -> int:
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    started = time.monotonic()
    # Logs outlive the run (the work directory with the spool does not): the place to look after.
    log_dir = Path(tempfile.mkdtemp(prefix="pgsidecar-demo-logs-"))
    stack = DemoStack(spool="dynamodb" if spool == "dynamodb" else "sqlite", cafe_port=cafe_port,
                      hold_timeout=f"{HOLD_TIMEOUT:g}s", say=say, log_dir=log_dir)  # fmt: skip
    status: StatusServer | None = None
    play: LoadGenerator | None = None
    drill: Drill | None = None
    try:
        stack.start()
        assert stack.sidecar is not None and stack.cafe is not None and stack.topo is not None
        drill = Drill(stack)
        status = StatusServer(drill.status_json, cafe_port + 1 if cafe_port else 8081)
        drill.urls = {
            "Cafe": stack.cafe.url,
            "status": status.url,
            "sidecar metrics": stack.sidecar.metrics_url + "/metrics",
        }
        say("")
        if stack.cafe.fell_back:
            say(f"port {stack.cafe_port} is taken: the Cafe runs on port {stack.cafe.port} instead")
        say(f"Cafe app         {stack.cafe.url}   (DSN: the sidecar on 127.0.0.1:{stack.sidecar.port})")
        say(f"status page      {status.url}")
        metrics = stack.sidecar.metrics_url
        say(f"sidecar metrics  {metrics}/metrics   readiness {metrics}/readyz")
        if stack.dynamodb is not None:
            say(f"spool            DynamoDB (moto) at {stack.dynamodb.endpoint_url}")
        say(f"sidecar log      {stack.sidecar.log_path}")
        if stack.dynamodb is not None:
            say(f"DynamoDB log     {stack.dynamodb.log_path}")
        for node in stack.topo.nodes:
            say(f"postgres {node.name}      {node.hostport}   {node.datadir}")
        say(f"(stack up in {time.monotonic() - started:.1f}s)")
        ok = drill.run()
        say(f"\ndrill done in {time.monotonic() - started:.1f}s")
        if once:
            return 0 if ok else 1
        # A booking every second keeps the chart alive while you play.
        play = LoadGenerator(stack.cafe.url, drill.log, lambda: "play", workers=1, pause=1.0,
                             worker_offset=100, on_done=drill._done)  # fmt: skip
        drill.begin("play")
        play.start()
        say(f"\nthe stack stays up: book a table at {stack.cafe.url}, watch {status.url}.")
        say("b1 is the writer; for another outage: runuser -u postgres -- pg_ctl stop -m immediate -D")
        say(f"  {stack.topo.b1.datadir}   (and pg_ctl start -D ... -l ... to recover). Ctrl-C stops it all.")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("\nstopping ...")
        return 130 if once else 0
    except Exception as exc:
        print(f"demo FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if stack.sidecar is not None:
            print("--- sidecar log (tail) ---\n" + stack.sidecar.log_tail(), file=sys.stderr, flush=True)
        return 1
    finally:
        for load in (play, drill.load if drill is not None else None):
            if load is not None:
                load.stop(timeout=5)
        if status is not None:
            status.stop()
        stack.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgsidecar demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="exit after the drill (0: nothing lost)")
    args = parser.parse_args(argv)
    return run_demo(once=args.once)


if __name__ == "__main__":
    sys.exit(main())
