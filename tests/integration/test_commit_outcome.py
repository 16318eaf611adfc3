"""The commit-outcome ledger on real PostgreSQL 15: init-db, the marker, resolve, prune, and how
the sidecar reports whether it can use it (startup warning, SHOW TOPOLOGY, metrics).

Each test works in a database of its own on the shared topology (created and dropped here), so
the ledger's presence or absence never leaks into other tests."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import yaml

from proxy import readonly
from proxy.outcome import (
    MARKER_DDL,
    MARKER_RETENTION_SECONDS,
    CommitOutcomeLedger,
    MarkerAnswer,
    MarkerIds,
    OutcomeUnknown,
    availability,
    ensure_marker_ledger,
    marker_query,
    marker_statement,
    prune,
    resolve,
)
from proxy.protocol import messages as m
from proxy.protocol.sqlstate import UpstreamUnavailable
from proxy.server import ServerConnection, TlsSettings, connect
from sidecar_config import Endpoint, parse_config
from tests.conftest import SidecarFactory
from tests.harness import pg
from tests.harness.sidecar import PROJECT_ROOT, SidecarProcess, sidecar_config

USER = "app_scram"
OTHER = "app_md5"
ADMIN_CONFIG: dict[str, Any] = {"admin_users": [USER]}


@pytest.fixture
def database(shared_topology: pg.Topology) -> Iterator[str]:
    name = f"ledger_{uuid.uuid4().hex[:10]}"
    shared_topology.a1.execute(f"CREATE DATABASE {name} OWNER {USER}")
    try:
        yield name
    finally:
        shared_topology.a1.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def _open(node: pg.PgNode, database: str, user: str = USER) -> ServerConnection:
    return await connect(
        Endpoint(node.host, node.port),
        {"user": user, "database": database, "application_name": "ledger-test"},
        pg.USERS[user],
        tls=TlsSettings("disable"),
        timeout=10,
        max_message_size=1 << 24,
    )


def _with_conn(node: pg.PgNode, database: str, body: Callable[[ServerConnection], Coroutine[Any, Any, Any]],
               user: str = USER) -> Any:  # fmt: skip
    async def go() -> Any:
        conn = await _open(node, database, user)
        try:
            return await body(conn)
        finally:
            conn.close("test done")

    return _run(go())


def _install(node: pg.PgNode, database: str) -> None:
    _with_conn(node, database, ensure_marker_ledger)


def _markers(node: pg.PgNode, database: str) -> set[str]:
    return {str(row[0]) for row in node.query("SELECT id FROM pgsidecar.commit_marker", dbname=database)}


def _app_conn(node: pg.PgNode, database: str, user: str = USER) -> psycopg.Connection[Any]:
    return psycopg.connect(
        node.dsn(dbname=database, user=user, password=pg.USERS[user]), autocommit=True, connect_timeout=10
    )


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args, "-c", str(config)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )


# ---------------------------------------------------------------- init-db and the marker


def test_init_db_creates_the_marker_ledger_idempotently(
    shared_topology: pg.Topology, database: str, tmp_path: Path
) -> None:
    a1 = shared_topology.a1
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(sidecar_config(shared_topology)))
    for _ in range(2):  # idempotent
        result = _cli(config, "init-db", "-d", database, "-U", USER)
        assert result.returncode == 0, result.stderr
        assert f"pgsidecar.commit_marker ready in database {database}" in result.stdout
    assert a1.query("SELECT to_regclass('pgsidecar.commit_marker') IS NOT NULL", dbname=database) == [(True,)]
    # Any user may call the functions; no application user may touch the table itself (deleting a
    # fresh marker would turn a committed transaction into one replayed twice).
    with _app_conn(a1, database, OTHER) as other:
        assert _with_conn(a1, database, availability, user=OTHER) is None
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            other.execute("DELETE FROM pgsidecar.commit_marker")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            other.execute("SELECT * FROM pgsidecar.commit_marker")


def test_the_marker_is_written_only_by_transactions_that_wrote(
    shared_topology: pg.Topology, database: str
) -> None:
    a1 = shared_topology.a1
    _install(a1, database)
    ids = MarkerIds()
    written, read, read_only, temp_only, rolled_back = (ids.next() for _ in range(5))
    with _app_conn(a1, database) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("CREATE TEMP TABLE scratch (x int)")

        def marked(marker: str, *statements: str, begin: str = "BEGIN", end: str = "COMMIT") -> bool:
            conn.execute(begin)
            for statement in statements:
                conn.execute(statement)
            row = conn.execute(marker_statement(marker).decode()).fetchone()
            conn.execute(end)
            assert row is not None
            return bool(row[0])

        assert marked(written, "INSERT INTO t VALUES (1)") is True
        assert marked(read, "SELECT count(*) FROM t") is False
        # A plain INSERT ... WHERE would fail here (25006) and abort the client's transaction.
        assert marked(read_only, "SELECT count(*) FROM t", begin="BEGIN READ ONLY") is False
        assert marked(temp_only, "INSERT INTO scratch VALUES (1)", begin="BEGIN READ ONLY") is False
        assert marked(rolled_back, "INSERT INTO t VALUES (2)", end="ROLLBACK") is True
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    assert _markers(a1, database) == {written}


def test_a_callers_search_path_cannot_reach_into_the_marker_function(
    shared_topology: pg.Topology, database: str
) -> None:
    """mark_commit runs as its owner and has no SET search_path (it is called at every writing
    COMMIT): a caller who puts look-alike functions, a look-alike table and a temporary table
    ahead of pg_catalog gets none of them called or written; the marker goes where it belongs."""
    a1 = shared_topology.a1
    _install(a1, database)
    marker = MarkerIds().next()
    with _app_conn(a1, database) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("CREATE SCHEMA trap")
        conn.execute("CREATE TABLE trap.commit_marker (id uuid, at timestamptz DEFAULT now())")
        conn.execute("CREATE TEMP TABLE commit_marker (id uuid, at timestamptz DEFAULT now())")
        for fn, returns in (("pg_current_xact_id_if_assigned()", "xid8"), ("current_setting(text)", "text")):
            conn.execute(
                f"CREATE FUNCTION trap.{fn} RETURNS {returns} LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'trap called as %', current_user; END $$"
            )
        conn.execute("SET search_path = trap, pg_temp, pg_catalog, public")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO public.t VALUES (1)")
        row = conn.execute(marker_statement(marker).decode()).fetchone()
        conn.execute("COMMIT")
        assert row == (True,)
        assert conn.execute("SELECT count(*) FROM trap.commit_marker").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_temp.commit_marker").fetchone() == (0,)
    assert _markers(a1, database) == {marker}


def test_the_marker_answer_is_recognised_on_the_wire(shared_topology: pg.Topology, database: str) -> None:
    """The bytes the session will send and swallow, against a real server."""
    a1 = shared_topology.a1
    _install(a1, database)
    ids = MarkerIds()
    first, second = ids.next(), ids.next()

    async def body(conn: ServerConnection) -> tuple[MarkerAnswer, MarkerAnswer, list[str], MarkerAnswer]:
        await conn.simple_query("CREATE TABLE t (x int)")

        async def answer() -> MarkerAnswer:
            parsed = MarkerAnswer()
            while True:
                type_byte, data = await conn.read_message()
                if parsed.feed(type_byte, data):
                    return parsed

        async def tags_until_ready() -> list[str]:
            tags = []
            while True:
                type_byte, data = await conn.read_message()
                if type_byte == m.B_COMMAND_COMPLETE:
                    tags.append(m.decode_command_complete(data))
                if type_byte == m.B_READY_FOR_QUERY:
                    return tags

        await conn.simple_query("BEGIN")
        conn.send(marker_query(first))  # nothing written yet
        read_only = await answer()
        await conn.simple_query("INSERT INTO t VALUES (1)")
        # The marker and the client's COMMIT in one write, as the session sends them.
        conn.send(marker_query(second) + m.query("COMMIT"))
        writing = await answer()
        commit_tags = await tags_until_ready()
        # In an aborted transaction the marker gets an error, never a row.
        conn.send(m.query("BEGIN") + m.query("SELECT 1/0"))
        await tags_until_ready()
        await tags_until_ready()
        conn.send(marker_query(ids.next()))
        failed = await answer()
        await conn.simple_query("ROLLBACK")
        return read_only, writing, commit_tags, failed

    read_only, writing, commit_tags, failed = _with_conn(a1, database, body)
    assert commit_tags == ["COMMIT"]
    assert (read_only.marked, read_only.error) == (False, None)
    assert (writing.marked, writing.error) == (True, None)
    assert failed.marked is None and failed.error is not None and failed.error["C"] == "25P02"
    assert _markers(a1, database) == {second}


def test_marker_ids_are_unique_and_never_reused() -> None:
    first, second = MarkerIds(), MarkerIds()
    drawn = [first.next() for _ in range(1000)] + [second.next() for _ in range(1000)]
    assert len(set(drawn)) == 2000
    assert all(str(uuid.UUID(d)) == d for d in drawn)
    with pytest.raises(ValueError):
        marker_statement("'); DROP TABLE t; --")


# ---------------------------------------------------------------- resolve and prune


def test_resolve_tells_committed_from_not_committed(shared_topology: pg.Topology, database: str) -> None:
    a1 = shared_topology.a1
    _install(a1, database)
    ids = MarkerIds()
    committed, rolled_back, never_sent = ids.next(), ids.next(), ids.next()
    with _app_conn(a1, database) as conn:
        conn.execute("CREATE TABLE t (x int)")
        for marker, end in ((committed, "COMMIT"), (rolled_back, "ROLLBACK")):
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute(marker_statement(marker).decode())
            conn.execute(end)

    async def body(conn: ServerConnection) -> list[str]:
        return [await resolve(conn, marker) for marker in (committed, rolled_back, never_sent)]

    assert _with_conn(a1, database, body) == ["committed", "not_committed", "not_committed"]


def test_resolve_on_the_same_server_waits_for_the_old_backend(
    shared_topology: pg.Topology, database: str
) -> None:
    """The connection was cut but the server lives: the old backend, still inside the transaction
    (here: idle in it, marker written, COMMIT not yet run), is ended before the marker is read."""
    a1 = shared_topology.a1
    _install(a1, database)
    marker = MarkerIds().next()
    with _app_conn(a1, database) as setup:
        setup.execute("CREATE TABLE t (x int)")
    old = _app_conn(a1, database)
    try:
        old.execute("BEGIN")
        old.execute("INSERT INTO t VALUES (1)")
        old.execute(marker_statement(marker).decode())
        pid = old.info.backend_pid

        async def body(conn: ServerConnection) -> str:
            return await resolve(conn, marker, old_backend_pid=pid)

        assert _with_conn(a1, database, body) == "not_committed"
        assert a1.query("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) == [(0,)]
    finally:
        old.close()
    assert a1.query("SELECT count(*) FROM t", dbname=database) == [(0,)]


def test_resolve_refuses_a_node_in_recovery(shared_topology: pg.Topology, database: str) -> None:
    a1, a2 = shared_topology.a1, shared_topology.a2
    _install(a1, database)
    a1.execute("SELECT 1")  # (the database and ledger reach the standby by streaming)
    a1.wait_caught_up([a2])

    async def body(conn: ServerConnection) -> str:
        return await resolve(conn, MarkerIds().next())

    with pytest.raises(OutcomeUnknown) as err:
        _with_conn(a2, database, body)
    assert err.value.code == "08007"
    # Nor does a standby answer the availability check: it is asked again on the writer.
    with pytest.raises(UpstreamUnavailable):
        _with_conn(a2, database, availability)


def test_the_pruner_deletes_old_markers_only(shared_topology: pg.Topology, database: str) -> None:
    a1 = shared_topology.a1
    _install(a1, database)
    ids = MarkerIds()
    old = [ids.next() for _ in range(25)]
    recent = [ids.next() for _ in range(5)]  # 20 minutes old: past the floor, within the retention
    fresh = [ids.next() for _ in range(5)]
    insert = "INSERT INTO pgsidecar.commit_marker VALUES (%s, now() - %s::interval)"
    with a1.connect(database) as su:
        for marker in old:
            su.execute(insert, (marker, "2 hours"))
        for marker in recent:
            su.execute(insert, (marker, "20 minutes"))
        for marker in fresh:
            su.execute(insert, (marker, "0 seconds"))

    async def body(conn: ServerConnection) -> tuple[int, int]:
        # As an application user, in small batches: several statements.
        deleted = await prune(conn, MARKER_RETENTION_SECONDS, batch=10)
        # Whoever calls it, the function never deletes markers younger than 10 minutes.
        floor = await prune(conn, 0, batch=10)
        return deleted, floor

    assert _with_conn(a1, database, body, user=OTHER) == (25, 5)
    assert _markers(a1, database) == set(fresh)


# ---------------------------------------------------------------- the sidecar's view


def _admin_rows(sidecar: SidecarProcess, command: str) -> list[dict[str, Any]]:
    with psycopg.connect(sidecar.dsn(USER, dbname="pgsidecar", connect_timeout=5), autocommit=True) as conn:
        cur = conn.execute(command)
        assert cur.description is not None
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _writer_outcome(sidecar: SidecarProcess) -> str | None:
    rows = [r for r in _admin_rows(sidecar, "SHOW TOPOLOGY") if r["current_writer"] in (True, "true", "t")]
    return rows[0]["commit_outcome"] if rows else None


def _wait_outcome(sidecar: SidecarProcess, accept: Callable[[str], bool], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    value: str | None = None
    while time.monotonic() < deadline:
        value = _writer_outcome(sidecar)
        if value is not None and accept(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"SHOW TOPOLOGY commit_outcome stayed {value!r}\n{sidecar.log_tail()}")


def _metrics(sidecar: SidecarProcess) -> str:
    with urllib.request.urlopen(sidecar.metrics_url + "/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def _config(database: str, **failover: Any) -> dict[str, Any]:
    upstream = {"probe_user": USER, "probe_database": database}
    return {**ADMIN_CONFIG, "upstream": upstream, "failover": failover}


def test_without_the_ledger_the_sidecar_says_so_once_and_in_show_topology(
    sidecar_factory: SidecarFactory, shared_topology: pg.Topology, database: str
) -> None:
    sidecar = sidecar_factory(_config(database))
    value = _wait_outcome(sidecar, lambda v: v.startswith("unavailable"))
    assert "pgsidecar.commit_marker is not installed" in value and "run pgsidecar init-db" in value
    log = sidecar.wait_for_log("commit_outcome_unavailable")
    assert "run pgsidecar init-db" in log
    # Clients of the same pool do not repeat it.
    for _ in range(3):
        with psycopg.connect(sidecar.dsn(USER, dbname=database, connect_timeout=5), autocommit=True) as app:
            app.execute("SELECT 1")
    assert sidecar.log_text().count("commit_outcome_unavailable") == 1
    # init-db, then a reload: found at once, and said so.
    _install(shared_topology.a1, database)
    sidecar.send_signal(signal.SIGHUP)
    assert _wait_outcome(sidecar, lambda v: v == "marker") == "marker"
    sidecar.wait_for_log("commit_outcome_available")
    # The counters exist from the start, every label at zero.
    text = _metrics(sidecar)
    for result in ("replayed", "diverged", "too_large", "not_replayable"):
        assert f'pgsidecar_transaction_replays_total{{result="{result}"}} 0.0' in text
    for outcome in ("committed", "replayed", "unknown"):
        assert f'pgsidecar_commit_outcomes_total{{outcome="{outcome}"}} 0.0' in text


def test_with_the_ledger_show_topology_says_marker(
    sidecar_factory: SidecarFactory, shared_topology: pg.Topology, database: str
) -> None:
    a1 = shared_topology.a1
    _install(a1, database)
    ids = MarkerIds()
    old, fresh = [ids.next() for _ in range(3)], ids.next()
    with a1.connect(database) as su:
        for marker in old:
            su.execute("INSERT INTO pgsidecar.commit_marker VALUES (%s, now() - interval '2 h')", (marker,))
        su.execute("INSERT INTO pgsidecar.commit_marker VALUES (%s)", (fresh,))
    sidecar = sidecar_factory(_config(database))
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"
    assert "commit_outcome_unavailable" not in sidecar.log_text()
    # The pruner runs in the background on the writer: at start, then every few minutes.
    line = sidecar.wait_for_log("commit_markers_pruned", timeout=30)
    assert "deleted=3" in line
    assert _markers(a1, database) == {fresh}


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_the_marked_commits_statements_are_prepared_again_once_dropped(
    sidecar_factory: SidecarFactory, shared_topology: pg.Topology, database: str, mode: str
) -> None:
    """A writing COMMIT runs as two statements the server connection prepares once (its first
    marked COMMIT). The client's DEALLOCATE ALL and DISCARD ALL may drop them, on the extended
    or the simple protocol: every later COMMIT still commits, marked, and the next one prepares
    them again. One server connection, so every COMMIT goes to the one that held them."""
    a1 = shared_topology.a1
    _install(a1, database)
    with _app_conn(a1, database) as conn:
        conn.execute("CREATE TABLE t (x int)")
    sidecar = sidecar_factory({**_config(database), "pool": {"mode": mode, "size": 1}})
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"
    held_sql = "SELECT name FROM pg_prepared_statements WHERE name LIKE 'pgsidecar%commit' ORDER BY 1"
    with psycopg.connect(sidecar.dsn(USER, dbname=database, connect_timeout=5)) as app:

        def commit(x: int) -> list[str]:
            app.execute("INSERT INTO t VALUES (%s)", (x,))
            app.commit()  # (psycopg: a simple Query "COMMIT", as most drivers send it)
            held = [str(row[0]) for row in app.execute(held_sql).fetchall()]
            app.commit()
            return held

        assert commit(1) == ["pgsidecar_commit", "pgsidecar_mark_commit"]
        assert commit(2) == ["pgsidecar_commit", "pgsidecar_mark_commit"]
        app.execute("DEALLOCATE ALL")  # extended protocol, in a block
        app.commit()
        commit(3)
        app.pgconn.exec_(b"DEALLOCATE ALL")  # simple protocol, outside one
        commit(4)
        app.autocommit = True
        app.execute("DISCARD ALL")
        app.pgconn.exec_(b"DISCARD ALL")
        app.autocommit = False
        assert commit(5) == ["pgsidecar_commit", "pgsidecar_mark_commit"]
    assert sorted(int(row[0]) for row in a1.query("SELECT x FROM t", dbname=database)) == [1, 2, 3, 4, 5]
    assert len(_markers(a1, database)) == 5


def test_a_pool_whose_user_may_not_use_the_ledger_is_reported(
    sidecar_factory: SidecarFactory, shared_topology: pg.Topology, database: str
) -> None:
    a1 = shared_topology.a1
    # Installed by a superuser (the pool's user owns nothing of it), then locked down.
    a1.execute(MARKER_DDL, dbname=database)
    a1.execute("REVOKE EXECUTE ON FUNCTION pgsidecar.mark_commit(uuid) FROM PUBLIC", dbname=database)
    sidecar = sidecar_factory(_config(database))
    value = _wait_outcome(sidecar, lambda v: v != "unchecked")
    assert value.startswith(f'unavailable: user "{USER}" may not execute pgsidecar.mark_commit(uuid)'), value


def test_commit_outcome_off_is_never_used(
    sidecar_factory: SidecarFactory, shared_topology: pg.Topology, database: str
) -> None:
    sidecar = sidecar_factory(_config(database, commit_outcome="off"))
    assert _wait_outcome(sidecar, lambda v: True) == "off (config)"
    config = {r["key"]: r["value"] for r in _admin_rows(sidecar, "SHOW CONFIG")}
    assert config["failover.commit_outcome"] == "off"
    assert config["failover.transaction_replay"] in ("True", "true")
    time.sleep(0.5)  # (would a check run, it would have logged by now: it is not awaited anywhere)
    assert "commit_outcome_unavailable" not in sidecar.log_text()
    # No connection named for the ledger was ever opened.
    assert shared_topology.a1.query(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgsidecar-ledger'"
    ) == [(0,)]


# ---------------------------------------------------------------- the read-only allowlist


def test_the_function_allowlist_matches_the_live_catalog(shared_topology: pg.Topology) -> None:
    from proxy.pg_functions import FUNCTIONS, OPERATORS

    functions_sql, operators_sql = readonly.CATALOG_SQL
    assert {row[0] for row in shared_topology.a1.query(functions_sql)} == FUNCTIONS
    assert {row[0] for row in shared_topology.a1.query(operators_sql)} == OPERATORS


def test_the_ledger_is_checked_again_on_the_new_writer_after_a_failover(
    sidecar_factory: SidecarFactory, fresh_topology: pg.Topology
) -> None:
    """Usable on the old writer; on the promoted standby the pool's user has lost the right to
    call the marker function (revoked after the sidecar's first check, so only a check made after
    the failover can see it)."""
    topo = fresh_topology
    database = "ledger_failover"
    topo.a1.execute(f"CREATE DATABASE {database} OWNER {USER}")
    topo.a1.execute(MARKER_DDL, dbname=database)  # owned by the superuser, not the pool's user
    sidecar = sidecar_factory(_config(database), topology=topo)
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"
    topo.a1.execute("REVOKE EXECUTE ON FUNCTION pgsidecar.mark_commit(uuid) FROM PUBLIC", dbname=database)
    topo.a1.wait_caught_up([topo.a2])
    time.sleep(0.5)  # (several of the sidecar's probe rounds: none re-checks the ledger)
    assert _writer_outcome(sidecar) == "marker"
    topo.a1.crash()
    topo.a2.promote()
    value = _wait_outcome(sidecar, lambda v: v.startswith("unavailable"))
    assert f'user "{USER}" may not execute pgsidecar.mark_commit(uuid)' in value
    rows = {r["host"]: r for r in _admin_rows(sidecar, "SHOW TOPOLOGY")}
    assert rows[topo.a2.hostport]["current_writer"] in (True, "true", "t")
    assert sidecar.log_text().count("commit_outcome_unavailable") == 1


def test_the_service_resolves_on_the_current_writer_or_says_unknown(
    shared_topology: pg.Topology, database: str
) -> None:
    """What the session calls after a cut: one call, an exact answer or OutcomeUnknown (08007)."""
    a1 = shared_topology.a1
    _install(a1, database)
    config = parse_config(sidecar_config(shared_topology))
    topology = SimpleNamespace(writer=Endpoint(a1.host, a1.port))
    host: Any = SimpleNamespace(config=config, topology=topology)
    service = CommitOutcomeLedger(host, lambda user, db: _open(a1, db, user))
    marker = service.ids.next()
    with _app_conn(a1, database) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute(marker_statement(marker).decode())
        conn.execute("COMMIT")

    async def scenario() -> list[object]:
        answers: list[object] = [
            await service.resolve(USER, database, marker),
            await service.resolve(USER, database, service.ids.next()),
        ]
        for writer, connect_to in ((None, a1), (topology.writer, None)):
            topology.writer = writer

            async def refused(user: str, db: str) -> ServerConnection:
                return await connect(
                    Endpoint("127.0.0.1", pg.free_port()), {"user": user, "database": db}, None,
                    tls=TlsSettings("disable"), timeout=5, max_message_size=1 << 20,
                )  # fmt: skip

            if connect_to is None:
                service._connect = refused
            try:
                await service.resolve(USER, database, marker)
            except OutcomeUnknown as exc:
                answers.append((exc.code, exc.message.split(":")[0]))
        return answers

    assert _run(scenario()) == [
        "committed",
        "not_committed",
        ("08007", "no writer is known to ask whether the COMMIT committed"),
        ("08007", "could not ask the writer whether the COMMIT committed"),
    ]


def test_a_reused_xid_fools_pg_xact_status_but_not_the_marker(fresh_topology: pg.Topology) -> None:
    """Why a marker: a2 stops receiving WAL, a1 commits one more transaction (xid X, marker M) and
    crashes, a2 is promoted and hands out X again to a transaction of its own. Asked on a2,
    pg_xact_status(X) says "committed" (about the new transaction); the marker says the lost one
    did not commit, which is the truth on the writer that counts."""
    topo = fresh_topology
    a1, a2 = topo.a1, topo.a2
    database = "xid_reuse"
    a1.execute(f"CREATE DATABASE {database} OWNER {USER}")
    _install(a1, database)
    with _app_conn(a1, database) as conn:
        conn.execute("CREATE TABLE t (note text)")
    a1.wait_caught_up([a2])
    # a2 stops streaming: what a1 commits from now on never reaches it.
    a2.execute("ALTER SYSTEM SET primary_conninfo = ''")
    a2.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while a2.query("SELECT count(*) FROM pg_stat_wal_receiver") != [(0,)]:
        assert time.monotonic() < deadline, "a2 kept streaming"
        time.sleep(0.05)
    marker = MarkerIds().next()
    with _app_conn(a1, database) as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES ('lost with a1')")
        row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        lost_xid = int(row[0])
        conn.execute(marker_statement(marker).decode())
        conn.execute("COMMIT")
    assert a1.query("SELECT pg_xact_status(%s::text::xid8)", (str(lost_xid),), dbname=database) == [
        ("committed",)
    ]
    a1.crash()
    a2.promote()
    with _app_conn(a2, database) as conn:
        xid = 0
        while xid < lost_xid:  # (a2's next xid is the lost one, or just below it)
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES ('a2''s own')")
            row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert row is not None
            xid = int(row[0])
            conn.execute("COMMIT")
        assert xid == lost_xid  # the same transaction id, handed out again
    status = a2.query("SELECT pg_xact_status(%s::text::xid8)", (str(lost_xid),), dbname=database)
    assert status == [("committed",)]  # true of a2's transaction, false of the lost one

    async def body(conn: ServerConnection) -> str:
        return await resolve(conn, marker)

    assert _with_conn(a2, database, body) == "not_committed"
    assert a2.query("SELECT count(*) FROM t WHERE note = 'lost with a1'", dbname=database) == [(0,)]


def test_a_commit_that_reached_the_synchronous_standby_resolves_committed_after_promotion(
    fresh_topology: pg.Topology,
) -> None:
    topo = fresh_topology
    a1, a2 = topo.a1, topo.a2
    database = "sync_commit"
    a1.execute(f"CREATE DATABASE {database} OWNER {USER}")
    _install(a1, database)
    pg.set_sync_standbys(a1, [a2.name])
    ids = MarkerIds()
    committed, rolled_back = ids.next(), ids.next()
    with _app_conn(a1, database) as conn:
        conn.execute("CREATE TABLE t (note text)")
        for marker, end in ((committed, "COMMIT"), (rolled_back, "ROLLBACK")):
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t VALUES (%s)", (marker,))
            conn.execute(marker_statement(marker).decode())
            conn.execute(end)  # COMMIT returns once a2 has it
    a1.crash()
    a2.promote()

    async def body(conn: ServerConnection) -> list[str]:
        return [await resolve(conn, marker) for marker in (committed, rolled_back)]

    assert _with_conn(a2, database, body) == ["committed", "not_committed"]
    assert a2.query("SELECT note FROM t", dbname=database) == [(committed,)]
