"""Transaction pooling (`pool.mode: transaction`) with real clients and real PostgreSQL.

A client holds a server connection only for the length of one transaction; between transactions
its prepared statements (renamed to sidecar-wide `pgsidecar_N`, prepared lazily per server) and its
session settings follow it to whichever server runs its next transaction. State that cannot follow
(LISTEN, WITH HOLD cursors, temp tables, SQL PREPARE, session advisory locks) is refused with 0A000.

Most tests share one module-scoped sidecar (`pool: {mode: transaction, size: 2}`), so two servers
are interleaved between clients all the time; tests that need their own pool size start a sidecar
of their own. Every test makes uuid-named objects and checks the writer (a1) directly.

Tests marked xfail(strict=True) assert the correct behaviour for proxy bugs found while writing
this suite; each reason names the bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors as pgerr
from sqlalchemy import orm

from tests.harness import jdbc, node_pg, pg, workloads
from tests.harness.clients import (
    CONNECT_TIMEOUT,
    DB,
    PASSWORD,
    USER,
    item_model,
    scratch_database,
    sqlalchemy_url,
)
from tests.harness.clients import connect as _connect
from tests.harness.clients import direct as _direct
from tests.harness.clients import pgbench as _pgbench
from tests.harness.clients import psql as _psql
from tests.harness.clients import psql_argv as _psql_argv
from tests.harness.clients import query_writer as _wq
from tests.harness.clients import tool_env as _tool_env
from tests.harness.clients import unique_name as _name
from tests.harness.clients import wait_for as _wait_for
from tests.harness.clients import with_log as _log
from tests.harness.sidecar import SidecarProcess, sidecar_config

REFUSED_PREFIX = "not supported with pool.mode transaction"
# Statements whose state outlives a transaction: each must be refused with 0A000.
NOT_POOLABLE = {
    "listen": "LISTEN pgsidecar_tx_channel",
    "with-hold-cursor": "DECLARE pgsidecar_tx_cur CURSOR WITH HOLD FOR SELECT 1",
    "temp-table": "CREATE TEMP TABLE pgsidecar_tx_temp (a int)",
    "sql-prepare": "PREPARE pgsidecar_tx_plan AS SELECT 1",
    "advisory-lock": "SELECT pg_advisory_lock(918273645)",
}


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


def _tx(**pool: Any) -> dict[str, Any]:
    return {"pool": {"mode": "transaction", **pool}}


@pytest.fixture(scope="module")
def sidecar(
    shared_topology: pg.Topology, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    """One transaction-mode sidecar with two server connections for most tests of this module."""
    config = sidecar_config(shared_topology, _tx(size=2))
    with SidecarProcess(config, tmp_path_factory.mktemp("txmode-sidecar")) as proc:
        yield proc


@pytest.fixture
def writer(shared_topology: pg.Topology) -> pg.PgNode:
    return shared_topology.a1


@pytest.fixture
def scratch_db(writer: pg.PgNode) -> Iterator[str]:
    """A fresh database on the writer owned by app_scram (pg_stat_activity counts of its own)."""
    with scratch_database(writer) as name:
        yield name


def _pg8000(host: str, port: int) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        USER, host=host, port=port, database=DB, password=PASSWORD, timeout=30
    )


def _asyncpg(host: str, port: int, **kwargs: Any) -> Any:
    return asyncpg.connect(
        host=host, port=port, user=USER, password=PASSWORD, database=DB, timeout=CONNECT_TIMEOUT, **kwargs
    )


def _server_views(sidecar: SidecarProcess, servers: int, sql: str) -> dict[int, list[tuple[Any, ...]]]:
    """Run `sql` on every server of the pool: `servers` clients each hold a transaction open, so
    each holds a different server. Returns backend pid -> rows."""
    conns = [_connect(sidecar, autocommit=False) for _ in range(servers)]
    try:
        views: dict[int, list[tuple[Any, ...]]] = {}
        for conn in conns:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            views[pid] = conn.execute(sql, prepare=False).fetchall()
        return views
    finally:
        for conn in conns:
            conn.rollback()
            conn.close()


def _run_threads(target: Callable[[int], None], n: int) -> list[str]:
    """Run target(0..n-1) in threads; returns the errors as strings."""
    errors: list[str] = []

    def wrapped(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            errors.append(f"worker {i}: {exc!r}")

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "workers still running after 60 s"
    return errors


def _no_statement_confusion(errors: list[str]) -> None:
    confused = [e for e in errors if "does not exist" in e or "already exists" in e]
    assert not confused, confused
    assert not errors, errors


# ---------------------------------------------------------------------------------------------
# 1. Many clients over a small pool
# ---------------------------------------------------------------------------------------------


def test_fifty_clients_never_use_more_than_pool_size_servers(
    sidecar_factory: Callable[..., SidecarProcess], writer: pg.PgNode, scratch_db: str
) -> None:
    proc = sidecar_factory(_tx(size=5))
    t = _name()
    with _connect(proc, dbname=scratch_db) as conn:
        conn.execute(f"CREATE TABLE {t} (id bigserial PRIMARY KEY, client int, n int, pid int)")

    stop = threading.Event()
    samples: list[int] = []

    def sample() -> None:
        with writer.connect("postgres") as mon:
            while not stop.is_set():
                row = mon.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s"
                    " AND datname <> 'postgres' AND application_name <> 'pgsidecar-probe'",
                    (USER, scratch_db),
                ).fetchone()
                samples.append(int(row[0]))  # type: ignore[index]
                time.sleep(0.02)

    clients, per_client = 50, 20
    barrier = threading.Barrier(clients, timeout=30)

    def client(i: int) -> None:
        with _connect(proc, dbname=scratch_db) as conn:
            barrier.wait()
            for n in range(per_client):
                with conn.transaction():
                    conn.execute(
                        f"INSERT INTO {t} (client, n, pid) VALUES (%s, %s, pg_backend_pid())", (i, n)
                    )
                    got = conn.execute(f"SELECT count(*) FROM {t} WHERE client = %s", (i,)).fetchone()
                    assert got == (n + 1,), got
                assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (2 * i,)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        errors = _run_threads(client, clients)
    finally:
        stop.set()
        sampler.join()
    assert not errors, _log(proc, "\n".join(errors[:5]))
    assert samples, "the sampler never ran"
    assert max(samples) <= 5, (max(samples), samples)
    assert max(samples) >= 2, f"no concurrency observed: {samples}"
    rows = _wq(writer, f"SELECT count(*), count(DISTINCT client), count(DISTINCT pid) FROM {t}",
               dbname=scratch_db)  # fmt: skip
    assert rows[0][:2] == (clients * per_client, clients)
    assert 1 <= rows[0][2] <= 5, rows


# ---------------------------------------------------------------------------------------------
# 2. Prepared statements across servers
# ---------------------------------------------------------------------------------------------


def test_psycopg_prepared_statements_across_hundreds_of_transactions(
    sidecar: SidecarProcess, writer: pg.PgNode
) -> None:
    with _connect(sidecar) as conn:
        t, ref = workloads.create_tables(conn)

    # Each connection starts the cycle at another query, so psycopg's `_pg3_0` names a different
    # statement on every connection: the sidecar must keep the clients' names apart.
    queries: list[tuple[str, Callable[[int, int], tuple[Any, ...]], Callable[[int, int], Any]]] = [
        ("SELECT %s::int + 1", lambda w, i: (i,), lambda w, i: [(i + 1,)]),
        ("SELECT %s::text || '-' || %s::text", lambda w, i: (f"w{w}", i), lambda w, i: [(f"w{w}-{i}",)]),
        (f"SELECT count(*) FROM {ref} WHERE id <= %s", lambda w, i: (i % 100,), lambda w, i: [(i % 100,)]),
        (f"SELECT label FROM {ref} WHERE id = %s", lambda w, i: (i % 100 + 1,),
         lambda w, i: [(f"r{i % 100 + 1}",)]),
        (f"INSERT INTO {t} (w, i) VALUES (%s, %s)", lambda w, i: (w, i), lambda w, i: None),
    ]  # fmt: skip
    workers, rounds = 4, 100
    inserts = [0] * workers

    def work(w: int) -> None:
        with _connect(sidecar, prepare_threshold=0) as conn:
            if w == 3:
                # psycopg evicts from its own cache (protocol Close), re-prepares later.
                conn.prepared_max = 2
            for i in range(rounds):
                sql, params, expected = queries[(w + i) % len(queries)]
                ctx = conn.transaction() if i % 4 == 0 else contextlib.nullcontext()
                with ctx:
                    cur = conn.execute(sql, params(w, i))
                    want = expected(w, i)
                    if want is None:
                        inserts[w] += 1
                        assert cur.rowcount == 1
                    else:
                        assert cur.fetchall() == want, (sql, w, i)

    errors = _run_threads(work, workers)
    _no_statement_confusion(errors)
    assert _wq(writer, f"SELECT count(*) FROM {t}") == [(sum(inserts),)]
    assert sum(inserts) == workers * rounds // len(queries)


def test_asyncpg_pool_with_statement_cache_over_two_servers(
    sidecar: SidecarProcess, writer: pg.PgNode
) -> None:
    t = _name()
    errors: list[str] = []

    async def main() -> None:
        async with asyncpg.create_pool(
            host=sidecar.host, port=sidecar.port, user=USER, password=PASSWORD, database=DB,
            min_size=6, max_size=6, timeout=CONNECT_TIMEOUT, statement_cache_size=100,
        ) as pool:  # fmt: skip
            await pool.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")

            async def task(i: int) -> None:
                try:
                    async with pool.acquire() as conn:
                        k = i % 5
                        if k == 0:
                            assert await conn.fetchval("SELECT $1::int * 3", i) == 3 * i
                        elif k == 1:
                            row = await conn.fetchrow("SELECT $1::text || $2::text AS s, $3::int AS n",
                                                      "a", str(i), i)  # fmt: skip
                            assert tuple(row) == (f"a{i}", i)
                        elif k == 2:
                            async with conn.transaction():
                                await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", i, f"v{i}")
                                assert await conn.fetchval(f"SELECT v FROM {t} WHERE id = $1", i) == f"v{i}"
                        elif k == 3:
                            rows = await conn.fetch("SELECT g FROM generate_series(1, $1::int) g", i % 7 + 1)
                            assert [r["g"] for r in rows] == list(range(1, i % 7 + 2))
                        else:
                            stmt = await conn.prepare("SELECT $1::int - $2::int")
                            assert await stmt.fetchval(i, 1) == i - 1
                            assert await stmt.fetchval(i, 2) == i - 2
                except Exception as exc:
                    errors.append(f"task {i}: {exc!r}")

            await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(320))), 60)

    asyncio.run(main())
    _no_statement_confusion(errors)
    assert _wq(writer, f"SELECT count(*), sum(id) FROM {t}") == [
        (64, sum(i for i in range(320) if i % 5 == 2))
    ]


def test_pg8000_named_statements_over_two_servers(sidecar: SidecarProcess) -> None:
    texts = [
        "SELECT :a::int + :b::int",
        "SELECT upper(:s::text)",
        "SELECT :a::int * 10",
    ]

    def check(i: int, k: int, ps: Any) -> None:
        if k == 0:
            assert ps.run(a=i, b=1) == [[i + 1]]
        elif k == 1:
            assert ps.run(s=f"x{i}") == [[f"X{i}"]]
        else:
            assert ps.run(a=i) == [[i * 10]]

    def work(w: int) -> None:
        con = _pg8000(sidecar.host, sidecar.port)
        try:
            # Prepared in a per-connection order: pg8000_statement_0 differs between connections.
            order = [(w + j) % len(texts) for j in range(len(texts))]
            stmts = {k: con.prepare(texts[k]) for k in order}
            for i in range(60):
                k = i % len(texts)
                check(i, k, stmts[k])
                if i == 30:
                    # Close answered by the sidecar; a new Parse of the same text works again.
                    stmts[k].close()
                    stmts[k] = con.prepare(texts[k])
                if i % 10 == 0:
                    assert con.run("SELECT 'simple'") == [["simple"]]
        finally:
            con.close()

    _no_statement_confusion(_run_threads(work, 3))


def test_jdbc_server_prepared_statements_over_two_servers(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    """pgjdbc names its server-side statements S_1, S_2, ... per connection, in the order it
    prepares them: four connections over two servers, each starting its cycle at another text (so
    S_n means something else on each), one in binary mode, one evicting from a 2-entry cache
    (Close, then Parse again), one running DEALLOCATE ALL now and then, one SERIALIZABLE through
    the JDBC API; batched inserts, isValid checks, some rounds inside explicit transactions.
    JdbcWorkload.java checks every answer; the rows are counted here."""
    with _connect(sidecar) as conn:
        t, ref = workloads.create_tables(conn)
    result = jdbc.run_workload(sidecar.host, sidecar.port, DB, USER, PASSWORD, t, ref, workers=4, rounds=150)
    # Every fifth round of each worker inserts two rows: 4 x 30 x 2.
    workloads.assert_done(result, writer, t, rows=240)


def test_node_postgres_named_statements_over_two_servers(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    """node-postgres sends a named statement's Parse once per connection, then only its Bind: a
    pg.Pool of six connections, twelve concurrent tasks, two servers; also unnamed parameterized
    and simple queries, and INSERTs in explicit transactions. workload.mjs checks every answer."""
    with _connect(sidecar) as conn:
        t, ref = workloads.create_tables(conn)
    result = node_pg.run_workload(sidecar.host, sidecar.port, DB, USER, PASSWORD, t, ref, tasks=12, rounds=60)
    # Every sixth round of each task inserts: 12 x 10.
    workloads.assert_done(result, writer, t, rows=120)


def test_statement_prepared_by_one_client_is_shared_on_the_server(sidecar: SidecarProcess) -> None:
    marker = uuid.uuid4().hex[:10]
    shared = f"SELECT %s::int + 7 AS shared_{marker}"
    for w in range(3):
        with _connect(sidecar, prepare_threshold=0) as conn:
            for i in range(5):
                assert conn.execute(shared, (i,)).fetchone() == (i + 7,)
            assert conn.execute(f"SELECT %s::int AS own_{marker}_{w}", (w,)).fetchone() == (w,)
    # Statements are keyed by text and parameter types: other tests of this module's sidecar
    # prepare the same text with other declared types (JDBC's int4 and varchar, say).
    views = _server_views(
        sidecar, 2, "SELECT name, statement, parameter_types::text FROM pg_prepared_statements"
    )
    assert len(views) == 2, views
    names_for_shared = set()
    for pid, rows in views.items():
        names = [name for name, _, _ in rows]
        assert all(re.fullmatch(r"pgsidecar_\d+", n) for n in names), (pid, names)
        keys = [(text, types) for _, text, types in rows]
        assert len(keys) == len(set(keys)), f"server {pid} has a statement twice: {rows}"
        texts = [text for _, text, _ in rows]
        names_for_shared |= {name for name, text, _ in rows if f"shared_{marker}" in text}
        # Three clients prepared it: one entry per server at most.
        assert sum(f"shared_{marker}" in text for text in texts) <= 1
    assert len(names_for_shared) == 1, views  # the same sidecar-wide name on every server


def test_pg8000_unnamed_statement_follows_the_client_to_another_server(
    sidecar: SidecarProcess, writer: pg.PgNode
) -> None:
    # pg8000's run() with parameters sends Parse("")+Flush+Sync, then Describe("")+Flush+Sync,
    # then Bind("")+Execute+Sync: three transactions as far as the pool can tell. Force the second
    # and third onto the other server: after the Parse, hold the server it ran on.
    marker = f"p_{uuid.uuid4().hex[:12]}"
    con = _pg8000(sidecar.host, sidecar.port)
    holders: list[psycopg.Connection[Any]] = []
    real_describe = con.send_DESCRIBE_STATEMENT

    def describe_after_moving(name: bytes) -> None:
        parsed_on = _wq(
            writer,
            "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND query NOT LIKE %s",
            (f"%AS {marker}%", "%pg_stat_activity%"),
        )
        assert len(parsed_on) == 1, parsed_on
        pinned = [_connect(sidecar, autocommit=False) for _ in range(2)]
        holders.extend(pinned)
        for h in pinned:
            # An unnamed statement of this client's own, left on the server it does not keep.
            pid = h.execute("SELECT pg_backend_pid(), %s::int * 1000", (1,)).fetchone()[0]  # type: ignore[index]
            if pid != parsed_on[0][0]:
                h.commit()
                with _connect(sidecar) as other:
                    assert other.execute("SELECT %s::int * 1000", (7,)).fetchone() == (7000,)
        real_describe(name)

    con.send_DESCRIBE_STATEMENT = describe_after_moving
    try:
        assert con.run(f"SELECT :x::int + 1 AS {marker}", x=5) == [[6]]
    finally:
        con.close()
        for h in holders:
            with contextlib.suppress(Exception):
                h.rollback()
            h.close()


# ---------------------------------------------------------------------------------------------
# 3. max_prepared_statements: LRU eviction and lazy re-prepare
# ---------------------------------------------------------------------------------------------


def test_lru_eviction_with_three_statements_per_server(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(_tx(size=2, max_prepared_statements=3))
    distinct = 10

    def psycopg_worker(w: int) -> None:
        with _connect(proc, prepare_threshold=0) as conn:
            for i in range(60):
                k = (i + w * 3) % distinct
                ctx = conn.transaction() if i % 7 == 0 else contextlib.nullcontext()
                with ctx:
                    got = conn.execute(f"SELECT %s::int + {k} AS k{k}", (i,)).fetchone()
                assert got == (i + k,), (w, i, k, got)

    errors = _run_threads(psycopg_worker, 3)

    async def asyncpg_worker() -> None:
        conn = await _asyncpg(proc.host, proc.port)
        try:
            for i in range(40):
                k = i % distinct
                assert await conn.fetchval(f"SELECT $1::int * {k + 1}", i) == i * (k + 1)
        finally:
            await conn.close()

    try:
        asyncio.run(asyncpg_worker())
    except Exception as exc:
        errors.append(f"asyncpg: {exc!r}")

    con = _pg8000(proc.host, proc.port)
    try:
        stmts = [con.prepare(f"SELECT :v::int - {k}") for k in range(distinct)]
        for i in range(30):
            k = (i * 3) % distinct
            assert stmts[k].run(v=i) == [[i - k]]
    except Exception as exc:
        errors.append(f"pg8000: {exc!r}")
    finally:
        con.close()

    _no_statement_confusion(errors)
    views = _server_views(proc, 2, "SELECT name FROM pg_prepared_statements")
    for pid, rows in views.items():
        assert len(rows) <= 3, (pid, rows)
        assert all(re.fullmatch(r"pgsidecar_\d+", name) for (name,) in rows), rows


# ---------------------------------------------------------------------------------------------
# 4. DEALLOCATE and DISCARD ALL
# ---------------------------------------------------------------------------------------------


def _attempt(fn: Callable[[], Any]) -> Any:
    """fn()'s result, or the SQLSTATE it raised."""
    try:
        return fn()
    except psycopg.Error as exc:
        return exc.sqlstate


