"""Attach: getting a server for the session's held input and giving it back: parking, the pool,
the gate, and the maintenance at quiet points (the sidecar's own queries that keep settings
following the session).

Uses of the core: its state and transition, its server, pool, relay and settings, `link`/
`unlink`, `fail`. Receives at construction: the host's gate pass and topology (to report a server
that died under it), and the way into the outage session (`enter_outage`, when the pool says no
writer exists and the spool takes over). Offers: `hold` (input while no server is linked),
`hold_at_gate`, `serve_held`, `attach_now`, `attach_soon`, `unpark`, `give_back` (the pool's
`Parker`), `start` (the session's one background step), `acquire` and `quiet_point`.

`pool_for_request` is the one place that decides which pool a request attaches to: the writer's,
or with read routing (`routing.reads`) a replica's for read-only work (ARCHITECTURE.md, "Read
routing"). `next_transaction` moves a session-mode session between them at quiet points.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from .. import logs
from ..outcome_answer import MARKED_COMMIT_STATEMENTS
from ..pool import WriterChanged
from ..protocol.sqlstate import (
    ProxyError,
    UpstreamUnavailable,
)
from ..read_routing import parse_bool_setting, read_only_request
from ..server import (
    ServerConnection,
    ServerState,
)
from ..settings import capture_sql, set_config_sql, sync_sql
from ..spooling import SpoolNow
from .core import SessionCore
from .scan import _HOLD_LIMIT, _TERMINATE, _WRITER_CHANGES_PER_REQUEST
from .states import (
    ABORTED,
    GATED,
    HELD,
    IDLE,
    MAINTAINING,
    OUTAGE,
    PARKED,
)

if TYPE_CHECKING:
    from sidecar_config import Endpoint
    from sidecar_config.models import RoutingConfig

    from ..pool import Pool
    from ..topology import TopologyMonitor

# `routing.reads`, as the int the data path compares.
READS_WRITER: Final = 0
READS_FAILOVER: Final = 1
READS_BALANCE: Final = 2
_READS: Final = {"writer": READS_WRITER, "failover": READS_FAILOVER, "balance": READS_BALANCE}
# Replicas tried for one request before it goes to the writer's pool.
_REPLICA_TRIES: Final = 3
# How much of the held input is looked at to classify the next request.
_CLASSIFY_LIMIT: Final = 65536


class Attach:
    def __init__(
        self,
        core: SessionCore,
        pass_gate: Callable[[], Awaitable[None]],
        topology: TopologyMonitor,
        enter_outage: Callable[[], None],
        replica_pool_for: Callable[[str, str, Endpoint], Pool] | None = None,
        routing: RoutingConfig | None = None,
    ) -> None:
        self.core = core
        self.relay = core.relay
        self._pass_gate = pass_gate
        self._topology = topology
        self._enter_outage = enter_outage
        self._replica_pool_for = replica_pool_for
        self.reads = READS_WRITER if routing is None or replica_pool_for is None else _READS[routing.reads]
        self._routing = routing
        self._configured_read_only = -1  # routing.read_only_users/databases: 1/0, -1 not looked at yet
        # Read-your-writes (`balance`): the `TopologyMonitor.commit_mark` taken after the client's
        # last transaction on the writer that may have written (-1: none), and whether the request
        # being attached was classified read-only (then its transaction wrote nothing; at first
        # True: a login writes nothing).
        self.mark = -1
        self.read_only_now = True

    def pool_for_request(self, data: bytes | None = None) -> Pool | None:
        """The pool the client's next request gets its server from: the writer's, unless read
        routing sends this request (`data`, or else the input held) to a replica. With
        `routing.reads: writer`, or `failover` while the gate is open, two int compares."""
        reads = self.reads
        if reads == READS_WRITER or (reads == READS_FAILOVER and not self.core.gate.closed):
            return self.core.writer_pool
        return self._route(data)

    def _route(self, data: bytes | None) -> Pool | None:
        """`failover` with the gate closed, or `balance`: a replica's pool for read-only work
        when one qualifies, else the writer's (held there while there is no writer)."""
        core = self.core
        writer_pool = core.writer_pool
        topology = self._topology
        writer_known = topology.writer is not None
        self.read_only_now = False
        if self.reads == READS_FAILOVER and writer_known:
            return writer_pool  # held by a PAUSE or a writer being confirmed: as before
        if not self._read_only(data):
            return writer_pool
        self.read_only_now = True
        # A client's own writes: only from a replica that replayed past them (while a writer is
        # there to say how far that is; without one, the freshest qualifying replica).
        mark = self.mark if self.reads == READS_BALANCE and writer_known and self.mark >= 0 else None
        current = core.pool
        prefer = None
        if current is not None and current.replica is not None and current.retired is None:
            prefer = current.replica
        replica_pool_for = self._replica_pool_for
        assert replica_pool_for is not None
        for _ in range(_REPLICA_TRIES):
            endpoint = topology.choose_replica(after_mark=mark, prefer=prefer)
            if endpoint is None:
                break
            try:
                pool = replica_pool_for(core.user, core.database, endpoint)
            except UpstreamUnavailable as exc:
                topology.report_replica_failure(endpoint, exc.message)
                continue
            if pool.retired is None:
                return pool
            topology.report_replica_failure(endpoint, pool.retired)
        return writer_pool

    def _read_only(self, data: bytes | None) -> bool:
        """Whether the client's next request is read-only work: the whole session is (a user or
        database configured so, or default_transaction_read_only on), or the request is."""
        core = self.core
        configured = self._configured_read_only
        if configured < 0:
            routing = self._routing
            configured = self._configured_read_only = int(
                routing is not None
                and (core.user in routing.read_only_users or core.database in routing.read_only_databases)
            )
        if configured:
            return True
        setting = core.settings.get("default_transaction_read_only")
        if setting is not None and parse_bool_setting(setting) is True:
            return True
        if data is None:
            relay = self.relay
            data = relay.peek(min(relay.buffered, _CLASSIFY_LIMIT))
        return read_only_request(data, core.mode.statement_text)

    def on_replica(self) -> bool:
        """The session's server (if any) is a replica's."""
        pool = self.core.pool
        return pool is not None and pool.replica is not None

    def report_lost(self, server: ServerConnection, reason: str) -> None:
        """A server of this session failed: a replica is skipped until a probe looks again; the
        writer is probed at once. A replica's failure never touches the writer's state."""
        pool = self.core.pool
        if pool is not None and pool.replica is not None and server.endpoint == pool.replica:
            self._topology.report_replica_failure(server.endpoint, reason)
        else:
            self._topology.report_failure(server.endpoint, reason)

    def next_transaction(self, data: bytes) -> bool:
        """Session mode, between transactions, with the gate closed or read routing at work:
        `data` starts the next transaction. Held at the gate as before when it is for the
        writer's pool and the gate is closed; moved to the other pool (the server given back,
        `data` held for a server of that pool, which gets the session's settings and prepared
        statements) when it is for another and the session can move; else False: it goes to
        the linked server as usual."""
        core = self.core
        current = core.pool
        if self.reads == READS_BALANCE and current is core.writer_pool and not self.read_only_now:
            self.mark = self._topology.commit_mark()
        pool = self.pool_for_request(data)
        mode = core.mode
        if pool is None or pool is current or mode.unmovable() is not None or mode.batch_kind is not None:
            if core.gate.closed and (current is core.writer_pool or self._topology.writer is not None):
                # (On a replica too while a writer is known: an operator's PAUSE holds everything.)
                self.hold_at_gate(data)
                return True
            return False
        server = core.server
        assert server is not None and current is not None
        logs.event(
            "session_moved",
            logs.DEBUG,
            conn=core.id,
            upstream=str(server.endpoint),
            to="writer" if pool is core.writer_pool else str(pool.replica),
        )
        core.unlink(IDLE)
        core.server = None
        current.release(server, reset=True)
        core.reroute = self.reads == READS_BALANCE
        self.hold(data)
        return True

    def hold(self, data: bytes) -> None:
        """Input while no server is linked: keep it (bounded) and get a server if none is coming."""
        core = self.core
        relay = self.relay
        relay.hold()
        relay.feed(data)
        if relay.buffered > _HOLD_LIMIT and core.transport is not None and not core.reading_paused:
            core.reading_paused = True
            core.transport.pause_reading()
        self.serve_held()

    def hold_at_gate(self, data: bytes) -> None:
        """Session mode, between transactions, the gate closed: GATED, the server kept but
        unlinked, `data` held until the gate opens."""
        self.core.unlink(GATED)
        self.hold(data)
        self.start(self._resume_after_gate())

    def stop_gate_wait(self) -> None:
        """The server of a GATED session was cut: it no longer waits for the gate to link it again
        (its held input is attached like any other: read routing may serve it now)."""
        task = self.core.task
        if task is not None and not task.done():
            self.core.task = None
            task.cancel()

    async def _resume_after_gate(self) -> None:
        await self._pass_gate()
        core = self.core
        if core.state == GATED and core.server is not None:  # (IDLE if the server was cut meanwhile)
            core.link(core.server)

    def serve_held(self) -> None:
        """Get a server for the input held while none is linked, unless one is already coming."""
        core = self.core
        state = core.state
        if core.task is None and state in (IDLE, PARKED):
            if self.relay.buffered == len(_TERMINATE) and self.relay.peek(5) == _TERMINATE:
                core.close("client sent Terminate")
                return
            if state == PARKED:
                server = self.unpark()
                if server is not None:
                    core.link(server)  # the general path, on the server kept from last time
                    return
            if core.transaction_mode and self.attach_now():
                return
            self.attach_soon()

    def unpark(self, data: bytes | None = None) -> ServerConnection | None:
        """The server kept from the last transaction, for this one, if the gate is open and the
        pool still lets it be used (else it goes back to the pool: None)."""
        core = self.core
        server = core.server
        pool = core.pool
        assert server is not None and pool is not None
        if (
            not core.gate.closed
            and (self.reads != READS_BALANCE or self.pool_for_request(data) is pool)
            and pool.unpark(server)
        ):
            return server  # (still PARKED: the caller links it)
        self.give_back(server)
        return None

    def give_back(self, server: ServerConnection) -> None:
        """Hand the kept server back to the pool (`Parker`: another client needs it)."""
        core = self.core
        if core.state == PARKED:
            core.to(IDLE)
        if core.server is server:
            core.server = None
        if core.pool is not None:
            core.pool.release(server, reset=False)

    def attach_now(self) -> bool:
        """Transaction mode's common case, without a task or a trip round the event loop: the gate
        is open and an idle server already has this client's settings."""
        core = self.core
        pool = self.pool_for_request()
        if pool is None or core.gate.closed:
            return False
        server = pool.take_idle_now()
        if server is None:
            return False
        if server.applied != core.settings:
            pool.release(server, reset=False)
            return False
        core.pool = pool
        core.link(server)
        return True

    def attach_soon(self) -> None:
        """HELD: get a server for the held input (`_attach_next`)."""
        self.core.to(HELD)
        self.start(self._attach_next())

    def start(self, coro: Any) -> None:
        """Run `coro` as the session's step under way (`SessionCore.task`)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.core.task = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        core = self.core
        if core.task is task:
            core.task = None
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, ProxyError):
            core.fail(exc)
        elif exc is not None:
            logs.event("client_internal_error", logs.ERROR, conn=core.id, error=repr(exc))
            core.fail(ProxyError(f"internal error in pgsidecar: {exc!r}"))
        elif self.needs_server():
            # Input arrived while the previous server was being released: get a new one.
            self.attach_soon()

    def needs_server(self) -> bool:
        core = self.core
        return core.state == IDLE and core.server is None and core.task is None and self.relay.buffered > 0

    def quiet_point(self) -> None:
        """The server finished everything asked of it: maintain, and in transaction mode release it."""
        core = self.core
        server = core.server
        if server is None:
            return
        maintenance = core.maintenance_due()
        pool = core.pool
        if self.reads == READS_BALANCE and pool is core.writer_pool and not self.read_only_now:
            self.mark = self._topology.commit_mark()  # read-your-writes: see `_route`
        parks = not maintenance and core.transaction_mode
        if parks and pool is not None and server.keep_linked() and pool.park(server, self):
            # Nobody waits for a server: keep this one for the next transaction, which then
            # starts without a checkout. Still linked, so whatever the server says meanwhile
            # (a FATAL goodbye) reaches this session.
            core.to(PARKED)
            self.relay.hold()
            if self.relay.buffered:
                self.serve_held()  # input that came with the last answer: the next transaction
            return
        if maintenance:
            core.unlink(MAINTAINING)
            self.start(self._maintain(server))
        else:
            core.unlink(IDLE)
            self._release_transaction_server()

    async def _maintain(self, server: ServerConnection) -> None:
        """Bring the server's settings in line with what the client asked for, then carry on."""
        try:
            await self._maintain_on(server)
        except UpstreamUnavailable as exc:
            if server.state is not ServerState.CLOSED:
                raise
            self._maintenance_lost(server, exc.message)

    def _maintenance_lost(self, server: ServerConnection, reason: str) -> None:
        """The server died under the sidecar's own maintenance query, between the client's
        transactions: the session moves on like any idle session. Settings the client reset are
        known without asking; a SET whose new value was not read back yet is lost (logged)."""
        core = self.core
        if core.reset_all:
            core.settings = dict(core.startup_settings)
        for name in core.reset_names:
            if name in core.startup_settings:
                core.settings[name] = core.startup_settings[name]
            else:
                core.settings.pop(name, None)
        if core.settings_dirty:
            logs.event("settings_not_captured", logs.WARNING, conn=core.id, reason=reason)
        core.settings_dirty = core.reset_all = core.discarded = False
        core.reset_names.clear()
        self._maintained()
        if core.state == MAINTAINING:
            core.to(IDLE)
        if core.server is server:
            core.server = None
        if core.pool is not None:
            core.pool.release(server, reset=False)
        # Input that came meanwhile gets a new server from _task_done once this task ends.
        self.report_lost(server, reason)

    async def _maintain_on(self, server: ServerConnection) -> None:
        core = self.core
        core.own_query_on = server
        try:
            await self._maintenance_queries(server)
        finally:
            core.own_query_on = None
        self._maintained()
        if core.state != MAINTAINING:
            return  # closed meanwhile
        if core.transaction_mode:
            core.to(IDLE)
            self._release_transaction_server()
        else:
            core.link(server)

    async def _maintenance_queries(self, server: ServerConnection) -> None:
        core = self.core
        reset = (
            core.startup_settings
            if core.reset_all
            else {k: v for k, v in core.startup_settings.items() if k in core.reset_names}
        )
        if reset:
            await server.simple_query(set_config_sql(reset))
            core.tell_parameters(server.params)
        if core.settings_dirty or reset:
            result = await server.simple_query(capture_sql(core.custom_names))
            core.settings = {str(name): str(value) for name, value in result.rows}
            server.applied = dict(core.settings)
        if core.discarded:
            result = await server.simple_query("SELECT name FROM pg_catalog.pg_prepared_statements")
            # (Not the marked COMMIT's: those are the server connection's own, not shared.)
            server.statements.replace_all({str(row[0]) for row in result.rows} - MARKED_COMMIT_STATEMENTS)
            server.marker_prepared = False
        core.settings_dirty = core.reset_all = core.discarded = False
        core.reset_names.clear()

    def _maintained(self) -> None:
        """Maintenance done (or moot): the relay goes back to watching what it watches between."""
        core = self.core
        core.wants_ready = core.transaction_mode
        state = core.state
        if not core.transaction_mode and state not in (OUTAGE, ABORTED):
            self.relay.set_watch(core.mode.watch())

    def _release_transaction_server(self) -> None:
        core = self.core
        server, core.server = core.server, None
        if server is not None and core.pool is not None:
            core.pool.release(server, reset=False)
        if self.needs_server():
            self.attach_soon()

    async def _attach_next(self) -> None:
        """A server for the client's next transaction (transaction mode, or a session whose server
        was lost), made to match the session: its settings, and in session mode its statements."""
        core = self.core
        pool = self.pool_for_request()
        assert pool is not None
        for attempt in range(_WRITER_CHANGES_PER_REQUEST):
            try:
                if pool.replica is not None:
                    server = await self.acquire_replica(pool)
                else:
                    server = await self.acquire(pool)
            except SpoolNow:
                self._enter_outage()
                return
            except UpstreamUnavailable as exc:
                if pool.replica is None or attempt == _WRITER_CHANGES_PER_REQUEST - 1:
                    raise
                # The replica could not give a server (lost, promoted, retired): skipped until
                # a probe looks again; the request goes where the routing says now.
                self._topology.report_replica_failure(pool.replica, exc.message)
                pool = self.pool_for_request()
                assert pool is not None
                continue
            if core.state != HELD:  # closed meanwhile
                pool.release(server, reset=False)
                return
            core.own_query_on = server
            try:
                await self._prepare_server(server)
            except asyncio.CancelledError:
                # The client left while its settings or statements were being restored: the
                # server goes back, the pool reading past the answers given up.
                pool.release(server, reset=not core.transaction_mode, unknown=True)
                raise
            except UpstreamUnavailable as exc:
                core.own_query_on = None
                # The server died between checkout and use (a crash the probes have not seen
                # yet): nothing of the client's went to it, so take another one (held if the
                # writer is gone) instead of failing the client.
                pool.release(server, reset=False)
                if server.state is not ServerState.CLOSED or attempt == _WRITER_CHANGES_PER_REQUEST - 1:
                    raise
                if pool.replica is not None:
                    self._topology.report_replica_failure(server.endpoint, exc.message)
                    pool = self.pool_for_request()
                    assert pool is not None
                else:
                    self._topology.report_failure(server.endpoint, exc.message)
                continue
            except ProxyError:
                core.own_query_on = None
                pool.release(server, reset=not core.transaction_mode)
                raise
            core.own_query_on = None
            if core.state != HELD:
                pool.release(server, reset=False)
                return
            core.pool = pool
            core.reroute = self.reads == READS_BALANCE or pool.replica is not None
            core.link(server)
            return

    async def _prepare_server(self, server: ServerConnection) -> None:
        """Make `server` match the session: its settings, and in session mode its statements."""
        core = self.core
        sql = sync_sql(core.settings, server.applied)
        if sql is not None:
            await server.simple_query(sql)
            server.applied = dict(core.settings)
        statements = core.mode.statements_for_new_server()
        if statements:
            failed = await server.prepare(statements)
            if failed:
                logs.event("statements_not_restored", logs.WARNING, conn=core.id, errors=failed)

    async def acquire_replica(self, pool: Pool) -> ServerConnection:
        """A server of a replica's pool: not held by a failover's gate (that is the point), but
        by an operator's PAUSE while a writer is there (the gate closed with a writer known)."""
        if self.core.gate.closed and self._topology.writer is not None:
            await self._pass_gate()
        return await pool.acquire(self.core.password)

    def login_pool(self) -> Pool | None:
        """A replica's pool for a login while there is no writer (the gate closed for a
        failover, read routing on, a replica qualifying), or None (the login waits as before)."""
        core = self.core
        if self.reads == READS_WRITER or not core.gate.closed or self._topology.writer is not None:
            return None
        replica_pool_for = self._replica_pool_for
        assert replica_pool_for is not None
        for _ in range(_REPLICA_TRIES):
            endpoint = self._topology.choose_replica()
            if endpoint is None:
                return None
            try:
                pool = replica_pool_for(core.user, core.database, endpoint)
            except UpstreamUnavailable as exc:
                self._topology.report_replica_failure(endpoint, exc.message)
                continue
            if pool.retired is None:
                return pool
        return None

    async def acquire(self, pool: Pool) -> ServerConnection:
        """Through the gate, then a server. A login that finds the writer gone (crashed an
        instant before the probes noticed) comes back here and is held like any other request
        until the new writer is known."""
        for _ in range(_WRITER_CHANGES_PER_REQUEST - 1):
            await self._pass_gate()
            try:
                return await pool.acquire(self.core.password)
            except WriterChanged as exc:
                logs.event("server_retry", logs.WARNING, conn=self.core.id, reason=exc.message)
        await self._pass_gate()
        return await pool.acquire(self.core.password)
