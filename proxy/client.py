"""ClientSession: one application connection, from startup packet to close.

The handshake (SSL/GSS negotiation, startup, authentication, attaching a server) runs as one
coroutine reading whole messages. Once linked to a server, the session switches to the hot path:
`data_received` feeds a `Relay` whose spans go straight to the server's transport.

Session mode looks only at Terminate, Query, Parse and Sync (to know when the server is at rest
and whether settings changed). Transaction mode also follows the extended protocol message by
message, to rename prepared statements (`statements.StatementRouter`) and to hand the server back
to the pool at the ReadyForQuery that ends each transaction.

Between batches, at a quiet point, the session may run its own queries on the server
("maintenance"): putting startup settings back after a client's RESET, re-reading settings after
a SET so they follow the client to its next server. Client input is held meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shlex
import struct
from os import urandom
from time import monotonic  # by name: compiled, `time.monotonic` is a module getattr per call
from typing import TYPE_CHECKING, Any, Final, cast

from . import logs
from .local import AbortedTransaction, failover_error
from .pool import WriterChanged
from .protocol import messages as m
from .protocol.auth import ClientAuthenticator
from .protocol.framing import Action, MessageReader, Relay, length_at, valid_type_table, watch_table
from .protocol.sqlstate import (
    SERVER_GONE_STATES,
    CannotConnectNow,
    FeatureNotSupported,
    ProtocolViolation,
    ProxyError,
    SqlState,
    UnknownUser,
    UpstreamUnavailable,
)
from .server import (
    REQUEST_COMMIT,
    REQUEST_OTHER,
    REQUEST_READ,
    ServerConnection,
    ServerState,
    merge_kinds,
)
from .session import states
from .session.host import ADMIN_DATABASE, AdminFactory, SessionHost
from .session.states import (
    ABORTED,
    ADMIN,
    CLOSED,
    CONNECTING,
    GATED,
    HELD,
    IDLE,
    LINKED,
    LOGGING_IN,
    MAINTAINING,
    OUTAGE,
    PARKED,
    IllegalTransition,
)
from .settings import capture_sql, lower_keys, set_config_sql, sync_sql
from .spool import SpoolError
from .spool.outage import OutageResponder, Store, Unspoolable
from .spooling import SpoolNow
from .sqlclass import (
    Deallocate,
    Effects,
    classify,
    first_keyword,
    has_more_statements,
    lone_select,
    mentions_session_functions,
    needs_transaction_check,
    session_keyword_at,
)
from .statements import ClientStatement, Entry, Expect, LocalStatement, StatementRouter, parse_message

if TYPE_CHECKING:
    from .pool import Pool

_client_ids = itertools.count(1)
# The tail of the common extended-protocol request: [Describe the unnamed portal,] Execute it (all
# rows), Sync.
_SYNC: Final = b"S\x00\x00\x00\x04"
# A BackendKeyData's process id and secret, drawn as signed int32s (as the message carries them).
_KEY_PARTS: Final = struct.Struct("!ii")
# Process ids the sidecar makes up (transaction mode, the admin console, a login during an outage)
# start here: Linux never gives a process an id this high (PID_MAX_LIMIT is 2**22), so such an id
# can name no real backend, and pg_terminate_backend() of it terminates nothing by mistake.
_MADE_UP_PIDS: Final = 1 << 22
_EXECUTE_SYNC: Final = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00" + _SYNC
_DESCRIBE_EXECUTE_SYNC: Final = b"D\x00\x00\x00\x06P\x00" + _EXECUTE_SYNC
# The answers the fast paths' requests owe, as `ResponseTracker.expect_fast` takes them.
_QUERY_ANSWER: Final = (Entry(Expect.QUERY),)
_BIND_EXECUTE: Final = (Entry(Expect.BIND), Entry(Expect.EXECUTE), Entry(Expect.SYNC))
_BIND_DESCRIBE_EXECUTE: Final = (Entry(Expect.BIND), Entry(Expect.DESCRIBE_PORTAL), *_BIND_EXECUTE[1:])
_PARSE: Final = (Entry(Expect.PARSE),)

_SESSION_WATCH: Final = watch_table((m.F_TERMINATE, m.F_QUERY, m.F_SYNC, m.F_PARSE, m.F_CLOSE))
# Only while the session has a prepared statement that changes settings (`SET` prepared by a
# driver): its effect happens at Bind/Execute, not at Parse, so Bind is watched then.
_SESSION_WATCH_BIND: Final = watch_table((m.F_TERMINATE, m.F_QUERY, m.F_SYNC, m.F_PARSE, m.F_CLOSE, m.F_BIND))
_ALL_FRONTEND: Final = watch_table(m.FRONTEND_TYPES)
# Everything but COPY data, which streams through.
_TRANSACTION_WATCH: Final = watch_table(
    (m.F_TERMINATE, m.F_QUERY, m.F_SYNC, m.F_PARSE, m.F_BIND, m.F_DESCRIBE, m.F_EXECUTE, m.F_CLOSE,
     m.F_FLUSH, m.F_FUNCTION_CALL)
)  # fmt: skip
_CLIENT_VALID: Final = valid_type_table(m.FRONTEND_TYPES)
_TERMINATE: Final = m.terminate()
# Client bytes held while its server is busy or being acquired; past this, stop reading the socket.
_HOLD_LIMIT: Final = 256 * 1024
# After a malformed message, how long the answers to the requests before it may take before the
# client gets its 08P01 anyway (a backstop: they normally come within the query's run time).
_ANSWERS_BEFORE_FATAL: Final = 30.0
# Writers lost in a row while one request waits for a server before it is failed (a flapping
# cluster must end in an error, not an endless wait).
_WRITER_CHANGES_PER_REQUEST: Final = 4

# Startup keys that are not run-time parameters: they pick the server connection, or are
# protocol extensions we decline in NegotiateProtocolVersion.
_NOT_SETTABLE: Final = frozenset({"user", "database", "replication", "options"})


def parse_options(options: str) -> dict[str, str]:
    """Settings from the libpq `options` startup parameter (`-c name=value` / `--name=value`)."""
    settings: dict[str, str] = {}
    try:
        words = shlex.split(options.replace("\\ ", "\x00"))
    except ValueError as exc:
        raise ProtocolViolation(f"invalid options startup parameter: {exc}") from exc
    words = [w.replace("\x00", " ") for w in words]
    it = iter(words)
    for word in it:
        if word == "-c":
            word = next(it, "")
        elif word.startswith("-c") or word.startswith("--"):
            word = word[2:]
        else:
            raise ProtocolViolation(f"unsupported option {word!r} in the options startup parameter")
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ProtocolViolation(f"invalid option {word!r}: expected -c name=value")
        settings[name.replace("-", "_")] = value
    return settings


class ClientSession(asyncio.Protocol):
    def __init__(self, sidecar: SessionHost[ClientSession], admin: AdminFactory[ClientSession]) -> None:
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

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.sidecar.client_opened(self)
        self._handshake_task = asyncio.get_running_loop().create_task(self._handshake())

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == LINKED:
            server = self.server
            if self._gate.closed and self._between_transactions():
                self._unlink(GATED)
                self._hold(data)
                self._start(self._resume_after_gate())
                return
            if server is not None:
                if not self.transaction_mode:
                    if self._session_fast(server, data):
                        return
                elif self._between_answers(server) and self._attach_query(data):
                    return  # the next request of an open transaction, on its own server
            try:
                spans = self._relay.feed(data)
            except Exception as exc:  # (costs nothing unless raised)
                self._malformed(exc)
                return
            out = server.transport if server is not None else None
            if out is not None:
                for span in spans:
                    out.write(span)
            if self._relay.paused and self.state == LINKED:  # Terminate
                self._relay_stopped()
            return
        if state == OUTAGE:
            try:
                self._relay.feed(data)
            except Exception as exc:
                self._malformed(exc)
                return
            # Answered locally, each message as it is read; held (bounded) while the client
            # does not read its answers or a spool write is under way.
            if self._write_paused or self._relay.buffered > _HOLD_LIMIT:
                self._pause_reading()
            return
        if state == ABORTED:
            try:
                self._relay.feed(data)
            except Exception as exc:
                self._malformed(exc)
                return
            self._after_aborted()
            return
        if LINKED < state < ABORTED:  # IDLE, PARKED, HELD, GATED, MAINTAINING: held unless...
            idle = state in (IDLE, PARKED) and self._task is None
            if idle and self.transaction_mode and self._attach_query(data):
                return
            self._hold(data)
            return
        if state == CLOSED:
            return
        # The handshake, a login waiting for a server, the admin console: each reads whole
        # messages when it is ready for them. Past the bound, stop reading the socket until it is
        # (`_wait_input`): what the client sends meanwhile waits in its own socket buffers.
        reader = self._reader
        reader.feed(data)
        if reader.buffered > _HOLD_LIMIT:
            self._pause_reading()
        self._wake()

    def _session_fast(self, server: ServerConnection, data: bytes) -> bool:
        """Session mode's common requests: one read holding one whole Query, or a batch of
        unwatched messages ending in Sync (Bind, Execute of a prepared statement). Forwarded as
        they came in, then noted as `_inspect_session` would (nothing can answer before this
        returns), without the relay's spans. False (nothing done) for anything else."""
        if self._statement_effects:
            return False  # Bind must be looked at
        if data[0] == m.F_PARSE:
            # Parse of the unnamed statement with a plain text, then Bind... Sync: a driver's
            # parameterized query (psycopg, pgbench -M extended). Named ones are kept for moves.
            start = _unnamed_parse_end(data, self._max_message)
            kind = _plain_kind(data, 6) if start > 0 else -1
            if kind < 0 or self._relay.quiet_run(data, _SESSION_WATCH, start) != m.F_SYNC:
                return False
            kind = merge_kinds(self._batch_kind, kind)
            self._batch_kind = None
        else:
            last = self._relay.quiet_run(data, _SESSION_WATCH)
            if last == m.F_QUERY:
                if data[0] != m.F_QUERY:
                    return False  # unwatched messages, then a Query: the general path
                kind = -1
            elif last == m.F_SYNC:
                kind = REQUEST_OTHER if self._batch_kind is None else self._batch_kind
                self._batch_kind = None
            else:
                return False
        out = server.transport
        if out is not None:
            out.write(data)
        server.outstanding += 1  # one ReadyForQuery will answer it
        server.in_flight.push(self._note_statement(data, 5) if kind < 0 else kind)
        return True

    def _between_answers(self, server: ServerConnection) -> bool:
        """Transaction mode, linked: nothing in flight and the client's input at a clean boundary,
        so the next request may take the fast paths (on this server)."""
        tracker = server.tracker
        return not tracker and not tracker.skipping and not self._relay.paused and self._relay.at_boundary

    def _between_transactions(self) -> bool:
        """Session mode: nothing in flight and no transaction open, so new input starts a new one."""
        server = self.server
        return (
            server is not None
            and not self.transaction_mode
            and server.outstanding == 0
            and server.tx_status == m.TX_IDLE
            and not self._relay.mid_message
        )

    async def _resume_after_gate(self) -> None:
        await self.sidecar.pass_gate()
        if self.state == GATED and self.server is not None:  # (IDLE if the server was cut meanwhile)
            self._link(self.server)

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

    def _attach_query(self, data: bytes) -> bool:
        """Transaction mode's most common request: one whole, plain Query (no session state, one
        statement) arriving between transactions, sent at once to an idle server that already has
        the client's settings. What `_hold`, `_attach_now`, `_link` and the relay's inspection of
        a Query do, without the hold, the scan or the statement's closer look; False (nothing
        done) for anything else. Inside a transaction, with nothing in flight, the same requests
        go to its server this way (`_between_answers`)."""
        if data[0] == m.F_BIND:
            return self._attach_prepared(data)
        if data[0] == m.F_PARSE:
            # (Answering a Parse here says the transaction status is idle: not inside one.)
            return (self.state != LINKED and self._prepare_here(data)) or self._attach_parsed(data)
        if self._relay.whole(data) != m.F_QUERY:
            return False
        kind = _plain_kind(data, 5)
        if kind < 0:
            # The COMMIT that ends an open transaction: nothing to check or rewrite either.
            if self.state != LINKED or first_keyword(data, 5) not in _COMMITS or has_more_statements(data, 5):
                return False
            kind = REQUEST_COMMIT
        server = self._server_now()
        if server is None:
            return False
        router = self.router
        assert router is not None
        router.unnamed = None  # as `_transaction_query`: a simple Query replaces the unnamed statement
        server.unnamed_from = None
        self._send_fast(server, _QUERY_ANSWER, kind, data)
        return True

    def _attach_prepared(self, data: bytes) -> bool:
        """The other common request: Bind (unnamed portal) of a statement the client prepared,
        Describe of the portal or not, Execute (all rows), Sync, in one read, to an idle server
        that has the statement prepared. The Bind goes out renamed, as `StatementRouter.on_bind`
        makes it; False (nothing done) for anything else."""
        router = self.router
        assert router is not None
        n = len(data)
        if (
            n < 21
            or n > self._max_message
            or data[5] != 0
            or router.local
            or router.local_portals
            or self._batch_kind is not None
        ):
            return False  # a named portal, or statements the sidecar answers itself
        # libpq (psycopg, pgbench) sends Describe of the portal too: 7 bytes; Execute 10; Sync 5.
        # (Slices compared, not `endswith`/`find`: compiled, those are generic method calls that
        # cost more than the rest of this function; statement names are short.)
        described = data[n - 22 :] == _DESCRIBE_EXECUTE_SYNC
        bind_end = n - 22 if described else n - 15
        if (
            self._relay.buffered
            or length_at(data, 1) + 1 != bind_end
            or not (described or data[bind_end:] == _EXECUTE_SYNC)
        ):
            return False  # not exactly Bind, [Describe], Execute, Sync, all of the unnamed portal
        name_end = 6
        while name_end < bind_end and data[name_end] != 0:
            name_end += 1
        if name_end == 6 or name_end == bind_end:
            return False  # the unnamed statement: the general path carries it across servers
        stmt = router.statements.get(data[6:name_end].decode("utf-8", "replace"))
        if stmt is None:
            return False
        server = self._server_now(stmt.global_name)
        if server is None:
            return False
        server.statements.touch(stmt.global_name)
        # The Bind renamed as `rename_in` would, and what follows it, in one copy.
        name = stmt.global_name.encode()
        length = bind_end - 1 + len(name) - (name_end - 6)
        renamed = b"".join((b"B", length.to_bytes(4, "big"), b"\x00", name, data[name_end:]))
        expected = _BIND_DESCRIBE_EXECUTE if described else _BIND_EXECUTE
        self._send_fast(server, expected, REQUEST_OTHER, renamed)
        return True

    def _prepare_here(self, data: bytes) -> bool:
        """Parse of a named statement with its Sync, alone, between transactions (libpq's
        PQprepare: pgbench -M prepared, psycopg's prepare), when a server of the pool already has
        the same text and parameter types prepared: answered here, ParseComplete then
        ReadyForQuery, as `StatementRouter.on_parse` answers a known statement, but with no server
        at all. A client that prepares synchronously while its own other connections hold every
        server (pgbench, several clients per thread) would otherwise wait for one in vain. Errors
        the text could still raise come at its first Bind, on whichever server runs it."""
        router = self.router
        pool = self.pool
        assert router is not None
        n = len(data)
        if pool is None or n < 14 or n > self._max_message or data[5] == 0 or not data.endswith(_SYNC):
            return False
        if self._relay.buffered or self._batch_kind is not None or 1 + length_at(data, 1) != n - 5:
            return False
        sql_offset = data.find(b"\x00", 5, n - 5) + 1
        keyword = first_keyword(data, sql_offset)
        if keyword == b"deallocate" or needs_transaction_check(keyword, data, sql_offset):
            return False  # the general path notes it, refuses it or answers it itself
        try:
            parse = m.decode_parse(memoryview(data)[5 : n - 5])
        except ProtocolViolation:
            return False  # the general path says what is wrong with it
        global_name = router.registry.name_for(parse.query, parse.param_types)
        servers = itertools.chain(pool.idle, pool.parked, pool.active)
        if not any(global_name in server.statements for server in servers):
            return False
        router.local.pop(parse.name, None)
        router.statements[parse.name] = ClientStatement(
            global_name, parse_message(global_name, parse.query, parse.param_types)
        )
        self._send(m.message(b"1") + m.ready_for_query(m.TX_IDLE))
        return True

    def _attach_parsed(self, data: bytes) -> bool:
        """A driver's parameterized query (psycopg, pgbench -M extended): Parse of the unnamed
        statement with a plain text, Bind of it to the unnamed portal, Describe of the portal or
        not, Execute (all rows), Sync, in one read. Sent as it came in to an idle server, with
        what `StatementRouter.on_parse` and friends note for it; False (nothing done) else."""
        router = self.router
        assert router is not None
        if router.local or router.local_portals or self._batch_kind is not None or self._relay.buffered:
            return False
        parse_end = _unnamed_parse_end(data, self._max_message)
        if parse_end < 0:
            return False
        n = len(data)
        described = data[-22:] == _DESCRIBE_EXECUTE_SYNC
        bind_end = n - 22 if described else n - 15
        if (
            bind_end < parse_end + 7
            or data[parse_end] != m.F_BIND
            or parse_end + 1 + length_at(data, parse_end + 1) != bind_end
            or data[parse_end + 5 : parse_end + 7] != b"\x00\x00"  # unnamed portal and statement
            or not (described or data[-15:] == _EXECUTE_SYNC)
        ):
            return False
        kind = _plain_kind(data, 6)
        if kind < 0:
            return False
        server = self._server_now()
        if server is None:
            return False
        # Kept whole, as `on_parse` keeps it: a Bind in a later transaction, on another server,
        # re-prepares it there.
        router.unnamed = server.unnamed_from = data[:parse_end]
        expected = _BIND_DESCRIBE_EXECUTE if described else _BIND_EXECUTE
        self._send_fast(server, _PARSE + expected, kind, data)
        return True

    @staticmethod
    def _send_fast(server: ServerConnection, expected: tuple[Entry, ...], kind: int, data: bytes) -> None:
        """A fast path's request to the server `_server_now` gave: queue the answers it expects
        (the last at its Sync or Query) as `tracker.fast`, note it in flight, and send it."""
        server.tracker.expect_fast(expected)  # (nothing in flight, skipping nothing: checked)
        server.in_flight.push(kind)
        out = server.transport
        if out is not None:
            out.write(data)

    def _server_now(self, prepared: str | None = None) -> ServerConnection | None:
        """The server for a fast path's request, with the `prepared` statement if one is named, or
        None (nothing done: the general path). Inside a transaction: its own server. Between
        transactions, if the gate is open: the server kept from the last one, else an idle server
        that already has the client's settings, linked (`_attach_now` for the fast paths)."""
        if self.state == LINKED:  # inside a transaction: its own server (the caller checked it is free)
            linked = self.server
            if linked is None or (prepared is not None and prepared not in linked.statements):
                return None
            return linked
        pool = self.pool
        if pool is None or self._gate.closed:
            return None
        if self.state == PARKED:
            kept = self.server
            assert kept is not None
            if kept.tracker.skipping or (prepared is not None and prepared not in kept.statements):
                return None  # `_hold` runs it on this server through the general path
            if self._unpark() is not None:
                self._to(LINKED)
                self._relay.resume()  # (as below)
                return kept
        server = pool.take_idle_now()
        if server is None:
            return None
        if (
            server.applied != self.settings
            or server.tracker.skipping
            or (prepared is not None and prepared not in server.statements)
        ):
            pool.release(server, reset=False)  # the general path prepares it
            return None
        self.server = server
        self._to(LINKED)
        server.link(self, tracked=True)
        if server.params is not self.params_told:
            self.tell_parameters(server.params)
        self._relay.resume()  # nothing is held: this only ends the pause between transactions
        return server

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

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.state != CLOSED:
            reason = f"client connection lost: {exc}" if exc else "client disconnected"
            self._finish(reason)
        self._wake()

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading the server (bounded buffers).
        self._write_paused = True
        server = self.server
        if server is not None and server.transport is not None:
            server.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        server = self.server
        if server is not None and server.transport is not None:
            server.transport.resume_reading()
        if self.state == OUTAGE and self._task is None:
            self._answer_outage_input()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _pause_reading(self) -> None:
        """Stop reading the client: what it sends waits in its socket (a bounded buffer here)."""
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    async def drained(self) -> None:
        """Returns once the client is reading its answers (the transport's write buffer is under
        its high-water mark): a local answerer (the admin console) waits here before making more."""
        while self._write_paused and self.transport is not None:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None

    # ---------------------------------------------------------------- hot path

    def _inspect_session(self, type_byte: int, msg: memoryview) -> Action:
        if type_byte == m.F_TERMINATE:
            # The server connection outlives the client: never forward its Terminate.
            return Action.DROP_PAUSE
        server = self.server
        if type_byte == m.F_PARSE:
            offset = _parse_query_offset(msg)
            name = bytes(msg[5 : offset - 1]).decode("utf-8", "replace")
            if self._statement_effects:
                self._statement_effects.pop(name, None)
            kind = self._note_statement(msg, offset, name)
            if offset > 6:  # named: kept so the session can move to another server
                self._session_statements[name] = bytes(msg)
            self._batch_kind = merge_kinds(self._batch_kind, kind)
            return Action.FORWARD
        if type_byte == m.F_BIND:
            portal_end = bytes(msg[5:]).find(b"\x00")
            effects = self._statement_effects.get(_cstring(msg, 5 + portal_end + 1))
            if effects is not None:
                self._note_effects(effects)
            return Action.FORWARD
        if type_byte == m.F_CLOSE:
            if msg[5] == 0x53:  # 'S'
                self._session_statements.pop(_cstring(msg, 6), None)
            return Action.FORWARD
        if server is not None:
            server.outstanding += 1  # a Query or Sync: one ReadyForQuery will answer it
            if type_byte == m.F_QUERY:
                server.in_flight.push(self._note_statement(msg, 5))
            else:
                batch = self._batch_kind
                server.in_flight.push(REQUEST_OTHER if batch is None else batch)
                self._batch_kind = None
        return Action.FORWARD

    def _note_statement(self, msg: bytes | memoryview, sql_offset: int, parsed_as: str | None = None) -> int:
        """Note what a statement does to session state; returns its REQUEST_* kind. `parsed_as`:
        the name it is being prepared under (Parse), so settings it changes count when it runs.

        Cheap for ordinary statements: one byte decides most, a C regex the rest; pglast only
        parses the few that can change settings or pin the session.
        """
        if not session_keyword_at(msg, sql_offset):
            return REQUEST_OTHER
        if lone_select(msg, sql_offset):
            return REQUEST_READ
        keyword = first_keyword(msg, sql_offset)
        if keyword in _COMMITS:
            return REQUEST_COMMIT
        if keyword == b"select" and not mentions_session_functions(msg, sql_offset):
            return _read_kind(msg, sql_offset)
        effects = classify(_cstring(msg, sql_offset))
        if parsed_as is not None and (effects.changes_settings or effects.discard_all):
            self._statement_effects[parsed_as] = effects
            self._relay.set_inspector(self._inspect_session, _SESSION_WATCH_BIND)
        else:
            self._note_effects(effects)
        if effects.deallocate is Deallocate.ALL or effects.discard_all:
            self._session_statements.clear()
        elif effects.deallocate is Deallocate.ONE and effects.deallocate_name:
            self._session_statements.pop(effects.deallocate_name, None)
        if effects.discard_all:
            self._unmovable = None
        elif effects.not_poolable and self._unmovable is None:
            self._unmovable = effects.not_poolable.split(" (")[0]
        return REQUEST_OTHER

    def _note_effects(self, effects: Effects) -> None:
        if not (effects.changes_settings or effects.discard_all):
            return
        self.wants_ready = True
        self._settings_dirty |= effects.changes_settings
        if effects.custom_names:
            self._custom_names |= effects.custom_names
        self._reset_all |= effects.reset_all
        self._reset_names |= effects.reset_names
        self._discarded |= effects.discard_all

    def _inspect_transaction(self, type_byte: int, msg: memoryview) -> Action:
        server = self.server
        router = self.router
        assert server is not None and router is not None
        tracker = server.tracker
        if type_byte == m.F_SYNC:
            tracker.sync_sent()
            tracker.expect(Expect.SYNC)
            kind = self._batch_kind
            server.in_flight.push(REQUEST_OTHER if kind is None else kind)
            self._batch_kind = None
            return Action.FORWARD
        if type_byte == m.F_TERMINATE:
            return Action.DROP_PAUSE
        if tracker.skipping and type_byte != m.F_QUERY:
            return Action.FORWARD  # ignored by the server until Sync; no answer to expect
        if type_byte == m.F_BIND:
            action, owed = router.on_bind(msg, server, self._relay)
            self._owe(owed)
            return action
        if type_byte == m.F_EXECUTE:
            action, owed = router.on_execute(msg, server)
            self._owe(owed)
            return action
        if type_byte == m.F_PARSE:
            offset = _parse_query_offset(msg)
            keyword = first_keyword(msg, offset)
            self._batch_kind = merge_kinds(self._batch_kind, _request_kind(keyword, msg, offset))
            refused = self._check_poolable(msg, offset, keyword)
            if refused is not None:
                # Let the server itself fail where this Parse would have answered: an unnamed
                # statement that raises, run at once (its ParseComplete and BindComplete hidden).
                # The transaction aborts as PostgreSQL would make it, and the server skips the
                # client's own Bind/Execute until Sync.
                self._relay.insert(
                    parse_message("", _raise_sql(refused), ())
                    + m.message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
                    + m.message(b"E", b"\x00\x00\x00\x00\x00")
                )
                tracker.expect(Expect.PARSE_HIDDEN)
                tracker.expect(Expect.BIND_HIDDEN)
                tracker.expect(Expect.EXECUTE)
                return Action.DROP
            local = self._local_statement(msg, offset, server)
            action, owed = router.on_parse(msg, server, self._relay, local)
            self._owe(owed)
            return action
        if type_byte == m.F_DESCRIBE:
            action, owed = router.on_describe(msg, server, self._relay)
            self._owe(owed)
            return action
        if type_byte == m.F_CLOSE:
            action, owed = router.on_close(msg, server)
            self._owe(owed)
            return action
        if type_byte == m.F_QUERY:
            keyword = first_keyword(msg, 5)
            server.in_flight.push(_request_kind(keyword, msg, 5))
            return self._transaction_query(msg, server, keyword)
        if type_byte == m.F_FUNCTION_CALL:
            server.in_flight.push(REQUEST_OTHER)
            tracker.expect(Expect.QUERY)
        return Action.FORWARD  # Flush

    def _transaction_query(self, msg: memoryview, server: ServerConnection, keyword: bytes) -> Action:
        tracker = server.tracker
        refused = self._check_poolable(msg, 5, keyword)
        if refused is not None:
            # Let the server raise it, so the transaction state is exactly what PostgreSQL makes it.
            self._relay.insert(m.query(_raise_sql(refused)))
            tracker.expect(Expect.QUERY)
            return Action.DROP
        router = self.router
        assert router is not None
        # A simple Query replaces the session's unnamed statement.
        router.unnamed = None
        server.unnamed_from = None
        local = self._local_statement(msg, 5, server)
        if local is not None:
            # Answered here, but the server still answers a Sync in its place: its ReadyForQuery
            # carries the true transaction status and ends the transaction for the pool.
            self._owe(
                tracker.expect(Expect.SYNTHETIC, data=router.run_local(local), tx_status=server.tx_status)
            )
            self._relay.insert(m.sync())
            tracker.expect(Expect.SYNC)
            return Action.DROP
        # DISCARD ALL succeeds only outside a transaction block; there it drops the client's
        # statement names too (the server's shared statements are re-read at the quiet point).
        discards = first_keyword(msg, 5) == b"discard" and server.tx_status == m.TX_IDLE
        if discards and classify(_cstring(msg, 5)).discard_all:
            router.deallocate(None)
        tracker.expect(Expect.QUERY)
        return Action.FORWARD

    def _local_statement(
        self, msg: memoryview, offset: int, server: ServerConnection
    ) -> LocalStatement | None:
        """DEALLOCATE of names this client prepared: answered by the sidecar (the statements are
        shared on the servers under other names). An unknown name, or a failed transaction, goes
        to the server, which answers exactly as PostgreSQL does (26000, 25P02)."""
        router = self.router
        if router is None or first_keyword(msg, offset) != b"deallocate" or server.tx_status == m.TX_FAILED:
            return None
        effects = classify(_cstring(msg, offset))
        if not effects.single_statement or effects.deallocate is Deallocate.NONE:
            return None
        if effects.deallocate is Deallocate.ALL:
            return LocalStatement("DEALLOCATE ALL", None)
        name = effects.deallocate_name
        if name is None or name not in router.statements:
            return None
        return LocalStatement("DEALLOCATE", name)

    def _check_poolable(self, msg: memoryview, sql_offset: int, keyword: bytes) -> str | None:
        """Why this statement cannot run under transaction pooling, or None; also notes settings.
        `keyword`: the statement's first keyword, already read by the caller."""
        if not needs_transaction_check(keyword, msg, sql_offset):
            return None
        effects = classify(_cstring(msg, sql_offset))
        self._note_effects(effects)
        if effects.not_poolable is None:
            return None
        return f"not supported with pool.mode transaction: {effects.not_poolable}"

    def _owe(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

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
        maintenance = self._settings_dirty or self._reset_all or bool(self._reset_names) or self._discarded
        return maintenance or self.transaction_mode

    def quiet_point(self) -> None:
        """The server finished everything asked of it: maintain, and in transaction mode release it."""
        server = self.server
        if server is None:
            return
        maintenance = self._settings_dirty or self._reset_all or bool(self._reset_names) or self._discarded
        pool = self.pool
        parks = not maintenance and self.transaction_mode
        if parks and pool is not None and server.keep_linked() and pool.park(server, self):
            # Nobody waits for a server: keep this one for the next transaction, which then
            # starts without a checkout. Still linked, so whatever the server says meanwhile
            # (a FATAL goodbye) reaches this session.
            self._to(PARKED)
            self._relay.hold()
            if self._relay.buffered:
                self._serve_held()  # input that came with the last answer: the next transaction
            return
        if maintenance:
            self._unlink(MAINTAINING)
            self._start(self._maintain(server))
        else:
            self._unlink(IDLE)
            self._release_transaction_server()

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

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        """The linked server connection closed (crash, shutdown, network)."""
        self._server_gone(server, reason)

    def cut_server(self, reason: str) -> None:
        """The sidecar stopped trusting this session's server (the writer was lost or changed)."""
        if self.server is not None:
            self._server_gone(self.server, reason)

    def _server_gone(self, server: ServerConnection, reason: str) -> None:
        """Carry the session over the loss of its server (DESIGN §1, in-flight transactions).

        Between transactions: nothing to tell; the next transaction runs on the new writer with
        the session's settings and prepared statements. Mid-transaction: 40001 (08007 for a
        COMMIT whose answer never came), and the cut transaction is answered locally as aborted
        until the client rolls back. The client connection stays usable either way, unless half
        a message already went out, or the session holds state that cannot move.
        """
        if server is not self.server:
            return
        in_flight = len(server.in_flight)
        kinds = server.in_flight.kinds()
        in_block = server.tx_status in (m.TX_IN_BLOCK, m.TX_FAILED)
        broken = server.mid_response
        self.server = None
        active = self._active()
        if active and self.state != IDLE:
            self._to(IDLE)
        self._relay.hold()
        server.unlink()
        if self.pool is not None:
            self.pool.forget(server)
        server.close(reason)
        self.sidecar.topology.report_failure(server.endpoint, reason)
        logs.event(
            "session_cut",
            logs.WARNING,
            conn=self.id,
            server=server.id,
            upstream=str(server.endpoint),
            in_flight=in_flight,
            in_transaction=in_block,
            reason=reason,
        )
        if not active:
            return  # a login's first server (the login fails on it), or the session is closing
        if broken:
            self.fail(
                UpstreamUnavailable(f"lost upstream {server.endpoint} in the middle of a response: {reason}")
            )
            return
        if self._unmovable is not None and not self.transaction_mode:
            self.fail(
                UpstreamUnavailable(
                    f"the database failed over and this session holds state that cannot move to the "
                    f"new writer ({self._unmovable}); reconnect"
                )
            )
            return
        if in_flight == 0 and not in_block:
            if self._relay.buffered and self._task is None:
                self._attach_soon()
            return
        owed = b""
        status = m.TX_FAILED if in_block else m.TX_IDLE
        first = True
        errors = self.sidecar.stats.client_errors
        for index in range(in_flight):
            kind = kinds[index] if index < len(kinds) else REQUEST_OTHER
            if kind == REQUEST_COMMIT or (not in_block and kind != REQUEST_READ):
                errors[SqlState.TRANSACTION_RESOLUTION_UNKNOWN.value] += 1
            else:
                errors[SqlState.SERIALIZATION_FAILURE.value if first else "25P02"] += 1
            if kind == REQUEST_COMMIT:
                owed += m.error_response(
                    SqlState.TRANSACTION_RESOLUTION_UNKNOWN.value,
                    "the database failed over while COMMIT was in flight: the transaction may or may "
                    "not have committed",
                    hint="Check whether its effects are present before retrying.",
                ) + m.ready_for_query(m.TX_IDLE)
                status = m.TX_IDLE
            elif not in_block and kind != REQUEST_READ:
                # Sent outside a transaction block: an autocommit statement commits on its own,
                # so it may have been applied just before the crash. 40001 would invite a retry
                # that duplicates it; say the outcome is unknown instead. (A SELECT is taken to
                # be a read and gets 40001: retrying it is safe.)
                owed += m.error_response(
                    SqlState.TRANSACTION_RESOLUTION_UNKNOWN.value,
                    "the database failed over while this statement was running outside a "
                    "transaction block: it may or may not have been applied",
                    hint="Check whether its effects are present before retrying.",
                ) + m.ready_for_query(m.TX_IDLE)
            else:
                owed += failover_error(first) + m.ready_for_query(status)
                first = False
        self._send(owed)
        if status == m.TX_FAILED:
            self._answer_aborted(first_error_sent=in_flight > 0)
        elif self._relay.buffered and self._task is None and self.state == IDLE:
            self._attach_soon()

    def _answer_aborted(self, first_error_sent: bool) -> None:
        """Answer the client locally until it ends the transaction the failover cut."""
        # Statements prepared before the cut still exist for the client (a driver may have
        # prepared its ROLLBACK long ago), as they would in PostgreSQL after an error.
        self._aborted = AbortedTransaction(first_error_sent, self._known_statements())
        self._to(ABORTED)
        try:
            self._relay.resume()  # everything held is answered (dropped) by _inspect_aborted
        except Exception as exc:
            self._malformed(exc)
            return
        self._after_aborted()

    def _inspect_aborted(self, type_byte: int, msg: memoryview) -> Action:
        aborted = self._aborted
        if type_byte == m.F_TERMINATE or aborted is None:
            return Action.DROP_PAUSE
        self._send(aborted.on_message(type_byte, msg))
        if not aborted.done:
            return Action.DROP
        # The rest of an extended-protocol batch after its ROLLBACK is the server's to answer.
        return Action.HOLD if aborted.hand_back_message else Action.DROP_PAUSE

    def _after_aborted(self) -> None:
        aborted = self._aborted
        if aborted is None or not self._relay.paused:
            return
        if not aborted.done:  # Terminate
            self.close("client sent Terminate")
            return
        self._aborted = None
        self._adopt_aborted_statements(aborted)
        self._to(IDLE)
        if aborted.handback is not None:
            # What followed the ROLLBACK in the client's query string runs on the server, answered
            # as part of the same request (ROLLBACK; DEALLOCATE ALL: two results, one ReadyForQuery).
            self._relay.unread(aborted.handback)
        logs.event("aborted_transaction_ended", conn=self.id)
        if self._relay.buffered and self._task is None:
            self._attach_soon()

    def _adopt_aborted_statements(self, aborted: AbortedTransaction) -> None:
        """Named statements the client prepared or closed while its transaction was answered
        here: PostgreSQL keeps both past the end of the block, so the session does too."""
        router = self.router
        for name in aborted.closed:
            if router is None:
                self._session_statements.pop(name, None)
            else:
                router.statements.pop(name, None)
                router.local.pop(name, None)
        for name, parse in aborted.parsed.items():
            if router is None:
                self._session_statements[name] = parse
                continue
            decoded = m.decode_parse(parse[5:])
            global_name = self.sidecar.statements.name_for(decoded.query, decoded.param_types)
            router.local.pop(name, None)
            router.statements[name] = ClientStatement(
                global_name, parse_message(global_name, decoded.query, decoded.param_types)
            )

    # ---------------------------------------------------------------- server changes

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
        self.wants_ready = self.transaction_mode
        if self.state == MAINTAINING:
            self._to(IDLE)
        if self.server is server:
            self.server = None
        if self.pool is not None:
            self.pool.release(server, reset=False)
        # Input that came meanwhile gets a new server from _task_done once this task ends.
        self.sidecar.topology.report_failure(server.endpoint, reason)

    async def _maintain_on(self, server: ServerConnection) -> None:
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
        self.wants_ready = self.transaction_mode
        if self.state != MAINTAINING:
            return  # closed meanwhile
        if self.transaction_mode:
            self._to(IDLE)
            self._release_transaction_server()
        else:
            self._link(server)

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
            try:
                await self._prepare_server(server)
            except asyncio.CancelledError:
                # The client left while its settings or statements were being restored: the
                # server goes back, the pool reading past the answers given up.
                pool.release(server, reset=not self.transaction_mode, unknown=True)
                raise
            except UpstreamUnavailable as exc:
                # The server died between checkout and use (a crash the probes have not seen
                # yet): nothing of the client's went to it, so take another one (held if the
                # writer is gone) instead of failing the client.
                pool.release(server, reset=False)
                if server.state is not ServerState.CLOSED or attempt == _WRITER_CHANGES_PER_REQUEST - 1:
                    raise
                self.sidecar.topology.report_failure(server.endpoint, exc.message)
                continue
            except ProxyError:
                pool.release(server, reset=not self.transaction_mode)
                raise
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

    # ---------------------------------------------------------------- handshake

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _wait_input(self) -> None:
        if self._eof or self.transport is None:
            raise ConnectionResetError("client disconnected during login")
        self._resume_reading()  # no whole message is left: read on (the message is bounded)
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def _read_startup(self) -> m.StartupPacket:
        while True:
            body = self._reader.read_startup()
            if body is not None:
                return m.decode_startup(body)
            await self._wait_input()

    async def _read_message(self) -> tuple[int, bytes]:
        while True:
            msg = self._reader.read_message()
            if msg is not None:
                return msg
            await self._wait_input()

    def _send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def _handshake(self) -> None:
        # A timer, not asyncio.timeout(): that context manager runs as interpreted coroutines,
        # about 25k instructions per login, which connect-per-transaction clients pay every time.
        # On expiry the client is failed and closed, which cancels this task.
        deadline = asyncio.get_running_loop().call_later(
            self.sidecar.config.limits.client_login_timeout, self._login_timed_out
        )
        try:
            try:
                startup = await self._negotiate()
                if startup is None:
                    return
                await self._authenticate(startup)
                self._reader.authenticated()
            finally:
                deadline.cancel()
            await self._attach_server()
        except ProxyError as exc:
            self.fail(exc)
        except ConnectionResetError as exc:
            self.close(str(exc))
        except Exception as exc:  # a bug here must cost one client, not the sidecar
            logs.event("client_internal_error", logs.ERROR, conn=self.id, error=repr(exc))
            self.fail(ProxyError(f"internal error in pgsidecar: {exc!r}"))

    def _login_timed_out(self) -> None:
        self.fail(
            ProtocolViolation(
                "client did not complete startup and authentication within "
                f"limits.client_login_timeout ({self.sidecar.config.limits.client_login_timeout:g}s)"
            )
        )

    async def _negotiate(self) -> m.StartupPacket | None:
        """Read startup packets until a StartupMessage; None when the connection was a cancel."""
        ssl_done = gss_done = False
        while True:
            startup = await self._read_startup()
            # Each encryption request is answered once, as PostgreSQL does (a GSSENCRequest only
            # until SSL is on); another one is a protocol version no server speaks.
            if startup.code == m.SSL_REQUEST_CODE and not ssl_done:
                ssl_done = True
                gss_done = await self._answer_ssl_request() or gss_done
                continue
            if startup.code == m.GSSENC_REQUEST_CODE and not gss_done:
                gss_done = True
                self._send(b"N")
                continue
            if startup.code in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE):
                raise FeatureNotSupported(
                    f"unsupported frontend protocol {startup.major}.{startup.minor}: "
                    "server supports 3.0 to 3.0"
                )
            if startup.code == m.CANCEL_REQUEST_CODE:
                assert startup.cancel_key is not None
                await self.sidecar.forward_cancel(startup.cancel_key, self.id)
                self.close("cancel request handled")
                return None
            if startup.major != 3:
                raise ProtocolViolation(
                    f"unsupported frontend protocol {startup.major}.{startup.minor}: "
                    "pgsidecar speaks protocol 3.0"
                )
            unsupported = sorted(k for k in startup.params if k.startswith("_pq_."))
            if startup.minor > 0 or unsupported:
                # Newer minor versions and protocol extensions are declined; the client continues
                # with 3.0 (libpq >= 17 and others handle this message).
                self._send(m.negotiate_protocol_version(0, unsupported))
            return startup

    async def _answer_ssl_request(self) -> bool:
        """Answer an SSLRequest; True if the connection is now encrypted."""
        ctx = self.sidecar.client_ssl_context
        if ctx is None or self.transport is None:
            self._send(b"N")
            return False
        if self._reader.take_rest():
            # Bytes after SSLRequest but before the handshake would be unencrypted injection.
            raise ProtocolViolation("received unencrypted data after SSLRequest")
        self._send(b"S")
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, ctx, server_side=True)
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        return True

    async def _authenticate(self, startup: m.StartupPacket) -> None:
        params = startup.params
        self.user = params.get("user", "")
        if not self.user:
            raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
        self.database = params.get("database") or self.user
        self.startup_params = {
            k: v for k, v in params.items() if k not in ("user", "database") and not k.startswith("_pq_.")
        }
        logs.event(
            "client_login",
            conn=self.id,
            peer=self.peer,
            user=self.user,
            database=self.database,
            application_name=params.get("application_name"),
        )
        self.sidecar.admit(self)
        self._counted = True
        auth_cfg = self.sidecar.config.auth
        user_cfg = auth_cfg.user(self.user)
        mock = None
        if user_cfg is None and auth_cfg.method in ("md5", "scram-sha-256"):
            # Not configured: a password exchange all the same, failing as a wrong password does.
            mock = self.sidecar.mock_salt(self.user)
        elif user_cfg is None and auth_cfg.users and auth_cfg.method != "passthrough":
            raise UnknownUser(f'role "{self.user}" is not configured in pgsidecar (auth.users)')
        secret = user_cfg.password.get_secret_value() if user_cfg and user_cfg.password else None
        authenticator = ClientAuthenticator(
            auth_cfg.method, self.user, secret, self.sidecar.scram_verifier(self.user, secret), mock
        )
        first = authenticator.start()
        if first:
            self._send(first)
        while not authenticator.done:
            type_byte, body = await self._read_message()
            reply = authenticator.step(type_byte, body)
            if reply is not None:
                self._send(reply)
        self._password = authenticator.password if auth_cfg.method == "passthrough" else None

    async def _attach_server(self) -> None:
        if self.database == ADMIN_DATABASE:
            # Served by the sidecar itself: no pool, no upstream, and not held by the gate (an
            # operator must be able to RESUME a paused sidecar).
            console = self._admin(self, self._read_message, self._send)
            await console.login(self._password)
            self._to(ADMIN)
            self.sidecar.stats.clients_accepted += 1
            self.close(await console.serve(self._register_backend_key()))
            return
        self._to(CONNECTING)
        pool = self.sidecar.pool_for(self.user, self.database)
        self.pool = pool
        passthrough = self.sidecar.config.auth.method == "passthrough"
        if passthrough and not self.sidecar.passthrough_known(self.user, self._password):
            await self._verify_upstream_password()
        try:
            server = await self._acquire(pool)
        except SpoolNow:
            self._degraded_login()
            return
        if self.state == CLOSED:  # the client gave up while we waited
            pool.release(server, reset=not self.transaction_mode)
            return
        self.server = server
        try:
            await self._apply_startup_settings(server)
        except ProxyError:
            self.server = None
            pool.release(server, reset=not self.transaction_mode)
            raise
        if passthrough:
            self.sidecar.passthrough_verified(self.user, self._password)
        if self.sidecar.spooling is not None:
            self.sidecar.spooling.note_login(self.user, self.database, self._password)
        first_backend = server.backend_key
        own_pid = first_backend[0] if first_backend is not None and not self.transaction_mode else None
        self._logged_in(server.params, own_pid)
        logs.event(
            "client_ready",
            conn=self.id,
            server=server.id,
            upstream=str(server.endpoint),
            mode=self.sidecar.config.pool.mode,
            ms=round((monotonic() - self.connected_at) * 1000, 1),
        )
        if self.transaction_mode:
            # The server only served the login; each transaction gets one from the pool.
            self.server = None
            pool.release(server, reset=False)
            self._relay.hold()
        else:
            self._link(server)
        self._hand_over_input()

    def _hand_over_input(self) -> None:
        """Logged in: what the client sent past the handshake goes the way of any later input,
        and reading (paused at the handshake's bound) goes on under that path's bounds."""
        rest = self._reader.take_rest()
        if rest:
            self.data_received(rest)
        if self.state == OUTAGE:
            if self._task is None:  # (else the spool write under way answers the rest)
                self._answer_outage_input()
        elif self._active() and self._relay.buffered <= _HOLD_LIMIT:
            self._resume_reading()

    # ---------------------------------------------------------------- full outage (spool)

    def _degraded_login(self) -> None:
        """No writer anywhere: finish the login from the front-door cache (what a server of this
        user and database reported the last time one was up), then serve from the spool."""
        spooling = self.sidecar.spooling
        assert spooling is not None
        params = spooling.frontdoor.startup_parameters(self.user, self.database, self.startup_params)
        if params is None:
            raise CannotConnectNow(
                f'no writable database, and user "{self.user}" database "{self.database}" was never '
                "seen while one was up, so pgsidecar cannot stand in for it: "
                f"{self.sidecar.topology.problem}"
            )
        self._take_startup_settings()
        self._logged_in(params)
        logs.event("client_ready", conn=self.id, upstream=None, mode="outage (spooling)")
        self._relay.hold()
        self._enter_outage()
        self._hand_over_input()

    def _enter_outage(self) -> None:
        """Serve this session with an OutageResponder until a writer is back."""
        spooling = self.sidecar.spooling
        assert spooling is not None
        responder = spooling.responder(self.user, self.database, {**self.startup_params, **self.settings})
        # The session's prepared statements stay usable: the responder learns them first.
        for parse in self._known_statements().values():
            responder.feed(m.F_PARSE, parse[5:])
        self._outage = responder
        self._outage_batch = False
        logs.event("session_spooling", conn=self.id)
        self._to(OUTAGE)
        self._relay.resume()

    def _known_statements(self) -> dict[str, bytes]:
        """The client's named statements as Parse messages under the client's own names."""
        if self.router is None:
            return dict(self._session_statements)
        known = {}
        for name, stmt in self.router.statements.items():
            parse = m.decode_parse(stmt.parse_message[5:])
            known[name] = parse_message(name, parse.query, parse.param_types)
        return known

    def _inspect_outage(self, type_byte: int, msg: memoryview) -> Action:
        responder = self._outage
        if responder is None:
            return Action.HOLD
        if type_byte == m.F_TERMINATE:
            self.close("client sent Terminate")
            return Action.DROP_PAUSE
        if self._write_paused:
            # The client is not reading its answers: answer no more until it does
            # (`resume_writing`), and read no more meanwhile.
            self._pause_reading()
            return Action.HOLD
        if (
            not self._outage_batch
            and not responder.in_transaction
            and self.sidecar.topology.writer is not None
        ):
            # A writer is back and this starts a new transaction: leave the spool behind.
            self._leave_outage()
            return Action.HOLD
        # Nothing of a transaction has been answered locally yet: if this request needs the
        # database and a writer comes back within the hold, it can simply run there.
        fresh = not self._outage_batch and not responder.in_transaction and not responder.pending
        if type_byte == m.F_SYNC:
            self._outage_batch = False
        elif type_byte != m.F_QUERY:
            self._outage_batch = True
        try:
            reply = responder.feed(type_byte, bytes(msg[5:]))
        except ProtocolViolation as exc:
            self.fail(exc)
            return Action.DROP_PAUSE
        self._send(reply.data)
        if reply.verdict is None:
            return Action.DROP
        handback = None
        if (
            isinstance(reply.verdict, Unspoolable)
            and fresh
            and not reply.data
            and (type_byte == m.F_QUERY or (type_byte == m.F_PARSE and msg[5] == 0))  # unnamed
        ):
            handback = bytes(msg)
        self._start(self._act_on_verdict(responder, reply.verdict, handback))
        return Action.DROP_PAUSE

    async def _act_on_verdict(
        self, responder: OutageResponder, verdict: Store | Unspoolable | None, handback: bytes | None = None
    ) -> None:
        spooling = self.sidecar.spooling
        assert spooling is not None
        while verdict is not None:
            if isinstance(verdict, Store):
                try:
                    await spooling.append(verdict.record)
                except SpoolError as exc:
                    logs.event("spool_append_failed", logs.ERROR, conn=self.id, error=str(exc))
                    self._send(responder.store_failed(str(exc)))
                    break
                reply = responder.stored()
                self._send(reply.data)
                verdict = reply.verdict
            else:
                # Needs the database: held like any request while no writer exists, then refused
                # (what was spooled of the transaction so far is discarded, never stored).
                hold = self.sidecar.config.failover.hold_timeout
                writer = None
                with contextlib.suppress(UpstreamUnavailable):  # no writer within the hold
                    writer = await self.sidecar.topology.wait_for_writer(hold)
                if (
                    writer is not None
                    and handback is not None
                    and self.state == OUTAGE
                    and self._outage is responder
                    and not spooling.spooling
                ):
                    # The writer is back within the hold and nothing of this transaction was
                    # answered locally: it runs there, like any request held by a failover.
                    logs.event("spooling_request_handed_back", conn=self.id, writer=str(writer))
                    self._relay.unread(handback)
                    self._outage_batch = False
                    self._leave_outage()
                    return
                self.sidecar.stats.client_errors[SqlState.CANNOT_CONNECT_NOW.value] += 1
                self._send(responder.refuse(verdict.reason))
                break
        if self.state == OUTAGE and self._outage is responder:
            self._answer_outage_input()

    def _answer_outage_input(self) -> None:
        """Answer what the client sent while the responder waited (a spool write, a client not
        reading its answers), then read on if nothing more is held."""
        if not self._active():
            return
        if self._relay.paused:
            try:
                self._relay.resume()
            except Exception as exc:
                self._malformed(exc)
                return
        if self.state == OUTAGE and not self._relay.paused and not self._write_paused:
            self._resume_reading()

    def _restore_inspector(self) -> None:
        """Back to forwarding after answering locally (aborted transaction, outage)."""
        self._relay.set_inspector(
            self._inspect_transaction if self.transaction_mode else self._inspect_session,
            _TRANSACTION_WATCH
            if self.transaction_mode
            else (_SESSION_WATCH_BIND if self._statement_effects else _SESSION_WATCH),
        )

    def _leave_outage(self) -> None:
        responder = self._outage
        self._outage = None
        if responder is not None:
            self._adopt_statements(responder)
        self._to(IDLE)
        logs.event("session_spooling_ended", conn=self.id)
        # HOLD left the relay paused with the message in hand: get a server for it.
        asyncio.get_running_loop().call_soon(self._after_outage)

    def _after_outage(self) -> None:
        if self._needs_server():
            self._attach_soon()

    def _adopt_statements(self, responder: OutageResponder) -> None:
        """Statements the client prepared during the outage exist on no server: learn them so
        they are prepared wherever the session's next transaction runs."""
        for name, sql, types in responder.named_statements():
            if self.router is None:
                self._session_statements[name] = parse_message(name, sql, types)
            elif name not in self.router.statements:
                global_name = self.sidecar.statements.name_for(sql, types)
                self.router.statements[name] = ClientStatement(
                    global_name, parse_message(global_name, sql, types)
                )

    async def _verify_upstream_password(self) -> None:
        """Passthrough: the password is right exactly when PostgreSQL accepts it."""
        writer = await self.sidecar.topology.wait_for_writer(self.sidecar.config.upstream.connect_timeout)
        params = {"user": self.user, "database": self.database, "application_name": "pgsidecar-auth"}
        probe = await self.sidecar.open_server(writer, params, self._password)
        probe.close("passthrough password verified")

    def _take_startup_settings(self) -> None:
        """The client's startup parameters (and `options`) are its session's settings."""
        wanted = {k: v for k, v in self.startup_params.items() if k not in _NOT_SETTABLE}
        if "options" in self.startup_params:
            wanted.update(parse_options(self.startup_params["options"]))
        self.startup_settings = lower_keys(wanted)
        self.settings = dict(self.startup_settings)

    def _logged_in(self, params: dict[str, str], pid: int | None = None) -> None:
        """Tell the client it is in: AuthenticationOk, the server's parameters, our key, ready.
        `pid`: the process id to hand out (session mode: its first server's)."""
        self._send(
            m.frames(
                [
                    m.auth_ok(),
                    *(m.parameter_status(k, v) for k, v in params.items()),
                    self._register_backend_key(pid),
                    m.ready_for_query(m.TX_IDLE),
                ]
            )
        )
        self.params_told = params
        self._to(IDLE)  # then LINKED (session mode), OUTAGE (a login during an outage) or IDLE
        self.sidecar.stats.clients_accepted += 1

    async def _apply_startup_settings(self, server: ServerConnection) -> None:
        """Make the pooled server match the client's startup parameters, in one round trip."""
        self._take_startup_settings()
        sql = sync_sql(self.settings, server.applied)
        if sql is not None:
            await server.simple_query(sql)
        server.applied = dict(self.settings)

    def _register_backend_key(self, pid: int | None = None) -> bytes:
        """The BackendKeyData for this session, registered for CancelRequests under its secret.
        `pid`: the process id to show (None: a made-up one that names no real process)."""
        keys = self.sidecar.cancel_keys
        while True:
            # One read of the system CSPRNG (what `secrets` draws on) for both halves, where two
            # secrets.randbits calls cost two trips through random.SystemRandom's Python code.
            drawn, secret = _KEY_PARTS.unpack(urandom(8))
            if secret not in keys:
                break
        if pid is None:
            pid = _MADE_UP_PIDS + (drawn & 0x7FFFFFFF) % ((1 << 31) - _MADE_UP_PIDS)
        self.backend_key = (pid, secret)
        keys[secret] = self
        return m.backend_key_data(pid, secret)

    # ---------------------------------------------------------------- closing

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
        server, self.server = self.server, None
        if server is not None and self.pool is not None:
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


