"""The admin console: database `pgsidecar`, answered by the sidecar itself (ARCHITECTURE.md, P6).

An admin user logs in exactly like any client; `ClientSession` then hands the connection here
instead of to a pool, so the console needs no upstream and works during an outage or a PAUSE.
It speaks just enough of the protocol for psql and drivers: simple Query messages, each command
answered as an ordinary result set of text columns. Commands live in one table (`COMMANDS`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import SecretStr

from sidecar_config import ConfigError
from sidecar_config import config_items as config_items  # (importable from here, as before)

from . import logs
from .metrics import Histogram
from .protocol import messages as m
from .protocol.sqlstate import (
    InsufficientPrivilege,
    ProtocolViolation,
    ProxyError,
    SqlState,
)
from .topology import format_lsn

if TYPE_CHECKING:
    from sidecar_config import Endpoint, SidecarConfig

    from .metrics import Stats
    from .outcome import CommitOutcomeLedger
    from .pool import Pool
    from .server import ServerConnection
    from .spooling import SpoolService
    from .topology import TopologyMonitor


# What the console reads and does, as Protocols: the Sidecar and the ClientSession provide them,
# and this module imports neither (each is above it).


class ConsoleSession(Protocol):
    """The client connection the console answers on."""

    @property
    def id(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def peer(self) -> str: ...

    @property
    def startup_params(self) -> Mapping[str, str]: ...

    async def drained(self) -> None:
        """Return once the client has read what was sent to it (its write buffer is low)."""


class ClientRow(Protocol):
    """A client as SHOW CLIENTS lists it."""

    @property
    def id(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def database(self) -> str: ...

    @property
    def peer(self) -> str: ...

    @property
    def metric_state(self) -> str: ...

    @property
    def server(self) -> ServerConnection | None: ...

    @property
    def connected_at(self) -> float: ...

    @property
    def settings(self) -> Mapping[str, str]: ...

    @property
    def startup_params(self) -> Mapping[str, str]: ...

    @property
    def pool(self) -> Pool | None: ...


class ReloadResult(Protocol):
    @property
    def changed(self) -> list[str]: ...

    @property
    def needs_restart(self) -> list[str]: ...


class ConsoleHost(Protocol):
    """What the console reads of the sidecar, and the operator's levers it pulls."""

    @property
    def config(self) -> SidecarConfig: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def topology(self) -> TopologyMonitor: ...

    @property
    def pools(self) -> Mapping[tuple[str, str], Pool]: ...

    @property
    def replica_pools(self) -> Mapping[tuple[str, str, Endpoint], Pool]: ...

    @property
    def clients(self) -> Collection[ClientRow]: ...

    @property
    def region_of(self) -> Mapping[str, str]: ...

    @property
    def spooling(self) -> SpoolService | None: ...

    @property
    def spool_pending(self) -> int: ...

    @property
    def commit_outcome(self) -> CommitOutcomeLedger: ...

    @property
    def held_requests(self) -> int: ...

    def close_gate(self, reason: str) -> None: ...

    def open_gate(self) -> None: ...

    async def reload(self, source: str = ...) -> ReloadResult: ...

    def passthrough_known(self, user: str, password: str | None) -> bool: ...

    def passthrough_verified(self, user: str, password: str | None) -> None: ...

    async def open_server(
        self, endpoint: Endpoint, params: dict[str, str], password: str | None, timeout: float | None = None
    ) -> ServerConnection: ...

ADMIN_DATABASE = "pgsidecar"
# Reported when no upstream connection has told us its version yet; psql only needs a plausible one.
FALLBACK_SERVER_VERSION = "15.0"

Reader = Callable[[], Awaitable[tuple[int, bytes]]]
Sender = Callable[[bytes], None]

