"""What transaction continuity costs: one sidecar with it on, one with it off, in the same run.

``python -m bench.continuity_cost`` (``make bench-continuity``; extra flags via ``ARGS="..."``).
The issue's targets, against the same sidecar with the features off (`failover.transaction_replay:
false`, `failover.commit_outcome: off`): select-only CPU per transaction within 2 %; tpcb-like
throughput at least 0.9x in transaction mode; memory bounded by `failover.replay_max_bytes` per
client.

1. Builds one fresh PostgreSQL 15 primary with a scale-10 pgbench database (as `make bench`), and
   runs `pgsidecar init-db` there, so that the "on" sidecars write commit markers.
2. Starts four sidecars against it: session and transaction mode, each with the features on (the
   defaults) and off. Before measuring it checks that the "on" ones report `commit_outcome` marker
   in SHOW TOPOLOGY (the ledger is usable) and the "off" ones `off (config)`.
3. Throughput and CPU: for select-only (`-S`) and tpcb-like, in each pool mode, alternates short
   pgbench runs on the two sidecars (on, off, then off, on: each round's order is the previous
   one's reversed, so neither side always runs first), and reads each sidecar's CPU from /proc
   around its run. The machine's drift moves TPS by 20-40 % between runs here, far more than
   what is measured, so the verdicts are on the pairs: the TPS ratio on / off within each round
   (median over the rounds), and CPU per transaction (median over the rounds), which drift moves
   much less. During the tpcb-like runs it counts the rows each run adds to
   pgsidecar.commit_marker: one per transaction with the features on, none with them off.
4. Memory: a transaction-mode sidecar with `replay_max_bytes` 64 KiB, on and off in turn, gets N
   clients that each hold a transaction open after sending statements adding up to just under
   64 KiB (VmRSS read), then as much again three times over (over the limit: the journal drops what
   it held; VmRSS read again). With the features on, each client may cost at most
   replay_max_bytes more than with them off.
5. With `--callgrind [PAIRS]` (needs valgrind): instructions per select-only transaction in each
   pool mode, on and off, counted by bench/callgrind_tx.sh, PAIRS times (default 3). Far steadier
   than CPU time on a shared machine, but not exact under load (one pair's ratio moved by about
   5 % from the next here); its own verdict line, on the median of the pairs' ratios.

`--on replay` or `--on marker` gives the "on" sidecars one feature alone (the other off), to tell
which one a cost comes from; the verdicts are the issue's only with the default, `--on both`.

Every process it starts listens on a free loopback port and is stopped on the way out. The
sidecars run from `--sidecar-root` (default: this checkout), so a compiled build elsewhere (a
checkout where `make build` ran) can be measured with this script; take a copy of a checkout that
others rebuild, since a source newer than its extension makes the sidecar run the sources (the run
warns if the data path changed by its end).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import exit_on_sigterm
from bench.pgbench_compare import (
    CASES,
    CLEANUP,
    CLIENTS,
    POOL_SIZE,
    SCALE,
    THREADS,
    BenchError,
    Case,
    Mode,
    PgbenchFailed,
    ProxyCpu,
    Run,
    build_database,
    cpu_sample,
    file_tail,
    proxy_cpu,
    reset_tpcb_tables,
    rss_kib,
    run_pgbench,
    say,
    tail,
)
from tests.harness.pg import APP_DB, PgNode, free_port, make_pg_dir
from tests.harness.sidecar import PROJECT_ROOT, REMOVE, SIDECAR_PASSWORDS, SidecarProcess, sidecar_config

USER = "app_scram"
PASSWORD = SIDECAR_PASSWORDS[USER]
MARKER_TABLE = "pgsidecar.commit_marker"

# The issue's targets.
CPU_WITHIN = 0.02  # select-only: CPU per transaction on / off at most 1.02
TPCB_MIN = 0.9  # tpcb-like, transaction mode: TPS on / off at least 0.9

# Memory phase.
REPLAY_MAX_BYTES = 64 * 1024
MEMORY_CLIENTS = 50
# Each statement is psycopg's Parse/Bind/Describe/Execute/Sync around 4,000 characters of SQL:
# about 4 KiB as the journal counts it (the whole batch as the client sent it).
STATEMENT_BYTES = 4096
STATEMENTS_AT_LIMIT = 15  # 15 x 4 KiB = 60 KiB: just under replay_max_bytes
STATEMENTS_OVER = 45  # then 180 KiB more: 240 KiB in the transaction, far over it
AT_LIMIT_KIB = STATEMENTS_AT_LIMIT * STATEMENT_BYTES // 1024
OVER_KIB = (STATEMENTS_AT_LIMIT + STATEMENTS_OVER) * STATEMENT_BYTES // 1024


@dataclass(frozen=True)
class Plan:
    key: str
    label: str
    case: Case
    mode: Mode
    verdict: str  # "cpu", "tps" or "" (shown, no target)


PLANS = (
    Plan("select-session", "select-only (-S), session mode", CASES["select"], "session", "cpu"),
    Plan("select-transaction", "select-only (-S), transaction mode", CASES["select"], "transaction", "cpu"),
    Plan("tpcb-session", "tpcb-like, session mode", CASES["tpcb"], "session", ""),
    Plan("tpcb-transaction", "tpcb-like, transaction mode", CASES["tpcb"], "transaction", "tps"),
)


# ---------------------------------------------------------------------------------------------
# Sidecars
# ---------------------------------------------------------------------------------------------


def sidecar_argv(root: Path) -> list[str]:
    # `python -m proxy` from `root`: with -m the working directory comes first on sys.path, ahead
    # of the PYTHONPATH the harness sets to this checkout, so the sidecar runs root's build.
    return [
        "sh",
        "-c",
        'cd "$0" && exec "$@"',
        str(root),
        sys.executable,
        "-m",
        "proxy",
        "run",
        "-c",
        "{config}",
    ]


def data_path_of(root: Path) -> str:
    """What `proxy.compiled.select()` decides in `root` (the sidecars started there decide the same)."""
    done = subprocess.run(
        [sys.executable, "-c", "from proxy import compiled; print(compiled.select())"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() or f"unknown ({tail(done.stderr, 3).strip()})"


# --on: which of the two features the "on" sidecar has (the verdicts are the issue's for "both";
# the others tell which feature a cost comes from).
VARIANTS: dict[str, dict[str, Any]] = {
    "both": {},  # the defaults: transaction_replay true, commit_outcome marker
    "replay": {"commit_outcome": "off"},
    "marker": {"transaction_replay": False},
}
OFF: dict[str, Any] = {"transaction_replay": False, "commit_outcome": "off"}


def uses_marker(variant: str) -> bool:
    return bool(VARIANTS[variant].get("commit_outcome", "marker") == "marker")


def make_config(
    node: PgNode, mode: Mode, on: bool, pool_size: int, variant: str = "both", **failover: Any
) -> dict[str, Any]:
    features = VARIANTS[variant] if on else OFF
    overrides: dict[str, Any] = {
        # The sidecar's own defaults (check_interval 250ms, hold 30s), not the tests' fast ones.
        "failover": REMOVE,
        "metrics_listen": None,
        "log_level": "warning",
        "admin_users": [USER],
        "pool": {"mode": mode, "size": pool_size},
        # The ledger is checked (and the marker used) for the app's user and database.
        "upstream": {"probe_user": USER, "probe_database": APP_DB},
    }
    config = sidecar_config([node], overrides)
    config["auth"]["users"] = [{"name": USER, "password": PASSWORD}]
    config["failover"] = {**features, **failover}
    return config


def failover_text(on: bool, variant: str) -> str:
    features = {"transaction_replay": True, "commit_outcome": "marker", **(VARIANTS[variant] if on else OFF)}
    return ", ".join(f"{k} {str(v).lower()}" for k, v in features.items())


def start_sidecar(
    base: Path, name: str, config: dict[str, Any], root: Path, ledger: bool = False
) -> SidecarProcess:
    """`ledger`: run `pgsidecar init-db` with its config first (idempotent), so that the sidecar
    finds the commit-outcome ledger at its first check."""
    sidecar = SidecarProcess(config, base / name, argv=sidecar_argv(root), start_timeout=30)
    if ledger:
        init_db(sidecar, root)
    sidecar.start()
    CLEANUP.push(name, sidecar.stop)
    return sidecar


def init_db(sidecar: SidecarProcess, root: Path) -> None:
    """`pgsidecar init-db` for the app database, as the app user (its owner)."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "init-db", "-c", str(sidecar.config_path), "-d", APP_DB, "-U", USER],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(
            f"pgsidecar init-db failed (exit {done.returncode})\n{tail(done.stderr + done.stdout)}"
        )


