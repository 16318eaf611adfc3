"""Protocol-level prepared statements under transaction pooling.

A client's named statement lives on whichever server ran its Parse; the next transaction may run
on another server. So the sidecar renames every named statement to a sidecar-wide name keyed by
(query text, parameter types), prepares it lazily on the server that needs it, answers the
client's Close itself, and bounds each server's set of statements (LRU).

Renaming means the server's answers no longer match the client's messages one for one: a Parse the
sidecar injected produces a ParseComplete the client must not see, and a Parse the sidecar skipped
(the server already had the statement) owes the client a ParseComplete. `ResponseTracker` queues one
entry per message sent to the server and walks the server's answers against it, so each answer is
forwarded, dropped, or preceded by a synthetic one at exactly the right place.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from .protocol import messages as m
from .protocol.framing import Action, Relay
from .protocol.sqlstate import ProtocolViolation


class Expect(IntEnum):
    PARSE = 1  # the client's Parse: its ParseComplete goes to the client
    PARSE_HIDDEN = 2  # a Parse the sidecar injected: its ParseComplete is dropped
    BIND = 3
    DESCRIBE_STATEMENT = 4  # ParameterDescription, then RowDescription or NoData
    DESCRIBE_PORTAL = 5  # RowDescription or NoData
    EXECUTE = 6  # DataRows, then CommandComplete / EmptyQuery / PortalSuspended
    CLOSE = 7
    CLOSE_HIDDEN = 8  # an LRU eviction's Close: its CloseComplete is dropped
    SYNC = 9  # ReadyForQuery
    QUERY = 10  # simple Query or FunctionCall: everything up to ReadyForQuery
    BIND_HIDDEN = 13  # a Bind the sidecar injected: its BindComplete is dropped
    SYNTHETIC = 11  # the sidecar answers: `data` is sent when this entry reaches the head


@dataclass(slots=True)
class Entry:
    kind: Expect
    name: str | None = None  # the sidecar-wide statement name for PARSE / PARSE_HIDDEN / CLOSE_HIDDEN
    data: bytes = b""  # SYNTHETIC: the bytes owed to the client


# Server messages that end the answer to one entry.
_ENDS: Final = {
    Expect.PARSE: frozenset(b"1"),
    Expect.PARSE_HIDDEN: frozenset(b"1"),
    Expect.BIND: frozenset(b"2"),
    Expect.BIND_HIDDEN: frozenset(b"2"),
    Expect.DESCRIBE_STATEMENT: frozenset(b"Tn"),
    Expect.DESCRIBE_PORTAL: frozenset(b"Tn"),
    Expect.EXECUTE: frozenset(b"CIs"),
    Expect.CLOSE: frozenset(b"3"),
    Expect.CLOSE_HIDDEN: frozenset(b"3"),
    Expect.SYNC: frozenset(b"Z"),
    Expect.QUERY: frozenset(b"Z"),
}
_HIDDEN: Final = frozenset({Expect.PARSE_HIDDEN, Expect.BIND_HIDDEN, Expect.CLOSE_HIDDEN})
_SYNTHETIC: Final = frozenset({Expect.SYNTHETIC})
# Messages that may arrive at any time and answer nothing.
ASYNC_TYPES: Final = frozenset(b"NAS")
# Every message type that can be part of an answer: what the server relay watches when tracking.
TRACKED_RESPONSE_TYPES: Final = frozenset(b"123tTnCIsZEV") | ASYNC_TYPES | frozenset(b"GHW")


class StatementRegistry:
    """Sidecar-wide names for (query, parameter types): the same statement gets the same name on
    every server, so a server prepared by one client serves the next without a new Parse."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, tuple[int, ...]], str] = {}
        self._ids = itertools.count(1)

    def name_for(self, query: str, param_types: tuple[int, ...]) -> str:
        key = (query, param_types)
        name = self._names.get(key)
        if name is None:
            name = f"pgsidecar_{next(self._ids)}"
            self._names[key] = name
        return name

    def __len__(self) -> int:
        return len(self._names)


@dataclass(frozen=True, slots=True)
class ClientStatement:
    """A client's named statement: its sidecar-wide name and the Parse that creates it."""

    global_name: str
    parse_message: bytes  # a complete Parse message under `global_name`


def rename_in(msg: memoryview, offset: int, old_len: int, new_name: str) -> bytes:
    """Copy of message `msg` with the C string of `old_len` bytes at `offset` replaced."""
    tail = msg[offset + old_len :]
    body = bytes(msg[5:offset]) + new_name.encode() + tail
    return bytes(msg[:1]) + (len(body) + 4).to_bytes(4, "big") + body


