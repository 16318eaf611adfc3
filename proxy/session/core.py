"""The state every part of a client session shares, and the steps on it that every part takes.

`SessionCore` holds the session's fields (who the client is, its settings, its server and pool,
the relay of its input), the one state transition (`to`), linking to and unlinking from a
server, sending, failing and closing, and the settings bookkeeping both pool modes feed
(`note_effects`). It is also what a linked `ServerConnection` calls back (`server_ready`,
`server_error`; `quiet_point` and `server_lost` belong to parts above, so the session's top class,
`proxy.client.ClientSession`, routes them). The parts in the sibling modules each hold a reference
to it: this module imports none of them; of the pool mode it knows only the `Mode` base class.
(ARCHITECTURE.md, "Client session".)
"""

from __future__ import annotations

import asyncio
import itertools
import re
import struct
from collections.abc import Callable
from time import monotonic  # by name: compiled, `time.monotonic` is a module getattr per call
from typing import TYPE_CHECKING, Any, Final

from .. import logs
from ..journal import TransactionJournal
from ..outcome_answer import COMMIT_TAG, MarkerSource, own_marker_query
from ..protocol import messages as m
from ..protocol.framing import Action, Relay, Span
from ..protocol.sqlstate import (
    SERVER_GONE_STATES,
    ProtocolViolation,
    ProxyError,
)
from ..server import (
    REQUEST_OTHER,
    LinkedClient,
    ServerConnection,
    ServerState,
)
from ..sqlclass import Deallocate, Effects, first_keyword, has_more_statements
from . import states
from .host import SessionHost
from .mode import Mode
from .scan import (
    _ALL_FRONTEND,
    _ANSWERS_BEFORE_FATAL,
    _CLIENT_VALID,
    _COPY_FAIL,
    _SESSION_WATCH,
    _SESSION_WATCH_BATCH,
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

# A COMMIT the marker can settle: COMMIT or END, alone (not AND CHAIN, not COMMIT PREPARED), up
# to the NUL that ends a Query's or a Parse's text.
_PLAIN_COMMIT: Final = re.compile(
    rb"\s*(?:commit|end)(?:\s+(?:work|transaction))?\s*;?\s*\x00", re.IGNORECASE
)

# The COMMITs drivers and pgbench send, as whole Query messages: known without the pattern.
# (A list, not a set: `data` is a new object per request, and hashing it costs more than a few
# comparisons, most of them settled by the length.)
_COMMON_COMMITS: Final = [
    m.query(text) for word in ("END", "COMMIT", "end", "commit") for text in (word + ";", word)
]


def _common_commit(data: bytes) -> bool:
    n = len(data)
    return any(len(common) == n and common == data for common in _COMMON_COMMITS)

# Autocommit writes `wrap_write` may wrap (one byte, lowercased, picks the few Queries looked at).
_WRAPPABLE: Final = frozenset({b"insert", b"update", b"delete", b"merge"})
WRAP_INITIALS: Final = bytes(1 if byte in b"iudmIUDM" else 0 for byte in range(256))  # by byte value
_RETURNING: Final = re.compile(rb"returning", re.IGNORECASE)
_BEGIN: Final = m.query("BEGIN")
_COMMIT: Final = m.query("COMMIT")
_SYNC: Final = m.sync()

# `mark_kind`: what a statement's text is to the commit-outcome ledger.
MARK_NONE: Final = 0
MARK_COMMIT: Final = 1  # a plain COMMIT: marked when it ends a transaction block
MARK_WRITE: Final = 2  # a lone INSERT/UPDATE/DELETE/MERGE without RETURNING: wrapped in autocommit
_PARSE_COMPLETE: Final = m.message(b"1", b"")
_BIND_COMPLETE: Final = m.message(b"2", b"")
_NO_DATA: Final = m.message(b"n", b"")


def mark_kind(data: bytes, start: int) -> int:
    """MARK_* of the statement text at `data[start:]` (NUL-terminated: a Query's or a Parse's)."""
    initial = data[start] | 0x20 if start < len(data) else 0
    if initial == 0x63 or initial == 0x65:  # c, e
        return MARK_COMMIT if _PLAIN_COMMIT.match(data, start) is not None else MARK_NONE
    if not WRAP_INITIALS[data[start]] or first_keyword(data, start) not in _WRAPPABLE:
        return MARK_NONE
    end = data.find(b"\x00", start)
    if end < 0 or _RETURNING.search(data, start, end) is not None or has_more_statements(data[start:end]):
        return MARK_NONE  # (RETURNING: its rows would be held until the COMMIT, unbounded)
    return MARK_WRITE


def mark_here(mark: int, server: ServerConnection) -> int:
    """`mark` (MARK_*) if the commit-outcome ledger marks it on `server` now, else MARK_NONE. The
    one rule, for both pool modes and every request shape: a COMMIT inside a transaction block;
    a write outside one with nothing in flight (it is a transaction of its own then, which the
    wrap makes explicit; behind other requests, the wrap would change what they are part of)."""
    status = server.tx_status
    if mark == MARK_COMMIT:
        return mark if status == m.TX_IN_BLOCK else MARK_NONE
    if mark == MARK_WRITE and status == m.TX_IDLE and server.outstanding == 0:
        return mark
    return MARK_NONE


def commit_batch_answer(parsed: bool, described: bool) -> bytes:
    """What PostgreSQL answers a lone execution of COMMIT (`scan.lone_execution`) before its
    ReadyForQuery: ParseComplete if the batch parsed it, BindComplete, NoData if it described the
    portal, the tag."""
    return (
        (_PARSE_COMPLETE if parsed else b"") + _BIND_COMPLETE + (_NO_DATA if described else b"") + COMMIT_TAG
    )


# The relay's inspector of a state that answers locally (ABORTED, OUTAGE).
Answerer = Callable[[int, memoryview], Action]


def _no_mode(type_byte: int, msg: memoryview) -> Action:
    """The relay's inspector until the session's pool mode is built (`Mode.forward`)."""
    raise ProxyError("internal error in pgsidecar: client input before the session was built")


class SessionCore(LinkedClient):
    # The host's registries hold the top class (`proxy.client.ClientSession`), which this module
    # cannot name without importing it: hence Any for the client type.
    def __init__(self, host: SessionHost[Any]) -> None:
        super().__init__()
        self.id = f"c{next(_client_ids)}"
        # The process around the session. Read here at close (the registries, the counters);
        # the parts above get the narrower pieces they use, at construction.
        self.host = host
        self.gate = host.gate  # (read per client read: held here, a native attribute)
        # The session's state (a `session.states` constant): changed only by `to`.
        self.state = LOGGING_IN
        self.peer = "?"
        self.user = ""
        self.database = ""
        self.pool_key = ""  # `outcome_answer.pool_key(user, database)`: what the marker source knows it by
        self.startup_params: dict[str, str] = {}  # as sent by the client
        self.startup_settings: dict[str, str] = {}  # settable startup params + `options` (lowercase)
        self.settings: dict[str, str] = {}  # the session's settings now: what a new server must get
        # `backend_key` (LinkedClient): session mode, the id of the first server's backend (what
        # pg_backend_pid() says there); else one the sidecar makes up. The secret is the
        # sidecar's own, unique among open sessions: CancelRequests find the session by it.
        # `params_told` (LinkedClient): the ParameterStatus values this client has been told (one
        # of the servers' shared dicts, never edited), compared at link (`tell_parameters`).
        self.server: ServerConnection | None = None
        # The pool `server` came from and goes back to: the writer's (`writer_pool`), or with
        # read routing a replica's (`Attach.pool_for_request` decides, per transaction).
        self.pool: Pool | None = None
        self.writer_pool: Pool | None = None
        # Session mode: look at each new transaction before it goes to the linked server
        # (`Attach.next_transaction`), because it may have to run elsewhere: set while the
        # session is on a replica, and always under `routing.reads: balance`. A plain attribute,
        # read per client read only after the gate's own check.
        self.reroute = False
        self.connected_at = monotonic()
        # Passthrough only: the client's password, kept in memory for this session (else None and
        # the sidecar logs in upstream with the configured credentials).
        self.password: str | None = None
        self.max_message = host.config.limits.max_message_size
        self.transaction_mode = host.config.pool.mode == "transaction"
        failover = host.config.failover
        if failover.transaction_replay:
            # What the client sent in its current transaction and a digest of the answers it got,
            # replayed on a new writer if this one is lost (`Carryover`; ARCHITECTURE.md,
            # "Transaction replay").
            self.journal = TransactionJournal(int(failover.replay_max_bytes))
        # Whether a client's COMMIT goes out behind a commit marker (`commit_marker`).
        self.marking = failover.commit_outcome == "marker"
        self.markers: MarkerSource = host.commit_outcome.source  # (asked at each writing COMMIT)
        # The client's input after login. Its inspector is the pool mode's (`Mode.forward`, set
        # when the mode is built), or a local answerer's (`to_answering`).
        self.relay = Relay(_SESSION_WATCH, _no_mode, self.max_message, valid_types=_CLIENT_VALID)
        # The pool mode's relay (`SessionRelay` or `TransactionRouting`): set by the session's top
        # class once built, before any input is read.
        self.mode: Mode
        # Whether the server must call `server_ready` at each ReadyForQuery: always in transaction
        # mode (the server goes back to the pool), in session mode only while maintenance is due.
        # A plain attribute, read on the hot path instead of a call per transaction.
        self.wants_ready = self.transaction_mode
        # The step under way (HELD: getting a server; GATED: waiting for the gate; MAINTAINING:
        # the sidecar's own queries; OUTAGE: a spool verdict), kept to be cancelled at close. It
        # may outlive its state by a moment (a cut server ends MAINTAINING before the query
        # fails), hence a field. Started and finished by `Attach.start`.
        self.task: asyncio.Task[None] | None = None
        # The server the sidecar's own queries run on for this session right now (reading settings
        # back, bringing a server in line with the session): not to be handed on mid-query.
        self.own_query_on: ServerConnection | None = None
        # Flags orthogonal to the state: whether the client's socket is read (paused in any state
        # once held input passes its bound) and whether the client reads its answers.
        self.reading_paused = False
        # The client's transport is above its write high-water mark (the client is not reading):
        # local answerers (outage responder, admin console) stop until it drains.
        self.write_paused = False
        self._writable: asyncio.Future[None] | None = None  # `drained()` waits on it
        # Set by statements seen on the way to the server (`note_effects`), acted on at the next
        # quiet point (`Attach.quiet_point`).
        self.settings_dirty = False
        self.custom_names: set[str] = set()  # dotted settings the session touched, read by name
        self.reset_all = False
        self.reset_names: set[str] = set()
        self.discarded = False
        self.handshake_task: asyncio.Task[None] | None = None
        self.close_reason: str | None = None
        self.failing: asyncio.Task[None] | None = None  # 08P01 after the answers still due
        self.counted = False  # whether this session holds a pool.max_clients slot

    @property
    def running_on(self) -> ServerConnection | None:
        """The server this client's current work runs on (not one merely kept between
        transactions)."""
        return None if self.state == PARKED else self.server

    @property
    def metric_state(self) -> str:
        """login | waiting (for a server) | active (has one) | idle (none, nothing under way)."""
        if self.state == OUTAGE and self.task is not None:
            return "waiting"  # a request the spool cannot take waits for a writer
        return states.METRIC_LABELS[self.state]

    def active(self) -> bool:
        """Logged in (not the admin console) and not closed."""
        return LINKED <= self.state <= OUTAGE

    def to(self, new: int) -> None:
        """The one way the session's state changes: checked against `states.allowed`; leaving a
        state that answered locally (ABORTED, OUTAGE) gives the relay back to the pool mode."""
        old = self.state
        if not states.allowed[old * states.COUNT + new]:
            raise IllegalTransition(f"{self.id}: {states.name(old)} -> {states.name(new)}")
        self.state = new
        if old in (ABORTED, OUTAGE):
            self.mode.forward()
        if states.LOGGED[new] or states.LOGGED[old]:
            logs.event("client_state", logs.DEBUG, conn=self.id, state=states.name(new), was=states.name(old))

    def to_answering(self, new: int, answerer: Answerer) -> None:
        """`to` a state whose input the sidecar answers itself (ABORTED, OUTAGE): the relay hands
        every message to `answerer` until the state is left."""
        assert new in (ABORTED, OUTAGE)
        self.to(new)
        self.relay.set_inspector(answerer, _ALL_FRONTEND)

    def pause_reading(self) -> None:
        """Stop reading the client: what it sends waits in its socket (a bounded buffer here)."""
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
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
            self.send(b"".join(changed))
        self.params_told = params

    def link(self, server: ServerConnection) -> None:
        """-> LINKED on `server`: the input held so far goes to it."""
        self.server = server
        self.to(LINKED)
        server.link(self, tracked=self.transaction_mode)
        if server.params is not self.params_told:
            self.tell_parameters(server.params)
        # Read on before the held input goes out, not after: if it fills the server's write
        # buffer, the server's `pause_writing` stops reading the client, and must not be undone.
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.marking and self.relay.paused:
            # One request held while no server was linked (the pool busy, a failover): sent the
            # way the fast paths send it, so that a write or COMMIT gets its commit marker.
            held = self.relay.take_held()
            if held:
                if self.mode.take_held(held):
                    if self.journal is not None:
                        self.journal.record_request(held)
                    return
                self.relay.hold()
                self.relay.unread(held)
        try:
            spans = self.relay.resume()
        except Exception as exc:
            self.malformed(exc)
            return
        out = server.transport
        if out is not None:
            for span in spans:
                out.write(span)
            if self.journal is not None:
                self.record_spans(spans)
        if self.relay.paused and self.state == LINKED:  # the held input ended with Terminate
            self.relay_stopped()

    def record_spans(self, spans: list[Span]) -> None:
        """The general path's requests, for the journal: the spans are views of the relay's
        buffer, reused once written, hence copied. (Transaction mode journals the client's own
        messages instead, as `TransactionRouting.inspect` reads them: the spans carry the
        statements renamed and prepared for the server that ran them, which a replay's server is
        not.)"""
        journal = self.journal
        if journal is not None and not self.transaction_mode:
            for span in spans:
                journal.record_request(bytes(span))

    def commit_marker(self, server: ServerConnection, data: bytes) -> bytes:
        """`data` is one simple Query sent inside a transaction block (status 'T'): what to send
        in its place. If it is a plain COMMIT and the ledger may be used for this pool, the
        commit marker and a COMMIT in one batch (`marked_commit_query`: one flush for both), the
        server told to swallow the marker's answer; else `data`. (ARCHITECTURE.md, "Transaction
        replay": commit outcomes.)"""
        if len(data) > 64 or data[5] | 0x20 not in (0x63, 0x65):
            return data  # (one byte decides for almost every statement: a COMMIT starts with c or e)
        if not _common_commit(data) and _PLAIN_COMMIT.match(data, 5) is None:
            return data
        query = self.markers.new_commit_query(self.pool_key)
        if query is None:
            return data
        return server.expect_marked_commit(query)

    def wrap_write(self, server: ServerConnection, data: bytes) -> bytes:
        """`data` is one simple Query sent outside a transaction block (status 'I'): if it is a
        lone INSERT, UPDATE, DELETE or MERGE (without RETURNING) and the ledger may be used for
        this pool, the write to send in its place: the statement wrapped in a transaction that
        ends behind a commit marker, so that if its answer never comes the new writer can tell
        whether it committed; the server told to rewrite the answers into the statement's own.
        Else `data` itself. Anything else (VACUUM, CREATE INDEX CONCURRENTLY, several statements,
        RETURNING...) is not wrapped: cut in flight, it is answered 08007."""
        if first_keyword(data, 5) not in _WRAPPABLE or has_more_statements(data, 5):
            return data
        if _RETURNING.search(data, 5) is not None:
            return data  # (its rows would be held until the COMMIT: unbounded)
        marker_id = self.markers.new_marker(self.pool_key)
        if marker_id is None:
            return data
        server.expect_wrapped(marker_id)
        return _BEGIN + data + own_marker_query(marker_id) + _COMMIT

    def mark_batch(
        self,
        server: ServerConnection,
        data: bytes,
        kind: int,
        parsed: bool,
        described: bool,
        hidden: int = 0,
        named: bool = False,
    ) -> bytes:
        """`data` is a lone execution (`scan.lone_execution`; `parsed`: it starts with the Parse
        of its statement, `described`: it describes the portal) of a statement of MARK_* `kind`, as
        `mark_here` gives it for `server` (the caller asks, before it commits to a path): what to
        send in its place. A COMMIT ending a block: the marker, then the batch (as `commit_marker`). An
        autocommit write: the batch between BEGIN, the marker and COMMIT (as `wrap_write`; the
        server answers the batch as one request, so `WrappedAnswer` rewrites it the same way).
        Else, or without the ledger, `data`. `hidden`: `data` starts with that many messages the
        sidecar added (transaction mode: a statement prepared first), whose answers the client
        must not get. `named`: the statement parsed is a named one (it outlives the wrap)."""
        marker_id = self.markers.new_marker(self.pool_key)
        if marker_id is None:
            return data
        if kind == MARK_COMMIT:
            server.expect_marker(marker_id, commit_batch_answer(parsed, described))
            return own_marker_query(marker_id) + data
        wrapped = _BEGIN + data + own_marker_query(marker_id) + _COMMIT
        if parsed and not named and not self.transaction_mode:
            # The COMMIT, a simple Query, drops the unnamed statement the batch prepared; a
            # client may Bind it again later, so it is parsed again (transaction mode re-prepares
            # it on use instead).
            server.expect_wrapped(marker_id, batch=True, reparse=True)
            return wrapped + data[: 1 + int.from_bytes(data[1:5], "big")] + _SYNC
        server.expect_wrapped(marker_id, batch=True, hidden=hidden)
        return wrapped

    def unlink(self, new: int) -> None:
        """LINKED -> `new`: the relay holds client input; the server stops calling back."""
        self.to(new)
        self.relay.hold()
        if self.server is not None:
            self.server.unlink()

    def malformed(self, exc: Exception) -> None:
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
        spans = self.relay.stop()
        self.pause_reading()
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
            self.failing = loop.create_task(self._fail_when_answered(error))
        else:
            self.fail(error)

    def relay_stopped(self) -> None:
        """Linked, the relay paused itself: at the client's Terminate, or for good after a
        malformed message (input read meanwhile is dropped: the client gets its 08P01 once its
        earlier requests are answered)."""
        if self.failing is None:
            self.close("client sent Terminate")
            return
        self.relay.stop()
        self.reading_paused = False  # (whoever resumed reading did not say)
        self.pause_reading()

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

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def writable(self) -> None:
        """The client reads its answers again (`resume_writing`): wake whoever waits in `drained`."""
        self.write_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def drained(self) -> None:
        """Returns once the client is reading its answers (the transport's write buffer is under
        its high-water mark): a local answerer (the admin console) waits here before making more."""
        while self.write_paused and self.transport is not None:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None

    # ---------------------------------------------------------------- settings bookkeeping

    def note_effects(self, effects: Effects) -> None:
        """A statement on its way to the server changes settings (or discards everything): read
        them back at the next quiet point (`Attach.quiet_point`). One that drops prepared
        statements may drop the server connection's own (`ServerConnection.marker_prepared`)."""
        if effects.discard_all or effects.deallocate is not Deallocate.NONE:
            server = self.server
            if server is not None:
                server.marker_prepared = False  # (the marked COMMIT's statements may go too)
        if not (effects.changes_settings or effects.discard_all):
            return
        state = self.state
        if not self.wants_ready and not self.transaction_mode and state not in (OUTAGE, ABORTED):
            # Session mode: watch every extended-protocol message until then, so a batch not yet
            # ended by Sync is known (`Mode.batch_kind`).
            self.relay.set_watch(_SESSION_WATCH_BATCH)
        self.wants_ready = True
        self.settings_dirty |= effects.changes_settings
        if effects.custom_names:
            self.custom_names |= effects.custom_names
        self.reset_all |= effects.reset_all
        self.reset_names |= effects.reset_names
        self.discarded |= effects.discard_all

    def maintenance_due(self) -> bool:
        return self.settings_dirty or self.reset_all or bool(self.reset_names) or self.discarded

    # ---------------------------------------------------------------- callbacks of the linked server

    def server_ready(self, status: int) -> bool:
        """ReadyForQuery arrived (called only while `wants_ready`). True: the client is at a quiet
        point, and the server calls `quiet_point` once the bytes so far have been written, with
        its relay paused. (A flag rather than a callback returned: compiled, a bound method is
        an allocation and a generic call per transaction.)"""
        server = self.server
        if server is None or status != m.TX_IDLE or server.outstanding or server.tracker:
            return False
        if self.relay.mid_message:
            return False
        if self.transaction_mode:
            return True
        # Session mode: called only while maintenance is due. Not while the client has more
        # extended-protocol messages on the server that no Sync ended yet: the server would answer
        # them ahead of the sidecar's own queries.
        return self.maintenance_due() and self.mode.batch_kind is None

    def server_error(self, fields: dict[str, str]) -> None:
        """An ErrorResponse from the linked server (relayed; this only reports failures)."""
        server = self.server
        if server is None:
            return
        if fields.get("C") in SERVER_GONE_STATES:
            self.host.topology.report_failure(server.endpoint, m.error_summary(fields))
        if (
            server.outstanding == 0
            and self.mode.batch_kind is None
            and not self.transaction_mode
            and fields.get("V", fields.get("S")) != "FATAL"  # (a goodbye: the session moves)
        ):
            # No Query or Sync awaits an answer, so this error is of an extended-protocol batch
            # not synced yet: the server now skips everything up to its Sync. Noted as an open
            # batch, so a server given back before that Sync is resynchronised (Pool.release).
            self.mode.batch_kind = REQUEST_OTHER

    # ---------------------------------------------------------------- failing and closing

    def fail(self, exc: ProxyError) -> None:
        """Send `exc` to the client as a FATAL error and close (every disconnect has a reason)."""
        if self.state == CLOSED:
            return
        if not self.active():
            self.host.stats.clients_refused[exc.code] += 1
        else:
            self.host.stats.client_errors[exc.code] += 1
        self.send(m.error_response(exc.code, exc.message, severity="FATAL", detail=exc.detail, hint=exc.hint))
        self.close(f"{exc.code}: {exc.message}")

    def close(self, reason: str) -> None:
        if self.state == CLOSED:
            return
        if self.transport is not None:
            self.transport.close()
        self.finish(reason)

    def finish(self, reason: str) -> None:
        """-> CLOSED: stop what is under way, give the server back, leave the registries."""
        linked = self.state == LINKED
        self.to(CLOSED)
        self.close_reason = reason
        if self.handshake_task is not None and not self.handshake_task.done():
            self.handshake_task.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        own, self.own_query_on = self.own_query_on, None
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
            elif self.relay.mid_message:
                # Part of a message went to the server (a CopyData cut short): it would read
                # whatever it is sent next as the rest of it. No Sync can recover that.
                self.pool.discard(server, "client left in the middle of a message")
            elif self.transaction_mode:
                # Still linked means the client's last request did not end at a quiet point:
                # an open batch, or an answer still due (Pool.release tells which).
                self.pool.release(server, reset=False, resync=linked, unknown=self.maintenance_due())
            else:
                self.pool.release(server, reset=True, resync=self.mode.batch_kind is not None)
        if self.backend_key is not None and self.host.cancel_keys.get(self.backend_key[1]) is self:
            del self.host.cancel_keys[self.backend_key[1]]
        self.host.client_closed(self, counted=self.counted)
        logs.event(
            "client_closed",
            conn=self.id,
            user=self.user or None,
            reason=reason,
            seconds=round(monotonic() - self.connected_at, 3),
        )
