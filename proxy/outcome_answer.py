"""The commit marker on the wire: its ids, its Query (`marker_query`) and its answer, which the
server connection swallows (`MarkerAnswer`). Here, apart from the rest of `proxy.outcome`, so that
`proxy.server` can use it without importing the ledger service (which imports the server), and so
that it is compiled with the data path: a session draws an id and builds the Query at every
writing COMMIT."""

from __future__ import annotations

import re
import secrets
from typing import Final

from mypy_extensions import mypyc_attr

from .protocol import messages as m

_MARKER_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_MASK64: Final = (1 << 64) - 1
_LAST_DIGITS: Final = [f"{i:02x}" for i in range(256)]  # an id's last byte, as text


def pool_key(user: str, database: str) -> str:
    """A pool's name in `MarkerSource.ready`: one string, whose hash is kept, rather than a tuple
    hashed at every COMMIT. (NUL cannot be in either name: both are C strings on the wire.)"""
    return f"{user}\x00{database}"


def _checked_id(marker_id: str) -> str:
    # Interpolated into SQL text: only ever a uuid's canonical text, never anything else.
    if _MARKER_ID.match(marker_id) is None:
        raise ValueError(f"not a marker id: {marker_id!r}")
    return marker_id


def marker_statement(marker_id: str) -> bytes:
    """The SQL the session runs in the client's transaction just before its COMMIT."""
    return f"SELECT pgsidecar.mark_commit('{_checked_id(marker_id)}'::uuid)".encode()


# `marker_query` around the id: every id has the same length, so the message's is known.
_SAMPLE_ID: Final = "00000000-0000-0000-0000-000000000000"
_MARKER_PARTS: Final = m.query(marker_statement(_SAMPLE_ID).decode()).split(_SAMPLE_ID.encode())
_MARKER_HEAD: Final = _MARKER_PARTS[0]
_MARKER_TAIL: Final = _MARKER_PARTS[1]


def own_marker_query(marker_id: str) -> bytes:
    """`marker_query` of an id `MarkerIds.next` made (hex digits and dashes by construction, so
    not matched against the pattern again: this runs at every writing COMMIT)."""
    return _around_own_id(_MARKER_HEAD, marker_id, _MARKER_TAIL)


def _around_own_id(head: bytes, marker_id: str, tail: bytes) -> bytes:
    if len(marker_id) != 36:
        raise ValueError(f"not a marker id: {marker_id!r}")
    return head + marker_id.encode() + tail


# The marked COMMIT (`marked_commit_query`): the marker and a COMMIT in one extended-protocol
# batch, run as two statements the sidecar prepares once per server connection, so that PostgreSQL
# does not parse, analyse and plan the marker's SELECT at every writing COMMIT (a third of what
# the marker costs it). One Sync: the server flushes its answer once, at the end. Bound to the
# unnamed portal, which a COMMIT drops anyway; the client's unnamed statement is left alone.
# (ARCHITECTURE.md, "Transaction replay": commit outcomes.)
MARK_STATEMENT: Final = "pgsidecar_mark_commit"
COMMIT_STATEMENT: Final = "pgsidecar_commit"
MARKED_COMMIT_STATEMENTS: Final = frozenset({MARK_STATEMENT, COMMIT_STATEMENT})
# Sent ahead of the batch on a server connection that may not hold both statements: Close of a
# statement that does not exist succeeds, so this holds whatever the connection holds.
PREPARE_MARKED_COMMIT: Final = (
    m.close("S", MARK_STATEMENT)
    + m.close("S", COMMIT_STATEMENT)
    + m.parse(MARK_STATEMENT, "SELECT pgsidecar.mark_commit($1::uuid)")
    + m.parse(COMMIT_STATEMENT, "COMMIT")
)
_COMMIT_PARTS: Final = (
    m.bind("", MARK_STATEMENT, (), [_SAMPLE_ID.encode()])
    + m.execute()
    + m.bind("", COMMIT_STATEMENT)
    + m.execute()
    + m.sync()
).split(_SAMPLE_ID.encode())
_COMMIT_HEAD: Final = _COMMIT_PARTS[0]
_COMMIT_TAIL: Final = _COMMIT_PARTS[1]


