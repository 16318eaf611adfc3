"""Commit markers for the extended protocol (issue 20): a lone execution (Parse, Bind, Describe,
Execute, Sync) of an INSERT/UPDATE/DELETE/MERGE outside a transaction block goes out wrapped
(BEGIN, the batch, the marker, COMMIT), and one of COMMIT inside a block goes out behind the
marker, whether the statement is parsed in the batch or prepared by name (psycopg's prepared
statements, pgjdbc's `S_n` after prepareThreshold uses). The client gets exactly what PostgreSQL
sends (compared byte for byte with a direct connection); cut in flight, the outcome is found on
the new writer and the client gets success."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from proxy.outcome import MARKER_DDL, MarkerIds, marker_query
from proxy.outcome_answer import MARKER_READ_ONLY as _MARKER_READ_ONLY
from proxy.outcome_answer import MARKER_WROTE as _MARKER_WROTE
from proxy.protocol import messages as m
from tests.conftest import SidecarFactory
from tests.harness import pg
from tests.harness.wire import RawClient
from tests.integration.test_commit_outcome import _wait_outcome
from tests.integration.test_commit_outcome_autocommit import (
    _markers,
    _raw,
    _same_ids,
    database,
    pools_ready,
    trust_sidecar,
)
from tests.integration.test_failover import (
    USER,
    connect,
    crash_and_promote,
    ids_on,
    make_table,
    wait_backend,
)
from tests.integration.test_transaction_replay import ledger_sidecar, outcomes

__all__ = ["database"]  # (the fixture, shared with the simple-protocol tests)

TRUST = "app_trust"
MODES = ["session", "transaction"]


def _execution(sql: str, params: tuple[str | None, ...] = (), name: str = "", parse: bool = True,
               describe: bool = True, rows: int = 0) -> bytes:  # fmt: skip
    """A lone execution as drivers send it: libpq/psycopg (Describe, all rows) or pgjdbc (no
    Describe of a statement it expects no rows from, one row asked for)."""
    out = m.parse(name, sql, []) if parse else b""
    values = [None if v is None else v.encode() for v in params]
    out += m.bind("", name, values=values) + (m.describe("P") if describe else b"")
    return out + m.execute("", rows) + m.sync()


def _answer(client: RawClient, data: bytes) -> list[tuple[str, bytes]]:
    client.send(data)
    return [(msg.type, msg.body) for msg in client.read_until("Z")]


@pytest.mark.parametrize("mode", MODES)
def test_extended_answers_are_byte_for_byte_postgresql_s(
    shared_topology: pg.Topology, sidecar_factory: SidecarFactory, database: str, mode: str
) -> None:
    a1 = shared_topology.a1
    sidecar = trust_sidecar(sidecar_factory, database, mode)
    direct = _raw(a1.port, database)
    through = _raw(sidecar.port, database)
    pools_ready(sidecar)
    insert = "INSERT INTO t VALUES ($1, $2)"
    try:
        # Named statements, prepared once on each connection (answered alike).
        for client in (direct, through):
            prepare = m.parse("ins", insert, []) + m.parse("fin", "COMMIT", []) + m.sync()
            assert _answer(client, prepare) == [("1", b""), ("1", b""), ("Z", b"I")]
        cases: list[tuple[bytes, bytes, bool]] = [
            # (direct, through, marked): success with a row trigger's NOTICE, parsed and named
            (_execution(insert, ("1", "a")), _execution(insert, ("2", "a")), True),
            (
                _execution(insert, ("11", "b"), rows=1, describe=False),
                _execution(insert, ("21", "b"), rows=1, describe=False),
                True,
            ),
            (
                _execution("", ("12", "c"), name="ins", parse=False),
                _execution("", ("22", "c"), name="ins", parse=False),
                True,
            ),
            (
                _execution("UPDATE t SET v = 'u' WHERE id IN (1, 11)"),
                _execution("UPDATE t SET v = 'u' WHERE id IN (2, 21)"),
                True,
            ),
            (
                _execution("DELETE FROM t WHERE id = $1", ("11",)),
                _execution("DELETE FROM t WHERE id = $1", ("21",)),
                True,
            ),
            # the statement fails: a duplicate key; a bad parameter; a syntax error at Parse
            (_execution(insert, ("1", "dup")), _execution(insert, ("2", "dup")), False),
            (_execution(insert, ("x", "bad")), _execution(insert, ("x", "bad")), False),
            (_execution("INSERT INTO t VALUE"), _execution("INSERT INTO t VALUE"), False),
            # the COMMIT fails: a deferred unique check, after a deferred trigger's NOTICE
            (_execution("INSERT INTO d VALUES (1)"), _execution("INSERT INTO d VALUES (1)"), False),
        ]
        for want_data, got_data, marked in cases:
            before = _markers(a1, database)
            want = _answer(direct, want_data)
            got = _answer(through, got_data)
            if want_data != got_data:  # (other ids, so that both succeed: named alike here)
                want = [(t, _same_ids(b, b"1")) for t, b in want]
                got = [(t, _same_ids(b, b"2")) for t, b in got]
            assert got == want, got_data
            assert _markers(a1, database) == before + (1 if marked else 0), got_data
        # The unnamed statement a wrapped batch parsed is still there: bound again alone.
        for client, row_id in ((direct, "14"), (through, "24")):
            assert _answer(client, _execution(insert, (row_id, "p")))[-2:] == [
                ("C", b"INSERT 0 1\x00"),
                ("Z", b"I"),
            ]
            again = _answer(client, _execution("", (row_id + "0", "again"), parse=False))
            assert again[-2:] == [("C", b"INSERT 0 1\x00"), ("Z", b"I")], again
        # Not wrapped: RETURNING (its rows would be held until the COMMIT).
        before = _markers(a1, database)
        returned = _answer(through, _execution(insert + " RETURNING id", ("23", "r")))
        assert ("D", b"\x00\x01\x00\x00\x00\x0223") in returned and returned[-1] == ("Z", b"I")
        assert _markers(a1, database) == before
        # A COMMIT inside a block, as pgjdbc sends it (parsed, then by name): behind the marker.
        for commit in (_execution("COMMIT", rows=1, describe=False),
                       _execution("", name="fin", parse=False, rows=1, describe=False)):  # fmt: skip
            answers: list[list[tuple[str, bytes]]] = []
            for client, row_id in ((direct, "31"), (through, "41")):
                assert _answer(client, m.query("BEGIN"))[-1] == ("Z", b"T")
                assert _answer(client, _execution(insert, (row_id, "tx")))[-1] == ("Z", b"T")
                before = _markers(a1, database)
                answers.append(_answer(client, commit))
                assert _markers(a1, database) == before + (1 if client is through else 0)
                a1.execute(f"DELETE FROM t WHERE id = {row_id}", dbname=database)
            assert (
                answers[1]
                == answers[0]
                == [
                    *([("1", b"")] if commit.startswith(b"P") else []),
                    ("2", b""),
                    ("C", b"COMMIT\x00"),
                    ("Z", b"I"),
                ]
            )
        # A failed block's COMMIT: no marker (ROLLBACK, as PostgreSQL answers it).
        for client in (direct, through):
            assert _answer(client, m.query("BEGIN; SELECT 1/0"))[-1] == ("Z", b"E")
            assert _answer(client, _execution("COMMIT", rows=1, describe=False))[-2:] == [
                ("C", b"ROLLBACK\x00"),
                ("Z", b"I"),
            ]
    finally:
        direct.close()
        through.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="extended-client")
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def _insert(conn: psycopg.Connection[Any], table: str, row_id: str, prepare: bool) -> str | None:
    """An autocommit INSERT with parameters (extended protocol); its SQLSTATE, None on success."""
    try:
        conn.execute(f"INSERT INTO {table} (id, client) VALUES (%s, %s)", (row_id, "ext"), prepare=prepare)
    except psycopg.Error as exc:
        return exc.sqlstate or type(exc).__name__
    return None


@pytest.mark.parametrize("prepare", [False, True], ids=["parsed", "prepared"])
@pytest.mark.parametrize("mode", MODES)
def test_extended_autocommit_insert_in_flight_succeeds(
    fresh_topology: pg.Topology, sidecar_factory: SidecarFactory, pool: ThreadPoolExecutor, mode: str,
    prepare: bool,
) -> None:  # fmt: skip
    """psycopg's autocommit INSERT with parameters, the commit on the synchronous standby only,
    a1 crashed: the marker is on a2, the client gets success, the row is there once."""
    topo = fresh_topology
    table = make_table(topo.a1)
    topo.a1.wait_caught_up([topo.a2])
    sidecar = ledger_sidecar(topo, sidecar_factory, mode)
    conn = connect(sidecar, application_name="extended")
    if prepare:
        assert _insert(conn, table, "warm", True) is None  # prepared by name from now on
    pg.set_sync_standbys(topo.a1, ["nobody"])
    insert = pool.submit(_insert, conn, table, "once", prepare)
    wait_backend(topo.a1, "application_name = 'extended' AND wait_event = 'SyncRep'")
    topo.a1.wait_caught_up([topo.a2])
    crash_and_promote(topo, sidecar, pause=0.3)
    assert insert.result(timeout=30) is None
    assert sorted(ids_on(topo.a2, table)) == sorted(["once"] + (["warm"] if prepare else []))
    assert outcomes(sidecar, "committed") == 1
    assert outcomes(sidecar, "unknown") == 0
    assert _insert(conn, table, "next", prepare) is None
    conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_extended_commit_in_flight_gets_its_outcome(
    fresh_topology: pg.Topology, sidecar_factory: SidecarFactory, pool: ThreadPoolExecutor, mode: str
) -> None:
    """A COMMIT sent as pgjdbc sends it (Parse, Bind, Execute of one row, Sync), cut while it
    waits for the synchronous standby it already reached: the client gets ParseComplete,
    BindComplete, COMMIT, as PostgreSQL would have sent them, and the row is there once."""
    topo = fresh_topology
    table = make_table(topo.a1)
    topo.a1.execute(MARKER_DDL, dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2])
    config: dict[str, Any] = {
        "auth": {"method": "trust"},
        "admin_users": [USER, TRUST],
        "pool": {"mode": mode},
        "upstream": {"probe_user": USER, "probe_database": pg.APP_DB},
    }
    sidecar = sidecar_factory(config, topology=topo)
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"
    client = RawClient(sidecar.port, timeout=30)
    client.startup(TRUST, pg.APP_DB, application_name="jdbc-like")
    msgs = client.read_until("ZE")
    assert msgs and msgs[-1].type == "Z", [(msg.type, msg.body) for msg in msgs]
    pools_ready(sidecar)
    assert _answer(client, m.query("BEGIN"))[-1] == ("Z", b"T")
    insert = _execution(
        f"INSERT INTO {table} (id, client) VALUES ($1, 'x')", ("once",), rows=1, describe=False
    )
    assert _answer(client, insert)[-1] == ("Z", b"T")
    pg.set_sync_standbys(topo.a1, ["nobody"])
    answer = pool.submit(_answer, client, _execution("COMMIT", rows=1, describe=False))
    wait_backend(topo.a1, "application_name = 'jdbc-like' AND wait_event = 'SyncRep'")
    topo.a1.wait_caught_up([topo.a2])
    crash_and_promote(topo, sidecar, pause=0.3)
    # (The crashed server's goodbye WARNING, a NoticeResponse, may come too: relayed as it came,
    # after the ParseComplete and BindComplete it flushed.)
    got = [(kind, body) for kind, body in answer.result(timeout=30) if kind != "N"]
    assert got == [("1", b""), ("2", b""), ("C", b"COMMIT\x00"), ("Z", b"I")]
    assert ids_on(topo.a2, table) == ["once"]
    assert outcomes(sidecar, "committed") == 1
    client.close()


def test_the_marker_answers_the_server_fast_path_expects(shared_topology: pg.Topology, database: str) -> None:
    """`ServerConnection._swallow_marker` recognises the marker's answer by its bytes: they are
    what PostgreSQL sends, for a transaction that wrote and one that did not."""
    client = _raw(shared_topology.a1.port, database)
    ids = MarkerIds()

    def raw_answer(data: bytes) -> bytes:
        client.send(data)
        return b"".join(
            msg.type.encode() + (len(msg.body) + 4).to_bytes(4, "big") + msg.body
            for msg in client.read_until("Z")
        )

    try:
        assert raw_answer(m.query("BEGIN"))[-1:] == b"T"
        assert raw_answer(marker_query(ids.next())) == _MARKER_READ_ONLY
        assert raw_answer(m.query("INSERT INTO t VALUES (900, 'm')"))[-1:] == b"T"
        assert raw_answer(marker_query(ids.next())) == _MARKER_WROTE
        assert raw_answer(m.query("ROLLBACK"))[-1:] == b"I"
    finally:
        client.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_marker_that_fails_at_commit_answers_the_commit_with_its_error(
    shared_topology: pg.Topology, sidecar_factory: SidecarFactory, database: str, mode: str
) -> None:
    """The marker goes out with the COMMIT in one Query; if it fails, the COMMIT after it is not
    run: the sidecar rolls back, the client gets the marker's error in place of COMMIT and an
    idle session (as when a deferred check fails at COMMIT), and nothing is committed."""
    a1 = shared_topology.a1
    sidecar = trust_sidecar(sidecar_factory, database, mode)
    a1.execute(
        "CREATE OR REPLACE FUNCTION pgsidecar.mark_commit(marker uuid) RETURNS boolean LANGUAGE plpgsql "
        "AS $$BEGIN RAISE EXCEPTION 'the marker is broken' USING ERRCODE = 'XX001'; END$$",
        dbname=database,
    )
    through = _raw(sidecar.port, database)
    pools_ready(sidecar)
    try:
        assert _answer(through, m.query("BEGIN"))[-1] == ("Z", b"T")
        assert _answer(through, m.query("INSERT INTO t VALUES (700, 'lost')"))[-1] == ("Z", b"T")
        got = _answer(through, m.query("COMMIT"))
        assert [kind for kind, _ in got] == ["E", "Z"] and got[-1] == ("Z", b"I"), got
        assert b"CXX001\x00" in got[0][1] and b"the marker is broken" in got[0][1]
        assert a1.query("SELECT count(*) FROM t WHERE id = 700", dbname=database) == [(0,)]
        assert _answer(through, m.query("SELECT 1"))[-2:] == [("C", b"SELECT 1\x00"), ("Z", b"I")]
    finally:
        through.close()
