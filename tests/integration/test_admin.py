"""The admin console (database `pgsidecar`): psql-friendly result sets about pools, clients,
servers, topology, spool, stats and config; PAUSE/RESUME; RELOAD. Real sidecar, real PostgreSQL.

app_scram is the admin here; app_md5 is an ordinary user.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import threading
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerr

from tests.harness import pg
from tests.harness.clients import http_get as _http
from tests.harness.clients import wait_for as _wait_for
from tests.harness.sidecar import SIDECAR_PASSWORDS, SidecarProcess, deep_merge

ADMIN = "app_scram"
ADMIN_CONFIG: dict[str, Any] = {"admin_users": [ADMIN]}
TOOL_TIMEOUT = 60
COMMAND_COLUMNS = {
    "SHOW POOLS": ["user", "database", "size", "active", "idle", "resetting", "connecting", "waiting"],
    "SHOW CLIENTS": ["id", "user", "database", "state", "peer", "server", "connected_s", "application_name",
                     "server_role"],
    "SHOW SERVERS": ["id", "upstream", "region", "state", "user", "database", "tx_status", "age_s", "idle_s",
                     "prepared_statements", "role"],
    "SHOW TOPOLOGY": ["region", "host", "role", "timeline", "error", "current_writer", "cluster_state",
                      "lag_s", "replay_lsn", "replay_paused", "commit_outcome"],
    "SHOW SPOOL": ["backend", "location", "pending", "status"],
    "SHOW STATS": ["name", "value"],
    "SHOW CONFIG": ["key", "value"],
    "SHOW HELP": ["command", "description"],
    "RELOAD": ["setting", "outcome"],
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _psql(sidecar: SidecarProcess, *args: str, user: str = ADMIN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=SIDECAR_PASSWORDS[user], PGCONNECT_TIMEOUT="5", LC_ALL="C", LANG="C")
    argv = [str(pg.find_bindir() / "psql"), "-X", "-w", "-h", sidecar.host, "-p", str(sidecar.port),
            "-U", user, "-d", "pgsidecar", *args]  # fmt: skip
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, env=env, stdin=subprocess.DEVNULL
    )


def _psql_csv(sidecar: SidecarProcess, command: str) -> list[dict[str, str]]:
    res = _psql(sidecar, "--csv", "-c", command)
    assert res.returncode == 0, f"{command}: {res.stderr}\n{sidecar.log_tail()}"
    return list(csv.DictReader(io.StringIO(res.stdout)))


def _admin(sidecar: SidecarProcess) -> psycopg.Connection[Any]:
    # autocommit: a driver's implicit BEGIN is not an admin command.
    return psycopg.connect(sidecar.dsn(ADMIN, dbname="pgsidecar", connect_timeout=5), autocommit=True)


def _rows(conn: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    cur = conn.execute(command)
    assert cur.description is not None
    names = [d.name for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _stats(conn: psycopg.Connection[Any]) -> dict[str, int | float]:
    return {r["name"]: float(r["value"]) for r in _rows(conn, "SHOW STATS")}


def _app(sidecar: SidecarProcess, user: str = ADMIN, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(sidecar.dsn(user, connect_timeout=5, **kw), autocommit=True)


def _metric(sidecar: SidecarProcess, name: str) -> float:
    _, text = _http(sidecar, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _assert_no_secrets(log: str) -> None:
    for secret in SIDECAR_PASSWORDS.values():
        assert secret not in log, f"a password reached the sidecar log: {secret!r}"


def _wait_topology_up(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def up() -> bool:
        nonlocal rows
        rows = _rows(conn, "SHOW TOPOLOGY")
        return any(r["current_writer"] == "true" for r in rows)

    assert _wait_for(up), rows
    return rows


# ---------------------------------------------------------------------------------------------
# The commands, through psql
# ---------------------------------------------------------------------------------------------


def test_psql_runs_every_admin_command(sidecar_factory):
    sidecar = sidecar_factory(ADMIN_CONFIG)
    for command, columns in COMMAND_COLUMNS.items():
        res = _psql(sidecar, "--csv", "-c", command)
        assert res.returncode == 0, f"{command}: {res.stderr}\n{sidecar.log_tail()}"
        assert res.stdout.splitlines()[0].split(",") == columns, (command, res.stdout)
    for command in ("PAUSE", "RESUME", "pause;", "  Resume  ; "):
        res = _psql(sidecar, "-c", command)
        assert res.returncode == 0, f"{command}: {res.stderr}"
        assert res.stdout.strip() == command.strip(" ;").upper()
    # The default aligned output prints like any PostgreSQL result set.
    res = _psql(sidecar, "-c", "show help")
    assert res.returncode == 0 and " command " in res.stdout and "(12 rows)" in res.stdout, res.stdout
    # Several commands in one Query, each answered as its own result set.
    res = _psql(sidecar, "--csv", "-c", "SHOW SPOOL; SHOW HELP")
    assert res.returncode == 0 and "backend,location" in res.stdout and "command,description" in res.stdout
    # REPLAY answers with an error while there is no spool to replay.
    res = _psql(sidecar, "-c", "REPLAY")
    assert res.returncode == 1 and "spool is not enabled" in res.stderr, res.stderr
    spool = _psql_csv(sidecar, "SHOW SPOOL")
    assert spool == [{"backend": "none", "location": "", "pending": "0", "status": "not enabled"}]
    _assert_no_secrets(sidecar.log_text())


def test_show_pools_clients_and_servers_describe_a_connected_client(sidecar_factory, shared_topology):
    sidecar = sidecar_factory({**ADMIN_CONFIG, "pool": {"size": 4}})
    with _app(sidecar, application_name="orders-service") as app:
        backend_pid = app.execute("SELECT pg_backend_pid()").fetchone()
        assert backend_pid is not None
        app.execute("BEGIN")
        app.execute("SELECT 1")  # left open: the server shows the transaction
        pools = _psql_csv(sidecar, "SHOW POOLS")
        assert {"user": ADMIN, "database": "appdb", "size": "4", "active": "1", "idle": "0",
                "resetting": "0", "connecting": "0", "waiting": "0"} in pools  # fmt: skip
        clients = _psql_csv(sidecar, "SHOW CLIENTS")
        app_client = [c for c in clients if c["application_name"] == "orders-service"]
        assert len(app_client) == 1, clients
        assert app_client[0]["state"] == "active" and app_client[0]["database"] == "appdb"
        assert app_client[0]["server"].startswith("s") and app_client[0]["peer"].startswith("127.0.0.1:")
        # The psql session itself is listed too, on the console and without a server.
        assert any(c["database"] == "pgsidecar" and c["server"] == "" for c in clients), clients
        servers = _psql_csv(sidecar, "SHOW SERVERS")
        assert len(servers) == 1, servers
        server = servers[0]
        assert server["id"] == app_client[0]["server"]
        assert server["upstream"] == shared_topology.a1.hostport
        assert server["region"] == pg.REGION_A
        assert (server["state"], server["user"], server["database"]) == ("active", ADMIN, "appdb")
        assert server["tx_status"] == "in transaction"
        app.execute("ROLLBACK")
    # Once the client leaves, its server is reset and idles in the pool.
    assert _wait_for(lambda: _psql_csv(sidecar, "SHOW SERVERS")[0]["state"] == "idle")


def test_show_topology_names_the_writer_and_the_standbys(sidecar_factory, shared_topology):
    sidecar = sidecar_factory(ADMIN_CONFIG)
    with _admin(sidecar) as admin:
        rows = _wait_topology_up(admin)
    by_host = {r["host"]: r for r in rows}
    a1, a2, b1 = (by_host[n.hostport] for n in (shared_topology.a1, shared_topology.a2, shared_topology.b1))
    assert (a1["region"], a1["role"], a1["current_writer"]) == (pg.REGION_A, "writer", "true")
    assert int(a1["timeline"]) >= 1 and a1["error"] is None
    assert (a2["region"], a2["role"], a2["current_writer"]) == (pg.REGION_A, "standby", "false")
    assert (b1["region"], b1["role"], b1["current_writer"]) == (pg.REGION_B, "standby", "false")
    assert {r["cluster_state"] for r in rows} == {"up"}


def test_show_stats_counters_move_with_traffic(sidecar_factory):
    sidecar = sidecar_factory(ADMIN_CONFIG)
    with _admin(sidecar) as admin:
        before = _stats(admin)
        for name in ("transactions", "queries", "query_count", "query_avg_ms", "upstream_errors",
                     "clients_accepted", "clients_refused", "server_logins", "held_requests"):  # fmt: skip
            assert name in before, sorted(before)
        with _app(sidecar) as app:
            for i in range(5):
                assert app.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        err = _login_error(sidecar.port, ADMIN, "not-the-password", "appdb")
        assert err.sqlstate == "28P01"
        after = _stats(admin)
    assert after["queries"] >= before["queries"] + 5
    assert after["query_count"] >= before["query_count"] + 5
    assert after["transactions"] >= before["transactions"] + 5
    assert after["query_avg_ms"] > 0
    assert after["clients_accepted"] >= before["clients_accepted"] + 1
    assert after["server_logins"] >= before["server_logins"] + 1
    assert after["clients_refused{28P01}"] == before.get("clients_refused{28P01}", 0) + 1


def test_show_config_shows_the_effective_config_without_secrets(sidecar_factory):
    sidecar = sidecar_factory({**ADMIN_CONFIG, "pool": {"size": 9}})
    rows = {r["key"]: r["value"] for r in _psql_csv(sidecar, "SHOW CONFIG")}
    assert rows["pool.size"] == "9"
    assert rows["pool.mode"] == "session"
    assert rows["admin_users"] == ADMIN
    assert rows["auth.users[0].name"] == ADMIN and rows["auth.users[0].password"] == "***"
    assert rows["upstream.regions[0].name"] == pg.REGION_A
    assert rows["failover.check_interval"] == "0.1"
    text = json.dumps(rows)
    for secret in SIDECAR_PASSWORDS.values():
        assert secret not in text


# ---------------------------------------------------------------------------------------------
# Who may connect, and what the console refuses
# ---------------------------------------------------------------------------------------------


def _login_error(port: int, user: str, password: str, database: str) -> asyncpg.PostgresError:
    async def attempt() -> asyncpg.PostgresError:
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=port, user=user, password=password, database=database, ssl=False
            )
        except asyncpg.PostgresError as exc:
            return exc
        await conn.close()
        raise AssertionError(f"login as {user} to {database} unexpectedly succeeded")

    return asyncio.run(attempt())


def test_non_admin_user_gets_42501_and_wrong_password_28P01(sidecar_factory):
    sidecar = sidecar_factory(ADMIN_CONFIG)
    err = _login_error(sidecar.port, "app_md5", SIDECAR_PASSWORDS["app_md5"], "pgsidecar")
    assert err.sqlstate == "42501" and "admin console" in str(err)
    # Admins authenticate like everyone else.
    err = _login_error(sidecar.port, ADMIN, "not-the-password", "pgsidecar")
    assert err.sqlstate == "28P01"
    # The ordinary user is unaffected on its own database.
    with _app(sidecar, "app_md5") as app:
        assert app.execute("SELECT current_user").fetchone() == ("app_md5",)
    log = sidecar.log_text()
    assert 'reason="42501: permission denied' in log
    _assert_no_secrets(log)


def test_passthrough_admin_password_is_checked_by_postgresql(sidecar_factory):
    sidecar = sidecar_factory({**ADMIN_CONFIG, "auth": {"method": "passthrough"}})
    err = _login_error(sidecar.port, ADMIN, "not-the-password", "pgsidecar")
    assert err.sqlstate == "28P01"
    assert _psql_csv(sidecar, "SHOW SPOOL")[0]["backend"] == "none"
    _assert_no_secrets(sidecar.log_text())


def test_unknown_command_gets_42601_with_the_command_list_and_the_session_goes_on(sidecar_factory):
    sidecar = sidecar_factory(ADMIN_CONFIG)
    with _admin(sidecar) as admin:
        with pytest.raises(pgerr.SyntaxError) as info:
            admin.execute("SHOW TABLES")
        assert info.value.sqlstate == "42601"
        assert info.value.diag.message_hint is not None and "SHOW POOLS" in info.value.diag.message_hint
        assert _rows(admin, "show help")[0]["command"] == "SHOW POOLS"
        # Extended protocol (binary results force it) is refused; the session still goes on.
        with pytest.raises(pgerr.FeatureNotSupported) as ext:
            admin.execute("SHOW POOLS", binary=True)
        assert "simple queries only" in str(ext.value)
        assert _rows(admin, "SHOW SPOOL")[0]["backend"] == "none"
        # An empty query is answered as PostgreSQL does.
        assert admin.execute("").pgresult is not None
    res = _psql(sidecar, "-c", "FROBNICATE")
    assert res.returncode == 1 and "unknown admin console command" in res.stderr
    assert "HINT:  admin console commands: SHOW POOLS" in res.stderr


# ---------------------------------------------------------------------------------------------
# PAUSE / RESUME
# ---------------------------------------------------------------------------------------------


def test_pause_holds_new_transactions_until_resume(sidecar_factory, shared_topology):
    sidecar = sidecar_factory(ADMIN_CONFIG)
    table = f"paused_{uuid.uuid4().hex[:10]}"
    shared_topology.a1.execute(f"CREATE TABLE {table} (id int)", dbname="appdb")
    shared_topology.a1.execute(f"GRANT ALL ON {table} TO {ADMIN}", dbname="appdb")
    done = threading.Event()
    errors: list[BaseException] = []
    with _admin(sidecar) as admin, _app(sidecar) as app:
        _wait_topology_up(admin)

        def insert() -> None:
            try:
                app.execute(f"INSERT INTO {table} VALUES (1)")
            except BaseException as exc:  # asserted below
                errors.append(exc)
            done.set()

        admin.execute("PAUSE")
        worker = threading.Thread(target=insert)
        worker.start()
        assert not done.wait(1.0), "the transaction ran while paused"
        assert _metric(sidecar, "pgsidecar_held_requests") == 1
        assert shared_topology.a1.query(f"SELECT count(*) FROM {table}", dbname="appdb") == [(0,)]
        status, body = _http(sidecar, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True  # paused is not unready
        # The console itself is never held.
        assert _stats(admin)["held_requests"] == 1
        admin.execute("RESUME")
        assert done.wait(10), "the held transaction did not run after RESUME"
        worker.join()
    assert errors == []
    assert shared_topology.a1.query(f"SELECT count(*) FROM {table}", dbname="appdb") == [(1,)]
    assert _metric(sidecar, "pgsidecar_held_requests") == 0
    log = sidecar.log_text()
    assert "event=transactions_held" in log and "event=transactions_released" in log
    shared_topology.a1.execute(f"DROP TABLE {table}", dbname="appdb")


# ---------------------------------------------------------------------------------------------
# RELOAD
# ---------------------------------------------------------------------------------------------


def _pool_size(admin: psycopg.Connection[Any], user: str = ADMIN) -> int:
    (row,) = [r for r in _rows(admin, "SHOW POOLS") if r["user"] == user and r["database"] == "appdb"]
    return int(row["size"])


def test_reload_changes_pool_size_while_a_client_stays_connected(sidecar_factory):
    sidecar = sidecar_factory({**ADMIN_CONFIG, "pool": {"size": 3}})
    with _admin(sidecar) as admin, _app(sidecar) as app:
        pid = app.execute("SELECT pg_backend_pid()").fetchone()
        assert _pool_size(admin) == 3
        sidecar.write_config(deep_merge(sidecar.config, {"pool": {"size": 7, "mode": "transaction"}}))
        outcome = {r["setting"]: r["outcome"] for r in _rows(admin, "RELOAD")}
        assert outcome == {"pool.size": "applied", "pool.mode": "needs restart"}
        assert _pool_size(admin) == 7
        # Same client, same server connection: nothing was dropped.
        assert app.execute("SELECT pg_backend_pid()").fetchone() == pid
        config = {r["key"]: r["value"] for r in _rows(admin, "SHOW CONFIG")}
        assert (config["pool.size"], config["pool.mode"]) == ("7", "session")
    line = sidecar.wait_for_log("event=config_reloaded")
    assert "pool.size" in line and "needs_restart=" in line and "pool.mode" in line


def test_reload_refuses_a_broken_config_and_keeps_the_running_one(sidecar_factory):
    sidecar = sidecar_factory({**ADMIN_CONFIG, "pool": {"size": 3}})
    good = dict(sidecar.config)
    with _admin(sidecar) as admin, _app(sidecar) as app:
        sidecar.write_config(deep_merge(good, {"pool": {"size": 0}}))
        with pytest.raises(psycopg.Error) as info:
            admin.execute("RELOAD")
        assert info.value.sqlstate == "22023"
        assert "pool.size" in (info.value.diag.message_detail or "")
        assert _pool_size(admin) == 3
        assert app.execute("SELECT 1").fetchone() == (1,)
    line = sidecar.wait_for_log("event=reload_refused")
    assert "pool.size" in line
    _assert_no_secrets(sidecar.log_text())


def test_reload_that_grows_the_pool_serves_a_waiting_client(sidecar_factory):
    sidecar = sidecar_factory({**ADMIN_CONFIG, "pool": {"size": 1}})
    results: list[Any] = []
    with _admin(sidecar) as admin, _app(sidecar) as first:
        first.execute("SELECT 1")  # holds the only server connection (session mode)

        def second_client() -> None:
            try:
                with _app(sidecar) as second:
                    results.append(second.execute("SELECT 2").fetchone())
            except BaseException as exc:  # asserted below
                results.append(exc)

        worker = threading.Thread(target=second_client)
        worker.start()
        waiting = lambda: any(r["waiting"] == "1" for r in _rows(admin, "SHOW POOLS"))  # noqa: E731
        assert _wait_for(waiting), _rows(admin, "SHOW POOLS")
        sidecar.write_config(deep_merge(sidecar.config, {"pool": {"size": 2}}))
        admin.execute("RELOAD")
        worker.join(10)
        assert results == [(2,)]


def test_reload_applies_new_upstream_hosts_without_losing_the_writer(sidecar_factory, shared_topology):
    sidecar = sidecar_factory(ADMIN_CONFIG)
    with _admin(sidecar) as admin, _app(sidecar) as app:
        assert len(_wait_topology_up(admin)) == 3
        since = sidecar.log_offset()
        regions = [{"name": pg.REGION_A, "hosts": [shared_topology.a1.hostport, shared_topology.a2.hostport]}]
        sidecar.write_config(deep_merge(sidecar.config, {"upstream": {"regions": regions}}))
        changed = [r["setting"] for r in _rows(admin, "RELOAD")]
        assert changed == ["upstream.regions[1].name", "upstream.regions[1].hosts",
                           "upstream.regions[1].instance_endpoint_pattern",
                           "upstream.regions[1].instances"]  # fmt: skip
        assert _wait_for(lambda: len(_rows(admin, "SHOW TOPOLOGY")) == 2)
        rows = _wait_topology_up(admin)
        assert {r["host"] for r in rows} == {shared_topology.a1.hostport, shared_topology.a2.hostport}
        assert app.execute("SELECT 1").fetchone() == (1,)
    # The writer stayed known throughout: no cluster state change was logged.
    assert "event=cluster_state" not in sidecar.log_text()[since:]
