"""Attach: getting a server for the session's held input and giving it back: parking, the pool,
the gate, and the maintenance at quiet points (the sidecar's own queries that keep settings
following the session).

Uses of the core: its state and transition, its server, pool, relay and settings, `link`/
`unlink`, `fail`. Receives at construction: the host's gate pass and topology (to report a server
that died under it), and the way into the outage session (`enter_outage`, when the pool says no
writer exists and the spool takes over). Offers: `hold` (input while no server is linked),
`hold_at_gate`, `serve_held`, `attach_now`, `attach_soon`, `unpark`, `give_back` (the pool's
`Parker`), `start` (the session's one background step), `acquire` and `quiet_point`.

`pool_for_request` is the one place that decides which pool a request attaches to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import logs
from ..pool import WriterChanged
from ..protocol.sqlstate import (
    ProxyError,
    UpstreamUnavailable,
)
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
    from ..pool import Pool
    from ..topology import TopologyMonitor


class Attach:
    def __init__(
        self,
        core: SessionCore,
        pass_gate: Callable[[], Awaitable[None]],
        topology: TopologyMonitor,
        enter_outage: Callable[[], None],
    ) -> None:
        self.core = core
        self.relay = core.relay
        self._pass_gate = pass_gate
        self._topology = topology
        self._enter_outage = enter_outage

    def pool_for_request(self) -> Pool | None:
        """The pool the client's next request gets its server from. Today always the session's
        own (the writer's); routing reads to replicas decides here."""
        return self.core.pool

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

    def unpark(self) -> ServerConnection | None:
        """The server kept from the last transaction, for this one, if the gate is open and the
        pool still lets it be used (else it goes back to the pool: None)."""
        core = self.core
        server = core.server
        pool = core.pool
        assert server is not None and pool is not None
        if not core.gate.closed and pool.unpark(server):
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
        self._topology.report_failure(server.endpoint, reason)

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
            server.statements.replace_all({str(row[0]) for row in result.rows})
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
                server = await self.acquire(pool)
            except SpoolNow:
                self._enter_outage()
                return
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
