"""Read routing on real clusters: read-only work served by a replica while there is no writer
(`routing.reads: failover`, the default), spread over replicas with a staleness bound and
read-your-writes (`balance`), and today's behaviour kept with `routing.reads: writer`.

Each test asserts where its reads ran (`pg_is_in_recovery()`, `inet_server_port()`) and what they
returned. The topology: region A has the writer a1 and the standby a2 (home), region B the
standby b1; crashing a1 leaves two standbys and no writer (nothing promotes them here).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa

from tests.harness import pg
from tests.harness.clients import DB, PASSWORD, USER, sqlalchemy_url
from tests.harness.sidecar import SidecarProcess
from tests.integration.test_failover import connect, make_table, wait_state

WHERE = "SELECT count(*), pg_is_in_recovery(), inet_server_port() FROM {table}"


def _where(conn: psycopg.Connection[Any], table: str) -> tuple[int, bool, int]:
    row = conn.execute(WHERE.format(table=table)).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1]), int(row[2])


def _server_roles(sidecar: SidecarProcess) -> dict[str, str | None]:
    """SHOW CLIENTS: each client's application_name -> where its server is (writer, replica)."""
    with psycopg.connect(sidecar.dsn(USER, dbname="pgsidecar"), autocommit=True) as admin:
        cur = admin.execute("SHOW CLIENTS")
        assert cur.description is not None
        names = [d.name for d in cur.description]
        rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    return {str(r["application_name"]): r["server_role"] for r in rows}


def _sqlstate(call: Any) -> str | None:
    try:
        call()
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def _seed(topo: pg.Topology, rows: int = 3) -> str:
    table = make_table(topo.a1, "rr")
    topo.a1.execute(
        f"INSERT INTO {table} (id, client) SELECT 'r' || i, 'seed' FROM generate_series(1, {rows}) AS i",
        dbname=pg.APP_DB,
    )
    topo.a1.wait_caught_up([topo.a2, topo.b1])
    return table


def _demo_read(engine: sa.Engine, table: str) -> tuple[int, bool, int]:
    """The demo Cafe's list page: BEGIN READ ONLY, two SELECTs (prepared by psycopg after five
    runs), ROLLBACK; the pool's pre-ping SELECT 1 before it."""
    with engine.connect().execution_options(postgresql_readonly=True) as conn:
        count = conn.execute(
            sa.text(f"SELECT count(*) FROM {table} WHERE client = :c"), {"c": "seed"}
        ).scalar()
        row = conn.execute(sa.text("SELECT pg_is_in_recovery(), inet_server_port()")).one()
        conn.rollback()
    return int(count or 0), bool(row[0]), int(row[1])


def _sidecar(factory: Any, topo: pg.Topology, mode: str, **routing: Any) -> SidecarProcess:
    """(The harness's default is `routing.reads: writer`; here `failover`, the product's default,
    unless the test says otherwise.)"""
    config: dict[str, Any] = {
        "admin_users": [USER],
        "pool": {"mode": mode},
        "failover": {"hold_timeout": "2s"},
        "routing": {"reads": "failover", **routing},
    }
    return factory(config, topology=topo)  # type: ignore[no-any-return]


