"""Transaction continuity (issue 20) with pgjdbc: work in flight at a writer crash completes, with
no SQLException and never twice, in session and in transaction pool mode.

pgjdbc speaks only the extended protocol (seen on the wire with a tee): in a transaction BEGIN
goes in the same batch as the first statement; a statement becomes a named server-side one (S_n)
at its prepareThreshold-th use (default 5): that batch has Parse S_n and its Bind, later ones Bind
S_n only. COMMIT is named at once: a connection's first COMMIT is Parse S_1 'COMMIT', Bind S_1,
Execute, Sync, every later one Bind S_1, Execute, Sync (an unnamed Parse only with
prepareThreshold=0). The cases, one pgjdbc connection each (tests/harness/JdbcContinuity.java),
all at one crash:

- between: a transaction idle between two statements; it goes on and commits after the crash.
  warm_between: the same in the connection's seventh transaction (BEGIN and INSERT named by now).
- first_answer / second_answer: the first statement of a transaction (BEGIN piggybacked) or its
  second one waits for a lock on a1 (a direct connection holds ACCESS EXCLUSIVE on the table).
  named_second_answer: the same with prepareThreshold=1, after a transaction that prepared the
  first INSERT (a Bind only now) and with the second one a Parse of a new named statement.
- read: a lone autocommit SELECT waits for the same lock.
- commit_sync: the connection's first COMMIT waits in SyncRep on a1 (synchronous_standby_names
  names no standby that exists): its commit record reached a2, so the client gets COMMIT and the
  row is there once. named_commit_sync: the seventh COMMIT (Bind S_1 only); oneshot_commit_sync:
  prepareThreshold=0 (an unnamed Parse).
- commit_hold / named_commit_hold / oneshot_commit_hold: the same COMMITs run a deferred
  constraint trigger that sleeps on a1 only: never committed there, the transaction is replayed on
  a2 and committed once.
- autocommit_sync / autocommit_hold / named_...: an autocommit INSERT in flight, the same two ways
  (an unnamed Parse); named_autocommit_sync after six earlier inserts (Bind S_n only),
  named_autocommit_hold with prepareThreshold=1 (Parse S_1 and its Bind).

Each case is checked in a test of its own against the one crash per pool mode (a module fixture):
the calls' answers, the case's rows on the promoted a2 (each once), and the sidecar's log events
for that client (commit_outcome, transaction_replayed); the counters are checked as totals. Last,
without a crash, which of pgjdbc's COMMITs and autocommit INSERTs get a commit marker at all.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from proxy.outcome import MARKER_DDL
from tests.harness import jdbc, pg
from tests.harness.load import DDL, log_events
from tests.harness.sidecar import SIDECAR_PASSWORDS, SidecarProcess, sidecar_config
from tests.integration.test_commit_outcome import _wait_outcome
from tests.integration.test_commit_outcome_autocommit import _markers
from tests.integration.test_failover import USER, crash_and_promote, metric, wait_backend

MODES = ["session", "transaction"]
WARMUP = 6  # earlier transactions (or inserts) on a named_ connection: past prepareThreshold=5
ANSWER_TIMEOUT = 60.0  # an in-flight call's answer after the crash (hold_timeout is 20 s here)


@dataclass(frozen=True)
class Expect:
    in_flight: str  # the pg_stat_activity wait on a1 that holds the call in flight
    outcome: str | None  # the commit_outcome logged for the client: committed, not_committed, None
    replayed: bool  # a transaction_replayed event for the client
    rows: tuple[str, ...]  # the case's row ids on a2 at the end, each exactly once


LOCK = "wait_event_type = 'Lock'"
SYNC = "wait_event = 'SyncRep'"
SLEEP = "wait_event = 'PgSleep'"

CASES: dict[str, Expect] = {
    "between": Expect("", None, True, ("between:1", "between:2", "between:after")),
    "warm_between": Expect("", None, True, ("warm_between:1", "warm_between:2", "warm_between:after")),
    "first_answer": Expect(LOCK, None, True, ("first_answer:1", "first_answer:after")),
    "second_answer": Expect(LOCK, None, True, ("second_answer:1", "second_answer:2", "second_answer:after")),
    "named_second_answer": Expect(
        LOCK, None, True, ("named_second_answer:1", "named_second_answer:2", "named_second_answer:after")
    ),
    "read": Expect(LOCK, None, True, ("read:after",)),
    "commit_sync": Expect(SYNC, "committed", False, ("commit_sync:1", "commit_sync:after")),
    "commit_hold": Expect(SLEEP, "not_committed", True, ("commit_hold:1", "commit_hold:after")),
    "named_commit_sync": Expect(SYNC, "committed", False, ("named_commit_sync:1", "named_commit_sync:after")),
    "oneshot_commit_sync": Expect(
        SYNC, "committed", False, ("oneshot_commit_sync:1", "oneshot_commit_sync:after")
    ),
    "oneshot_commit_hold": Expect(
        SLEEP, "not_committed", True, ("oneshot_commit_hold:1", "oneshot_commit_hold:after")
    ),
    "named_commit_hold": Expect(
        SLEEP, "not_committed", True, ("named_commit_hold:1", "named_commit_hold:after")
    ),
    "autocommit_sync": Expect(SYNC, "committed", False, ("autocommit_sync:1", "autocommit_sync:after")),
    "autocommit_hold": Expect(SLEEP, "not_committed", True, ("autocommit_hold:1", "autocommit_hold:after")),
    "named_autocommit_sync": Expect(
        SYNC, "committed", False, ("named_autocommit_sync:1", "named_autocommit_sync:after")
    ),
    "named_autocommit_hold": Expect(
        SLEEP, "not_committed", True, ("named_autocommit_hold:1", "named_autocommit_hold:after")
    ),
}
# Connections that ran earlier work first: case -> how many transactions (or autocommit inserts).
WARMED = {"named_commit_sync": WARMUP, "named_commit_hold": WARMUP, "named_autocommit_sync": WARMUP,
          "named_second_answer": 1, "warm_between": WARMUP}  # fmt: skip
# prepareThreshold of the connections that do not use the default (5).
THRESHOLD = {"named_autocommit_hold": "1", "named_second_answer": "1", "oneshot_commit_sync": "0",
             "oneshot_commit_hold": "0"}  # fmt: skip


@dataclass
class Crash:
    """One crash of a1 with every case in flight (or idle in its transaction), and what followed."""

    mode: str
    topo: pg.Topology
    sidecar: SidecarProcess
    # Per case, every call made after the crash (and the one in flight), in order: (what, answer).
    answers: dict[str, list[tuple[str, jdbc.Answer | str]]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # row id on a2 -> how many times
    named_commit: str = ""  # session mode: pg_prepared_statements' count of COMMIT, before the crash
    jdbc_output: list[str] = field(default_factory=list)

    def client_log(self, case: str) -> list[str]:
        """The sidecar's log lines about the case's client."""
        text = self.sidecar.log_text()
        conns = {e.fields["conn"] for e in log_events(text, "client_login")
                 if e.fields.get("application_name") == f"jc-{case}"}  # fmt: skip
        return [line for line in text.splitlines() if any(f"conn={c} " in line + " " for c in conns)]

    def events(self, case: str, event: str) -> list[dict[str, str]]:
        lines = set(self.client_log(case))
        return [e.fields for e in log_events(self.sidecar.log_text(), event) if e.line in lines]

    def report(self, case: str) -> str:
        calls = "\n".join(f"  {what}: {answer}" for what, answer in self.answers.get(case, []))
        log = "\n".join(f"  {line}" for line in self.client_log(case))
        return (
            f"[{self.mode} mode, connection jc-{case}] calls after the crash:\n{calls}\n"
            f"sidecar log for this client ({self.sidecar.log_path}):\n{log}"
        )


def _tables(a1: pg.PgNode) -> dict[str, str]:
    """plain; lock (locked on a1 before the crash); hold (COMMITs of inserts there sleep on a1)."""
    suffix = uuid.uuid4().hex[:8]
    tables = {kind: f"jc_{kind}_{suffix}" for kind in ("plain", "lock", "hold")}
    for name in tables.values():
        a1.execute(DDL.format(table=name) + f"; GRANT ALL ON {name} TO {USER}", dbname=pg.APP_DB)
    hold = tables["hold"]
    a1.execute(
        f"""
        CREATE FUNCTION {hold}_fn() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('port')::int = {a1.port} THEN PERFORM pg_sleep(60); END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER {hold}_trg AFTER INSERT ON {hold}
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {hold}_fn();
        """,
        dbname=pg.APP_DB,
    )
    return tables


def _play(crash: Crash, calls: jdbc.JdbcCalls, tables: dict[str, str]) -> None:
    topo, sidecar = crash.topo, crash.sidecar
    insert = {kind: f"INSERT INTO {name} (id, client) VALUES (?, ?)" for kind, name in tables.items()}

    def run(case: str, op: str, *args: str) -> jdbc.Answer:
        answer = calls.run(case, op, *args, timeout=jdbc.TIMEOUT)
        assert answer.sqlstate is None, f"before the crash, jc-{case} {op} {args}: {answer}"
        return answer

    def put(case: str, kind: str, row: str) -> tuple[str, str, str, str]:
        return ("update", insert[kind], row, "jdbc")

    for case in CASES:
        autocommit = case in ("read",) or "autocommit" in case
        threshold = THRESHOLD.get(case, "5")
        run(case, "open", str(autocommit).lower(), threshold, f"jc-{case}")
    # Before the crash: what each case has done by then.
    for case, rounds in WARMED.items():
        for k in range(rounds):
            run(case, *put(case, "plain", f"{case}:w{k}"))
            if "autocommit" not in case:
                if case == "named_commit_sync" and k == rounds - 1:
                    count = run(
                        case,
                        "query",
                        "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'COMMIT'",
                    )
                    crash.named_commit = count.value
                run(case, "commit")
    for case in ("between", "warm_between"):
        run(case, *put(case, "plain", f"{case}:1"))
        rows = run(case, "query", f"SELECT id FROM {tables['plain']} WHERE id LIKE '{case}:_'").value
        assert rows == f"{case}:1", rows
    run("second_answer", *put("second_answer", "plain", "second_answer:1"))
    run("named_second_answer", *put("named_second_answer", "plain", "named_second_answer:1"))
    run("commit_sync", *put("commit_sync", "plain", "commit_sync:1"))
    run("named_commit_sync", *put("named_commit_sync", "plain", "named_commit_sync:1"))
    run("commit_hold", *put("commit_hold", "hold", "commit_hold:1"))
    run("oneshot_commit_sync", *put("oneshot_commit_sync", "plain", "oneshot_commit_sync:1"))
    run("oneshot_commit_hold", *put("oneshot_commit_hold", "hold", "oneshot_commit_hold:1"))
    run("named_commit_hold", *put("named_commit_hold", "hold", "named_commit_hold:1"))
    topo.a1.wait_caught_up([topo.a2])  # the warm-up rows are on a2

    # In flight at the crash.
    locker = psycopg.connect(topo.a1.dsn(dbname=pg.APP_DB), autocommit=False)
    locker.execute(f"LOCK TABLE {tables['lock']} IN ACCESS EXCLUSIVE MODE")
    pg.set_sync_standbys(topo.a1, ["nobody"])  # every COMMIT on a1 waits, after streaming to a2
    flying: dict[str, Future[jdbc.Answer]] = {
        "first_answer": calls.call("first_answer", *put("first_answer", "lock", "first_answer:1")),
        "second_answer": calls.call("second_answer", *put("second_answer", "lock", "second_answer:2")),
        "named_second_answer": calls.call(
            "named_second_answer", *put("named_second_answer", "lock", "named_second_answer:2")
        ),
        "read": calls.call("read", "query", f"SELECT count(*) FROM {tables['lock']} WHERE id LIKE 'read:%'"),
        "commit_sync": calls.call("commit_sync", "commit"),
        "named_commit_sync": calls.call("named_commit_sync", "commit"),
        "commit_hold": calls.call("commit_hold", "commit"),
        "oneshot_commit_sync": calls.call("oneshot_commit_sync", "commit"),
        "oneshot_commit_hold": calls.call("oneshot_commit_hold", "commit"),
        "named_commit_hold": calls.call("named_commit_hold", "commit"),
    }
    for case in ("autocommit_sync", "named_autocommit_sync"):
        flying[case] = calls.call(case, *put(case, "plain", f"{case}:1"))
    for case in ("autocommit_hold", "named_autocommit_hold"):
        flying[case] = calls.call(case, *put(case, "hold", f"{case}:1"))
    for case, future in flying.items():
        condition = f"application_name = 'jc-{case}' AND {CASES[case].in_flight}"
        try:
            wait_backend(topo.a1, condition, timeout=30)
        except AssertionError:
            done = future.result(0) if future.done() else "no answer yet"
            raise AssertionError(
                f"jc-{case} not in flight ({condition}): {done}\n{sidecar.log_tail()}"
            ) from None
    topo.a1.wait_caught_up([topo.a2])  # the commit records of the SyncRep waiters are on a2
    crash_and_promote(topo, sidecar, pause=0.3)
    with contextlib.suppress(psycopg.Error):
        locker.close()

    # After the crash: the in-flight answers, then each connection goes on.
    later: dict[str, list[tuple[str, Future[jdbc.Answer]]]] = {case: [] for case in CASES}
    for case, future in flying.items():
        later[case].append(("in flight", future))

    def then(case: str, what: str, *call: str) -> None:
        later[case].append((what, calls.call(case, *call)))

    for case in ("between", "warm_between"):
        then(case, "INSERT :2", *put(case, "plain", f"{case}:2"))
        then(case, "COMMIT", "commit")
    for case in ("first_answer", "second_answer", "named_second_answer"):
        then(case, "COMMIT", "commit")
    for case in CASES:
        then(case, "INSERT :after", *put(case, "plain", f"{case}:after"))
        if not (case == "read" or "autocommit" in case):
            then(case, "COMMIT after", "commit")
    for case, steps in later.items():
        crash.answers[case] = []
        for what, future in steps:
            try:
                answer: jdbc.Answer | str = future.result(ANSWER_TIMEOUT)
            except Exception as exc:  # (no answer: recorded as such, the test says so)
                answer = f"no answer: {exc!r}"
            crash.answers[case].append((what, answer))
    ids = " UNION ALL ".join(f"SELECT id FROM {name}" for name in tables.values())
    crash.rows = {
        str(r): int(n)
        for r, n in topo.a2.query(f"SELECT id, count(*) FROM ({ids}) x GROUP BY id", dbname=pg.APP_DB)
    }


@pytest.fixture(scope="module", params=MODES)
def crash(
    request: pytest.FixtureRequest, pg_base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Crash]:
    mode = str(request.param)
    topo = pg.make_topology(pg_base_dir)
    sidecar: SidecarProcess | None = None
    try:
        tables = _tables(topo.a1)
        topo.a1.execute(MARKER_DDL, dbname=pg.APP_DB)
        topo.a1.wait_caught_up([topo.a2])
        config = sidecar_config(topo, {
            "admin_users": [USER],
            "pool": {"mode": mode},
            "upstream": {"probe_user": USER, "probe_database": pg.APP_DB},
            "failover": {"hold_timeout": "20s"},  # a loaded machine: a dozen clients resolved at once
        })  # fmt: skip
        sidecar = SidecarProcess(config, tmp_path_factory.mktemp(f"jdbc-continuity-{mode}")).start()
        assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"
        result = Crash(mode, topo, sidecar)
        with jdbc.JdbcCalls(sidecar.host, sidecar.port, pg.APP_DB, USER, SIDECAR_PASSWORDS[USER]) as calls:
            _play(result, calls, tables)
        result.jdbc_output = calls.output
        yield result
    finally:
        if sidecar is not None:
            sidecar.stop()
        topo.stop_all()
        shutil.rmtree(topo.base_dir, ignore_errors=True)


def _check(crash: Crash, case: str) -> None:
    expect = CASES[case]
    problems = [f"{what}: {answer}" for what, answer in crash.answers[case]
                if not isinstance(answer, jdbc.Answer) or answer.sqlstate is not None]  # fmt: skip
    rows = {row: n for row, n in crash.rows.items() if row.split(":")[0] == case and ":w" not in row}
    if rows != dict.fromkeys(expect.rows, 1):
        problems.append(f"rows on a2 {rows}, want each of {list(expect.rows)} once")
    outcomes = [e.get("outcome") for e in crash.events(case, "commit_outcome")]
    if outcomes != ([expect.outcome] if expect.outcome else []):
        problems.append(
            f"commit_outcome events {outcomes}, want {[expect.outcome] if expect.outcome else []}"
        )
    replays = len(crash.events(case, "transaction_replayed"))
    if replays != int(expect.replayed):
        problems.append(f"transaction_replayed events: {replays}, want {int(expect.replayed)}")
    assert not problems, "; ".join(problems) + "\n" + crash.report(case)


def _check_answer(crash: Crash, case: str, what: str, value: str) -> None:
    got = dict(crash.answers[case]).get(what)
    if isinstance(got, jdbc.Answer) and got.sqlstate is None:
        assert got.value == value, f"{what}: {got}, want {value!r}\n{crash.report(case)}"


# ---------------------------------------------------------------------------------------------
# (a) between statements of an open transaction


def test_transaction_idle_between_statements_goes_on(crash: Crash) -> None:
    _check(crash, "between")


def test_transaction_idle_between_statements_after_six_others_goes_on(crash: Crash) -> None:
    """The seventh transaction of the connection: its BEGIN and INSERT are named statements by
    now (Bind S_2, Bind S_3, Sync: no Parse), as in any pgjdbc application past its warm-up."""
    _check(crash, "warm_between")


# ---------------------------------------------------------------------------------------------
# (b) before the first answer of a statement in an open transaction


def test_first_statement_in_flight_with_its_piggybacked_begin_is_replayed(crash: Crash) -> None:
    _check_answer(crash, "first_answer", "in flight", "1")
    _check(crash, "first_answer")


def test_second_statement_in_flight_is_replayed_with_the_first(crash: Crash) -> None:
    _check_answer(crash, "second_answer", "in flight", "1")
    _check(crash, "second_answer")


def test_second_statement_in_flight_after_a_named_one_is_replayed(crash: Crash) -> None:
    """prepareThreshold=1: the transaction's first INSERT is only a Bind of a statement prepared
    by an earlier transaction, the second one a Parse of a new named statement."""
    _check_answer(crash, "named_second_answer", "in flight", "1")
    _check(crash, "named_second_answer")


def test_lone_read_in_flight_is_re_run(crash: Crash) -> None:
    _check_answer(crash, "read", "in flight", "0")
    _check(crash, "read")


# ---------------------------------------------------------------------------------------------
# (c) COMMIT in flight


def test_first_commit_in_flight_that_reached_the_sync_standby_succeeds(
    crash: Crash, request: pytest.FixtureRequest
) -> None:
    """Parse S_1 'COMMIT', Bind S_1, Execute, Sync: the connection's first COMMIT."""
    _check(crash, "commit_sync")


