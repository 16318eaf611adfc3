"""Getting a server for held input and giving it back: parking, the pool, the gate, the
maintenance at quiet points (the sidecar's own queries that keep settings following the session).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .. import logs
from ..pool import WriterChanged
from ..protocol import messages as m
from ..protocol.sqlstate import (
    SERVER_GONE_STATES,
    ProxyError,
    UpstreamUnavailable,
)
from ..server import (
    REQUEST_OTHER,
    ServerConnection,
    ServerState,
)
from ..settings import capture_sql, set_config_sql, sync_sql
from ..spooling import SpoolNow
from .core import SessionCore
from .scan import _HOLD_LIMIT, _TERMINATE, _WRITER_CHANGES_PER_REQUEST
from .states import (
    HELD,
    IDLE,
    MAINTAINING,
    PARKED,
)

if TYPE_CHECKING:
    from ..pool import Pool


class Attaching(SessionCore):
    def _hold(self, data: bytes) -> None:
        """Input while no server is linked: keep it (bounded) and get a server if none is coming."""
        self._relay.hold()
        self._relay.feed(data)
        if self._relay.buffered > _HOLD_LIMIT and self.transport is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._serve_held()

    def _serve_held(self) -> None:
        """Get a server for the input held while none is linked, unless one is already coming."""
        state = self.state
        if self._task is None and state in (IDLE, PARKED):
            if self._relay.buffered == len(_TERMINATE) and self._relay.peek(5) == _TERMINATE:
                self.close("client sent Terminate")
                return
            if state == PARKED:
                server = self._unpark()
                if server is not None:
                    self._link(server)  # the general path, on the server kept from last time
                    return
            if self.transaction_mode and self._attach_now():
                return
            self._attach_soon()

    def _unpark(self) -> ServerConnection | None:
        """The server kept from the last transaction, for this one, if the gate is open and the
        pool still lets it be used (else it goes back to the pool: None)."""
        server = self.server
        pool = self.pool
        assert server is not None and pool is not None
        if not self._gate.closed and pool.unpark(server):
            return server  # (still PARKED: the caller links it)
        self.give_back(server)
        return None

    def give_back(self, server: ServerConnection) -> None:
        """Hand the kept server back to the pool (`Parker`: another client needs it)."""
        if self.state == PARKED:
            self._to(IDLE)
        if self.server is server:
            self.server = None
        if self.pool is not None:
            self.pool.release(server, reset=False)

    def _attach_now(self) -> bool:
        """Transaction mode's common case, without a task or a trip round the event loop: the gate
        is open and an idle server already has this client's settings."""
        pool = self.pool
        if pool is None or self._gate.closed:
            return False
        server = pool.take_idle_now()
        if server is None:
            return False
        if server.applied != self.settings:
            pool.release(server, reset=False)
            return False
        self._link(server)
        return True

    # Callbacks from the linked ServerConnection.
    def server_ready(self, status: int) -> bool:
        """ReadyForQuery arrived (called only while `wants_ready`). True: the client is at a quiet
        point, and the server calls `quiet_point` once the bytes so far have been written, with
        its relay paused. (A flag rather than a callback returned: compiled, a bound method is
        an allocation and a generic call per transaction.)"""
        server = self.server
        if server is None or status != m.TX_IDLE or server.outstanding or server.tracker:
            return False
        if self._relay.mid_message:
            return False
        if self.transaction_mode:
            return True
        # Session mode: called only while maintenance is due. Not while the client has more
        # extended-protocol messages on the server that no Sync ended yet: the server would answer
        # them ahead of the sidecar's own queries.
        maintenance = self._settings_dirty or self._reset_all or bool(self._reset_names) or self._discarded
        return maintenance and self._batch_kind is None

    def server_error(self, fields: dict[str, str]) -> None:
        """An ErrorResponse from the linked server (relayed; this only reports failures)."""
        server = self.server
        if server is None:
            return
        if fields.get("C") in SERVER_GONE_STATES:
            self.sidecar.topology.report_failure(server.endpoint, m.error_summary(fields))
        if (
            server.outstanding == 0
            and self._batch_kind is None
            and not self.transaction_mode
            and fields.get("V", fields.get("S")) != "FATAL"  # (a goodbye: the session moves)
        ):
            # No Query or Sync awaits an answer, so this error is of an extended-protocol batch
            # not synced yet: the server now skips everything up to its Sync. Noted as an open
            # batch, so a server given back before that Sync is resynchronised (Pool.release).
            self._batch_kind = REQUEST_OTHER

    def _attach_soon(self) -> None:
        """HELD: get a server for the held input (`_attach_next`)."""
        self._to(HELD)
        self._start(self._attach_next())

    def _start(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._task = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, ProxyError):
            self.fail(exc)
        elif exc is not None:
            logs.event("client_internal_error", logs.ERROR, conn=self.id, error=repr(exc))
            self.fail(ProxyError(f"internal error in pgsidecar: {exc!r}"))
        elif self._needs_server():
            # Input arrived while the previous server was being released: get a new one.
            self._attach_soon()

    def _needs_server(self) -> bool:
        return self.state == IDLE and self.server is None and self._task is None and self._relay.buffered > 0

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
        if self._reset_all:
            self.settings = dict(self.startup_settings)
        for name in self._reset_names:
            if name in self.startup_settings:
                self.settings[name] = self.startup_settings[name]
            else:
                self.settings.pop(name, None)
        if self._settings_dirty:
            logs.event("settings_not_captured", logs.WARNING, conn=self.id, reason=reason)
        self._settings_dirty = self._reset_all = self._discarded = False
        self._reset_names.clear()
        self._maintained()
        if self.state == MAINTAINING:
            self._to(IDLE)
        if self.server is server:
            self.server = None
        if self.pool is not None:
            self.pool.release(server, reset=False)
        # Input that came meanwhile gets a new server from _task_done once this task ends.
        self.sidecar.topology.report_failure(server.endpoint, reason)

    async def _maintain_on(self, server: ServerConnection) -> None:
        self._own_query_on = server
        try:
            await self._maintenance_queries(server)
        finally:
            self._own_query_on = None
        self._maintained()
        if self.state != MAINTAINING:
            return  # closed meanwhile
        if self.transaction_mode:
            self._to(IDLE)
            self._release_transaction_server()
        else:
            self._link(server)

    async def _maintenance_queries(self, server: ServerConnection) -> None:
        reset = (
            self.startup_settings
            if self._reset_all
            else {k: v for k, v in self.startup_settings.items() if k in self._reset_names}
        )
        if reset:
            await server.simple_query(set_config_sql(reset))
            self.tell_parameters(server.params)
        if self._settings_dirty or reset:
            result = await server.simple_query(capture_sql(self._custom_names))
            self.settings = {str(name): str(value) for name, value in result.rows}
            server.applied = dict(self.settings)
        if self._discarded:
            result = await server.simple_query("SELECT name FROM pg_catalog.pg_prepared_statements")
            server.statements.replace_all({str(row[0]) for row in result.rows})
        self._settings_dirty = self._reset_all = self._discarded = False
        self._reset_names.clear()

    def _maintained(self) -> None:
        """Maintenance done (or moot): the relay goes back to watching what it watches between."""
        self.wants_ready = self.transaction_mode
        if not self.transaction_mode and self._outage is None and self._aborted is None:
            self._relay.set_watch(self._session_watch())

    def _release_transaction_server(self) -> None:
        server, self.server = self.server, None
        if server is not None and self.pool is not None:
            self.pool.release(server, reset=False)
        if self._needs_server():
            self._attach_soon()

    async def _attach_next(self) -> None:
        """A server for the client's next transaction (transaction mode, or a session whose server
        was lost), made to match the session: its settings, and in session mode its statements."""
        pool = self.pool
        assert pool is not None
        for attempt in range(_WRITER_CHANGES_PER_REQUEST):
            try:
                server = await self._acquire(pool)
            except SpoolNow:
                self._enter_outage()
                return
            if self.state != HELD:  # closed meanwhile
                pool.release(server, reset=False)
                return
            self._own_query_on = server
            try:
                await self._prepare_server(server)
            except asyncio.CancelledError:
                # The client left while its settings or statements were being restored: the
                # server goes back, the pool reading past the answers given up.
                pool.release(server, reset=not self.transaction_mode, unknown=True)
                raise
            except UpstreamUnavailable as exc:
                self._own_query_on = None
                # The server died between checkout and use (a crash the probes have not seen
                # yet): nothing of the client's went to it, so take another one (held if the
                # writer is gone) instead of failing the client.
                pool.release(server, reset=False)
                if server.state is not ServerState.CLOSED or attempt == _WRITER_CHANGES_PER_REQUEST - 1:
                    raise
                self.sidecar.topology.report_failure(server.endpoint, exc.message)
                continue
            except ProxyError:
                self._own_query_on = None
                pool.release(server, reset=not self.transaction_mode)
                raise
            self._own_query_on = None
            if self.state != HELD:
                pool.release(server, reset=False)
                return
            self._link(server)
            return

    async def _prepare_server(self, server: ServerConnection) -> None:
        """Make `server` match the session: its settings, and in session mode its statements."""
        sql = sync_sql(self.settings, server.applied)
        if sql is not None:
            await server.simple_query(sql)
            server.applied = dict(self.settings)
        if not self.transaction_mode and self._session_statements:
            failed = await server.prepare(list(self._session_statements.values()))
            if failed:
                logs.event("statements_not_restored", logs.WARNING, conn=self.id, errors=failed)

    async def _acquire(self, pool: Pool) -> ServerConnection:
        """Through the gate, then a server. A login that finds the writer gone (crashed an
        instant before the probes noticed) comes back here and is held like any other request
        until the new writer is known."""
        for _ in range(_WRITER_CHANGES_PER_REQUEST - 1):
            await self.sidecar.pass_gate()
            try:
                return await pool.acquire(self._password)
            except WriterChanged as exc:
                logs.event("server_retry", logs.WARNING, conn=self.id, reason=exc.message)
        await self.sidecar.pass_gate()
        return await pool.acquire(self._password)
