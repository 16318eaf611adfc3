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
_COUNTER_SPAN: Final = 1 << 48  # the counter's part of an id: its last 12 hex digits


class MarkerIds:
    """Marker ids for one process: a random 64-bit prefix and a counter, as a uuid's text
    (`pppppppp-pppp-pppp-cccc-cccccccccccc`, the counter's top 16 bits in the fourth group)."""

    def __init__(self, prefix: int | None = None) -> None:
        self.prefix = secrets.randbits(64) if prefix is None else prefix & (2**64 - 1)
        self._n = 0
        self._head = ""
        self._head_at = -1  # the counter's top bits `_head` was made for
        self._renew_head(0)

    def _renew_head(self, top: int) -> None:
        text = f"{self.prefix:016x}{top:04x}"
        self._head = f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-"
        self._head_at = top

    def next(self) -> str:
        n = (self._n + 1) & (2**64 - 1)
        self._n = n
        top = n // _COUNTER_SPAN
        if top != self._head_at:
            self._renew_head(top)
        return self._head + f"{n % _COUNTER_SPAN:012x}"


@mypyc_attr(allow_interpreted_subclasses=True)
class MarkerSource:
    """What a session asks at every writing COMMIT: may this pool write a marker now, and with
    which id. Kept current by the ledger service (`outcome.CommitOutcomeLedger`: `enabled` at
    start and on reload, `ready` as pools are checked); compiled, so that asking is a native call."""

    def __init__(self) -> None:
        self.enabled = False  # failover.commit_outcome: marker
        self.ready: set[tuple[str, str]] = set()  # (user, database) of the pools whose ledger works
        self.ids = MarkerIds()

    def new_marker(self, user: str, database: str) -> str | None:
        """A fresh marker id for a COMMIT of this pool's, or None when the ledger may not be used
        there (the COMMIT then goes without one, and a cut gets 08007 as before)."""
        if not self.enabled or (user, database) not in self.ready:
            return None
        return self.ids.next()


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
    if len(marker_id) != 36:
        raise ValueError(f"not a marker id: {marker_id!r}")
    return _MARKER_HEAD + marker_id.encode() + _MARKER_TAIL


# `marked_commit_query` around the id.
_COMMIT_PARTS: Final = m.query(marker_statement(_SAMPLE_ID).decode() + "; COMMIT").split(_SAMPLE_ID.encode())
_COMMIT_HEAD: Final = _COMMIT_PARTS[0]
_COMMIT_TAIL: Final = _COMMIT_PARTS[1]


def marked_commit_query(marker_id: str) -> bytes:
    """The marker and a COMMIT in one simple Query, sent in place of the client's plain COMMIT:
    the server flushes its answer once, at the end (two Queries would be two flushes, so two
    reads for the sidecar at every writing transaction). `marker_id` as `own_marker_query`."""
    if len(marker_id) != 36:
        raise ValueError(f"not a marker id: {marker_id!r}")
    return _COMMIT_HEAD + marker_id.encode() + _COMMIT_TAIL


def marker_query(marker_id: str) -> bytes:
    """`marker_statement` as a simple Query message, ready to send (ahead of the COMMIT, in the
    same write: the server runs them in order). Built per COMMIT: no formatting beyond the id."""
    return _MARKER_HEAD + _checked_id(marker_id).encode() + _MARKER_TAIL


class MarkerAnswer:
    """Recognises the answer to `marker_query`, which the session swallows (the client never
    asked for it): RowDescription, DataRow ('t' or 'f'), CommandComplete "SELECT 1",
    ReadyForQuery; or ErrorResponse then ReadyForQuery ('E').

    `feed` each backend message in order; it returns True at the ReadyForQuery that ends the
    answer. NotificationResponse and ParameterStatus are not part of the answer (PostgreSQL may
    send them at any time): `feed` ignores them and the session relays them as usual. NoticeResponse
    is swallowed (the client did not run this).

    After an error the transaction is aborted, and the client's COMMIT, already sent behind the
    marker, answers "ROLLBACK": the session must not relay that tag as it is but send the marker's
    ErrorResponse (`error`) in its place followed by the COMMIT's ReadyForQuery, as PostgreSQL does
    when a deferred constraint fails at COMMIT, so that the client knows nothing was committed.
    """

    __slots__ = ("combined", "done", "error", "marked")

    def __init__(self, combined: bool = False) -> None:
        self.marked: bool | None = None  # True: the marker row was written (the transaction had an xid)
        self.error: dict[str, str] | None = None  # the ErrorResponse's fields, if the call failed
        self.done = False
        # The marker and the COMMIT in one Query (`marked_commit_query`): the marker's answer
        # ends at its CommandComplete (the COMMIT's follows, then the one ReadyForQuery); after
        # an error, at the ReadyForQuery ('E': the COMMIT was not run).
        self.combined = combined

    def feed(self, type_byte: int, body: bytes | memoryview) -> bool:
        if self.done:
            raise ValueError("the marker's answer is already complete")
        if type_byte == m.B_DATA_ROW:
            values = m.decode_data_row(body)
            self.marked = len(values) == 1 and values[0] == b"t"
        elif type_byte == m.B_ERROR:
            self.error = m.decode_error_fields(body)
        elif type_byte == m.B_READY_FOR_QUERY or (type_byte == m.B_COMMAND_COMPLETE and self.combined):
            self.done = True
        elif type_byte not in (
            m.B_ROW_DESCRIPTION,
            m.B_COMMAND_COMPLETE,
            m.B_NOTICE,
            m.B_NOTIFICATION,
            m.B_PARAMETER_STATUS,
        ):
            raise ValueError(f"unexpected message {chr(type_byte)!r} in the answer to the commit marker")
        return self.done

    @staticmethod
    def passes_through(type_byte: int) -> bool:
        """A message that arrives during the marker's answer but belongs to the client."""
        return type_byte in (m.B_NOTIFICATION, m.B_PARAMETER_STATUS)