async def _asyncpg_read(sidecar: SidecarProcess, table: str) -> tuple[int, bool, int]:
    conn = await asyncpg.connect(
        host=sidecar.host, port=sidecar.port, user=USER, password=PASSWORD, database=DB, timeout=15
    )
    try:
        row = await conn.fetchrow(WHERE.format(table=table))
        assert row is not None
        return int(row[0]), bool(row[1]), int(row[2])
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_reads_go_to_a_standby_while_there_is_no_writer(
    fresh_topology: pg.Topology, sidecar_factory: Any, mode: str
) -> None:
    """The writer crashes, its standbys stay standbys: an already-connected psycopg client, a new
    connection, asyncpg and SQLAlchemy (the demo's READ ONLY transaction with prepared statements
    and pre-ping) read from the home standby a2 at once; a write is still held and refused with
    57P03 after failover.hold_timeout, and reads go on afterwards on the same connection; a
    write inside BEGIN READ ONLY gets PostgreSQL's own 25006 from the standby."""
    topo = fresh_topology
    table = _seed(topo)
    sidecar = _sidecar(sidecar_factory, topo, mode)
    before = connect(sidecar)
    assert _where(before, table) == (3, False, topo.a1.port)
    if mode == "session":
        assert _server_roles(sidecar)["failover-test"] == "writer"
    engine = sa.create_engine(sqlalchemy_url(sidecar.host, sidecar.port), pool_pre_ping=True, pool_size=2)
    try:
        for _ in range(6):  # psycopg prepares the statements from the fifth run on
            assert _demo_read(engine, table) == (3, False, topo.a1.port)

        down = time.time()
        topo.a1.crash()
        wait_state(sidecar, "failing_over", down)

        assert _where(before, table) == (3, True, topo.a2.port)
        if mode == "session":  # (transaction mode: no server between transactions)
            assert _server_roles(sidecar)["failover-test"] == "replica"
        with connect(sidecar) as fresh:
            assert _where(fresh, table) == (3, True, topo.a2.port)
        assert asyncio.run(_asyncpg_read(sidecar, table)) == (3, True, topo.a2.port)
        for _ in range(7):
            assert _demo_read(engine, table) == (3, True, topo.a2.port)

        # Writes are held as before (no spool: refused with FATAL 57P03 once the hold is over),
        # nothing applied; reads go on from a new connection.
        assert (
            _sqlstate(lambda: before.execute(f"INSERT INTO {table} (id, client) VALUES ('w', 'w')"))
            == "57P03"
        )
        with connect(sidecar) as again:
            assert _where(again, table) == (3, True, topo.a2.port)
        # A write in a READ ONLY transaction: the standby's own refusal, relayed.
        with connect(sidecar, autocommit=False) as ro:
            ro.read_only = True
            assert (
                _sqlstate(lambda: ro.execute(f"INSERT INTO {table} (id, client) VALUES ('x', 'x')"))
                == "25006"
            )
            ro.rollback()
            assert _where(ro, table) == (3, True, topo.a2.port)
        assert _demo_read(engine, table) == (3, True, topo.a2.port)
    finally:
        engine.dispose()
        before.close()


def test_reads_wait_for_the_writer_with_routing_reads_writer(
    fresh_topology: pg.Topology, sidecar_factory: Any
) -> None:
    """`routing.reads: writer`: today's behaviour, a read waits the hold and gets 57P03."""
    topo = fresh_topology
    table = _seed(topo)
    sidecar = _sidecar(sidecar_factory, topo, "session", reads="writer")
    conn = connect(sidecar)
    assert _where(conn, table) == (3, False, topo.a1.port)
    down = time.time()
    topo.a1.crash()
    wait_state(sidecar, "failing_over", down)
    started = time.monotonic()
    assert _sqlstate(lambda: _where(conn, table)) == "57P03"
    assert time.monotonic() - started >= 1.5  # it was held (hold_timeout 2s), not refused at once
    assert "no writable database" in sidecar.log_text()