def writer_outcome(sidecar: SidecarProcess) -> str | None:
    """SHOW TOPOLOGY's commit_outcome on the writer's row (admin console)."""
    with psycopg.connect(sidecar.dsn(USER, dbname="pgsidecar", connect_timeout=10), autocommit=True) as conn:
        cur = conn.execute("SHOW TOPOLOGY")
        assert cur.description is not None
        names = [d.name for d in cur.description]
        for row in cur.fetchall():
            fields = dict(zip(names, row, strict=True))
            if fields["current_writer"] in (True, "true", "t"):
                return str(fields["commit_outcome"])
    return None


def wait_outcome(sidecar: SidecarProcess, name: str, want: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    value: str | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error):
            value = writer_outcome(sidecar)
            if value == want:
                return
        time.sleep(0.2)
    raise BenchError(
        f"{name}: SHOW TOPOLOGY commit_outcome is {value!r}, expected {want!r}\n{file_tail(sidecar.log_path)}"
    )


def marker_rows(node: PgNode) -> int:
    return int(node.query(f"SELECT count(*) FROM {MARKER_TABLE}", dbname=APP_DB)[0][0])


# ---------------------------------------------------------------------------------------------
# Throughput and CPU
# ---------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One round of one plan: the run with the features on and the one with them off."""

    on: Run
    off: Run
    on_first: bool
    markers_on: int | None = None  # commit_marker rows the run added (tpcb-like only)
    markers_off: int | None = None

    @property
    def tps_ratio(self) -> float:
        return self.on.tps / self.off.tps if self.off.tps > 0 else float("nan")


