"""Soak and chaos: mixed load from four drivers through two sidecars while faults repeat.

``python -m bench.soak [--minutes 30] [--json PATH]`` (``make bench-soak``; not part of CI)

One PostgreSQL 15 topology (region A: a1 writer + a2; region B: b1; ``demo_app.cluster``), two
sidecars in front of it: session mode with a SQLite spool, transaction mode with a DynamoDB spool
(moto's server). Against each, continuously: psycopg 3 (autocommit and explicit transactions) and
asyncpg writers (``tests.harness.load.Load``), a pg8000 client that alternates a write with a
query of known answer, and psql runs of a few INSERTs each. Every write carries a client-generated
id. Meanwhile this fault schedule repeats until the time is up:

1. writer crash (``pg_ctl stop -m immediate``), the synchronous standby promoted;
2. writer fast shutdown, the synchronous standby promoted;
3. region failover: both region-A nodes crash, b1 promoted;
4. full outage: the writer stops, simple INSERTs are spooled, the writer comes back, replay;
5. both sidecars SIGKILLed and restarted (the spools survive);
6. full outage while the DynamoDB endpoint goes away and comes back, then the writer returns.

After each fault the old nodes rejoin as standbys of the writer (rebuilt when diverged). Checked
after every fault and at the end: every acknowledged write present exactly once; no wrong answer;
sidecar RSS and open file descriptors flat after warm-up (the first cycle); no server connection
idle in a transaction for more than 10 s. Prints a table; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moto.server import ThreadedMotoServer

from bench import exit_on_sigterm
from demo_app.cluster import APP_DB, PgNode, Topology, make_pg_dir, make_topology
from demo_app.cluster import set_sync_standbys as set_sync
from tests.fuzz.driver import open_fds, rss_mib
from tests.harness.load import DDL, Attempt, Load, Target, Txn, sqlstate_of
from tests.harness.sidecar import SIDECAR_PASSWORDS, SidecarProcess, sidecar_config

USER = "app_scram"
TABLE = "soak"
FAULTS = ("crash", "fast", "region", "outage", "sidecar_kill", "dynamodb_outage")
HOLD = "3s"  # hold_timeout: a promotion 1 s after the fault is followed; a longer outage spools
SETTLE = 4.0  # seconds of load after a recovery before the next fault
OUTAGE = 6.0  # seconds spent in a full outage
RSS_SLACK_MIB = 32.0
FD_SLACK = 32
IDLE_IN_TXN_S = 10
_COUNTER = re.compile(r'^pgsidecar_(spool_records_total|failovers_total)\{\w+="(\w+)"\} (\S+)$')


def say(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# The two drivers Load does not have: pg8000 (with answers checked) and psql
# ---------------------------------------------------------------------------------------------


@dataclass
class ExtraClients:
    """pg8000 and psql workers against one sidecar; their transactions go into `txns`."""

    target: Target
    txns: list[Txn] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    answers: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> ExtraClients:
        for fn in (self._pg8000, self._psql):
            t = threading.Thread(target=fn, daemon=True, name=f"soak-{fn.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _pg8000(self) -> None:
        import pg8000.native

        conn: Any = None
        n = 0
        while not self._stop.is_set():
            n += 1
            ident = f"pg8000-{uuid.uuid4().hex}"
            txn = Txn("pg8000", 0, (ident,))
            t0 = time.time()
            try:
                if conn is None:
                    t = self.target
                    conn = pg8000.native.Connection(t.user, host=t.host, port=t.port, password=t.password,
                                                    database=t.dbname, timeout=60)  # fmt: skip
                got = conn.run("SELECT CAST(:n AS int) + 1", n=n)
                if got != [[n + 1]]:
                    self.wrong.append(f"pg8000: SELECT {n} + 1 answered {got!r}")
                else:
                    self.answers += 1
                conn.run(f"INSERT INTO {TABLE} (id, client) VALUES (:id, 'pg8000')", id=ident)
                txn.attempts.append(Attempt(t0, time.time()))
                txn.outcome = "committed"
            except Exception as exc:
                txn.attempts.append(Attempt(t0, time.time(), _sqlstate(exc), str(exc)[:200]))
                txn.outcome = "failed"
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                time.sleep(0.1)
            self.txns.append(txn)
            time.sleep(0.02)
        with contextlib.suppress(Exception):
            conn.close()

    def _psql(self) -> None:
        t = self.target
        env = {**os.environ, "PGPASSWORD": t.password, "PGCONNECT_TIMEOUT": "10"}
        while not self._stop.is_set():
            ids = tuple(f"psql-{uuid.uuid4().hex}" for _ in range(3))
            values = ", ".join(f"('{i}', 'psql')" for i in ids)
            txn = Txn("psql", 0, ids)
            t0 = time.time()
            # One transaction (psql -1): the three rows are acknowledged together or not at all.
            proc = subprocess.run(
                ["psql", "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-h", t.host, "-p", str(t.port),
                 "-U", t.user, "-d", t.dbname, "-c", f"INSERT INTO {TABLE} (id, client) VALUES {values}"],
                env=env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            ok = proc.returncode == 0
            txn.attempts.append(Attempt(t0, time.time(), None if ok else "psql", proc.stderr.strip()[:200]))
            txn.outcome = "committed" if ok else "failed"
            self.txns.append(txn)
            time.sleep(0.5)


def _sqlstate(exc: BaseException) -> str:
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], dict) and "C" in args[0]:
        return str(args[0]["C"])  # pg8000's DatabaseError carries the error fields
    return sqlstate_of(exc)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    sidecar: str
    rss_mib: float
    fds: int


@dataclass
class Report:
    minutes: float
    faults: Counter[str] = field(default_factory=Counter)
    cycles: int = 0
    transactions: dict[str, int] = field(default_factory=dict)
    committed: int = 0
    acked_rows: int = 0
    lost: int = 0
    duplicates: int = 0
    wrong_answers: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    idle_in_txn: int = 0
    rss: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # warm, max after, end
    fds: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    tracebacks: int = 0
    counters: Counter[str] = field(default_factory=Counter)  # sidecar metrics, summed over restarts
    violations: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, base: Path, minutes: float) -> None:
        self.base = base
        self.minutes = minutes
        self.topo: Topology = make_topology(base)
        self.writer: PgNode = self.topo.a1
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        self.moto_port = int(self.moto.get_host_and_port()[1])
        self.sidecars: dict[str, SidecarProcess] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.samples: list[Sample] = []
        self.idle_in_txn: list[str] = []
        self.report = Report(minutes)
        self.warm_at: float | None = None
        self._stop = threading.Event()

    # -- setup ---------------------------------------------------------------------------------

    def start_sidecars(self) -> None:
        regions = self.topo.regions()
        spool_dir = self.base / "spools"
        spool_dir.mkdir(exist_ok=True)
        common = {"failover": {"check_interval": "250ms", "hold_timeout": HOLD}}
        self.configs["session"] = sidecar_config(regions, {
            **common, "pool": {"mode": "session"},
            "spool": {"backend": "sqlite", "path": str(spool_dir / "session.db")},
        })  # fmt: skip
        self.configs["transaction"] = sidecar_config(regions, {
            **common, "pool": {"mode": "transaction", "size": 8},
            "spool": {"backend": "dynamodb", "dynamodb": {
                "table": "soak-spool", "endpoint_url": f"http://127.0.0.1:{self.moto_port}"}},
        })  # fmt: skip
        for name in self.configs:
            self._start_sidecar(name)

    def _start_sidecar(self, name: str) -> None:
        env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
        proc = SidecarProcess(self.configs[name], self.base / f"sidecar-{name}", env=env, start_timeout=30)
        self.sidecars[name] = proc.start()

    def target(self, name: str) -> Target:
        s = self.sidecars[name]
        return Target(s.host, s.port, USER, SIDECAR_PASSWORDS[USER], APP_DB)

    # -- monitoring ----------------------------------------------------------------------------

    def _monitor(self) -> None:
        while not self._stop.wait(2.0):
            for name, s in list(self.sidecars.items()):
                with contextlib.suppress(OSError, ValueError):
                    if s.is_running():
                        self.samples.append(Sample(time.time(), name, rss_mib(s.pid), open_fds(s.pid)))
            with contextlib.suppress(Exception):
                rows = self.writer.query(
                    "SELECT pid, usename, left(query, 60) FROM pg_stat_activity "
                    "WHERE state LIKE 'idle in transaction%%' AND usename LIKE 'app_%%' "
                    f"AND state_change < now() - interval '{IDLE_IN_TXN_S} seconds'"
                )
                self.idle_in_txn += [str(r) for r in rows]

    # -- faults --------------------------------------------------------------------------------

    def _standbys(self) -> list[PgNode]:
        return [n for n in self.topo.nodes if n is not self.writer]

    def _promote(self, new: PgNode, down: Sequence[PgNode]) -> None:
        time.sleep(1.0)  # the sidecars notice the fault and hold
        new.promote()
        self.writer = new
        for node in self._standbys():
            node.repoint(new)  # an old writer is rebuilt as a standby of the new one
        set_sync(new, [self._next_target().name])

    def _next_target(self) -> PgNode:
        # The standby promoted by the next in-region fault: the other node of the writer's region,
        # else any standby. Made synchronous so no acknowledged commit is lost by the promotion.
        region = next(r for r, nodes in self.topo.regions().items() if self.writer in nodes)
        same = [n for n in self.topo.regions()[region] if n is not self.writer]
        return same[0] if same else self._standbys()[0]

    def fault(self, kind: str) -> None:
        say(f"  [{time.strftime('%H:%M:%S')}] fault: {kind} (writer {self.writer.name})")
        if kind in ("crash", "fast"):
            target = self._next_target()
            self.writer.crash() if kind == "crash" else self.writer.stop("fast")
            self._promote(target, [])
        elif kind == "region":
            regions = self.topo.regions()
            home = next(r for r, nodes in regions.items() if self.writer in nodes)
            other = next(r for r in regions if r != home)
            set_sync(self.writer, [regions[other][0].name])
            for node in regions[home]:
                node.crash()
            self._promote(regions[other][0], regions[home])
        elif kind in ("outage", "dynamodb_outage"):
            self.writer.stop("fast")
            time.sleep(OUTAGE / 2)
            if kind == "dynamodb_outage":
                self.moto.stop()
                time.sleep(OUTAGE / 2)
                self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
                self.moto.start()
            time.sleep(OUTAGE / 2)
            self.writer.start()
            set_sync(self.writer, [self._next_target().name])
        elif kind == "sidecar_kill":
            for name, proc in list(self.sidecars.items()):
                self._scrape(proc)  # its counters die with it
                proc.kill()
                self._start_sidecar(name)
        self.report.faults[kind] += 1

    def _scrape(self, proc: SidecarProcess) -> None:
        """Add the sidecar's spool and failover counters to the report's totals."""
        try:
            with urllib.request.urlopen(proc.metrics_url + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return
        for line in text.splitlines():
            match = _COUNTER.match(line)
            if match:
                self.report.counters[f"{match.group(1)}{{{match.group(2)}}}"] += int(float(match.group(3)))

    # -- main loop -----------------------------------------------------------------------------

    def run(self) -> Report:
        self.writer.execute(DDL.format(table=TABLE) + f"; GRANT ALL ON {TABLE} TO {USER}", dbname=APP_DB)
        set_sync(self.writer, [self._next_target().name])
        self.start_sidecars()
        loads: list[Load] = []
        extras: list[ExtraClients] = []
        for name in self.sidecars:
            loads.append(Load(self.target(name), TABLE, {"autocommit": 2, "explicit": 1, "asyncpg": 2},
                              pause=0.01).start())  # fmt: skip
            extras.append(ExtraClients(self.target(name)).start())
        monitor = threading.Thread(target=self._monitor, daemon=True)
        monitor.start()
        deadline = time.monotonic() + self.minutes * 60
        time.sleep(SETTLE)
        try:
            while time.monotonic() < deadline:
                for kind in FAULTS:
                    if time.monotonic() >= deadline:
                        break
                    self.fault(kind)
                    time.sleep(SETTLE)
                    self.check(loads, extras, final=False)
                else:
                    self.report.cycles += 1
                    if self.warm_at is None:
                        self.warm_at = time.time()
        finally:
            for load in loads:
                hung = load.stop(60)
                if hung:
                    self.report.violations.append(f"load workers hung: {hung}")
                if load.crashes:
                    self.report.violations.append(f"load crashed: {load.crashes}")
            for extra in extras:
                extra.stop()
            self._stop.set()
            monitor.join(10)
        self.check(loads, extras, final=True)
        return self.report

    def check(self, loads: list[Load], extras: list[ExtraClients], final: bool) -> None:
        txns = [t for load in loads for t in load.txns] + [t for e in extras for t in e.txns]
        acked = [i for t in txns if t.outcome == "committed" for i in t.ids]
        # Spooled writes replay asynchronously: wait for them before calling one lost.
        deadline = time.monotonic() + (120 if final else 30)
        while True:
            rows = dict(self.writer.query(f"SELECT id, count(*) FROM {TABLE} GROUP BY id", dbname=APP_DB))
            lost = [i for i in acked if i not in rows]
            if not lost or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        r = self.report
        r.lost = len(lost)
        r.duplicates = sum(n - 1 for n in rows.values() if n > 1)
        r.committed = sum(1 for t in txns if t.outcome == "committed")
        r.acked_rows = len(acked)
        r.transactions = dict(Counter(t.kind for t in txns if t.attempts))
        r.wrong_answers = sum(len(e.wrong) for e in extras)
        r.errors = Counter(a.sqlstate or "?" for t in txns for a in t.attempts if a.sqlstate)
        r.idle_in_txn = len(self.idle_in_txn)
        say(f"    check: {r.acked_rows} acknowledged rows, lost {r.lost}, duplicates {r.duplicates}, "
            f"wrong answers {r.wrong_answers}, idle-in-transaction {r.idle_in_txn}")  # fmt: skip
        if not final:
            return
        for proc in self.sidecars.values():
            self._scrape(proc)
        r.tracebacks = sum(s.log_text().count("Traceback") for s in self.sidecars.values())
        warm = self.warm_at or (self.samples[0].at if self.samples else time.time())
        for name in self.sidecars:
            after = [s for s in self.samples if s.sidecar == name and s.at >= warm]
            if len(after) < 2:
                continue
            r.rss[name] = (after[0].rss_mib, max(s.rss_mib for s in after), after[-1].rss_mib)
            r.fds[name] = (after[0].fds, max(s.fds for s in after), after[-1].fds)
            if after[-1].rss_mib - after[0].rss_mib > RSS_SLACK_MIB:
                r.violations.append(f"{name}: RSS grew {after[0].rss_mib:.0f} -> {after[-1].rss_mib:.0f} MiB")
            if after[-1].fds - after[0].fds > FD_SLACK:
                r.violations.append(f"{name}: open fds grew {after[0].fds} -> {after[-1].fds}")
        for what, bad in (("lost acknowledged rows", r.lost), ("duplicate rows", r.duplicates),
                          ("wrong answers", r.wrong_answers), ("servers idle in transaction", r.idle_in_txn),
                          ("tracebacks in the sidecar logs", r.tracebacks)):  # fmt: skip
            if bad:
                r.violations.append(f"{what}: {bad}")
        if self.warm_at is None:
            r.violations.append("short run: no full fault cycle, RSS/fd flatness measured from the start")

    def close(self) -> None:
        for proc in self.sidecars.values():
            proc.stop()
        with contextlib.suppress(Exception):
            self.moto.stop()
        with contextlib.suppress(Exception):
            self.topo.stop_all()


def _counters(r: Report, prefix: str) -> str:
    picked = sorted((k.split("{")[1].rstrip("}"), v) for k, v in r.counters.items() if k.startswith(prefix))
    return ", ".join(f"{label} {v}" for label, v in picked) or "0"


def print_report(r: Report) -> None:
    say(f"\n#### Soak: {r.minutes:g} min, {r.cycles} full fault cycles, faults "
        + ", ".join(f"{k} x{v}" for k, v in r.faults.items()) + "\n")  # fmt: skip
    rows = [
        ("transactions by driver", ", ".join(f"{k} {v}" for k, v in sorted(r.transactions.items()))),
        ("committed transactions / acknowledged rows", f"{r.committed} / {r.acked_rows}"),
        ("acknowledged rows lost / duplicated", f"{r.lost} / {r.duplicates}"),
        ("wrong answers", str(r.wrong_answers)),
        ("errors by SQLSTATE", ", ".join(f"{k}:{v}" for k, v in r.errors.most_common(8)) or "0"),
        ("spool records (summed over sidecar restarts)", _counters(r, "spool")),
        ("failovers completed (both sidecars)", _counters(r, "failovers")),
        ("servers idle in transaction > 10 s", str(r.idle_in_txn)),
        ("tracebacks in sidecar logs", str(r.tracebacks)),
    ]
    for name, (warm, peak, end) in r.rss.items():
        rows.append((f"{name} sidecar RSS MiB (warm / max / end)", f"{warm:.0f} / {peak:.0f} / {end:.0f}"))
    for name, (warm, peak, end) in r.fds.items():
        rows.append((f"{name} sidecar open fds (warm / max / end)", f"{warm} / {peak} / {end}"))
    width = max(len(k) for k, _ in rows)
    say(f"| {'figure'.ljust(width)} | value |")
    say(f"|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        say(f"| {k.ljust(width)} | {v} |")
    say("\nviolations: " + ("none" if not r.violations else ""))
    for v in r.violations:
        say(f"  - {v}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long the fault schedule repeats (30)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error("--minutes must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        os.environ.setdefault(key, value)
    base = make_pg_dir(prefix="pgsidecar-soak-")
    soak: Soak | None = None
    try:
        say(f"soak: {args.minutes:g} min, faults {', '.join(FAULTS)}; {os.cpu_count()} CPUs")
        soak = Soak(base, args.minutes)
        report = soak.run()
        print_report(report)
        if args.json is not None:
            # (not dataclasses.asdict: it rebuilds a Counter from its items, counting the pairs)
            doc = {k: dict(v) if isinstance(v, dict) else v for k, v in vars(report).items()}
            args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        return 1 if report.violations else 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        if soak is not None:
            soak.close()
        shutil.rmtree(base, ignore_errors=True)



if __name__ == "__main__":
    sys.exit(main())