def _psycopg_deallocate_scenario(connect: Callable[..., psycopg.Connection[Any]]) -> list[Any]:
    """What a psycopg client observes around DEALLOCATE / DISCARD ALL (simple protocol)."""
    out: list[Any] = []
    q = "SELECT %s::int + 10"
    with connect(prepare_threshold=0) as conn:

        def run(i: int) -> Any:
            return _attempt(lambda: conn.execute(q, [i]).fetchone())

        def tag(sql: str) -> Any:
            return _attempt(lambda: conn.execute(sql, prepare=False).statusmessage)

        out.append(run(1))  # prepared as _pg3_0
        out.append(tag("DEALLOCATE _pg3_0"))
        out.append(run(2))  # psycopg still believes _pg3_0 exists: 26000
        out.append(run(3))
        out.append(tag("DEALLOCATE ALL"))  # psycopg forgets its statements too
        out.append(run(4))
        out.append(tag("SET search_path = pg_catalog"))
        out.append(tag("DISCARD ALL"))
        out.append(run(5))
        out.append(conn.execute("SHOW search_path", prepare=False).fetchone())
        with conn.transaction():
            out.append(run(6))
            out.append(tag("DEALLOCATE ALL"))
            out.append(run(7))
        out.append(run(8))
        out.append(str(conn.info.transaction_status))
    return out


