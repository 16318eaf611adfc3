"""Fakes around a real `ClientSession` and real `ServerConnection`s: a transport that records what
is written, a host (the `SessionHost` protocol) and a pool that hand out servers whose transports
are fakes too. No sockets, no event loop beyond the one the test runs; the session and the
servers are the real code, so their states and bytes are what the sidecar would produce.

Compiled, the session checks the types of what it is given (a `FakePool` is no `Pool`): the tests
using these fakes run from the Python sources, in a subprocess when this process imported the
compiled build (tests/unit/test_session_sources.py). Same source, same logic."""

from __future__ import annotations

import asyncio
import struct
from typing import Any, cast

from proxy import compiled
from proxy.client import ClientSession
from proxy.hold import Gate
from proxy.metrics import Stats
from proxy.outcome_answer import MarkerSource, marked_commit_query
from proxy.protocol import messages as m
from proxy.protocol.sqlstate import UpstreamUnavailable
from proxy.server import ServerConnection, ServerState
from proxy.statements import StatementRegistry
from sidecar_config import (
    AuthConfig,
    Endpoint,
    FailoverConfig,
    PoolConfig,
    RegionConfig,
    SidecarConfig,
    UpstreamConfig,
    UserConfig,
)

# Whether this process runs the compiled build (then the fake-driven tests run in a subprocess).
COMPILED = compiled.status == "compiled"
ENDPOINT = Endpoint("127.0.0.1", 5432)
SERVER_PARAMS = {"server_version": "15.0", "client_encoding": "UTF8", "standard_conforming_strings": "on"}


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes | memoryview) -> None:
        self.written.append(bytes(data))

    def take(self) -> bytes:
        out = b"".join(self.written)
        self.written.clear()
        return out

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


class FakeTopology:
    writer: Endpoint | None = ENDPOINT
    problem = "none"

    def __init__(self) -> None:
        self.failures: list[str] = []

    def report_failure(self, endpoint: Endpoint, reason: str) -> None:
        self.failures.append(reason)

    async def wait_for_writer(self, timeout: float) -> Endpoint:
        return ENDPOINT


def make_server() -> ServerConnection:
    server = ServerConnection(ENDPOINT, 1 << 20)
    server.connection_made(cast(asyncio.Transport, FakeTransport()))
    server.state = ServerState.IDLE
    server.params = SERVER_PARAMS
    return server


def server_out(server: ServerConnection) -> FakeTransport:
    return cast(FakeTransport, server.transport)


class FakePool:
    """Hands out real servers on fake transports; `parking` says whether `park` accepts. Keeps
    the places `ClientSession` looks into (idle, parked, active)."""

    def __init__(self, servers: int = 1, parking: bool = True) -> None:
        self.idle = [make_server() for _ in range(servers)]
        self.parked: dict[ServerConnection, Any] = {}
        self.active: set[ServerConnection] = set()
        self.parking = parking
        self.released: list[tuple[ServerConnection, bool]] = []
        self.forgotten: list[ServerConnection] = []
        self.replica: Endpoint | None = None  # a writer's pool
        self.retired: str | None = None

    async def acquire(self, password: str | None = None) -> ServerConnection:
        server = self.idle.pop(0) if self.idle else make_server()
        self.active.add(server)
        return server

    def take_idle_now(self) -> ServerConnection | None:
        if not self.idle:
            return None
        server = self.idle.pop(0)
        self.active.add(server)
        return server

    def release(
        self, server: ServerConnection, reset: bool = True, resync: bool = False, unknown: bool = False
    ) -> None:
        self.released.append((server, reset))
        self.active.discard(server)
        self.parked.pop(server, None)
        if server.state is not ServerState.CLOSED:
            self.idle.append(server)

    def park(self, server: ServerConnection, client: Any) -> bool:
        if self.parking:
            self.active.discard(server)
            self.parked[server] = client
        return self.parking

    def unpark(self, server: ServerConnection) -> bool:
        self.parked.pop(server, None)
        self.active.add(server)
        return True

    def forget(self, server: ServerConnection) -> None:
        self.active.discard(server)
        self.parked.pop(server, None)
        self.forgotten.append(server)

    def discard(self, server: ServerConnection, reason: str) -> None:
        self.forget(server)


class FakeMarkers(MarkerSource):
    """What a session asks of the ledger at each COMMIT: `marker` is the id the next COMMIT gets
    (None: the ledger is not ready, no marker)."""

    def __init__(self) -> None:
        super().__init__()
        self.marker: str | None = None

    def new_marker(self, pool: str) -> str | None:
        return self.marker

    def new_commit_query(self, pool: str) -> bytes | None:
        return None if self.marker is None else marked_commit_query(self.marker)


class FakeLedger:
    """The commit-outcome ledger's face to a session: its `source`."""

    def __init__(self) -> None:
        self.source = FakeMarkers()

    @property
    def marker(self) -> str | None:
        return self.source.marker

    @marker.setter
    def marker(self, value: str | None) -> None:
        self.source.marker = value