def _parse_query_offset(msg: memoryview) -> int:
    """Where the query text starts in a Parse message (after the statement name)."""
    end = bytes(msg[5:]).find(b"\x00")
    if end < 0:
        raise ProtocolViolation("malformed Parse message: unterminated statement name")
    return 5 + end + 1


_COMMITS: Final = (b"commit", b"end")


def _request_kind(keyword: bytes, msg: memoryview, offset: int) -> int:
    if keyword in _COMMITS:
        return REQUEST_COMMIT
    return _read_kind(msg, offset) if keyword == b"select" else REQUEST_OTHER


def _plain_kind(data: bytes, sql_offset: int) -> int:
    """The REQUEST_* kind of the query text at `sql_offset` (of a Query, or the unnamed Parse that
    starts `data`) when it is one statement that leaves session state alone and is not a COMMIT
    (nothing to note, check or rewrite), else -1. What follows the text may be scanned too, which
    can only make the answer -1."""
    if lone_select(data, sql_offset):
        return REQUEST_READ
    if (
        session_keyword_at(data, sql_offset)
        or mentions_session_functions(data, sql_offset)
        or has_more_statements(data, sql_offset)
    ):
        return -1
    return REQUEST_OTHER


def _unnamed_parse_end(data: bytes, max_message: int) -> int:
    """Where the Parse of the unnamed statement that starts `data` ends (more follows), else -1."""
    if len(data) < 7 or data[5] != 0:
        return -1
    length = length_at(data, 1)
    if length < 4 or length > max_message or length + 1 >= len(data):
        return -1
    return length + 1


def _read_kind(msg: bytes | memoryview, offset: int) -> int:
    """REQUEST_READ for a lone SELECT; a query string with more statements
    (`SELECT ...; CLOSE ALL; ...`) may write."""
    return REQUEST_OTHER if has_more_statements(msg, offset) else REQUEST_READ


def _cstring(msg: bytes | memoryview, offset: int) -> str:
    raw = bytes(msg[offset:])
    end = raw.find(b"\x00")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "replace")


def _raise_sql(reason: str) -> str:
    # Raised by the server itself so that the transaction is aborted exactly as PostgreSQL would.
    text = reason.replace("$", "")
    return (
        "DO $pgsidecar$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', "
        f"MESSAGE = {m.quote_literal(text)}; END$pgsidecar$"
    )
