"""Answering a client without a server.

`AbortedTransaction` stands in for the server a failover took away in the middle of a client's
transaction. It answers message for message as PostgreSQL answers inside an aborted transaction
block (postgres.c's rules for that state): every statement fails (the first error the client sees
is 40001 "transaction aborted by database failover; retry", later ones 25P02, or what PostgreSQL
would say instead: 26000 for an unknown statement, 34000 for an unknown portal, 42601 for a syntax
error, ...), until the client ends the block with ROLLBACK (or COMMIT or PREPARE TRANSACTION,
which PostgreSQL also turns into ROLLBACK). Nothing the client sends meanwhile reaches any server,
so no half of the cut transaction can ever be committed on the new writer.

What follows the end of the block in the same request is the server's to answer, as it would be
directly: the rest of a query string (`ROLLBACK; DEALLOCATE ALL`) goes to the new server as a
query of its own (`handback`); so does the rest of an extended-protocol batch after an executed
ROLLBACK (`hand_back_message`). The answer then has as many results as PostgreSQL's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pglast import parse_sql, parser
from pglast.ast import TransactionStmt
from pglast.enums import TransactionStmtKind

from .protocol import messages as m
from .protocol.sqlstate import SqlState

FAILOVER_ABORT_MESSAGE = "transaction aborted by database failover; retry"
_HINT = "The database failed over and this transaction was rolled back. Roll back and run it again."

# What a statement does in an aborted transaction block (IsTransactionExitStmt and friends).
_OTHER = 0  # refused: 25P02
_ENDS = 1  # ROLLBACK / ABORT / PREPARE TRANSACTION: the block ends, tag ROLLBACK
_COMMITS = 2  # COMMIT / END: the block ends, tag ROLLBACK (an error if the client was not told)
_ROLLBACK_TO = 3  # ROLLBACK TO SAVEPOINT: no savepoint of the cut transaction exists any more
_CHAINS = 4  # COMMIT / ROLLBACK AND CHAIN: would open a new block on no server; refused
_EMPTY = 5  # an empty statement (Parse of ""): prepared, but refused at Bind like any statement
# A portal whose run failed (a ROLLBACK TO that found no savepoint): PostgreSQL keeps it, and a
# further Execute of it gets 55000 "cannot be run" rather than 34000.
_FAILED = 6

_KIND_OF_TRANSACTION: dict[TransactionStmtKind, int] = {
    TransactionStmtKind.TRANS_STMT_ROLLBACK: _ENDS,
    TransactionStmtKind.TRANS_STMT_PREPARE: _ENDS,
    TransactionStmtKind.TRANS_STMT_COMMIT: _COMMITS,
    TransactionStmtKind.TRANS_STMT_ROLLBACK_TO: _ROLLBACK_TO,
}


class _SqlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _kind(statement: object) -> int:
    if not isinstance(statement, TransactionStmt):
        return _OTHER
    kind = _KIND_OF_TRANSACTION.get(statement.kind, _OTHER)  # type: ignore[arg-type]
    if kind in (_ENDS, _COMMITS) and statement.chain:
        return _CHAINS
    return kind


def _split(sql: str) -> tuple[list[str], int]:
    """The statements of a query string and what the first one does; raises _SqlError (42601)."""
    try:
        statements = list(parser.split(sql, with_parser=True))
        first = _kind(parse_sql(statements[0])[0].stmt) if statements else _EMPTY
    except parser.ParseError as exc:
        raise _SqlError(SqlState.SYNTAX_ERROR.value, str(exc.args[0])) from None
    return statements, first


def ending(sql: str) -> int:
    """What the single statement `sql` (a Parse's text) does in an aborted block (`_ENDS`, ...)."""
    statements, first = _split(sql)
    if len(statements) > 1:
        raise _SqlError(
            SqlState.SYNTAX_ERROR.value, "cannot insert multiple commands into a prepared statement"
        )
    return first


def failover_error(first: bool) -> bytes:
    if first:
        return m.error_response(SqlState.SERIALIZATION_FAILURE.value, FAILOVER_ABORT_MESSAGE, hint=_HINT)
    return m.error_response(
        "25P02",
        "current transaction was aborted by a database failover, commands ignored until end of "
        "transaction block",
        hint=_HINT,
    )


@dataclass(slots=True)
class _Statement:
    kind: int
    types: tuple[int, ...]  # the parameter types the Parse declared (Bind must supply as many)
    sql: str


def _quoted(kind: str, name: str) -> str:
    return f"unnamed {kind} does not exist" if not name else f'{kind} "{name}" does not exist'


class AbortedTransaction:
    """Feed it whole client messages; it returns the bytes to answer with.

    `done` turns True once the client ended the block. Then either the answer included
    ReadyForQuery('I'), or what is left of the request is for a server: `handback` (a Query to
    send in place of the rest of the query string) or `hand_back_message` (the message just fed,
    and all after it, go to the server unanswered here).

    `known`: the session's named statements from before the cut, as Parse messages (they survive
    the abort in PostgreSQL too: a driver may have prepared its ROLLBACK long ago).
    """

    def __init__(self, first_error_sent: bool, known: Mapping[str, bytes] | None = None) -> None:
        self._first_sent = first_error_sent
        self._skipping = False  # extended protocol: after an error, ignore until Sync
        self._known = dict(known or {})  # name -> Parse message, classified when first used
        self._statements: dict[str, _Statement] = {}
        self._portals: dict[str, _Statement] = {}  # portal -> its statement
        self._ended = False  # an executed ROLLBACK ended the block; the batch goes on until Sync
        self.done = False
        self.handback: bytes | None = None
        self.hand_back_message = False
        # Named statements prepared (Parse messages) and closed while answering here: the session
        # learns them, as PostgreSQL keeps both effects past the end of the block.
        self.parsed: dict[str, bytes] = {}
        self.closed: set[str] = set()

    def _error(self, code: str = "25P02", message: str = "") -> bytes:
        first = not self._first_sent
        self._first_sent = True
        if first or code == "25P02":
            return failover_error(first)
        return m.error_response(code, message)

    def on_message(self, type_byte: int, msg: memoryview) -> bytes:
        if type_byte == m.F_SYNC:
            self._skipping = False
            if self._ended:
                self.done = True
                return m.ready_for_query(m.TX_IDLE)
            return m.ready_for_query(m.TX_FAILED)
        if self._skipping or type_byte == m.F_FLUSH:
            return b""  # (PostgreSQL ignores even a Query until Sync)
        if self._ended:
            # The block is over but the batch is not: the rest runs on a server, as it would
            # have directly (outside any block).
            self.done = True
            self.hand_back_message = True
            return b""
        if type_byte == m.F_QUERY:
            return self._query(bytes(msg[5:]).split(b"\x00", 1)[0].decode("utf-8", "replace"))
        try:
            if type_byte == m.F_PARSE:
                return self._parse(msg)
            if type_byte == m.F_BIND:
                return self._bind(msg)
            if type_byte == m.F_DESCRIBE:
                return self._describe(msg)
            if type_byte == m.F_EXECUTE:
                return self._execute(msg)
        except _SqlError as exc:
            self._skipping = True
            return self._error(exc.code, exc.message)
        if type_byte == m.F_CLOSE:
            kind, name = m.decode_close(msg[5:])
            if kind == "S":
                self._statements.pop(name, None)
                self._known.pop(name, None)
                self.parsed.pop(name, None)
                if name:
                    self.closed.add(name)
            else:
                self._portals.pop(name, None)
            return m.close_complete()
        if type_byte == m.F_FUNCTION_CALL:
            return self._error() + m.ready_for_query(m.TX_FAILED)
        return b""  # CopyData / CopyDone / CopyFail with no COPY running: ignored, as PostgreSQL does

    # ---------------------------------------------------------------- simple query

    def _query(self, sql: str) -> bytes:
        try:
            statements, first = _split(sql)
        except _SqlError as exc:
            return self._error(exc.code, exc.message) + m.ready_for_query(m.TX_FAILED)
        if not statements:
            return m.empty_query_response() + m.ready_for_query(m.TX_FAILED)
        if first in (_ENDS, _COMMITS):
            self.done = True
            if first == _COMMITS and not self._first_sent:
                # The client has not been told yet that its transaction is gone: a COMMIT
                # answered ROLLBACK without an error would read as success to most drivers.
                return self._error() + m.ready_for_query(m.TX_IDLE)
            if len(statements) > 1:
                rest = sql[sql.index(statements[1], len(statements[0])) :]
                self.handback = m.query(rest)
                return m.command_complete("ROLLBACK")
            return m.command_complete("ROLLBACK") + m.ready_for_query(m.TX_IDLE)
        if first == _ROLLBACK_TO:
            # PostgreSQL ran it in the unnamed portal (a transaction command passes the aborted
            # block's check), which replaced the previous one and failed.
            self._portals[""] = _Statement(_FAILED, (), statements[0])
        return self._refusal(first, statements[0]) + m.ready_for_query(m.TX_FAILED)

    def _refusal(self, kind: int, sql: str) -> bytes:
        if kind == _ROLLBACK_TO:
            stmt = parse_sql(sql)[0].stmt
            name = getattr(stmt, "savepoint_name", None) or ""
            return self._error("3B001", f'savepoint "{name}" does not exist')
        if kind == _CHAINS:
            return self._error(
                SqlState.FEATURE_NOT_SUPPORTED.value,
                "AND CHAIN cannot continue a transaction cut by a database failover; ROLLBACK and "
                "start it again",
            )
        return self._error()

    # ---------------------------------------------------------------- extended protocol

    def _statement(self, name: str) -> _Statement | None:
        found = self._statements.get(name)
        if found is None and name in self._known:
            parse = m.decode_parse(self._known.pop(name)[5:])
            try:
                kind = ending(parse.query)
            except _SqlError:
                kind = _OTHER
            found = self._statements[name] = _Statement(kind, parse.param_types, parse.query)
        return found

    def _parse(self, msg: memoryview) -> bytes:
        parse = m.decode_parse(msg[5:])
        if not parse.name:
            self._statements.pop("", None)  # dropped before the new text is even parsed
        kind = ending(parse.query)
        if kind not in (_ENDS, _COMMITS, _ROLLBACK_TO, _CHAINS, _EMPTY):
            raise _SqlError("25P02", "")
        if parse.name and self._statement(parse.name) is not None:
            raise _SqlError("42P05", f'prepared statement "{parse.name}" already exists')
        self._statements[parse.name] = _Statement(kind, parse.param_types, parse.query)
        if parse.name:
            self.parsed[parse.name] = bytes(msg)
            self.closed.discard(parse.name)
        return m.parse_complete()

    def _bind(self, msg: memoryview) -> bytes:
        body = bytes(msg[5:])
        portal_end = body.index(b"\x00")
        portal = body[:portal_end].decode("utf-8", "replace")
        statement_end = body.index(b"\x00", portal_end + 1)
        name = body[portal_end + 1 : statement_end].decode("utf-8", "replace")
        at = statement_end + 1
        formats = int.from_bytes(body[at : at + 2], "big")
        at += 2 + 2 * formats
        params = int.from_bytes(body[at : at + 2], "big")
        stmt = self._statement(name)
        if stmt is None:
            raise _SqlError("26000", _quoted("prepared statement", name))
        if params != len(stmt.types):
            raise _SqlError(
                SqlState.PROTOCOL_VIOLATION.value,
                f'bind message supplies {params} parameters, but prepared statement "{name}" '
                f"requires {len(stmt.types)}",
            )
        if stmt.kind == _EMPTY or stmt.kind == _OTHER or params:
            raise _SqlError("25P02", "")
        if portal and portal in self._portals:
            raise _SqlError("42P03", f'cursor "{portal}" already exists')
        self._portals[portal] = stmt
        return m.bind_complete()

    def _describe(self, msg: memoryview) -> bytes:
        kind, name = m.decode_close(msg[5:])
        if kind == "S":
            stmt = self._statement(name)
            if stmt is None:
                raise _SqlError("26000", _quoted("prepared statement", name))
            if stmt.kind == _OTHER:
                raise _SqlError("25P02", "")  # (taken to return rows, which PostgreSQL refuses here)
            types = stmt.types
            # No transaction-control statement returns rows.
            return m.parameter_description(types) + m.no_data()
        if name not in self._portals:
            raise _SqlError("34000", _quoted("portal", name))
        return m.no_data()

    def _execute(self, msg: memoryview) -> bytes:
        portal = bytes(msg[5:]).split(b"\x00", 1)[0].decode("utf-8", "replace")
        stmt = self._portals.get(portal)
        if stmt is None:
            raise _SqlError("34000", _quoted("portal", portal))
        kind = stmt.kind
        if kind == _FAILED:
            raise _SqlError("55000", f'portal "{portal}" cannot be run')
        if kind in (_ROLLBACK_TO, _CHAINS):
            if kind == _ROLLBACK_TO:
                self._portals[portal] = _Statement(_FAILED, (), stmt.sql)
            refusal = self._refusal(kind, stmt.sql)
            self._skipping = True
            return refusal
        if kind == _COMMITS and not self._first_sent:
            raise _SqlError("25P02", "")  # as for a simple-query COMMIT: say it failed
        self._ended = True
        self._portals.clear()  # a transaction's portals end with it
        return m.command_complete("ROLLBACK")