class FakeHost:
    """What `SessionHost` lists, no more."""

    def __init__(
        self,
        mode: str = "session",
        pool: FakePool | None = None,
        replay: bool = True,
        replay_max: int = 1 << 20,
    ) -> None:
        self.config = SidecarConfig(
            upstream=UpstreamConfig(regions=[RegionConfig(name="r", hosts=[ENDPOINT])]),
            auth=AuthConfig(method="trust", users=[UserConfig(name="app")]),
            pool=PoolConfig(mode=mode),  # type: ignore[arg-type]
            failover=FailoverConfig(transaction_replay=replay, replay_max_bytes=replay_max),
        )
        self.gate = Gate()
        self.stats = Stats()
        self.statements = StatementRegistry()
        self.topology = FakeTopology()
        self.spooling = None
        self.commit_outcome = FakeLedger()
        self.cancel_keys: dict[int, ClientSession] = {}
        self.client_ssl_context = None
        self.clients: set[ClientSession] = set()
        self.pool = pool if pool is not None else FakePool()
        self._gate_opened = asyncio.Event()

    def client_opened(self, client: ClientSession) -> None:
        self.clients.add(client)

    def admit(self, client: ClientSession) -> None:
        pass

    def client_closed(self, client: ClientSession, counted: bool) -> None:
        self.clients.discard(client)

    async def forward_cancel(self, key: tuple[int, int], conn_id: str) -> None:
        pass

    async def pass_gate(self) -> None:
        while self.gate.closed:
            await asyncio.sleep(0)

    def writer_connection_lost(self, endpoint: Endpoint, reason: str) -> None:
        pass

    def pool_for(self, user: str, database: str) -> Any:
        return self.pool

    def replica_pool_for(self, user: str, database: str, replica: Endpoint) -> Any:
        raise UpstreamUnavailable(f"{replica} is not a replica here")

    async def open_server(
        self, endpoint: Endpoint, params: dict[str, str], password: str | None, timeout: float | None = None
    ) -> ServerConnection:
        return make_server()

    def mock_salt(self, user: str) -> bytes:
        return b"salt"

    def scram_verifier(self, user: str, secret: str | None) -> None:
        return None

    def passthrough_known(self, user: str, password: str | None) -> bool:
        return True

    def passthrough_verified(self, user: str, password: str | None) -> None:
        pass


def no_admin(client: ClientSession, read: Any, send: Any) -> Any:
    raise AssertionError("no admin console in these tests")


def new_client(host: FakeHost) -> tuple[ClientSession, FakeTransport]:
    client = ClientSession(cast(Any, host), no_admin)
    transport = FakeTransport()
    client.connection_made(cast(asyncio.Transport, transport))
    return client, transport


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def logged_in(
    mode: str, servers: int = 1, parking: bool = True, replay: bool = True, replay_max: int = 1 << 20
) -> tuple[ClientSession, FakeTransport, FakeHost]:
    """A session through startup and trust authentication, on a fake pool."""
    host = FakeHost(mode, FakePool(servers, parking), replay, replay_max)
    client, transport = new_client(host)
    client.data_received(m.startup_message({"user": "app", "database": "db"}))
    await settle()
    assert client.backend_key is not None, transport.written
    transport.take()
    return client, transport, host


# ------------------------------------------------------------------------- wire bytes


def msg(type_byte: bytes, body: bytes = b"") -> bytes:
    return type_byte + struct.pack("!i", len(body) + 4) + body


def query(sql: str) -> bytes:
    return m.query(sql)


def parse(name: str, sql: str) -> bytes:
    return m.parse(name, sql)


def bind(statement: str, portal: str = "") -> bytes:
    return msg(b"B", portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!hhh", 0, 0, 0))


def describe_portal() -> bytes:
    return msg(b"D", b"P\0")


def execute() -> bytes:
    return msg(b"E", b"\0" + struct.pack("!i", 0))


SYNC = m.sync()


def answer(tag: str, status: bytes = b"I") -> bytes:
    """A server's answer to a simple query: CommandComplete, ReadyForQuery."""
    return m.command_complete(tag) + msg(b"Z", status)


def rows(*values: tuple[str, str]) -> bytes:
    """A two-column text result (name, value), as the settings capture query gets it."""
    field = (
        b"\x00" * 4 + b"\x00\x00" + struct.pack("!i", 25) + struct.pack("!h", -1) + b"\xff" * 4 + b"\x00\x00"
    )
    out = msg(b"T", struct.pack("!h", 2) + b"name\x00" + field + b"value\x00" + field)
    for name, value in values:
        cols = [name.encode(), value.encode()]
        out += msg(b"D", struct.pack("!h", 2) + b"".join(struct.pack("!i", len(c)) + c for c in cols))
    return out
