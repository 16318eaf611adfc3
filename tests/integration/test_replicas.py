"""Replicas below the session, on real clusters: the topology's replica view (role, reachability,
lag, replay LSN), `choose_replica` (lag bound, read-your-writes positions, no writer), replica
pools (servers verified in recovery), and what the admin console and /metrics show of them.

Most tests run a Sidecar in this process (its real listener, probes and pools, against real
PostgreSQL) so they can call the APIs the session will call; one runs the sidecar as a process and
looks only through its admin console and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest

from proxy.app import Sidecar
from proxy.protocol.sqlstate import UpstreamUnavailable
from proxy.topology import parse_lsn
from sidecar_config import Endpoint, parse_config
from tests.harness import pg
from tests.harness.clients import DB, PASSWORD, USER, unique_name
from tests.harness.sidecar import sidecar_config

TIMEOUT = 30.0


def _endpoint(node: pg.PgNode) -> Endpoint:
    return Endpoint("127.0.0.1", node.port)


def _config(topo: pg.Topology, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"admin_users": [USER], "failover": {"hold_timeout": "60s"}}
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return sidecar_config(topo, base)


@contextlib.asynccontextmanager
async def running(config: dict[str, Any]) -> AsyncIterator[Sidecar]:
    sidecar = Sidecar(parse_config(config, "test.yaml"))
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.stop("test over")


async def until(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


async def until_async(check: Callable[[], Awaitable[bool]], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


def _lag(sidecar: Sidecar, endpoint: Endpoint) -> float:
    """The replica's lag, infinite when unknown or not a replica."""
    info = sidecar.topology.replica(endpoint)
    return info.lag_seconds if info is not None and info.lag_seconds is not None else float("inf")


def _replica_ready(sidecar: Sidecar, node: pg.PgNode) -> bool:
    info = sidecar.topology.replica(_endpoint(node))
    return info is not None and info.reachable and info.lag_seconds is not None


async def _admin_rows(sidecar: Sidecar, command: str) -> list[dict[str, Any]]:
    listen = sidecar.config.listen
    async with await psycopg.AsyncConnection.connect(
        host=listen.host, port=listen.port, user=USER, password=PASSWORD, dbname="pgsidecar",
        autocommit=True, connect_timeout=5,
    ) as conn:  # fmt: skip
        cur = await conn.execute(command)
        assert cur.description is not None
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


async def _metrics(sidecar: Sidecar) -> str:
    where = sidecar.config.metrics_listen
    assert where is not None
    return await asyncio.to_thread(_scrape, f"http://{where.host}:{where.port}/metrics")


def _lag_metric(text: str, region: str, node: pg.PgNode) -> float | None:
    prefix = f'pgsidecar_replica_lag_seconds{{host="127.0.0.1:{node.port}",region="{region}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


async def _read_on(sidecar: Sidecar, node: pg.PgNode) -> tuple[Any, ...]:
    """A query through the replica pool API, as the session will run it."""
    pool = sidecar.replica_pool_for(USER, DB, _endpoint(node))
    server = await pool.acquire(None)
    try:
        result = await server.simple_query("SELECT pg_is_in_recovery(), inet_server_port()")
    finally:
        pool.release(server, reset=sidecar.config.pool.mode == "session")
    return tuple(result.rows[0])