# Extended-protocol messages: refused, then everything up to Sync is ignored (as PostgreSQL does
# after an error in an extended batch), so the client's Sync gets exactly one ReadyForQuery.
_EXTENDED = frozenset({m.F_PARSE, m.F_BIND, m.F_DESCRIBE, m.F_EXECUTE, m.F_CLOSE, m.F_FLUSH})
# COPY sub-protocol messages outside COPY are ignored by PostgreSQL too.
_IGNORED = frozenset({m.F_COPY_DATA, m.F_COPY_DONE, m.F_COPY_FAIL})
_TX_STATUS = {m.TX_IDLE: "idle", m.TX_IN_BLOCK: "in transaction", m.TX_FAILED: "failed transaction"}
# Messages answered before the console lets the event loop run other work. Pipelined commands
# are all at hand at once (reading them never suspends), and a few SHOW commands take a
# millisecond: without a yield, one client's flood would stall every login and the writer probe.
_MESSAGES_PER_TURN = 32


class AdminCommandError(ProxyError):
    """An ERROR answer to one admin command; the session goes on."""

    fatal = False

    def __init__(self, sqlstate: SqlState, message: str, *, detail: str | None = None,
                 hint: str | None = None) -> None:  # fmt: skip
        super().__init__(message, detail=detail, hint=hint, code=sqlstate.value)


@dataclass
class Result:
    """One command's answer: a result set (when `columns`) and its CommandComplete tag."""

    tag: str
    columns: tuple[str, ...] = ()
    rows: Sequence[Sequence[object]] = ()

    def encode(self) -> bytes:
        if not self.columns:
            return m.command_complete(self.tag)
        return m.frames(
            [
                m.row_description(self.columns),
                *(m.data_row([_text(value) for value in row]) for row in self.rows),
                m.command_complete(self.tag),
            ]
        )


@dataclass(frozen=True)
class Command:
    run: Callable[[AdminConsole], Awaitable[Result]]
    help: str