@dataclass
class Result:
    plan: Plan
    pairs: list[Pair] = field(default_factory=list)
    error: str | None = None

    def median_tps(self, on: bool) -> float:
        return statistics.median((p.on if on else p.off).tps for p in self.pairs)

    def median_cpu(self, on: bool) -> float | None:
        cpus = [c.total_us for p in self.pairs if (c := (p.on if on else p.off).cpu) is not None]
        return statistics.median(cpus) if cpus else None

    @property
    def tps_ratio(self) -> float:
        return statistics.median(p.tps_ratio for p in self.pairs)

    @property
    def cpu_ratio(self) -> float | None:
        on, off = self.median_cpu(True), self.median_cpu(False)
        return on / off if on is not None and off else None

    @property
    def paired_cpu_ratios(self) -> list[float]:
        return [
            p.on.cpu.total_us / p.off.cpu.total_us
            for p in self.pairs
            if p.on.cpu is not None and p.off.cpu is not None and p.off.cpu.total_us > 0
        ]


def measured_run(sidecar: SidecarProcess, case: Case, duration: int, node: PgNode) -> tuple[Run, int | None]:
    if case.reset_tables:
        reset_tpcb_tables(node)
    markers = marker_rows(node) if case.key == "tpcb" else None
    before = cpu_sample(sidecar.pid)
    run = run_pgbench(sidecar.port, case, duration)
    run.cpu = proxy_cpu(before, cpu_sample(sidecar.pid), run.transactions)
    added = marker_rows(node) - markers if markers is not None else None
    return run, added


