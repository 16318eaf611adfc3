"""Failover drill: what applications see through pgsidecar when the writer fails (ARCHITECTURE.md, P2-P4).

``python -m bench.failover_drill [--scenarios crash,fast,region,partition] [--clients N]
[--promotion-delay S] [--json PATH]``

For every scenario, on a fresh PostgreSQL 15 topology (region A: writer a1 + standby a2; region B:
standby b1; ``demo_app.cluster``) and a fresh sidecar with the default ``failover.check_interval``
(250ms) and ``probe_timeout`` (1s):

1. N writer clients (psycopg 3, autocommit, one INSERT of a client-generated unique id per
   transaction; 40001 → retry with the same id, 08007 → retry only if the row is absent) write
   continuously, and a few idle sessions (each with a SET) sit connected;
2. the fault is injected: ``crash`` (a1 ``pg_ctl stop -m immediate``), ``fast`` (a1
   ``pg_ctl stop -m fast``), ``region`` (a1 and a2 crash), ``partition`` (a1 sits behind a TCP
   forwarder that turns into a black hole: nothing forwarded, nothing read, new connections
   accepted and never answered);
3. after ``--promotion-delay`` seconds a2 is promoted (b1 for ``region``);
4. the load goes on for a few seconds on the new writer, then the idle sessions run one query each;
5. the new writer is checked: every acknowledged id present exactly once.

Before the load, ``pgsidecar init-db`` installs the commit-outcome ledger in the app database (so
a COMMIT in flight at the fault can be resolved through its marker), and the sidecar probes as the
app user in that database. ``/metrics`` is read just before the fault and at the end: the row
shows the deltas of ``pgsidecar_transaction_replays_total{result}`` and
``pgsidecar_commit_outcomes_total{outcome}``, and the notes count the sidecar's
``transaction_not_replayed`` (by reason), ``transaction_replay_diverged`` and ``commit_outcome``
log lines.

An error counts as "in flight at the fault" when its attempt started before the fault injection
returned (for ``partition``: before the sidecar logged the failure, since until then requests still
go into the black hole) and ended after the injection began.

The synchronous standby is the one promoted, so an acknowledged commit is always on the new writer.

One table row per scenario: detection (fault → the sidecar's first ``cluster_state`` log line),
per-transaction latency (retries included) p50/p99/max, errors by SQLSTATE split into attempts in
flight at the fault and all others, idle-session errors, lost and duplicate rows, and the targets
(detection ≤ 1 s, max stall ≤ promotion delay + 0.5 s, no idle-session error, nothing lost,
nothing twice) marked PASS or MISS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from bench import exit_on_sigterm
from demo_app.cluster import APP_DB, REGION_A, REGION_B, PgNode, Topology, make_pg_dir, make_topology
from demo_app.cluster import set_sync_standbys as set_sync
from tests.harness.load import (
    DDL,
    BlackHole,
    Load,
    Target,
    judge,
    log_events,
    percentile,
    rows_on,
)
from tests.harness.sidecar import PROJECT_ROOT, REMOVE, SIDECAR_PASSWORDS, SidecarProcess, sidecar_config

SCENARIOS = ("crash", "fast", "region", "partition")
USER = "app_scram"
IDLE_SESSIONS = 3
WARMUP = 2.0  # seconds of load before the fault
AFTER = 3.0  # seconds of load after the promotion
DETECTION_TARGET = 1.0
STALL_SLACK = 0.5
REPLAYS = "pgsidecar_transaction_replays_total"
OUTCOMES = "pgsidecar_commit_outcomes_total"


def say(text: str = "") -> None:
    print(text, flush=True)


@dataclass
class Result:
    scenario: str
    detection_s: float | None
    new_writer_s: float | None  # fault → the sidecar uses the new writer
    promoted_s: float  # fault → pg_promote() returned
    transactions: int
    committed: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    in_flight_errors: dict[str, int]
    other_errors: dict[str, int]
    idle_errors: dict[str, int]
    lost: int
    duplicates: int
    failovers: str  # failover_completed kind(s) logged
    replays: dict[str, int] = field(default_factory=dict)  # Δ transaction_replays_total by result
    commit_outcomes: dict[str, int] = field(default_factory=dict)  # Δ commit_outcomes_total by outcome
    # transaction_not_replayed by reason, transaction_replay_diverged, commit_outcome by outcome
    replay_events: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# One scenario
# ---------------------------------------------------------------------------------------------


def run_scenario(scenario: str, base: Path, clients: int, delay: float) -> Result:
    say(f"\n== {scenario}: building a fresh topology ...")
    topo = make_topology(base)
    hole: BlackHole | None = None
    sidecar: SidecarProcess | None = None
    try:
        new_writer = topo.b1 if scenario == "region" else topo.a2
        # Only the node that will be promoted acknowledges commits: nothing acknowledged is lost
        # by the promotion itself, so a lost row is the sidecar's doing.
        set_sync(topo.a1, [new_writer.name])
        table = f"drill_{scenario}"
        topo.a1.execute(DDL.format(table=table) + f"; GRANT ALL ON {table} TO {USER}", dbname=APP_DB)
        hosts: dict[str, list[Any]] = topo.regions()
        if scenario == "partition":
            hole = BlackHole((topo.a1.host, topo.a1.port))
            hosts = {REGION_A: [hole.hostport, topo.a2], REGION_B: [topo.b1]}
        # Without the harness's test settings: the drill measures the sidecar's defaults
        # (check_interval 250ms, probe_timeout 1s, hold_timeout 30s). The probe user and database
        # are the app's, where the ledger lives: the sidecar checks it can use the marker there.
        upstream = {"probe_user": USER, "probe_database": APP_DB}
        config = sidecar_config(hosts, {"failover": REMOVE, "upstream": upstream})
        sidecar = SidecarProcess(config, Path(tempfile.mkdtemp(prefix=f"drill-{scenario}-", dir=base)))
        init_db(sidecar.config_path)
        topo.a1.wait_caught_up([topo.a2, topo.b1])
        sidecar.start()
        target = Target(sidecar.host, sidecar.port, USER, SIDECAR_PASSWORDS[USER], APP_DB)

        idle = []
        for i in range(IDLE_SESSIONS):
            conn = psycopg.connect(target.conninfo(connect_timeout=30, application_name=f"idle-{i}"),
                                   autocommit=True)  # fmt: skip
            conn.execute(f"SET application_name = 'drill-idle-{i}'")
            idle.append(conn)

        load = Load(target, table, {"autocommit": clients}).start()
        time.sleep(WARMUP)
        before = scrape(sidecar)
        say(f"   injecting the fault ({scenario}) under {clients} writer clients ...")
        fault_start = time.time()
        inject(scenario, topo, hole)
        fault_end = time.time()
        time.sleep(max(0.0, fault_start + delay - time.time()))
        new_writer.promote()
        promoted = time.time()
        time.sleep(AFTER)
        hung = load.stop()

        idle_errors: Counter[str] = Counter()
        for conn in idle:
            try:
                row = conn.execute(
                    "SELECT inet_server_port(), current_setting('application_name')"
                ).fetchone()
                if row is None or row[0] != new_writer.port:
                    idle_errors[f"wrong server {row}"] += 1
            except psycopg.Error as exc:
                idle_errors[exc.sqlstate or type(exc).__name__] += 1
            finally:
                conn.close()

        after = scrape(sidecar)
        rows = rows_on(new_writer.dsn(dbname=APP_DB), table)
        log = sidecar.log_text()
        states = log_events(log, "cluster_state", since=fault_start - 0.002)
        detection = states[0].at - fault_start if states else None
        switched = next(
            (e.at - fault_start for e in states if e.fields.get("writer") == new_writer.hostport), None
        )
        # In flight at the fault: started before the fault took effect. A black hole takes effect for
        # the sidecar only when it notices: until then requests still go into it.
        in_flight_until = fault_end
        if scenario == "partition" and detection is not None:
            in_flight_until = fault_start + detection
        verdict = judge(load.txns, rows, fault_start, in_flight_until)
        failovers = ",".join(e.fields.get("kind", "?") for e in log_events(log, "failover_completed"))
        lat = sorted(verdict.latencies)
        result = Result(
            scenario=scenario,
            detection_s=detection,
            new_writer_s=switched,
            promoted_s=promoted - fault_start,
            transactions=verdict.txns,
            committed=verdict.committed,
            p50_ms=percentile(lat, 0.50) * 1000,
            p99_ms=percentile(lat, 0.99) * 1000,
            max_ms=(lat[-1] if lat else 0.0) * 1000,
            in_flight_errors=dict(verdict.in_flight_errors),
            other_errors=dict(Counter(a.sqlstate or "?" for _, a in verdict.other_errors)),
            idle_errors=dict(idle_errors),
            lost=len(verdict.lost),
            duplicates=sum(n - 1 for n in verdict.duplicates.values()),
            failovers=failovers or "-",
            replays=delta(before, after, REPLAYS, "result"),
            commit_outcomes=delta(before, after, OUTCOMES, "outcome"),
            replay_events=replay_events(log, fault_start),
        )
        if hung:
            result.notes.append(f"workers still blocked at the end: {hung}")
        if load.crashes:
            result.notes.append(f"load crashed: {load.crashes}")
        if states and states[0].fields.get("state") != "failing_over":
            result.notes.append(f"first state change was {states[0].fields.get('state')}, not failing_over")
        for t, a in verdict.other_errors[:5]:
            result.notes.append(
                f"{t.kind}-{t.worker} {a.sqlstate} at fault{a.start - fault_start:+.3f}s: {a.error}"
            )
        result.checks = {
            "detect<=1s": detection is not None and detection <= DETECTION_TARGET,
            f"stall<={delay + STALL_SLACK:g}s": bool(lat) and lat[-1] <= delay + STALL_SLACK and not hung,
            "idle errors=0": not idle_errors,
            "lost=0": result.lost == 0,
            "dup=0": result.duplicates == 0,
        }
        return result
    finally:
        if sidecar is not None:
            sidecar.stop()
        if hole is not None:
            hole.close()
        with contextlib.suppress(Exception):
            topo.stop_all()
        shutil.rmtree(topo.base_dir, ignore_errors=True)


def init_db(config: Path) -> None:
    """`pgsidecar init-db` for the app database, as the app user (its owner), on the writer."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "init-db", "-c", str(config), "-d", APP_DB, "-U", USER],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pgsidecar init-db failed ({done.returncode}): {done.stderr.strip()}")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(sidecar: SidecarProcess) -> Samples:
    with urllib.request.urlopen(sidecar.metrics_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before: Samples, after: Samples, name: str, label: str) -> dict[str, int]:
    """Non-zero increases of counter `name`, keyed by the value of its one label `label`."""
    out: dict[str, int] = {}
    for (sample, labels), value in after.items():
        if sample != name:
            continue
        moved = int(value - before.get((sample, labels), 0.0))
        if moved:
            out[dict(labels).get(label, "?")] = moved
    return out


