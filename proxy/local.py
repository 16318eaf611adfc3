"""Answering a client without a server.

`AbortedTransaction` stands in for the server a failover took away in the middle of a client's
transaction. It answers exactly as PostgreSQL answers inside an aborted transaction block: every
statement fails (the first with 40001 "transaction aborted by database failover; retry", the rest
with 25P02) until the client ends the block with ROLLBACK (or COMMIT, which PostgreSQL also turns
into ROLLBACK). Nothing the client sends meanwhile reaches any server, so no half of the cut
transaction can ever be committed on the new writer.
"""

from __future__ import annotations

from .protocol import messages as m
from .protocol.sqlstate import SqlState
from .sqlclass import first_keyword

FAILOVER_ABORT_MESSAGE = "transaction aborted by database failover; retry"
_HINT = "The database failed over and this transaction was rolled back. Roll back and run it again."
_ENDS_BLOCK = frozenset({b"rollback", b"abort", b"commit", b"end"})


def ending(sql_view: bytes | memoryview, offset: int) -> bytes | None:
    """b"commit" (COMMIT / END), b"rollback" (ROLLBACK / ABORT), or None for anything else (also
    for ROLLBACK TO SAVEPOINT and PREPARE TRANSACTION, which do not end the block)."""
    keyword = first_keyword(sql_view, offset)
    if keyword not in _ENDS_BLOCK:
        return None
    text = bytes(sql_view[offset:]).split(b"\x00", 1)[0].lower()
    if b" to " in text or b"savepoint" in text or b"prepared" in text:
        return None
    return b"commit" if keyword in (b"commit", b"end") else b"rollback"


def failover_error(first: bool) -> bytes:
    if first:
        return m.error_response(SqlState.SERIALIZATION_FAILURE.value, FAILOVER_ABORT_MESSAGE, hint=_HINT)
    return m.error_response(
        "25P02",
        "current transaction was aborted by a database failover, commands ignored until end of "
        "transaction block",
        hint=_HINT,
    )


class AbortedTransaction:
    """Feed it whole client messages; it returns the bytes to answer with.

    `done` turns True once the client ended the block and got ReadyForQuery('I'); the session then
    goes back to forwarding (the next message starts a new transaction on the new writer).
    """

    def __init__(self, first_error_sent: bool) -> None:
        self._first_sent = first_error_sent
        self._skipping = False  # extended protocol: after an error, ignore until Sync
        self._statements: dict[str, bytes] = {}  # Parse name -> b"commit" / b"rollback"
        self._portals: dict[str, bytes] = {}
        self._ended = False
        self.done = False

    def _error(self) -> bytes:
        first = not self._first_sent
        self._first_sent = True
        return failover_error(first)

    def on_message(self, type_byte: int, msg: memoryview) -> bytes:
        if type_byte == m.F_QUERY:
            end = ending(msg, 5)
            if end is not None:
                self.done = True
                if end == b"commit" and not self._first_sent:
                    # The client has not been told yet that its transaction is gone: a COMMIT
                    # answered ROLLBACK without an error would read as success to most drivers.
                    return self._error() + m.ready_for_query(m.TX_IDLE)
                return m.command_complete("ROLLBACK") + m.ready_for_query(m.TX_IDLE)
            return self._error() + m.ready_for_query(m.TX_FAILED)
        if type_byte == m.F_SYNC:
            self._skipping = False
            if self._ended:
                self.done = True
                return m.ready_for_query(m.TX_IDLE)
            return m.ready_for_query(m.TX_FAILED)
        if self._skipping or type_byte == m.F_FLUSH:
            return b""
        if type_byte == m.F_PARSE:
            name_end = bytes(msg[5:]).find(b"\x00")
            name = bytes(msg[5 : 5 + name_end]).decode("utf-8", "replace")
            end = ending(msg, 5 + name_end + 1)
            if end is None:
                return self._fail_extended()
            self._statements[name] = end
            return m.message(b"1")
        if type_byte == m.F_BIND:
            portal_end = bytes(msg[5:]).find(b"\x00")
            rest = bytes(msg[5 + portal_end + 1 :])
            statement = rest.split(b"\x00", 1)[0].decode("utf-8", "replace")
            end = self._statements.get(statement)
            if end is None:
                return self._fail_extended()
            self._portals[bytes(msg[5 : 5 + portal_end]).decode("utf-8", "replace")] = end
            return m.message(b"2")
        if type_byte == m.F_DESCRIBE:
            is_statement = msg[5] == ord("S")
            # ROLLBACK takes no parameters and returns no rows.
            return (m.message(b"t", b"\x00\x00") if is_statement else b"") + m.message(b"n")
        if type_byte == m.F_EXECUTE:
            self._ended = True
            portal = bytes(msg[5:]).split(b"\x00", 1)[0].decode("utf-8", "replace")
            if self._portals.get(portal) == b"commit" and not self._first_sent:
                return self._fail_extended()  # as for a simple-query COMMIT: say it failed
            return m.command_complete("ROLLBACK")
        if type_byte == m.F_CLOSE:
            return m.message(b"3")
        # FunctionCall, or COPY messages with no COPY in progress: refused like any statement.
        return self._error() + (m.ready_for_query(m.TX_FAILED) if type_byte == m.F_FUNCTION_CALL else b"")

    def _fail_extended(self) -> bytes:
        self._skipping = True
        return self._error()