async def _writer_insert_lsn(node: pg.PgNode) -> int:
    rows = await asyncio.to_thread(node.query, "SELECT pg_current_wal_insert_lsn()::text")
    return parse_lsn(str(rows[0][0]))


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_healthy_standbys_are_current_and_replica_pools_land_on_them(shared_topology, mode):
    topo = shared_topology
    region_a, region_b = pg.REGION_A, pg.REGION_B

    async def scenario() -> None:
        async with running(_config(topo, pool={"mode": mode, "size": 2})) as sidecar:
            mon = sidecar.topology
            await until(lambda: mon.writer == _endpoint(topo.a1), "the writer")
            await until(lambda: _replica_ready(sidecar, topo.a2) and _replica_ready(sidecar, topo.b1),
                        "both standbys with a lag")  # fmt: skip
            await topo_caught_up()
            # Healthy standbys hold what the writer had at the latest probes: within a probe or two.
            await until(lambda: all(_lag(sidecar, _endpoint(n)) <= 1.0 for n in (topo.a2, topo.b1)), "lag ~0")
            assert mon.writer_lsn is not None and mon.writer_insert_lsn is not None
            assert {r.endpoint for r in mon.replicas} == {_endpoint(topo.a2), _endpoint(topo.b1)}
            # Home region first: a2 (the only home standby) every time.
            assert [mon.choose_replica() for _ in range(3)] == [_endpoint(topo.a2)] * 3

            # The replica pool API: the query lands on the standby, in recovery.
            assert await _read_on(sidecar, topo.a2) == ("t", str(topo.a2.port))
            assert await _read_on(sidecar, topo.b1) == ("t", str(topo.b1.port))
            with pytest.raises(UpstreamUnavailable):
                sidecar.replica_pool_for(USER, DB, _endpoint(topo.a1))  # the writer is no replica
            # A writer pool connection too, for the role column.
            writer_pool = sidecar.pool_for(USER, DB)
            server = await writer_pool.acquire(None)
            writer_pool.release(server)

            servers = await _admin_rows(sidecar, "SHOW SERVERS")
            roles = {(r["upstream"], r["role"]) for r in servers}
            assert roles == {
                (f"127.0.0.1:{topo.a1.port}", "writer"),
                (f"127.0.0.1:{topo.a2.port}", "replica"),
                (f"127.0.0.1:{topo.b1.port}", "replica"),
            }, servers
            assert list(servers[0])[-1] == "role" and list(servers[0])[:3] == ["id", "upstream", "region"]
            topology = {r["host"]: r for r in await _admin_rows(sidecar, "SHOW TOPOLOGY")}
            a1, a2 = topology[f"127.0.0.1:{topo.a1.port}"], topology[f"127.0.0.1:{topo.a2.port}"]
            assert (a1["role"], a1["lag_s"], a1["replay_lsn"]) == ("writer", None, None)
            assert a2["role"] == "standby" and float(a2["lag_s"]) <= 1.0 and a2["replay_paused"] == "false"
            assert parse_lsn(a2["replay_lsn"]) > 0

            text = await _metrics(sidecar)
            lag_a2, lag_b1 = _lag_metric(text, region_a, topo.a2), _lag_metric(text, region_b, topo.b1)
            assert lag_a2 is not None and lag_b1 is not None and lag_a2 <= 1.0 and lag_b1 <= 1.0, text
            assert _lag_metric(text, region_a, topo.a1) is None  # the writer has no lag
            for node, region in ((topo.a2, region_a), (topo.b1, region_b)):
                host = f"127.0.0.1:{node.port}"
                assert f'pgsidecar_server_connections{{host="{host}",region="{region}",state=' in text

    async def topo_caught_up() -> None:
        await asyncio.to_thread(topo.a1.wait_caught_up, [topo.a2, topo.b1])

    asyncio.run(scenario())


def test_paused_standby_lag_grows_past_the_bound_and_positions_are_respected(fresh_topology):
    topo = fresh_topology
    table = unique_name("lagging")
    topo.a1.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, at timestamptz DEFAULT now())", dbname=DB)
    a2, b1 = _endpoint(topo.a2), _endpoint(topo.b1)

    async def write() -> int:
        await asyncio.to_thread(topo.a1.execute, f"INSERT INTO {table} DEFAULT VALUES", None, DB)
        return await _writer_insert_lsn(topo.a1)

    async def scenario() -> None:
        async with running(_config(topo, routing={"max_replica_lag": "100s"})) as sidecar:
            mon = sidecar.topology
            await until(lambda: _replica_ready(sidecar, topo.a2) and _replica_ready(sidecar, topo.b1),
                        "both standbys with a lag")  # fmt: skip
            await asyncio.to_thread(topo.a2.execute, "SELECT pg_wal_replay_pause()")
            await until_async(
                lambda: asyncio.to_thread(lambda: topo.a2.query("SELECT pg_is_wal_replay_paused()")[0][0]),
                "a2 paused",
            )
            written = await write()
            # b1 replays it; a2 cannot.
            await until(lambda: (mon.replica(b1).replay_lsn or 0) >= written, "b1 past the write")  # type: ignore[union-attr]
            assert (mon.replica(a2).replay_lsn or 0) < written  # type: ignore[union-attr]
            assert mon.replica(a2).paused is True  # type: ignore[union-attr]
            # Within the (generous) bound a2 still qualifies, home first; not for a reader that must
            # see the write (read-your-writes by position).
            assert mon.choose_replica() == a2
            assert mon.choose_replica(min_lsn=written) == b1
            assert mon.choose_replica(min_lsn=written + 10**9) is None
            # The free way: a mark taken after the commit resolves through the next probe.
            mark = mon.commit_mark()
            await until(lambda: mon.commit_lsn(mark) is not None, "a probe after the mark")
            assert mon.commit_lsn(mark) >= written  # type: ignore[operator]
            await until(lambda: mon.choose_replica(after_mark=mark) == b1, "b1 chosen after the mark")
            assert all(mon.choose_replica(after_mark=mark) == b1 for _ in range(5))

            # Now a 1 s bound: with writes going on, a2's lag grows past it and a2 is skipped.
            sidecar.topology.set_routing((pg.REGION_A, pg.REGION_B), 1.0)
            lags: list[float] = []

            async def lagging() -> bool:
                await write()
                lag = mon.replica(a2).lag_seconds  # type: ignore[union-attr]
                if lag is not None:
                    lags.append(lag)
                return lag is not None and lag > 1.5

            await until_async(lagging, "a2's lag past 1.5 s")
            assert lags == sorted(lags) and lags[-1] > lags[0], lags  # growing with the clock
            assert _lag(sidecar, b1) <= 1.0
            assert [mon.choose_replica() for _ in range(3)] == [b1] * 3
            text = await _metrics(sidecar)
            metric_a2 = _lag_metric(text, pg.REGION_A, topo.a2)
            assert metric_a2 is not None and metric_a2 > 1.0, text
            rows = {r["host"]: r for r in await _admin_rows(sidecar, "SHOW TOPOLOGY")}
            paused_row = rows[f"127.0.0.1:{topo.a2.port}"]
            assert paused_row["replay_paused"] == "true" and float(paused_row["lag_s"]) > 1.0

            # Resumed, it catches up and is the home choice again.
            await asyncio.to_thread(topo.a2.execute, "SELECT pg_wal_replay_resume()")
            await until(lambda: _lag(sidecar, a2) <= 1.0, "a2 caught up")
            await until(lambda: mon.choose_replica() == a2, "a2 chosen again")

    asyncio.run(scenario())


