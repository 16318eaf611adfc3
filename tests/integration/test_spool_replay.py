"""Spool replay into real PostgreSQL: exactly once, dead letters, the CLI (spool ..., init-db)."""

from __future__ import annotations

import asyncio
import datetime as dt
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import yaml

from proxy.metrics import Stats
from proxy.server import ServerConnection, TlsSettings, connect
from proxy.spool import SpooledStatement, SpoolRecord
from proxy.spool.replay import ApplyOutcome, Replayer, apply_record, ensure_ledger
from proxy.spool.sqlite_store import SqliteSpoolStore
from sidecar_config import Endpoint
from tests.harness import pg
from tests.harness.sidecar import PROJECT_ROOT, sidecar_config

USER = "app_scram"
DB = pg.APP_DB

Connector = Callable[[str, str], Coroutine[Any, Any, ServerConnection]]


def _connector(node: pg.PgNode) -> Connector:
    async def open_conn(user: str, database: str) -> ServerConnection:
        return await connect(
            Endpoint(node.host, node.port),
            {"user": user, "database": database, "application_name": "spool-test"},
            pg.USERS[user],
            tls=TlsSettings("disable"),
            timeout=10,
            max_message_size=1 << 24,
        )

    return open_conn


def _name() -> str:
    return f"spool_{uuid.uuid4().hex[:10]}"


def _insert(table: str, *values: tuple[int, bytes | None, int], tag: str = "INSERT 0 1") -> SpooledStatement:
    """INSERT INTO table (id, name) with (oid, raw value, format) per parameter."""
    placeholders = ", ".join(f"${i + 1}" for i in range(len(values)))
    return SpooledStatement(
        f"INSERT INTO {table} VALUES ({placeholders})",
        tuple(v[0] for v in values),
        tuple(v[2] for v in values),
        tuple(v[1] for v in values),
        tag,
    )


def _rows(node: pg.PgNode, sql: str) -> list[tuple[Any, ...]]:
    return node.query(sql, dbname=DB)


async def _store(tmp_path: Path, *records: SpoolRecord) -> SqliteSpoolStore:
    store = SqliteSpoolStore(tmp_path / "spool.db")
    await store.open()
    for record in records:
        await store.append(record)
    return store


def test_text_and_binary_params_replayed_exactly_once(shared_topology: pg.Topology, tmp_path: Path) -> None:
    a1 = shared_topology.a1
    schema = _name()
    a1.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {USER}", dbname=DB)
    a1.execute(
        f"CREATE TABLE {schema}.t (id int PRIMARY KEY, name text, data bytea, at timestamptz)", dbname=DB
    )
    a1.execute(f"ALTER TABLE {schema}.t OWNER TO {USER}", dbname=DB)
    # Unqualified table name: only the record's search_path finds it; TimeZone decides what the
    # text timestamp means.
    settings = {
        "search_path": schema,
        "TimeZone": "America/New_York",
        "DateStyle": "ISO, MDY",
        "client_encoding": "UTF8",
        "standard_conforming_strings": "on",
        "server_version": "15",  # reported, not settable: skipped
    }
    text_stmt = _insert(
        "t",
        (0, b"1", 0),
        (0, "héllo 'quoted'".encode(), 0),
        (0, None, 0),
        (0, b"2024-01-02 12:00:00", 0),
    )
    binary_stmt = _insert(
        "t",
        (23, struct.pack("!i", 2), 1),
        (25, b"binary text", 1),
        (17, b"\x00\xff\x01\x80", 1),
        (0, None, 1),
    )
    multi = SpooledStatement(
        "INSERT INTO t (id, name) VALUES ($1, $2), ($3, $4)",
        (23, 25, 23, 25),
        (0, 0, 1, 0),
        (b"3", b"three", struct.pack("!i", 4), b"four"),
        "INSERT 0 2",
    )
    first = SpoolRecord.new(USER, DB, [text_stmt, binary_stmt], settings)
    second = SpoolRecord.new(USER, DB, [multi], settings)
    stats = Stats()

    async def main() -> None:
        store = await _store(tmp_path, first, second)
        try:
            replayer = Replayer(store, _connector(a1), stats, "test-owner", lease_ttl=5)
            result = await replayer.drain()
            assert (result.replayed, result.duplicate, result.dead_letter, result.remaining) == (2, 0, 0, 0)
            assert result.stopped_by_error is None and result.complete
            again = await replayer.drain()
            assert (again.replayed, again.duplicate, again.remaining) == (0, 0, 0)
        finally:
            await store.close()

    asyncio.run(main())
    rows = _rows(a1, f"SELECT id, name, data, at FROM {schema}.t ORDER BY id")
    assert [r[:3] for r in rows] == [
        (1, "héllo 'quoted'", None),
        (2, "binary text", b"\x00\xff\x01\x80"),
        (3, "three", None),
        (4, "four", None),
    ]
    assert rows[0][3] == dt.datetime(2024, 1, 2, 17, 0, tzinfo=dt.UTC)
    assert stats.spool_records["replayed"] == 2
    ledger = _rows(
        a1, f"SELECT count(*) FROM pgsidecar.spool_applied WHERE id IN ('{first.id}', '{second.id}')"
    )
    assert ledger == [(2,)]
    # The settings were transaction-local: nothing leaked into the (closed) session, and the
    # database's defaults are untouched.
    assert _rows(a1, "SHOW TimeZone") != [("America/New_York",)]


