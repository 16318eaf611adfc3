"""Transaction replay with named prepared statements in transaction pool mode (issue 20, point 4).

In transaction mode a client's named statements live on the servers under the sidecar's shared
names, prepared on whichever server needs them. A replay on the promoted standby's fresh server
prepares them there again (the same rewriting as live), and the client sees the answers it would
have seen: its own ParseComplete whether or not the old server already had the statement, never
one for a statement the sidecar prepared behind its back.

The crash patterns and fixtures are test_transaction_replay.py's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.harness import pg
from tests.harness.sidecar import SIDECAR_PASSWORDS, SidecarProcess
from tests.integration.test_failover import (
    USER,
    connect,
    crash_and_promote,
    ids_on,
    make_table,
    server_port,
    wait_backend,
)
from tests.integration.test_transaction_replay import (
    TableLock,
    _sleep_at_commit_on,
    count_on_uncommitted,
    ledger_sidecar,
    new_table,
    outcomes,
    replays,
)

# One server: what one client prepares, the next one's transaction finds already prepared there.
TX_ONE_SERVER = {"pool": {"mode": "transaction", "size": 1}}


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="named-replay")
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def insert(table: str) -> str:
    return f"INSERT INTO {table} (id, client) VALUES (%s, %s)"


def select_ids(table: str) -> str:
    return f"SELECT id FROM {table} WHERE client = %s ORDER BY id"


def prepared(sidecar: SidecarProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    """psycopg preparing every statement it runs (named, protocol-level)."""
    conn = connect(sidecar, **kwargs)
    conn.prepare_threshold = 0
    return conn


def warm_up(sidecar: SidecarProcess, table: str) -> None:
    """Another client prepares the statements the test's client will: the one server has them
    under their shared names, so the test client's own Parse is answered by the sidecar."""
    with prepared(sidecar, application_name="warm-up") as other:
        other.execute(insert(table), ("warm", "warm-up"))
        other.execute(select_ids(table), ("warm-up",)).fetchall()


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_prepared_statements_between_statements_are_replayed(fresh_topology, sidecar_factory, warm):
    """psycopg, prepare_threshold=0: a statement prepared in an earlier transaction (Bind only in
    the cut one), and statements the cut transaction prepares itself. Idle in the block at the
    crash: replayed on a2, the client goes on, using the same statements, and commits once."""
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory(TX_ONE_SERVER, topology=topo)
    if warm:
        warm_up(sidecar, table)
    conn = prepared(sidecar, autocommit=False, application_name="named-tx")
    assert conn.execute(select_ids(table), ("named-tx",)).fetchall() == []  # prepared, then...
    conn.commit()  # ...used again in the next transaction only by its name
    conn.execute(insert(table), ("first", "named-tx"))
    assert conn.execute(select_ids(table), ("named-tx",)).fetchall() == [("first",)]
    crash_and_promote(topo, sidecar, pause=0.3)
    conn.execute(insert(table), ("second", "named-tx"))
    assert conn.execute(select_ids(table), ("named-tx",)).fetchall() == [("first",), ("second",)]
    conn.commit()
    assert ids_on(topo.a2, table) == ["first", "second"] + (["warm"] if warm else [])
    assert replays(sidecar, "replayed") == 1
    assert replays(sidecar, "diverged") == 0
    assert replays(sidecar, "not_replayable") == 0
    assert server_port(conn) == topo.a2.port
    conn.close()


def test_prepared_statement_in_flight_is_replayed(fresh_topology, sidecar_factory, pool):
    """Before an answer: the transaction's second prepared statement waits for a lock on a1 at
    the crash; replayed on a2 (its statement prepared there first), the client gets its row."""
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory({"pool": {"mode": "transaction"}}, topology=topo)
    conn = prepared(sidecar, autocommit=False, application_name="named-in-flight")
    conn.execute("SELECT %s::int", (1,)).fetchone()
    lock = TableLock(topo.a1, table)

    def work() -> list[tuple[Any, ...]]:
        conn.execute(insert(table), ("held", "named-in-flight"))
        rows = conn.execute(select_ids(table), ("named-in-flight",)).fetchall()
        conn.commit()
        return rows

    done = pool.submit(work)
    wait_backend(topo.a1, "application_name = 'named-in-flight' AND wait_event_type = 'Lock'")
    crash_and_promote(topo, sidecar, pause=0.3)
    assert done.result(timeout=30) == [("held",)]
    lock.close()
    assert ids_on(topo.a2, table) == ["held"]
    assert replays(sidecar, "replayed") == 1
    assert replays(sidecar, "diverged") == 0
    conn.close()


def test_commit_in_flight_that_never_committed_is_replayed_with_its_statements(
    fresh_topology, sidecar_factory, pool
):
    """The COMMIT of a transaction of prepared statements is held on a1 before its commit record
    exists, then a1 crashes: not committed, so the transaction is replayed on a2 (its statements
    prepared there) and committed once."""
    topo = fresh_topology
    table = make_table(topo.a1)
    _sleep_at_commit_on(topo.a1, table)
    topo.a1.wait_caught_up([topo.a2])
    sidecar = ledger_sidecar(topo, sidecar_factory, "transaction")
    conn = prepared(sidecar, autocommit=False, application_name="named-committer")
    conn.execute(select_ids(table), ("named-committer",)).fetchall()
    conn.commit()
    conn.execute(insert(table), ("once", "named-committer"))
    assert conn.execute(select_ids(table), ("named-committer",)).fetchall() == [("once",)]
    commit = pool.submit(conn.commit)
    wait_backend(topo.a1, "application_name = 'named-committer' AND wait_event = 'PgSleep'")
    crash_and_promote(topo, sidecar, pause=0.3)
    commit.result(timeout=30)
    assert ids_on(topo.a2, table) == ["once"]
    assert outcomes(sidecar, "replayed") == 1
    assert replays(sidecar, "replayed") == 1
    conn.execute(insert(table), ("next", "named-committer"))
    conn.commit()
    assert ids_on(topo.a2, table) == ["next", "once"]
    conn.close()


def test_asyncpg_transaction_is_replayed_in_transaction_mode(fresh_topology, sidecar_factory):
    """asyncpg names every statement it prepares: replayed in transaction mode as in session mode."""
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory({"pool": {"mode": "transaction"}}, topology=topo)
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


def test_psycopg_pipeline_of_prepared_statements_is_replayed(fresh_topology, sidecar_factory):
    """psycopg's pipeline mode with every statement prepared: each Parse in the same batch as its
    Bind (answered by the sidecar for the second INSERT, whose text the server has by then)."""
    topo = fresh_topology
    table = new_table(topo)
    sidecar = sidecar_factory({"pool": {"mode": "transaction"}}, topology=topo)
    conn = prepared(sidecar, autocommit=False, application_name="named-pipeline")
    with conn.pipeline():
        conn.execute(insert(table), ("p1", "named-pipeline"))
        conn.execute(insert(table), ("p2", "named-pipeline"))
        cur = conn.execute(select_ids(table), ("named-pipeline",))
    assert cur.fetchall() == [("p1",), ("p2",)]
    crash_and_promote(topo, sidecar, pause=0.3)
    with conn.pipeline():
        conn.execute(insert(table), ("p3", "named-pipeline"))
        cur = conn.execute(select_ids(table), ("named-pipeline",))
    assert cur.fetchall() == [("p1",), ("p2",), ("p3",)]
    conn.commit()
    assert ids_on(topo.a2, table) == ["p1", "p2", "p3"]
    assert replays(sidecar, "replayed") == 1
    assert replays(sidecar, "diverged") == 0
    conn.close()