def _ports(conn: psycopg.Connection[Any], table: str, reads: int) -> list[int]:
    return [_where(conn, table)[2] for _ in range(reads)]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_balance_staleness_bound_and_read_your_writes(
    fresh_topology: pg.Topology, sidecar_factory: Any, mode: str
) -> None:
    """`balance`: reads go to the home standby while it qualifies; a standby whose replay is
    paused while the writer moves on is skipped once its lag passes routing.max_replica_lag; a
    client's read after its own write sees that write (from the writer until a standby has
    replayed past it), even with replay paused everywhere."""
    topo = fresh_topology
    table = _seed(topo)
    sidecar = _sidecar(sidecar_factory, topo, mode, reads="balance", max_replica_lag="1s")
    reader = connect(sidecar)
    deadline = time.monotonic() + 15
    while _where(reader, table)[2] != topo.a2.port:  # (once the probes have seen a2's lag)
        assert time.monotonic() < deadline, sidecar.log_tail(30)
        time.sleep(0.1)
    assert set(_ports(reader, table, 5)) == {topo.a2.port}

    # Staleness: a2 stops replaying, the writer keeps committing; once a2 lags past 1 s, reads
    # go to b1 (the next qualifying standby), never to a2, and see the new rows.
    topo.a2.execute("SELECT pg_wal_replay_pause()")
    writer = psycopg.connect(topo.a1.dsn(dbname=pg.APP_DB), autocommit=True)
    try:
        writer.execute(f"INSERT INTO {table} (id, client) VALUES ('after-pause', 'seed')")
        deadline = time.monotonic() + 15
        while _where(reader, table)[2] == topo.a2.port:
            assert time.monotonic() < deadline, sidecar.log_tail(30)
            writer.execute("SELECT txid_current()")  # (commits keep coming: a2's lag grows)
            time.sleep(0.1)
        topo.a1.wait_caught_up([topo.b1])
        for _ in range(10):
            writer.execute("SELECT txid_current()")
            count, recovery, port = _where(reader, table)
            assert port != topo.a2.port and count == 4, (count, recovery, port)

        # Read-your-writes: replay paused on b1 too, the bound lifted so both still qualify.
        topo.b1.execute("SELECT pg_wal_replay_pause()")
        sidecar.write_config({**sidecar.config, "routing": {"reads": "balance", "max_replica_lag": "1h"}})
        sidecar.send_signal(1)  # SIGHUP: reload
        sidecar.wait_for_log("event=config_reloaded", timeout=10)
        deadline = time.monotonic() + 15
        while _where(reader, table)[2] == topo.a1.port:  # stale standbys qualify again
            assert time.monotonic() < deadline, sidecar.log_tail(30)
            time.sleep(0.1)
        for i in range(5):
            reader.execute(f"INSERT INTO {table} (id, client) VALUES ('own-{i}', 'seed')")
            count, recovery, port = _where(reader, table)
            assert count == 5 + i, (i, count, recovery, port)  # its own write, always
            assert port == topo.a1.port  # no standby has replayed it (both paused)
        # Another client, which wrote nothing, still reads from a (stale) standby.
        with connect(sidecar) as other:
            assert _where(other, table)[1] is True
    finally:
        writer.close()
        for node in (topo.a2, topo.b1):
            node.execute("SELECT pg_wal_replay_resume()")
        reader.close()


def test_standby_crash_mid_read_leaves_the_writer_alone(
    fresh_topology: pg.Topology, sidecar_factory: Any
) -> None:
    """`balance`, a read running on a2 when a2 crashes: the read is answered (re-run on b1 or the
    writer, by transaction replay), the next read goes to b1, and the writer's state is
    untouched: writes go on at once, no hold, no writer confirmation."""
    topo = fresh_topology
    table = _seed(topo)
    sidecar = _sidecar(sidecar_factory, topo, "session", reads="balance")
    reader = connect(sidecar)
    deadline = time.monotonic() + 15
    while _where(reader, table)[2] != topo.a2.port:
        assert time.monotonic() < deadline, sidecar.log_tail(30)
        time.sleep(0.1)
    offset = sidecar.log_offset()
    slow = f"SELECT count(*), inet_server_port() FROM {table}, generate_series(1, 40000000) AS g"
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(lambda: reader.execute(slow).fetchone())
        time.sleep(1.0)  # (the read is running on a2: its answer takes seconds)
        topo.a2.crash()
        outcome: Any
        try:
            outcome = running.result(timeout=60)
        except psycopg.Error as exc:
            outcome = exc.sqlstate
    log = sidecar.log_text()[offset:]
    # The writer was never suspected: no hold, no confirmation, no failover.
    assert "confirming the writer" not in log and "event=transactions_held" not in log, log
    assert "event=cluster_state" not in log, log
    with connect(sidecar) as writer_client:
        writer_client.execute(f"INSERT INTO {table} (id, client) VALUES ('during', 'seed')")
    count, recovery, port = _where(reader, table)
    assert recovery and port == topo.b1.port, (count, recovery, port)
    # The read itself: re-run elsewhere (issue 20's transaction replay), never an error.
    assert isinstance(outcome, tuple) and outcome[0] == 3 * 40000000, outcome