class ServerStatements:
    """The sidecar-wide statements prepared on one server, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._lru: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, name: str) -> None:
        self._lru.move_to_end(name)

    def add(self, name: str) -> list[str]:
        """Record `name` as prepared; returns the names evicted to stay within capacity."""
        self._lru[name] = None
        self._lru.move_to_end(name)
        evicted = []
        while len(self._lru) > self.capacity:
            old, _ = self._lru.popitem(last=False)
            evicted.append(old)
        return evicted

    def discard(self, name: str | None) -> None:
        if name is not None:
            self._lru.pop(name, None)

    def replace_all(self, names: set[str]) -> None:
        self._lru = OrderedDict.fromkeys(sorted(names))


class ResponseTracker:
    """Walks a server's answers against what was sent (see module docstring)."""

    __slots__ = ("_pending", "_queued", "fast", "queue", "skipped_requests", "skipping")

    def __init__(self) -> None:
        self.queue: deque[Entry] = deque()
        # A fast path's entries, not yet copied into `queue`: the answer ending in ReadyForQuery
        # usually settles them at once (`clear`), so they go into the deque only when an answer
        # must be walked message by message (`_flush`). Compiled, the deque's methods are generic
        # calls (about 300 instructions each); a tuple attribute is a native store.
        self._pending: tuple[Entry, ...] = ()
        self._queued = False  # whether `queue` may hold entries (so `clear` must empty it)
        # After an error in an extended-protocol batch the server ignores everything up to Sync;
        # messages sent meanwhile get no entry (they will get no answer).
        self.skipping = False
        # Set by the client's fast paths when what they queued is one request whose answer needs
        # no matching (no hidden or synthetic entry, one Sync or Query, last); any other `expect`
        # clears it. A whole answer ending in ReadyForQuery then settles the queue at once.
        self.fast = False
        # Queries (and FunctionCalls) the server ignored because an error before them in the
        # same batch started the skip to Sync: their ReadyForQuery will never come. The server
        # connection takes them off its requests in flight (`take_skipped`).
        self.skipped_requests = 0

    def __bool__(self) -> bool:
        return len(self._pending) > 0 or (self._queued and len(self.queue) > 0)

    def _flush(self) -> deque[Entry]:
        """The queue, with any pending fast-path entries at its end (they were queued last)."""
        if self._pending:
            self.queue.extend(self._pending)
            self._pending = ()
        self._queued = True
        return self.queue

    def clear(self) -> None:
        self._pending = ()
        if self._queued:
            self.queue.clear()
            self._queued = False
        self.skipping = False
        self.fast = False

    def expect(
        self, kind: Expect, name: str | None = None, data: bytes = b"", tx_status: int = m.TX_IDLE
    ) -> bytes:
        """Queue an entry; returns bytes owed to the client right now (a synthetic answer with
        nothing before it in the queue), else b""."""
        self.fast = False
        queue = self._flush()
        queue.append(Entry(kind, name, data))
        if len(queue) == 1 and kind in _SYNTHETIC:
            return self.pop_synthetic(tx_status)
        return b""

    def expect_fast(self, entries: tuple[Entry, ...]) -> None:
        """A fast path's one request (after its Sync or Query): `entries` are shared, plain
        (neither hidden nor synthetic) and never changed, so the answer needs no matching."""
        self.skipping = False
        if self._pending or self._queued:
            self._flush().extend(entries)  # (not the usual case: nothing else is in flight)
        else:
            self._pending = entries
        self.fast = True

    def pop_synthetic(self, tx_status: int) -> bytes:
        """Answers owed for synthetic entries now at the head of the queue."""
        out = b""
        queue = self._flush()
        while queue and queue[0].kind in _SYNTHETIC:
            out += queue.popleft().data
        return out

    def on_server_message(self, type_byte: int, tx_status: int) -> tuple[bool, bytes, bytes, list[str]]:
        """Account for one server message.

        Returns (forward it, bytes to send before it, bytes to send after it, names of statements
        that turned out not to be prepared because the server skipped or rejected their Parse).
        """
        queue = self._flush()
        before = self.pop_synthetic(tx_status)
        if type_byte in ASYNC_TYPES or not queue:
            return True, before, b"", []
        head = queue[0]
        failed: list[str] = []
        if type_byte == 0x45:  # ErrorResponse
            if head.kind is Expect.QUERY:
                return True, before, b"", []
            # The failing message and everything up to Sync are skipped by the server, a simple
            # Query too (PostgreSQL ignores every message until Sync; only the Sync is answered).
            while queue and queue[0].kind is not Expect.SYNC:
                entry = queue.popleft()
                if entry.kind is Expect.QUERY:
                    self.skipped_requests += 1
                elif entry.kind in (Expect.PARSE, Expect.PARSE_HIDDEN) and entry.name:
                    failed.append(entry.name)
            if not queue:
                self.skipping = True
            return True, before, b"", failed
        if type_byte in _ENDS.get(head.kind, ()):
            queue.popleft()
            forward = head.kind not in _HIDDEN
            return forward, before, self.pop_synthetic(tx_status), failed
        return True, before, b"", failed

    def hidden_parses(self) -> list[str]:
        """The statements queued to be prepared ahead of the client's messages (PARSE_HIDDEN)."""
        return [e.name for e in self._flush() if e.kind is Expect.PARSE_HIDDEN and e.name]

    def sync_sent(self) -> None:
        self.skipping = False

    def take_skipped(self) -> int:
        """How many requests (Query, FunctionCall) the server skipped since the last call."""
        skipped = self.skipped_requests
        self.skipped_requests = 0
        return skipped