def test_without_a_writer_replicas_are_still_reported_chosen_and_read(fresh_topology):
    topo = fresh_topology
    a2, b1 = _endpoint(topo.a2), _endpoint(topo.b1)

    async def scenario() -> None:
        async with running(_config(topo)) as sidecar:
            mon = sidecar.topology
            await until(lambda: _replica_ready(sidecar, topo.a2) and _replica_ready(sidecar, topo.b1),
                        "both standbys with a lag")  # fmt: skip
            await asyncio.to_thread(topo.a1.crash)
            await until(lambda: mon.writer is None, "the writer lost")
            await asyncio.sleep(1.0)  # several probes without a writer: the lags must not drift
            assert [r.endpoint for r in mon.replicas if r.reachable] == [a2, b1]
            a1_info = mon.replica(_endpoint(topo.a1))
            assert a1_info is not None and a1_info.reachable is False
            assert _lag(sidecar, a2) <= 1.0 and _lag(sidecar, b1) <= 1.0
            assert mon.choose_replica() == a2
            assert await _read_on(sidecar, topo.b1) == ("t", str(topo.b1.port))
            assert await _read_on(sidecar, topo.a2) == ("t", str(topo.a2.port))
            rows = {r["host"]: r for r in await _admin_rows(sidecar, "SHOW TOPOLOGY")}
            assert rows[f"127.0.0.1:{topo.a1.port}"]["role"] == "unreachable"
            assert rows[f"127.0.0.1:{topo.b1.port}"]["lag_s"] is not None
            text = await _metrics(sidecar)
            assert _lag_metric(text, pg.REGION_B, topo.b1) is not None, text

            # b1 promoted: its replica pool is retired, never used as the writer's.
            pool = sidecar.replica_pool_for(USER, DB, b1)
            await asyncio.to_thread(topo.b1.promote)
            await until(lambda: mon.writer == b1, "b1 the writer")
            await until(lambda: pool.retired is not None, "b1's replica pool retired")
            assert (USER, DB, b1) not in sidecar.replica_pools
            with pytest.raises(UpstreamUnavailable):
                await pool.acquire(None)
            with pytest.raises(UpstreamUnavailable):
                sidecar.replica_pool_for(USER, DB, b1)
            assert mon.replica(b1) is None

    asyncio.run(scenario())


def test_a_replica_pool_refuses_a_server_that_is_not_in_recovery(fresh_topology):
    """The check at open: a standby promoted behind the monitor's back (before any probe saw it)
    is refused by its replica pool, reported, and skipped by the chooser."""
    topo = fresh_topology
    a2 = _endpoint(topo.a2)

    async def scenario() -> None:
        # A slow probe interval, so the promotion is seen by the pool before the monitor.
        async with running(_config(topo, failover={"check_interval": "30s"})) as sidecar:
            mon = sidecar.topology
            await until(lambda: _replica_ready(sidecar, topo.a2), "a2 with a lag")
            pool = sidecar.replica_pool_for(USER, DB, a2)
            await asyncio.to_thread(topo.a2.promote)
            with pytest.raises(UpstreamUnavailable, match="no longer a replica"):
                await pool.acquire(None)
            assert pool.total == 0
            assert mon.choose_replica() != a2

    asyncio.run(scenario())