def test_deallocate_and_discard_all_behave_as_directly(
    sidecar: SidecarProcess, writer: pg.PgNode, tmp_path: Path
) -> None:
    direct = _psycopg_deallocate_scenario(lambda **kw: _direct(writer, **kw))
    proxied = _psycopg_deallocate_scenario(lambda **kw: _connect(sidecar, **kw))
    assert direct[2] == "26000"  # the reference itself: a deallocated name is gone
    assert proxied == direct

    script = tmp_path / "dealloc.sql"
    script.write_text(
        "DEALLOCATE ALL;\n"
        "SET search_path = pg_catalog;\n"
        "DISCARD ALL;\n"
        "SHOW search_path;\n"
        "BEGIN;\n"
        "DEALLOCATE ALL;\n"
        "COMMIT;\n"
        "BEGIN;\n"
        "DISCARD ALL;\n"
        "ROLLBACK;\n"
        "SELECT 'alive';\n"
    )
    ref = _psql(writer.host, writer.port, "-f", str(script))
    got = _psql(sidecar.host, sidecar.port, "-f", str(script))
    assert "DEALLOCATE ALL" in ref.stdout and "DISCARD ALL" in ref.stdout and "alive" in ref.stdout
    assert (got.returncode, got.stdout, got.stderr) == (ref.returncode, ref.stdout, ref.stderr)

    async def asyncpg_scenario(host: str, port: int) -> list[Any]:
        out: list[Any] = []
        conn = await _asyncpg(host, port)
        try:
            out.append(await conn.fetchval("SELECT $1::int + 20", 1))
            out.append(await conn.execute("DISCARD ALL"))
            try:
                out.append(await conn.fetchval("SELECT $1::int + 20", 2))  # its cached statement
            except asyncpg.PostgresError as exc:
                out.append(exc.sqlstate)
            out.append(await conn.fetchval("SELECT $1::int + 30", 3))  # a new statement
            out.append(await conn.fetchval("SELECT 'after discard'"))
        finally:
            await conn.close()
        return out

    ref_async = asyncio.run(asyncpg_scenario(writer.host, writer.port))
    got_async = asyncio.run(asyncpg_scenario(sidecar.host, sidecar.port))
    assert got_async == ref_async
    assert ref_async[-2:] == [33, "after discard"]


