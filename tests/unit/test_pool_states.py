"""The pool's places and moves (ARCHITECTURE.md, Server connections and the pool), driven with a fake
opener: real `ServerConnection` objects on a fake transport, a real `TopologyMonitor` that a scripted
provider has told the writer. No sockets, no PostgreSQL; each test runs its own event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.pool import ACTIVE, IDLE, NOWHERE, PARKED, IllegalMove, Pool, PoolSettings
from proxy.protocol.sqlstate import SqlState, TooManyClients
from proxy.server import ServerConnection, ServerState
from proxy.topology import NodeStatus, TopologyMonitor, TopologyProvider
from sidecar_config import Endpoint

WRITER = Endpoint("10.0.0.1", 5432)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class OneWriter:
    """A topology provider that always finds WRITER."""

    async def probe(self, timeline_floor: int = 0) -> list[NodeStatus]:
        return [NodeStatus(WRITER, "home", reachable=True, writer=True, timeline=1)]

    def adopt(self, fresh: TopologyProvider) -> bool:
        return True

    async def close(self) -> None:
        pass


class FakeOpener:
    """Opens logged-in, idle servers on fake transports, counting them."""

    def __init__(self) -> None:
        self.opened: list[ServerConnection] = []

    async def __call__(
        self, endpoint: Endpoint, params: dict[str, str], password: str | None
    ) -> ServerConnection:
        server = ServerConnection(endpoint, 1 << 20)
        server.connection_made(FakeTransport())
        server.state = ServerState.IDLE  # logged in
        self.opened.append(server)
        return server


class Keeper:
    """A transaction-mode client keeping a parked server: gives it back when the pool asks."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.given_back: list[ServerConnection] = []

    def give_back(self, server: ServerConnection) -> None:
        self.given_back.append(server)
        self.pool.release(server, reset=False)


def settings(**changes: Any) -> PoolSettings:
    base: dict[str, Any] = {
        "size": 2,
        "checkout_timeout": 10.0,
        "reset_query": "",
        "server_lifetime": 3600.0,
        "server_idle_timeout": 600.0,
        "server_check_after_idle": 30.0,
        "connect_timeout": 5.0,
        "max_prepared_statements": 100,
    }
    base.update(changes)
    return PoolSettings(**base)


def run(test: Callable[[Pool, FakeOpener], Awaitable[None]], **changes: Any) -> None:
    async def main() -> None:
        topology = TopologyMonitor(OneWriter(), check_interval=60.0)
        await topology.refresh()
        assert topology.writer == WRITER
        opener = FakeOpener()
        pool = Pool("app", "db", settings(**changes), topology, opener)
        await test(pool, opener)
        pool.close_all("test over")

    asyncio.run(main())


def linked(server: ServerConnection) -> ServerConnection:
    """As if a client had linked it (`link` wants a real ClientSession)."""
    server.state = ServerState.ACTIVE
    return server


def test_acquire_release_and_reuse_newest_first() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        a = await pool.acquire(None)
        b = await pool.acquire(None)
        assert pool.place_of(a) == pool.place_of(b) == ACTIVE and pool.total == 2
        pool.release(a, reset=False)
        pool.release(b, reset=False)
        assert list(pool.idle) == [a, b] and pool.place_of(a) == IDLE and not pool.active
        assert await pool.acquire(None) is b  # newest first
        assert len(opener.opened) == 2

    run(test)


