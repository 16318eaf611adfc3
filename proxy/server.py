"""ServerConnection: one upstream PostgreSQL connection, as an asyncio Protocol.

Two modes:

* detached (in the pool, during login, or running the sidecar's own queries): inbound messages are
  read whole through a `MessageReader` by coroutines such as `login()` and `simple_query()`;
* linked to a client session (a `LinkedClient`): inbound bytes go through a `Relay` straight to the
  client's transport as spans, and only ReadyForQuery, ErrorResponse and ParameterStatus are looked at.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from time import monotonic  # by name: compiled, `time.monotonic` is a module getattr per call
from typing import TYPE_CHECKING, Final, cast

from . import logs
from .journal import TransactionJournal
from .metrics import Stats
from .outcome_answer import (
    COMBINED_READ_ONLY,
    COMBINED_WROTE,
    COMMIT_ID_AT,
    COMMIT_TAG,
    MARKER_READ_ONLY,
    MARKER_WROTE,
    PREPARE_MARKED_COMMIT,
    WRAP_BEGIN,
    WRAP_COMMIT,
    WRAP_HOLD_MAX,
    WRAP_MARKER,
    WRAP_REPARSE,
    WRAP_STATEMENT,
    MarkerAnswer,
    WrappedAnswer,
)
from .protocol import messages as m
from .protocol.auth import UpstreamAuthenticator
from .protocol.framing import Action, Inspector, MessageReader, Relay, watch_table
from .protocol.sqlstate import (
    SERVER_GONE_STATES,
    ProxyError,
    UpstreamUnavailable,
    error_class,
)
from .requests import REQUEST_COMMIT as REQUEST_COMMIT  # (importable from here: client.py does)
from .requests import REQUEST_OTHER as REQUEST_OTHER
from .requests import REQUEST_READ as REQUEST_READ
from .requests import merge_kinds as merge_kinds
from .statements import TRACKED_RESPONSE_TYPES, ResponseTracker, ServerStatements

if TYPE_CHECKING:
    from sidecar_config import Endpoint

_server_ids = itertools.count(1)


class LinkedClient(asyncio.Protocol):
    """What a linked server sees of its client session: the fields it reads and the four calls it
    makes. A native base class rather than a Protocol: compiled, the hot path then reads
    `wants_ready` and `transport` natively and calls `server_ready` and `quiet_point` through the
    vtable, where a Protocol would cost a generic getattr per answer (ARCHITECTURE.md, "The compiled
    data path"). `session.core.SessionCore` is the one subclass; defined here so that this module
    names its client without importing the session layer above it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # The key handed out in BackendKeyData: (process id, secret).
        self.backend_key: tuple[int, int] | None = None
        # The ParameterStatus values this client has been told (one of the servers' shared dicts).
        self.params_told: dict[str, str] = {}
        # Whether the server must call `server_ready` at each ReadyForQuery.
        self.wants_ready = False
        # The current transaction's journal (failover.transaction_replay), fed the answers as
        # they are written to the client; None: replay is off.
        self.journal: TransactionJournal | None = None

    def server_ready(self, status: int) -> bool:
        """ReadyForQuery arrived (called only while `wants_ready`). True: the client is at a quiet
        point, and the server calls `quiet_point` once the bytes so far have been written."""
        raise NotImplementedError

    def quiet_point(self) -> None:
        """The server finished everything asked of it (after `server_ready` said True)."""
        raise NotImplementedError

    def server_error(self, fields: dict[str, str]) -> None:
        """An ErrorResponse from the server, being relayed."""
        raise NotImplementedError

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        """The linked server connection closed."""
        raise NotImplementedError


# `monotonic` again, for the per-request clock reads (here and in pool.py): compiled, a Final name
# is a C static, where an imported name is a lookup in the module's dict at every call.
clock: Final = monotonic


# Server -> client messages the data path must see: transaction boundaries, errors that reveal a
# dying or demoted server, parameter changes a moved session has to replay, and notifications
# (whose process id may need to become the one the client was given). Looking a type up in the
# table costs the same whatever it holds: other messages pay nothing for the ones watched.
_LINKED_WATCH: Final = watch_table((m.B_READY_FOR_QUERY, m.B_ERROR, m.B_PARAMETER_STATUS, m.B_NOTIFICATION))
# Transaction pooling renames prepared statements, so every answer is matched to its request.
_TRACKED_WATCH: Final = watch_table(TRACKED_RESPONSE_TYPES)
# While a commit marker's answer is due (`expect_marker`): every message, to swallow the marker's.
_ALL_WATCH: Final = watch_table(range(256))
_MARKER_PASSES: Final = (m.B_NOTIFICATION, m.B_PARAMETER_STATUS)
# The sidecar's own ROLLBACK, after a combined marker failed (`_inspect_marker`).
_ROLLBACK: Final = m.query("ROLLBACK")
# Where the id is in a marked COMMIT sent behind the statements' preparation.
_PREPARED_ID_AT: Final = len(PREPARE_MARKED_COMMIT) + COMMIT_ID_AT


# Puts a server back in step with the sidecar when a client left in the middle of an
# extended-protocol batch (messages sent with no Sync yet, or an error the server is skipping to
# Sync from): Execute of a portal that cannot exist fails, which rolls back the implicit transaction
# the batch may have opened (a bare Sync would commit work the client never synced), and the Sync
# then ends the skip with a ReadyForQuery. Inside a COPY FROM STDIN started by such a batch, the
# Execute is an unexpected message: the COPY fails the same way. PostgreSQL logs the error, so
# this is sent only when the client may have left a batch open, never routinely.
RESYNC: Final = b"E\x00\x00\x00\x19pgsidecar_resync\x00\x00\x00\x00\x00" + b"S\x00\x00\x00\x04"

# ParameterStatus values, one dict per distinct set: servers that report the same values share
# it, so a transaction-mode client moving between them finds the dict it was told (`is`) and has
# nothing to compare. Copy-on-write: a server whose value changes takes another dict, never
# edits a shared one. Bounded: past the limit it starts over (sharing is only an optimisation).
_SHARED_PARAMS: Final[dict[frozenset[tuple[str, str]], dict[str, str]]] = {}
_SHARED_PARAMS_LIMIT: Final = 256


def shared_params(params: dict[str, str]) -> dict[str, str]:
    """The shared dict equal to `params` (which must not be changed afterwards)."""
    key = frozenset(params.items())
    shared = _SHARED_PARAMS.get(key)
    if shared is None:
        if len(_SHARED_PARAMS) >= _SHARED_PARAMS_LIMIT:
            _SHARED_PARAMS.clear()
        _SHARED_PARAMS[key] = shared = params
    return shared


class InFlight:
    """The requests sent to a server that its ReadyForQuery has not answered yet, oldest first:
    when each was sent (for the query-duration histogram) and its REQUEST_* kind (for the answer
    owed if the server is lost).

    Two lists used as a queue between `_head` and `_tail` rather than deques: compiled, every
    operation here is native, where each deque append/popleft is a generic method call (four per
    transaction). Slots are reused, so the usual one-request-at-a-time traffic allocates nothing."""

    __slots__ = ("_head", "_kinds", "_started", "_tail", "last_kind")

    def __init__(self) -> None:
        self._started: list[float] = []
        self._kinds: list[int] = []
        self._head = 0  # the oldest unanswered request
        self._tail = 0  # one past the newest
        self.last_kind = REQUEST_OTHER  # the kind of the request `pop` last forgot (the journal's)

    def __len__(self) -> int:
        return self._tail - self._head

    def push(self, kind: int) -> None:
        tail = self._tail
        if tail < len(self._kinds):
            self._started[tail] = clock()
            self._kinds[tail] = kind
        else:
            self._started.append(clock())
            self._kinds.append(kind)
        self._tail = tail + 1

    def pop(self) -> float:
        """Forget the oldest request; when it was sent (-1.0 if none was in flight)."""
        head = self._head
        if head >= self._tail:
            return -1.0
        started = self._started[head]
        self.last_kind = self._kinds[head]
        head += 1
        if head == self._tail:
            self.clear()  # the usual case: nothing in flight, start again at slot 0
        elif head >= _COMPACT_AFTER and head * 2 >= self._tail:
            # A long pipeline: drop the answered part so the lists stay bounded by what is in flight.
            del self._started[:head]
            del self._kinds[:head]
            self._tail -= head
            self._head = 0
        else:
            self._head = head
        return started

    def kinds(self) -> list[int]:
        return self._kinds[self._head : self._tail]

    def clear(self) -> None:
        self._head = self._tail = 0
        if len(self._kinds) > _COMPACT_AFTER:
            self._started = []  # (after a long pipeline: its slots are not kept)
            self._kinds = []


_COMPACT_AFTER: Final = 1024


class ServerState(Enum):
    CONNECTING = "connecting"
    LOGIN = "login"
    IDLE = "idle"
    ACTIVE = "active"
    CLOSED = "closed"


class UpstreamError(ProxyError):
    """An ErrorResponse from PostgreSQL during login or a sidecar-issued query; relayed as is."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(
            fields.get("M", "upstream error"),
            detail=fields.get("D"),
            hint=fields.get("H"),
            code=fields.get("C", "XX000"),
        )
        self.fields = fields


class QueryResult:
    """The text-format outcome of a simple query the sidecar ran itself."""

    # A plain class, not a dataclass: mypyc runs a dataclass's generated __init__ (with its
    # default factories) as interpreted Python, about 27k instructions, paid twice per session
    # login (the startup SETs, the reset) in session mode.
    def __init__(self) -> None:
        self.columns: list[str] = []
        self.rows: list[list[str | None]] = []
        self.tag = ""
        # ParameterStatus messages the query caused, as sent: a client must see those of a query
        # the sidecar ran on its behalf (e.g. putting back its startup settings after RESET ALL).
        self.parameter_status: list[bytes] = []


@dataclass(frozen=True)
class TlsSettings:
    mode: str = "prefer"  # disable | prefer | require | verify-full
    ca_file: str | None = None

    def context(self) -> ssl.SSLContext | None:
        if self.mode == "disable":
            return None
        if self.mode == "verify-full":
            ctx = ssl.create_default_context(cafile=self.ca_file)
            ctx.check_hostname = True
            return ctx
        # prefer / require: encrypt, but (as libpq's modes of the same name) do not verify.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx


class ServerConnection(asyncio.Protocol):
    def __init__(self, endpoint: Endpoint, max_message_size: int, stats: Stats | None = None) -> None:
        self.id = f"s{next(_server_ids)}"
        self.endpoint = endpoint  # where this connection goes; compared against the writer
        self.state = ServerState.CONNECTING
        self.transport: asyncio.Transport | None = None
        # ParameterStatus values as this server reports them: a shared dict, replaced (never
        # edited) when a value changes (`note_parameter`).
        self.params: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None  # for forwarding CancelRequests
        self.tx_status = m.TX_IDLE  # from the last ReadyForQuery
        self.outstanding = 0  # Query/Sync messages sent whose ReadyForQuery has not come back
        # ReadyForQuery owed to the sidecar's own requests (its queries, a resync) whose answers
        # nobody has read yet: one given up half way (its client left) leaves its answer behind,
        # which the next reader skips and the pool waits for before anyone else gets the server.
        self.owed_own = 0
        self.created_at = monotonic()
        self.last_used = self.created_at
        self.client: LinkedClient | None = None  # the linked client, if any
        self.close_reason: str | None = None
        self.applied: dict[str, str] = {}  # session settings the sidecar set here (lowercase names)
        self.statements = ServerStatements(0)  # sidecar-wide prepared statements (transaction mode)
        self.tracker = ResponseTracker()  # answers owed, in order (transaction mode)
        self.unnamed_from: bytes | None = None  # whose unnamed statement this server holds
        self.held_notifications: list[bytes] = []  # NOTIFYs that arrived while detached
        self.in_flight = InFlight()  # the unanswered requests: when sent, and what (REQUEST_*)
        # A commit marker sent ahead of the client's COMMIT (`expect_marker`): its answer, being
        # swallowed, and its id, kept until the COMMIT's ReadyForQuery (what a cut resolves).
        self.marker: MarkerAnswer | None = None
        # The id, as bytes at `_marker_at` of `_marker_text` (a marked COMMIT's Query: no str is
        # made per COMMIT); `marker_id` reads it.
        self._marker_text: bytes | None = None
        self._marker_at = 0
        self._marker_error: bytes | None = None
        # What the client gets for its marked COMMIT if the marker says it committed but the
        # answer never came: the COMMIT's tag, after ParseComplete/BindComplete for a batch.
        self.marker_answer = COMMIT_TAG
        # Whether this connection holds the marked COMMIT's two prepared statements
        # (`expect_marked_commit`). Anything that may have dropped them (a reset, the client's
        # DEALLOCATE or DISCARD, a failed marker) sets it back to False: sent then, the batch
        # would fail, and with it the client's transaction.
        self.marker_prepared = False
        # An autocommit write sent wrapped (`expect_wrapped`): the statement's answer, held until
        # its COMMIT's answer says what PostgreSQL would have sent for it.
        self.wrapped: WrappedAnswer | None = None
        self.stats = stats if stats is not None else Stats()
        self._tracked = False
        # The client's `server_ready` said True while the relay was mid-read: call its
        # `quiet_point` once the bytes before the pause have been written.
        self._quiet_due = False
        self._max = max_message_size
        self._reader = MessageReader(max_message_size)
        # The inspectors, bound once: a marked COMMIT switches to its own and back, and binding
        # a method makes an object each time.
        self._on_linked: Inspector = self._inspect
        self._on_tracked: Inspector = self._inspect_tracked
        self._on_marker: Inspector = self._inspect_marker
        self._on_wrapped: Inspector = self._inspect_wrapped
        self._relay = Relay(_LINKED_WATCH, self._on_linked, max_message_size)
        self._wakeup: asyncio.Future[None] | None = None
        self._on_close: Callable[[ServerConnection], None] | None = None
        self._ssl_reply: asyncio.Future[bytes] | None = None

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None and self.state is ServerState.ACTIVE:
            # The common case: one read holds a whole answer ending in ReadyForQuery and nothing
            # else to look at: no ErrorResponse, no ParameterStatus (tracked: the answer to a
            # request queued as `tracker.fast`, whose entries its messages settle in order). It
            # goes out as it came in, before the bookkeeping (the client gets it sooner); the
            # relay is not involved.
            tracked = self._tracked
            marker = self.marker
            if (
                marker is not None
                and self.wrapped is None
                and self._relay.at_boundary
                and not self._relay.paused
            ):
                data = self._swallow_marker(marker, data)
                if not data:
                    return
            fast = (not tracked or self.tracker.fast) and self.marker is None
            if fast and self._relay.quiet_run(data, _LINKED_WATCH) == m.B_READY_FOR_QUERY:
                out = client.transport
                if out is not None:
                    out.write(data)
                status = data[-1]
                if tracked:
                    self.tracker.clear()
                    self.tx_status = status
                    self._answered()
                    due = client.server_ready(status)
                else:
                    due = self._on_ready(status, client)
                journal = client.journal
                if journal is not None:
                    in_flight = self.in_flight
                    journal.whole_answer(data, status, len(in_flight), in_flight.last_kind)
                if due:
                    # (Unlike Action.FORWARD_PAUSE, no `hold`: the read ended with the
                    # ReadyForQuery, so there is nothing after it to keep back.)
                    client.quiet_point()
                return
            try:
                spans = self._relay.feed(data)
            except ProxyError as exc:
                self.close(f"protocol error from server: {exc.message}")
                return
            out = client.transport
            if out is not None:
                for span in spans:
                    out.write(span)
            journal = client.journal
            if journal is not None:
                for span in spans:
                    journal.relay_view(span)
                journal.settled(self.tx_status, len(self.in_flight))
            if self.close_reason is not None:
                self.close(self.close_reason)  # its FATAL goodbye, dropped above
                return
            if self._quiet_due and self._relay.paused:
                self._quiet_due = False
                client.quiet_point()
            return
        if self._ssl_reply is not None and not self._ssl_reply.done():
            self._ssl_reply.set_result(data)
            return
        self._reader.feed(data)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.close_reason or (
            f"server closed the connection: {exc}" if exc else "server closed the connection"
        )
        self.close_reason = reason
        self.state = ServerState.CLOSED
        self.transport = None
        if self._ssl_reply is not None and not self._ssl_reply.done():
            self._ssl_reply.set_exception(UpstreamUnavailable(reason))
        self._wake()
        client = self.client
        if client is not None:
            self.client = None
            client.server_lost(self, reason)
        if self._on_close is not None:
            self._on_close(self)

    def pause_writing(self) -> None:
        # The server is not reading fast enough: stop reading from the client that feeds it.
        client = self.client
        if client is not None and client.transport is not None:
            client.transport.pause_reading()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None and client.transport is not None:
            client.transport.resume_reading()

    # ---------------------------------------------------------------- linked mode

    def link(self, client: LinkedClient, tracked: bool = False) -> None:
        """Start relaying this server's output to `client` (`tracked`: match answers to requests)."""
        self.client = client
        self.in_flight.clear()
        self.state = ServerState.ACTIVE
        self.last_used = monotonic()
        if self.marker is not None:
            # A commit marker whose answers were read past detached (its client left): its
            # inspector must not swallow the next client's answers.
            self._marker_done()
        if tracked != self._tracked:
            self._tracked = tracked
            if tracked:
                self._relay.set_inspector(self._on_tracked, _TRACKED_WATCH)
            else:
                self._relay.set_inspector(self._on_linked, _LINKED_WATCH)
        out = client.transport
        pending = self.held_notifications
        self.held_notifications = []
        spans = self._relay.resume() if self._relay.paused else []
        if out is not None:
            for data in pending:
                renamed = self._own_notification(memoryview(data))
                out.write(data if renamed is None else renamed)
            for span in spans:
                out.write(span)

    def unlink(self) -> None:
        """Stop relaying; output that arrives meanwhile is read by the sidecar's own queries."""
        self.client = None
        self._quiet_due = False
        if self.state is ServerState.ACTIVE:
            self.state = ServerState.IDLE
        self.last_used = monotonic()
        if self.transport is not None:
            # Reading may have been paused for a slow client that is now gone.
            self.transport.resume_reading()

    def _inspect(self, type_byte: int, msg: memoryview) -> Action:
        client = self.client
        if type_byte == m.B_READY_FOR_QUERY:
            due = self._on_ready(msg[5], client)
            if client is not None and client.journal is not None:
                self._journal_pipeline(client.journal)
            if due:
                self._quiet_due = True
                return Action.FORWARD_PAUSE
        elif type_byte == m.B_PARAMETER_STATUS:
            name, value = m.decode_parameter_status(msg[5:])
            self.note_parameter(name, value)
        elif type_byte == m.B_NOTIFICATION:
            renamed = self._own_notification(msg)
            if renamed is not None:
                self._relay.insert(renamed)
                return Action.DROP
        else:  # ErrorResponse
            if self._server_going_away(msg):
                return Action.DROP
        return Action.FORWARD

    def _own_notification(self, msg: memoryview) -> bytes | None:
        """A NotificationResponse sent by this very backend (the session's own NOTIFY), rewritten
        to carry the process id its client was given, when that is another server's (a session
        moved by a failover); None: relay it as it is. Session mode only: in transaction mode
        LISTEN is refused, so no notification reaches a client."""
        client = self.client
        key = self.backend_key
        if client is None or key is None or len(msg) < 9:
            return None
        given = client.backend_key
        if given is None or given[0] == key[0] or int.from_bytes(msg[5:9], "big", signed=True) != key[0]:
            return None
        return m.message(b"A", given[0].to_bytes(4, "big", signed=True) + bytes(msg[9:]))

    def note_parameter(self, name: str, value: str) -> None:
        """A ParameterStatus from the server. Linked, it is being relayed: the client, told
        everything this server reported before (`ClientSession.tell_parameters` at link), now
        knows exactly this server's values too."""
        params = dict(self.params)
        params[name] = value
        self.params = shared_params(params)
        client = self.client
        if client is not None:
            client.params_told = self.params

    def _on_ready(self, status: int, client: LinkedClient | None) -> bool:
        """Untracked ReadyForQuery: account for it; True if the client wants its `quiet_point`."""
        self.tx_status = status
        self._answered()
        if self.outstanding:
            self.outstanding -= 1
        if client is not None and client.wants_ready:
            return client.server_ready(status)
        return False

    def _server_going_away(self, msg: memoryview) -> bool:
        """Count an ErrorResponse; True if it is the server's FATAL goodbye (shutdown, crash,
        recovery), which is not relayed: the session survives the server and moves on."""
        fields = m.decode_error_fields(msg[5:])
        code = fields.get("C", "XX000")
        self.stats.upstream_errors[code] += 1
        client = self.client
        if client is not None:
            client.server_error(fields)
        if code in SERVER_GONE_STATES and fields.get("V", fields.get("S")) == "FATAL":
            self.close_reason = f"server is going away: {m.error_summary(fields)}"
            return True
        return False

    # ---------------------------------------------------------------- commit markers

    def expect_marker(self, marker_id: str, answer: bytes = COMMIT_TAG) -> None:
        """The client's COMMIT (a batch's) goes out behind `outcome.marker_query(marker_id)`, in
        the same write: swallow the marker's answer (the client never asked for it), and if the
        marker failed (its transaction is aborted, so the COMMIT answers ROLLBACK) give the client
        the marker's error in place of that tag, as PostgreSQL answers a COMMIT whose deferred
        check failed."""
        self._expect(MarkerAnswer(), marker_id.encode(), 0, answer)

    def expect_marked_commit(self, query: bytes) -> bytes:
        """As `expect_marker`, for the marker and a plain COMMIT in one batch
        (`MarkerIds.next_commit_query`); returns what to send: `query`, behind
        `PREPARE_MARKED_COMMIT` unless this connection is known to hold the two statements. If
        the marker fails, the COMMIT is not run and the sidecar rolls back itself."""
        if self.marker_prepared:
            self._expect(MarkerAnswer(True), query, COMMIT_ID_AT, COMMIT_TAG)
            return query
        query = PREPARE_MARKED_COMMIT + query
        self._expect(MarkerAnswer(True), query, _PREPARED_ID_AT, COMMIT_TAG)
        return query

    def _expect(self, marker: MarkerAnswer, text: bytes, at: int, answer: bytes) -> None:
        self.marker = marker
        self._marker_text = text
        self._marker_at = at
        self.marker_answer = answer
        self._marker_error = None
        self._relay.set_inspector(self._on_marker, _ALL_WATCH)

    @property
    def marker_id(self) -> str | None:
        """The id of the commit marker sent ahead of the COMMIT in flight, if any."""
        text = self._marker_text
        if text is None:
            return None
        at = self._marker_at
        return text[at : at + 36].decode()

    def expect_wrapped(
        self, marker_id: str, batch: bool = False, reparse: bool = False, hidden: int = 0
    ) -> None:
        """An autocommit write goes out as `BEGIN` + the client's Query + the marker + `COMMIT`,
        in one write (`SessionCore.wrap_write`): the client gets exactly what PostgreSQL sends for
        the statement alone in autocommit (`WrappedAnswer`)."""
        self.marker = MarkerAnswer()
        self._marker_text = marker_id.encode()
        self._marker_at = 0
        self._marker_error = None
        self.wrapped = WrappedAnswer(batch, reparse, hidden)
        self._relay.set_inspector(self._on_wrapped, _ALL_WATCH)

    def _swallow_marker(self, marker: MarkerAnswer, data: bytes) -> bytes:
        """A marked COMMIT's answers without the relay, in the usual case: the marker's answer,
        whole at the start of `data` and as expected (it ran), is swallowed; if what follows is
        the COMMIT's whole answer with nothing to look at, the marker is done and the fast path
        takes it. Returns what is left of `data` for the usual ways (`_inspect_marker` for
        anything else)."""
        if not marker.done:
            wrote = COMBINED_WROTE if marker.combined else MARKER_WROTE
            read_only = COMBINED_READ_ONLY if marker.combined else MARKER_READ_ONLY
            if data.startswith(wrote):
                marker.marked = True
                data = data[len(wrote) :]
            elif data.startswith(read_only):
                marker.marked = False
                data = data[len(read_only) :]
            else:
                return data
            marker.done = True
        if (
            data
            and self._marker_error is None
            and self._relay.quiet_run(data, _LINKED_WATCH) == m.B_READY_FOR_QUERY
        ):
            self._marker_done()
        return data

    def _marker_done(self) -> None:
        self.marker = None
        self._marker_text = None
        self._marker_error = None
        self.wrapped = None
        if self._tracked:
            self._relay.set_inspector(self._on_tracked, _TRACKED_WATCH)
        else:
            self._relay.set_inspector(self._on_linked, _LINKED_WATCH)

    def _inspect_marker(self, type_byte: int, msg: memoryview) -> Action:
        marker = self.marker
        if marker is not None and not marker.done and type_byte not in _MARKER_PASSES:
            if type_byte == m.B_ERROR:
                if self._server_going_away(msg):
                    return Action.DROP  # (a shutdown's goodbye is not the marker's error)
                self._marker_error = bytes(msg)
            try:
                marker.feed(type_byte, msg[5:])
            except ValueError as exc:
                self.close_reason = f"protocol error from server: {exc}"
                return Action.DROP
            if marker.done and marker.combined:
                # The statements are there once the batch ran; after an error, who knows (they
                # are prepared again, closed first, next time).
                self.marker_prepared = marker.error is None
                if type_byte == m.B_READY_FOR_QUERY:
                    # The marker failed, so the COMMIT after it in the same batch was not run:
                    # the transaction is ended here, and its answer stands for the COMMIT's (below).
                    out = self.transport
                    if out is not None:
                        out.write(_ROLLBACK)
            return Action.DROP
        if marker is not None:
            # The COMMIT's own answer (or the sidecar's ROLLBACK's, after a combined marker failed).
            if type_byte == m.B_COMMAND_COMPLETE and self._marker_error is not None:
                self._relay.insert(self._marker_error)  # in place of "ROLLBACK"
                return Action.DROP
            if type_byte == m.B_READY_FOR_QUERY:
                self._marker_done()
        if self._tracked:
            return self._inspect_tracked(type_byte, msg) if _TRACKED_WATCH[type_byte] else Action.FORWARD
        return self._inspect(type_byte, msg) if _LINKED_WATCH[type_byte] else Action.FORWARD

    def _inspect_wrapped(self, type_byte: int, msg: memoryview) -> Action:
        wrapped = self.wrapped
        marker = self.marker
        if wrapped is None or marker is None or type_byte in _MARKER_PASSES:
            return self._inspect_linked(type_byte, msg)
        if type_byte == m.B_ERROR and self._server_going_away(msg):
            # A shutdown's goodbye: not the statement's error (the cut that follows resolves
            # the write by its marker).
            return Action.DROP
        phase = wrapped.phase
        if phase == WRAP_MARKER:
            try:
                if marker.feed(type_byte, msg[5:]):
                    wrapped.phase = WRAP_COMMIT
            except ValueError as exc:
                self.close_reason = f"protocol error from server: {exc}"
            return Action.DROP
        if type_byte == m.B_READY_FOR_QUERY:
            if phase < WRAP_COMMIT or (phase == WRAP_COMMIT and wrapped.reparse):
                # BEGIN's, the statement's, the COMMIT's before a re-Parse: the client never sees them
                wrapped.phase = phase + 1
                return Action.DROP
            answer = wrapped.answer()
            if answer:
                self._relay.insert(answer)
            self._marker_done()
            if self._tracked:
                # (Transaction mode: the fast path's request, a Query or an extended batch, is
                # answered by what was held; its entries are settled as the fast path's are, but a
                # statement the sidecar failed to prepare first is not on this server.)
                if wrapped.hidden_failed:
                    for name in self.tracker.hidden_parses():
                        self.statements.discard(name)
                self.tracker.clear()
            return self._inspect_linked(type_byte, msg)  # the COMMIT's ReadyForQuery ('I'): the client's
        if phase in (WRAP_BEGIN, WRAP_REPARSE):
            return Action.DROP  # BEGIN's CommandComplete; the re-Parse's ParseComplete
        if phase == WRAP_STATEMENT:
            if type_byte == m.B_NOTICE and wrapped.size > WRAP_HOLD_MAX and wrapped.tag is None:
                # Notices by the thousand (a row trigger's): not held without bound. Relayed,
                # after what was held; the client sees them as PostgreSQL would send them.
                self._relay.insert(b"".join(wrapped.held))
                wrapped.held.clear()
                wrapped.size = 0
                return Action.FORWARD
            wrapped.hold(type_byte, bytes(msg))
            return Action.DROP
        # The COMMIT's answer: its tag is dropped ("COMMIT", or "ROLLBACK" after the statement
        # failed); an error (a deferred check) and notices join what the statement's answer held.
        if type_byte != m.B_COMMAND_COMPLETE:
            wrapped.hold_commit(type_byte, bytes(msg))
        return Action.DROP

    def _inspect_linked(self, type_byte: int, msg: memoryview) -> Action:
        """The linked inspector's own handling of a message (after a marker's inspector)."""
        if self._tracked:
            return self._inspect_tracked(type_byte, msg) if _TRACKED_WATCH[type_byte] else Action.FORWARD
        return self._inspect(type_byte, msg) if _LINKED_WATCH[type_byte] else Action.FORWARD

    def _journal_pipeline(self, journal: TransactionJournal) -> None:
        """The general path's ReadyForQuery, for the journal: an autocommit write answered while
        more requests are in flight must never be sent again."""
        in_flight = self.in_flight
        journal.answered_in_pipeline(self.tx_status, len(in_flight), in_flight.last_kind)

    def _answered(self) -> None:
        """A ReadyForQuery: one request answered (and, at status idle, a transaction done)."""
        stats = self.stats
        stats.queries += 1
        if self.tx_status == m.TX_IDLE:
            stats.transactions += 1
        started = self.in_flight.pop()
        if started >= 0.0:
            stats.query_duration.observe(clock() - started)

    def _inspect_tracked(self, type_byte: int, msg: memoryview) -> Action:
        client = self.client
        if type_byte == m.B_READY_FOR_QUERY:
            self.tx_status = msg[5]
            self._answered()
            if client is not None and client.journal is not None:
                self._journal_pipeline(client.journal)
        elif type_byte == m.B_PARAMETER_STATUS:
            name, value = m.decode_parameter_status(msg[5:])
            self.note_parameter(name, value)
        elif type_byte == m.B_ERROR and self._server_going_away(msg):
            return Action.DROP
        forward, before, after, failed = self.tracker.on_server_message(type_byte, self.tx_status)
        for name in failed:
            self.statements.discard(name)
        if type_byte == m.B_ERROR:
            for _ in range(self.tracker.take_skipped()):
                self.in_flight.pop()  # a Query the server skipped: no ReadyForQuery will answer it
        if before:
            self._relay.insert(before)
        if after:
            self._relay.insert(bytes(msg) + after if forward else after)
            forward = False
        pause = False
        if (
            type_byte == m.B_READY_FOR_QUERY
            and not self.tracker
            and client is not None
            and client.server_ready(self.tx_status)
        ):
            self._quiet_due = True
            pause = True
        if pause:
            return Action.FORWARD_PAUSE if forward else Action.DROP_PAUSE
        return Action.FORWARD if forward else Action.DROP

    @property
    def at_rest(self) -> bool:
        """Idle between transactions with nothing in flight: safe to reuse."""
        return (
            self.state is not ServerState.CLOSED
            and self.tx_status == m.TX_IDLE
            and self.outstanding == 0
            and self.owed_own == 0
            and not self.tracker
            and self._relay.at_boundary
        )

    @property
    def unrecoverable(self) -> str | None:
        """Why this server, given back by a client, cannot be put back in step (it is closed
        instead), or None if `resync` can (when it is not simply `at_rest`). See Pool.release."""
        if self.state is ServerState.CLOSED:
            return self.close_reason or "connection closed"
        if self.tx_status != m.TX_IDLE:
            return "client left mid-transaction"
        if self.outstanding or len(self.in_flight):
            # A Query or Sync still unanswered: it may run for long; closing cancels it.
            return "client left mid-query"
        if not self._relay.at_boundary:
            return "client left mid-response"
        return None

    @property
    def mid_response(self) -> bool:
        """Part of a message has gone to the client and the rest never will: its stream is broken."""
        return self._relay.mid_message

    def keep_linked(self) -> bool:
        """At a quiet point (`server_ready` saw it at rest), before the server is kept by its
        client: un-pause the relay; False (nothing done) if it holds bytes that came after the
        ReadyForQuery."""
        return self.state is not ServerState.CLOSED and self._relay.resume_empty()

    def settle(self) -> bool:
        """Before reuse: un-pause the relay; False if it was holding stray bytes (then don't reuse)."""
        return not self._relay.resume()

    # ---------------------------------------------------------------- detached mode

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def read_message(self) -> tuple[int, bytes]:
        while True:
            msg = self._reader.read_message()
            if msg is not None:
                return msg
            if self.state is ServerState.CLOSED:
                raise UpstreamUnavailable(
                    f"upstream {self.endpoint} closed the connection: {self.close_reason}"
                )
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
            self._wakeup = None

    def send(self, data: bytes) -> None:
        if self.transport is None:
            raise UpstreamUnavailable(f"upstream {self.endpoint} connection is closed")
        self.transport.write(data)

    async def negotiate_tls(self, tls: TlsSettings) -> None:
        ctx = tls.context()
        if ctx is None:
            return
        loop = asyncio.get_running_loop()
        self._ssl_reply = loop.create_future()
        self.send(m.ssl_request())
        reply = await self._ssl_reply
        self._ssl_reply = None
        if reply[:1] == b"S":
            assert self.transport is not None
            new_transport = await loop.start_tls(
                self.transport, self, ctx, server_hostname=self.endpoint.host
            )
            self.transport = cast(asyncio.Transport, new_transport)
        elif reply[:1] == b"N":
            if tls.mode in ("require", "verify-full"):
                raise UpstreamUnavailable(
                    f"upstream {self.endpoint} does not support TLS and upstream.tls is {tls.mode}"
                )
        else:
            raise UpstreamUnavailable(f"upstream {self.endpoint} answered SSLRequest with {reply[:1]!r}")

    async def login(self, params: dict[str, str], password: str | None) -> None:
        """Startup and authentication; returns once the server sent ReadyForQuery."""
        self.state = ServerState.LOGIN
        reported: dict[str, str] = {}
        auth = UpstreamAuthenticator(params["user"], password)
        self.send(m.startup_message(params))
        while True:
            type_byte, body = await self.read_message()
            if type_byte == m.B_AUTH:
                reply = auth.handle(*m.decode_auth(body))
                if reply is not None:
                    self.send(reply)
            elif type_byte == m.B_PARAMETER_STATUS:
                name, value = m.decode_parameter_status(body)
                reported[name] = value
            elif type_byte == m.B_BACKEND_KEY_DATA:
                self.backend_key = m.decode_backend_key_data(body)
            elif type_byte == m.B_READY_FOR_QUERY:
                self.tx_status = m.decode_ready_for_query(body)
                self.params = shared_params(reported)
                self.state = ServerState.IDLE
                return
            elif type_byte == m.B_ERROR:
                fields = m.decode_error_fields(body)
                code = fields.get("C", "")
                if code in ("28P01", "28000"):
                    # Keep PostgreSQL's own code: 28000 (no such role / pg_hba) vs 28P01 (password).
                    raise error_class(code)(fields.get("M", "upstream authentication failed"))
                raise UpstreamError(fields)
            # NoticeResponse and NegotiateProtocolVersion need no answer during login.

    async def simple_query(self, sql: str, resync: bool = False) -> QueryResult:
        """Run one statement the sidecar itself needs (reset, SET, probe); text results.
        `resync`: send RESYNC first, in the same write (see there)."""
        ahead = self.owed_own
        if resync:
            self.send(RESYNC + m.query(sql))
            self.owed_own += 2
            ahead += 1
        else:
            self.send(m.query(sql))
            self.owed_own += 1
        if ahead:
            await self._read_past(ahead)
        result = QueryResult()
        error: UpstreamError | None = None
        while True:
            type_byte, body = await self.read_message()
            if type_byte == m.B_ROW_DESCRIPTION:
                result.columns = m.decode_row_description(body)
            elif type_byte == m.B_DATA_ROW:
                result.rows.append([None if v is None else v.decode() for v in m.decode_data_row(body)])
            elif type_byte == m.B_COMMAND_COMPLETE:
                result.tag = m.decode_command_complete(body)
            elif type_byte == m.B_PARAMETER_STATUS:
                name, value = m.decode_parameter_status(body)
                self.note_parameter(name, value)
                result.parameter_status.append(m.message(b"S", body))
            elif type_byte == m.B_ERROR:
                error = UpstreamError(m.decode_error_fields(body))
            elif type_byte == m.B_NOTIFICATION:
                # A NOTIFY for the session's client arrived during the sidecar's own query: deliver
                # it when the client is linked again rather than lose it.
                self.held_notifications.append(m.message(b"A", body))
            elif type_byte == m.B_READY_FOR_QUERY:
                self.tx_status = m.decode_ready_for_query(body)
                self.owed_own -= 1
                if error is not None:
                    raise error
                return result

    async def prepare(self, parse_messages: list[bytes]) -> list[str]:
        """Re-create a moved session's named statements; returns the errors of those that failed.

        Each Parse gets its own Sync, so one statement that no longer prepares (a dropped table)
        does not stop the others; the client gets that error when it uses the statement, as it
        would have directly.
        """
        ahead = self.owed_own
        self.send(b"".join(msg + m.sync() for msg in parse_messages))
        self.owed_own += len(parse_messages)
        if ahead:
            await self._read_past(ahead)
        errors: list[str] = []
        remaining = len(parse_messages)
        while remaining:
            type_byte, body = await self.read_message()
            if type_byte == m.B_ERROR:
                errors.append(m.error_summary(m.decode_error_fields(body)))
            elif type_byte == m.B_READY_FOR_QUERY:
                self.tx_status = m.decode_ready_for_query(body)
                self.owed_own -= 1
                remaining -= 1
        return errors

    async def resync(self) -> None:
        """Put the server back in step after a client left mid-batch (RESYNC), and read past
        every answer still owed, its own and the client's. The caller bounds the wait."""
        ahead = self.owed_own + 1
        self.send(RESYNC)
        self.owed_own += 1
        await self._read_past(ahead)
        self.tracker.clear()

    async def _read_past(self, readies: int) -> None:
        """Read and drop answers up to the `readies`-th ReadyForQuery: those of requests given up
        (their readers gone) or of a client that left. What must not be lost is kept: reported
        parameter values and NOTIFYs."""
        while readies:
            type_byte, body = await self.read_message()
            if type_byte == m.B_READY_FOR_QUERY:
                self.tx_status = m.decode_ready_for_query(body)
                self.owed_own -= 1
                readies -= 1
            elif type_byte == m.B_PARAMETER_STATUS:
                name, value = m.decode_parameter_status(body)
                self.note_parameter(name, value)
            elif type_byte == m.B_NOTIFICATION:
                self.held_notifications.append(m.message(b"A", body))

    def close(self, reason: str) -> None:
        """Close the connection (politely with Terminate when it is at a boundary)."""
        if self.state is ServerState.CLOSED:
            return
        self.close_reason = self.close_reason or reason
        transport = self.transport
        if transport is not None:
            if self._relay.at_boundary and not transport.is_closing():
                transport.write(m.terminate())
            transport.close()
        self.state = ServerState.CLOSED
        client = self.client
        if client is not None:
            # Told now, not at connection_lost: a request the client sends meanwhile must not go
            # to a connection that will never answer it (the session moves first).
            self.client = None
            client.server_lost(self, self.close_reason)

    def on_close(self, callback: Callable[[ServerConnection], None]) -> None:
        self._on_close = callback


async def connect(
    endpoint: Endpoint,
    params: dict[str, str],
    password: str | None,
    *,
    tls: TlsSettings,
    timeout: float,
    max_message_size: int,
    stats: Stats | None = None,
) -> ServerConnection:
    """Open, secure and log in an upstream connection, all within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    server = ServerConnection(endpoint, max_message_size, stats)
    started = monotonic()
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: server, endpoint.host, endpoint.port)
            await server.negotiate_tls(tls)
            await server.login(params, password)
    except TimeoutError as exc:
        server.close("connect timeout")
        raise UpstreamUnavailable(
            f"could not connect to upstream {endpoint}: no answer within {timeout:g}s "
            "(upstream.connect_timeout)"
        ) from exc
    except ssl.SSLCertVerificationError as exc:
        # Before OSError (its base class): say what failed in words an operator can act on, not
        # OpenSSL's "[SSL: CERTIFICATE_VERIFY_FAILED] ... (_ssl.c:1006)".
        server.close("TLS verification failed")
        raise UpstreamUnavailable(
            f"could not connect to upstream {endpoint}: TLS certificate verification failed: "
            f"{_verify_problem(exc)} (upstream.tls is {tls.mode}, ca_file {tls.ca_file})"
        ) from exc
    except ssl.SSLError as exc:
        server.close("TLS handshake failed")
        raise UpstreamUnavailable(
            f"could not connect to upstream {endpoint}: TLS handshake failed: {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        server.close("connect failed")
        raise UpstreamUnavailable(f"could not connect to upstream {endpoint}: {exc.strerror or exc}") from exc
    except BaseException:
        server.close("login failed")
        raise
    logs.event(
        "server_connected",
        server=server.id,
        upstream=str(endpoint),
        user=params.get("user"),
        database=params.get("database"),
        ms=round((monotonic() - started) * 1000, 1),
    )
    return server


def _verify_problem(exc: ssl.SSLCertVerificationError) -> str:
    # verify_message is OpenSSL's reason ("unable to get local issuer certificate", "IP address
    # mismatch, certificate is not valid for '10.0.0.5'."); it is None when the error was raised
    # by Python's own hostname check rather than by OpenSSL.
    message = exc.verify_message or exc.reason or str(exc)
    return str(message).rstrip(".")


async def send_cancel(endpoint: Endpoint, key: tuple[int, int], timeout: float) -> None:
    """Forward a CancelRequest to the backend that runs the client's query."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        writer.write(m.cancel_request(*key))
        await writer.drain()
        # The server closes without answering; wait for that so the cancel is delivered.
        await reader.read(1)
        writer.close()