def throughput(
    sidecars: dict[tuple[Mode, bool], SidecarProcess], node: PgNode, duration: int, rounds: int,
    plans: Sequence[Plan],
) -> list[Result]:  # fmt: skip
    results: list[Result] = []
    on_first = True
    for plan in plans:
        result = Result(plan)
        results.append(result)
        say(f"\n== {plan.label}: {rounds} round(s) x {duration}s on and off")
        for rnd in range(1, rounds + 1):
            runs: dict[bool, tuple[Run, int | None]] = {}
            try:
                for on in (True, False) if on_first else (False, True):
                    runs[on] = measured_run(sidecars[(plan.mode, on)], plan.case, duration, node)
            except PgbenchFailed as exc:
                result.error = (
                    f"pgbench exit {exc.returncode}, features {'on' if on else 'off'}\n{tail(exc.output, 6)}"
                )
                say(f"  round {rnd}: {result.error}")
                break
            pair = Pair(runs[True][0], runs[False][0], on_first, runs[True][1], runs[False][1])
            result.pairs.append(pair)
            cpu = "".join(
                f" | {side} {r.cpu.total_us:.1f} µs/tx" if r.cpu is not None else ""
                for side, r in (("on", pair.on), ("off", pair.off))
            )
            marks = (
                f" | markers +{pair.markers_on} / +{pair.markers_off}" if pair.markers_on is not None else ""
            )
            first = "on" if on_first else "off"
            say(
                f"  round {rnd} ({first} first): on {pair.on.tps:,.0f} | off {pair.off.tps:,.0f} TPS"
                f" | {pair.tps_ratio:.2f}x{cpu}{marks}"
            )
            on_first = not on_first
    return results


def check_markers(results: Sequence[Result], marking: bool) -> list[str]:
    """The "on" runs must really have used the marker (and the "off" ones not)."""
    problems = []
    for r in results:
        for i, p in enumerate(r.pairs, 1):
            if p.markers_on is None or p.markers_off is None:
                continue
            if marking and p.markers_on < p.on.transactions:
                problems.append(
                    f"{r.plan.label} round {i}: {p.markers_on} markers for {p.on.transactions}"
                    " transactions (features on)"
                )
            if p.markers_off != 0 or (not marking and p.markers_on != 0):
                problems.append(f"{r.plan.label} round {i}: markers written with commit_outcome off")
    return problems


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@dataclass
class Memory:
    on: bool
    idle_kib: int
    at_limit_kib: int  # every client holding ~60 KiB of statements in its open transaction
    over_kib: int  # ... and 240 KiB (over replay_max_bytes)
    replays_too_large: str = ""


def statement() -> str:
    # About STATEMENT_BYTES on the wire with the extended protocol's framing; a short answer.
    fill = STATEMENT_BYTES - 96 - len("SELECT length('')")
    return "SELECT length('" + "x" * fill + "')"


def hold_transactions(conns: Sequence[psycopg.Connection[Any]], count: int) -> None:
    sql = statement()
    for conn in conns:
        for _ in range(count):
            # (Not prepared: after a few executions psycopg would send only a small Bind.)
            conn.execute(sql.encode(), prepare=False).fetchall()


def measure_memory(base: Path, node: PgNode, on: bool, root: Path, clients: int, variant: str) -> Memory:
    name = f"memory-{'on' if on else 'off'}"
    config = make_config(node, "transaction", on, clients + 10, variant, replay_max_bytes=REPLAY_MAX_BYTES)
    marking = on and uses_marker(variant)
    sidecar = start_sidecar(base, name, config, root, ledger=marking)
    try:
        if marking:
            wait_outcome(sidecar, name, "marker")

        def connect() -> psycopg.Connection[Any]:
            return psycopg.connect(sidecar.dsn(USER, dbname=APP_DB, connect_timeout=30, sslmode="disable"))

        # The same work once first, by one client, so both processes have loaded the same code and
        # grown the same buffers before the idle figure.
        with connect() as warm:
            hold_transactions([warm], STATEMENTS_AT_LIMIT + STATEMENTS_OVER)
            warm.rollback()
        time.sleep(1.0)
        idle = rss_kib(sidecar.pid)
        conns = [connect() for _ in range(clients)]
        try:
            hold_transactions(conns, STATEMENTS_AT_LIMIT)
            time.sleep(1.0)
            at_limit = rss_kib(sidecar.pid)
            hold_transactions(conns, STATEMENTS_OVER)
            time.sleep(1.0)
            over = rss_kib(sidecar.pid)
        finally:
            for conn in conns:
                with contextlib.suppress(psycopg.Error):
                    conn.rollback()
                    conn.close()
        mem = Memory(on, idle, at_limit, over)
        say(
            f"  features {'on ' if on else 'off'}: VmRSS {idle / 1024:.1f} MiB idle,"
            f" {at_limit / 1024:.1f} MiB with {clients} clients at {AT_LIMIT_KIB} KiB each,"
            f" {over / 1024:.1f} MiB at {OVER_KIB} KiB each"
        )
        return mem
    finally:
        sidecar.stop()


