"""Pool housekeeping: min_idle, idle timeout, lifetime, liveness check, concurrent logins."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime

import psycopg

from tests.harness.clients import wait_for as _wait_for


def _backends(node, app: str = "") -> int:
    rows = node.query(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app_scram' AND datname = 'appdb'"
        + (f" AND application_name = '{app}'" if app else "")
    )
    return int(rows[0][0])


def test_min_idle_connections_are_opened_and_kept(sidecar_factory, shared_topology):
    sidecar = sidecar_factory({"pool": {"min_idle": 3, "size": 5}})
    with psycopg.connect(sidecar.dsn()) as conn:  # the pool for (app_scram, appdb) now exists
        conn.execute("SELECT 1")
    assert _wait_for(lambda: _backends(shared_topology.a1) >= 3)
    # A pooled connection killed on the server is replaced to keep min_idle.
    shared_topology.a1.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE usename = 'app_scram' AND datname = 'appdb' LIMIT 1"
    )
    time.sleep(0.3)
    assert _wait_for(lambda: _backends(shared_topology.a1) >= 3)
    with psycopg.connect(sidecar.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_idle_server_connections_are_closed_after_server_idle_timeout(sidecar_factory, shared_topology):
    sidecar = sidecar_factory({"pool": {"server_idle_timeout": "500ms"}})
    with psycopg.connect(sidecar.dsn(application_name="idle-timeout-test")) as conn:
        conn.execute("SELECT 1")
    assert _backends(shared_topology.a1) >= 1
    assert _wait_for(lambda: _backends(shared_topology.a1) == 0, timeout=5)
    assert "server_idle_timeout reached" in sidecar.log_text()


def test_a_server_kept_by_an_idle_client_is_closed_after_idle_timeout(sidecar_factory, shared_topology):
    # Transaction mode keeps a server with its client between transactions; a client that then
    # stays connected but idle must not keep it open past server_idle_timeout.
    sidecar = sidecar_factory({"pool": {"mode": "transaction", "server_idle_timeout": "500ms"}})
    app = "kept-idle-timeout"
    with psycopg.connect(sidecar.dsn(application_name=app), autocommit=True) as conn:
        conn.execute("SELECT 1")
        assert _backends(shared_topology.a1, app) == 1
        assert _wait_for(lambda: _backends(shared_topology.a1, app) == 0, timeout=5)
        assert "server_idle_timeout reached" in sidecar.log_text()
        assert conn.execute("SELECT 2").fetchone() == (2,)  # on a new server


def test_server_lifetime_retires_connections_between_clients(sidecar_factory, shared_topology):
    sidecar = sidecar_factory({"pool": {"server_lifetime": "300ms", "mode": "transaction", "size": 1}})
    pids = set()
    with psycopg.connect(sidecar.dsn(), autocommit=True) as conn:
        for _ in range(8):
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None
            pids.add(row[0])
            time.sleep(0.1)
    assert len(pids) >= 2, "a server past its lifetime was reused"
    assert "server_lifetime reached" in sidecar.log_text()


def test_dead_idle_connection_is_detected_on_checkout(sidecar_factory, shared_topology):
    sidecar = sidecar_factory({"pool": {"server_check_after_idle": 0}})
    with psycopg.connect(sidecar.dsn()) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert first is not None
    # Kill the pooled backend behind the sidecar's back; the next client must not notice.
    shared_topology.a1.query("SELECT pg_terminate_backend(%s)", (first[0],))
    with psycopg.connect(sidecar.dsn()) as conn:
        second = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert second is not None and second[0] != first[0]


def test_concurrent_logins_are_bounded(sidecar_factory, shared_topology):
    # (commit_outcome off: the marker ledger's availability check logs in too, once per pool,
    # beside the pool's own logins that this bound is about.)
    sidecar = sidecar_factory(
        {"pool": {"max_concurrent_connects": 1, "size": 10}, "failover": {"commit_outcome": "off"}}
    )
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with psycopg.connect(sidecar.dsn()) as conn:
                conn.execute("SELECT pg_sleep(0.2)")
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    intervals = _login_intervals(sidecar.log_text())
    assert len(intervals) >= 5, "expected several pooled logins"
    # With max_concurrent_connects 1 no login starts before the previous one ended (2 ms for the
    # log's millisecond resolution).
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert start >= end - 0.002, f"logins overlapped: {intervals}"


def _login_intervals(log: str) -> list[tuple[float, float]]:
    """(start, end) of every pooled login, from `server_connected` lines (end time and duration)."""
    out = []
    for line in log.splitlines():
        if "event=server_connected" not in line or "database=appdb" not in line:
            continue
        stamp = datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        end = stamp.timestamp()
        ms = float(line.rsplit("ms=", 1)[1].split()[0])
        out.append((end - ms / 1000, end))
    return sorted(out)


def test_a_reset_that_does_not_answer_in_time_drops_the_server_and_frees_its_place(
    sidecar_factory, shared_topology
):
    # The reset query outlasts upstream.connect_timeout: the server is closed, and its place in a
    # pool of one goes to the next client at once (a fresh server), not after the reset ends.
    sidecar = sidecar_factory(
        {
            "pool": {"size": 1, "reset_query": "SELECT pg_sleep(30)"},
            "upstream": {"connect_timeout": "500ms"},
        }
    )
    with psycopg.connect(sidecar.dsn()) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert first is not None
    assert _wait_for(lambda: "reset query failed: no answer within 0.5s" in sidecar.log_text(), timeout=10)
    with psycopg.connect(sidecar.dsn()) as conn:
        second = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert second is not None and second[0] != first[0]
    # Dropped once: the deadline's drop, not again when the pending read then fails.
    assert sidecar.log_text().count("reset query failed") == 1
    # Cleanup for the tests that count backends: PostgreSQL notices the closed socket only when
    # pg_sleep ends.
    shared_topology.a1.query("SELECT pg_terminate_backend(%s)", (first[0],))
    assert _wait_for(
        lambda: not shared_topology.a1.query("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (first[0],))
    )
