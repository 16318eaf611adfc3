"""Bad input and hard conditions: each bad client gets a clear error and nobody else notices."""

from __future__ import annotations

import struct
import time

import psycopg
import pytest

from tests.harness.pg import free_port
from tests.harness.wire import RawClient, login_trust


@pytest.fixture(scope="module")
def trust_sidecar(request, shared_topology, tmp_path_factory):
    """One trust-auth sidecar for the raw-socket tests (raw clients cannot do SCRAM)."""
    from tests.harness.sidecar import SidecarProcess, sidecar_config

    config = sidecar_config(
        shared_topology,
        {"auth": {"method": "trust"}, "limits": {"max_message_size": "1MiB", "client_login_timeout": "2s"}},
    )
    proc = SidecarProcess(config, tmp_path_factory.mktemp("trust-sidecar")).start()
    yield proc
    proc.stop()


@pytest.fixture
def bystander(trust_sidecar):
    """A well-behaved client connected before the bad one; it must keep working after."""
    conn = psycopg.connect(f"host=127.0.0.1 port={trust_sidecar.port} user=app_scram dbname=appdb")
    conn.autocommit = True
    conn.execute("SELECT 1")
    yield conn
    assert conn.execute("SELECT 42").fetchone() == (42,), "a bad client disturbed another one"
    conn.close()


def _expect_fatal(client: RawClient, sqlstate: str) -> str:
    msgs = client.read_until("E")
    errors = [m for m in msgs if m.type == "E"]
    assert errors, f"expected an ErrorResponse, got {[(m.type, m.body) for m in msgs]}"
    fields = errors[-1].error_fields()
    assert fields["C"] == sqlstate, fields
    assert fields["S"] == "FATAL", fields
    assert client.closed_by_peer(), "the sidecar kept the connection open after a FATAL error"
    return fields["M"]


def test_garbage_instead_of_a_startup_packet(trust_sidecar, bystander):
    client = RawClient(trust_sidecar.port)
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert "startup packet length" in _expect_fatal(client, "08P01")
    trust_sidecar.wait_for_log("invalid startup packet length")


def test_garbage_after_login(trust_sidecar, bystander):
    client = login_trust(trust_sidecar.port)
    client.send(b"\x01\x02garbage that is not a message")
    assert "unknown message type" in _expect_fatal(client, "08P01")


def test_length_header_near_2_gib_is_refused_without_buffering(trust_sidecar, bystander):
    client = login_trust(trust_sidecar.port)
    client.send(b"Q" + struct.pack("!I", 0x7FFFFFF0) + b"SELECT")
    message = _expect_fatal(client, "08P01")
    assert "limits.max_message_size" in message


def test_message_over_max_message_size_is_refused(trust_sidecar, bystander):
    client = login_trust(trust_sidecar.port)
    sql = b"SELECT '" + b"x" * (2 * 1024 * 1024) + b"'\x00"
    client.send(b"Q" + struct.pack("!I", len(sql) + 4))
    assert "exceeds limits.max_message_size" in _expect_fatal(client, "08P01")


def test_unknown_protocol_version_is_refused(trust_sidecar, bystander):
    client = RawClient(trust_sidecar.port)
    client.startup("app_trust", version=(2 << 16))
    assert "unsupported frontend protocol 2.0" in _expect_fatal(client, "08P01")


def test_newer_minor_version_gets_negotiate_protocol_version(trust_sidecar, bystander):
    client = RawClient(trust_sidecar.port)
    client.startup("app_trust", version=(3 << 16) | 2, **{"_pq_.some_extension": "on"})
    msgs = client.read_until("ZE")
    assert msgs[0].type == "v"
    newest_minor, count = struct.unpack("!ii", msgs[0].body[:8])
    assert (newest_minor, count) == (0, 1)
    assert b"_pq_.some_extension" in msgs[0].body
    assert msgs[-1].type == "Z"
    client.query("SELECT 1")
    assert client.read_until("Z")[-1].type == "Z"
    client.close()


def test_ssl_and_gssenc_requests_are_declined_then_login_proceeds(trust_sidecar, bystander):
    client = RawClient(trust_sidecar.port)
    client.send(struct.pack("!ii", 8, 80877104))  # GSSENCRequest
    assert client.read_byte() == b"N"
    client.send(struct.pack("!ii", 8, 80877103))  # SSLRequest
    assert client.read_byte() == b"N"
    client.startup("app_trust")
    assert client.read_until("ZE")[-1].type == "Z"
    client.close()


def test_client_vanishing_mid_message_is_logged_and_harmless(trust_sidecar, bystander, shared_topology):
    client = login_trust(trust_sidecar.port, user="app_clear")
    offset = trust_sidecar.log_offset()
    payload = b"SELECT 'half a query"
    client.send(b"Q" + struct.pack("!I", 1000) + payload)  # promises 1000 bytes, sends 20
    time.sleep(0.2)
    client.close()
    line = trust_sidecar.wait_for_log("event=client_closed", since=offset)
    assert "user=app_clear" in line and "reason=" in line
    # The half-fed server connection was not put back in the pool: it is closed, not reused.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = shared_topology.a1.query(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_clear' AND state <> 'idle'"
        )
        if rows[0][0] == 0:
            break
        time.sleep(0.1)
    assert rows[0][0] == 0
    with psycopg.connect(f"host=127.0.0.1 port={trust_sidecar.port} user=app_clear dbname=appdb") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_silent_client_is_closed_after_login_timeout(trust_sidecar, bystander):
    client = RawClient(trust_sidecar.port)
    started = time.monotonic()
    assert "client_login_timeout" in _expect_fatal(client, "08P01")
    assert time.monotonic() - started < 8


def test_max_clients_reached_gives_53300(sidecar_factory):
    sidecar = sidecar_factory({"auth": {"method": "trust"}, "pool": {"max_clients": 2}})
    first = login_trust(sidecar.port)
    second = login_trust(sidecar.port)
    third = RawClient(sidecar.port)
    third.startup("app_trust")
    assert "pool.max_clients (2)" in _expect_fatal(third, "53300")
    first.close()
    # A slot freed up: the next client gets in.
    deadline = time.monotonic() + 5
    while True:
        fourth = RawClient(sidecar.port)
        fourth.startup("app_trust")
        last = fourth.read_until("ZE")[-1]
        if last.type == "Z" or time.monotonic() > deadline:
            break
        fourth.close()
        time.sleep(0.1)
    assert last.type == "Z"
    second.close()
    fourth.close()


def test_unreachable_upstream_gives_08006_naming_it(sidecar_factory):
    dead = f"127.0.0.1:{free_port()}"
    sidecar = sidecar_factory(
        {"auth": {"method": "trust"}, "upstream": {"connect_timeout": "1s"}},
        topology=[dead],
    )
    client = RawClient(sidecar.port)
    client.startup("app_trust")
    message = _expect_fatal(client, "08006")
    assert dead in message


def test_writer_is_found_when_the_standby_is_listed_first(sidecar_factory, shared_topology):
    topo = shared_topology
    sidecar = sidecar_factory(topology={"region-a": [topo.a2, topo.a1]})
    with psycopg.connect(sidecar.dsn("app_scram")) as conn:
        row = conn.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()
    assert row == (False, topo.a1.port)
