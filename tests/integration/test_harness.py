"""Proof that the test harness builds what the rest of the suite relies on."""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.harness import pg
from tests.harness.sidecar import (
    REMOVE,
    SIDECAR_PASSWORDS,
    SidecarError,
    SidecarProcess,
    deep_merge,
    free_port,
    sidecar_config,
)


def _table() -> str:
    return "t_" + uuid.uuid4().hex[:12]


def _has_row(node: pg.PgNode, table: str, value: int) -> bool:
    return bool(node.query(f"SELECT count(*) FROM {table} WHERE v = %s", (value,), dbname=pg.APP_DB)[0][0])


def _wait_row(node: pg.PgNode, table: str, value: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _has_row(node, table, value):
        assert time.monotonic() < deadline, f"{node.name} never got row {value} of {table}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Topology shape (shared, read-only)
# ---------------------------------------------------------------------------------------------


def test_topology_shape(shared_topology: pg.Topology) -> None:
    topo = shared_topology
    assert topo.writer() is topo.a1
    assert [n.name for n in topo.nodes] == ["a1", "a2", "b1"]
    assert len({n.port for n in topo.nodes}) == 3
    assert all(n.is_running() for n in topo.nodes)
    assert topo.a2.in_recovery() and topo.b1.in_recovery()
    repl = topo.a1.replication()
    assert {name: st["state"] for name, st in repl.items()} == {"a2": "streaming", "b1": "streaming"}
    # ANY 1 (a2, b1): both are quorum candidates.
    assert {st["sync_state"] for st in repl.values()} == {"quorum"}
    assert topo.a1.query("SHOW synchronous_standby_names")[0][0] == "ANY 1 (a2, b1)"
    assert [n.timeline() for n in topo.nodes] == [1, 1, 1]
    assert topo.a1.query("SHOW cluster_name")[0][0] == "a1"
    assert topo.a1.query("SHOW listen_addresses")[0][0] == "127.0.0.1"
    assert topo.a1.query("SHOW fsync")[0][0] == "on"
    assert topo.regions() == {"region-a": [topo.a1, topo.a2], "region-b": [topo.b1]}
    assert topo.a1.dsn().startswith(f"host=127.0.0.1 port={topo.a1.port} ")


@pytest.mark.parametrize("basebackup", [False, True], ids=["template-clones", "pg_basebackup"])
def test_make_topology_timing(pg_base_dir: Path, basebackup: bool) -> None:
    # Reported, not asserted (ARCHITECTURE.md, Testing: never on wall-clock speed).
    t0 = time.monotonic()
    topo = pg.make_topology(pg_base_dir, basebackup=basebackup)
    elapsed = time.monotonic() - t0
    try:
        assert topo.writer() is topo.a1
        assert {n: st["sync_state"] for n, st in topo.a1.replication().items()} == {
            "a2": "quorum", "b1": "quorum"
        }
        table = _table()
        topo.a1.execute(f"CREATE TABLE {table} AS SELECT 1 AS v", dbname=pg.APP_DB)
        topo.a1.wait_caught_up([topo.a2, topo.b1])
        assert _has_row(topo.a2, table, 1) and _has_row(topo.b1, table, 1)
    finally:
        topo.stop_all()
        shutil.rmtree(topo.base_dir, ignore_errors=True)
    print(f"\nmake_topology(basebackup={basebackup}) took {elapsed:.2f}s")


def test_sync_commit_lands_on_a_standby(shared_topology: pg.Topology) -> None:
    topo = shared_topology
    table = _table()
    topo.a1.execute(f"CREATE TABLE {table} (v int)", dbname=pg.APP_DB)
    with psycopg.connect(topo.a1.dsn(dbname=pg.APP_DB), autocommit=True) as conn:
        # remote_apply: the commit returns only once a quorum standby has applied it, so it is
        # visible there immediately, with no waiting on our side.
        conn.execute("SET synchronous_commit = remote_apply")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert _has_row(topo.a2, table, 1) or _has_row(topo.b1, table, 1)
    # And the default (synchronous_commit=on) path: a standby has flushed the commit record.
    with psycopg.connect(topo.a1.dsn(dbname=pg.APP_DB), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (2)")
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert lsn is not None
    flushed = topo.a1.query(
        "SELECT count(*) FROM pg_stat_replication WHERE flush_lsn >= %s::pg_lsn", (lsn[0],)
    )[0][0]
    # Walsender feedback may trail by a status message, so give it the status interval.
    deadline = time.monotonic() + 5
    while flushed < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        flushed = topo.a1.query(
            "SELECT count(*) FROM pg_stat_replication WHERE flush_lsn >= %s::pg_lsn", (lsn[0],)
        )[0][0]
    assert flushed >= 1
    topo.a1.wait_caught_up([topo.a2, topo.b1])
    assert all(_has_row(n, table, 2) for n in (topo.a2, topo.b1))
    topo.a1.execute(f"DROP TABLE {table}", dbname=pg.APP_DB)


def test_sync_commit_blocks_without_standbys(fresh_topology: pg.Topology) -> None:
    topo = fresh_topology
    topo.a2.stop()
    topo.b1.stop()
    table = _table()
    # DDL commits wait for the quorum too, so do it with local commit.
    with psycopg.connect(topo.a1.dsn(dbname=pg.APP_DB), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = local")
        conn.execute(f"CREATE TABLE {table} (v int)")
    with psycopg.connect(topo.a1.dsn(dbname=pg.APP_DB), autocommit=True) as conn:
        pid = conn.info.backend_pid
        # statement_timeout does not cover the commit's wait for the quorum; a cancel does, and
        # only warns ("canceling wait for synchronous replication"): the commit is local by then.
        timer = threading.Timer(0.5, topo.a1.execute, ("SELECT pg_cancel_backend(%s)", (pid,)))
        timer.start()
        t0 = time.monotonic()
        try:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
        finally:
            timer.cancel()
        assert time.monotonic() - t0 >= 0.4


# ---------------------------------------------------------------------------------------------
# Roles and authentication
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", sorted(pg.USERS))
def test_role_logs_in_with_its_method(shared_topology: pg.Topology, user: str) -> None:
    node = shared_topology.a1
    password = pg.USERS[user]
    with psycopg.connect(node.dsn(user, pg.APP_DB, password), connect_timeout=5) as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
        assert row == (user, pg.APP_DB)
        # PG15 revoked CREATE on public from PUBLIC; the harness grants it back to its roles.
        table = _table()
        conn.execute(f"CREATE TABLE {table} (v int)")
        conn.execute(f"DROP TABLE {table}")
    # The hba line that matches is the one for this role's method.
    rule = node.query(
        "SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' AND %s = ANY(user_name)"
        " AND 'all' = ANY(database)",
        (user,),
    )
    assert rule == [(pg.USER_AUTH_METHODS[user],)]
    if password is not None:
        with pytest.raises(psycopg.OperationalError, match="authentication failed"):
            psycopg.connect(node.dsn(user, pg.APP_DB, "wrong-password"), connect_timeout=5)


def test_passwords_stored_as_intended(shared_topology: pg.Topology) -> None:
    stored = dict(
        shared_topology.a1.query("SELECT rolname, rolpassword FROM pg_authid WHERE rolname LIKE 'app_%'")
    )
    assert stored["app_scram"].startswith("SCRAM-SHA-256$")
    assert stored["app_md5"].startswith("md5")
    assert stored["app_clear"].startswith("SCRAM-SHA-256$")
    assert stored["app_trust"] is None


def test_roles_exist_on_standbys(shared_topology: pg.Topology) -> None:
    for node in (shared_topology.a2, shared_topology.b1):
        with psycopg.connect(node.dsn("app_scram", pg.APP_DB, "scram-secret"), connect_timeout=5) as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), current_user").fetchone()
            assert row == (True, "app_scram")


# ---------------------------------------------------------------------------------------------
# Failover (destructive: fresh topologies)
# ---------------------------------------------------------------------------------------------


def test_crash_promote_and_region_repoint(fresh_topology: pg.Topology) -> None:
    topo = fresh_topology
    table = _table()
    topo.a1.execute(f"CREATE TABLE {table} (v int)", dbname=pg.APP_DB)
    topo.a1.execute(f"INSERT INTO {table} VALUES (1)", dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2, topo.b1])

    topo.a1.crash()
    assert not topo.a1.is_running()
    with pytest.raises(psycopg.OperationalError):
        topo.a1.query("SELECT 1")

    topo.a2.promote()
    assert topo.writer() is topo.a2
    assert topo.a2.timeline() == 2
    # The acknowledged row survived the crash.
    assert _has_row(topo.a2, table, 1)
    topo.a2.execute(f"INSERT INTO {table} VALUES (2)", dbname=pg.APP_DB)

    # Region B follows the new writer onto its timeline.
    topo.b1.repoint(topo.a2)
    assert topo.a2.replication()["b1"]["state"] == "streaming"
    assert topo.b1.in_recovery()
    _wait_row(topo.b1, table, 2)
    assert topo.b1.timeline() == 2

    # The new writer can get its own sync quorum back, and a replacement standby (base backup).
    pg.set_sync_standbys(topo.a2, ["b1"])
    with psycopg.connect(topo.a2.dsn(dbname=pg.APP_DB), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = remote_apply")
        conn.execute(f"INSERT INTO {table} VALUES (3)")
    assert _has_row(topo.b1, table, 3)
    a3 = pg.make_standby(topo.a2, topo.base_dir, "a3")
    try:
        assert topo.a2.query("SHOW synchronous_standby_names")[0][0] == "ANY 1 (b1, a3)"
        assert a3.in_recovery() and a3.timeline() == 2
        assert _has_row(a3, table, 3)
        assert "application_name=a3" in (a3.datadir / "postgresql.auto.conf").read_text()
    finally:
        a3.stop("immediate")


def test_stale_writer_restarted_alone(fresh_topology: pg.Topology) -> None:
    topo = fresh_topology
    table = _table()
    topo.a1.execute(f"CREATE TABLE {table} (v int)", dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2, topo.b1])
    topo.a1.crash()
    topo.a2.promote()
    topo.b1.repoint(topo.a2)

    # Its old quorum now follows a2, so with its sync list every commit would hang; drop it so
    # the stale writer is fully writable -- the dangerous case the sidecar must fence.
    pg.set_sync_standbys(topo.a1, [])
    topo.a1.start()
    assert not topo.a1.in_recovery()
    assert topo.a1.timeline() == 1 < topo.a2.timeline() == 2
    topo.a1.execute(f"INSERT INTO {table} VALUES (42)", dbname=pg.APP_DB)
    assert _has_row(topo.a1, table, 42)
    assert not _has_row(topo.a2, table, 42)
    with pytest.raises(pg.PgHarnessError, match="exactly one writer"):
        topo.writer()

    # Resolving it: the old primary rejoins as a standby of the new writer (re-cloned).
    with pytest.raises(pg.PgHarnessError, match="is not a standby"):
        topo.a1.repoint(topo.a2, rebuild_if_diverged=False)
    topo.a1.repoint(topo.a2)
    assert topo.a1.in_recovery() and topo.a1.timeline() == 2
    assert topo.writer() is topo.a2
    assert not _has_row(topo.a1, table, 42)


def test_repoint_rebuilds_a_standby_that_is_ahead(fresh_topology: pg.Topology) -> None:
    topo = fresh_topology
    table = _table()
    topo.a1.execute(f"CREATE TABLE {table} (v int)", dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2, topo.b1])
    # a2 misses the next writes, b1 gets them: after a2's promotion b1 is past the fork point.
    topo.a2.stop()
    pg.set_sync_standbys(topo.a1, ["b1"])
    topo.a1.execute(f"INSERT INTO {table} VALUES (7)", dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.b1])
    topo.a1.crash()
    topo.a2.start()
    topo.a2.promote()
    assert not _has_row(topo.a2, table, 7)

    with pytest.raises(pg.PgHarnessError, match="diverged"):
        topo.b1.repoint(topo.a2, rebuild_if_diverged=False)
    topo.b1.repoint(topo.a2)
    assert topo.a2.replication()["b1"]["state"] == "streaming"
    topo.a2.execute(f"INSERT INTO {table} VALUES (8)", dbname=pg.APP_DB)
    _wait_row(topo.b1, table, 8)
    assert not _has_row(topo.b1, table, 7)


