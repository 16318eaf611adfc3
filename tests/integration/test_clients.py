"""P1 transparency: real clients work through the sidecar as they do directly.

One sidecar (default config: scram-sha-256, the harness users, shared_topology upstream) serves the
whole module. Every test makes its own uuid-suffixed tables, so tests are independent of each
other and of the rest of the session; writes are checked on the writer (a1) directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest
import sqlalchemy as sa
from psycopg import errors as pgerr
from sqlalchemy import orm

from tests.harness import jdbc, node_pg, pg, workloads
from tests.harness.clients import (
    CONNECT_TIMEOUT,
    DB,
    PASSWORD,
    USER,
    item_model,
    psql,
    scratch_database,
    sqlalchemy_url,
)
from tests.harness.clients import connect as _connect
from tests.harness.clients import direct as _direct
from tests.harness.clients import pgbench as _pgbench
from tests.harness.clients import query_writer as _wq
from tests.harness.clients import unique_name as _name
from tests.harness.clients import with_log as _fail_with_log
from tests.harness.sidecar import SidecarProcess, sidecar_config

# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sidecar(
    shared_topology: pg.Topology, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    """One sidecar with the default config for every test of this module."""
    with SidecarProcess(sidecar_config(shared_topology), tmp_path_factory.mktemp("clients-sidecar")) as proc:
        yield proc


@pytest.fixture
def writer(shared_topology: pg.Topology) -> pg.PgNode:
    return shared_topology.a1


def _psql(sidecar: SidecarProcess, *args: str, dbname: str = DB) -> subprocess.CompletedProcess[str]:
    return psql(sidecar.host, sidecar.port, *args, dbname=dbname)


@pytest.fixture
def scratch_db(writer: pg.PgNode) -> Iterator[str]:
    """A fresh database on the writer owned by app_scram."""
    with scratch_database(writer) as name:
        yield name


# ---------------------------------------------------------------------------------------------
# psql
# ---------------------------------------------------------------------------------------------


def test_psql_c_queries(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()
    res = _psql(
        sidecar,
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        f"CREATE TABLE {t} (id int PRIMARY KEY, v text)",
        "-c",
        f"INSERT INTO {t} VALUES (1, 'one'), (2, 'two')",
        "-c",
        f"SELECT id || ':' || v FROM {t} ORDER BY id",
        "-c",
        "SELECT current_user, current_database()",
    )
    assert res.returncode == 0, _fail_with_log(sidecar, res.stderr)
    lines = res.stdout.splitlines()
    assert "1:one" in lines and "2:two" in lines
    assert f"{USER}|{DB}" in lines
    assert _wq(writer, f"SELECT id, v FROM {t} ORDER BY id") == [(1, "one"), (2, "two")]


def test_psql_copy_in_and_out(sidecar: SidecarProcess, writer: pg.PgNode, tmp_path: Path) -> None:
    t = _name()
    src = tmp_path / "in.csv"
    rows = [f'{i},name {i},"quoted, {i}"' for i in range(1, 1001)]
    src.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.csv"
    res = _psql(
        sidecar,
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        f"CREATE TABLE {t} (id int PRIMARY KEY, a text, b text)",
        "-c",
        f"\\copy {t} FROM '{src}' WITH (FORMAT csv)",
        "-c",
        f"\\copy (SELECT * FROM {t} ORDER BY id) TO '{out}' WITH (FORMAT csv)",
    )
    assert res.returncode == 0, _fail_with_log(sidecar, res.stderr)
    assert "COPY 1000" in res.stdout
    assert out.read_text() == src.read_text()
    assert _wq(writer, f"SELECT count(*), sum(id) FROM {t}") == [(1000, 500500)]
    assert _wq(writer, f"SELECT b FROM {t} WHERE id = 7") == [("quoted, 7",)]


def test_psql_script_on_error_stop(sidecar: SidecarProcess, writer: pg.PgNode, tmp_path: Path) -> None:
    t = _name()
    script = tmp_path / "script.sql"
    script.write_text(
        "\\set VERBOSITY verbose\n"
        f"CREATE TABLE {t} (id int);\n"
        f"INSERT INTO {t} VALUES (1);\n"
        "SELECT 1/0;\n"
        f"INSERT INTO {t} VALUES (2);\n"
    )
    res = _psql(sidecar, "-v", "ON_ERROR_STOP=1", "-f", str(script))
    assert res.returncode == 3, _fail_with_log(sidecar, f"rc={res.returncode} {res.stderr}")
    assert "22012" in res.stderr and "division by zero" in res.stderr
    # Stopped at the error: the statement after it never ran.
    assert _wq(writer, f"SELECT id FROM {t}") == [(1,)]


# ---------------------------------------------------------------------------------------------
# psycopg 3
# ---------------------------------------------------------------------------------------------


def test_psycopg_simple_query(sidecar: SidecarProcess) -> None:
    with _connect(sidecar) as conn:
        # No parameters: psycopg sends a simple Query, so several statements may share one string.
        cur = conn.execute("SELECT 1 AS a, 'x' AS b; SELECT 2, NULL::text")
        assert cur.fetchall() == [(1, "x")]
        assert [d.name for d in cur.description or []] == ["a", "b"]
        assert cur.nextset()
        assert cur.fetchall() == [(2, None)]
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (USER, DB)
        assert conn.info.server_version >= 150000
        assert conn.info.parameter_status("server_encoding") == "UTF8"


def test_psycopg_parameters(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()
    with _connect(sidecar) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text, n numeric, b bytea, j jsonb)")
        blob = bytes(range(256))
        conn.execute(
            f"INSERT INTO {t} VALUES (%s, %s, %s, %s, %s::jsonb)",
            (1, "héllo ✓", 12.5, blob, '{"k": [1, 2]}'),
        )
        row = conn.execute(f"SELECT v, n, b, j FROM {t} WHERE id = %(id)s", {"id": 1}).fetchone()
        assert row is not None
        assert row[0] == "héllo ✓" and float(row[1]) == 12.5 and row[2] == blob and row[3] == {"k": [1, 2]}
        # Binary results as well.
        cur = conn.cursor(binary=True)
        assert cur.execute("SELECT %s::int8 * 2, %s::text", (21, "bin")).fetchone() == (42, "bin")
    assert _wq(writer, f"SELECT v, b FROM {t}") == [("héllo ✓", blob)]


def test_psycopg_extended_protocol_unprepared(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()
    with _connect(sidecar) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        for i in range(20):
            conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, f"v{i}"), prepare=False)
        got = conn.execute(
            f"SELECT id, v FROM {t} WHERE id >= %s ORDER BY id", (15,), prepare=False
        ).fetchall()
        assert got == [(i, f"v{i}") for i in range(15, 20)]
        # Nothing was prepared by name on the server.
        assert conn.execute("SELECT count(*) FROM pg_prepared_statements", prepare=False).fetchone() == (0,)
    assert _wq(writer, f"SELECT count(*) FROM {t}") == [(20,)]


def test_psycopg_pipeline(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()
    with _connect(sidecar) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        with conn.pipeline() as p:
            cur = conn.cursor()
            for i in range(500):
                cur.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, f"v{i}"))
            p.sync()
            cur.executemany(f"INSERT INTO {t} VALUES (%s, %s)", [(i, f"w{i}") for i in range(500, 1000)])
            sel = conn.execute(f"SELECT count(*), sum(id) FROM {t}")
            one = conn.execute("SELECT %s::text", ("after",))
        assert sel.fetchone() == (1000, sum(range(1000)))
        assert one.fetchone() == ("after",)
        # An error inside a pipeline aborts the rest of that pipeline's batch, and the connection
        # carries on afterwards.
        with pytest.raises(pgerr.UniqueViolation), conn.pipeline():
            conn.execute(f"INSERT INTO {t} VALUES (%s, 'dup')", (1,))
            conn.execute(f"INSERT INTO {t} VALUES (%s, 'never')", (5000,))
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert _wq(writer, f"SELECT count(*) FROM {t}") == [(1000,)]


def test_psycopg_copy_in_and_out(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()
    n = 10_000
    with _connect(sidecar) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text, f float8)")
        cur = conn.cursor()
        with cur.copy(f"COPY {t} (id, v, f) FROM STDIN") as copy:
            for i in range(n):
                copy.write_row((i, f"row\t{i}\n", i / 4))
        assert cur.rowcount == n
        with cur.copy(f"COPY (SELECT id, v, f FROM {t} ORDER BY id) TO STDOUT") as copy:
            copy.set_types(["int4", "text", "float8"])
            out = list(copy.rows())
        assert out == [(i, f"row\t{i}\n", i / 4) for i in range(n)]
        # Binary COPY both ways as well.
        t2 = _name()
        conn.execute(f"CREATE TABLE {t2} (id int, v text)")
        with cur.copy(f"COPY {t2} FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text"])
            for i in range(1000):
                copy.write_row((i, f"b{i}"))
        with cur.copy(f"COPY (SELECT * FROM {t2} ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "text"])
            assert list(copy.rows()) == [(i, f"b{i}") for i in range(1000)]
        # A COPY that fails mid-stream reports the error and the connection goes on.
        with pytest.raises(pgerr.InvalidTextRepresentation), cur.copy(f"COPY {t2} FROM STDIN") as copy:
            copy.write(b"1\tok\nnot-a-number\tbad\n")
        assert conn.execute(f"SELECT count(*) FROM {t2}").fetchone() == (1000,)
    assert _wq(writer, f"SELECT count(*), sum(id) FROM {t}") == [(n, sum(range(n)))]
    assert _wq(writer, f"SELECT v FROM {t} WHERE id = 42") == [("row\t42\n",)]


def test_psycopg_server_side_cursor(sidecar: SidecarProcess) -> None:
    n = 50_000
    with _connect(sidecar, autocommit=False) as conn:
        with conn.cursor(name=_name("cur")) as cur:
            cur.itersize = 5000
            cur.execute("SELECT i, md5(i::text) FROM generate_series(1, %s) AS i", (n,))
            batches = 0
            total = 0
            count = 0
            while batch := cur.fetchmany(7000):
                batches += 1
                count += len(batch)
                total += sum(r[0] for r in batch)
            assert (count, total) == (n, n * (n + 1) // 2)
            assert batches == -(-n // 7000)
        # A WITH HOLD cursor survives the commit, and iterating uses itersize batches.
        with conn.cursor(name=_name("hold"), withhold=True) as cur:
            cur.itersize = 1000
            cur.execute("SELECT generate_series(1, 3000)")
            conn.commit()
            assert sum(r[0] for r in cur) == 3000 * 3001 // 2
        conn.commit()


def test_psycopg_prepared_statements(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()
    with _connect(sidecar, prepare_threshold=0) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        for i in range(300):
            conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, f"v{i}"))
        for i in range(0, 300, 7):
            assert conn.execute(f"SELECT v FROM {t} WHERE id = %s", (i,)).fetchone() == (f"v{i}",)
        assert conn.execute("SELECT %s::int * 2", (21,)).fetchone() == (42,)
        stmts = conn.execute("SELECT name, statement FROM pg_prepared_statements").fetchall()
        # Each distinct query was prepared once by name (psycopg's _pg3_N) and reused.
        assert any(f"INSERT INTO {t}" in s for _, s in stmts), stmts
        assert any(f"SELECT v FROM {t}" in s for _, s in stmts), stmts
        assert all(name.startswith("_pg3_") for name, _ in stmts)
        # A statement invalidated by DDL is re-prepared transparently by the server.
        conn.execute(f"ALTER TABLE {t} ADD COLUMN extra int DEFAULT 5")
        assert conn.execute(f"SELECT v FROM {t} WHERE id = %s", (3,)).fetchone() == ("v3",)
    assert _wq(writer, f"SELECT count(*) FROM {t}") == [(300,)]


def test_psycopg_large_result_and_parameter(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    with _connect(sidecar) as conn:
        rows = conn.execute("SELECT i, repeat('x', 1000000) FROM generate_series(1, 20) AS i").fetchall()
        assert [r[0] for r in rows] == list(range(1, 21))
        assert all(r[1] == "x" * 1_000_000 for r in rows)
        # And the other way: an 8 MB parameter reaches the server intact.
        t = _name()
        conn.execute(f"CREATE TABLE {t} (id int, v text)")
        big = "".join(chr(ord("a") + i % 26) for i in range(8 * 1024 * 1024))
        conn.execute(f"INSERT INTO {t} VALUES (1, %s)", (big,))
        assert conn.execute(f"SELECT length(v), md5(v) FROM {t}").fetchone() == (
            len(big),
            _wq(writer, "SELECT md5(%s)", (big,))[0][0],
        )
    assert _wq(writer, f"SELECT v = %s FROM {t}", (big,)) == [(True,)]


def test_psycopg_listen_notify(sidecar: SidecarProcess) -> None:
    channel = _name("chan")
    with _connect(sidecar) as listener, _connect(sidecar) as notifier:
        listener.execute(f"LISTEN {channel}")
        notifier.execute(f"NOTIFY {channel}, 'hello through the sidecar'")
        notifier.execute("SELECT pg_notify(%s, %s)", (channel, "second"))
        got = list(listener.notifies(timeout=5, stop_after=2))
        assert [(n.channel, n.payload) for n in got] == [
            (channel, "hello through the sidecar"),
            (channel, "second"),
        ]
        # The listener still answers queries after consuming notifications.
        assert listener.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_cancel(sidecar: SidecarProcess) -> None:
    with _connect(sidecar) as conn:
        started = threading.Event()

        def cancel_soon() -> None:
            started.wait(5)
            time.sleep(0.5)
            conn.cancel_safe(timeout=5)

        th = threading.Thread(target=cancel_soon, daemon=True)
        th.start()
        t0 = time.monotonic()
        started.set()
        with pytest.raises(pgerr.QueryCanceled) as ei:
            conn.execute("SELECT pg_sleep(30)")
        elapsed = time.monotonic() - t0
        th.join(5)
        assert ei.value.sqlstate == "57014"
        assert elapsed < 5, _fail_with_log(sidecar, f"cancel took {elapsed:.1f}s")
        assert conn.execute("SELECT 'still usable'").fetchone() == ("still usable",)
        # The old (non-thread-safe) libpq PQcancel path as well.
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(pgerr.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        timer.join()
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_psycopg_error_in_transaction(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()
    with _connect(sidecar, autocommit=False) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        conn.commit()
        conn.execute(f"INSERT INTO {t} VALUES (1)")
        with pytest.raises(pgerr.DivisionByZero) as ei:
            conn.execute("SELECT 1/0")
        assert ei.value.sqlstate == "22012"
        with pytest.raises(pgerr.InFailedSqlTransaction) as ei2:
            conn.execute("SELECT 1")
        assert ei2.value.sqlstate == "25P02"
        conn.rollback()
        conn.execute(f"INSERT INTO {t} VALUES (2)")
        with pytest.raises(pgerr.UniqueViolation):
            conn.execute(f"INSERT INTO {t} VALUES (2)")
        conn.rollback()
        conn.execute(f"INSERT INTO {t} VALUES (3)")
        conn.commit()
        assert conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {t}").fetchone() == ([3],)
    assert _wq(writer, f"SELECT id FROM {t}") == [(3,)]


def test_psycopg_set_and_show(sidecar: SidecarProcess) -> None:
    with _connect(sidecar) as conn:
        conn.execute("SET work_mem = '7MB'")
        assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
        conn.execute("SET application_name = 'renamed'")
        assert conn.info.parameter_status("application_name") == "renamed"
        conn.execute("SET TIME ZONE 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert conn.execute("SELECT current_setting('TimeZone')").fetchone() == ("Asia/Tokyo",)
        conn.execute("SELECT set_config('statement_timeout', '1234', false)")
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)


def test_psycopg_application_name_visible_on_writer(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    app = _name("app")
    with _connect(sidecar, application_name=app) as conn:
        assert conn.execute("SHOW application_name").fetchone() == (app,)
        assert conn.info.parameter_status("application_name") == app
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        rows = _wq(
            writer,
            "SELECT pid, usename, datname FROM pg_stat_activity WHERE application_name = %s",
            (app,),
            dbname="postgres",
        )
        assert rows == [(pid, USER, DB)]


def _make_schema_with_table(sidecar: SidecarProcess) -> str:
    schema = _name("s")
    with _connect(sidecar) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.only_here (v text)")
        conn.execute(f"INSERT INTO {schema}.only_here VALUES ('found')")
    return schema


def test_psycopg_client_encoding_and_options(sidecar: SidecarProcess) -> None:
    schema = _make_schema_with_table(sidecar)
    options = f"-c search_path={schema} -c statement_timeout=4321 --lock-timeout=2s"
    with _connect(sidecar, client_encoding="LATIN1", options=options) as conn:
        assert conn.info.encoding == "iso8859-1"
        assert conn.info.parameter_status("client_encoding") == "LATIN1"
        assert conn.execute("SHOW client_encoding").fetchone() == ("LATIN1",)
        assert conn.execute("SHOW search_path").fetchone() == (schema,)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("4321ms",)
        assert conn.execute("SHOW lock_timeout").fetchone() == ("2s",)
        assert conn.execute("SELECT v FROM only_here").fetchone() == ("found",)
        # Latin-1 text is converted by the server both ways.
        row = conn.execute(
            "SELECT %s::text, length(%s::text), convert_to(%s, 'UTF8')", ("café", "café", "é")
        ).fetchone()
        assert row == ("café", 4, b"\xc3\xa9")


def test_psycopg_options_list_valued_setting(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    schema = _make_schema_with_table(sidecar)
    options = f"-c search_path={schema},public"
    query = "SELECT current_setting('search_path'), current_schemas(false)"
    with _direct(writer, options=options) as conn:
        direct = conn.execute(query).fetchone()
    assert direct == (f"{schema},public", [schema, "public"])
    with _connect(sidecar, options=options) as conn:
        assert conn.execute(query).fetchone() == direct
        assert conn.execute("SELECT v FROM only_here").fetchone() == ("found",)


def test_psycopg_reset_restores_startup_settings(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    # Startup parameters are the session defaults: RESET (asyncpg's pool runs RESET ALL on every
    # release) returns to them, not to the server's defaults.
    app = _name("app")
    kwargs: dict[str, Any] = {"application_name": app, "options": "-c work_mem=5MB"}
    query = "SELECT current_setting('application_name'), current_setting('work_mem')"
    connectors: list[Callable[[], psycopg.Connection[Any]]] = [
        lambda: _direct(writer, **kwargs),
        lambda: _connect(sidecar, **kwargs),
    ]
    for connect in connectors:
        with connect() as conn:
            conn.execute("SET application_name = 'changed'")
            conn.execute("SET work_mem = '9MB'")
            assert conn.execute(query).fetchone() == ("changed", "9MB")
            conn.execute("RESET ALL")
            assert conn.execute(query).fetchone() == (app, "5MB")
            assert conn.info.parameter_status("application_name") == app


def test_psycopg_async(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()

    async def main() -> None:
        aconn = await psycopg.AsyncConnection.connect(
            sidecar.dsn(USER, connect_timeout=CONNECT_TIMEOUT), autocommit=True
        )
        async with aconn:
            cur = await aconn.execute("SELECT 1 + %s::int, current_user", (41,))
            assert await cur.fetchone() == (42, USER)
            await aconn.execute(f"CREATE TABLE {t} (id int)")
            async with aconn.transaction():
                acur = aconn.cursor()
                await acur.executemany(f"INSERT INTO {t} VALUES (%s)", [(i,) for i in range(100)])
            cur = await aconn.execute(f"SELECT count(*) FROM {t}")
            assert await cur.fetchone() == (100,)
            # Several connections at once on one event loop.
            conns = [
                await psycopg.AsyncConnection.connect(sidecar.dsn(USER, connect_timeout=CONNECT_TIMEOUT))
                for _ in range(5)
            ]
            try:
                results = await asyncio.gather(
                    *(c.execute("SELECT pg_sleep(0.2), %s::int", (i,)) for i, c in enumerate(conns))
                )
                assert [(await r.fetchone())[1] for r in results] == list(range(5))  # type: ignore[index]
            finally:
                for c in conns:
                    await c.close()

    asyncio.run(main())
    assert _wq(writer, f"SELECT count(*) FROM {t}") == [(100,)]


# ---------------------------------------------------------------------------------------------
# pg8000 (native API)
# ---------------------------------------------------------------------------------------------


def test_pg8000_native(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()
    con = pg8000.native.Connection(
        USER, host=sidecar.host, port=sidecar.port, database=DB, password=PASSWORD, timeout=30
    )
    try:
        assert con.run("SELECT :a::int + :b::int, :s::text", a=40, b=2, s="pg8000") == [[42, "pg8000"]]
        con.run(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        for i in range(10):
            con.run(f"INSERT INTO {t} VALUES (:id, :v)", id=i, v=f"v{i}")
        assert con.run(f"SELECT id, v FROM {t} WHERE id < :n ORDER BY id", n=3) == [
            [0, "v0"],
            [1, "v1"],
            [2, "v2"],
        ]
        ps = con.prepare(f"SELECT v FROM {t} WHERE id = :id")
        assert [ps.run(id=i) for i in (4, 5)] == [[["v4"]], [["v5"]]]
        ps.close()
        with pytest.raises(pg8000.native.DatabaseError) as ei:
            con.run("SELECT 1/0")
        assert ei.value.args[0]["C"] == "22012"
        assert con.run("SELECT 'continues'") == [["continues"]]
        # Explicit transaction with an error, then rollback.
        con.run("START TRANSACTION")
        con.run(f"INSERT INTO {t} VALUES (100, 'rolled back')")
        with pytest.raises(pg8000.native.DatabaseError) as ei:
            con.run(f"INSERT INTO {t} VALUES (1, 'dup')")
        assert ei.value.args[0]["C"] == "23505"
        con.run("ROLLBACK")
        assert con.run(f"SELECT count(*) FROM {t}") == [[10]]
    finally:
        con.close()
    assert _wq(writer, f"SELECT count(*), max(id) FROM {t}") == [(10, 9)]


# ---------------------------------------------------------------------------------------------
# asyncpg
# ---------------------------------------------------------------------------------------------


def _asyncpg_connect(sidecar: SidecarProcess, **kwargs: Any) -> Any:
    return asyncpg.connect(
        host=sidecar.host,
        port=sidecar.port,
        user=USER,
        password=PASSWORD,
        database=DB,
        timeout=CONNECT_TIMEOUT,
        **kwargs,
    )


def test_asyncpg_prepare_fetch_copy_executemany(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()

    async def main() -> None:
        conn = await _asyncpg_connect(sidecar)
        try:
            assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
            await conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text, ts timestamptz DEFAULT now())")
            stmt = await conn.prepare(f"SELECT id, v FROM {t} WHERE id >= $1 ORDER BY id LIMIT $2")
            assert await stmt.fetch(0, 10) == []
            res = await conn.copy_records_to_table(
                t, records=[(i, f"v{i}") for i in range(5000)], columns=["id", "v"]
            )
            assert res == "COPY 5000"
            await conn.executemany(
                f"INSERT INTO {t} (id, v) VALUES ($1, $2)", [(i, f"m{i}") for i in range(5000, 5500)]
            )
            rows = await stmt.fetch(4998, 4)
            assert [tuple(r) for r in rows] == [
                (4998, "v4998"),
                (4999, "v4999"),
                (5000, "m5000"),
                (5001, "m5001"),
            ]
            assert await stmt.fetchval(5499, 1) == 5499
            rows = await conn.fetch(
                f"SELECT id, v FROM {t} WHERE v = ANY($1::text[]) ORDER BY id", ["v7", "m5007"]
            )
            assert [tuple(r) for r in rows] == [(7, "v7"), (5007, "m5007")]
            # The statement cache keeps working across many executions.
            for i in range(200):
                assert await conn.fetchval(f"SELECT v FROM {t} WHERE id = $1", i) == f"v{i}"
            # Cursor inside a transaction.
            async with conn.transaction():
                total = 0
                async for r in conn.cursor(f"SELECT id FROM {t} ORDER BY id", prefetch=500):
                    total += r["id"]
                assert total == sum(range(5500))
            # Errors carry the SQLSTATE and leave the connection usable.
            with pytest.raises(asyncpg.DivisionByZeroError) as ei:
                await conn.fetchval("SELECT 1/$1::int", 0)
            assert ei.value.sqlstate == "22012"
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    asyncio.run(main())
    assert _wq(writer, f"SELECT count(*), sum(id) FROM {t}") == [(5500, sum(range(5500)))]


def test_asyncpg_pool_concurrency(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()

    async def main() -> None:
        async with asyncpg.create_pool(
            host=sidecar.host,
            port=sidecar.port,
            user=USER,
            password=PASSWORD,
            database=DB,
            min_size=2,
            max_size=5,
            timeout=CONNECT_TIMEOUT,
        ) as pool:
            await pool.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, pid int)")

            async def task(i: int) -> int:
                async with pool.acquire() as conn:
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", i, pid)
                    await asyncio.sleep(0.01)
                    return int(await conn.fetchval("SELECT $1::int * 2", i))

            results = await asyncio.wait_for(asyncio.gather(*(task(i) for i in range(50))), 30)
            assert results == [2 * i for i in range(50)]
            assert pool.get_size() <= 5

    asyncio.run(main())
    rows = _wq(writer, f"SELECT count(*), count(DISTINCT pid) FROM {t}")
    assert rows[0][0] == 50
    assert 1 <= rows[0][1] <= 5


def test_asyncpg_transactions_rollback(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()

    class Boom(Exception):
        pass

    async def main() -> None:
        # server_settings travel in the startup packet.
        conn = await _asyncpg_connect(sidecar, server_settings={"application_name": t, "work_mem": "6MB"})
        try:
            assert await conn.fetchrow(
                "SELECT current_setting('application_name') AS a, current_setting('work_mem') AS w"
            ) == (t, "6MB")
            await conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY)")
            with pytest.raises(Boom):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {t} VALUES (1)")
                    raise Boom
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {t} VALUES (2)")
                with pytest.raises(asyncpg.UniqueViolationError):
                    async with conn.transaction():  # a savepoint
                        await conn.execute(f"INSERT INTO {t} VALUES (3)")
                        await conn.execute(f"INSERT INTO {t} VALUES (2)")
                await conn.execute(f"INSERT INTO {t} VALUES (4)")
            tr = conn.transaction(isolation="serializable")
            await tr.start()
            await conn.execute(f"INSERT INTO {t} VALUES (5)")
            await tr.rollback()
            assert [r["id"] for r in await conn.fetch(f"SELECT id FROM {t} ORDER BY id")] == [2, 4]
            assert not conn.is_in_transaction()
        finally:
            await conn.close()

    asyncio.run(main())
    assert _wq(writer, f"SELECT id FROM {t} ORDER BY id") == [(2,), (4,)]


# ---------------------------------------------------------------------------------------------
# SQLAlchemy 2
# ---------------------------------------------------------------------------------------------


def test_sqlalchemy_orm_threads(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    t = _name()

    metadata, Item = item_model(t)
    url = sqlalchemy_url(sidecar.host, sidecar.port)
    engine = sa.create_engine(
        url, poolclass=sa.QueuePool, pool_size=5, max_overflow=5, pool_timeout=30, pool_pre_ping=True
    )
    try:
        metadata.create_all(engine)
        make_session = orm.sessionmaker(engine)

        def work(worker: int) -> list[str]:
            with make_session() as session, session.begin():
                session.add_all(Item(worker=worker, label=f"w{worker}-{j}") for j in range(10))
            with make_session() as session:
                return list(
                    session.scalars(sa.select(Item.label).where(Item.worker == worker).order_by(Item.id))
                )

        with ThreadPoolExecutor(max_workers=20) as ex:
            results = list(ex.map(work, range(20)))
        assert results == [[f"w{w}-{j}" for j in range(10)] for w in range(20)]
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]

        # A rolled-back transaction leaves nothing behind.
        with make_session() as session:
            session.add(Item(worker=99, label="rolled back"))
            session.flush()
            assert session.scalar(sa.select(sa.func.count()).where(Item.worker == 99)) == 1
            session.rollback()
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(Item.__table__)) == 200
            with pytest.raises(sa.exc.DataError) as ei:
                conn.execute(sa.text("SELECT 1/0"))
            assert getattr(ei.value.orig, "sqlstate", None) == "22012"
            conn.rollback()
            assert conn.scalar(sa.text("SELECT 1")) == 1
    finally:
        engine.dispose()
    assert _wq(writer, f"SELECT count(*), count(DISTINCT worker) FROM {t}") == [(200, 20)]
    assert _wq(writer, f"SELECT count(*) FROM {t} WHERE worker = 99") == [(0,)]


# ---------------------------------------------------------------------------------------------
# pgbench
# ---------------------------------------------------------------------------------------------


def _processed(out: str) -> int:
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    assert m, out
    return int(m.group(1))


def test_jdbc_prepared_statements_and_transactions(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    """pgjdbc, the JDBC driver: server-prepared statements (binary in one connection, an evicting
    cache in another, DEALLOCATE ALL in a third), SERIALIZABLE set through the JDBC API, batched
    inserts, isValid, explicit transactions."""
    with _connect(sidecar) as conn:
        t, ref = workloads.create_tables(conn)
    result = jdbc.run_workload(sidecar.host, sidecar.port, DB, USER, PASSWORD, t, ref, workers=4, rounds=50)
    workloads.assert_done(result, writer, t, rows=2 * 4 * 50 // 5)


def test_node_postgres_pool(sidecar: SidecarProcess, writer: pg.PgNode) -> None:
    """node-postgres: a pg.Pool, named statements (Parse once per connection, then Bind only),
    unnamed parameterized and simple queries, INSERTs in explicit transactions."""
    with _connect(sidecar) as conn:
        t, ref = workloads.create_tables(conn)
    result = node_pg.run_workload(sidecar.host, sidecar.port, DB, USER, PASSWORD, t, ref, tasks=8, rounds=30)
    workloads.assert_done(result, writer, t, rows=8 * 30 // 6)


def test_pgbench(sidecar: SidecarProcess, writer: pg.PgNode, scratch_db: str) -> None:
    init = _pgbench(sidecar, scratch_db, "-i", "-s", "1", "-q")
    assert init.returncode == 0, _fail_with_log(sidecar, init.stderr)
    assert _wq(writer, "SELECT count(*) FROM pgbench_accounts", dbname=scratch_db) == [(100_000,)]
    assert _wq(writer, "SELECT count(*) FROM pgbench_branches", dbname=scratch_db) == [(1,)]

    total = 0
    for mode, seconds in (("simple", "5"), ("prepared", "2"), ("extended", "2")):
        res = _pgbench(sidecar, scratch_db, "-c", "4", "-j", "2", "-T", seconds, "-M", mode, "-n")
        out = res.stdout + res.stderr
        assert res.returncode == 0, _fail_with_log(sidecar, f"-M {mode}: {out}")
        assert re.search(r"number of failed transactions: 0\b", out), out
        n = _processed(out)
        assert n > 0, out
        total += n
    # Every transaction pgbench counted left exactly one history row on the writer.
    assert _wq(writer, "SELECT count(*) FROM pgbench_history", dbname=scratch_db) == [(total,)]


# ---------------------------------------------------------------------------------------------
# Session reuse (pooling) and reset between clients
# ---------------------------------------------------------------------------------------------


def test_session_reuse_and_reset(sidecar: SidecarProcess, writer: pg.PgNode, scratch_db: str) -> None:
    # A database of its own, so the count is not muddied by other tests' pooled connections or
    # the sidecar's topology probes.
    pids = set()
    for _ in range(20):
        with _connect(sidecar, dbname=scratch_db) as conn:
            pids.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
    assert 1 <= len(pids) <= 2, pids
    servers = _wq(
        writer,
        "SELECT pid FROM pg_stat_activity WHERE usename = %s AND datname = %s",
        (USER, scratch_db),
        dbname="postgres",
    )
    assert 1 <= len(servers) <= 2, servers
    assert {p for (p,) in servers} <= pids

    # Session state made by one client must not leak into the next one on the same server.
    with _connect(sidecar, dbname=scratch_db, application_name="leaky") as a:
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        a.execute("SET work_mem = '13MB'")
        a.execute("SET search_path = pg_catalog")
        a.execute("PREPARE leaked AS SELECT 1")
        a.execute("CREATE TEMP TABLE leaked_temp (x int)")
        a.execute("LISTEN leaked_channel")
        a.execute("SELECT pg_advisory_lock(4242)")
    # Wait (on the writer) until the released server has run the reset and sits idle again.
    deadline = time.monotonic() + 5
    while _wq(
        writer,
        "SELECT state, query FROM pg_stat_activity WHERE pid = %s",
        (pid_a,),
        dbname="postgres",
    ) != [("idle", "DISCARD ALL")]:
        assert time.monotonic() < deadline, _fail_with_log(sidecar, f"server {pid_a} never reset")
        time.sleep(0.02)
    time.sleep(0.1)  # the sidecar reads the ReadyForQuery just after the backend turns idle
    # Take idle servers (holding each) until A's comes up: independent of the pool's order.
    state_query = (
        "SELECT pg_backend_pid(), current_setting('work_mem'), current_setting('search_path'),"
        " current_setting('application_name'),"
        " (SELECT count(*) FROM pg_prepared_statements),"
        " to_regclass('leaked_temp') IS NULL,"
        " (SELECT count(*) FROM pg_listening_channels()),"
        " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())"
    )
    states = []
    with contextlib.ExitStack() as stack:
        for _ in range(4):
            b = stack.enter_context(_connect(sidecar, dbname=scratch_db))
            assert b.info.parameter_status("application_name") == ""
            states.append(b.execute(state_query).fetchone())
            if states[-1][0] == pid_a:  # type: ignore[index]
                break
    assert states[-1][0] == pid_a, _fail_with_log(sidecar, f"server {pid_a} not reused: {states}")  # type: ignore[index]
    direct = _wq(writer, "SELECT current_setting('work_mem'), current_setting('search_path')")[0]
    for state in states:
        assert state[1:] == (*direct, "", 0, True, 0, 0), state  # type: ignore[index]