def prepare_on(server: Any, stmt: ClientStatement, hidden_parse: bool = True) -> tuple[bytes, int]:
    """The messages that prepare `stmt` on `server`, which lacks it: a Close of each statement the
    server's cache evicts to make room, then the Parse. Their answers are queued on the server's
    tracker, the Closes' hidden (the client never asked for them) and the Parse's hidden too unless
    `hidden_parse` is False (it is the client's own Parse, whose ParseComplete it awaits). Returns
    the messages and how many hidden answers they queue."""
    prefix = b""
    hidden = 0
    tracker: ResponseTracker = server.tracker
    for old in server.statements.add(stmt.global_name):
        prefix += m.close("S", old)
        tracker.expect(Expect.CLOSE_HIDDEN, old)
        hidden += 1
    if hidden_parse:
        tracker.expect(Expect.PARSE_HIDDEN, stmt.global_name)
        hidden += 1
    else:
        tracker.expect(Expect.PARSE, stmt.global_name)
    return prefix + stmt.parse_message, hidden


class StatementRouter:
    """One transaction-pooled client's named statements, and the rewriting of its extended-protocol
    messages for whichever server runs its current transaction.

    Each `on_*` method is called from the client relay's inspector with the whole message; it may
    `relay.insert()` replacement bytes, queues the answers it expects on the server's tracker, and
    returns the relay action plus any bytes owed to the client at once.
    """

    def __init__(self, registry: StatementRegistry) -> None:
        self.registry = registry
        self.statements: dict[str, ClientStatement] = {}  # client's name -> sidecar-wide statement
        # The client's unnamed statement (its last Parse("")): drivers such as pg8000 Parse in one
        # Sync and Bind in the next, by which time another server may run the transaction.
        self.unnamed: bytes | None = None
        # Statements the sidecar answers itself (DEALLOCATE of the client's names): name -> effect.
        self.local: dict[str, LocalStatement] = {}
        self.local_portals: dict[str, LocalStatement] = {}

    def _ensure_prepared(self, stmt: ClientStatement, server: Any, relay: Relay) -> None:
        """Prepare `stmt` on `server` ahead of the current message if it is not there yet."""
        statements: ServerStatements = server.statements
        if stmt.global_name in statements:
            statements.touch(stmt.global_name)
            return
        relay.insert(prepare_on(server, stmt)[0])

    def on_parse(
        self, msg: memoryview, server: Any, relay: Relay, local: LocalStatement | None = None
    ) -> tuple[Action, bytes]:
        tracker: ResponseTracker = server.tracker
        parse = m.decode_parse(msg[5:])
        if local is not None:
            self.local[parse.name] = local
            return Action.DROP, self._owe(server, m.parse_complete())
        self.local.pop(parse.name, None)
        if not parse.name:
            self.unnamed = bytes(msg)
            server.unnamed_from = self.unnamed
            tracker.expect(Expect.PARSE)
            return Action.FORWARD, b""
        global_name = self.registry.name_for(parse.query, parse.param_types)
        stmt = ClientStatement(global_name, m.parse(global_name, parse.query, parse.param_types))
        # PostgreSQL refuses to re-Parse an existing name (42P05) unless it was closed first; clients
        # that do so expect the new text, which the new mapping gives them.
        self.statements[parse.name] = stmt
        statements: ServerStatements = server.statements
        if global_name in statements:
            statements.touch(global_name)
            owed = tracker.expect(Expect.SYNTHETIC, data=m.parse_complete(), tx_status=server.tx_status)
            return Action.DROP, owed
        relay.insert(prepare_on(server, stmt, hidden_parse=False)[0])  # (the Parse is the client's)
        return Action.DROP, b""

    @staticmethod
    def _owe(server: Any, data: bytes) -> bytes:
        tracker: ResponseTracker = server.tracker
        return tracker.expect(Expect.SYNTHETIC, data=data, tx_status=server.tx_status)

    def _rename(self, msg: memoryview, name_offset: int, kind: Expect, server: Any, relay: Relay) -> Action:
        end = bytes(msg[name_offset:]).find(b"\x00")
        if end < 0:
            raise ProtocolViolation("malformed message: unterminated statement name")
        name = bytes(msg[name_offset : name_offset + end]).decode("utf-8", "replace")
        if not name and self.unnamed is not None and server.unnamed_from is not self.unnamed:
            # This server has not seen the client's unnamed statement (or has another client's).
            relay.insert(self.unnamed)
            server.tracker.expect(Expect.PARSE_HIDDEN)
            server.unnamed_from = self.unnamed
        stmt = self.statements.get(name) if name else None
        if stmt is None:
            # Unnamed, or unknown: the server answers exactly as it would directly (an unknown name
            # gets 26000 "prepared statement does not exist" with the client's own name).
            server.tracker.expect(kind)
            return Action.FORWARD
        self._ensure_prepared(stmt, server, relay)
        relay.insert(rename_in(msg, name_offset, end, stmt.global_name))
        server.tracker.expect(kind)
        return Action.DROP

    def on_bind(self, msg: memoryview, server: Any, relay: Relay) -> tuple[Action, bytes]:
        portal_end = bytes(msg[5:]).find(b"\x00")
        if portal_end < 0:
            raise ProtocolViolation("malformed Bind message")
        portal = bytes(msg[5 : 5 + portal_end]).decode("utf-8", "replace")
        statement = _cstr_at(msg, 5 + portal_end + 1)
        local = self.local.get(statement)
        if local is not None:
            self.local_portals[portal] = local
            return Action.DROP, self._owe(server, m.bind_complete())
        self.local_portals.pop(portal, None)
        return self._rename(msg, 5 + portal_end + 1, Expect.BIND, server, relay), b""

    def on_describe(self, msg: memoryview, server: Any, relay: Relay) -> tuple[Action, bytes]:
        if len(msg) < 7:
            raise ProtocolViolation("malformed Describe message")
        name = _cstr_at(msg, 6)
        if msg[5] == 0x53:  # 'S'
            if name in self.local:  # no parameters, no rows
                return Action.DROP, self._owe(server, m.parameter_description(()) + m.no_data())
            return self._rename(msg, 6, Expect.DESCRIBE_STATEMENT, server, relay), b""
        if name in self.local_portals:
            return Action.DROP, self._owe(server, m.no_data())
        server.tracker.expect(Expect.DESCRIBE_PORTAL)
        return Action.FORWARD, b""

    def on_execute(self, msg: memoryview, server: Any) -> tuple[Action, bytes]:
        local = self.local_portals.get(_cstr_at(msg, 5)) if self.local_portals else None
        if local is not None:
            return Action.DROP, self._owe(server, self.run_local(local))
        server.tracker.expect(Expect.EXECUTE)
        return Action.FORWARD, b""

    def run_local(self, local: LocalStatement) -> bytes:
        """Apply a statement the sidecar answers itself; returns its CommandComplete."""
        self.deallocate(local.target)
        return m.command_complete(local.tag)

    def on_close(self, msg: memoryview, server: Any) -> tuple[Action, bytes]:
        kind, name = m.decode_close(msg[5:])
        if kind == "S" and name in self.local:
            del self.local[name]
            return Action.DROP, self._owe(server, m.close_complete())
        if kind == "S" and name:
            # The statement stays prepared on the server for other clients; only the client's name
            # goes. PostgreSQL answers CloseComplete even for an unknown name, so do we.
            self.statements.pop(name, None)
            return Action.DROP, server.tracker.expect(
                Expect.SYNTHETIC, data=m.close_complete(), tx_status=server.tx_status
            )
        server.tracker.expect(Expect.CLOSE)
        return Action.FORWARD, b""

    def deallocate(self, name: str | None) -> None:
        """SQL `DEALLOCATE name` / `DEALLOCATE ALL` (name None) from the client."""
        if name is None:
            self.statements.clear()
        else:
            self.statements.pop(name, None)


@dataclass(frozen=True, slots=True)
class LocalStatement:
    """DEALLOCATE of the client's own statement names: the sidecar's to answer, since on the
    servers the statements are shared under sidecar-wide names."""

    tag: str  # "DEALLOCATE" or "DEALLOCATE ALL"
    target: str | None  # the client's statement name; None for ALL


def _cstr_at(msg: memoryview, offset: int) -> str:
    raw = bytes(msg[offset:])
    end = raw.find(b"\x00")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "replace")
