"""The state and the steps every client session shares: its fields, the one state transition
(`_to`), linking to and unlinking from a server, quiet points and maintenance, getting a server
for held input, failing and closing. The layers above add one job each.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from time import monotonic  # by name: compiled, `time.monotonic` is a module getattr per call
from typing import TYPE_CHECKING, Any

from .. import logs
from ..local import AbortedTransaction
from ..protocol import messages as m
from ..protocol.framing import Action, MessageReader, Relay
from ..protocol.sqlstate import (
    ProtocolViolation,
    ProxyError,
)
from ..server import (
    ServerConnection,
    ServerState,
)
from ..spool.outage import OutageResponder
from ..sqlclass import (
    Effects,
)
from ..statements import StatementRouter
from . import states
from .host import AdminFactory, SessionHost
from .scan import (
    _ALL_FRONTEND,
    _ANSWERS_BEFORE_FATAL,
    _CLIENT_VALID,
    _COPY_FAIL,
    _SESSION_WATCH,
    _SESSION_WATCH_BATCH,
    _SESSION_WATCH_BIND,
    _TRANSACTION_WATCH,
)
from .states import (
    ABORTED,
    CLOSED,
    LINKED,
    LOGGING_IN,
    OUTAGE,
    PARKED,
    IllegalTransition,
)

if TYPE_CHECKING:
    from ..pool import Pool

_client_ids = itertools.count(1)


class SessionCore(asyncio.Protocol):
    # The host's registries hold the top class (`proxy.client.ClientSession`), which this layer
    # cannot name without importing it: hence Any for the client type.
    def __init__(self, sidecar: SessionHost[Any], admin: AdminFactory[Any]) -> None:
        self.id = f"c{next(_client_ids)}"
        self.sidecar = sidecar
        self._admin = admin  # makes the admin console for a login to ADMIN_DATABASE
        self._gate = sidecar.gate  # (read per client read: held here, a native attribute)
        # The session's state (a `session.states` constant): changed only by `_to`.
        self.state = LOGGING_IN
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.user = ""
        self.database = ""
        self.startup_params: dict[str, str] = {}  # as sent by the client
        self.startup_settings: dict[str, str] = {}  # settable startup params + `options` (lowercase)
        self.settings: dict[str, str] = {}  # the session's settings now: what a new server must get
        # The key handed out in BackendKeyData: (process id, secret). Session mode: the id of the
        # first server's backend (what pg_backend_pid() says there); else one the sidecar makes up.
        # The secret is the sidecar's own, unique among open sessions: CancelRequests find the
        # session by it (two sessions may show the same process id, e.g. one pooled server reused).
        self.backend_key: tuple[int, int] | None = None
        # The ParameterStatus values this client has been told (one of the servers' shared dicts,
        # never edited): at login, then whatever its linked server reports (`note_parameter`).
        # A server whose values are another dict is compared at link (`tell_parameters`).
        self.params_told: dict[str, str] = {}
        self.server: ServerConnection | None = None
        self.pool: Pool | None = None
        self.connected_at = monotonic()
        # Passthrough only: the client's password, kept in memory for this session (else None and
        # the sidecar logs in upstream with the configured credentials).
        self._password: str | None = None
        self._max_message = sidecar.config.limits.max_message_size
        self._reader = MessageReader(self._max_message)
        self.transaction_mode = sidecar.config.pool.mode == "transaction"
        self._relay = Relay(
            _TRANSACTION_WATCH if self.transaction_mode else _SESSION_WATCH,
            self._inspect_transaction if self.transaction_mode else self._inspect_session,
            sidecar.config.limits.max_message_size,
            valid_types=_CLIENT_VALID,
        )
        self.router = StatementRouter(sidecar.statements) if self.transaction_mode else None
        # Whether the server must call `server_ready` at each ReadyForQuery: always in transaction
        # mode (the server goes back to the pool), in session mode only while maintenance is due.
        # A plain attribute, read on the hot path instead of a call per transaction.
        self.wants_ready = self.transaction_mode
        # The step under way (HELD: `_attach_next`; GATED: `_resume_after_gate`; MAINTAINING:
        # `_maintain`; OUTAGE: `_act_on_verdict`), kept to be cancelled at close. It may outlive its
        # state by a moment (a cut server ends MAINTAINING before the query fails), hence a field.
        self._task: asyncio.Task[None] | None = None
        # The server the sidecar's own queries run on for this session right now (reading settings
        # back, bringing a server in line with the session): not to be handed on mid-query.
        self._own_query_on: ServerConnection | None = None
        # Flags orthogonal to the state: whether the client's socket is read (paused in any state
        # once held input passes its bound) and whether the client reads its answers.
        self._reading_paused = False
        # The client's transport is above its write high-water mark (the client is not reading):
        # local answerers (outage responder, admin console) stop until it drains.
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None  # `drained()` waits on it
        # Set by statements seen on the way to the server, acted on at the next quiet point.
        self._settings_dirty = False
        self._custom_names: set[str] = set()  # dotted settings the session touched, read by name
        self._reset_all = False
        self._reset_names: set[str] = set()
        self._discarded = False
        # Session mode: the client's named statements (Parse messages), re-prepared when the session
        # moves to a new writer, and the reason it cannot move at all (LISTEN, temp table, ...).
        self._session_statements: dict[str, bytes] = {}
        self._unmovable: str | None = None
        # Session mode: prepared statements (by name, "" unnamed) that change settings when run.
        self._statement_effects: dict[str, Effects] = {}
        self._batch_kind: int | None = None  # REQUEST_* of the extended-protocol batch before Sync
        self._aborted: AbortedTransaction | None = None  # answering locally after a failover cut
        self._outage: OutageResponder | None = None  # playing the server while no writer exists
        self._outage_batch = False  # an extended-protocol batch is open (no Sync yet)
        self._wakeup: asyncio.Future[None] | None = None
        self._eof = False
        self._handshake_task: asyncio.Task[None] | None = None
        self._close_reason: str | None = None
        self._failing: asyncio.Task[None] | None = None  # 08P01 after the answers still due
        self._counted = False  # whether this session holds a pool.max_clients slot

    @property
    def running_on(self) -> ServerConnection | None:
        """The server this client's current work runs on (not one merely kept between
        transactions)."""
        return None if self.state == PARKED else self.server

    @property
    def metric_state(self) -> str:
        """login | waiting (for a server) | active (has one) | idle (none, nothing under way)."""
        if self.state == OUTAGE and self._task is not None:
            return "waiting"  # a request the spool cannot take waits for a writer
        return states.METRIC_LABELS[self.state]

    def _active(self) -> bool:
        """Logged in (not the admin console) and not closed."""
        return LINKED <= self.state <= OUTAGE

    def _to(self, new: int) -> None:
        """The one way the session's state changes: checked against `states.allowed`; entering or
        leaving a state that answers locally (ABORTED, OUTAGE) switches the relay's inspector."""
        old = self.state
        if not states.allowed[old * states.COUNT + new]:
            raise IllegalTransition(f"{self.id}: {states.name(old)} -> {states.name(new)}")
        self.state = new
        if new == ABORTED:
            self._relay.set_inspector(self._inspect_aborted, _ALL_FRONTEND)
        elif new == OUTAGE:
            self._relay.set_inspector(self._inspect_outage, _ALL_FRONTEND)
        elif old in (ABORTED, OUTAGE):
            self._restore_inspector()
        if states.LOGGED[new] or states.LOGGED[old]:
            logs.event("client_state", logs.DEBUG, conn=self.id, state=states.name(new), was=states.name(old))

    def _pause_reading(self) -> None:
        """Stop reading the client: what it sends waits in its socket (a bounded buffer here)."""
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def tell_parameters(self, params: dict[str, str]) -> None:
        """Tell the client `params`, its server's ParameterStatus values, where they differ from
        what it was told before: another server (a transaction-mode switch, a session moved
        after its server was lost) or the sidecar's own queries on this one (a reset's SETs).
        Before anything from that server is relayed, so the client reads its answers with the
        values they were made with (standard_conforming_strings, TimeZone, DateStyle, ...)."""
        told = self.params_told
        if params is told:
            return
        changed = [m.parameter_status(k, v) for k, v in params.items() if told.get(k) != v]
        if changed:
            self._send(b"".join(changed))
        self.params_told = params

    def _link(self, server: ServerConnection) -> None:
        self.server = server
        self._to(LINKED)
        server.link(self, tracked=self.transaction_mode)
        if server.params is not self.params_told:
            self.tell_parameters(server.params)
        # Read on before the held input goes out, not after: if it fills the server's write
        # buffer, the server's `pause_writing` stops reading the client, and must not be undone.
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        try:
            spans = self._relay.resume()
        except Exception as exc:
            self._malformed(exc)
            return
        out = server.transport
        if out is not None:
            for span in spans:
                out.write(span)
        if self._relay.paused and self.state == LINKED:  # the held input ended with Terminate
            self._relay_stopped()

    def _malformed(self, exc: Exception) -> None:
        """The client sent a message that cannot be framed or relayed (or an inspector failed on
        it). As PostgreSQL, which reads and answers messages in order: what came before it still
        goes to the server and the client gets its answers; then 08P01 (FATAL) and the connection
        closes. Nothing after the bad message is read."""
        if isinstance(exc, ProxyError):
            error = exc
        elif isinstance(exc, (IndexError, ValueError, struct.error)):  # a decoder ran off a message
            error = ProtocolViolation(f"malformed message from the client: {exc}")
        else:
            logs.event("client_internal_error", logs.ERROR, conn=self.id, error=repr(exc))
            error = ProxyError(f"internal error in pgsidecar: {exc!r}")
        spans = self._relay.stop()
        self._pause_reading()
        server = self.server
        out = server.transport if server is not None and self.state == LINKED else None
        if out is not None:
            for span in spans:
                out.write(span)
        if self._answers_due():
            if out is not None:
                # A COPY FROM STDIN the client was feeding waits for the rest of its data, which
                # will not come: CopyFail ends it, so the COPY's answer (its error) comes too.
                # (PostgreSQL ignores a CopyFail outside COPY.)
                out.write(_COPY_FAIL)
            loop = asyncio.get_running_loop()
            self._failing = loop.create_task(self._fail_when_answered(error))
        else:
            self.fail(error)

    def _relay_stopped(self) -> None:
        """Linked, the relay paused itself: at the client's Terminate, or for good after a
        malformed message (input read meanwhile is dropped: the client gets its 08P01 once its
        earlier requests are answered)."""
        if self._failing is None:
            self.close("client sent Terminate")
            return
        self._relay.stop()
        self._reading_paused = False  # (whoever resumed reading did not say)
        self._pause_reading()

    def _answers_due(self) -> bool:
        """Requests of the client's still unanswered by its linked server."""
        server = self.server
        if server is None or self.state != LINKED:
            return False
        return len(server.in_flight) > 0

    async def _fail_when_answered(self, error: ProxyError) -> None:
        # (Polled: this runs once per misbehaving client, never on the data path.)
        deadline = monotonic() + _ANSWERS_BEFORE_FATAL
        while self._answers_due() and monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.fail(error)

    def _unlink(self, new: int) -> None:
        """LINKED -> `new`: the relay holds client input; the server stops calling back."""
        self._to(new)
        self._relay.hold()
        if self.server is not None:
            self.server.unlink()

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _known_statements(self) -> dict[str, bytes]:
        """The client's named statements as Parse messages under the client's own names."""
        if self.router is None:
            return dict(self._session_statements)
        known = {}
        for name, stmt in self.router.statements.items():
            parse = m.decode_parse(stmt.parse_message[5:])
            known[name] = m.parse(name, parse.query, parse.param_types)
        return known

    def _session_watch(self) -> bytes:
        """What session mode's relay must look at now."""
        if self.wants_ready:
            return _SESSION_WATCH_BATCH
        return _SESSION_WATCH_BIND if self._statement_effects else _SESSION_WATCH

    def _restore_inspector(self) -> None:
        """Back to forwarding after answering locally (aborted transaction, outage)."""
        self._relay.set_inspector(
            self._inspect_transaction if self.transaction_mode else self._inspect_session,
            _TRANSACTION_WATCH if self.transaction_mode else self._session_watch(),
        )

    def fail(self, exc: ProxyError) -> None:
        """Send `exc` to the client as a FATAL error and close (every disconnect has a reason)."""
        if self.state == CLOSED:
            return
        if not self._active():
            self.sidecar.stats.clients_refused[exc.code] += 1
        else:
            self.sidecar.stats.client_errors[exc.code] += 1
        self._send(
            m.error_response(exc.code, exc.message, severity="FATAL", detail=exc.detail, hint=exc.hint)
        )
        self.close(f"{exc.code}: {exc.message}")

    def close(self, reason: str) -> None:
        if self.state == CLOSED:
            return
        if self.transport is not None:
            self.transport.close()
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        linked = self.state == LINKED
        self._to(CLOSED)
        self._close_reason = reason
        if self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        own, self._own_query_on = self._own_query_on, None
        if own is not None and self.pool is not None:
            # The sidecar's own query is still running there (the task cancelled above stops
            # waiting for it, the server does not): its answer would reach whoever gets the
            # server next. Closed first, so the pool drops it.
            own.close("client left while the sidecar's own query ran on its server")
            self.pool.release(own, reset=False)
        server, self.server = self.server, None
        if server is not None and self.pool is not None and server is not own:
            if server.state is ServerState.CLOSED:
                self.pool.forget(server)
            elif self._relay.mid_message:
                # Part of a message went to the server (a CopyData cut short): it would read
                # whatever it is sent next as the rest of it. No Sync can recover that.
                self.pool.discard(server, "client left in the middle of a message")
            elif self.transaction_mode:
                # Still linked means the client's last request did not end at a quiet point:
                # an open batch, or an answer still due (Pool.release tells which).
                maintenance = (
                    self._settings_dirty or self._reset_all or bool(self._reset_names) or self._discarded
                )
                self.pool.release(server, reset=False, resync=linked, unknown=maintenance)
            else:
                self.pool.release(server, reset=True, resync=self._batch_kind is not None)
        if self.backend_key is not None and self.sidecar.cancel_keys.get(self.backend_key[1]) is self:
            del self.sidecar.cancel_keys[self.backend_key[1]]
        self.sidecar.client_closed(self, counted=self._counted)
        logs.event(
            "client_closed",
            conn=self.id,
            user=self.user or None,
            reason=reason,
            seconds=round(monotonic() - self.connected_at, 3),
        )

    # ---------------------------------------------------------------- provided by the layers above

    def _inspect_transaction(self, type_byte: int, msg: memoryview) -> Action:
        raise NotImplementedError  # (TransactionRouting)

    def _inspect_session(self, type_byte: int, msg: memoryview) -> Action:
        raise NotImplementedError  # (SessionRelay)

    def _inspect_outage(self, type_byte: int, msg: memoryview) -> Action:
        raise NotImplementedError  # (OutageSession)

    def _inspect_aborted(self, type_byte: int, msg: memoryview) -> Action:
        raise NotImplementedError  # (Carryover)

    def _enter_outage(self) -> None:
        raise NotImplementedError  # (OutageSession)

    def quiet_point(self) -> None:
        raise NotImplementedError  # (TransactionRouting)

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        raise NotImplementedError  # (Carryover)

    def server_ready(self, status: int) -> bool:
        raise NotImplementedError  # (Attaching)

    def server_error(self, fields: dict[str, str]) -> None:
        raise NotImplementedError  # (Attaching)