def test_first_commit_in_flight_that_never_committed_is_replayed_once(
    crash: Crash, request: pytest.FixtureRequest
) -> None:
    """Parse S_1 'COMMIT', Bind S_1, Execute, Sync: the connection's first COMMIT."""
    _check(crash, "commit_hold")


def test_unnamed_commit_in_flight_that_reached_the_sync_standby_succeeds(crash: Crash) -> None:
    """prepareThreshold=0: Parse (unnamed) 'COMMIT', Bind, Execute, Sync."""
    _check(crash, "oneshot_commit_sync")


def test_unnamed_commit_in_flight_that_never_committed_is_replayed_once(crash: Crash) -> None:
    """prepareThreshold=0: Parse (unnamed) 'COMMIT', Bind, Execute, Sync."""
    _check(crash, "oneshot_commit_hold")


def test_named_commit_in_flight_that_reached_the_sync_standby_succeeds(crash: Crash) -> None:
    """Bind S_1, Execute, Sync: the seventh COMMIT of the connection."""
    if crash.mode == "session":  # (the connection's own server: COMMIT is a prepared statement there)
        assert crash.named_commit == "1", "COMMIT is not a prepared statement on the connection's server"
    _check(crash, "named_commit_sync")


def test_named_commit_in_flight_that_never_committed_is_replayed_once(crash: Crash) -> None:
    """Bind S_1, Execute, Sync: the seventh COMMIT of the connection."""
    _check(crash, "named_commit_hold")


