"""Autocommit writes behind a commit marker (issue 20): a lone INSERT/UPDATE/DELETE/MERGE sent as a
simple Query outside a transaction block goes out wrapped (BEGIN, the statement, the marker,
COMMIT), and the client gets exactly what PostgreSQL sends for the statement alone (compared byte
for byte with a direct connection); cut in flight, its outcome is found on the new writer."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from proxy.outcome import MARKER_DDL
from tests.conftest import SidecarFactory
from tests.harness import pg
from tests.harness.sidecar import SidecarProcess
from tests.harness.wire import RawClient
from tests.integration.test_commit_outcome import _wait_outcome
from tests.integration.test_failover import (
    connect,
    count_on,
    crash_and_promote,
    ids_on,
    insert_sql,
    make_table,
    sqlstate_of_call,
    wait_backend,
)
from tests.integration.test_transaction_replay import ledger_sidecar, outcomes

TRUST = "app_trust"


@pytest.fixture
def database(shared_topology: pg.Topology) -> Iterator[str]:
    name = f"wrap_{uuid.uuid4().hex[:10]}"
    a1 = shared_topology.a1
    a1.execute(f"CREATE DATABASE {name} OWNER {TRUST}")
    a1.execute(MARKER_DDL, dbname=name)
    a1.execute(
        """
        CREATE TABLE t (id int PRIMARY KEY, v text);
        CREATE TABLE d (id int UNIQUE DEFERRABLE INITIALLY DEFERRED);
        INSERT INTO d VALUES (1);
        CREATE FUNCTION noisy() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE NOTICE 'row %', NEW.id; RETURN NEW; END $$;
        CREATE TRIGGER noisy BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION noisy();
        CREATE FUNCTION late() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE NOTICE 'late %', NEW.id; RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER late AFTER INSERT ON d DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION late();
        """
        + f"; GRANT ALL ON t, d TO {TRUST}",
        dbname=name,
    )
    try:
        yield name
    finally:
        a1.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _raw(port: int, database: str) -> RawClient:
    client = RawClient(port, timeout=20)
    client.startup(TRUST, database, application_name="wrap-test")
    msgs = client.read_until("ZE")
    assert msgs and msgs[-1].type == "Z", [(m.type, m.body) for m in msgs]
    return client


def _answer(client: RawClient, sql: str) -> list[tuple[str, bytes]]:
    client.query(sql)
    return [(msg.type, msg.body) for msg in client.read_until("Z")]


def _same_ids(body: bytes, digit: bytes) -> bytes:
    for n, name in ((b"", b"X"), (b"1", b"Y"), (b"2", b"Z")):
        body = body.replace(b"row " + digit + n + b"\x00", b"row " + name + b"\x00")
    return body.replace(b"(" + digit + b")", b"(X)")


def _markers(node: pg.PgNode, database: str) -> int:
    return int(node.query("SELECT count(*) FROM pgsidecar.commit_marker", dbname=database)[0][0])


def trust_sidecar(sidecar_factory: SidecarFactory, database: str, mode: str) -> SidecarProcess:
    """A sidecar on the shared topology for raw clients (trust), its ledger found usable."""
    config: dict[str, Any] = {
        "auth": {"method": "trust"},
        "admin_users": [TRUST, "app_scram"],
        "pool": {"mode": mode},
        "upstream": {"probe_user": "app_scram", "probe_database": database},
    }
    sidecar = sidecar_factory(config)
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"
    return sidecar


def pools_ready(sidecar: SidecarProcess) -> None:
    """Every pool's ledger checked and usable: a pool made for a new login is checked when it is
    made, and its transactions go unmarked until then (milliseconds)."""
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_wrapped_answers_are_byte_for_byte_postgresql_s(
    shared_topology: pg.Topology, sidecar_factory: SidecarFactory, database: str, mode: str
) -> None:
    a1 = shared_topology.a1
    sidecar = trust_sidecar(sidecar_factory, database, mode)
    direct = _raw(a1.port, database)
    through = _raw(sidecar.port, database)
    pools_ready(sidecar)
    try:
        cases = [
            # success, with a NOTICE from a row trigger
            ("INSERT INTO t VALUES (1, 'a')", "INSERT INTO t VALUES (2, 'a')"),
            ("INSERT INTO t VALUES (11, 'b'), (12, 'b')", "INSERT INTO t VALUES (21, 'b'), (22, 'b')"),
            ("UPDATE t SET v = 'c' WHERE id IN (1, 11, 12)", "UPDATE t SET v = 'c' WHERE id IN (2, 21, 22)"),
            # the statement fails
            ("INSERT INTO t VALUES (1, 'dup')", "INSERT INTO t VALUES (2, 'dup')"),
            ("INSERT INTO t VALUES ('x')", "INSERT INTO t VALUES ('x')"),
            # the COMMIT fails: a deferred unique check, after a deferred trigger's NOTICE
            ("INSERT INTO d VALUES (1)", "INSERT INTO d VALUES (1)"),
            # deleted: nothing matched (no transaction id, so no marker row: "not committed")
            ("DELETE FROM t WHERE id < 0", "DELETE FROM t WHERE id < 0"),
            ("DELETE FROM t WHERE id IN (11, 12)", "DELETE FROM t WHERE id IN (21, 22)"),
        ]
        for sql_direct, sql_through in cases:
            before = _markers(a1, database)
            want = _answer(direct, sql_direct)
            got = _answer(through, sql_through)
            if sql_direct != sql_through:  # (other ids, so that both succeed: named alike here)
                want = [(t, _same_ids(b, b"1")) for t, b in want]
                got = [(t, _same_ids(b, b"2")) for t, b in got]
            assert got == want, sql_through
            if want[-2] != ("C", b"DELETE 0\x00") and want[-2][0] == "C":
                assert _markers(a1, database) == before + 1, f"not wrapped: {sql_through}"
        # Thousands of notices (one per row): past the sidecar's bound they are relayed, not
        # held; the same bytes either way.
        many = "INSERT INTO t SELECT g, 'n' FROM generate_series(100, 2100) g"
        want = _answer(direct, many)
        assert _answer(direct, "DELETE FROM t WHERE id BETWEEN 100 AND 2100")[-2] == ("C", b"DELETE 2001\x00")
        assert len(want) == 2003
        assert _answer(through, many) == want
        # Not wrapped: VACUUM (cannot run in a block), RETURNING, several statements.
        unwrapped = (
            "VACUUM d",
            "INSERT INTO t VALUES (30) RETURNING id",
            "INSERT INTO t VALUES (31); SELECT 1",
        )
        for sql in unwrapped:
            before = _markers(a1, database)
            assert _answer(through, sql)[-1] == ("Z", b"I")
            assert _markers(a1, database) == before
    finally:
        direct.close()
        through.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="wrap-client")
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def _tagged(conn: Any, sql: str) -> tuple[str | None, str | None]:
    """Run `sql`: (SQLSTATE of the error or None, the CommandComplete tag or None)."""
    try:
        return None, str(conn.execute(sql).statusmessage)
    except psycopg.Error as exc:
        return exc.sqlstate or type(exc).__name__, None


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_autocommit_insert_in_flight_that_reached_the_standby_succeeds(
    fresh_topology: pg.Topology, sidecar_factory: SidecarFactory, pool: ThreadPoolExecutor, mode: str
) -> None:
    """Synchronous standby: the commit reached a2, a1 never answered. The client gets the
    statement's own tag, held by the sidecar until the COMMIT's answer."""
    topo = fresh_topology
    table = make_table(topo.a1)
    topo.a1.wait_caught_up([topo.a2])
    sidecar = ledger_sidecar(topo, sidecar_factory, mode)
    pg.set_sync_standbys(topo.a1, ["nobody"])
    conn = connect(sidecar, application_name="autocommitter")
    insert = pool.submit(_tagged, conn, insert_sql(table, "once", "ac"))
    wait_backend(topo.a1, "application_name = 'autocommitter' AND wait_event = 'SyncRep'")
    topo.a1.wait_caught_up([topo.a2])
    crash_and_promote(topo, sidecar, pause=0.3)
    state, tag = insert.result(timeout=30)
    assert state is None, f"autocommit INSERT in flight: expected success, got {state}"
    assert tag == "INSERT 0 1"
    assert ids_on(topo.a2, table) == ["once"]
    assert outcomes(sidecar, "committed") == 1
    assert outcomes(sidecar, "unknown") == 0
    conn.execute(insert_sql(table, "next", "ac"))
    assert ids_on(topo.a2, table) == ["next", "once"]
    conn.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_autocommit_update_in_flight_that_reached_the_standby_succeeds(
    fresh_topology: pg.Topology, sidecar_factory: SidecarFactory, pool: ThreadPoolExecutor, mode: str
) -> None:
    """An UPDATE's row count is not in its text: the client gets the tag the old writer sent
    (held until the COMMIT's answer, which never came)."""
    topo = fresh_topology
    table = make_table(topo.a1)
    for row_id in ("a", "b", "c"):
        topo.a1.execute(insert_sql(table, row_id, "seed"), dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2])
    sidecar = ledger_sidecar(topo, sidecar_factory, mode)
    pg.set_sync_standbys(topo.a1, ["nobody"])
    conn = connect(sidecar, application_name="autocommitter")
    update = pool.submit(_tagged, conn, f"UPDATE {table} SET client = 'updated' WHERE id IN ('a', 'b')")
    wait_backend(topo.a1, "application_name = 'autocommitter' AND wait_event = 'SyncRep'")
    topo.a1.wait_caught_up([topo.a2])
    crash_and_promote(topo, sidecar, pause=0.3)
    state, tag = update.result(timeout=30)
    assert state is None, f"autocommit UPDATE in flight: expected success, got {state}"
    assert tag == "UPDATE 2"
    assert count_on(topo.a2, table, "client = 'updated'") == 2
    assert outcomes(sidecar, "committed") == 1
    conn.close()