def replay_events(log: str, since: float) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for ev in log_events(log, "transaction_not_replayed", since):
        counts[f"not_replayed:{ev.fields.get('reason', '?')}"] += 1
    counts["diverged"] += len(log_events(log, "transaction_replay_diverged", since))
    for ev in log_events(log, "commit_outcome", since):
        counts[f"commit_outcome:{ev.fields.get('outcome', '?')}"] += 1
    return {k: v for k, v in counts.items() if v}


def inject(scenario: str, topo: Topology, hole: BlackHole | None) -> None:
    faults: dict[str, Callable[[], None]] = {
        "crash": topo.a1.crash,
        "fast": lambda: topo.a1.stop("fast"),
        "region": lambda: _both(topo.a1, topo.a2),
        "partition": lambda: hole.partition() if hole is not None else None,
    }
    faults[scenario]()


def _both(first: PgNode, second: PgNode) -> None:
    first.crash()
    second.crash()


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt_counts(counts: dict[str, int]) -> str:
    if not counts:
        return "0"
    return f"{sum(counts.values())} (" + " ".join(f"{k}:{v}" for k, v in sorted(counts.items())) + ")"


def print_table(results: list[Result], delay: float) -> None:
    header = (
        "scenario", "detect s", "new writer s", "stall p50/p99/max ms", "txns", "errors in-flight",
        "errors other", "replays", "commit outcomes", "idle errors", "lost", "dup", "failover", "targets",
    )  # fmt: skip
    rows = []
    for r in results:
        targets = " ".join(f"{name} {'PASS' if ok else 'MISS'}" for name, ok in r.checks.items())
        rows.append((
            r.scenario,
            "-" if r.detection_s is None else f"{r.detection_s:.3f}",
            "-" if r.new_writer_s is None else f"{r.new_writer_s:.3f}",
            f"{r.p50_ms:.1f}/{r.p99_ms:.1f}/{r.max_ms:.0f}",
            str(r.transactions),
            _fmt_counts(r.in_flight_errors),
            _fmt_counts(r.other_errors),
            _fmt_counts(r.replays),
            _fmt_counts(r.commit_outcomes),
            _fmt_counts(r.idle_errors),
            str(r.lost),
            str(r.duplicates),
            r.failovers,
            targets,
        ))  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    say("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        say("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    notes = [(r.scenario, n) for r in results for n in r.notes]
    notes += [(r.scenario, f"log since the fault: {_fmt_counts(r.replay_events)}") for r in results]
    if notes:
        say("\nnotes:")
        for scenario, note in notes:
            say(f"  {scenario}: {note}")
    misses = sum(1 for r in results for ok in r.checks.values() if not ok)
    total = sum(len(r.checks) for r in results)
    say(f"\ntargets met: {total - misses}/{total} (promotion delay {delay:g}s)")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.failover_drill", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    p.add_argument("--clients", type=int, default=8, help="concurrent writer clients (default 8)")
    p.add_argument(
        "--promotion-delay", type=float, default=1.0, metavar="S",
        help="seconds from the fault to the promotion (default 1)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown or not keys:
        p.error(f"--scenarios: unknown {unknown or 'empty list'}; choose from {','.join(SCENARIOS)}")
    if args.clients < 1:
        p.error("--clients must be at least 1")
    if args.promotion_delay < 0:
        p.error("--promotion-delay must not be negative")
    args.scenario_list = list(dict.fromkeys(keys))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    base = make_pg_dir(prefix="pgsidecar-drill-")
    try:
        say(
            f"failover drill: {args.clients} writer clients + {IDLE_SESSIONS} idle sessions, promotion "
            f"{args.promotion_delay:g}s after the fault; sidecar defaults (check_interval 250ms, "
            f"probe_timeout 1s); Python {platform.python_version()}, {os.cpu_count()} CPUs"
        )
        results = [run_scenario(s, base, args.clients, args.promotion_delay) for s in args.scenario_list]
        say(f"\n#### Failover drill: {args.clients} clients, promotion delay {args.promotion_delay:g}s\n")
        print_table(results, args.promotion_delay)
        if args.json is not None:
            doc = {
                "settings": {"clients": args.clients, "promotion_delay_s": args.promotion_delay,
                             "idle_sessions": IDLE_SESSIONS, "cpus": os.cpu_count()},
                "results": [asdict(r) for r in results],
            }  # fmt: skip
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            say(f"\nJSON written to {args.json}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
