"""Transaction continuity across a writer crash (issue 20), with real clusters and real clients:
reads in flight re-run, open transactions replayed on the promoted standby and verified against
what the client already got, 40001 when the replay cannot be made or differs.

Each test builds its own a1/a2/b1 topology (``fresh_topology``), crashes a1 (``pg_ctl stop -m
immediate``) at a chosen point of a transaction, held there deterministically (a lock the statement
waits for, or an idle transaction), promotes a2, and asserts what the client saw, the rows on the
new writer (exactly once) and the ``pgsidecar_transaction_replays_total`` counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import psycopg
import pytest
import sqlalchemy

from demo_app.cluster import HBA
from proxy.outcome import MARKER_DDL
from tests.conftest import SidecarFactory
from tests.harness import pg
from tests.harness.load import log_events
from tests.harness.sidecar import SIDECAR_PASSWORDS, SidecarProcess
from tests.integration.test_commit_outcome import _wait_outcome
from tests.integration.test_failover import (
    USER,
    connect,
    count_on,
    crash_and_promote,
    ids_on,
    insert_sql,
    make_table,
    metric,
    server_port,
    sqlstate_of_call,
    wait_backend,
)

MODES = ["session", "transaction"]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="replay-client")
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def new_table(topo: pg.Topology) -> str:
    """A table on a1, already on a2 (the standby promoted after the crash)."""
    table = make_table(topo.a1)
    topo.a1.wait_caught_up([topo.a2])
    return table


def replays(sidecar: SidecarProcess, result: str) -> float:
    return metric(sidecar, "pgsidecar_transaction_replays_total", result=result)


def replayed_events(sidecar: SidecarProcess) -> int:
    return sidecar.log_text().count("event=transaction_replayed")


class TableLock:
    """An ACCESS EXCLUSIVE lock on `table`, held on `node` by a direct connection: statements on
    the table wait for it there (deterministically in flight) until the node crashes."""

    def __init__(self, node: pg.PgNode, table: str) -> None:
        self.conn = psycopg.connect(node.dsn(dbname=pg.APP_DB), autocommit=False)
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_open_transaction_is_replayed_and_commits_once(fresh_topology, sidecar_factory, mode):
    """Between statements: the transaction is idle in the block at the crash; the client goes on
    and commits on the new writer, never seeing an error."""
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory({"pool": {"mode": mode}}, topology=topo)
    conn = connect(sidecar, autocommit=False, application_name="open-tx")
    conn.execute(insert_sql(table, "first", "open-tx"))
    conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()
    crash_and_promote(topo, sidecar, pause=0.5)
    conn.execute(insert_sql(table, "second", "open-tx"))
    conn.commit()
    assert ids_on(topo.a2, table) == ["first", "second"]
    assert server_port(conn) == topo.a2.port
    assert replays(sidecar, "replayed") == 1
    assert replays(sidecar, "diverged") == 0
    assert replayed_events(sidecar) == 1
    conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_statement_in_flight_in_a_block_is_replayed(fresh_topology, sidecar_factory, pool, mode):
    """Before the first answer: the transaction's first statement waits for a lock on a1 at the
    crash; replayed on a2, the client gets its answer and commits."""
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory({"pool": {"mode": mode}}, topology=topo)
    conn = connect(sidecar, autocommit=False, application_name="in-flight")
    lock = TableLock(topo.a1, table)

    def work() -> str:
        cur = conn.execute(insert_sql(table, "held", "in-flight") + " RETURNING id")
        row = cur.fetchone()
        conn.commit()
        assert row is not None
        return str(row[0])

    done = pool.submit(work)
    wait_backend(topo.a1, "application_name = 'in-flight' AND wait_event_type = 'Lock'")
    crash_and_promote(topo, sidecar, pause=0.3)
    assert done.result(timeout=30) == "held"
    lock.close()
    assert ids_on(topo.a2, table) == ["held"]
    assert replays(sidecar, "replayed") == 1
    conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_lone_read_in_flight_is_re_run(fresh_topology, sidecar_factory, pool, mode):
    topo = fresh_topology
    table = new_table(topo)
    topo.a1.execute(insert_sql(table, "r1"), dbname=pg.APP_DB)
    topo.a1.execute(insert_sql(table, "r2"), dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2])
    sidecar = sidecar_factory({"pool": {"mode": mode}}, topology=topo)
    conn = connect(sidecar, application_name="reader")
    lock = TableLock(topo.a1, table)
    done = pool.submit(lambda: conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall())
    wait_backend(topo.a1, "application_name = 'reader' AND wait_event_type = 'Lock'")
    crash_and_promote(topo, sidecar, pause=0.3)
    assert [r[0] for r in done.result(timeout=30)] == ["r1", "r2"]
    lock.close()
    assert replays(sidecar, "replayed") == 1
    assert server_port(conn) == topo.a2.port
    conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_read_in_flight_when_no_writer_is_left_runs_on_a_replica(
    fresh_topology, sidecar_factory, pool, mode
):
    """Region A's writer and its standby crash with a lone SELECT in flight; region B's standby is
    not promoted. The read waits for a writer through the hold, then, none having come, runs on
    b1, the replica read routing now picks: the client gets its rows, not 40001."""
    topo = fresh_topology
    table = new_table(topo)
    topo.a1.execute(insert_sql(table, "r1"), dbname=pg.APP_DB)
    topo.a1.execute(insert_sql(table, "r2"), dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2, topo.b1])
    config = {"pool": {"mode": mode}, "failover": {"hold_timeout": "1s"}, "routing": {"reads": "failover"}}
    sidecar = sidecar_factory(config, topology=topo)  # (read routing as by default: the harness turns it off)
    conn = connect(sidecar, application_name="reader")
    lock = TableLock(topo.a1, table)
    done = pool.submit(lambda: conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall())
    wait_backend(topo.a1, "application_name = 'reader' AND wait_event_type = 'Lock'")
    topo.a1.crash()
    topo.a2.crash()
    lock.close()
    assert [r[0] for r in done.result(timeout=30)] == ["r1", "r2"]
    assert replays(sidecar, "replayed") == 1
    assert server_port(conn) == topo.b1.port
    conn.close()


def test_transaction_that_read_changed_data_diverges_and_gets_40001(fresh_topology, sidecar_factory):
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory(topology=topo)
    conn = connect(sidecar, autocommit=False, application_name="reader-tx")
    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    conn.execute(insert_sql(table, "mine", "reader-tx"))
    # Another client changes what the transaction read; it reaches the standby before the crash.
    topo.a1.execute(insert_sql(table, "theirs", "other"), dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2])
    crash_and_promote(topo, sidecar, pause=0.3)
    state, _ = sqlstate_of_call(lambda: conn.execute(insert_sql(table, "after", "reader-tx")))
    assert state == "40001"
    conn.rollback()
    assert ids_on(topo.a2, table) == ["theirs"]  # the replay was rolled back: nothing applied
    assert replays(sidecar, "diverged") == 1
    assert replays(sidecar, "replayed") == 0
    conn.close()


def test_transaction_that_returned_now_diverges(fresh_topology, sidecar_factory):
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory(topology=topo)
    conn = connect(sidecar, autocommit=False)
    conn.execute(insert_sql(table, "x"))
    conn.execute("SELECT now()").fetchone()
    crash_and_promote(topo, sidecar, pause=0.3)
    state, _ = sqlstate_of_call(conn.commit)
    assert state == "40001"
    assert count_on(topo.a2, table) == 0
    assert replays(sidecar, "diverged") == 1
    conn.close()


def test_transaction_over_replay_max_bytes_gets_40001(fresh_topology, sidecar_factory):
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory({"failover": {"replay_max_bytes": "1KiB"}}, topology=topo)
    conn = connect(sidecar, autocommit=False)
    conn.execute(f"INSERT INTO {table} (id, client) VALUES ('big', '{'x' * 2000}')")
    crash_and_promote(topo, sidecar, pause=0.3)
    state, _ = sqlstate_of_call(conn.commit)
    assert state == "40001"
    assert count_on(topo.a2, table) == 0
    assert replays(sidecar, "too_large") == 1
    conn.close()


def test_replay_off_keeps_the_40001(fresh_topology, sidecar_factory):
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory({"failover": {"transaction_replay": False}}, topology=topo)
    conn = connect(sidecar, autocommit=False)
    conn.execute(insert_sql(table, "x"))
    crash_and_promote(topo, sidecar, pause=0.3)
    state, _ = sqlstate_of_call(conn.commit)
    assert state == "40001"
    assert replays(sidecar, "replayed") == 0
    conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_psycopg_pipeline_in_a_block_is_replayed(fresh_topology, sidecar_factory, mode):
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory({"pool": {"mode": mode}}, topology=topo)
    conn = connect(sidecar, autocommit=False)
    with conn.pipeline():
        conn.execute(insert_sql(table, "p1"))
        conn.execute(insert_sql(table, "p2"))
        conn.execute(f"SELECT id FROM {table} ORDER BY id")
    crash_and_promote(topo, sidecar, pause=0.3)
    with conn.pipeline():
        conn.execute(insert_sql(table, "p3"))
    conn.commit()
    assert ids_on(topo.a2, table) == ["p1", "p2", "p3"]
    assert replays(sidecar, "replayed") == 1
    conn.close()


def test_asyncpg_transaction_with_prepared_statements_is_replayed(fresh_topology, sidecar_factory):
    """asyncpg prepares named statements (session mode): re-prepared on the new writer, except
    those the replayed transaction prepares itself."""
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory(topology=topo)
    crashed = threading.Event()

    async def run() -> None:
        conn = await asyncpg.connect(
            host=sidecar.host, port=sidecar.port, user=USER, password=SIDECAR_PASSWORDS[USER],
            database=pg.APP_DB, timeout=15,
        )  # fmt: skip
        await conn.fetch(f"SELECT id FROM {table}")  # a statement prepared before the transaction
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f"INSERT INTO {table} (id, client) VALUES ($1, $2)", "a1", "asyncpg")
        await asyncio.get_running_loop().run_in_executor(None, crashed.wait)
        await conn.execute(f"INSERT INTO {table} (id, client) VALUES ($1, $2)", "a2", "asyncpg")
        rows = await conn.fetch(f"SELECT id FROM {table} ORDER BY id")
        await tx.commit()
        assert [r["id"] for r in rows] == ["a1", "a2"]
        await conn.close()

    thread_error: list[BaseException] = []

    def client() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:  # reported below
            thread_error.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 15
    while not count_on_uncommitted(topo.a1, table) and time.monotonic() < deadline:
        time.sleep(0.05)
    crash_and_promote(topo, sidecar, pause=0.3)
    crashed.set()
    thread.join(60)
    assert not thread_error, thread_error
    assert ids_on(topo.a2, table) == ["a1", "a2"]
    assert replays(sidecar, "replayed") == 1


def count_on_uncommitted(node: pg.PgNode, table: str) -> int:
    """Backends of `node` idle in a transaction that wrote to `table` (the asyncpg client's)."""
    rows = node.query(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
        f"AND query LIKE 'INSERT INTO {table}%'",
        dbname=pg.APP_DB,
    )
    return int(rows[0][0])


@pytest.mark.parametrize("mode", MODES)
def test_sqlalchemy_session_transaction_is_replayed(fresh_topology, sidecar_factory, mode):
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory({"pool": {"mode": mode}}, topology=topo)
    url = f"postgresql+psycopg://{USER}:{SIDECAR_PASSWORDS[USER]}@{sidecar.host}:{sidecar.port}/{pg.APP_DB}"
    engine = sqlalchemy.create_engine(url, pool_size=1)
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(insert_sql(table, "s1", "sqlalchemy")))
        crash_and_promote(topo, sidecar, pause=0.3)
        conn.execute(sqlalchemy.text(insert_sql(table, "s2", "sqlalchemy")))
        conn.commit()
    engine.dispose()
    assert ids_on(topo.a2, table) == ["s1", "s2"]
    assert replays(sidecar, "replayed") == 1


