"""Record the client streams the fuzzer mutates: ``python -m tests.fuzz.record [--out DIR]``.

Each real client (psql, psycopg 3 in simple, extended and pipeline mode, asyncpg, pg8000 and,
when Debian's pgjdbc is installed, pgjdbc) runs a short, harmless session against a throwaway
PostgreSQL 15 primary through ``RecordingRelay``; what every connection sent is written to
``tests/fuzz/streams/<client>-<n>.bin``. The files are committed, so `make test` does not need the
clients' runtimes (a JVM above all) to fuzz with their bytes.

Sessions use temporary tables only: replayed (and mutated) against the shared test cluster they
must leave nothing behind and touch nobody else's tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psycopg

from demo_app.cluster import APP_DB, USERS, make_pg_dir, make_primary
from tests.harness.streams import STREAMS_DIR, RecordingRelay, Stream

USER = "app_scram"
PASSWORD = USERS[USER] or ""
JDBC_JAR = Path("/usr/share/java/postgresql.jar")

PSQL_SCRIPT = """\
SELECT 1 AS one, 'two' AS two;
CREATE TEMP TABLE fz (a int PRIMARY KEY, b text);
INSERT INTO fz VALUES (1, 'x'), (2, 'y');
BEGIN;
UPDATE fz SET b = 'z' WHERE a = 2;
SELECT * FROM fz ORDER BY a;
COMMIT;
\\copy fz FROM STDIN
3\tthree
4\tfour
\\.
\\copy fz TO STDOUT
SET application_name = 'psql-recorded';
SHOW application_name;
SELECT 1/0;
SELECT count(*) FROM fz;
"""


def record_psql(port: int) -> None:
    env = {**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "disable"}
    subprocess.run(
        ["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", APP_DB],
        input=PSQL_SCRIPT, text=True, env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip


def _psycopg(port: int) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname=APP_DB,
                           sslmode="disable", autocommit=True)  # fmt: skip


def record_psycopg_simple(port: int) -> None:
    with _psycopg(port) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("CREATE TEMP TABLE fz (a int, b text)")
        cur.execute("INSERT INTO fz VALUES (%s, %s), (%s, %s)", (1, "x", 2, "y"))
        cur.execute("SELECT a, b FROM fz WHERE a > %s ORDER BY a", (0,))
        cur.fetchall()
        with conn.transaction():
            cur.execute("UPDATE fz SET b = %s WHERE a = %s", ("z", 1))
            cur.execute("SELECT 1; SELECT 2")
        with contextlib.suppress(psycopg.Error):
            cur.execute("SELECT * FROM fz_missing")
        cur.execute("SET datestyle = 'ISO, DMY'")
        cur.execute("SELECT now()::date, %s::text", ("ok",))


def record_psycopg_extended(port: int) -> None:
    with _psycopg(port) as conn:
        conn.execute("CREATE TEMP TABLE fz (a int, b text, c bytea)")
        conn.execute("INSERT INTO fz VALUES (%s, %s, %s)", (1, "x", b"\x00\x01"))
        conn.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone()
        conn.execute("SELECT %s::int + 1", (42,), prepare=True).fetchone()
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO fz (a, b) VALUES (%s, %s)", [(i, f"r{i}") for i in range(2, 6)])
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT a, b, c FROM fz WHERE a = %s", (1,)).fetchall()
        with conn.cursor() as cur, cur.copy("COPY fz (a, b) FROM STDIN") as copy:
            for i in range(6, 9):
                copy.write_row((i, f"c{i}"))
        with conn.cursor() as cur, cur.copy("COPY fz (a, b) TO STDOUT") as copy:
            for _ in copy:
                pass
        with conn.transaction(), conn.cursor(name="fz_cursor") as named:
            named.execute("SELECT a FROM fz ORDER BY a")
            named.fetchmany(2)
        with contextlib.suppress(psycopg.Error):
            conn.execute("SELECT %s::int", ("not a number",))
        conn.execute("DEALLOCATE ALL")


def record_psycopg_pipeline(port: int) -> None:
    with _psycopg(port) as conn:
        conn.execute("CREATE TEMP TABLE fz (a int, b text)")
        with conn.pipeline():
            for i in range(4):
                conn.execute("INSERT INTO fz VALUES (%s, %s)", (i, f"p{i}"))
            conn.execute("SELECT count(*) FROM fz")
            with conn.transaction():
                conn.execute("UPDATE fz SET b = %s WHERE a = %s", ("q", 1))
        try:
            with conn.pipeline():
                conn.execute("SELECT 1")
                conn.execute("SELECT 1/0")
                conn.execute("SELECT 2")
        except psycopg.Error:
            pass
        conn.execute("SELECT b FROM fz ORDER BY a").fetchall()


def record_asyncpg(port: int) -> None:
    async def main() -> None:
        import asyncpg

        conn = await asyncpg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                     database=APP_DB, ssl=False)  # fmt: skip
        try:
            await conn.execute("CREATE TEMP TABLE fz (a int, b text)")
            await conn.executemany("INSERT INTO fz VALUES ($1, $2)", [(i, f"a{i}") for i in range(4)])
            await conn.fetch("SELECT a, b FROM fz WHERE a > $1 ORDER BY a", 0)
            stmt = await conn.prepare("SELECT $1::int + 1")
            await stmt.fetchval(41)
            async with conn.transaction():
                await conn.execute("UPDATE fz SET b = $1 WHERE a = $2", "t", 1)
            await conn.copy_records_to_table("fz", records=[(10, "c10"), (11, "c11")])
            with contextlib.suppress(asyncpg.PostgresError):
                await conn.fetchval("SELECT 1/0")
            await conn.fetchval("SELECT count(*) FROM fz")
        finally:
            await conn.close()

    asyncio.run(main())


def record_pg8000(port: int) -> None:
    import pg8000.native

    conn = pg8000.native.Connection(USER, host="127.0.0.1", port=port, password=PASSWORD, database=APP_DB)
    try:
        conn.run("CREATE TEMP TABLE fz (a int, b text)")
        conn.run("INSERT INTO fz VALUES (:a, :b)", a=1, b="x")
        conn.run("SELECT a, b FROM fz WHERE a = :a", a=1)
        conn.run("START TRANSACTION")
        conn.run("UPDATE fz SET b = 'y'")
        conn.run("ROLLBACK")
    finally:
        conn.close()


JDBC_SOURCE = """\
import java.sql.*;
import java.util.Properties;