def _deallocate_unknown(conn: psycopg.Connection[Any]) -> list[Any]:
    try:
        return [conn.execute("DEALLOCATE no_such_statement").statusmessage]
    except psycopg.Error as exc:
        return [exc.sqlstate, conn.execute("SELECT 1").fetchone()]


def _deallocate_in_aborted_transaction(conn: psycopg.Connection[Any]) -> list[Any]:
    out: list[Any] = []
    conn.execute("BEGIN")
    with contextlib.suppress(pgerr.DivisionByZero):
        conn.execute("SELECT 1/0")
    try:
        out.append(conn.execute("DEALLOCATE ALL").statusmessage)
    except psycopg.Error as exc:
        out.append(exc.sqlstate)
    out.append(str(conn.info.transaction_status))
    conn.execute("ROLLBACK")
    return out


def _failed_discard_keeps_statements(conn: psycopg.Connection[Any]) -> list[Any]:
    # psycopg forgets its own statements on ROLLBACK, so a raw Bind tells what the server has.
    out: list[Any] = []
    conn.pgconn.prepare(b"keep_me", b"SELECT $1::int * 2")
    conn.execute("BEGIN")
    try:
        conn.execute("DISCARD ALL")
    except psycopg.Error as exc:
        out.append(exc.sqlstate)
    conn.execute("ROLLBACK")
    res = conn.pgconn.exec_prepared(b"keep_me", [b"21"])
    out.append(res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) or res.get_value(0, 0))
    return out


def _extended_deallocate_own_name(conn: psycopg.Connection[Any]) -> list[Any]:
    out: list[Any] = []
    conn.prepare_threshold = 0
    out.append(conn.execute("SELECT %s::int + 40", [2]).fetchone())  # prepared as _pg3_0
    try:  # binary=True: extended protocol (Parse/Bind/Execute of an unnamed statement)
        out.append(conn.execute("DEALLOCATE _pg3_0", binary=True).statusmessage)
    except psycopg.Error as exc:
        out.append(exc.sqlstate)
    return out


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(
            _deallocate_unknown,
            id="unknown-name",
        ),
        pytest.param(
            _deallocate_in_aborted_transaction,
            id="in-aborted-transaction",
        ),
        pytest.param(
            _failed_discard_keeps_statements,
            id="failed-discard-all",
        ),
        pytest.param(
            _extended_deallocate_own_name,
            id="extended-protocol",
        ),
    ],
)
def test_deallocate_edge_cases_behave_as_directly(
    sidecar: SidecarProcess, writer: pg.PgNode, scenario: Callable[[psycopg.Connection[Any]], list[Any]]
) -> None:
    with _direct(writer) as conn:
        ref = scenario(conn)
    with _connect(sidecar) as conn:
        got = scenario(conn)
    assert got == ref


def test_extended_deallocate_all_does_not_break_other_clients(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(_tx(size=1))
    with _connect(proc, prepare_threshold=0) as a, _connect(proc) as b:
        assert a.execute("SELECT %s::int * 3", [5]).fetchone() == (15,)
        assert b.execute("DEALLOCATE ALL", binary=True).statusmessage == "DEALLOCATE ALL"
        errors = []
        for i in range(3):
            try:
                assert a.execute("SELECT %s::int * 3", [i]).fetchone() == (3 * i,)
            except psycopg.Error as exc:
                errors.append(f"{exc.sqlstate}: {exc}")
        assert not errors, errors


@pytest.mark.parametrize(
    "how",
    ["explicit-deallocate-all", "psycopg-rollback-after-prepared-statements"],
)
def test_deallocate_answered_by_the_sidecar_releases_the_server(
    sidecar_factory: Callable[..., SidecarProcess], how: str
) -> None:
    proc = sidecar_factory(_tx(size=1, checkout_timeout="1s"))
    with _connect(proc, autocommit=False, prepare_threshold=0) as idle, _connect(proc) as other:
        if how == "explicit-deallocate-all":
            idle.autocommit = True
            idle.execute("DEALLOCATE ALL")
        else:
            # psycopg sends DEALLOCATE ALL right after ROLLBACK when it has prepared statements.
            idle.execute("SELECT %s::int", [1])
            idle.rollback()
        # `idle` now sits between transactions; the only server must be free for `other`.
        assert other.execute("SELECT 'served'").fetchone() == ("served",)


# ---------------------------------------------------------------------------------------------
# 5. Session settings follow the client
# ---------------------------------------------------------------------------------------------

_SETTINGS_PROBE = (
    "SELECT current_setting('application_name'), current_setting('search_path'),"
    " current_setting('TimeZone'), current_setting('DateStyle'), current_setting('statement_timeout'),"
    " (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    "   WHERE c.oid = to_regclass('same_t')),"
    " '2024-03-05 12:00:00+00'::timestamptz::text"
)


@pytest.fixture
def settings_schemas(writer: pg.PgNode) -> Iterator[dict[str, str]]:
    """Three schemas with a table `same_t` each, holding 'A', 'B', 'C'."""
    schemas = {k: _name(f"s{k.lower()}") for k in "ABC"}
    for k, s in schemas.items():
        writer.execute(
            f"CREATE SCHEMA {s}; CREATE TABLE {s}.same_t (v text); INSERT INTO {s}.same_t VALUES ('{k}');"
            f" GRANT USAGE ON SCHEMA {s} TO {USER}; GRANT SELECT ON {s}.same_t TO {USER}",
            dbname=DB,
        )
    try:
        yield schemas
    finally:
        writer.execute(f"DROP SCHEMA IF EXISTS {', '.join(schemas.values())} CASCADE", dbname=DB)


