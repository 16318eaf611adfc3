"""`pgsidecar demo [--once]`: the Cafe through pgsidecar, and a failover drill under live load.

Starts region A (writer a1 + synchronous standby a2) and region B (standby b1), a local DynamoDB
(moto) for the outage spool, pgsidecar in front of the three, the Cafe app, the status page, and a
load generator that books tables through the Cafe's HTTP form like a browser. Then, phase by phase:

1. warm-up;
2. in-region failover: a1 crashes, a2 is promoted ~2 s later (b1 then follows a2, synchronously);
3. region failover: region A goes down (a2 crashes; a1 is already down), b1 is promoted ~2 s later;
4. full outage: b1 crashes, no writer anywhere; once `failover.hold_timeout` has passed, the sidecar
   acknowledges bookings from its durable spool;
5. recovery: b1 comes back, the sidecar replays the spool, then lets traffic through.

The console shows a timeline: each phase and fault as it happens, and each phase's result once,
when its orders have their answers and the database can be asked: orders attempted, acknowledged
(the thank-you page came back), failed, in the database (asked of the writer directly),
duplicates, lost and the longest stall. After recovery the whole table, every phase judged against
the recovered writer. The sidecar's and the local DynamoDB endpoint's own output go to log files
the demo names at start (kept after it exits). With `--once` the demo
exits then: 0 only if no acknowledged order was lost, none was applied twice, and the outage phase
did acknowledge orders (otherwise the demo would not have shown the spool at all). Without it the
stack stays up until Ctrl-C. Everything started is stopped on the way out.
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
from typing import Any

import psycopg

from .cluster import APP_DB, set_sync_standbys
from .load import (
    TABLE_HEADER,
    DbCounts,
    LoadGenerator,
    Order,
    OrderLog,
    PhaseRow,
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
REPLAY_TIMEOUT = 30.0
WORKERS = 4
PAUSE = 0.1  # between a worker's orders: a busy cafe, not a benchmark on two shared cores

PHASES = ("warm-up", "in-region failover", "region failover", "full outage", "recovery")


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
            f"longest stall {row.longest_stall:.2f}s")  # fmt: skip


class Drill:
    """Runs the phases against a started `DemoStack` and feeds the status page."""

    def __init__(self, stack: DemoStack) -> None:
        self.stack = stack
        self.t0 = time.time()
        self.log = OrderLog()
        self._lock = threading.Lock()
        self._samples: list[list[Any]] = []  # [t, latency, ok, phase] in completion order
        self.phases: list[tuple[str, float]] = []
        self.events: list[tuple[float, str]] = []
        self.rows: list[PhaseRow] = []
        self.verdict: str | None = None
        self.load: LoadGenerator | None = None
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
        return {
            "now": round(self.rel(), 3),
            "phase": self.phase,
            "phases": phases,
            "events": events,
            "samples": samples,
            "pending": [[round(self.rel(o.start), 3), round(o.latency, 3)] for o in orders if not o.done],
            "counts": {"attempted": len(orders), "acknowledged": sum(o.ok for o in orders)},
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
        """Until the orders placed in `phase` have their answer (bounded)."""
        deadline = time.monotonic() + timeout
        while any(not o.done for o in self.log.snapshot() if o.phase == phase):
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
        row = phase_row(phase, self.log.snapshot(), counts)
        self.rows.append(row)
        note = f" ({row.pending} still waiting)" if row.pending else ""
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
        say(f"\nfailover drill: {WORKERS} browsers booking tables through {stack.cafe.url}/reserve")
        say("(-- a phase begins; == a phase's result, once its orders are answered and counted)\n")

        self.begin(PHASES[0])
        time.sleep(WARMUP)

        self.next_phase(PHASES[1])
        fault = time.monotonic()
        a1.crash()
        self.event("a1 (region A writer) crashed")
        time.sleep(max(0.0, fault + PROMOTION_DELAY - time.monotonic()))
        a2.promote()
        self.event("a2 promoted (region A)")
        promoted = time.monotonic()
        self.wait_writer(a2.hostport)
        self.event("sidecar follows a2")
        # b1 follows the new writer, synchronously: the region failover must not lose anything
        # either. (If b1 had WAL a2 never got, repoint() re-clones it from a2.)
        b1.repoint(a2)
        set_sync_standbys(a2, ["b1"])
        self.event("b1 re-pointed to a2 (sync)")
        time.sleep(max(0.0, promoted + STEADY_AFTER - time.monotonic()))

        self.next_phase(PHASES[2])
        a2.wait_caught_up([b1])
        fault = time.monotonic()
        a2.crash()
        self.event("region A down: a2 crashed (a1 already down)")
        time.sleep(max(0.0, fault + PROMOTION_DELAY - time.monotonic()))
        b1.promote()
        self.event("b1 promoted (region B)")
        promoted = time.monotonic()
        self.wait_writer(b1.hostport)
        self.event("sidecar follows b1")
        time.sleep(max(0.0, promoted + STEADY_AFTER - time.monotonic()))

        self.next_phase(PHASES[3])
        spooled_before = self.sidecar_status().spool_records.get("spooled", 0)
        b1.crash()
        self.event("b1 crashed: no writer in any region")
        outage_end = time.monotonic() + HOLD_TIMEOUT + OUTAGE_SPOOLING
        while time.monotonic() < outage_end:
            self.sidecar_status()  # keeps max_spool_pending current
            time.sleep(0.25)

        self.spooled = self.sidecar_status().spool_records.get("spooled", 0) - spooled_before
        self.event(f"{self.spooled} bookings acknowledged from the spool")
        self.next_phase(PHASES[4])
        b1.start()
        self.event("b1 restarted")
        records_before = self.sidecar_status().spool_records
        status = self.wait_for(
            "spool replayed and cluster up",
            lambda s: s.state == "up" and s.spool_pending == 0,
            REPLAY_TIMEOUT,
        )
        replayed = status.spool_records.get("replayed", 0) - records_before.get("replayed", 0)
        self.event(f"sidecar up on b1; spool replayed {replayed}")
        time.sleep(STEADY_AFTER)
        stuck = self.load.stop()
        if stuck:
            say(f"                 ({stuck} load workers still waiting for an answer)")
        self.report(PHASES[4], self._reporter)
        return self.judge()

    def judge(self) -> bool:
        """The final table, every phase judged against the recovered writer."""
        status = self.wait_for("writer", lambda s: s.state == "up" and s.spool_pending == 0, REPLAY_TIMEOUT)
        counts = self.counts(status.writer_host)
        orders = self.log.snapshot()
        final = [phase_row(p, orders, counts) for p in PHASES]
        total = phase_row("total", [_relabel(o, "total") for o in orders], counts)
        total.longest_stall = max(r.longest_stall for r in final)
        say("\nafter recovery (every phase checked on the recovered writer):\n")
        for line in format_table([r.cells() for r in [*final, total]]):
            say(line)
        status = self.sidecar_status()
        records = ", ".join(f"{k} {v}" for k, v in sorted(status.spool_records.items()))
        say(f"\nspool: max pending {self.max_spool_pending}; records: {records or '-'}")
        self.rows = [*final, total]
        problems = []
        if counts is None:
            problems.append("no writer to check after recovery")
        if total.lost:
            problems.append(f"{total.lost} acknowledged orders lost")
        if total.duplicates:
            problems.append(f"{total.duplicates} orders applied more than once")
        if self.spooled == 0:
            # Nothing lost is easy when nothing is accepted: the outage must have shown the spool.
            problems.append("the sidecar spooled no booking during the full outage")
        failures = [o for o in orders if o.done and not o.ok]
        if failures:
            say("failed orders (the app showed an error page; not acknowledged, so not promised):")
            for o in failures[:8]:
                say(f"  {o.phase:<20} {(o.error or '')[:200]}")
            if len(failures) > 8:
                say(f"  ... and {len(failures) - 8} more")
        self.verdict = ("PASS: every acknowledged order is in the database exactly once" if not problems
                        else "FAIL: " + "; ".join(problems))  # fmt: skip
        say("\n" + self.verdict)
        return not problems


def _relabel(order: Order, phase: str) -> Order:
    from dataclasses import replace

    return replace(order, phase=phase)


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
