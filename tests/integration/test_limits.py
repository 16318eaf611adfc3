"""Bounded memory and a responsive event loop under abusive clients (issue 18, defects 4-8).

Each attack is run against the real sidecar process while its resident memory (VmRSS from
/proc/<pid>/status) is sampled: the sidecar must stop reading a client whose input it cannot use
yet, instead of buffering it. Sizes are chosen so that the old, unbounded code goes far past the
bound within a few seconds, while the test stays fast when reading is paused (the attacker's
sends then simply block, and the attack ends at its deadline).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.harness.pg import free_port
from tests.harness.sidecar import SidecarProcess, sidecar_config
from tests.harness.wire import Msg, RawClient, login_trust
from tests.integration.test_failover import metric

MiB = 1024 * 1024
# How far the sidecar's RSS may rise while an attack runs. The bounded code stays within a few
# MiB (256 KiB held per client at most); each attack would push the old code several times past.
RSS_BOUND = 100 * MiB


def rss(pid: int) -> int:
    """Resident memory of `pid` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


class RssWatch:
    """Samples a process's RSS in a thread; `peak` is the highest value seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss(self.pid))

    def stop(self) -> int:
        """Stops sampling; returns the peak rise over the baseline, in bytes."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))
        return self.peak - self.baseline


def send_for(sock: socket.socket, chunks: Iterator[bytes], seconds: float) -> int:
    """Send `chunks` until they run out, `seconds` pass, or the peer stops taking them (its
    reading is paused, or it closed); returns the bytes sent."""
    deadline = time.monotonic() + seconds
    sent = 0
    sock.settimeout(0.2)
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            if time.monotonic() > deadline:
                return sent
            try:
                n = sock.send(view)
            except TimeoutError:
                continue
            except OSError:  # reset or broken pipe: the sidecar closed the connection
                return sent
            sent += n
            view = view[n:]
    return sent