# Where the id is in a `marked_commit_query`, and the end of one from each id's last two digits.
COMMIT_ID_AT: Final = len(_COMMIT_HEAD)
_COMMIT_LAST: Final = [f"{i:02x}".encode() + _COMMIT_TAIL for i in range(256)]


def marked_commit_query(marker_id: str) -> bytes:
    """The marker and a COMMIT in one batch (Bind and Execute of each, one Sync), sent in place
    of the client's plain COMMIT, on a server connection that holds both statements (else behind
    `PREPARE_MARKED_COMMIT`). `marker_id` as `own_marker_query`."""
    return _around_own_id(_COMMIT_HEAD, marker_id, _COMMIT_TAIL)


class MarkerIds:
    """Marker ids for one process: a random 64-bit prefix and a counter, as a uuid's text
    (`pppppppp-pppp-pppp-cccc-cccccccccccc`, the counter's top 16 bits in the fourth group).

    Drawn at every writing COMMIT, so without formatting a number each time: the text of all but
    the counter's last byte is made once per 256 ids (and, as bytes, the start of the marked
    COMMIT's Query), and the last two digits come from a table."""

    def __init__(self, prefix: int | None = None) -> None:
        self.prefix = secrets.randbits(64) if prefix is None else prefix & _MASK64
        self._n = 0
        self._head = ""
        self._commit_head = b""  # `marked_commit_query` up to the id's last two digits
        self._head_at = -1  # the counter's top 56 bits `_head` was made for
        self._renew_head(0)

    def _renew_head(self, top: int) -> None:
        text = f"{self.prefix:016x}{top:014x}"
        self._head = f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
        self._commit_head = _COMMIT_HEAD + self._head.encode()
        self._head_at = top

    def _advance(self) -> int:
        """The next counter value's last byte (the head renewed when its block changes)."""
        n = self._n + 1
        if n >> 8 != self._head_at:
            # (Masked here, not per id: a mask of 64 bits is arithmetic on a long.)
            n &= _MASK64  # wraps (in some centuries) rather than growing past 64 bits
            self._renew_head(n >> 8)
        self._n = n
        return n & 0xFF

    def next(self) -> str:
        low = self._advance()  # (first: it may renew the head)
        return self._head + _LAST_DIGITS[low]

    def next_commit_query(self) -> bytes:
        """`marked_commit_query` of the next id, in one concatenation (no str made: the id is
        read back from the Query, `COMMIT_ID_AT`, only when a cut needs it)."""
        low = self._advance()
        return self._commit_head + _COMMIT_LAST[low]


@mypyc_attr(allow_interpreted_subclasses=True)
class MarkerSource:
    """What a session asks at every writing COMMIT: may this pool write a marker now, and with
    which id. Kept current by the ledger service (`outcome.CommitOutcomeLedger`: `enabled` at
    start and on reload, `ready` as pools are checked); compiled, so that asking is a native call."""

    def __init__(self) -> None:
        self.enabled = False  # failover.commit_outcome: marker
        self.ready: set[str] = set()  # `pool_key` of the pools whose ledger works
        self.ids = MarkerIds()

    def new_commit_query(self, pool: str) -> bytes | None:
        """`new_marker`'s id as the marked COMMIT's Query (`MarkerIds.next_commit_query`)."""
        if not self.enabled or pool not in self.ready:
            return None
        return self.ids.next_commit_query()

    def new_marker(self, pool: str) -> str | None:
        """A fresh marker id for a COMMIT of the pool `pool` (its `pool_key`), or None when the
        ledger may not be used there (the COMMIT then goes without one, and a cut gets 08007 as
        before)."""
        if not self.enabled or pool not in self.ready:
            return None
        return self.ids.next()


def marker_query(marker_id: str) -> bytes:
    """`marker_statement` as a simple Query message, ready to send (ahead of the COMMIT, in the
    same write: the server runs them in order). Built per COMMIT: no formatting beyond the id."""
    return _MARKER_HEAD + _checked_id(marker_id).encode() + _MARKER_TAIL


