"""A server goes from one client to the next only in step: what the next client is told and gets.

1. ParameterStatus: a client is told exactly the values its server has, at login and whenever
   they change under it (the reset after the previous client, a transaction-mode switch, a session
   moved to a new server), and its first answer is its own (never the previous client's reset's).
2. Desynchronisation: a client that leaves mid-batch (Parse/Bind/Execute with no Sync) or in the
   middle of a message (a CopyData cut short) leaves a server that is resynchronised or closed
   before anyone else gets it, at once (not after the reset timeout), and nothing it never synced
   is committed.

Read-only use of the shared topology (tables are uuid-named). `pool.size` 1 where the next client
must get the same server; every race is repeated to make it show.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import psycopg
import pytest

from tests.harness.sidecar import SidecarProcess
from tests.harness.wire import RawClient, login_trust

USER = "app_trust"
TRUST: dict[str, Any] = {"auth": {"method": "trust"}}
# Reported by PostgreSQL as ParameterStatus (GUC_REPORT), the ones clients act on.
PARAMS = ("standard_conforming_strings", "TimeZone", "DateStyle", "IntervalStyle")
SETS = (
    "SET standard_conforming_strings = off",
    "SET timezone = 'Asia/Tokyo'",
    "SET DateStyle = 'SQL, DMY'",
    "SET IntervalStyle = 'sql_standard'",
)
SET_VALUES = {
    "standard_conforming_strings": "off",
    "TimeZone": "Asia/Tokyo",
    "DateStyle": "SQL, DMY",
    "IntervalStyle": "sql_standard",
}
ROUNDS = 20
# How long the next client's query may take before it counts as hung. The sidecars below are given
# an upstream.connect_timeout (which bounds a reset) far longer than this, so an answer within it
# also shows the server was not merely dropped when a reset timed out.
ANSWER_WITHIN = 15.0
SLOW_RESET = {"upstream": {"connect_timeout": "40s"}}

T = TypeVar("T")


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=4)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def _within(pool: ThreadPoolExecutor, call: Callable[[], T], what: str, conn: psycopg.Connection[Any]) -> T:
    future = pool.submit(call)
    try:
        return future.result(timeout=ANSWER_WITHIN)
    except FutureTimeout:
        # Unblock the thread waiting for an answer that will not come.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            future.result(timeout=ANSWER_WITHIN)
        raise AssertionError(
            f"{what}: no answer within {ANSWER_WITHIN:g}s (the server was out of step)"
        ) from None


def _sidecar(factory: Callable[..., SidecarProcess], mode: str, size: int = 1) -> SidecarProcess:
    return factory({**TRUST, **SLOW_RESET, "pool": {"mode": mode, "size": size}})


def _connect(sidecar: SidecarProcess, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(sidecar.dsn(user=USER), autocommit=True, connect_timeout=10, **kwargs)


def _told_and_actual(
    conn: psycopg.Connection[tuple[Any, ...]],
) -> tuple[dict[str, str | None], dict[str, str]]:
    actual = {}
    for name in PARAMS:
        row = conn.execute(f"SHOW {name}").fetchone()
        assert row is not None
        actual[name] = row[0]
    # Read after the queries: a ParameterStatus arriving late would have arrived by now.
    told = {name: conn.info.parameter_status(name) for name in PARAMS}
    return told, actual


def _defaults(shared_topology: Any) -> dict[str, str]:
    with psycopg.connect(shared_topology.a1.dsn(user=USER, dbname="appdb"), autocommit=True) as conn:
        return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in PARAMS}  # type: ignore[index]


def _msg(type_byte: bytes, body: bytes = b"") -> bytes:
    return type_byte + struct.pack("!i", len(body) + 4) + body


def _unsynced_batch(sql: str) -> bytes:
    """Parse, Bind, Execute of the unnamed statement and portal, with no Sync."""
    parse = _msg(b"P", b"\x00" + sql.encode() + b"\x00" + b"\x00\x00")
    bind = _msg(b"B", b"\x00\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
    execute = _msg(b"E", b"\x00" + b"\x00\x00\x00\x00")
    return parse + bind + execute


def _make_table(shared_topology: Any) -> str:
    table = f"hardening_{uuid.uuid4().hex[:12]}"
    shared_topology.a1.execute(f"CREATE TABLE {table} (v text)", dbname="appdb")
    shared_topology.a1.execute(f"GRANT ALL ON {table} TO {USER}", dbname="appdb")
    return table


def _count(shared_topology: Any, table: str) -> int:
    return int(shared_topology.a1.query(f"SELECT count(*) FROM {table}", dbname="appdb")[0][0])


# ---------------------------------------------------------------------------------------------
# 1. What the next client is told
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_the_next_client_is_told_its_servers_values_not_the_previous_clients(
    sidecar_factory, shared_topology, pool, mode
):
    # A client changes reported settings and leaves at once (its sidecar may still be reading the
    # settings back); the next one logs in at once, on the same server (pool.size 1).
    defaults = _defaults(shared_topology)
    sidecar = _sidecar(sidecar_factory, mode)
    for i in range(ROUNDS):
        first = _connect(sidecar)
        for sql in SETS:
            first.execute(sql)
        first.close()
        with _connect(sidecar) as conn:
            row = _within(pool, lambda: conn.execute(f"SELECT 'mine-{i}'").fetchone(), "first query", conn)  # noqa: B023
            assert row == (f"mine-{i}",), f"round {i}: the first answer was not the client's own"
            told, actual = _within(pool, lambda: _told_and_actual(conn), "SHOW", conn)
        assert actual == defaults, f"round {i}: the new client's server kept the last client's settings"
        assert told == actual, f"round {i}: told {told}, the server has {actual}"


def test_transaction_mode_switches_tell_each_client_its_servers_values(
    sidecar_factory, shared_topology, pool
):
    # Two clients take turns on one server: each switch changes the server's settings under them.
    defaults = _defaults(shared_topology)
    sidecar = _sidecar(sidecar_factory, "transaction")
    with _connect(sidecar) as setter, _connect(sidecar) as plain:
        for sql in SETS:
            setter.execute(sql)
        for i in range(ROUNDS // 2):
            told, actual = _within(pool, lambda: _told_and_actual(setter), "setter's SHOW", setter)
            assert actual == SET_VALUES, f"round {i}: the setter's settings did not follow it"
            assert told == actual, f"round {i}: setter told {told}, its server has {actual}"
            told, actual = _within(pool, lambda: _told_and_actual(plain), "plain client's SHOW", plain)
            assert actual == defaults, f"round {i}: the setter's settings reached another client"
            assert told == actual, f"round {i}: plain client told {told}, its server has {actual}"


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_client_moved_to_a_new_server_is_told_its_values(sidecar_factory, shared_topology, pool, mode):
    # The session loses its server (its backend is terminated: a move like a failover's, to the
    # same writer) and the new server's baseline differs: a role setting changed meanwhile.
    sidecar = _sidecar(sidecar_factory, mode)
    a1 = shared_topology.a1
    app = f"moved-{mode}"
    conn = _connect(sidecar, application_name=app)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.parameter_status("IntervalStyle") == "postgres"
        a1.execute(f"ALTER ROLE {USER} IN DATABASE appdb SET IntervalStyle = 'iso_8601'")
        offset = sidecar.log_offset()
        a1.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s AND datname = 'appdb'",
            (USER,),
        )
        # Once the sidecar has seen its server go (else the next query may race the goodbye).
        sidecar.wait_for_log("event=session_cut", since=offset)
        row = _within(
            pool, lambda: conn.execute("SHOW IntervalStyle").fetchone(), "SHOW after the move", conn
        )
        assert row == ("iso_8601",)
        assert conn.info.parameter_status("IntervalStyle") == "iso_8601"
    finally:
        conn.close()
        a1.execute(f"ALTER ROLE {USER} IN DATABASE appdb RESET IntervalStyle")


# ---------------------------------------------------------------------------------------------
# 2. A client that leaves a server out of step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "size"), [("transaction", 1), ("transaction", 20), ("session", 1)])
def test_an_error_in_an_unsynced_batch_does_not_reach_the_next_client(
    sidecar_factory, shared_topology, pool, mode, size
):
    sidecar = _sidecar(sidecar_factory, mode, size)
    for i in range(ROUNDS):
        raw = login_trust(sidecar.port)
        raw.send(_unsynced_batch("select 1/0"))
        errors = [m for m in raw.read_until("EZ") if m.type == "E"]
        assert errors and errors[0].sqlstate == "22012"
        raw.close()
        with _connect(sidecar) as conn:
            row = _within(pool, lambda: conn.execute("SELECT %s::int", (i,)).fetchone(), "next client", conn)  # noqa: B023
            assert row == (i,)
            assert conn.execute("SELECT 'simple'", prepare=False).fetchone() == ("simple",)
    assert "no answer within" not in sidecar.log_text()


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_unsynced_work_of_a_client_that_left_is_never_committed(sidecar_factory, shared_topology, pool, mode):
    # Executed, not synced: directly on PostgreSQL the backend would roll it back when the client
    # goes. Through the sidecar, neither a Sync nor the next client's query may commit it.
    table = _make_table(shared_topology)
    sidecar = _sidecar(sidecar_factory, mode)
    for i in range(5):
        raw = login_trust(sidecar.port)
        raw.send(_unsynced_batch(f"INSERT INTO {table} VALUES ('unsynced-{i}')") + _msg(b"H"))
        assert [m.type for m in raw.read_until("CEZ")] == ["1", "2", "C"]
        raw.close()
        with _connect(sidecar) as conn:
            _within(pool, lambda: conn.execute(f"INSERT INTO {table} VALUES ('next')"), "next client", conn)
    assert shared_topology.a1.query(f"SELECT v FROM {table}", dbname="appdb") == [("next",)] * 5


@pytest.mark.parametrize("in_copy", [True, False], ids=["in-copy", "stray"])
@pytest.mark.parametrize(("mode", "size"), [("transaction", 1), ("transaction", 20), ("session", 1)])
def test_a_copy_data_cut_short_does_not_reach_the_next_client(
    sidecar_factory, shared_topology, pool, mode, size, in_copy
):
    # The header of a 100,000-byte CopyData and 10 bytes of it, then gone: inside a COPY FROM
    # STDIN, or stray (PostgreSQL reads, and ignores, a whole CopyData outside COPY too). Either
    # way the server waits for 99,990 more bytes and would take the next client's as those.
    table = _make_table(shared_topology)
    sidecar = _sidecar(sidecar_factory, mode, size)
    for i in range(ROUNDS // 2):
        raw = login_trust(sidecar.port)
        if in_copy:
            raw.query(f"COPY {table} FROM STDIN")
            assert [m.type for m in raw.read_until("GEZ")] == ["G"]
        raw.send(b"d" + struct.pack("!i", 100_004) + b"x" * 10)
        raw.close()
        with _connect(sidecar) as conn:
            row = _within(pool, lambda: conn.execute("SELECT %s::int", (i,)).fetchone(), "next client", conn)  # noqa: B023
            assert row == (i,)
            assert conn.execute("SELECT 'simple'", prepare=False).fetchone() == ("simple",)
    assert _count(shared_topology, table) == 0
    assert "no answer within" not in sidecar.log_text()


def test_a_client_leaving_mid_copy_in_extended_protocol_is_recovered(sidecar_factory, shared_topology, pool):
    # COPY started by Parse/Bind/Execute with no Sync, some whole rows sent, then gone: the copy
    # must fail (nothing committed) and the server come back in step.
    table = _make_table(shared_topology)
    sidecar = _sidecar(sidecar_factory, "session")
    for i in range(5):
        raw = RawClient(sidecar.port)
        raw.startup(USER, "appdb")
        assert raw.read_until("ZE")[-1].type == "Z"
        raw.send(_unsynced_batch(f"COPY {table} FROM STDIN") + _msg(b"H"))
        assert [m.type for m in raw.read_until("GEZ")] == ["1", "2", "G"]
        raw.send(_msg(b"d", b"row\n") * 3)
        raw.close()
        with _connect(sidecar) as conn:
            row = _within(pool, lambda: conn.execute("SELECT %s::int", (i,)).fetchone(), "next client", conn)  # noqa: B023
            assert row == (i,)
    assert _count(shared_topology, table) == 0
    assert "no answer within" not in sidecar.log_text()
