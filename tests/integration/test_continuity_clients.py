"""Every common client's commit in flight at one crash (issue 20): psycopg (an autocommit INSERT
with parameters, prepared by name; a pipeline whose transaction commits after it), asyncpg (an
autocommit INSERT through its prepared statement; a transaction's COMMIT) and SQLAlchemy (a
session's commit), all waiting for a synchronous standby that already has their commits when the
writer crashes. After the promotion each gets success, and every row is there once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import asyncpg
import pytest
import sqlalchemy
from sqlalchemy.orm import Session

from tests.conftest import SidecarFactory
from tests.harness import pg
from tests.harness.sidecar import SIDECAR_PASSWORDS, SidecarProcess
from tests.integration.test_failover import USER, connect, crash_and_promote, ids_on, make_table
from tests.integration.test_transaction_replay import ledger_sidecar, outcomes


class AsyncClient:
    """asyncpg on an event loop of its own thread: each call returns a Future."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="continuity-client")
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def _sqlstate(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except Exception as exc:
        return getattr(exc, "sqlstate", None) or f"{type(exc).__name__}: {exc}"
    return None


def _waiting_in_syncrep(node: pg.PgNode, want: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = node.query("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
        if int(rows[0][0]) >= want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{node.name}: {rows[0][0]} of {want} commits waiting for the standby")
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_every_client_s_commit_in_flight_completes_once(
    fresh_topology: pg.Topology, sidecar_factory: SidecarFactory, pool: ThreadPoolExecutor, mode: str
) -> None:
    topo = fresh_topology
    table = make_table(topo.a1)
    sidecar: SidecarProcess = ledger_sidecar(topo, sidecar_factory, mode)
    insert = f"INSERT INTO {table} (id, client) VALUES (%s, %s)"
    insert_n = f"INSERT INTO {table} (id, client) VALUES ($1, $2)"
    password = SIDECAR_PASSWORDS[USER]

    # psycopg: autocommit, its INSERT prepared by name after one use (prepare=True).
    ps = connect(sidecar, application_name="psycopg-ac")
    ps.execute(insert, ("ps-warm", "psycopg"), prepare=True)
    # psycopg: a pipeline of INSERTs in a transaction, committed after the pipeline.
    pp = connect(sidecar, autocommit=False, application_name="psycopg-pipe")
    with pp.pipeline():
        pp.execute(insert, ("pp-1", "pipeline"))
        pp.execute(insert, ("pp-2", "pipeline"))
    # asyncpg: autocommit through its statement cache; a transaction open with one INSERT.
    aio = AsyncClient()

    async def aconnect() -> asyncpg.Connection:
        return await asyncpg.connect(
            host=sidecar.host, port=sidecar.port, user=USER, password=password, database=pg.APP_DB, timeout=15
        )

    ac = aio.call(aconnect()).result(30)
    aio.call(ac.execute(insert_n, "ac-warm", "asyncpg")).result(30)
    at = aio.call(aconnect()).result(30)
    tx = at.transaction()
    aio.call(tx.start()).result(30)
    aio.call(at.execute(insert_n, "at-1", "asyncpg-tx")).result(30)
    # SQLAlchemy (psycopg): a session with one INSERT pending its commit.
    url = f"postgresql+psycopg://{USER}:{password}@{sidecar.host}:{sidecar.port}/{pg.APP_DB}"
    engine = sqlalchemy.create_engine(url, pool_size=1)
    session = Session(engine)
    session.execute(sqlalchemy.text(f"INSERT INTO {table} (id, client) VALUES (:id, 'orm')"), {"id": "sa-1"})

    pg.set_sync_standbys(topo.a1, ["nobody"])
    in_flight = {
        "psycopg autocommit INSERT": pool.submit(
            _sqlstate, lambda: ps.execute(insert, ("ps-1", "psycopg"), prepare=True)
        ),
        "psycopg COMMIT after a pipeline": pool.submit(_sqlstate, pp.commit),
        "asyncpg autocommit INSERT": aio.call(ac.execute(insert_n, "ac-1", "asyncpg")),
        "asyncpg COMMIT": aio.call(tx.commit()),
        "SQLAlchemy commit": pool.submit(_sqlstate, session.commit),
    }
    _waiting_in_syncrep(topo.a1, len(in_flight))
    topo.a1.wait_caught_up([topo.a2])
    crash_and_promote(topo, sidecar, pause=0.3)
    failures = {}
    for what, future in in_flight.items():
        try:
            result = future.result(timeout=30)
        except Exception as exc:
            result = getattr(exc, "sqlstate", None) or f"{type(exc).__name__}: {exc}"
        if isinstance(result, str) and not result.startswith("INSERT"):
            failures[what] = result
    assert not failures, f"in flight at the crash, expected success: {failures}\n{sidecar.log_tail(60)}"
    expected = ["ac-1", "ac-warm", "at-1", "pp-1", "pp-2", "ps-1", "ps-warm", "sa-1"]
    assert sorted(ids_on(topo.a2, table)) == expected
    assert outcomes(sidecar, "committed") == len(in_flight)
    assert outcomes(sidecar, "unknown") == 0

    # Every client goes on, on the new writer.
    ps.execute(insert, ("ps-2", "psycopg"), prepare=True)
    aio.call(ac.execute(insert_n, "ac-2", "asyncpg")).result(30)
    session.execute(sqlalchemy.text(f"INSERT INTO {table} (id, client) VALUES (:id, 'orm')"), {"id": "sa-2"})
    session.commit()
    assert sorted(ids_on(topo.a2, table)) == sorted([*expected, "ac-2", "ps-2", "sa-2"])
    session.close()
    engine.dispose()
    for conn in (ps, pp):
        conn.close()
    for aconn in (ac, at):
        aio.call(aconn.close()).result(30)
    aio.close()