def test_node_restart_and_start_failure_reports_log(pg_base_dir: Path) -> None:
    base = pg.make_pg_dir(pg_base_dir, prefix="single-")
    node = pg.make_primary(base, "solo")
    try:
        node.execute("CREATE TABLE keep (v int)")
        node.execute("INSERT INTO keep VALUES (1)")
        node.crash()
        node.start()  # crash recovery
        assert node.query("SELECT v FROM keep") == [(1,)]
        node.restart()
        assert node.is_running() and not node.in_recovery()
        node.stop()
        assert not node.is_running()
        node.set_config({"shared_buffers": "not-a-size"})
        with pytest.raises(pg.PgHarnessError, match="shared_buffers"):
            node.start(timeout=10)
        node.set_config({"shared_buffers": None})
        node.start()
        assert node.query("SELECT v FROM keep") == [(1,)]
    finally:
        node.stop("immediate")


# ---------------------------------------------------------------------------------------------
# Sidecar harness pieces that do not need the proxy itself
# ---------------------------------------------------------------------------------------------

# Stands in for the sidecar: listens on the configured port, exits 0 on SIGTERM.
_FAKE_SIDECAR = """
import signal, socket, sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
host, port = cfg["listen"].rsplit(":", 1)
s = socket.socket()
s.bind((host, int(port)))
s.listen()
signal.signal(signal.SIGTERM, lambda *a: (print("draining", flush=True), sys.exit(0)))
print("fake sidecar listening on", port, flush=True)
while True:
    signal.pause()
"""