def test_session_settings_follow_each_client(
    sidecar_factory: Callable[..., SidecarProcess], writer: pg.PgNode, settings_schemas: dict[str, str]
) -> None:
    proc = sidecar_factory(_tx(size=1))
    s = settings_schemas
    sets = {
        "A": ["SET application_name = 'client_a'", f"SET search_path = {s['A']}",
              "SET TimeZone = 'Asia/Tokyo'", "SET DateStyle = 'SQL, DMY'", "SET statement_timeout = '300ms'"],
        "B": ["SET application_name = 'client_b'", f"SET search_path = {s['B']}, public",
              "SET TimeZone = 'America/New_York'", "SET DateStyle = 'German'"],
        "C": [],  # everything from the startup packet
    }  # fmt: skip
    startup = {
        "A": {"application_name": "start_a"},
        "B": {},
        "C": {"application_name": "start_c", "options": f"-c search_path={s['C']} -c TimeZone=Europe/Paris"},
    }

    def open_all(connect: Callable[..., psycopg.Connection[Any]]) -> dict[str, psycopg.Connection[Any]]:
        conns = {k: connect(**startup[k]) for k in "ABC"}
        for k, conn in conns.items():
            for stmt in sets[k]:
                conn.execute(stmt)
        return conns

    # The reference: the same three sessions directly on the writer.
    ref_conns = open_all(lambda **kw: _direct(writer, **kw))
    try:
        expected = {k: c.execute(_SETTINGS_PROBE).fetchone() for k, c in ref_conns.items()}
        ref_status = {
            k: tuple(c.info.parameter_status(p) for p in ("application_name", "TimeZone", "DateStyle"))
            for k, c in ref_conns.items()
        }
        for c in ref_conns.values():
            c.execute("RESET ALL")
        expected_reset = {k: c.execute(_SETTINGS_PROBE).fetchone() for k, c in ref_conns.items()}
    finally:
        for c in ref_conns.values():
            c.close()
    assert expected["A"][5] == s["A"] and expected["C"][5] == s["C"]  # type: ignore[index]

    conns = open_all(lambda **kw: _connect(proc, **kw))
    try:
        # Interleave on the single server: every transaction sees its own client's settings.
        for i in range(25):
            for k in ("ABC" if i % 2 else "CBA"):
                conn = conns[k]
                ctx = conn.transaction() if i % 3 == 0 else contextlib.nullcontext()
                with ctx:
                    assert conn.execute(_SETTINGS_PROBE).fetchone() == expected[k], (i, k)
                    assert conn.execute("SELECT v FROM same_t").fetchone() == (k,)
                    assert conn.execute("SHOW TimeZone").fetchone() == (expected[k][2],)  # type: ignore[index]
        # statement_timeout cancels only the client that set it.
        for _ in range(2):
            with pytest.raises(pgerr.QueryCanceled) as ei:
                conns["A"].execute("SELECT pg_sleep(0.6)")
            assert ei.value.sqlstate == "57014"
            assert conns["B"].execute("SELECT pg_sleep(0.4)::text").fetchone() == ("",)
            assert conns["C"].execute("SELECT pg_sleep(0.4)::text").fetchone() == ("",)
        # Concurrently as well.
        def hammer(i: int) -> None:
            k = "ABC"[i]
            for _ in range(30):
                assert conns[k].execute(_SETTINGS_PROBE).fetchone() == expected[k]

        assert _run_threads(hammer, 3) == []
        status = {
            k: tuple(c.info.parameter_status(p) for p in ("application_name", "TimeZone", "DateStyle"))
            for k, c in conns.items()
        }
        assert status == ref_status
        # RESET ALL returns to the startup values (from the startup packet, options included).
        for c in conns.values():
            c.execute("RESET ALL")
        for k in "ABCCBA":
            assert conns[k].execute(_SETTINGS_PROBE).fetchone() == expected_reset[k], k
        assert expected_reset["A"][0] == "start_a" and expected_reset["C"][5] == s["C"]  # type: ignore[index]
        assert conns["A"].info.parameter_status("application_name") == "start_a"
    finally:
        for c in conns.values():
            c.close()


