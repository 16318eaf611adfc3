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


def ends_transaction(sql_view: bytes | memoryview, offset: int) -> bool:
    """ROLLBACK / ABORT / COMMIT / END, but not ROLLBACK TO SAVEPOINT or PREPARE TRANSACTION."""
    if first_keyword(sql_view, offset) not in _ENDS_BLOCK:
        return False
    text = bytes(sql_view[offset:]).split(b"\x00", 1)[0].lower()
    return b" to " not in text and b"savepoint" not in text and b"prepared" not in text


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
        self._statements: dict[str, bool] = {}  # Parse name -> ends the transaction
        self._portals: dict[str, bool] = {}
        self._ended = False
        self.done = False

    def _error(self) -> bytes:
        first = not self._first_sent
        self._first_sent = True
        return failover_error(first)

    def on_message(self, type_byte: int, msg: memoryview) -> bytes:
        if type_byte == m.F_QUERY:
            if ends_transaction(msg, 5):
                self.done = True
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
            ends = ends_transaction(msg, 5 + name_end + 1)
            if not ends:
                return self._fail_extended()
            self._statements[name] = True
            return m.message(b"1")
        if type_byte == m.F_BIND:
            portal_end = bytes(msg[5:]).find(b"\x00")
            rest = bytes(msg[5 + portal_end + 1 :])
            statement = rest.split(b"\x00", 1)[0].decode("utf-8", "replace")
            if not self._statements.get(statement):
                return self._fail_extended()
            self._portals[bytes(msg[5 : 5 + portal_end]).decode("utf-8", "replace")] = True
            return m.message(b"2")
        if type_byte == m.F_DESCRIBE:
            is_statement = msg[5] == ord("S")
            # ROLLBACK takes no parameters and returns no rows.
            return (m.message(b"t", b"\x00\x00") if is_statement else b"") + m.message(b"n")
        if type_byte == m.F_EXECUTE:
            self._ended = True
            return m.command_complete("ROLLBACK")
        if type_byte == m.F_CLOSE:
            return m.message(b"3")
        # FunctionCall, or COPY messages with no COPY in progress: refused like any statement.
        return self._error() + (m.ready_for_query(m.TX_FAILED) if type_byte == m.F_FUNCTION_CALL else b"")

    def _fail_extended(self) -> bytes:
        self._skipping = True
        return self._error()
