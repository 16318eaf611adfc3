"""What a client session reads of the client's bytes, shared by its layers: the relay's watch
tables, the shapes of the requests the fast paths take and the answers they owe, and the small
scanners that tell a statement's kind without parsing it; and the session's bounds and key
constants. Compiled: most of it is read per message.
"""

from __future__ import annotations

import struct
from typing import Final

from ..protocol import messages as m
from ..protocol.framing import length_at, valid_type_table, watch_table
from ..protocol.sqlstate import (
    ProtocolViolation,
)
from ..server import (
    REQUEST_COMMIT,
    REQUEST_OTHER,
    REQUEST_READ,
)
from ..sqlclass import (
    empty_query,
    first_keyword,
    has_more_statements,
    lone_select,
    mentions_session_functions,
    session_keyword_at,
)
from ..statements import Entry, Expect

# The tail of the common extended-protocol request: [Describe the unnamed portal,] Execute it (all
# rows), Sync.
_SYNC: Final = m.sync()
# A BackendKeyData's process id and secret, drawn as signed int32s (as the message carries them).
_KEY_PARTS: Final = struct.Struct("!ii")
# Process ids the sidecar makes up (transaction mode, the admin console, a login during an outage)
# start here: Linux never gives a process an id this high (PID_MAX_LIMIT is 2**22), so such an id
# can name no real backend, and pg_terminate_backend() of it terminates nothing by mistake.
_MADE_UP_PIDS: Final = 1 << 22
_EXECUTE_SYNC: Final = m.execute() + _SYNC
_DESCRIBE_EXECUTE_SYNC: Final = m.describe("P") + _EXECUTE_SYNC
# The answers the fast paths' requests owe, as `ResponseTracker.expect_fast` takes them.
_QUERY_ANSWER: Final = (Entry(Expect.QUERY),)
_BIND_EXECUTE: Final = (Entry(Expect.BIND), Entry(Expect.EXECUTE), Entry(Expect.SYNC))
_BIND_DESCRIBE_EXECUTE: Final = (Entry(Expect.BIND), Entry(Expect.DESCRIBE_PORTAL), *_BIND_EXECUTE[1:])
_PARSE: Final = (Entry(Expect.PARSE),)

# (FunctionCall: a request of its own, answered by a ReadyForQuery like a Query.)
_SESSION_WATCH: Final = watch_table(
    (m.F_TERMINATE, m.F_QUERY, m.F_SYNC, m.F_PARSE, m.F_CLOSE, m.F_FUNCTION_CALL)
)  # fmt: skip
# Only while the session has a prepared statement that changes settings (`SET` prepared by a
# driver): its effect happens at Bind/Execute, not at Parse, so Bind is watched then.
_SESSION_WATCH_BIND: Final = watch_table(
    (m.F_TERMINATE, m.F_QUERY, m.F_SYNC, m.F_PARSE, m.F_CLOSE, m.F_FUNCTION_CALL, m.F_BIND)
)  # fmt: skip
# Only while the session's settings are to be read back at the next quiet point (`wants_ready`):
# every extended-protocol message, so a batch not yet ended by Sync is known (`_batch_kind`).
_SESSION_WATCH_BATCH: Final = watch_table(
    (m.F_TERMINATE, m.F_QUERY, m.F_SYNC, m.F_PARSE, m.F_CLOSE, m.F_FUNCTION_CALL, m.F_BIND,
     m.F_DESCRIBE, m.F_EXECUTE, m.F_FLUSH)
)  # fmt: skip
_ALL_FRONTEND: Final = watch_table(m.FRONTEND_TYPES)
# Everything but COPY data, which streams through.
_TRANSACTION_WATCH: Final = watch_table(
    (m.F_TERMINATE, m.F_QUERY, m.F_SYNC, m.F_PARSE, m.F_BIND, m.F_DESCRIBE, m.F_EXECUTE, m.F_CLOSE,
     m.F_FLUSH, m.F_FUNCTION_CALL)
)  # fmt: skip
_CLIENT_VALID: Final = valid_type_table(m.FRONTEND_TYPES)
_TERMINATE: Final = m.terminate()
_COPY_FAIL: Final = m.message(b"f", b"the client sent a malformed message\x00")
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
    if not keyword and empty_query(msg, offset):
        return REQUEST_READ  # (nothing to do again)
    return _read_kind(msg, offset) if keyword == b"select" else REQUEST_OTHER


def _plain_kind(data: bytes, sql_offset: int) -> int:
    """The REQUEST_* kind of the query text at `sql_offset` (of a Query, or the unnamed Parse that
    starts `data`) when it is one statement that leaves session state alone and is not a COMMIT
    (nothing to note, check or rewrite), else -1. What follows the text may be scanned too, which
    can only make the answer -1."""
    if lone_select(data, sql_offset) or empty_query(data, sql_offset):
        return REQUEST_READ
    if (
        (session_keyword_at(data, sql_offset) and not _is_delete(data, sql_offset))
        or mentions_session_functions(data, sql_offset)
        or has_more_statements(data, sql_offset)
    ):
        return -1
    return REQUEST_OTHER


def _is_delete(data: bytes, sql_offset: int) -> bool:
    """A DELETE (it shares its initial with DISCARD, DEALLOCATE and DECLARE, which the session
    must look at; a DELETE changes no session state)."""
    return data[sql_offset] | 0x20 == 0x64 and first_keyword(data, sql_offset) == b"delete"


def _unnamed_parse_end(data: bytes, max_message: int) -> int:
    """Where the Parse of the unnamed statement that starts `data` ends (more follows), else -1."""
    if len(data) < 7 or data[5] != 0:
        return -1
    length = length_at(data, 1)
    if length < 4 or length > max_message or length + 1 >= len(data):
        return -1
    return length + 1


# A Describe of the unnamed portal; the head of an Execute of it (its row limit follows).
_DESCRIBE_PORTAL: Final = m.describe("P")
_EXECUTE_UNNAMED: Final = b"E\x00\x00\x00\x09\x00"


def lone_execution(data: bytes, start: int) -> int:
    """Where the Bind at `data[start]` ends, if what follows it is exactly [Describe of the unnamed
    portal,] Execute of it, Sync, and the end of `data`, the Bind's portal the unnamed one (one
    statement run once: what the commit-outcome ledger can mark); else -1. The Bind's statement
    name starts at `start + 6`."""
    n = len(data)
    if n - start < 25 or data[start] != m.F_BIND or data[start + 5] != 0:
        return -1
    bind_end = start + 1 + length_at(data, start + 1)
    if n - bind_end == 22:
        if data[bind_end : bind_end + 7] != _DESCRIBE_PORTAL:
            return -1
    elif n - bind_end != 15:
        return -1
    if data[n - 15 : n - 9] != _EXECUTE_UNNAMED or data[n - 5 :] != _SYNC:
        return -1
    return bind_end


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
