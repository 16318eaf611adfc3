"""The full-outage spool end to end through the real sidecar process (ARCHITECTURE.md, P5).

A real topology loses every writer; the sidecar (sqlite or DynamoDB spool) keeps acknowledging
simple INSERT transactions from psycopg and from a freshly started SQLAlchemy engine, refuses
everything else with 57P03 after the hold, and replays every acknowledged transaction exactly once
when a writer returns. Outcomes are checked as rows on the new writer and metric values.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from tests.harness import pg
from tests.harness.clients import http_get as http
from tests.integration.test_failover import (
    connect,
    count_on,
    ids_on,
    make_table,
    metric,
    sqlstate_of_call,
    wait_state,
)


def _spool_config(backend: str, tmp_path: Path, endpoint: str | None) -> dict[str, Any]:
    spool: dict[str, Any] = {"backend": backend, "path": str(tmp_path / "spool.db")}
    if backend == "dynamodb":
        spool["dynamodb"] = {"table": f"spool-{uuid.uuid4().hex[:8]}", "region": "us-east-1",
                             "endpoint_url": endpoint}  # fmt: skip
    return spool


@pytest.mark.parametrize(
    ("backend", "mode"), [("sqlite", "session"), ("sqlite", "transaction"), ("dynamodb", "transaction")]
)
def test_outage_spools_inserts_and_replays_them_exactly_once(
    fresh_topology: pg.Topology,
    sidecar_factory: Any,
    tmp_path: Path,
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    backend: str,
    mode: str,
) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    topo = fresh_topology
    table = make_table(topo.a1, "spool")
    sidecar = sidecar_factory(
        {
            "pool": {"mode": mode},
            "failover": {"hold_timeout": "1s"},
            "spool": _spool_config(backend, tmp_path, moto_endpoint),
        },
        topology=topo,
    )
    conn = connect(sidecar, application_name="app")
    conn.execute(f"INSERT INTO {table} (id, client) VALUES ('before', 'app')")
    sidecar.wait_for_log("event=frontdoor_filled", timeout=10)
    # SQLAlchemy sees the database once while it is up (as an app that started before the outage).
    url = sa.engine.make_url("postgresql+psycopg://").set(
        username="app_scram", password="scram-secret", host=sidecar.host, port=sidecar.port,
        database=pg.APP_DB,
    )  # fmt: skip
    warm = sa.create_engine(url, pool_pre_ping=True)
    with warm.connect() as c:
        assert c.execute(sa.text("SELECT 1")).scalar() == 1
    warm.dispose()

    down = time.time()
    topo.a1.crash()
    topo.a2.crash()
    wait_state(sidecar, "outage", down, timeout=15)
    status, body = http(sidecar, "/readyz")
    assert status == 200 and "spooled" in json.loads(body)["reason"], body

    # An existing connection: an autocommit INSERT, and an explicit transaction of two.
    conn.execute(f"INSERT INTO {table} (id, client, at) VALUES (%s, 'app', now())", ("ac-1",))
    with conn.transaction():
        conn.execute(f"INSERT INTO {table} (id, client) VALUES (%s, 'app')", ("tx-1",))
        conn.execute(f"INSERT INTO {table} (id, client) VALUES ('tx-2', 'app'), ('tx-3', 'app')")
    # A rolled-back transaction leaves nothing behind.
    with conn.transaction():
        conn.execute(f"INSERT INTO {table} (id, client) VALUES ('rolled-back', 'app')")
        raise psycopg.Rollback()
    # Something that needs the database: held for hold_timeout, then 57P03; nothing is stored.
    state, waited = sqlstate_of_call(lambda: conn.execute(f"SELECT count(*) FROM {table}"))
    assert state == "57P03" and 0.8 <= waited <= 5.0, (state, waited)

    # A new client logs in during the outage, from the front-door cache.
    with connect(sidecar, application_name="newcomer") as newcomer:
        newcomer.execute(f"INSERT INTO {table} (id, client) VALUES ('new-1', 'newcomer')")
    # A freshly started SQLAlchemy app places an order.
    engine = sa.create_engine(url, pool_pre_ping=True)
    with engine.begin() as c:
        c.execute(sa.text(f"INSERT INTO {table} (id, client) VALUES (:id, 'sqlalchemy')"), {"id": "sa-1"})
    engine.dispose()
    spooled = 4  # transactions: ac-1, the explicit one, new-1, sa-1
    assert metric(sidecar, "pgsidecar_spool_records_total", result="spooled") == spooled
    assert metric(sidecar, "pgsidecar_spool_pending") == spooled

    back = time.time()
    topo.a2.start()
    topo.a2.promote()
    wait_state(sidecar, "up", back, writer=topo.a2, timeout=30)
    assert metric(sidecar, "pgsidecar_spool_pending") == 0
    assert metric(sidecar, "pgsidecar_spool_records_total", result="replayed") == spooled
    expected = ["ac-1", "before", "new-1", "sa-1", "tx-1", "tx-2", "tx-3"]
    assert ids_on(topo.a2, table) == expected
    # now() was pinned to the spool time, not the replay time.
    pinned = topo.a2.query(f"SELECT extract(epoch FROM at) FROM {table} WHERE id = 'ac-1'", dbname=pg.APP_DB)
    assert down <= float(pinned[0][0]) <= back
    # New work after recovery goes to the writer; nothing is replayed twice.
    conn.execute(f"INSERT INTO {table} (id, client) VALUES ('after', 'app')")
    assert count_on(topo.a2, table) == len(expected) + 1
    assert metric(sidecar, "pgsidecar_spool_records_total", result="duplicate") == 0
    conn.close()



@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_transaction_cut_by_the_outage_goes_on_in_the_spool(
    fresh_topology: pg.Topology, sidecar_factory: Any, tmp_path: Path, mode: str
) -> None:
    """A transaction open when the last writer crashes (BEGIN and an INSERT answered): no writer
    comes within the hold, and the spool answers its journal exactly as the client was answered,
    so it goes on there as if the outage had begun before it: its next INSERT and its COMMIT are
    acknowledged, and it is applied once when a writer returns. One that read cannot (the spool
    does not answer a SELECT): 40001, as before, and nothing of it is applied."""
    topo = fresh_topology
    table = make_table(topo.a1, "spool")
    sidecar = sidecar_factory(
        {"pool": {"mode": mode}, "failover": {"hold_timeout": "1s"},
         "spool": _spool_config("sqlite", tmp_path, None)},
        topology=topo,
    )  # fmt: skip
    writer = connect(sidecar, autocommit=False, application_name="open-tx")
    writer.execute(f"INSERT INTO {table} (id, client) VALUES (%s, 'app')", ("first",))
    reader = connect(sidecar, autocommit=False, application_name="reader")
    reader.execute(f"INSERT INTO {table} (id, client) VALUES ('read-first', 'reader')")
    assert reader.execute(f"SELECT count(*) FROM {table}").fetchone() == (1,)  # (its own)
    sidecar.wait_for_log("event=frontdoor_filled", timeout=10)

    down = time.time()
    topo.a1.crash()
    topo.a2.crash()
    wait_state(sidecar, "outage", down, timeout=15)
    sidecar.wait_for_log("server=spool", timeout=10)
    writer.execute(f"INSERT INTO {table} (id, client) VALUES (%s, 'app')", ("second",))
    writer.commit()
    state, _ = sqlstate_of_call(
        lambda: reader.execute(f"INSERT INTO {table} (id, client) VALUES ('never', 'reader')")
    )
    assert state == "40001", state
    reader.rollback()
    assert metric(sidecar, "pgsidecar_transaction_replays_total", result="replayed") == 1
    assert metric(sidecar, "pgsidecar_spool_records_total", result="spooled") == 1
    assert "no writer anywhere, and the spool cannot take the transaction" in sidecar.log_text()

    back = time.time()
    topo.a2.start()
    topo.a2.promote()
    wait_state(sidecar, "up", back, writer=topo.a2, timeout=30)
    assert metric(sidecar, "pgsidecar_spool_records_total", result="replayed") == 1
    assert ids_on(topo.a2, table) == ["first", "second"]
    writer.execute(f"INSERT INTO {table} (id, client) VALUES ('after', 'app')")
    writer.commit()
    assert ids_on(topo.a2, table) == ["after", "first", "second"]
    writer.close()
    reader.close()


def test_a_begin_in_flight_when_the_last_writer_goes_goes_on_in_the_spool(
    fresh_topology: pg.Topology, sidecar_factory: Any, tmp_path: Path
) -> None:
    """psycopg's BEGIN is in flight (its backend stopped) when the writer crashes, and then its
    standby: the spool answers the BEGIN, so the INSERT behind it and the COMMIT are acknowledged
    from the spool (not 08007 "may or may not have been applied"), and applied once later."""
    topo = fresh_topology
    table = make_table(topo.a1, "spool")
    topo.a1.execute("ALTER SYSTEM SET restart_after_crash = off")  # (a backend killed: a1 is gone)
    topo.a1.execute("SELECT pg_reload_conf()")
    sidecar = sidecar_factory(
        {"failover": {"hold_timeout": "1s"}, "spool": _spool_config("sqlite", tmp_path, None)}, topology=topo
    )
    conn = connect(sidecar, autocommit=False, application_name="begins")
    conn.execute("SELECT 1")
    conn.rollback()  # (the session's server is there, idle)
    sidecar.wait_for_log("event=frontdoor_filled", timeout=10)
    pid = int(topo.a1.query("SELECT pid FROM pg_stat_activity WHERE application_name = 'begins'")[0][0])
    os.kill(pid, signal.SIGSTOP)
    with ThreadPoolExecutor(max_workers=1) as pool:
        insert = pool.submit(
            sqlstate_of_call, lambda: conn.execute(f"INSERT INTO {table} (id, client) VALUES ('only', 'app')")
        )
        time.sleep(0.5)  # BEGIN sent, unanswered
        assert not insert.done()
        down = time.time()
        os.kill(pid, signal.SIGKILL)
        topo.a1.crash()
        topo.a2.crash()
        wait_state(sidecar, "outage", down, timeout=15)
        state, _ = insert.result(timeout=30)
    assert state is None, state
    conn.commit()
    assert metric(sidecar, "pgsidecar_transaction_replays_total", result="replayed") == 1
    assert metric(sidecar, "pgsidecar_spool_records_total", result="spooled") == 1
    back = time.time()
    topo.a2.start()
    topo.a2.promote()
    wait_state(sidecar, "up", back, writer=topo.a2, timeout=30)
    assert ids_on(topo.a2, table) == ["only"]
    conn.close()


def test_a_request_held_during_an_outage_runs_when_the_writer_returns_within_the_hold(
    fresh_topology: pg.Topology, sidecar_factory: Any, tmp_path: Path
) -> None:
    """Outside a transaction, a query the spool cannot take waits like a failover-held request;
    a writer back within `failover.hold_timeout` runs it (extended and simple protocol)."""
    topo = fresh_topology
    table = make_table(topo.a1, "held")
    sidecar = sidecar_factory(
        {"failover": {"hold_timeout": "4s"}, "spool": _spool_config("sqlite", tmp_path, None)},
        topology=topo,
    )
    conn = connect(sidecar, application_name="app")
    conn.execute(f"INSERT INTO {table} (id, client) VALUES ('before', 'app')")
    sidecar.wait_for_log("event=frontdoor_filled", timeout=10)
    down = time.time()
    topo.a1.crash()
    topo.a2.crash()
    wait_state(sidecar, "outage", down, timeout=15)

    env = {**os.environ, "PGPASSWORD": "scram-secret"}
    psql = [str(pg.find_bindir() / "psql"), "-X", "-At", "-h", sidecar.host, "-p", str(sidecar.port),
            "-U", "app_scram", "-d", pg.APP_DB, "-c", f"SELECT count(*) FROM {table}"]  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        extended = pool.submit(lambda: conn.execute(f"SELECT count(*) FROM {table}").fetchone())
        simple = pool.submit(subprocess.run, psql, capture_output=True, text=True, env=env, timeout=30)
        time.sleep(1.0)
        assert not extended.done() and not simple.done()  # held, not refused
        back = time.time()
        topo.a2.start()
        topo.a2.promote()
        assert extended.result(timeout=20) == (1,)
        result = simple.result(timeout=20)
    assert result.returncode == 0 and result.stdout.strip() == "1", result.stderr
    assert time.time() - back < 15
    assert sidecar.log_text().count("event=spooling_request_handed_back") >= 2
    conn.close()