# ---------------------------------------------------------------------------------------------
# (d) an autocommit INSERT in flight


def test_autocommit_insert_in_flight_that_reached_the_sync_standby_succeeds(crash: Crash) -> None:
    """Parse (unnamed), Bind, Describe, Execute, Sync: the INSERT's first use."""
    _check_answer(crash, "autocommit_sync", "in flight", "1")
    _check(crash, "autocommit_sync")


def test_autocommit_insert_in_flight_that_never_committed_is_replayed_once(crash: Crash) -> None:
    """Parse (unnamed), Bind, Describe, Execute, Sync: the INSERT's first use."""
    _check_answer(crash, "autocommit_hold", "in flight", "1")
    _check(crash, "autocommit_hold")


def test_named_autocommit_insert_in_flight_that_reached_the_sync_standby_succeeds(crash: Crash) -> None:
    """Bind S_n, Execute, Sync: the INSERT's seventh use."""
    _check_answer(crash, "named_autocommit_sync", "in flight", "1")
    _check(crash, "named_autocommit_sync")


def test_named_autocommit_insert_in_flight_that_never_committed_is_replayed_once(
    crash: Crash, request: pytest.FixtureRequest
) -> None:
    """prepareThreshold=1: Parse S_1, Bind S_1, Describe, Execute, Sync."""
    _check_answer(crash, "named_autocommit_hold", "in flight", "1")
    _check(crash, "named_autocommit_hold")