def test_crash_between_commit_and_remove_counts_duplicate(
    shared_topology: pg.Topology, tmp_path: Path
) -> None:
    a1 = shared_topology.a1
    table = _name()
    a1.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)", dbname=DB)
    a1.execute(f"ALTER TABLE {table} OWNER TO {USER}", dbname=DB)
    record = SpoolRecord.new(USER, DB, [_insert(table, (23, struct.pack("!i", 7), 1), (0, b"seven", 0))])
    stats = Stats()

    async def main() -> None:
        store = await _store(tmp_path, record)
        try:
            conn = await _connector(a1)(USER, DB)
            try:
                await ensure_ledger(conn)
                # Applied and committed, then "crash": the record is never removed from the store.
                assert await apply_record(conn, record) is ApplyOutcome.APPLIED
                # Applying it again on the same connection is a no-op too.
                assert await apply_record(conn, record) is ApplyOutcome.DUPLICATE
            finally:
                conn.close("test done")
            assert await store.count() == 1
            result = await Replayer(store, _connector(a1), stats, "after-crash").drain()
            assert (result.replayed, result.duplicate, result.remaining) == (0, 1, 0)
        finally:
            await store.close()

    asyncio.run(main())
    assert _rows(a1, f"SELECT id, name FROM {table}") == [(7, "seven")]
    assert stats.spool_records["duplicate"] == 1 and stats.spool_records["replayed"] == 0


def test_unique_violation_and_missing_table_are_dead_lettered(
    shared_topology: pg.Topology, tmp_path: Path
) -> None:
    a1 = shared_topology.a1
    table = _name()
    a1.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)", dbname=DB)
    a1.execute(f"ALTER TABLE {table} OWNER TO {USER}", dbname=DB)
    a1.execute(f"INSERT INTO {table} VALUES (1, 'already there')", dbname=DB)
    clash = SpoolRecord.new(
        USER, DB, [_insert(table, (0, b"10", 0), (0, b"ok", 0)), _insert(table, (0, b"1", 0), (0, b"dup", 0))]
    )
    missing = SpoolRecord.new(USER, DB, [_insert(f"{table}_nope", (0, b"2", 0))])
    good = SpoolRecord.new(USER, DB, [_insert(table, (0, b"3", 0), (0, b"good", 0))])
    stats = Stats()

    async def main() -> None:
        store = await _store(tmp_path, clash, missing, good)
        try:
            result = await Replayer(store, _connector(a1), stats, "dl").drain()
            assert (result.replayed, result.dead_letter, result.remaining) == (1, 2, 0)
            assert result.stopped_by_error is None
            dead = await store.dead_letters()
            assert [(d.id, d.sqlstate) for d in dead] == [(clash.id, "23505"), (missing.id, "42P01")]
            assert "statement 2" in dead[0].error and "duplicate key" in dead[0].error
            assert "does not exist" in dead[1].error
        finally:
            await store.close()

    asyncio.run(main())
    # The failed record's first statement was rolled back with it; the next record went through.
    assert _rows(a1, f"SELECT id FROM {table} ORDER BY id") == [(1,), (3,)]
    assert _rows(
        a1, f"SELECT count(*) FROM pgsidecar.spool_applied WHERE id IN ('{clash.id}', '{missing.id}')"
    ) == [(0,)]
    assert stats.spool_records["dead_letter"] == 2


def test_transient_failures_stop_the_drain_and_keep_records(
    shared_topology: pg.Topology, tmp_path: Path
) -> None:
    a1, a2 = shared_topology.a1, shared_topology.a2
    table = _name()
    a1.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)", dbname=DB)
    a1.execute(f"ALTER TABLE {table} OWNER TO {USER}", dbname=DB)
    records = [SpoolRecord.new(USER, DB, [_insert(table, (0, str(i).encode(), 0))]) for i in range(3)]

    async def refused(user: str, database: str) -> ServerConnection:
        # Nothing listens there: the writer is down.
        return await connect(
            Endpoint("127.0.0.1", pg.free_port()),
            {"user": user, "database": database},
            None,
            tls=TlsSettings("disable"),
            timeout=2,
            max_message_size=1 << 20,
        )

    async def main() -> None:
        store = await _store(tmp_path, *records)
        try:
            down = await Replayer(store, refused, Stats(), "x").drain()
            assert down.stopped_by_error is not None and "cannot connect" in down.stopped_by_error
            assert (down.replayed, down.dead_letter, down.remaining) == (0, 0, 3)
            # A standby (a demoted writer): read-only is "not now", never a dead letter.
            standby = await Replayer(store, _connector(a2), Stats(), "x").drain()
            assert standby.stopped_by_error is not None and standby.remaining == 3
            assert "read-only" in standby.stopped_by_error
            assert standby.dead_letter == 0 and await store.dead_letters() == []
            # Another replayer holds the lease: nothing is attempted.
            assert await store.acquire_lease("other-sidecar", 30)
            busy = await Replayer(store, _connector(a1), Stats(), "x").drain()
            assert busy.lease_busy and busy.remaining == 3 and not busy.complete
            await store.release_lease("other-sidecar")
            done = await Replayer(store, _connector(a1), Stats(), "x").drain()
            assert (done.replayed, done.remaining) == (3, 0)
        finally:
            await store.close()

    asyncio.run(main())
    assert _rows(a1, f"SELECT id FROM {table} ORDER BY id") == [(0,), (1,), (2,)]