def test_waiters_are_served_first_come_first_served() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        only = await pool.acquire(None)
        waiters = [asyncio.create_task(pool.acquire(None)) for _ in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(pool.waiters) == 3
        assert pool.take_idle_now() is None  # no queue jumping, even with nothing idle
        served = []
        for task in waiters:
            pool.release(only, reset=False)  # handed straight to the oldest waiter
            assert not pool.idle and pool.place_of(only) == ACTIVE
            only = await task
            served.append(task)
        assert [t.result() for t in served] == [only] * 3
        assert len(opener.opened) == 1 and not pool.waiters

    run(test, size=1)


def test_checkout_timeout_gives_53300_and_leaves_no_waiter() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        await pool.acquire(None)
        with pytest.raises(TooManyClients) as caught:
            await pool.acquire(None)
        assert caught.value.code == SqlState.TOO_MANY_CONNECTIONS
        assert "pool.checkout_timeout" in caught.value.message
        assert not pool.waiters and pool.total == 1

    run(test, size=1, checkout_timeout=0.05)


def test_a_server_past_its_lifetime_is_closed_not_reused() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        old = await pool.acquire(None)
        old.created_at -= 7200  # older than server_lifetime
        pool.release(old, reset=False)
        assert old.state is ServerState.CLOSED and old.close_reason == "server_lifetime reached"
        assert pool.place_of(old) == NOWHERE and pool.total == 0
        new = await pool.acquire(None)
        assert new is not old and len(opener.opened) == 2

    run(test)


def test_an_idle_server_past_its_lifetime_is_skipped_at_checkout() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        old = await pool.acquire(None)
        pool.release(old, reset=False)
        old.created_at -= 7200
        assert pool.take_idle_now() is None  # the fast path does not hand it out
        new = await pool.acquire(None)
        assert new is not old and old.state is ServerState.CLOSED and list(pool.idle) == []

    run(test)


def test_resize_shrinks_idle_and_grows_for_waiters() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        servers = [await pool.acquire(None) for _ in range(3)]
        for server in servers:
            pool.release(server, reset=False)
        assert len(pool.idle) == 3
        pool.resize(settings(size=1))
        assert pool.total == 1 and pool.settings.size == 1
        assert sum(s.state is ServerState.CLOSED for s in servers) == 2
        kept = await pool.acquire(None)
        waiter = asyncio.create_task(pool.acquire(None))
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(pool.waiters) == 1
        pool.resize(settings(size=2))  # the waiter opens a connection in the room made
        fresh = await asyncio.wait_for(waiter, 5)
        assert fresh is not kept and pool.total == 2 and len(opener.opened) == 4

    run(test, size=3)


def test_resize_takes_back_parked_servers_to_shrink() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        keeper = Keeper(pool)
        servers = [linked(await pool.acquire(None)) for _ in range(2)]
        for server in servers:
            assert pool.park(server, keeper)
            assert pool.place_of(server) == PARKED
        pool.resize(settings(size=1))
        assert pool.total == 1 and len(keeper.given_back) >= 1

    run(test)


def test_park_unpark_and_reclaim() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        keeper = Keeper(pool)
        server = linked(await pool.acquire(None))
        assert pool.park(server, keeper) and pool.place_of(server) == PARKED
        assert pool.unpark(server) and pool.place_of(server) == ACTIVE
        assert pool.park(server, keeper)
        # Another client needs a server and none is idle: the parked one is taken back first,
        # before any new connection is opened.
        other = await pool.acquire(None)
        assert other is server and keeper.given_back == [server] and len(opener.opened) == 1

    run(test, size=1)


def test_no_parking_while_someone_waits() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        server = linked(await pool.acquire(None))
        waiter = asyncio.create_task(pool.acquire(None))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not pool.park(server, Keeper(pool))
        pool.release(server, reset=False)
        assert await asyncio.wait_for(waiter, 5) is server

    run(test, size=1)


def test_illegal_moves_raise() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        keeper = Keeper(pool)
        server = await pool.acquire(None)
        # Parking needs a server still linked to its client: this one never was.
        with pytest.raises(IllegalMove, match="active -> parked"):
            pool.park(server, keeper)
        assert pool.place_of(server) == ACTIVE  # nothing moved
        pool.release(server, reset=False)
        assert pool.place_of(server) == IDLE
        # Only an active server is parked; an idle one belongs to nobody.
        linked(server)
        with pytest.raises(IllegalMove, match="idle -> parked"):
            pool.park(server, keeper)
        server.state = ServerState.IDLE
        # A closed server is never handed out.
        server.state = ServerState.CLOSED
        with pytest.raises(IllegalMove, match="idle -> active"):
            pool._move(server, ACTIVE)
        # A closed server goes nowhere but out.
        pool._drop(server, "test")
        assert pool.place_of(server) == NOWHERE and pool.total == 0

    run(test)


def test_a_server_that_closes_while_idle_is_dropped() -> None:
    async def test(pool: Pool, opener: FakeOpener) -> None:
        server = await pool.acquire(None)
        pool.release(server, reset=False)
        server.connection_lost(None)  # the server went away on its own
        assert pool.place_of(server) == NOWHERE and not pool.idle and pool.total == 0

    run(test)