# ---------------------------------------------------------------------------------------------
# Instructions (callgrind)
# ---------------------------------------------------------------------------------------------

CALLGRIND = PROJECT_ROOT / "bench" / "callgrind_tx.sh"
_INSTRUCTIONS = re.compile(r"(\d+) instructions per transaction")


def callgrind_yaml(on: bool, variant: str) -> str:
    """callgrind_tx.sh's extra config: its own slow probes, plus the features of this side."""
    features = VARIANTS[variant] if on else OFF
    # (Quoted: YAML 1.1 reads a bare off as false.)
    parts = ["check_interval: 30s", "probe_timeout: 5s"] + [
        f'{k}: "{v}"' if isinstance(v, str) else f"{k}: {str(v).lower()}" for k, v in features.items()
    ]
    return "failover: {" + ", ".join(parts) + "}"


def callgrind_instructions(root: Path, mode: Mode, on: bool, variant: str) -> int:
    """Instructions per select-only transaction in the sidecar's process (bench/callgrind_tx.sh:
    deterministic, unlike CPU time on a shared machine; its own cluster, scale 1, pgbench -c 8)."""
    done = subprocess.run(
        ["bash", str(CALLGRIND), str(root), mode, "select-only", callgrind_yaml(on, variant)],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "CALLGRIND_PG_PORT": str(free_port()),
            "CALLGRIND_PROXY_PORT": str(free_port()),
        },
        timeout=1800,
        check=False,
    )
    found = _INSTRUCTIONS.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise BenchError(
            f"callgrind_tx.sh failed (exit {done.returncode})\n{tail(done.stderr + done.stdout)}"
        )
    return int(found.group(1))


Counts = dict[Mode, list[tuple[int, int]]]  # per pool mode: (on, off) per pair


def callgrind_phase(root: Path, modes: Sequence[Mode], variant: str, pairs: int) -> Counts:
    """`pairs` counts on and off per mode, alternating which goes first. Not as exact as on an
    idle machine: on this loaded one a pair's ratio moved by about 5 % from one pair to the next
    (how many requests each read of the sidecar's gets depends on timing), hence several."""
    say(f"\n== instructions per select-only transaction (callgrind, bench/callgrind_tx.sh), {pairs} pair(s)")
    counts: Counts = {}
    for mode in modes:
        for i in range(pairs):
            got: dict[bool, int] = {}
            for on in (True, False) if i % 2 == 0 else (False, True):
                got[on] = callgrind_instructions(root, mode, on, variant)
            counts.setdefault(mode, []).append((got[True], got[False]))
            say(
                f"  {mode} mode, pair {i + 1}: on {got[True]:,}, off {got[False]:,}:"
                f" {got[True] / got[False]:.3f}x"
            )
    return counts


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt_cpu(cpu: ProxyCpu | None) -> str:
    return f"{cpu.total_us:.1f}" if cpu is not None else "-"


def print_rounds(results: Sequence[Result]) -> None:
    say("\nRound by round (TPS; sidecar CPU per transaction, µs; first: which side ran first)")
    header = (
        f"{'case':<38} {'rnd':>3} {'first':>5} {'TPS on':>9} {'TPS off':>9} {'on/off':>7}"
        f" {'CPU on':>7} {'CPU off':>8} {'on/off':>7}"
    )
    say(header)
    say("-" * len(header))
    for r in results:
        for i, p in enumerate(r.pairs, 1):
            cpu_r = (
                f"{p.on.cpu.total_us / p.off.cpu.total_us:.3f}"
                if p.on.cpu is not None and p.off.cpu is not None and p.off.cpu.total_us > 0
                else "-"
            )
            say(
                f"{r.plan.label if i == 1 else '':<38} {i:>3} {'on' if p.on_first else 'off':>5}"
                f" {p.on.tps:>9,.0f} {p.off.tps:>9,.0f} {p.tps_ratio:>7.3f}"
                f" {fmt_cpu(p.on.cpu):>7} {fmt_cpu(p.off.cpu):>8} {cpu_r:>7}"
            )


