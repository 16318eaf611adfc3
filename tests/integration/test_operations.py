"""Operating the sidecar process: SIGTERM drains, SIGHUP reloads, logs are structured and secret-free.

The drain tests use `auth.method: trust` so that a raw-socket client (tests/harness/wire.py) can
sit idle and read exactly what the sidecar sends it when shutting down.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.harness import pg
from tests.harness.sidecar import SIDECAR_PASSWORDS, SidecarProcess, deep_merge
from tests.harness.wire import RawClient, login_trust

TRUST: dict[str, Any] = {"auth": {"method": "trust"}, "admin_users": ["app_scram"]}


@pytest.fixture
def table(shared_topology: pg.Topology) -> Iterator[str]:
    """A fresh table on the writer that the harness users may write."""
    name = f"ops_{uuid.uuid4().hex[:10]}"
    shared_topology.a1.execute(f"CREATE TABLE {name} (id int)", dbname=pg.APP_DB)
    shared_topology.a1.execute(f"GRANT ALL ON {name} TO {', '.join(pg.USERS)}", dbname=pg.APP_DB)
    yield name
    shared_topology.a1.execute(f"DROP TABLE IF EXISTS {name}", dbname=pg.APP_DB)


def _app(sidecar: SidecarProcess, user: str = "app_trust") -> psycopg.Connection[Any]:
    return psycopg.connect(sidecar.dsn(user, connect_timeout=5), autocommit=True)


def _admin_rows(sidecar: SidecarProcess, command: str) -> list[dict[str, Any]]:
    dsn = sidecar.dsn("app_scram", dbname="pgsidecar", connect_timeout=5)
    with psycopg.connect(dsn, autocommit=True) as admin:
        cur = admin.execute(command)
        assert cur.description is not None
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _pool_size(sidecar: SidecarProcess, user: str) -> int:
    (row,) = [r for r in _admin_rows(sidecar, "SHOW POOLS") if r["user"] == user]
    return int(row["size"])


def _fatal_sqlstate(client: RawClient) -> str | None:
    """The SQLSTATE of the error the sidecar sends an idle client before closing it."""
    msgs = client.read_until("E")
    return msgs[-1].sqlstate if msgs and msgs[-1].type == "E" else None


def _assert_no_secrets(log: str) -> None:
    for secret in SIDECAR_PASSWORDS.values():
        assert secret not in log, f"a password reached the sidecar log: {secret!r}"


# ---------------------------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------------------------


def test_sigterm_lets_the_open_transaction_commit_and_closes_idle_clients(sidecar_factory, shared_topology,
                                                                         table):  # fmt: skip
    sidecar = sidecar_factory(TRUST)
    idle = login_trust(sidecar.port)
    in_sleep = threading.Event()
    errors: list[BaseException] = []

    def transaction() -> None:
        try:
            with _app(sidecar) as conn:
                conn.execute("BEGIN")
                conn.execute(f"INSERT INTO {table} VALUES (1)")
                in_sleep.set()
                conn.execute("SELECT pg_sleep(1)")
                conn.execute("COMMIT")
        except BaseException as exc:  # asserted below
            errors.append(exc)

    worker = threading.Thread(target=transaction)
    worker.start()
    assert in_sleep.wait(10)
    time.sleep(0.2)  # the pg_sleep is on its way upstream
    sidecar.send_signal(signal.SIGTERM)
    # The idle client is told at once, while the transaction is still running.
    assert _fatal_sqlstate(idle) == "57P01"
    assert worker.is_alive(), "the idle client was only closed after the transaction ended"
    assert idle.closed_by_peer()
    # New connections are refused from the start of the drain.
    with pytest.raises(OSError):
        socket.create_connection((sidecar.host, sidecar.port), timeout=1).close()
    worker.join(15)
    assert errors == [], errors
    assert shared_topology.a1.query(f"SELECT id FROM {table}", dbname=pg.APP_DB) == [(1,)]
    assert sidecar.wait(15) == 0
    log = sidecar.log_text()
    assert "event=shutting_down" in log
    assert 'reason="57P01: pgsidecar is shutting down"' in log


def test_sigterm_rolls_back_a_transaction_still_open_at_shutdown_timeout(sidecar_factory, shared_topology,
                                                                        table):  # fmt: skip
    sidecar = sidecar_factory({**TRUST, "shutdown_timeout": "1s"})
    conn = _app(sidecar)
    conn.execute("BEGIN")
    conn.execute(f"INSERT INTO {table} VALUES (2)")  # never committed
    started = time.monotonic()
    sidecar.send_signal(signal.SIGTERM)
    assert sidecar.wait(15) == 0
    assert 0.9 <= time.monotonic() - started < 10
    with pytest.raises(psycopg.OperationalError):
        conn.execute("COMMIT")
    conn.close()
    assert shared_topology.a1.query(f"SELECT count(*) FROM {table}", dbname=pg.APP_DB) == [(0,)]
    assert "shutdown_timeout (1s)" in sidecar.log_text()


# ---------------------------------------------------------------------------------------------
# SIGHUP
# ---------------------------------------------------------------------------------------------


def test_sighup_applies_a_new_pool_size_without_dropping_clients(sidecar_factory):
    sidecar = sidecar_factory({**TRUST, "pool": {"size": 3}})
    with _app(sidecar) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert _pool_size(sidecar, "app_trust") == 3
        since = sidecar.log_offset()
        sidecar.write_config(deep_merge(sidecar.config, {"pool": {"size": 5}, "log_level": "debug"}))
        sidecar.send_signal(signal.SIGHUP)
        line = sidecar.wait_for_log("event=config_reloaded", since=since)
        assert "source=SIGHUP" in line and "pool.size" in line and "log_level" in line
        assert _pool_size(sidecar, "app_trust") == 5
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == pid
    assert sidecar.is_running()


def test_sighup_with_a_broken_config_is_refused_and_changes_nothing(sidecar_factory):
    sidecar = sidecar_factory({**TRUST, "pool": {"size": 3}})
    with _app(sidecar) as conn:
        conn.execute("SELECT 1")
        since = sidecar.log_offset()
        sidecar.config_path.write_text("pool: {size: [not, a, number]\n")  # unclosed flow mapping
        sidecar.send_signal(signal.SIGHUP)
        line = sidecar.wait_for_log("event=reload_refused", since=since)
        assert "YAML syntax error" in line
        assert _pool_size(sidecar, "app_trust") == 3
        assert conn.execute("SELECT 2").fetchone() == (2,)
        since = sidecar.log_offset()
        sidecar.write_config(deep_merge(sidecar.config, {"pool": {"size": 0}}))
        sidecar.send_signal(signal.SIGHUP)
        assert "pool.size" in sidecar.wait_for_log("event=reload_refused", since=since)
        assert _pool_size(sidecar, "app_trust") == 3
        assert conn.execute("SELECT 3").fetchone() == (3,)
    assert sidecar.is_running()


# ---------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------


def test_json_log_is_one_object_per_line_with_connection_ids_and_no_passwords(sidecar_factory):
    sidecar = sidecar_factory({"log_format": "json", "admin_users": ["app_scram"]})
    with psycopg.connect(sidecar.dsn("app_scram", connect_timeout=5), autocommit=True) as conn:
        conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(sidecar.dsn("app_scram", password="not-the-password", connect_timeout=5))
    _admin_rows(sidecar, "SHOW CONFIG")
    assert sidecar.terminate() == 0
    lines = sidecar.log_text().splitlines()
    assert lines
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(e, dict) and e.get("event") for e in events)
    names = {e["event"] for e in events}
    assert {"listening", "client_login", "client_ready", "client_closed", "admin_command",
            "shutting_down"} <= names  # fmt: skip
    conns = {e["conn"] for e in events if "conn" in e}
    assert len(conns) >= 3 and all(c.startswith("c") for c in conns)
    # One client can be followed through the log by its id.
    login = next(e for e in events if e["event"] == "client_ready")
    assert any(e["event"] == "client_closed" and e["conn"] == login["conn"] for e in events)
    text = "\n".join(lines)
    _assert_no_secrets(text)
    assert "not-the-password" not in text