def test_set_config_follows_the_client_and_does_not_leak(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    proc = sidecar_factory(_tx(size=1))
    with _connect(proc) as a, _connect(proc) as b:
        a.execute("SELECT set_config('myapp.tenant', '42', false)")
        assert a.execute("SELECT current_setting('myapp.tenant', true)").fetchone() == ("42",)
        assert b.execute("SELECT current_setting('myapp.tenant', true)").fetchone() in [(None,), ("",)]
        assert a.execute("SELECT current_setting('myapp.tenant', true)").fetchone() == ("42",)


# ---------------------------------------------------------------------------------------------
# 6. Not poolable: refused with 0A000
# ---------------------------------------------------------------------------------------------


def _assert_refused(exc: psycopg.Error) -> None:
    assert exc.sqlstate == "0A000", (exc.sqlstate, str(exc))
    assert str(exc).startswith(REFUSED_PREFIX), str(exc)


@pytest.mark.parametrize("stmt", NOT_POOLABLE.values(), ids=NOT_POOLABLE.keys())
def test_not_poolable_statements_are_refused(
    sidecar: SidecarProcess, writer: pg.PgNode, stmt: str
) -> None:
    t = _name()
    with _connect(sidecar) as conn:
        conn.execute(f"CREATE TABLE {t} (id int)")
        # Simple query protocol (psycopg without parameters), autocommit.
        with pytest.raises(pgerr.FeatureNotSupported) as ei:
            conn.execute(stmt)
        _assert_refused(ei.value)
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
    # Extended protocol, named statement (prepare_threshold=0) and unnamed (binary).
    with _connect(sidecar, prepare_threshold=0) as conn:
        for _ in range(2):
            with pytest.raises(pgerr.FeatureNotSupported) as ei:
                conn.execute(stmt)
            _assert_refused(ei.value)
        with pytest.raises(pgerr.FeatureNotSupported) as ei:
            conn.execute(stmt, binary=True)
        _assert_refused(ei.value)
        assert conn.execute("SELECT %s::int", [3]).fetchone() == (3,)
    # Inside an explicit transaction: the transaction is aborted, ROLLBACK works.
    for prepare_threshold in (None, 0):
        with _connect(sidecar, autocommit=False, prepare_threshold=prepare_threshold) as conn:
            conn.execute(f"INSERT INTO {t} VALUES (1)")
            with pytest.raises(pgerr.FeatureNotSupported) as ei:
                conn.execute(stmt)
            _assert_refused(ei.value)
            with pytest.raises(pgerr.InFailedSqlTransaction) as ei2:
                conn.execute("SELECT 1")
            assert ei2.value.sqlstate == "25P02"
            conn.rollback()
            assert conn.execute("SELECT 'after rollback'").fetchone() == ("after rollback",)
            conn.commit()
    # psql: simple protocol, the session goes on after the error.
    res = _psql(sidecar.host, sidecar.port, "-A", "-t", "-v", "VERBOSITY=verbose",
                "-c", stmt, "-c", "SELECT 'psql alive'")  # fmt: skip
    assert f"ERROR:  0A000: {REFUSED_PREFIX}" in res.stderr, _log(sidecar, res.stderr)
    assert "psql alive" in res.stdout
    # Nothing was left behind on the writer.
    assert _wq(writer, f"SELECT count(*) FROM {t}") == [(0,)]
    assert _wq(writer, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 918273645") == [
        (0,)
    ]
    assert _wq(writer, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'pgsidecar_tx_plan'") == [
        (0,)
    ]


def test_not_poolable_inside_psql_transaction_aborts_it(sidecar: SidecarProcess, tmp_path: Path) -> None:
    t = _name()
    script = tmp_path / "refused.sql"
    script.write_text(
        "\\set VERBOSITY verbose\n"
        f"CREATE TABLE {t} (id int);\n"
        "BEGIN;\n"
        f"INSERT INTO {t} VALUES (1);\n"
        "SELECT pg_advisory_lock(918273645);\n"
        "SELECT 1;\n"
        "ROLLBACK;\n"
        f"SELECT 'rows=' || count(*) FROM {t};\n"
    )
    res = _psql(sidecar.host, sidecar.port, "-A", "-t", "-f", str(script))
    assert res.returncode == 0, _log(sidecar, res.stderr)
    assert f"ERROR:  0A000: {REFUSED_PREFIX}" in res.stderr
    assert "ERROR:  25P02" in res.stderr
    assert "ROLLBACK" in res.stdout and "rows=0" in res.stdout


@pytest.mark.parametrize(
    "stmt",
    [v for k, v in NOT_POOLABLE.items() if k != "advisory-lock"],
    ids=[k for k in NOT_POOLABLE if k != "advisory-lock"],
)
def test_not_poolable_statement_later_in_a_multi_statement_query_is_refused(
    sidecar: SidecarProcess, writer: pg.PgNode, stmt: str
) -> None:
    """Not just the first keyword: LISTEN & co. later in one simple Query are refused too."""
    t = _name()
    with _connect(sidecar) as conn:
        conn.execute(f"CREATE TABLE {t} (id int)")
    res = _psql(sidecar.host, sidecar.port, "-A", "-t", "-c",
                f"BEGIN; INSERT INTO {t} VALUES (2); {stmt}; SELECT 'unreachable'; ROLLBACK;")  # fmt: skip
    assert REFUSED_PREFIX in res.stderr, res.stdout + res.stderr
    assert "unreachable" not in res.stdout
    assert _wq(writer, f"SELECT count(*) FROM {t}") == [(0,)]


def test_session_state_from_a_multi_statement_query_does_not_leak(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    """SET / PREPARE after another statement in one Query must not stay on the shared server."""
    proc = sidecar_factory(_tx(size=1))
    with _connect(proc) as a, _connect(proc) as b:
        a.execute("SELECT 1; SET application_name = 'leaky'")
        assert b.execute("SHOW application_name").fetchone() == ("",)
        assert a.execute("SHOW application_name").fetchone() == ("leaky",)  # and it follows `a`
        with pytest.raises(pgerr.FeatureNotSupported):
            a.execute("SELECT 1; PREPARE leaked_plan AS SELECT 42")
        with pytest.raises(pgerr.InvalidSqlStatementName):
            b.execute("EXECUTE leaked_plan")
        with pytest.raises(pgerr.FeatureNotSupported):
            a.execute("SELECT 1; CREATE TEMP TABLE leaked_temp (x int)")
        assert b.execute("SELECT to_regclass('pg_temp.leaked_temp')").fetchone() == (None,)


@pytest.mark.parametrize("client", ["asyncpg", "pg8000"])
def test_refused_statement_with_parameters_gets_0a000(sidecar: SidecarProcess, client: str) -> None:
    """Parsed without parameter types (asyncpg, pg8000): still 0A000, not a parameter-count error."""
    sql = "SELECT pg_advisory_lock($1)"
    if client == "asyncpg":

        async def main() -> tuple[str | None, int]:
            conn = await _asyncpg(sidecar.host, sidecar.port)
            try:
                try:
                    await conn.fetchval(sql, 918273645)
                    state = None
                except Exception as exc:
                    state = getattr(exc, "sqlstate", repr(exc))
                return state, await conn.fetchval("SELECT 1")
            finally:
                await conn.close()

        state, alive = asyncio.run(main())
    else:
        con = _pg8000(sidecar.host, sidecar.port)
        try:
            try:
                con.run("SELECT pg_advisory_lock(:k)", k=918273645)
                state = None
            except pg8000.native.DatabaseError as exc:
                state = exc.args[0].get("C")
            alive = con.run("SELECT 1")[0][0]
        finally:
            con.close()
    assert (state, alive) == ("0A000", 1)


# ---------------------------------------------------------------------------------------------
# 7. Pipelines and COPY stay on one server
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hammering(sidecar: SidecarProcess, clients: int = 3) -> Iterator[list[int]]:
    """Other clients running short transactions through the same pool meanwhile."""
    stop = threading.Event()
    done = [0]
    errors: list[str] = []

    def hammer() -> None:
        try:
            with _connect(sidecar) as conn:
                while not stop.is_set():
                    with conn.transaction():
                        conn.execute("SELECT pg_backend_pid(), %s::int", (1,))
                    done[0] += 1
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(clients)]
    for th in threads:
        th.start()
    try:
        _wait_for(lambda: done[0] > 10, 5.0)
        yield done
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    assert not errors, errors


def test_pipeline_and_copy_are_never_split_across_servers(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()
    with _connect(sidecar) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, variant text, pid int)")
    variants = [("autocommit", True, None), ("transaction", False, None), ("prepared", False, 0)]
    with _hammering(sidecar) as done:
        before = done[0]
        for label, autocommit, threshold in variants:
            base = {"autocommit": 0, "transaction": 1000, "prepared": 2000}[label]
            with _connect(sidecar, autocommit=autocommit, prepare_threshold=threshold) as conn:
                pid_curs = []
                with conn.pipeline():
                    for i in range(200):
                        if i % 10 == 0:
                            pid_curs.append(conn.execute("SELECT pg_backend_pid()"))
                        else:
                            conn.execute(
                                f"INSERT INTO {t} VALUES (%s, %s, pg_backend_pid())", (base + i, label)
                            )
                if not autocommit:
                    conn.commit()
                pids = {cur.fetchone()[0] for cur in pid_curs}  # type: ignore[index]
                assert len(pids) == 1, (label, pids)
                rows = _wq(
                    writer,
                    f"SELECT count(*), count(DISTINCT pid), min(pid) FROM {t} WHERE variant = %s",
                    (label,),
                )
                assert rows == [(180, 1, next(iter(pids)))], (label, rows)

        # COPY FROM STDIN of 50k rows inside a transaction: one backend before, during and after.
        with _connect(sidecar, autocommit=False) as conn:
            pid_before = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            data = "".join(f"{i}\tcopy\t0\n" for i in range(10_000, 60_000)).encode()
            with conn.cursor().copy(f"COPY {t} (id, variant, pid) FROM STDIN") as copy:
                for off in range(0, len(data), 64 * 1024):
                    copy.write(data[off : off + 64 * 1024])
            pid_after = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
            assert conn.execute(f"SELECT count(*) FROM {t} WHERE variant = 'copy'").fetchone() == (50_000,)
            conn.commit()
        assert pid_before == pid_after
        assert done[0] > before, "the other clients made no progress meanwhile"
    assert _wq(writer, f"SELECT count(*), sum(id) FROM {t} WHERE variant = 'copy'") == [
        (50_000, sum(range(10_000, 60_000)))
    ]


# ---------------------------------------------------------------------------------------------
# 8. A client that vanishes mid-transaction
# ---------------------------------------------------------------------------------------------


def _idle_in_transaction(writer: pg.PgNode, table: str) -> list[tuple[Any, ...]]:
    return _wq(
        writer,
        "SELECT pid, state, query FROM pg_stat_activity WHERE usename = %s AND datname = %s"
        " AND state LIKE 'idle in transaction%%' AND query LIKE %s",
        (USER, DB, f"%{table}%"),
        dbname="postgres",
    )


def test_client_killed_mid_transaction_leaves_nothing_open(
    sidecar: SidecarProcess, writer: pg.PgNode
) -> None:
    t = _name()
    with _connect(sidecar) as bystander:
        bystander.execute(f"CREATE TABLE {t} (id int PRIMARY KEY)")

        # psycopg: BEGIN + INSERT, then the socket is shut down under libpq's feet.
        victim = _connect(sidecar, autocommit=False)
        victim.execute(f"INSERT INTO {t} VALUES (1)")
        assert _idle_in_transaction(writer, t), "the victim's transaction should be open"
        sock = socket.socket(fileno=os.dup(victim.fileno()))
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        assert _wait_for(lambda: not _idle_in_transaction(writer, t), 5.0), _log(
            sidecar, f"transaction still open: {_idle_in_transaction(writer, t)}"
        )
        with contextlib.suppress(Exception):
            victim.close()
        assert bystander.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)

        # psql killed with SIGKILL in the middle of a transaction.
        proc = subprocess.Popen(
            _psql_argv(sidecar.host, sidecar.port, "-A", "-t"),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_tool_env(),
            text=True,
        )
        try:
            assert proc.stdin is not None
            proc.stdin.write(f"BEGIN;\nINSERT INTO {t} VALUES (2);\n")
            proc.stdin.flush()
            assert _wait_for(lambda: bool(_idle_in_transaction(writer, t)), 10), "psql never got going"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert _wait_for(lambda: not _idle_in_transaction(writer, t), 5.0), _log(
            sidecar, f"transaction still open: {_idle_in_transaction(writer, t)}"
        )

        # Everyone else carries on.
        assert bystander.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        with bystander.transaction():
            bystander.execute(f"INSERT INTO {t} VALUES (3)")
        with _connect(sidecar) as fresh:
            assert fresh.execute(f"SELECT array_agg(id) FROM {t}").fetchone() == ([3],)
    assert _wq(writer, f"SELECT id FROM {t}") == [(3,)]
    assert not _wq(
        writer,
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND datname = %s"
        " AND state LIKE 'idle in transaction%%'",
        (USER, DB),
        dbname="postgres",
    )