class AdminConsole:
    """One admin session, on the connection of an authenticated `ClientSession`."""

    def __init__(self, sidecar: ConsoleHost, session: ConsoleSession, read: Reader, send: Sender) -> None:
        self.sidecar = sidecar
        self.session = session
        self._read = read  # the next whole message from the client
        self._send = send

    async def login(self, password: str | None) -> None:
        """Finish the login: passthrough still has to prove the password; then only admins pass."""
        sidecar, user = self.sidecar, self.session.user
        if sidecar.config.auth.method == "passthrough" and not sidecar.passthrough_known(user, password):
            await self._verify_upstream_password(password)
        if user not in sidecar.config.admin_users:
            raise InsufficientPrivilege(
                f'permission denied: "{user}" may not use the admin console',
                hint="admin_users in the sidecar config lists who may connect to database pgsidecar",
            )

    async def _verify_upstream_password(self, password: str | None) -> None:
        # The database `pgsidecar` does not exist upstream: log in to the probe database instead.
        # Any reachable node can judge a password, so an operator can still get in with no writer.
        sidecar = self.sidecar
        topology = sidecar.topology
        candidates = [topology.writer] if topology.writer is not None else []
        candidates += [n.endpoint for n in topology.nodes if n.reachable and n.endpoint not in candidates]
        if not candidates:  # e.g. just started, before the first probe answered
            candidates = [await topology.wait_for_writer(sidecar.config.upstream.connect_timeout)]
        user = self.session.user
        params = {
            "user": user,
            "database": sidecar.config.upstream.probe_database,
            "application_name": "pgsidecar-auth",
        }
        probe = await sidecar.open_server(candidates[0], params, password)
        probe.close("passthrough password verified")
        sidecar.passthrough_verified(user, password)

    async def serve(self, backend_key: bytes) -> str:
        """Greet the client, then answer its messages until it leaves; returns why it ended."""
        session = self.session
        self._send(
            m.frames(
                [
                    m.auth_ok(),
                    *(m.parameter_status(k, v) for k, v in self._parameters().items()),
                    backend_key,
                    m.ready_for_query(m.TX_IDLE),
                ]
            )
        )
        logs.event("admin_session_started", conn=session.id, user=session.user, peer=session.peer)
        skipping = False  # after a refused extended message, until Sync
        turn = 0
        while True:
            turn += 1
            if turn == _MESSAGES_PER_TURN:
                turn = 0
                await asyncio.sleep(0)
            # Answers go out only as fast as the client reads them (its transport's write buffer
            # stays bounded); unread input meanwhile waits in the client's socket.
            await session.drained()
            try:
                type_byte, body = await self._read()
            except ConnectionResetError:
                return "client disconnected"
            if type_byte == m.F_TERMINATE:
                return "client sent Terminate"
            if type_byte == m.F_SYNC:
                skipping = False
                self._send(m.ready_for_query(m.TX_IDLE))
            elif skipping or type_byte in _IGNORED:
                continue
            elif type_byte == m.F_QUERY:
                self._send(await self.answer(m.decode_query(body)))
            elif type_byte in _EXTENDED or type_byte == m.F_FUNCTION_CALL:
                self._send(
                    m.error_response(
                        SqlState.FEATURE_NOT_SUPPORTED.value, "admin console supports simple queries only"
                    )
                )
                if type_byte == m.F_FUNCTION_CALL:  # a cycle of its own, like a Query
                    self._send(m.ready_for_query(m.TX_IDLE))
                else:
                    skipping = True
            else:
                raise ProtocolViolation(
                    f"invalid frontend message type {chr(type_byte)!r} on the admin console"
                )

    def _parameters(self) -> dict[str, str]:
        return {
            "server_version": self._server_version(),
            "server_encoding": "UTF8",
            "client_encoding": "UTF8",
            "DateStyle": "ISO",
            "integer_datetimes": "on",
            "standard_conforming_strings": "on",
            "application_name": self.session.startup_params.get("application_name", ""),
        }

    def _server_version(self) -> str:
        for pool in self.sidecar.pools.values():
            for server in (*pool.active, *pool.idle, *pool.parked, *pool.resetting):
                version = server.params.get("server_version")
                if version:
                    return version
        return FALLBACK_SERVER_VERSION

    async def answer(self, sql: str) -> bytes:
        """Everything the client gets for one Query message, ReadyForQuery included.

        Several commands may share a Query (`SHOW POOLS; SHOW CLIENTS`); as in PostgreSQL the first
        error ends the batch.
        """
        commands = [part.strip() for part in sql.split(";") if part.strip()]
        if not commands:
            return m.empty_query_response() + m.ready_for_query(m.TX_IDLE)
        out = []
        for text in commands:
            try:
                out.append((await self.execute(text)).encode())
            except AdminCommandError as exc:
                out.append(m.error_response(exc.code, exc.message, detail=exc.detail, hint=exc.hint))
                break
        out.append(m.ready_for_query(m.TX_IDLE))
        return m.frames(out)

    async def execute(self, text: str) -> Result:
        name = " ".join(text.split()).upper()
        command = COMMANDS.get(name)
        session = self.session
        if command is None:
            raise AdminCommandError(
                SqlState.SYNTAX_ERROR,
                f'unknown admin console command "{text}"',
                hint="admin console commands: " + ", ".join(COMMANDS),
            )
        logs.event("admin_command", conn=session.id, user=session.user, command=name)
        try:
            return await command.run(self)
        except AdminCommandError:
            raise
        except Exception as exc:  # a bug in one command must not end the operator's session
            logs.event("admin_command_failed", logs.ERROR, conn=session.id, command=name, error=repr(exc))
            raise AdminCommandError(SqlState.INTERNAL_ERROR, f"internal error in {name}: {exc!r}") from exc


# ------------------------------------------------------------------------------------------------
# Commands


async def _show_pools(console: AdminConsole) -> Result:
    columns = ("user", "database", "size", "active", "idle", "resetting", "connecting", "waiting")
    rows = [
        (pool.user, pool.database, pool.settings.size, len(pool.active), len(pool.idle) + len(pool.parked),
         len(pool.resetting), pool.connecting, sum(1 for w in pool.waiters if not w.done()))
        for _, pool in sorted(console.sidecar.pools.items())
    ]  # fmt: skip
    return Result("SHOW", columns, rows)