# ---------------------------------------------------------------------------------------------
# Commit outcomes: a COMMIT in flight at the crash


def ledger_sidecar(topo: pg.Topology, sidecar_factory: SidecarFactory, mode: str) -> SidecarProcess:
    """The commit-outcome ledger installed in the app database (as `pgsidecar init-db` does, on
    a1, streamed to a2), and a sidecar that found it usable for the test's pool."""
    topo.a1.execute(MARKER_DDL, dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2])
    config = {
        "admin_users": [USER],
        "pool": {"mode": mode},
        "upstream": {"probe_user": USER, "probe_database": pg.APP_DB},
    }
    sidecar = sidecar_factory(config, topology=topo)
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"
    return sidecar


def outcomes(sidecar: SidecarProcess, outcome: str) -> float:
    return metric(sidecar, "pgsidecar_commit_outcomes_total", outcome=outcome)


@pytest.mark.parametrize("mode", MODES)
def test_commit_in_flight_that_reached_the_standby_succeeds(fresh_topology, sidecar_factory, pool, mode):
    """Synchronous standby: the commit record reached a2 but a1 never acknowledged it. The marker
    is on the promoted a2: the client gets COMMIT, and the row is there once."""
    topo = fresh_topology
    table = new_table(topo)
    sidecar = ledger_sidecar(topo, sidecar_factory, mode)
    pg.set_sync_standbys(topo.a1, ["nobody"])  # every COMMIT on a1 waits, after streaming to a2
    conn = connect(sidecar, autocommit=False, application_name="committer")
    conn.execute(insert_sql(table, "once", "committer"))
    commit = pool.submit(sqlstate_of_call, conn.commit)
    wait_backend(topo.a1, "application_name = 'committer' AND wait_event = 'SyncRep'")
    topo.a1.wait_caught_up([topo.a2])
    crash_and_promote(topo, sidecar, pause=0.3)
    state, _ = commit.result(timeout=30)
    assert state is None, f"COMMIT in flight at the crash: expected success, got {state}"
    assert ids_on(topo.a2, table) == ["once"]
    assert outcomes(sidecar, "committed") == 1
    assert outcomes(sidecar, "unknown") == 0
    conn.execute(insert_sql(table, "next", "committer"))
    conn.commit()
    assert ids_on(topo.a2, table) == ["next", "once"]
    conn.close()