def test_sidecar_process_shows_roles_lag_and_metric(shared_topology, sidecar_factory):
    """The shipped process, seen only from outside: SHOW SERVERS' role column, SHOW TOPOLOGY's
    lag columns, and pgsidecar_replica_lag_seconds."""
    topo = shared_topology
    sidecar = sidecar_factory({"admin_users": [USER]}, topology=topo)
    admin_dsn = sidecar.dsn(USER, dbname="pgsidecar", connect_timeout=5)
    with psycopg.connect(sidecar.dsn(USER, dbname=DB, connect_timeout=5), autocommit=True) as app:
        app.execute("SELECT 1")
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            deadline = time.monotonic() + TIMEOUT
            while True:
                cur = admin.execute("SHOW TOPOLOGY")
                names = [d.name for d in cur.description or ()]
                rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
                standbys = [r for r in rows if r["role"] == "standby"]
                if len(standbys) == 2 and all(r["lag_s"] is not None for r in standbys):
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.05)
            assert names[:7] == ["region", "host", "role", "timeline", "error", "current_writer",
                                 "cluster_state"]  # fmt: skip
            assert names[7:] == ["lag_s", "replay_lsn", "replay_paused", "commit_outcome"]
            cur = admin.execute("SHOW SERVERS")
            names = [d.name for d in cur.description or ()]
            servers = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
            assert names[-1] == "role" and names[-2] == "prepared_statements"
            assert servers and {s["role"] for s in servers} == {"writer"}
    deadline = time.monotonic() + TIMEOUT
    while True:
        text = _scrape(sidecar.metrics_url + "/metrics")
        lag = _lag_metric(text, pg.REGION_B, topo.b1)
        if lag is not None:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert 0.0 <= lag <= 5.0
    assert "# TYPE pgsidecar_replica_lag_seconds gauge" in text


@pytest.mark.parametrize("kind", ["aurora", "aurora-global"])
def test_aurora_reports_reader_lag_from_its_topology_function(fresh_topology, kind):
    """replica_lag_in_msec (aurora) / visibility_lag_in_msec (aurora-global: the secondary
    region's reader b1 too), each reader checked on its own connection (in recovery)."""
    topo = fresh_topology
    topo.install_aurora_emulation()
    config = _config(topo)
    config["upstream"]["topology"] = kind
    config["upstream"]["regions"] = [
        {"name": pg.REGION_A, "hosts": [topo.a2.hostport],
         "instances": {n.name: n.hostport for n in (topo.a1, topo.a2)}},
        {"name": pg.REGION_B, "hosts": [topo.b1.hostport], "instances": {"b1": topo.b1.hostport}},
    ]  # fmt: skip
    a2, b1 = _endpoint(topo.a2), _endpoint(topo.b1)

    async def scenario() -> None:
        async with running(config) as sidecar:
            mon = sidecar.topology
            await until(lambda: mon.writer == _endpoint(topo.a1), "the writer")
            await until(lambda: _replica_ready(sidecar, topo.a2) and _replica_ready(sidecar, topo.b1),
                        "both readers with a lag")  # fmt: skip
            for endpoint in (a2, b1):
                info = mon.replica(endpoint)
                assert info is not None and 0.0 <= (info.lag_seconds or 0.0) <= 5.0
                assert info.replay_lsn is None  # Aurora gives no replay position
            assert mon.choose_replica() == a2
            assert mon.choose_replica(min_lsn=1) is None  # no position: never for read-your-writes
            assert await _read_on(sidecar, topo.a2) == ("t", str(topo.a2.port))
            assert await _read_on(sidecar, topo.b1) == ("t", str(topo.b1.port))
            text = await _metrics(sidecar)
            assert _lag_metric(text, pg.REGION_A, topo.a2) is not None, text
            assert _lag_metric(text, pg.REGION_B, topo.b1) is not None, text
            # A reader that goes down is no longer reachable (its own check fails), the other
            # one is chosen.
            await asyncio.to_thread(topo.a2.crash)
            await until(lambda: not mon.is_replica(a2), "a2 unreachable")
            assert mon.choose_replica() == b1

    asyncio.run(scenario())