def print_summary(results: Sequence[Result]) -> None:
    say("\nSummary (medians over the rounds)")
    header = (
        f"{'case':<38} {'TPS on':>9} {'TPS off':>9} {'TPS on/off':>11} {'range':>13}"
        f" {'CPU on µs':>10} {'CPU off µs':>11} {'CPU on/off':>11} {'range':>13}"
    )
    say(header)
    say("-" * len(header))
    for r in results:
        if not r.pairs:
            say(f"{r.plan.label:<38} {r.error or 'no data'}")
            continue
        ratios = [p.tps_ratio for p in r.pairs]
        cpu_on, cpu_off, cpu_r = r.median_cpu(True), r.median_cpu(False), r.cpu_ratio
        cpus = r.paired_cpu_ratios
        cpu_range = f"{min(cpus):.3f}-{max(cpus):.3f}" if cpus else "-"
        say(
            f"{r.plan.label:<38} {r.median_tps(True):>9,.0f} {r.median_tps(False):>9,.0f}"
            f" {r.tps_ratio:>10.3f}x {min(ratios):>6.3f}-{max(ratios):.3f}"
            f" {cpu_on or 0:>10.2f} {cpu_off or 0:>11.2f} {(f'{cpu_r:.3f}x' if cpu_r else '-'):>11}"
            f" {cpu_range:>13}"
        )
    say("TPS on/off: the median of the rounds' ratios (each round ran both, back to back); CPU: the")
    say("sidecar's CPU per transaction (/proc/PID/schedstat: its main thread's time on a CPU, which does the")
    say("work, over pgbench's transaction count), the median of each side's rounds, and their ratio.")


@dataclass
class Verdict:
    status: str
    label: str
    value: str
    target: str


def verdicts(
    results: Sequence[Result], mems: Sequence[Memory], clients: int, counts: Counts
) -> list[Verdict]:
    out: list[Verdict] = []
    for mode, pairs in counts.items():
        ratios = [on / off for on, off in pairs if off > 0]
        if not ratios:
            continue
        instr = statistics.median(ratios)
        on_med = statistics.median(on for on, _ in pairs)
        off_med = statistics.median(off for _, off in pairs)
        spread = f", pair by pair {min(ratios):.3f}-{max(ratios):.3f}x" if len(ratios) > 1 else ""
        out.append(
            Verdict(
                "PASS" if instr <= 1 + CPU_WITHIN else "MISS",
                f"select-only (-S), {mode} mode, instructions (callgrind)",
                f"{instr:.3f}x (median {on_med:,.0f} on, {off_med:,.0f} off per transaction{spread})",
                f"instructions per transaction on/off <= {1 + CPU_WITHIN:.2f}x",
            )
        )
    for r in results:
        if not r.plan.verdict:
            continue
        if not r.pairs or r.error is not None:
            out.append(Verdict("n/a", r.plan.label, r.error.splitlines()[0] if r.error else "no data", ""))
            continue
        if r.plan.verdict == "cpu":
            target = f"CPU per transaction on/off <= {1 + CPU_WITHIN:.2f}x (within {CPU_WITHIN:.0%})"
            value = r.cpu_ratio
            if value is None:
                out.append(Verdict("n/a", r.plan.label, "no CPU figures (/proc)", target))
                continue
            cpus = r.paired_cpu_ratios
            note = f" (round by round {min(cpus):.3f}-{max(cpus):.3f}x)" if len(cpus) > 1 else ""
            out.append(
                Verdict(
                    "PASS" if value <= 1 + CPU_WITHIN else "MISS", r.plan.label, f"{value:.3f}x{note}", target
                )
            )
        else:
            target = f"TPS on/off >= {TPCB_MIN}x"
            ratios = [p.tps_ratio for p in r.pairs]
            value = r.tps_ratio
            note = f" (round by round {min(ratios):.2f}-{max(ratios):.2f}x)" if len(ratios) > 1 else ""
            out.append(
                Verdict("PASS" if value >= TPCB_MIN else "MISS", r.plan.label, f"{value:.2f}x{note}", target)
            )
    on = next((m for m in mems if m.on), None)
    off = next((m for m in mems if not m.on), None)
    label = f"memory, {clients} clients in open transactions, transaction mode"
    bound_kib = clients * REPLAY_MAX_BYTES // 1024
    target = f"extra VmRSS on vs off <= clients x replay_max_bytes ({bound_kib} KiB)"
    if on is None or off is None:
        out.append(Verdict("skipped", label, "not measured", target))
    else:
        at = (on.at_limit_kib - on.idle_kib) - (off.at_limit_kib - off.idle_kib)
        over = (on.over_kib - on.idle_kib) - (off.over_kib - off.idle_kib)
        worst = max(at, over)
        figures = (
            f"{at} KiB with {AT_LIMIT_KIB} KiB sent per client ({at / clients:.1f} KiB each),"
            f" {over} KiB with {OVER_KIB} KiB sent ({over / clients:.1f} KiB each)"
        )
        out.append(Verdict("PASS" if worst <= bound_kib else "MISS", label, figures, target))
    return out