def repeat(chunk: bytes, total: int) -> Iterator[bytes]:
    for _ in range(max(1, total // len(chunk))):
        yield chunk


def count_ready(client: RawClient, wanted: int) -> tuple[int, bytes]:
    """Reads answers until `wanted` ReadyForQuery messages (no error allowed); returns the count
    and the bytes of the last answer. (Offsets, not the slicing of `RawClient.read`: there may be
    a million messages.)"""
    buf = bytearray(client.buf)
    client.buf = b""
    pos = count = 0
    answer_start = 0
    while True:
        while pos + 5 <= len(buf):
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if pos + 1 + length > len(buf):
                break
            kind = buf[pos]
            assert kind != ord("E"), buf[pos : pos + 1 + length]
            pos += 1 + length
            if kind == ord("Z"):
                count += 1
                if count == wanted:
                    return count, bytes(buf[answer_start:pos])
                answer_start = pos
        del buf[:answer_start]
        pos -= answer_start
        answer_start = 0
        chunk = client.sock.recv(1 << 20)
        if not chunk:
            return count, b""
        buf += chunk


def query(sql: bytes) -> bytes:
    return b"Q" + struct.pack("!i", len(sql) + 5) + sql + b"\x00"


def attack(sidecar: SidecarProcess, senders: list[Callable[[], int]]) -> tuple[int, int]:
    """Run `senders` in threads while watching RSS; returns (peak RSS rise, bytes sent)."""
    watch = RssWatch(sidecar.pid)
    results: list[int] = []
    threads = [threading.Thread(target=lambda s=s: results.append(s())) for s in senders]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        rise = watch.stop()
    return rise, sum(results)


def assert_clean_log(sidecar: SidecarProcess, since: int = 0) -> None:
    log = sidecar.log_text()[since:]
    assert "Traceback" not in log, sidecar.log_tail(60)
    assert "Fatal error on transport" not in log, sidecar.log_tail(60)


def expect_fatal(client: RawClient, sqlstate: str) -> dict[str, str]:
    msgs = client.read_until("E")
    errors = [m for m in msgs if m.type == "E"]
    assert errors, f"expected an ErrorResponse, got {[(m.type, m.body[:60]) for m in msgs]}"
    fields = errors[-1].error_fields()
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate), fields
    assert client.closed_by_peer(), "the connection stayed open after a FATAL error"
    return fields


def trust_config(topology: Any, **overrides: Any) -> dict[str, Any]:
    base = {"auth": {"method": "trust"}, "limits": {"client_login_timeout": "30s"}}
    return sidecar_config(topology, base, **overrides)


# ---------------------------------------------------------------------------------------------
# 4. Before authentication: PostgreSQL's limits, not limits.max_message_size


@pytest.mark.parametrize("method", ["passthrough", "scram-sha-256"])
def test_huge_message_before_authentication_is_refused_without_buffering(
    shared_topology: Any, tmp_path: Path, method: str
) -> None:
    config = sidecar_config(shared_topology, {"auth": {"method": method}})
    with SidecarProcess(config, tmp_path) as sidecar:
        clients = [RawClient(sidecar.port) for _ in range(16)]
        for client in clients:
            client.startup("anyone" if method == "passthrough" else "app_scram")
            request = client.read()
            assert request is not None and request.type == "R", request
        # The header of a 60 MiB password (or SASL) message, then its first 24 MiB.
        header = b"p" + struct.pack("!i", 60 * MiB + 4)
        body = b"\x00" * MiB

        def sender(client: RawClient) -> Callable[[], int]:
            return lambda: send_for(client.sock, iter([header, *repeat(body, 24 * MiB)]), 4)

        rise, sent = attack(sidecar, [sender(c) for c in clients])
        assert rise < RSS_BOUND, f"RSS rose by {rise / MiB:.0f} MiB while {sent / MiB:.0f} MiB were sent"
        for client in clients:
            client.sock.settimeout(10)
            fields = expect_fatal(client, "08P01")
            assert "invalid message length" in fields["M"], fields
        # Everyone else is still served.
        with psycopg.connect(sidecar.dsn("app_scram"), connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert_clean_log(sidecar)


def test_startup_packet_over_10000_bytes_is_refused(shared_topology: Any, tmp_path: Path) -> None:
    with SidecarProcess(trust_config(shared_topology), tmp_path) as sidecar:
        client = RawClient(sidecar.port)
        client.send(struct.pack("!ii", 10001, 196608) + b"u" * 100)
        fields = expect_fatal(client, "08P01")
        assert "startup packet length" in fields["M"], fields


# ---------------------------------------------------------------------------------------------
# 5. A logged-in client waiting for a server


def _holder(sidecar: SidecarProcess) -> psycopg.Connection[Any]:
    """A client that takes the pool's only server and keeps it (an open transaction)."""
    conn = psycopg.connect(sidecar.dsn("app_trust"), connect_timeout=10)
    conn.execute("SELECT 1")
    return conn


def _flood(total: int) -> Iterator[bytes]:
    # 64 KiB Query messages, 16 per chunk: few Python-level sends for many bytes.
    one = query(b"SELECT '" + b"x" * (64 * 1024) + b"'")
    return repeat(one * 16, total)


def test_input_is_not_read_whole_while_a_login_waits_for_a_pool_slot(
    shared_topology: Any, tmp_path: Path
) -> None:
    config = trust_config(shared_topology, pool={"mode": "session", "size": 1})
    with SidecarProcess(config, tmp_path) as sidecar:
        holder = _holder(sidecar)  # the only server, for the whole test
        client = RawClient(sidecar.port)
        client.startup("app_trust")
        rise, sent = attack(sidecar, [lambda: send_for(client.sock, _flood(200 * MiB), 4)])
        assert rise < RSS_BOUND, f"RSS rose by {rise / MiB:.0f} MiB while {sent / MiB:.0f} MiB were sent"
        client.close()
        holder.close()
        with psycopg.connect(sidecar.dsn("app_trust"), connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert_clean_log(sidecar)


def test_input_is_not_read_whole_while_a_transaction_waits_for_a_server(
    shared_topology: Any, tmp_path: Path
) -> None:
    config = trust_config(shared_topology, pool={"mode": "transaction", "size": 1})
    with SidecarProcess(config, tmp_path) as sidecar:
        client = login_trust(sidecar.port)
        holder = _holder(sidecar)  # in a transaction: its server is not handed back
        # Halfway through, the server is handed over: the held input goes to it, and reading
        # goes on only as fast as the server takes it (this client reads none of its answers).
        release = threading.Timer(2, holder.commit)
        release.start()
        rise, sent = attack(sidecar, [lambda: send_for(client.sock, _flood(400 * MiB), 4)])
        release.join()
        assert rise < RSS_BOUND, f"RSS rose by {rise / MiB:.0f} MiB while {sent / MiB:.0f} MiB were sent"
        client.close()
        holder.close()
        assert_clean_log(sidecar)


def test_input_is_not_read_whole_while_paused(shared_topology: Any, tmp_path: Path) -> None:
    config = trust_config(shared_topology, admin_users=["app_trust"], pool={"mode": "session"})
    with SidecarProcess(config, tmp_path) as sidecar:
        client = login_trust(sidecar.port)
        with psycopg.connect(sidecar.dsn("app_trust", dbname="pgsidecar"), autocommit=True) as admin:
            admin.execute("PAUSE")
            rise, sent = attack(sidecar, [lambda: send_for(client.sock, _flood(200 * MiB), 3)])
            admin.execute("RESUME")
        assert rise < RSS_BOUND, f"RSS rose by {rise / MiB:.0f} MiB while {sent / MiB:.0f} MiB were sent"
        client.close()
        assert_clean_log(sidecar)


# ---------------------------------------------------------------------------------------------
# 6. Outage mode: the responder stops reading a client that does not read its answers


@pytest.fixture
def outage_sidecar(shared_topology: Any, tmp_path: Path) -> Iterator[SidecarProcess]:
    """A sidecar in outage mode from the start: its front door (filled by an earlier sidecar with
    the same spool while the database was up) greets clients, and no configured host answers."""
    spool = {"backend": "sqlite", "path": str(tmp_path / "spool.db")}
    first = SidecarProcess(trust_config(shared_topology, spool=spool), tmp_path / "up").start()
    try:
        with psycopg.connect(first.dsn("app_trust"), connect_timeout=10) as conn:
            conn.execute("SELECT 1")
        first.wait_for_log("event=frontdoor_filled", timeout=15)
    finally:
        first.stop()
    config = trust_config([f"127.0.0.1:{free_port()}"], spool=spool, failover={"hold_timeout": "1s"})
    with SidecarProcess(config, tmp_path / "down") as sidecar:
        yield sidecar


def test_outage_responder_stops_reading_a_client_that_reads_no_answers(
    outage_sidecar: SidecarProcess,
) -> None:
    client = login_trust(outage_sidecar.port)
    client.query("SELECT 1")
    answer = client.read_until("ZE")
    assert [m.type for m in answer] == ["T", "D", "C", "Z"], answer
    one = query(b"SELECT 1")
    pipelined = one * 20_000  # 260 KiB
    rise, sent = attack(outage_sidecar, [lambda: send_for(client.sock, repeat(pipelined, 80 * MiB), 5)])
    # (The old responder read on and buffered every answer: 6 to 11 MiB of RSS a second here.)
    assert rise < 10 * MiB, f"RSS rose by {rise / MiB:.0f} MiB while {sent / MiB:.0f} MiB were sent"
    # The client reads again: everything it sent is answered, in order, and the session goes on.
    client.sock.settimeout(60)
    rest = one[sent % len(one) :] if sent % len(one) else b""
    expected = (sent + len(rest)) // len(one)
    sender = threading.Thread(target=lambda: client.send(rest + query(b"select 1")), daemon=True)
    sender.start()
    answers, final = count_ready(client, expected + 1)
    sender.join(10)
    assert answers == expected + 1, f"{answers} answers to {expected + 1} queries"
    assert final.startswith(b"T") and final.endswith(b"Z\x00\x00\x00\x05I"), final
    client.close()
    assert_clean_log(outage_sidecar)


# ---------------------------------------------------------------------------------------------
# 7. The admin console yields to the event loop and stops when its answers are not read


def _admin_login(sidecar: SidecarProcess) -> RawClient:
    return login_trust(sidecar.port, user="app_trust", database="pgsidecar")


def test_admin_flood_does_not_starve_logins_or_the_probe(shared_topology: Any, tmp_path: Path) -> None:
    failover = {"check_interval": "100ms", "probe_timeout": "1s"}
    config = trust_config(shared_topology, admin_users=["app_trust"], failover=failover)
    with SidecarProcess(config, tmp_path) as sidecar:
        failovers = metric(sidecar, "pgsidecar_failovers_total", kind="instance")
        admin = _admin_login(sidecar)
        stop = threading.Event()

        def drain() -> None:  # reads (and drops) every answer, so the console never waits
            admin.sock.settimeout(0.5)
            while not stop.is_set():
                try:
                    if not admin.sock.recv(1 << 20):
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        flood = query(b"SHOW CONFIG") * 300_000  # 5 MiB
        writer = threading.Thread(target=lambda: send_for(admin.sock, iter([flood]), 60), daemon=True)
        writer.start()
        try:
            sidecar.wait_for_log("event=admin_command", timeout=10)
            for _ in range(3):
                started = time.monotonic()
                with psycopg.connect(sidecar.dsn("app_scram"), connect_timeout=20) as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
                took = time.monotonic() - started
                # Generous: a login takes milliseconds; the old console held the loop for seconds
                # per read of commands, and the whole flood for half a minute.
                assert took < 5.0, f"a login and SELECT 1 took {took:.1f}s during the admin flood"
            time.sleep(1.5)  # more than a probe timeout, still within the flood
            assert writer.is_alive() or reader.is_alive()
            assert metric(sidecar, "pgsidecar_failovers_total", kind="instance") == failovers
            assert metric(sidecar, "pgsidecar_cluster_state", state="up") == 1
        finally:
            stop.set()
            admin.close()
            writer.join(10)
            reader.join(10)
        assert_clean_log(sidecar)


def test_admin_console_stops_reading_a_client_that_reads_no_answers(
    shared_topology: Any, tmp_path: Path
) -> None:
    config = trust_config(shared_topology, admin_users=["app_trust"])
    with SidecarProcess(config, tmp_path) as sidecar:
        admin = _admin_login(sidecar)
        flood = query(b"SHOW CONFIG") * 20_000
        rise, sent = attack(sidecar, [lambda: send_for(admin.sock, repeat(flood, 40 * MiB), 4)])
        assert rise < RSS_BOUND / 2, f"RSS rose by {rise / MiB:.0f} MiB while {sent / MiB:.0f} MiB were sent"
        admin.close()
        with psycopg.connect(sidecar.dsn("app_scram"), connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert_clean_log(sidecar)


# ---------------------------------------------------------------------------------------------
# 8. A malformed message gets 08P01, after the answers to what came before (transaction mode
#    closed the connection with no error at all; session mode lost the answers)

MALFORMED = {
    "parse_of_length_4": b"P\x00\x00\x00\x04",
    "parse_with_invalid_utf8": b"P\x00\x00\x00\x13" + b"\x00SELECT '\xff\xfe'\x00\x00\x00",
    "short_bind": b"B\x00\x00\x00\x05\x00",
    "zero_type_byte_after_sync": b"S\x00\x00\x00\x04" + b"\x00\x00\x00\x00\x04",
}

# What PostgreSQL itself answers when session mode relays these unexamined.
ANSWERED_BY_POSTGRES = {"parse_with_invalid_utf8": "22021", "short_bind": "08P01"}


@pytest.fixture(scope="module", params=["transaction", "session"])
def mode_sidecar(
    request: pytest.FixtureRequest, shared_topology: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    config = trust_config(shared_topology, pool={"mode": request.param})
    with SidecarProcess(config, tmp_path_factory.mktemp(request.param)) as sidecar:
        yield sidecar


def _answers(msgs: list[Msg]) -> list[str]:
    return [m.type for m in msgs]


@pytest.mark.parametrize("separate", [False, True], ids=["same_read", "own_read"])
@pytest.mark.parametrize("bad", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_message_gets_08P01_after_the_answers_before_it(
    mode_sidecar: SidecarProcess, bad: str, separate: bool
) -> None:
    since = mode_sidecar.log_offset()
    client = login_trust(mode_sidecar.port)
    valid = query(b"SELECT 1")
    if separate:
        client.send(valid)
        time.sleep(0.05)  # (not a synchronisation: either order of arrival must work)
        client.send(MALFORMED[bad])
    else:
        client.send(valid + MALFORMED[bad])
    msgs = client.read_until("E")
    assert _answers(msgs)[:4] == ["T", "D", "C", "Z"], [(m.type, m.body[:80]) for m in msgs]
    assert msgs[-1].type == "E"
    fields = msgs[-1].error_fields()
    if mode_sidecar.config["pool"]["mode"] == "session" and bad in ANSWERED_BY_POSTGRES:
        # Session mode looks neither inside Bind nor at a Parse's text: PostgreSQL answers them,
        # as it would directly (an ERROR; the session goes on).
        assert (fields["S"], fields["C"]) == ("ERROR", ANSWERED_BY_POSTGRES[bad]), fields
        client.send(b"S\x00\x00\x00\x04")
        assert client.read_until("Z")[-1].type == "Z"
        client.close()
    else:
        assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
        assert client.closed_by_peer()
    # The pool is fine: the next client runs on it.
    other = login_trust(mode_sidecar.port)
    other.query("SELECT 2")
    assert _answers(other.read_until("ZE")) == ["T", "D", "C", "Z"]
    other.close()
    assert_clean_log(mode_sidecar, since)