async def _show_clients(console: AdminConsole) -> Result:
    columns = ("id", "user", "database", "state", "peer", "server", "connected_s", "application_name",
               "server_role")  # fmt: skip
    now = time.monotonic()
    rows = []
    for client in sorted(console.sidecar.clients, key=lambda c: c.connected_at):
        server = client.server
        app = client.settings.get("application_name", client.startup_params.get("application_name"))
        # Where the client's server is (read routing): the writer's pool or a replica's.
        pool = client.pool
        role = None if server is None or pool is None else "writer" if pool.replica is None else "replica"
        rows.append(
            (client.id, client.user or None, client.database or None, client.metric_state, client.peer,
             server.id if server is not None else None, round(now - client.connected_at, 1), app, role)
        )  # fmt: skip
    return Result("SHOW", columns, rows)


async def _show_servers(console: AdminConsole) -> Result:
    columns = ("id", "upstream", "region", "state", "user", "database", "tx_status", "age_s", "idle_s",
               "prepared_statements", "role")  # fmt: skip
    sidecar = console.sidecar
    now = time.monotonic()
    rows = []
    pools = [pool for _, pool in sorted(sidecar.pools.items())]
    by_replica = sorted(sidecar.replica_pools.items(), key=lambda kv: (kv[0][:2], str(kv[0][2])))
    pools += [pool for _, pool in by_replica]
    for pool in pools:
        role = "writer" if pool.replica is None else "replica"
        for state, servers in (("active", pool.active), ("idle", (*pool.idle, *pool.parked)),
                               ("resetting", pool.resetting)):  # fmt: skip
            for server in sorted(servers, key=lambda s: s.created_at):
                host = str(server.endpoint)
                idle = round(now - server.last_used, 1) if state == "idle" else None
                rows.append(
                    (server.id, host, sidecar.region_of.get(host), state, pool.user, pool.database,
                     _TX_STATUS.get(server.tx_status, chr(server.tx_status)),
                     round(now - server.created_at, 1), idle, len(server.statements), role)
                )  # fmt: skip
    return Result("SHOW", columns, rows)


async def _show_topology(console: AdminConsole) -> Result:
    # commit_outcome, on the writer's row: whether a COMMIT cut by a failover can get its true
    # outcome there (marker | off (config) | unavailable: why | unchecked).
    columns = ("region", "host", "role", "timeline", "error", "current_writer", "cluster_state",
               "lag_s", "replay_lsn", "replay_paused", "commit_outcome")  # fmt: skip
    topology = console.sidecar.topology
    outcome = console.sidecar.commit_outcome.summary()
    cluster = topology.state.value
    rows: list[Sequence[object]] = []
    if not topology.nodes:  # before the first probe: what will be probed
        for region in console.sidecar.config.upstream.regions:
            rows += [
                (region.name, str(h), "unknown", None, "not probed yet", False, cluster, *(None,) * 4)
                for h in region.hosts
            ]
        return Result("SHOW", columns, rows)
    replicas = {r.endpoint: r for r in topology.replicas}
    for node in topology.nodes:
        current = node.endpoint == topology.writer
        if not node.reachable:
            role, error = "unreachable", node.error
        elif node.writer:
            # A second writer is a stale primary: never chosen, so never written to.
            role, error = "writer", None if current else "fenced: not the newest writer"
        else:
            role, error = "standby", None
        replica = replicas.get(node.endpoint) if node.reachable and not node.writer else None
        lag: float | None = None
        lsn: str | None = None
        paused: bool | None = None
        if replica is not None:
            lag = round(replica.lag_seconds, 3) if replica.lag_seconds is not None else None
            lsn = format_lsn(replica.replay_lsn) if replica.replay_lsn is not None else None
            paused = replica.paused
        rows.append((node.region, str(node.endpoint), role, node.timeline or None, error, current, cluster,
                     lag, lsn, paused, outcome if current else None))  # fmt: skip
    return Result("SHOW", columns, rows)


async def _show_spool(console: AdminConsole) -> Result:
    columns = ("backend", "location", "pending", "status")
    sidecar = console.sidecar
    spool = sidecar.config.spool
    if spool.backend == "none" or sidecar.spooling is None:
        return Result("SHOW", columns, [("none", None, 0, "not enabled")])
    location = str(spool.path) if spool.backend == "sqlite" else spool.dynamodb.table
    if sidecar.spooling.spooling:
        status = "spooling: no writer anywhere"
    elif sidecar.spooling.last_error:
        status = f"replay stopped: {sidecar.spooling.last_error}"
    else:
        status = "replaying" if sidecar.spool_pending else "empty"
    return Result("SHOW", columns, [(spool.backend, location, sidecar.spool_pending, status)])