def print_verdicts(checks: Sequence[Verdict]) -> None:
    say("\nTargets from the issue (features on vs the same sidecar with them off)")
    for c in checks:
        say(f"  {c.status:<7} {c.label}: {c.value}")
        if c.target:
            say(f"  {'':<7} target: {c.target}")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.continuity_cost",
        description="The cost of transaction replay and commit markers: one sidecar on, one off, one run.",
    )
    p.add_argument(
        "--duration", type=int, default=None, metavar="SECONDS", help="per pgbench run (default 10)"
    )
    p.add_argument("--rounds", type=int, default=None, metavar="N", help="on/off pairs per case (default 6)")
    p.add_argument("--quick", action="store_true", help="smoke run: duration 2, rounds 2")
    p.add_argument(
        "--cases", default=",".join(pl.key for pl in PLANS),
        help=f"comma-separated subset of {','.join(pl.key for pl in PLANS)}",
    )  # fmt: skip
    p.add_argument(
        "--on", choices=list(VARIANTS), default="both",
        help="the features of the 'on' sidecar: both (default, the issue's comparison), or one of them"
        " alone, to tell which one a cost comes from",
    )  # fmt: skip
    p.add_argument(
        "--callgrind", type=int, nargs="?", const=3, default=0, metavar="PAIRS",
        help="also count instructions per select-only transaction, on and off, PAIRS times per mode"
        " (default 3; bench/callgrind_tx.sh, needs valgrind; about a minute per pair)",
    )  # fmt: skip
    p.add_argument("--skip-memory", action="store_true", help="do not measure memory")
    p.add_argument(
        "--clients", type=int, default=MEMORY_CLIENTS, help=f"memory phase clients (default {MEMORY_CLIENTS})"
    )
    p.add_argument(
        "--sidecar-root", type=Path, default=PROJECT_ROOT,
        help="the checkout whose pgsidecar runs (default: this one); e.g. one with the compiled build",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 2 if args.quick else 10
    if args.rounds is None:
        args.rounds = 2 if args.quick else 6
    if args.duration < 1 or args.rounds < 1 or args.clients < 1:
        p.error("--duration, --rounds and --clients must be at least 1")
    by_key = {pl.key: pl for pl in PLANS}
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in by_key]
    if unknown or not keys:
        p.error(f"--cases: unknown {unknown or 'empty list'}; choose from {','.join(by_key)}")
    args.plans = [by_key[k] for k in dict.fromkeys(keys)]
    args.sidecar_root = args.sidecar_root.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm("stopping PostgreSQL and the sidecars")
    try:
        root: Path = args.sidecar_root
        data_path = data_path_of(root)
        base = make_pg_dir(prefix="pgsidecar-continuity-")
        CLEANUP.push("temp dir", lambda: shutil.rmtree(base, ignore_errors=True))
        node = build_database(base)
        server_version = str(node.query("SHOW server_version")[0][0])
        say(
            f"PostgreSQL {server_version}, Python {platform.python_version()}, {os.cpu_count()} CPUs;"
            f" pgbench -c {CLIENTS} -j {THREADS}, scale {SCALE}, pool size {POOL_SIZE},"
            f" {args.duration}s x {args.rounds} round(s) per side; sidecar from {root}: {data_path}"
        )

        say("\nstarting four sidecars (session / transaction mode, features on / off) ...")
        sidecars: dict[tuple[Mode, bool], SidecarProcess] = {}
        for mode in ("session", "transaction"):
            for on in (True, False):
                name = f"sidecar-{mode}-{'on' if on else 'off'}"
                config = make_config(node, mode, on, POOL_SIZE, args.on)
                # The ledger, before any sidecar looks for it.
                sidecars[(mode, on)] = start_sidecar(base, name, config, root, ledger=not sidecars)
        for (mode, on), sidecar in sidecars.items():
            want = "marker" if on and uses_marker(args.on) else "off (config)"
            wait_outcome(sidecar, f"sidecar-{mode}-{'on' if on else 'off'}", want)
        say(
            f"  on: {failover_text(True, args.on)}; off: {failover_text(False, args.on)};"
            f" SHOW TOPOLOGY says commit_outcome {'marker' if uses_marker(args.on) else 'off (config)'} (on),"
            f" off (config) (off); {MARKER_TABLE} installed"
        )

        warm = max(1, min(args.duration, 2))
        say(f"warming up ({warm}s of -S and of tpcb-like per sidecar) ...")
        for sidecar in sidecars.values():
            for case in (CASES["select"], CASES["tpcb"]):
                try:
                    if case.reset_tables:
                        reset_tpcb_tables(node)
                    run_pgbench(sidecar.port, case, warm)
                except PgbenchFailed as exc:
                    raise BenchError(
                        f"warm-up failed (exit {exc.returncode})\n{tail(exc.output, 6)}"
                    ) from exc

        results = throughput(sidecars, node, args.duration, args.rounds, args.plans)
        for sidecar in sidecars.values():
            sidecar.stop()
        marker_problems = check_markers(results, uses_marker(args.on))

        mems: list[Memory] = []
        if not args.skip_memory:
            say(
                f"\n== memory: transaction mode, replay_max_bytes {REPLAY_MAX_BYTES // 1024} KiB,"
                f" {args.clients} clients each in an open transaction"
            )
            for on in (True, False):
                mems.append(measure_memory(base, node, on, root, args.clients, args.on))

        counts: Counts = {}
        if args.callgrind:
            modes: list[Mode] = [pl.mode for pl in args.plans if pl.case.key == "select"] or ["session"]
            counts = callgrind_phase(root, modes, args.on, args.callgrind)
        # A checkout rebuilt or edited meanwhile would have had later sidecars run other code.
        if (now := data_path_of(root)) != data_path:
            say(f"\nwarning: the data path in {root} changed during the run: now {now}")

        say(
            f"\n#### Results: features on ({failover_text(True, args.on)}) vs off,"
            f" pgbench -c {CLIENTS} -j {THREADS}, scale {SCALE},"
            f" {args.duration}s x {args.rounds} round(s); PostgreSQL {server_version}, {os.cpu_count()} CPUs;"
            f" data path: {data_path}"
        )
        print_rounds(results)
        print_summary(results)
        tpcb = [p for r in results for p in r.pairs if p.markers_on is not None]
        if tpcb:
            made = sum(p.markers_on or 0 for p in tpcb)
            txns = sum(p.on.transactions for p in tpcb)
            say(
                f"\n{MARKER_TABLE}: {made:,} rows for {txns:,} tpcb-like transactions with the features on;"
                f" {sum(p.markers_off or 0 for p in tpcb)} with them off"
            )
        for problem in marker_problems:
            say(f"  warning: {problem}")
        checks = verdicts(results, mems, args.clients, counts)
        if marker_problems:
            checks.append(
                Verdict("MISS", "commit markers", f"{len(marker_problems)} round(s) wrong, above", "")
            )
        print_verdicts(checks)
        return 0
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        CLEANUP.run()


if __name__ == "__main__":
    sys.exit(main())