class MarkerAnswer:
    """Recognises the answer to `marker_query`, which the session swallows (the client never
    asked for it): RowDescription, DataRow ('t' or 'f'), CommandComplete "SELECT 1",
    ReadyForQuery; or ErrorResponse then ReadyForQuery ('E').

    `feed` each backend message in order; it returns True at the message that ends the answer.
    NotificationResponse and ParameterStatus are not part of the answer (PostgreSQL may send them
    at any time): `feed` ignores them and the session relays them as usual. NoticeResponse is
    swallowed (the client did not run this).

    After an error the transaction is aborted, and the client's COMMIT, already sent behind the
    marker, answers "ROLLBACK": the session must not relay that tag as it is but send the marker's
    ErrorResponse (`error`) in its place followed by the COMMIT's ReadyForQuery, as PostgreSQL does
    when a deferred constraint fails at COMMIT, so that the client knows nothing was committed.

    `combined`: the marked COMMIT's batch (`marked_commit_query`, perhaps behind
    `PREPARE_MARKED_COMMIT`): CloseComplete and ParseComplete of the statements prepared first,
    BindComplete, DataRow and CommandComplete of the marker; the answer ends at the COMMIT's
    BindComplete (its CommandComplete and the one ReadyForQuery follow). After an error it ends
    at the ReadyForQuery ('E': the rest of the batch, the COMMIT too, was skipped).
    """

    __slots__ = ("combined", "done", "error", "marked", "ran")

    def __init__(self, combined: bool = False) -> None:
        self.marked: bool | None = None  # True: the marker row was written (the transaction had an xid)
        self.error: dict[str, str] | None = None  # the ErrorResponse's fields, if the call failed
        self.done = False
        self.combined = combined
        self.ran = False  # the marker's CommandComplete came

    def feed(self, type_byte: int, body: bytes | memoryview) -> bool:
        if self.done:
            raise ValueError("the marker's answer is already complete")
        if type_byte == m.B_DATA_ROW:
            values = m.decode_data_row(body)
            self.marked = len(values) == 1 and values[0] == b"t"
        elif type_byte == m.B_ERROR:
            self.error = m.decode_error_fields(body)
        elif type_byte == m.B_READY_FOR_QUERY:
            self.done = True
        elif type_byte == m.B_COMMAND_COMPLETE:
            self.ran = True
        elif self.combined and type_byte in (m.B_BIND_COMPLETE, m.B_PARSE_COMPLETE, m.B_CLOSE_COMPLETE):
            if type_byte == m.B_BIND_COMPLETE and self.ran:
                self.done = True  # the COMMIT's Bind: what follows is the COMMIT's answer
        elif type_byte not in (m.B_ROW_DESCRIPTION, m.B_NOTICE, m.B_NOTIFICATION, m.B_PARAMETER_STATUS):
            raise ValueError(f"unexpected message {chr(type_byte)!r} in the answer to the commit marker")
        return self.done

    @staticmethod
    def passes_through(type_byte: int) -> bool:
        """A message that arrives during the marker's answer but belongs to the client."""
        return type_byte in (m.B_NOTIFICATION, m.B_PARAMETER_STATUS)


# ---------------------------------------------------------------- an autocommit write, wrapped

# `WrappedAnswer.phase`: whose answer is coming (the four Queries of a wrapped autocommit write).
WRAP_BEGIN: Final = 0
WRAP_STATEMENT: Final = 1
WRAP_MARKER: Final = 2
WRAP_COMMIT: Final = 3
WRAP_REPARSE: Final = 4  # the client's unnamed statement parsed again (`expect_wrapped(reparse=)`)
# A marked COMMIT's answer, as `_resolve` gives it when the marker says it committed.
COMMIT_TAG: Final = m.command_complete("COMMIT")


def _marker_answer(wrote: bytes) -> bytes:
    """What PostgreSQL answers `outcome.marker_query` when the marker ran: one bool column,
    `mark_commit`, true if the transaction had written (a row was added), in a block (`T`)."""
    column = b"mark_commit\x00" + (0).to_bytes(4, "big") + (0).to_bytes(2, "big") + (16).to_bytes(4, "big")
    column += (1).to_bytes(2, "big") + (-1).to_bytes(4, "big", signed=True) + (0).to_bytes(2, "big")
    return (
        m.message(b"T", (1).to_bytes(2, "big") + column)
        + m.message(b"D", (1).to_bytes(2, "big") + (1).to_bytes(4, "big") + wrote)
        + m.command_complete("SELECT 1")
        + m.ready_for_query(m.TX_IN_BLOCK)
    )