def _sleep_at_commit_on(node: pg.PgNode, table: str) -> None:
    """A deferred constraint trigger on `table` that holds every COMMIT on `node` (only there:
    the replay on the promoted standby commits at once)."""
    node.execute(
        f"""
        CREATE FUNCTION {table}_hold() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF current_setting('port')::int = {node.port} THEN PERFORM pg_sleep(60); END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER {table}_hold AFTER INSERT ON {table}
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_hold();
        """,
        dbname=pg.APP_DB,
    )


@pytest.mark.parametrize("mode", MODES)
def test_commit_in_flight_that_never_committed_is_replayed_once(fresh_topology, sidecar_factory, pool, mode):
    """The COMMIT is held on a1 before its commit record exists (a deferred trigger), then a1
    crashes: the marker is not on a2, so the transaction is replayed there and committed once."""
    topo = fresh_topology
    table = make_table(topo.a1)
    _sleep_at_commit_on(topo.a1, table)
    topo.a1.wait_caught_up([topo.a2])
    sidecar = ledger_sidecar(topo, sidecar_factory, mode)
    conn = connect(sidecar, autocommit=False, application_name="committer")
    conn.execute(insert_sql(table, "once", "committer"))
    commit = pool.submit(sqlstate_of_call, conn.commit)
    wait_backend(topo.a1, "application_name = 'committer' AND wait_event = 'PgSleep'")
    crash_and_promote(topo, sidecar, pause=0.3)
    state, _ = commit.result(timeout=30)
    assert state is None, f"COMMIT in flight at the crash: expected success, got {state}"
    assert ids_on(topo.a2, table) == ["once"]
    assert outcomes(sidecar, "replayed") == 1
    assert replays(sidecar, "replayed") == 1
    conn.close()