public class FuzzRecord {
    public static void main(String[] args) throws Exception {
        Properties p = new Properties();
        p.setProperty("user", args[1]);
        p.setProperty("password", args[2]);
        p.setProperty("sslmode", "disable");
        p.setProperty("prepareThreshold", "1");
        try (Connection c = DriverManager.getConnection(args[0], p)) {
            try (Statement s = c.createStatement()) {
                s.execute("CREATE TEMP TABLE fz (a int, b text)");
            }
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO fz VALUES (?, ?)")) {
                for (int i = 0; i < 3; i++) { ps.setInt(1, i); ps.setString(2, "j" + i); ps.addBatch(); }
                ps.executeBatch();
            }
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("SELECT a, b FROM fz WHERE a >= ?")) {
                for (int i = 0; i < 3; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) { while (rs.next()) {} }
                }
            }
            c.commit();
            c.setAutoCommit(true);
            c.isValid(5);
            try (Statement s = c.createStatement()) { s.execute("SELECT 1/0"); } catch (SQLException e) { }
        }
    }
}
"""


def record_pgjdbc(port: int) -> None:
    if shutil.which("java") is None or not JDBC_JAR.exists():
        print("pgjdbc: no JDK or no /usr/share/java/postgresql.jar; skipped", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "FuzzRecord.java"
        src.write_text(JDBC_SOURCE)
        url = f"jdbc:postgresql://127.0.0.1:{port}/{APP_DB}"
        subprocess.run(["java", "-cp", str(JDBC_JAR), str(src), url, USER, PASSWORD],
                       capture_output=True, text=True, timeout=180, check=False)  # fmt: skip


RECORDERS: dict[str, Callable[[int], None]] = {
    "psql": record_psql,
    "psycopg_simple": record_psycopg_simple,
    "psycopg_extended": record_psycopg_extended,
    "psycopg_pipeline": record_psycopg_pipeline,
    "asyncpg": record_asyncpg,
    "pg8000": record_pg8000,
    "pgjdbc": record_pgjdbc,
}


def record_all(out: Path) -> list[Stream]:
    base = make_pg_dir(prefix="pgsidecar-record-")
    node = make_primary(base, "rec")
    written: list[Stream] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for client, recorder in RECORDERS.items():
            with RecordingRelay((node.host, node.port)) as relay:
                recorder(relay.port)
                relay.wait_idle()
                for n, data in enumerate(relay.connections):
                    if not data:
                        continue
                    stream = Stream(f"{client}-{n}", bytes(data))
                    (out / f"{stream.name}.bin").write_bytes(stream.data)
                    written.append(stream)
    finally:
        node.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.record", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=STREAMS_DIR, help=f"where to write (default {STREAMS_DIR})")
    args = p.parse_args(argv)
    for stream in record_all(args.out):
        login, session = stream.split()
        print(f"{stream.name}: {len(stream.data)} bytes (login {len(login)}, session {len(session)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