# ---------------------------------------------------------------------------------------------
# 9. checkout_timeout and FIFO waiting
# ---------------------------------------------------------------------------------------------


def test_cancel_reaches_the_server_running_that_clients_query(sidecar: SidecarProcess) -> None:
    """A CancelRequest carries the key the sidecar gave its client; in transaction mode it must
    reach the server that runs that client's query now, and no other: two clients sleep on the
    two servers, one is cancelled (57014 at once), the other's sleep finishes untouched."""
    with _connect(sidecar) as victim, _connect(sidecar) as bystander, ThreadPoolExecutor(2) as pool:
        # Both sleeps at once: each takes one of the pool's two servers.
        bystanding = pool.submit(lambda: bystander.execute("SELECT pg_sleep(2), 'slept'").fetchone())
        t0 = time.monotonic()
        sleeping = pool.submit(lambda: victim.execute("SELECT pg_sleep(30)"))
        time.sleep(0.5)
        victim.cancel_safe(timeout=5)
        with pytest.raises(pgerr.QueryCanceled):
            sleeping.result(timeout=10)
        assert time.monotonic() - t0 < 5
        assert bystanding.result(timeout=10) == ("", "slept")
        for conn in (victim, bystander):  # both go on, on whichever server comes next
            assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


def test_jdbc_query_timeout_cancels_only_its_statement(sidecar: SidecarProcess) -> None:
    """pgjdbc's Statement.setQueryTimeout sends a CancelRequest when the time is up."""
    out = jdbc.run_source(jdbc.QUERY_TIMEOUT, sidecar.host, str(sidecar.port), DB, USER, PASSWORD)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == ["cancelled", "57014", "usable"], out.stdout


def test_checkout_timeout_and_fifo(
    sidecar_factory: Callable[..., SidecarProcess], writer: pg.PgNode
) -> None:
    proc = sidecar_factory(_tx(size=1, checkout_timeout="1s"))
    t = _name()
    with _connect(proc) as conn:
        conn.execute(f"CREATE TABLE {t} (seq bigserial PRIMARY KEY, who text)")

    # A holds the only server; B's query waits checkout_timeout and gets 53300.
    holder = _connect(proc, autocommit=False)
    waiter = _connect(proc)
    try:
        holder.execute(f"INSERT INTO {t} (who) VALUES ('holder')")
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as ei:
            waiter.execute("SELECT 1")
        waited = time.monotonic() - started
        assert ei.value.sqlstate == "53300", str(ei.value)
        assert "pool.checkout_timeout" in str(ei.value)
        assert 0.8 <= waited < 5, waited
        holder.commit()
    finally:
        holder.close()
        with contextlib.suppress(Exception):
            waiter.close()
    with _connect(proc) as fresh:
        assert fresh.execute(f"SELECT who FROM {t}").fetchall() == [("holder",)]

    # FIFO: three clients queue up behind a held transaction; they are served in arrival order.
    holder = _connect(proc, autocommit=False)
    queued = {name: _connect(proc) for name in ("w1", "w2", "w3")}
    finished: list[str] = []
    try:
        holder.execute("SELECT 1")

        def wait_turn(i: int) -> None:
            name = f"w{i + 1}"
            queued[name].execute(f"INSERT INTO {t} (who) VALUES (%s)", (name,))
            finished.append(name)

        threads = []
        for i in range(3):
            th = threading.Thread(target=wait_turn, args=(i,))
            th.start()
            threads.append(th)
            # The next one starts only once this one waits in the pool's queue: arrival order is
            # then certain, also on a loaded machine (a fixed pause was not).
            assert _wait_for(partial(_pool_has_waiting, proc, i + 1), 10.0), _log(proc, "not queued")
        time.sleep(0.1)
        assert finished == [], "a waiter was served while the only server was held"
        holder.commit()
        for th in threads:
            th.join(10)
    finally:
        holder.close()
        for c in queued.values():
            c.close()
    # Served in arrival order: the order the INSERTs ran in (their seq), not the order the client
    # threads woke up in, which a loaded machine shuffles by a round trip or two.
    assert sorted(finished) == ["w1", "w2", "w3"], _log(proc, str(finished))
    assert _wq(writer, f"SELECT who FROM {t} ORDER BY seq") == [("holder",), ("w1",), ("w2",), ("w3",)]


# ---------------------------------------------------------------------------------------------
# 10. SQLAlchemy and pgbench
# ---------------------------------------------------------------------------------------------


def test_sqlalchemy_queue_pool(
    sidecar_factory: Callable[..., SidecarProcess], writer: pg.PgNode, scratch_db: str
) -> None:
    proc = sidecar_factory(_tx(size=3))
    t = _name()

    metadata, Item = item_model(t)
    url = sqlalchemy_url(proc.host, proc.port, scratch_db)
    engine = sa.create_engine(url, poolclass=sa.QueuePool, pool_size=5, max_overflow=5, pool_timeout=30)
    try:
        metadata.create_all(engine)
        make_session = orm.sessionmaker(engine)

        def work(worker: int) -> list[str]:
            out: list[str] = []
            for rnd in range(3):
                with make_session() as session, session.begin():
                    session.add_all(Item(worker=worker, label=f"w{worker}-{rnd}-{j}") for j in range(5))
                with make_session() as session:
                    out = list(
                        session.scalars(sa.select(Item.label).where(Item.worker == worker).order_by(Item.id))
                    )
            return out

        with ThreadPoolExecutor(max_workers=16) as ex:
            results = list(ex.map(work, range(16)))
        assert results == [
            [f"w{w}-{r}-{j}" for r in range(3) for j in range(5)] for w in range(16)
        ]
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(Item.__table__)) == 240
    finally:
        engine.dispose()
    assert _wq(writer, f"SELECT count(*), count(DISTINCT worker) FROM {t}", dbname=scratch_db) == [(240, 16)]