# ---------------------------------------------------------------------------------------------
# Totals


def test_warm_up_rows_are_there_once(crash: Crash) -> None:
    warm = {row: n for row, n in crash.rows.items() if ":w" in row}
    want = {f"{case}:w{k}": 1 for case, rounds in WARMED.items() for k in range(rounds)}
    assert warm == want


def test_the_counters_add_up(crash: Crash) -> None:
    """pgsidecar_commit_outcomes_total and pgsidecar_transaction_replays_total, as the psycopg
    tests read them, against what every case expects."""
    sidecar = crash.sidecar
    want_committed = sum(e.outcome == "committed" for e in CASES.values())
    want_not = sum(e.outcome == "not_committed" for e in CASES.values())
    want_replays = sum(e.replayed for e in CASES.values())
    got = {
        "committed": metric(sidecar, "pgsidecar_commit_outcomes_total", outcome="committed"),
        "replayed": metric(sidecar, "pgsidecar_commit_outcomes_total", outcome="replayed"),
        "unknown": metric(sidecar, "pgsidecar_commit_outcomes_total", outcome="unknown"),
        "replays replayed": metric(sidecar, "pgsidecar_transaction_replays_total", result="replayed"),
        "replays diverged": metric(sidecar, "pgsidecar_transaction_replays_total", result="diverged"),
        "replays not_replayable": metric(
            sidecar, "pgsidecar_transaction_replays_total", result="not_replayable"
        ),
    }
    want = {
        "committed": want_committed,
        "replayed": want_not,
        "unknown": 0,
        "replays replayed": want_replays,
        "replays diverged": 0,
        "replays not_replayable": 0,
    }
    assert got == want