def _combined_answer(wrote: bytes) -> bytes:
    """The marker's part of the answer to `marked_commit_query` (on a server connection that
    holds both statements): BindComplete, DataRow, CommandComplete, and the COMMIT's BindComplete."""
    return (
        m.message(b"2")
        + m.message(b"D", (1).to_bytes(2, "big") + (1).to_bytes(4, "big") + wrote)
        + m.command_complete("SELECT 1")
        + m.message(b"2")
    )


# The answers `_swallow_marker` recognises whole, without the relay.
MARKER_WROTE: Final = _marker_answer(b"t")
MARKER_READ_ONLY: Final = _marker_answer(b"f")
COMBINED_WROTE: Final = _combined_answer(b"t")
COMBINED_READ_ONLY: Final = _combined_answer(b"f")
# Past this many bytes of a wrapped statement's notices, they are relayed rather than held.
WRAP_HOLD_MAX: Final = 65536


class WrappedAnswer:
    """The answers to a wrapped autocommit write (`ServerConnection.expect_wrapped`), rewritten
    into what PostgreSQL sends for the statement alone: BEGIN's answer and every ReadyForQuery but
    the COMMIT's dropped, the marker's swallowed, the statement's messages held until the COMMIT
    answers. Then: committed, the statement's answer as it came; the statement failed, its error;
    the COMMIT failed (a deferred check), the statement's answer without its CommandComplete
    (PostgreSQL commits an autocommit statement before it sends the tag) and the COMMIT's error.
    Held so that a cut before the COMMIT's answer leaves nothing of it relayed: the outcome found
    on the new writer decides what the client gets (`committed_answer`)."""

    __slots__ = (
        "batch", "commit_failed", "held", "hidden", "hidden_failed", "phase", "reparse", "size",
        "statement_failed", "tag",
    )  # fmt: skip

    def __init__(self, batch: bool = False, reparse: bool = False, hidden: int = 0) -> None:
        # Answers of messages the sidecar put first (a statement prepared, evicted ones closed):
        # dropped, as long as they succeed.
        self.hidden = hidden
        self.hidden_failed = False
        # An extended-protocol batch: PostgreSQL sends an Execute's tag before the Sync commits,
        # so a COMMIT that fails comes after it.
        self.batch = batch
        # The batch's Parse of the unnamed statement is sent again after the COMMIT (whose
        # simple Query dropped it), its answer swallowed: the statement stays the client's.
        self.reparse = reparse
        self.phase = WRAP_BEGIN
        self.held: list[bytes] = []  # whole messages, in order
        self.size = 0  # their bytes
        self.tag: bytes | None = None  # the statement's CommandComplete, once it came
        self.statement_failed = False
        self.commit_failed = False

    def hold(self, type_byte: int, msg: bytes) -> None:
        if self.hidden and (type_byte == m.B_PARSE_COMPLETE or type_byte == m.B_CLOSE_COMPLETE):
            self.hidden -= 1
            return
        if self.hidden and type_byte == m.B_ERROR:
            self.hidden_failed = True  # (the server skips the rest; the client gets the error)
        self.hidden = 0
        if type_byte == m.B_COMMAND_COMPLETE:
            self.tag = msg
        elif type_byte == m.B_ERROR:
            self.statement_failed = True
        self.held.append(msg)
        self.size += len(msg)

    def hold_commit(self, type_byte: int, msg: bytes) -> None:
        if type_byte == m.B_ERROR:
            if self.statement_failed:
                return  # (cannot happen: an aborted transaction's COMMIT answers ROLLBACK)
            self.commit_failed = True
        self.held.append(msg)

    def answer(self) -> bytes:
        if self.commit_failed and not self.batch:
            return b"".join(msg for msg in self.held if msg is not self.tag)
        return b"".join(self.held)

    def committed_answer(self) -> bytes | None:
        """The statement's answer if the transaction committed but the COMMIT's answer never
        came: None if its CommandComplete never came either (its row count is not known)."""
        if self.tag is None or self.statement_failed or self.commit_failed:
            return None
        return b"".join(self.held)
