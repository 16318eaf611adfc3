"""Login and identity hardening: the process id a client is given, cancel keys, notifications,
SSL negotiation, password exchanges for unknown users, and startup errors.

Real PostgreSQL (the shared topology; read-only use: a backend is terminated at most, which moves
a session exactly as a failover does), the real sidecar process, psycopg and raw sockets.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest

from tests.harness import pg
from tests.harness.sidecar import SidecarProcess
from tests.harness.wire import RawClient

USER = "app_scram"
# Linux never gives a process an id this high (PID_MAX_LIMIT): a made-up id can name no backend.
PID_MAX_LIMIT = 1 << 22
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="login-hardening")
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def connect(sidecar: SidecarProcess, **kwargs: Any) -> psycopg.Connection[Any]:
    kwargs.setdefault("autocommit", True)
    app = kwargs.pop("application_name", "login-hardening")
    return psycopg.connect(sidecar.dsn(USER, connect_timeout=15, application_name=app), **kwargs)


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def sqlstate_of(conn: psycopg.Connection[Any], sql: str) -> str | None:
    try:
        conn.execute(sql)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def wait_active(node: pg.PgNode, application_name: str, timeout: float = 15.0) -> None:
    """Until a backend of `application_name` runs pg_sleep (polled, not slept on)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = node.query(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND state = 'active' "
            "AND query LIKE 'SELECT pg_sleep%%'",
            (application_name,),
        )
        if rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"no active pg_sleep of {application_name} within {timeout}s")


def raw_login(sidecar: SidecarProcess, user: str = USER) -> tuple[RawClient, tuple[int, int]]:
    """A raw-socket client logged in to a trust sidecar, and the BackendKeyData it was given."""
    client = RawClient(sidecar.port)
    client.startup(user)
    msgs = client.read_until("ZE")
    errors = [m for m in msgs if m.type == "E"]
    assert not errors, errors[0].error_fields()
    (key,) = [m for m in msgs if m.type == "K"]
    pid, secret = struct.unpack("!ii", key.body)
    return client, (pid, secret)


def send_cancel(port: int, pid: int, secret: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, secret))
        sock.recv(1)  # closed without an answer once handled


# ---------------------------------------------------------------------------------------------
# The backend process id (session mode: the real one)
# ---------------------------------------------------------------------------------------------


def test_session_mode_gives_the_client_its_servers_process_id(sidecar_factory, shared_topology):
    sidecar = sidecar_factory()
    with connect(sidecar, application_name="pid-session") as conn:
        pid = conn.info.backend_pid
        assert pid == backend_pid(conn)
        # Monitoring that joins the client's pid with pg_stat_activity finds its backend.
        rows = shared_topology.a1.query(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s", (pid,)
        )
        assert rows == [("pid-session",)]


def test_own_notifications_carry_the_clients_process_id(sidecar_factory):
    sidecar = sidecar_factory()
    with connect(sidecar) as conn:
        conn.execute("LISTEN login_hardening")
        conn.execute("NOTIFY login_hardening, 'mine'")
        notify = next(conn.notifies(timeout=10, stop_after=1))
        assert notify.payload == "mine"
        assert notify.pid == conn.info.backend_pid  # "my own notification"


def test_after_a_move_own_notifications_still_carry_the_clients_process_id(sidecar_factory, shared_topology):
    sidecar = sidecar_factory()
    a1 = shared_topology.a1
    with connect(sidecar, application_name="pid-moved") as conn, connect(sidecar) as other:
        given = conn.info.backend_pid
        offset = sidecar.log_offset()
        a1.query("SELECT pg_terminate_backend(%s)", (given,))
        sidecar.wait_for_log("event=session_cut", since=offset)
        # The session moved to another server (documented: pg_backend_pid() now names that one).
        now = backend_pid(conn)
        assert now != given
        assert conn.info.backend_pid == given
        conn.execute("LISTEN login_hardening_moved")
        conn.execute("NOTIFY login_hardening_moved, 'mine'")
        other.execute("NOTIFY login_hardening_moved, 'theirs'")
        got = {n.payload: n.pid for n in conn.notifies(timeout=10, stop_after=2)}
        assert got["mine"] == given
        # Another session's notification keeps its sender's process id.
        assert got["theirs"] == other.info.backend_pid == backend_pid(other)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancel_reaches_the_right_one_of_two_busy_clients(sidecar_factory, shared_topology, threads, mode):
    sidecar = sidecar_factory({"pool": {"mode": mode}})
    first = connect(sidecar, application_name="cancel-first")
    second = connect(sidecar, application_name="cancel-second")
    try:
        sleeping = {
            name: threads.submit(sqlstate_of, conn, "SELECT pg_sleep(30)")
            for name, conn in (("first", first), ("second", second))
        }
        wait_active(shared_topology.a1, "cancel-first")
        wait_active(shared_topology.a1, "cancel-second")
        first.cancel()
        assert sleeping["first"].result(timeout=15) == "57014"
        assert not sleeping["second"].done()  # the other client's query runs on
        second.cancel()
        assert sleeping["second"].result(timeout=15) == "57014"
        # Both connections go on.
        assert first.execute("SELECT 1").fetchone() == (1,)
        assert second.execute("SELECT 2").fetchone() == (2,)
    finally:
        first.close()
        second.close()


def test_a_stale_key_with_the_same_process_id_cancels_nothing(sidecar_factory, shared_topology, threads):
    # One server per pool: the second client logs in on the very server the first one had, so both
    # are given the same process id. A cancel is found by the sidecar's own secret.
    sidecar = sidecar_factory({"auth": {"method": "trust"}, "pool": {"size": 1}})
    old, (old_pid, old_secret) = raw_login(sidecar, "app_trust")
    old.close()
    with psycopg.connect(
        f"host=127.0.0.1 port={sidecar.port} user=app_trust dbname={pg.APP_DB} "
        "application_name=cancel-reused connect_timeout=15",
        autocommit=True,
    ) as conn:
        assert conn.info.backend_pid == old_pid == backend_pid(conn)
        running = threads.submit(sqlstate_of, conn, "SELECT pg_sleep(3)")
        wait_active(shared_topology.a1, "cancel-reused")
        send_cancel(sidecar.port, old_pid, old_secret)  # the departed client's key
        assert running.result(timeout=15) is None  # not cancelled: ran to the end
        assert "event=cancel_ignored" in sidecar.log_text()
        running = threads.submit(sqlstate_of, conn, "SELECT pg_sleep(30)")
        wait_active(shared_topology.a1, "cancel-reused")
        conn.cancel()
        assert running.result(timeout=15) == "57014"


def test_transaction_mode_gives_a_made_up_process_id_that_names_no_backend(sidecar_factory, shared_topology):
    sidecar = sidecar_factory({"pool": {"mode": "transaction"}})
    with connect(sidecar) as conn:
        pid = conn.info.backend_pid
        # Each transaction may run on another server: no server's id would stay true, and
        # pg_terminate_backend() of a shared server would hit other clients. The id given is above
        # any Linux process id, so it names nothing.
        assert pid >= PID_MAX_LIMIT
        found = shared_topology.a1.query("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        assert found == [(0,)]
        assert backend_pid(conn) != pid
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (False,)
        assert conn.execute("SELECT 1").fetchone() == (1,)
