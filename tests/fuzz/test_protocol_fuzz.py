"""Protocol fuzzing: recorded client streams, mutated, against a running sidecar, while a
well-behaved client beside them checks every answer it gets.

Four runs: after login in session mode and in transaction mode, the login phase (SCRAM, session
mode; trust, transaction mode), and after login during a full outage (writer stopped, SQLite
spool). Each starts with a few floods (inputs only an unbounded buffer would swallow), then feeds
Hypothesis-generated inputs. It fails on:

- a fuzz connection neither answered nor closed with an ErrorResponse (session phase: the probe
  sent after a complete input; login phase: by client_login_timeout);
- any wrong answer, error or unanswered request of the well-behaved client (``Bystander``);
- "Traceback", "Fatal error on transport", "Exception" or ``client_internal_error`` in the
  sidecar's log;
- sidecar RSS above its baseline + 64 MiB (after a flood, connection still open, or at any check);
- a server connection left idle in a transaction, or a sidecar that no longer accepts clients.

`make test` runs a fixed number of derandomized Hypothesis examples per mode (the same inputs
every run, however fast the machine; about 20 s a mode here); `make fuzz` (FUZZ_SECONDS=1800)
spreads FUZZ_SECONDS over the four modes with random seeds.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demo_app.cluster import APP_DB, PgNode, Topology
from tests.fuzz import driver
from tests.fuzz.mutations import FuzzInput, fuzz_inputs
from tests.harness.sidecar import SidecarProcess, sidecar_config
from tests.harness.streams import load_streams

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "0"))  # > 0: `make fuzz`, random seeds
MODES = 4
# `make fuzz`: the time per mode. `make test`: a fixed number of examples per mode, never cut
# short by the clock (the same inputs on a slow machine as on a fast one); the outage mode's
# examples each wait out hold_timeout, so it gets fewer.
BUDGET = FUZZ_SECONDS / MODES if FUZZ_SECONDS > 0 else 0.0
MAX_EXAMPLES = 10**9 if FUZZ_SECONDS > 0 else int(os.environ.get("FUZZ_EXAMPLES", "300"))
OUTAGE_EXAMPLES = 10**9 if FUZZ_SECONDS > 0 else int(os.environ.get("FUZZ_OUTAGE_EXAMPLES", "100"))
LOGIN_TIMEOUT = 1.0
TIMEOUT = int(BUDGET * 1.5) + 240

pytestmark = pytest.mark.timeout(TIMEOUT)

STREAMS = load_streams()


@dataclass
class Findings:
    """Failures by kind, each with the smallest input that showed it (the report's reproducer)."""

    examples: int = 0
    kinds: dict[str, tuple[int, str]] = field(default_factory=dict)  # kind -> (count, detail)
    sizes: dict[str, int] = field(default_factory=dict)  # kind -> size of the input kept

    def add(self, kind: str, detail: str, size: int = 10**9) -> None:
        count, best = self.kinds.get(kind, (0, ""))
        if not best or size < self.sizes[kind]:
            best = detail
            self.sizes[kind] = size
        self.kinds[kind] = (count + 1, best)

    def report(self) -> str:
        lines = [f"{len(self.kinds)} kinds of failure in {self.examples} examples:"]
        for kind, (count, detail) in self.kinds.items():
            lines.append(f"- {kind} (x{count}); smallest: {detail[:1500]}")
        return "\n".join(lines)


def _kind(text: str) -> str:
    """What kind of failure `text` is, without the values that differ from one to the next."""
    if " answered " in text:
        return text.split(" answered ")[0] + " answered wrongly"
    return text.split(";")[0].split(" within")[0].split(", expected")[0][:120]


def run_fuzz(
    check: Callable[[FuzzInput], None], strategy: st.SearchStrategy[FuzzInput], examples: int = MAX_EXAMPLES
) -> int:
    """Feed `check` `examples` inputs (`make fuzz`: for BUDGET seconds); returns how many it got."""
    stop_at = time.monotonic() + BUDGET
    count = 0

    @settings(
        max_examples=min(examples, 5000),
        derandomize=FUZZ_SECONDS <= 0,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def one(fi: FuzzInput) -> None:
        nonlocal count
        if FUZZ_SECONDS > 0 and time.monotonic() > stop_at:
            return
        count += 1
        check(fi)

    one()
    while FUZZ_SECONDS > 0 and time.monotonic() < stop_at:
        one()  # a new random seed each round
    return count


def _watch_and_bystander(
    findings: Findings, watch: driver.SidecarWatch, bystander: driver.Bystander, last: list[str]
) -> None:
    for kind, detail in watch.problems():
        findings.add(kind, f"{detail}\n  after: {last[-1:]}", len(last[-1]) if last else 0)
    for failure in bystander.failures[bystander.reported :]:
        findings.add("bystander: " + _kind(failure.split(": ", 1)[-1]), f"{failure}\n  after: {last[-3:]}")
    bystander.reported = len(bystander.failures)
    if (hung := bystander.hung()) is not None:
        findings.add("bystander: request unanswered", f"{hung}\n  after: {last[-3:]}")


def _finish(findings: Findings, sidecar: SidecarProcess, writer: PgNode | None, bystander: driver.Bystander,
            watch: driver.SidecarWatch, last: list[str]) -> None:  # fmt: skip
    bystander.stop()
    _watch_and_bystander(findings, watch, bystander, last)
    if bystander.answers == 0:
        findings.add("bystander: no answer at all", str(bystander.failures[:3]))
    try:
        with psycopg.connect(sidecar.dsn(), connect_timeout=10) as conn:
            if conn.execute("SELECT 41 + 1").fetchone() != (42,):
                findings.add("sidecar answers wrongly at the end", "")
    except psycopg.Error as exc:
        findings.add("sidecar no longer accepts clients", str(exc))
    if writer is not None:
        idle_in_txn = _idle_in_transaction(writer)
        if idle_in_txn:
            findings.add("server connection left idle in transaction", str(idle_in_txn))
    print(f"\nfuzz: {findings.examples} examples, bystander {bystander.answers} iterations, "
          f"sidecar RSS baseline {watch.baseline:.0f} MiB peak {watch.peak:.0f} MiB")  # fmt: skip
    assert not findings.kinds, findings.report()


def _idle_in_transaction(writer: PgNode, timeout: float = 10.0) -> list[Any]:
    """Backends of the fuzz user still idle in a transaction (polled: closing takes a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = writer.query(
            "SELECT pid, state, left(query, 80) FROM pg_stat_activity "
            "WHERE usename = %s AND state LIKE 'idle in transaction%%'",
            (driver.USER,),
        )
        if not rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _bystander_table(writer: PgNode) -> str:
    table = f"fuzz_bystander_{uuid.uuid4().hex[:8]}"
    writer.execute(f"CREATE TABLE {table} (id text PRIMARY KEY); GRANT ALL ON {table} TO {driver.USER}",
                   dbname=APP_DB)  # fmt: skip
    return table


def _config(hosts: Topology, mode: str, auth: str = "trust", **extra: Any) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "auth": {"method": auth},
        "pool": {"mode": mode, "size": 4 if mode == "transaction" else 20},
        "limits": {"max_message_size": "1MiB", "client_login_timeout": f"{LOGIN_TIMEOUT}s"},
    }
    return sidecar_config(hosts, overrides, **extra)


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], SidecarProcess]]:
    started: list[SidecarProcess] = []

    def start(config: dict[str, Any]) -> SidecarProcess:
        proc = SidecarProcess(config, tmp_path / f"sidecar-{len(started)}")
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def _flood_findings(findings: Findings, sidecar: SidecarProcess, watch: driver.SidecarWatch,
                    logged_in: bool) -> None:  # fmt: skip
    authenticates = sidecar.config["auth"]["method"] != "trust"
    for result in driver.floods(sidecar, logged_in, authenticates):
        print(f"flood {result.name}: {result.sent / driver.MIB:.1f} MiB accepted, "
              f"RSS {result.rss_mib:.0f} MiB, answered {result.answered}")  # fmt: skip
        if result.refused is False:
            detail = f"{result.name}: {result.answered}, {result.sent / driver.MIB:.0f} MiB accepted"
            findings.add("oversize password message before authentication not refused", detail)
        if result.rss_mib > watch.bound:
            findings.add(f"flood '{result.name}' buffered without bound",
                         f"{result.sent / driver.MIB:.0f} MiB accepted, sidecar RSS {result.rss_mib:.0f} MiB "
                         f"(bound {watch.bound:.0f})")  # fmt: skip


def _session_run(sidecar: SidecarProcess, writer: PgNode, table: str, spooling: bool = False) -> None:
    findings = Findings()
    watch = driver.SidecarWatch(sidecar)
    bystander = driver.Bystander(sidecar.dsn(), table, spooling=spooling).start()
    last: list[str] = []
    _flood_findings(findings, sidecar, watch, logged_in=True)

    def check(fi: FuzzInput) -> None:
        findings.examples += 1
        last.append(fi.describe()[:400])
        try:
            failure = driver.run_session_input(sidecar.port, fi, timeout=5.0)
        except (AssertionError, OSError) as exc:
            failure = f"fuzz connection could not log in: {exc}"
        if failure is not None:
            findings.add(_kind(failure), f"{failure}\n  input: {fi.describe()}", len(fi.data))
        _watch_and_bystander(findings, watch, bystander, last)

    run_fuzz(check, fuzz_inputs(STREAMS, "session"))
    _finish(findings, sidecar, writer, bystander, watch, last)


def test_fuzz_session_mode_after_login(shared_topology, start_sidecar):
    sidecar = start_sidecar(_config(shared_topology, "session"))
    _session_run(sidecar, shared_topology.a1, _bystander_table(shared_topology.a1))


def test_fuzz_transaction_mode_after_login(shared_topology, start_sidecar):
    sidecar = start_sidecar(_config(shared_topology, "transaction"))
    _session_run(sidecar, shared_topology.a1, _bystander_table(shared_topology.a1))


def test_fuzz_login_phase(shared_topology, start_sidecar):
    """SCRAM (session mode) and trust (transaction mode) sidecars, mutated logins alternating."""
    scram = start_sidecar(_config(shared_topology, "session", auth="scram-sha-256"))
    trust = start_sidecar(_config(shared_topology, "transaction"))
    findings = Findings()
    watches = {s.port: driver.SidecarWatch(s) for s in (scram, trust)}
    bystander = driver.Bystander(scram.dsn(), _bystander_table(shared_topology.a1)).start()
    last: list[str] = []
    for s in (scram, trust):
        _flood_findings(findings, s, watches[s.port], logged_in=False)
    pending: list[tuple[Future[str | None], FuzzInput]] = []
    turn = [0]

    def collect(block: bool) -> None:
        for fut, fi in list(pending):
            if block or fut.done():
                pending.remove((fut, fi))
                if (failure := fut.result()) is not None:
                    findings.add(_kind(failure), f"{failure}\n  input: {fi.describe()}", len(fi.data))

    with ThreadPoolExecutor(16, thread_name_prefix="fuzz-login") as pool:

        def check(fi: FuzzInput) -> None:
            findings.examples += 1
            last.append(fi.describe()[:400])
            turn[0] += 1
            target = scram if turn[0] % 2 else trust
            # Judged in the background: a login left waiting costs client_login_timeout.
            pending.append((pool.submit(driver.run_login_input, target.port, fi, LOGIN_TIMEOUT + 5.0), fi))
            collect(block=False)
            for s in (scram, trust):
                _watch_and_bystander(findings, watches[s.port], bystander, last)

        run_fuzz(check, fuzz_inputs(STREAMS, "login"))
        collect(block=True)
    for s in (trust,):
        _watch_and_bystander(findings, watches[s.port], bystander, last)
    _finish(findings, scram, shared_topology.a1, bystander, watches[scram.port], last)


def test_fuzz_during_outage(fresh_topology, start_sidecar, tmp_path):
    """Writer stopped, SQLite spool: held and spooled requests under fuzzing; afterwards every
    acknowledged (spooled) bystander write is replayed exactly once."""
    topo = fresh_topology
    table = _bystander_table(topo.a1)
    sidecar = start_sidecar(_config(
        topo, "session",
        spool={"backend": "sqlite", "path": str(tmp_path / "spool.db")},
        failover={"check_interval": "100ms", "hold_timeout": "100ms"},
    ))  # fmt: skip
    # The sidecar stands in for a (user, database) during an outage only if it saw it while up:
    # its front door is filled in the background after the first login, and must be done before
    # the writer goes (else a login during the outage is refused: a race this test lost once).
    offset = sidecar.log_offset()
    with psycopg.connect(sidecar.dsn(), connect_timeout=10) as conn:
        conn.execute("SELECT 1")
    sidecar.wait_for_log("event=frontdoor_filled", timeout=30, since=offset)
    offset = sidecar.log_offset()
    topo.a1.stop("fast")
    sidecar.wait_for_log("state=outage", timeout=30, since=offset)
    findings = Findings()
    watch = driver.SidecarWatch(sidecar)
    bystander = driver.Bystander(sidecar.dsn(), table, spooling=True).start()
    last: list[str] = []
    _flood_findings(findings, sidecar, watch, logged_in=True)

    def check(fi: FuzzInput) -> None:
        findings.examples += 1
        last.append(fi.describe()[:400])
        try:
            failure = driver.run_session_input(sidecar.port, fi, timeout=8.0, outage=True)
        except (AssertionError, OSError) as exc:
            failure = f"fuzz connection could not log in: {exc}"
        if failure is not None:
            findings.add(_kind(failure), f"{failure}\n  input: {fi.describe()}", len(fi.data))
        _watch_and_bystander(findings, watch, bystander, last)

    run_fuzz(check, fuzz_inputs(STREAMS, "session"), OUTAGE_EXAMPLES)
    bystander.stop()
    offset = sidecar.log_offset()
    topo.a1.start()
    sidecar.wait_for_log("state=up", timeout=30, since=offset)
    _replayed_once(findings, topo.a1, table, bystander.acked)
    _finish(findings, sidecar, None, bystander, watch, last)


def _replayed_once(
    findings: Findings, writer: PgNode, table: str, acked: list[str], timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = dict(writer.query(f"SELECT id, count(*) FROM {table} GROUP BY id", dbname=APP_DB))
        missing = [i for i in acked if i not in rows]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    if missing:
        findings.add("acknowledged spooled write missing after replay",
                     f"{len(missing)} of {len(acked)}: {missing[:5]}")  # fmt: skip
    twice = {i: n for i, n in rows.items() if n > 1}
    if twice:
        findings.add("spooled write replayed twice", str(twice))


def test_recorded_streams_cover_the_drivers():
    """The committed fixtures (tests/fuzz/record.py) hold every driver's stream, and each splits
    into a login and a session phase."""
    clients = {s.client for s in STREAMS}
    assert {"psql", "psycopg_simple", "psycopg_extended", "psycopg_pipeline", "asyncpg", "pgjdbc"} <= clients
    for stream in STREAMS:
        login, session = stream.split()
        assert login and session, stream.name

