"""Login and identity hardening: the process id a client is given, cancel keys, notifications,
SSL negotiation, password exchanges for unknown users, and startup errors.

Real PostgreSQL (the shared topology; read-only use: a backend is terminated at most, which moves
a session exactly as a failover does), the real sidecar process, psycopg and raw sockets.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from scramp import ScramClient

from tests.harness import pg
from tests.harness.sidecar import PROJECT_ROOT, SidecarProcess, sidecar_config
from tests.harness.wire import Msg, RawClient
from tests.integration.test_tls import make_pki

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


# ---------------------------------------------------------------------------------------------
# SSL negotiation
# ---------------------------------------------------------------------------------------------

SSL_REQUEST = struct.pack("!ii", 8, SSL_REQUEST_CODE)


def _read_error(recv: Any) -> dict[str, str]:
    """The ErrorResponse a peer sent before closing (read through `recv`, plain or TLS)."""
    data = b""
    while True:
        try:
            chunk = recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    assert data[:1] == b"E", data
    (length,) = struct.unpack("!i", data[1:5])
    return Msg("E", data[5 : 1 + length]).error_fields()


def second_ssl_request(port: int) -> tuple[bytes, dict[str, str]]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(SSL_REQUEST)
        first = sock.recv(1)
        sock.sendall(SSL_REQUEST)
        return first, _read_error(sock.recv)


def test_a_second_ssl_request_is_refused_as_postgresql_refuses_it(sidecar_factory, shared_topology):
    sidecar = sidecar_factory()
    answer, error = second_ssl_request(sidecar.port)
    assert answer == b"N"
    expected = second_ssl_request(shared_topology.a1.port)  # PostgreSQL itself (no SSL there)
    assert expected[0] == b"N"
    keys = ("S", "V", "C", "M")
    assert {k: error.get(k) for k in keys} == {k: expected[1].get(k) for k in keys}
    assert error["C"] == "0A000" and error["V"] == "FATAL"
    assert "unsupported frontend protocol 1234.5679" in error["M"]


def test_an_ssl_request_inside_tls_is_refused(sidecar_factory, tmp_path):
    pki = make_pki(tmp_path)
    sidecar = sidecar_factory(
        {"client_tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}}
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"S"
        with context.wrap_socket(sock) as tls:
            tls.sendall(SSL_REQUEST)  # once more, encrypted: answered once only
            error = _read_error(tls.recv)
    assert (error["C"], error["V"]) == ("0A000", "FATAL")
    assert "unsupported frontend protocol 1234.5679" in error["M"]
    # The sidecar goes on serving.
    with connect(sidecar) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------------------------------------
# Unknown users get a password exchange, as PostgreSQL's mock authentication gives them
# ---------------------------------------------------------------------------------------------


def _password_message(body: bytes) -> bytes:
    return b"p" + struct.pack("!i", len(body) + 4) + body


def scram_attempt(port: int, user: str, password: str) -> tuple[dict[str, str], dict[str, str]]:
    """A SCRAM-SHA-256 login on the wire: (the server-first message's attributes, the error)."""
    client = RawClient(port)
    try:
        client.startup(user)
        sasl = client.read()
        assert sasl is not None and sasl.type == "R", sasl
        assert struct.unpack("!i", sasl.body[:4])[0] == 10 and b"SCRAM-SHA-256" in sasl.body
        scram = ScramClient(["SCRAM-SHA-256"], user, password)
        first = scram.get_client_first().encode()
        client.send(_password_message(b"SCRAM-SHA-256\x00" + struct.pack("!i", len(first)) + first))
        cont = client.read()
        assert cont is not None and cont.type == "R", cont and cont.error_fields()
        assert struct.unpack("!i", cont.body[:4])[0] == 11
        server_first = cont.body[4:].decode()
        scram.set_server_first(server_first)
        client.send(_password_message(scram.get_client_final().encode()))
        error = client.read()
        assert error is not None and error.type == "E", error
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        return attrs, error.error_fields()
    finally:
        client.close()


def test_unknown_user_gets_a_scram_exchange_that_fails_as_a_wrong_password(sidecar_factory):
    sidecar = sidecar_factory()
    known_attrs, known_error = scram_attempt(sidecar.port, USER, "not-the-password")
    attrs, error = scram_attempt(sidecar.port, "nobody_here", "whatever")
    again, _ = scram_attempt(sidecar.port, "nobody_here", "something else")
    other, _ = scram_attempt(sidecar.port, "nobody_else", "whatever")
    # The same shape as a real user's: a 16-byte salt, PostgreSQL's iteration count.
    assert len(base64.b64decode(attrs["s"])) == len(base64.b64decode(known_attrs["s"])) == 16
    assert attrs["i"] == known_attrs["i"] == "4096"
    # Stable per user name, as a real user's salt is; different between names.
    assert again["s"] == attrs["s"] and other["s"] != attrs["s"]
    assert again["r"] != attrs["r"]  # the nonce is fresh each time
    # The very same error as a wrong password (PostgreSQL: 28P01 for both).
    assert error["C"] == known_error["C"] == "28P01"
    assert error["M"] == known_error["M"].replace(USER, "nobody_here")
    assert {k: v for k, v in error.items() if k != "M"} == {k: v for k, v in known_error.items() if k != "M"}


def test_unknown_user_gets_an_md5_exchange_that_fails_as_a_wrong_password(sidecar_factory):
    sidecar = sidecar_factory({"auth": {"method": "md5"}})
    errors = {}
    for user in ("app_md5", "nobody_here"):
        client = RawClient(sidecar.port)
        try:
            client.startup(user)
            challenge = client.read()
            assert challenge is not None and challenge.type == "R", challenge and challenge.error_fields()
            assert struct.unpack("!i", challenge.body[:4])[0] == 5 and len(challenge.body) == 8
            client.send(_password_message(b"md5" + b"0" * 32 + b"\x00"))
            error = client.read()
            assert error is not None and error.type == "E"
            errors[user] = error.error_fields()
        finally:
            client.close()
    assert errors["nobody_here"]["C"] == errors["app_md5"]["C"] == "28P01"
    assert errors["nobody_here"]["M"] == errors["app_md5"]["M"].replace("app_md5", "nobody_here")


# ---------------------------------------------------------------------------------------------
# Startup: taken addresses, the order of what is opened, and check-config
# ---------------------------------------------------------------------------------------------


def _run_sidecar(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "run", "-c", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_metrics_listen_is_named_in_one_line(shared_topology, tmp_path, taken_port):
    config = sidecar_config(shared_topology, {"metrics_listen": f"127.0.0.1:{taken_port}"})
    result = _run_sidecar(config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "startup_failed" in line]
    assert "setting=metrics_listen" in line and f"127.0.0.1:{taken_port}" in line
    assert config["listen"] not in line


def test_a_taken_listen_fails_before_the_spool_is_opened(shared_topology, tmp_path, taken_port):
    spool = tmp_path / "spool.db"
    config = sidecar_config(
        shared_topology,
        {"listen": f"127.0.0.1:{taken_port}", "spool": {"backend": "sqlite", "path": str(spool)}},
    )
    result = _run_sidecar(config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert not spool.exists()
    assert "spool_opened" not in output
    assert "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "startup_failed" in line]
    assert "setting=listen" in line and f"127.0.0.1:{taken_port}" in line


def _check_config(config: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_warns_that_passthrough_without_users_cannot_probe(tmp_path):
    config = sidecar_config(["127.0.0.1:5432"], {"auth": {"method": "passthrough", "users": []}})
    result = _check_config(config, tmp_path)
    assert result.returncode == 0, result.stderr  # valid: PostgreSQL may trust the probe user
    assert "warning: upstream.probe_user" in result.stderr
    assert "auth.users is empty" in result.stderr and '"postgres"' in result.stderr
    # With the probe user's password in auth.users there is nothing to say.
    config = sidecar_config(["127.0.0.1:5432"], {"auth": {"method": "passthrough"}})
    result = _check_config(config, tmp_path)
    assert result.returncode == 0 and "warning" not in result.stderr