def test_free_port_is_free_and_unique() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    import socket

    for port in list(ports)[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_sidecar_config_defaults(shared_topology: pg.Topology) -> None:
    cfg = sidecar_config(shared_topology)
    topo = shared_topology
    assert cfg["listen"].startswith("127.0.0.1:") and cfg["metrics_listen"].startswith("127.0.0.1:")
    assert cfg["listen"] != cfg["metrics_listen"]
    assert cfg["auth"]["method"] == "scram-sha-256"
    assert {u["name"]: u["password"] for u in cfg["auth"]["users"]} == SIDECAR_PASSWORDS
    assert cfg["upstream"]["topology"] == "static"
    assert cfg["upstream"]["regions"] == [
        {"name": "region-a", "hosts": [f"127.0.0.1:{topo.a1.port}", f"127.0.0.1:{topo.a2.port}"]},
        {"name": "region-b", "hosts": [f"127.0.0.1:{topo.b1.port}"]},
    ]
    assert cfg["spool"] == {"backend": "none"}
    # YAML-able as is.
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg


def test_sidecar_config_overrides() -> None:
    cfg = sidecar_config(
        {"r1": ["127.0.0.1:1"], "r2": ["127.0.0.1:2"]},
        {"pool": {"mode": "transaction"}, "spool": {"backend": "sqlite", "path": "s.db"}},
        failover={"hold_timeout": "2s"},
        metrics_listen=REMOVE,
    )
    assert cfg["pool"] == {"mode": "transaction"}
    assert cfg["spool"] == {"backend": "sqlite", "path": "s.db"}
    assert cfg["failover"] == {"check_interval": "100ms", "hold_timeout": "2s"}
    assert "metrics_listen" not in cfg
    assert [r["name"] for r in cfg["upstream"]["regions"]] == ["r1", "r2"]
    assert sidecar_config(["127.0.0.1:5"])["upstream"]["regions"] == [
        {"name": "region-a", "hosts": ["127.0.0.1:5"]}
    ]
    base = {"a": {"b": 1, "c": 2}}
    assert deep_merge(base, {"a": {"b": 3}, "d": 4}) == {"a": {"b": 3, "c": 2}, "d": 4}
    assert base == {"a": {"b": 1, "c": 2}}


def test_sidecar_process_lifecycle(tmp_path: Path) -> None:
    cfg = sidecar_config(["127.0.0.1:1"])
    with SidecarProcess(cfg, tmp_path, argv=[sys.executable, "-c", _FAKE_SIDECAR, "{config}"]) as sc:
        assert sc.is_running()
        assert yaml.safe_load(sc.config_path.read_text()) == cfg
        assert sc.wait_for_log("listening on", timeout=5).endswith(str(sc.port))
        assert f"port={sc.port}" in sc.dsn("app_md5")
        assert "password=md5-secret" in sc.dsn("app_md5")
        assert "dbname=appdb" in sc.dsn("app_md5")
        assert "application_name=x" in sc.dsn("app_md5", application_name="x")
        assert sc.terminate() == 0
        assert "draining" in sc.log_text()
    with SidecarProcess(cfg, tmp_path / "k", argv=[sys.executable, "-c", _FAKE_SIDECAR, "{config}"]) as sc:
        sc.send_signal(signal.SIGSTOP)
        assert sc.kill() == -signal.SIGKILL


def test_sidecar_process_reports_early_exit(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('bad config: pool.size'); sys.exit(3)"]
    with pytest.raises(SidecarError, match=r"(?s)exited with code 3.*bad config: pool.size"):
        SidecarProcess(sidecar_config(["127.0.0.1:1"]), tmp_path, argv=argv).start()


def test_sidecar_process_reports_start_timeout(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; print('starting', flush=True); time.sleep(30)"]
    sc = SidecarProcess(sidecar_config(["127.0.0.1:1"]), tmp_path, argv=argv, start_timeout=1)
    with pytest.raises(SidecarError, match=r"(?s)not listening.*starting"):
        sc.start()
    assert not sc.is_running()