def _sleep_at_commit_on(node: pg.PgNode, table: str) -> None:
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


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_autocommit_insert_in_flight_that_never_committed_is_replayed_once(
    fresh_topology: pg.Topology, sidecar_factory: SidecarFactory, pool: ThreadPoolExecutor, mode: str
) -> None:
    """Held at its COMMIT on a1 (a deferred trigger that sleeps there only): not on a2, so the
    statement runs again there, once."""
    topo = fresh_topology
    table = make_table(topo.a1)
    _sleep_at_commit_on(topo.a1, table)
    topo.a1.wait_caught_up([topo.a2])
    sidecar = ledger_sidecar(topo, sidecar_factory, mode)
    conn = connect(sidecar, application_name="autocommitter")
    insert = pool.submit(_tagged, conn, insert_sql(table, "once", "ac"))
    wait_backend(topo.a1, "application_name = 'autocommitter' AND wait_event = 'PgSleep'")
    crash_and_promote(topo, sidecar, pause=0.3)
    state, tag = insert.result(timeout=30)
    assert state is None, f"autocommit INSERT in flight: expected success, got {state}"
    assert tag == "INSERT 0 1"
    assert ids_on(topo.a2, table) == ["once"]
    assert outcomes(sidecar, "replayed") == 1
    conn.close()


def test_vacuum_in_flight_keeps_08007(
    fresh_topology: pg.Topology, sidecar_factory: SidecarFactory, pool: ThreadPoolExecutor
) -> None:
    """VACUUM cannot run in a transaction block: never wrapped, its outcome stays unknown."""
    topo = fresh_topology
    table = make_table(topo.a1)
    topo.a1.wait_caught_up([topo.a2])
    sidecar: SidecarProcess = ledger_sidecar(topo, sidecar_factory, "session")
    locker = connect_direct(topo.a1)
    locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    conn = connect(sidecar, application_name="vacuumer")
    vacuum = pool.submit(sqlstate_of_call, lambda: conn.execute(f"VACUUM {table}"))
    wait_backend(topo.a1, "application_name = 'vacuumer' AND wait_event_type = 'Lock'")
    crash_and_promote(topo, sidecar, pause=0.3)
    state, _ = vacuum.result(timeout=30)
    assert state == "08007"
    assert outcomes(sidecar, "committed") == 0 and outcomes(sidecar, "replayed") == 0
    assert count_on(topo.a2, table) == 0
    conn.close()


def connect_direct(node: pg.PgNode) -> Any:
    return psycopg.connect(node.dsn(dbname=pg.APP_DB), autocommit=False)