# ---------------------------------------------------------------------------------------------
# What the ledger marks of pgjdbc's traffic (no crash: the shared topology, a database of its own)


@pytest.fixture
def ledger_db(shared_topology: pg.Topology) -> Iterator[str]:
    name = f"jc_marks_{uuid.uuid4().hex[:10]}"
    a1 = shared_topology.a1
    a1.execute(f"CREATE DATABASE {name} OWNER {USER}")
    a1.execute(MARKER_DDL, dbname=name)
    a1.execute(DDL.format(table="t") + f"; GRANT ALL ON t TO {USER}", dbname=name)
    try:
        yield name
    finally:
        a1.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.mark.parametrize("mode", MODES)
def test_every_shape_of_pgjdbc_commit_and_autocommit_insert_is_marked(
    shared_topology: pg.Topology,
    sidecar_factory: Callable[..., SidecarProcess],
    ledger_db: str,
    mode: str,
) -> None:
    """Each COMMIT and each autocommit INSERT pgjdbc sends writes one marker, whatever shape pgjdbc
    gives it on the wire (seen with a tee): its first COMMIT on a connection is Parse S_1 'COMMIT',
    Bind S_1, Execute, Sync (transaction commands are named at once), the next ones Bind S_1
    only, with prepareThreshold=0 an unnamed Parse; an INSERT is an unnamed Parse for its first
    four uses, then Parse S_n with its Bind in the same batch, then Bind S_n only (at once with
    prepareThreshold=1). In transaction mode COMMIT #2 and INSERT #6 may run on a server that has
    not prepared their statement yet. An unmarked one gets 08007 (or worse) when cut."""
    a1 = shared_topology.a1
    config = {
        "admin_users": [USER],
        "pool": {"mode": mode},
        "upstream": {"probe_user": USER, "probe_database": ledger_db},
    }
    sidecar = sidecar_factory(config)
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"
    insert = "INSERT INTO t (id, client) VALUES (?, ?)"
    unmarked: list[str] = []
    with jdbc.JdbcCalls(sidecar.host, sidecar.port, ledger_db, USER, SIDECAR_PASSWORDS[USER]) as calls:

        def marked(conn: str, what: str, *call: str) -> None:
            before = _markers(a1, ledger_db)
            answer = calls.run(conn, *call)
            assert answer.sqlstate is None, f"{conn} {what}: {answer}"
            if _markers(a1, ledger_db) != before + 1:
                unmarked.append(f"{conn} {what}")

        def hold_a_server(conn: str) -> None:
            """Transaction mode: a transaction left open holds a server (the one just released,
            if the pool hands that one out first), so the next transaction of the connection
            under test may run on a server where its named statements are not prepared yet."""
            assert calls.run(conn, "query", "SELECT 1").sqlstate is None

        conns = (("tx", "false", "5"), ("tx0", "false", "0"), ("ac", "true", "5"), ("ac1", "true", "1"),
                 ("hold1", "false", "5"), ("hold2", "false", "5"))  # fmt: skip
        for conn, autocommit, threshold in conns:
            assert calls.run(conn, "open", autocommit, threshold, f"jc-{conn}").sqlstate is None
        for k in range(7):
            if k == 1:
                hold_a_server("hold1")
            assert calls.run("tx", "update", insert, f"tx{k}", "jdbc").sqlstate is None
            marked("tx", f"COMMIT #{k + 1} (prepareThreshold=5)", "commit")
        for k in range(2):
            assert calls.run("tx0", "update", insert, f"tx0-{k}", "jdbc").sqlstate is None
            marked("tx0", f"COMMIT #{k + 1} (prepareThreshold=0)", "commit")
        for k in range(7):
            if k == 5:
                hold_a_server("hold2")
            what = f"autocommit INSERT #{k + 1} (prepareThreshold=5)"
            marked("ac", what, "update", insert, f"ac{k}", "jdbc")
        for k in range(2):
            what = f"autocommit INSERT #{k + 1} (prepareThreshold=1)"
            marked("ac1", what, "update", insert, f"ac1-{k}", "jdbc")
    assert not unmarked, f"{mode} mode: not marked: {unmarked}"