def _stop_streaming(standby: pg.PgNode) -> None:
    """`standby` stops receiving WAL: what its primary commits from now on never reaches it."""
    standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
    standby.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while standby.query("SELECT count(*) FROM pg_stat_wal_receiver") != [(0,)]:
        assert time.monotonic() < deadline, f"{standby.name} kept streaming"
        time.sleep(0.05)


def _shut_out(node: pg.PgNode, user: str, shut: bool) -> None:
    """pg_hba.conf on `node` rejects (`shut`) or admits again `user`, and every session it has
    there is ended: the sidecar cannot see `node` at all meanwhile (its probe logs in as `user`)."""
    rule = f"host all {user} 127.0.0.1/32 reject\n" if shut else ""
    (node.datadir / "pg_hba.conf").write_text(rule + HBA)
    node.reload()
    if not shut:
        return
    deadline = time.monotonic() + 30
    while True:
        rows = node.query(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = %s", (user,)
        )
        if rows == [(0,)]:
            return
        assert time.monotonic() < deadline, f"{user} kept sessions on {node.name}"
        time.sleep(0.1)


def test_lost_commit_whose_xid_the_new_writer_reused_is_replayed_not_reported_committed(
    fresh_topology, sidecar_factory, pool
):
    """The xid trap, end to end. a2 stops streaming; a client's marked COMMIT (xid X) commits on
    a1 and waits there for a synchronous standby; a1 crashes; a2, promoted, hands X out again to a
    transaction of its own before the sidecar sees it (pg_hba shuts the sidecar out meanwhile).
    pg_xact_status(X) on a2 says "committed": true of a2's transaction, false of the client's. The
    marker says the client's did not commit: the sidecar replays it, the client gets COMMIT and the
    row is there exactly once."""
    topo = fresh_topology
    a1, a2 = topo.a1, topo.a2
    table = new_table(topo)
    topo.a1.execute(MARKER_DDL, dbname=pg.APP_DB)
    a1.wait_caught_up([a2])
    config = {
        "admin_users": [USER],
        "upstream": {"probe_user": USER, "probe_database": pg.APP_DB},
        "failover": {"hold_timeout": "60s"},
    }
    sidecar = sidecar_factory(config, topology=topo)
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"

    _stop_streaming(a2)
    _shut_out(a2, USER, shut=True)
    pg.set_sync_standbys(a1, ["nobody"])  # every COMMIT on a1 waits, after its commit record
    conn = connect(sidecar, autocommit=False, application_name="lost-commit")
    conn.execute(insert_sql(table, "once", "lost-commit"))
    commit = pool.submit(sqlstate_of_call, conn.commit)
    wait_backend(a1, "application_name = 'lost-commit' AND wait_event = 'SyncRep'")
    rows = a1.query(
        "SELECT backend_xid::text FROM pg_stat_activity WHERE application_name = 'lost-commit'",
        dbname=pg.APP_DB,
    )
    lost_xid = int(rows[0][0])
    status_sql = "SELECT pg_xact_status(%s::text::xid8)"
    # Its commit record is written on a1; the backend still waits for the standby to confirm it.
    assert a1.query(status_sql, (str(lost_xid),), dbname=pg.APP_DB) == [("in progress",)]

    a1.crash()
    a2.promote()
    xid = 0
    own = 0
    with psycopg.connect(a2.dsn(dbname=pg.APP_DB), autocommit=True) as direct:
        while xid < lost_xid:  # a2's next xid is the lost one, or just below it
            own += 1
            direct.execute("BEGIN")
            direct.execute(insert_sql(table, f"a2-own-{own}", "a2"))
            row = direct.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert row is not None
            xid = int(row[0])
            direct.execute("COMMIT")
    assert xid == lost_xid, "a2 did not hand the lost transaction id out again"
    assert a2.query(status_sql, (str(lost_xid),), dbname=pg.APP_DB) == [("committed",)]
    assert count_on(a2, table, "id = 'once'") == 0

    _shut_out(a2, USER, shut=False)
    state, _ = commit.result(timeout=60)
    assert state is None, f"COMMIT lost with a1: expected success (replayed), got {state}"
    assert count_on(a2, table, "id = 'once'") == 1
    (xmin,) = a2.query(f"SELECT xmin::text FROM {table} WHERE id = 'once'", dbname=pg.APP_DB)[0]
    assert int(xmin) != lost_xid  # the replay is a transaction of its own
    assert outcomes(sidecar, "replayed") == 1
    assert outcomes(sidecar, "committed") == 0
    assert replays(sidecar, "replayed") == 1
    events = log_events(sidecar.log_text(), "commit_outcome")
    assert [e.fields.get("outcome") for e in events] == ["not_committed"]  # what the marker says
    conn.execute(insert_sql(table, "next", "lost-commit"))
    conn.commit()
    assert count_on(a2, table, "id IN ('once', 'next')") == 2
    conn.close()