# ---------------------------------------------------------------- CLI


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args, "-c", str(config)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )


def _write_config(shared_topology: pg.Topology, tmp_path: Path) -> Path:
    config = sidecar_config(
        shared_topology, {"spool": {"backend": "sqlite", "path": str(tmp_path / "spool.db")}}
    )
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_list_replay_dead_letters_and_retry(shared_topology: pg.Topology, tmp_path: Path) -> None:
    a1 = shared_topology.a1
    table = _name()
    config = _write_config(shared_topology, tmp_path)
    records = [
        SpoolRecord.new(USER, DB, [_insert(table, (0, str(i).encode(), 0))], {"search_path": "public"})
        for i in range(3)
    ]

    async def seed() -> None:
        store = await _store(tmp_path, *records)
        await store.close()

    asyncio.run(seed())
    listed = _cli(config, "spool", "list")
    assert listed.returncode == 0, listed.stderr
    assert all(r.id in listed.stdout for r in records)
    assert "3 pending record(s)" in listed.stdout and f"INSERT INTO {table}" in listed.stdout

    # The table does not exist yet: every record is a dead letter, the command says so.
    first = _cli(config, "spool", "replay")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "dead-lettered 3" in first.stdout
    dead = _cli(config, "spool", "dead-letters")
    assert dead.returncode == 0 and dead.stdout.count("42P01") == 3 and "3 dead letter(s)" in dead.stdout

    a1.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)", dbname=DB)
    a1.execute(f"ALTER TABLE {table} OWNER TO {USER}", dbname=DB)
    retried = _cli(config, "spool", "replay", "--retry")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "3 dead letter(s) moved back" in retried.stdout and "replayed 3" in retried.stdout
    assert _rows(a1, f"SELECT id FROM {table} ORDER BY id") == [(0,), (1,), (2,)]
    empty = _cli(config, "spool", "list")
    assert "0 pending record(s)" in empty.stdout
    assert "0 dead letter(s)" in _cli(config, "spool", "dead-letters").stdout
    # Nothing left: replay again is a clean no-op.
    assert _cli(config, "spool", "replay").returncode == 0


def test_cli_errors(shared_topology: pg.Topology, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {regions: []}\n")
    assert _cli(bad, "spool", "list").returncode == 2
    none_cfg = sidecar_config(shared_topology)  # spool.backend none
    path = tmp_path / "none.yaml"
    path.write_text(yaml.safe_dump(none_cfg))
    result = _cli(path, "spool", "list")
    assert result.returncode == 2 and "spool.backend is none" in result.stderr
    # No writer reachable: a clear failure, the records stay.
    unreachable = sidecar_config(
        [f"127.0.0.1:{pg.free_port()}"], {"spool": {"backend": "sqlite", "path": str(tmp_path / "s.db")}}
    )
    path2 = tmp_path / "unreachable.yaml"
    path2.write_text(yaml.safe_dump(unreachable))
    result = _cli(path2, "spool", "replay")
    assert result.returncode == 1 and "no writable upstream" in result.stderr


def test_cli_init_db_creates_the_ledger(shared_topology: pg.Topology, tmp_path: Path) -> None:
    a1 = shared_topology.a1
    database = _name()
    a1.execute(f"CREATE DATABASE {database} OWNER {USER}")
    try:
        config = _write_config(shared_topology, tmp_path)
        result = _cli(config, "init-db", "-d", database, "-U", USER)
        assert result.returncode == 0, result.stderr
        assert f"ready in database {database}" in result.stdout
        assert a1.query("SELECT to_regclass('pgsidecar.spool_applied') IS NOT NULL", dbname=database) == [
            (True,)
        ]
        # Idempotent.
        assert _cli(config, "init-db", "-d", database, "-U", USER).returncode == 0
        missing = _cli(config, "init-db", "-d", f"{database}_missing", "-U", USER)
        assert missing.returncode == 1 and "does not exist" in missing.stderr
    finally:
        a1.execute(f"DROP DATABASE {database} WITH (FORCE)")