def test_pgbench_all_query_modes(
    sidecar_factory: Callable[..., SidecarProcess], writer: pg.PgNode, scratch_db: str
) -> None:
    proc = sidecar_factory(_tx(size=3))
    init = _pgbench(proc, scratch_db, "-i", "-s", "1", "-q")
    assert init.returncode == 0, _log(proc, init.stderr)
    assert _wq(writer, "SELECT count(*) FROM pgbench_accounts", dbname=scratch_db) == [(100_000,)]
    total = 0
    # -M prepared with -j 8, not -j 2: see test_pgbench_prepared_clients_sharing_a_thread.
    for mode, threads in (("simple", "2"), ("extended", "2"), ("prepared", "8")):
        res = _pgbench(proc, scratch_db, "-c", "8", "-j", threads, "-T", "3", "-M", mode, "-n")
        out = res.stdout + res.stderr
        assert res.returncode == 0, _log(proc, f"-M {mode}: {out}")
        assert re.search(r"number of failed transactions: 0\b", out), out
        m = re.search(r"number of transactions actually processed: (\d+)", out)
        assert m and int(m.group(1)) > 0, out
        total += int(m.group(1))
    assert _wq(writer, "SELECT count(*) FROM pgbench_history", dbname=scratch_db) == [(total,)]
    # Never more than pool.size servers for the 8 clients (the sidecar's: the superuser connection
    # that just counted pgbench_history may still be exiting).
    assert len(_wq(writer, "SELECT pid FROM pg_stat_activity WHERE datname = %s AND usename = %s",
                   (scratch_db, USER), dbname="postgres")) <= 3  # fmt: skip


def test_pgbench_prepared_clients_sharing_a_thread(
    sidecar_factory: Callable[..., SidecarProcess], tmp_path: Path
) -> None:
    proc = sidecar_factory(_tx(size=3, checkout_timeout="500ms"))
    script = tmp_path / "tx.sql"
    script.write_text("BEGIN;\nSELECT 1;\nEND;\n")
    res = _pgbench(proc, DB, "-c", "8", "-j", "2", "-t", "3", "-M", "prepared", "-n", "-f", str(script))
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert re.search(r"number of failed transactions: 0\b", out), out


def test_a_statement_the_pool_knows_is_prepared_without_waiting_for_a_server(
    sidecar_factory: Callable[..., SidecarProcess], writer: pg.PgNode
) -> None:
    # pool.size 1, and the one server is held by client A's open transaction: client B's PQprepare
    # (Parse+Sync) of a statement the server already has is answered by the sidecar, where waiting
    # for a server would end in 53300 after checkout_timeout.
    proc = sidecar_factory(_tx(size=1, checkout_timeout="1s"))
    table = _name()
    _wq(writer, f"CREATE TABLE {table} (v int)")
    _wq(writer, f"INSERT INTO {table} VALUES (41)")
    _wq(writer, f"GRANT SELECT ON {table} TO {USER}")
    sql = f"SELECT v + $1::int FROM {table}".encode()
    with _connect(proc) as a, _connect(proc) as b:
        assert a.pgconn.prepare(b"mine", sql).status == psycopg.pq.ExecStatus.COMMAND_OK
        a.execute("BEGIN")
        prepared = b.pgconn.prepare(b"theirs", sql)
        assert prepared.status == psycopg.pq.ExecStatus.COMMAND_OK, prepared.error_message
        a.execute("COMMIT")
        res = b.pgconn.exec_prepared(b"theirs", [b"1"])
        assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
        assert res.get_value(0, 0) == b"42"
        # What the text could still raise comes at the first run, as PostgreSQL would say it then.
        _wq(writer, f"DROP TABLE {table}")
        again = b.pgconn.prepare(b"later", sql)
        assert again.status == psycopg.pq.ExecStatus.COMMAND_OK, again.error_message
        failed = b.pgconn.exec_prepared(b"later", [b"1"])
        assert failed.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42P01"
        assert b.execute("SELECT 7").fetchone() == (7,)  # the session carries on


def _gauges(proc: SidecarProcess, name: str) -> dict[str, float]:
    """`pgsidecar_<name>` samples by their `state` label."""
    with urllib.request.urlopen(proc.metrics_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"pgsidecar_{name}":
                state = sample.labels["state"]
                out[state] = out.get(state, 0.0) + sample.value
    return out


def _pool_has_waiting(proc: SidecarProcess, n: int) -> bool:
    return _pool_waiting(proc) >= n


def _pool_waiting(proc: SidecarProcess) -> float:
    with urllib.request.urlopen(proc.metrics_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pgsidecar_pool_waiting_clients"
    )


def _pid(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]


def test_a_server_kept_between_transactions_goes_to_whoever_needs_it(
    sidecar_factory: Callable[..., SidecarProcess], writer: pg.PgNode
) -> None:
    # Between transactions a client keeps its server while nobody else needs one (its next
    # transaction starts without a checkout). With pool.size 1 every other client needs it: each
    # takes it over at once, where a kept server never handed over would end in 53300 after
    # checkout_timeout.
    proc = sidecar_factory(_tx(size=1, checkout_timeout="1s"))
    app = _name("kept")  # tells this pool's server apart from other tests' on the same writer
    with _connect(proc, application_name=app) as a, _connect(proc, application_name=app) as b:
        pid = _pid(a)
        # Kept by A, but counted as what it is: an idle server, and A an idle client.
        assert _gauges(proc, "server_connections") == {"idle": 1.0}
        assert _gauges(proc, "client_connections").get("active", 0.0) == 0.0
        for i in range(40):
            conn = a if i % 2 else b
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
        assert _pid(b) == pid
        # A cancel for a client between transactions reaches no server: the one it keeps may be
        # taken over by another client before the cancel lands.
        offset = proc.log_offset()
        b.cancel()
        proc.wait_for_log("event=cancel_ignored", since=offset)
        assert "event=cancel_forwarded" not in proc.log_text()[offset:]
        # A transaction block keeps the server from the others until it ends.
        with _connect(proc, application_name=app) as c, a.transaction():
            a.execute("SELECT 1")
            with pytest.raises(psycopg.Error) as ei:
                c.execute("SELECT 2")
            assert ei.value.sqlstate == "53300", str(ei.value)
        assert b.execute("SELECT 3").fetchone() == (3,)
        servers = _wq(
            writer,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (app,),
            "postgres",
        )
        assert servers == [(1,)]

        # The kept server is terminated while B keeps it: B's next statement runs on a new one.
        offset = proc.log_offset()
        _wq(writer, "SELECT pg_terminate_backend(%s)", (pid,), "postgres")
        proc.wait_for_log("event=session_cut", since=offset)
        assert b.execute("SELECT 4").fetchone() == (4,)
        assert _pid(b) != pid
        assert a.execute("SELECT 5").fetchone() == (5,)


def test_kept_servers_are_reused_before_a_new_connection_is_opened(
    sidecar_factory: Callable[..., SidecarProcess], writer: pg.PgNode
) -> None:
    # Clients that take turns never run two transactions at once: however many servers the pool
    # may open, one serves them all (each keeps it only until the next one needs it).
    proc = sidecar_factory(_tx(size=5))
    app = _name("turns")
    conns = [_connect(proc, application_name=app) for _ in range(4)]
    try:
        for i in range(10):
            for conn in conns:
                assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        servers = _wq(
            writer, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,), "postgres"
        )
        assert servers == [(1,)], _log(proc, str(servers))
    finally:
        for conn in conns:
            conn.close()