async def _show_stats(console: AdminConsole) -> Result:
    return Result("SHOW", ("name", "value"), list(stats_rows(console.sidecar)))


def stats_rows(sidecar: ConsoleHost) -> Iterator[tuple[str, object]]:
    """Every `Stats` field, read generically so a counter added there shows up here too."""
    stats = sidecar.stats
    for spec in dataclasses.fields(stats):
        value = getattr(stats, spec.name)
        if isinstance(value, Histogram):
            base = spec.name.removesuffix("_duration")
            yield f"{base}_count", value.count
            yield f"{base}_avg_ms", round(value.total / value.count * 1000, 3) if value.count else 0
        elif isinstance(value, Counter):
            yield spec.name, sum(value.values())
            for label, n in sorted(value.items()):
                yield f"{spec.name}{{{label}}}", n
        else:
            yield spec.name, value
    yield "held_requests", sidecar.held_requests
    yield "spool_pending", sidecar.spool_pending


async def _show_config(console: AdminConsole) -> Result:
    rows = [(key, value) for key, value in config_items(console.sidecar.config).items()]
    return Result("SHOW", ("key", "value"), rows)


async def _pause(console: AdminConsole) -> Result:
    console.sidecar.close_gate("admin PAUSE")
    return Result("PAUSE")


async def _resume(console: AdminConsole) -> Result:
    console.sidecar.open_gate()
    return Result("RESUME")


async def _reload(console: AdminConsole) -> Result:
    try:
        outcome = await console.sidecar.reload(source=f"admin {console.session.id}")
    except ConfigError as exc:
        raise AdminCommandError(
            SqlState.INVALID_PARAMETER_VALUE,
            "reload refused: the new config is invalid; the running config is unchanged",
            detail=str(exc),
        ) from None
    rows = [(key, "applied") for key in outcome.changed]
    rows += [(key, "needs restart") for key in outcome.needs_restart]
    return Result("RELOAD", ("setting", "outcome"), rows)


async def _replay(console: AdminConsole) -> Result:
    sidecar = console.sidecar
    if sidecar.spooling is None:
        raise AdminCommandError(
            SqlState.FEATURE_NOT_SUPPORTED,
            "the spool is not enabled (spool.backend: none): nothing to replay",
        )
    if sidecar.topology.writer is None:
        raise AdminCommandError(
            SqlState.CANNOT_CONNECT_NOW,
            f"no writer to replay to: {sidecar.topology.problem}",
        )
    sidecar.spooling.kick()  # the drain loop replays at once, in id order, exactly once
    return Result("REPLAY", ("pending", "status"), [(sidecar.spool_pending, "replay started")])


async def _show_help(console: AdminConsole) -> Result:
    return Result("SHOW", ("command", "description"), [(name, cmd.help) for name, cmd in COMMANDS.items()])


COMMANDS: dict[str, Command] = {
    "SHOW POOLS": Command(_show_pools, "server connections per (user, database) and waiting clients"),
    "SHOW CLIENTS": Command(_show_clients, "client connections, their state and server"),
    "SHOW SERVERS": Command(_show_servers, "upstream connections in the pools"),
    "SHOW TOPOLOGY": Command(
        _show_topology, "every configured node as last probed, the writer, and its commit-outcome ledger"
    ),
    "SHOW SPOOL": Command(_show_spool, "the durable write spool"),
    "SHOW STATS": Command(_show_stats, "counters since start"),
    "SHOW CONFIG": Command(_show_config, "the effective configuration (secrets hidden)"),
    "SHOW HELP": Command(_show_help, "this list"),
    "PAUSE": Command(_pause, "hold new transactions (running ones finish)"),
    "RESUME": Command(_resume, "release held transactions"),
    "RELOAD": Command(_reload, "re-read the config file (as SIGHUP)"),
    "REPLAY": Command(_replay, "replay the spool now"),
}


# ------------------------------------------------------------------------------------------------
# Rendering


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(_text(item)) for item in value)
    return str(value)
