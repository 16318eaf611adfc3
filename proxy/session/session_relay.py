"""Session mode's relay: the fast path for whole common requests (`fast`), the inspector of the
general path, and what a statement does to session state (`_note_statement`).

Uses of the core: its server, relay, `wants_ready` and `note_effects` (settings to read back).
Receives nothing else. Offers, besides the `Mode` interface: `fast` and `between_transactions`
(for the dispatcher), the session's named statements (re-prepared when the session moves to
another server) and the reason it cannot move (`unmovable`).
"""

from __future__ import annotations

from ..protocol import messages as m
from ..protocol.framing import Action, length_at
from ..server import (
    REQUEST_COMMIT,
    REQUEST_OTHER,
    REQUEST_READ,
    ServerConnection,
    merge_kinds,
)
from ..sqlclass import (
    Deallocate,
    Effects,
    classify,
    empty_query,
    first_keyword,
    lone_select,
    mentions_session_functions,
    session_keyword_at,
)
from .core import MARK_COMMIT, MARK_NONE, WRAP_INITIALS, SessionCore, mark_here, mark_kind
from .mode import Mode
from .scan import (
    _COMMITS,
    _SESSION_WATCH,
    _SESSION_WATCH_BATCH,
    _SESSION_WATCH_BIND,
    _cstring,
    _parse_query_offset,
    _plain_kind,
    _read_kind,
    _unnamed_parse_end,
    lone_execution,
)


class SessionRelay(Mode):
    def __init__(self, core: SessionCore) -> None:
        super().__init__(core.relay)
        self.core = core
        self.max_message = core.max_message
        # The client's named statements (Parse messages), re-prepared when the session moves to a
        # new writer, and the reason it cannot move at all (LISTEN, temp table, ...).
        self.session_statements: dict[str, bytes] = {}
        self._unmovable: str | None = None
        # Prepared statements (by name, "" unnamed) that change settings when run.
        self.statement_effects: dict[str, Effects] = {}
        # Named statements the commit-outcome ledger marks when run alone (`core.mark_kind`), by
        # name as a Bind carries it.
        self.marked_names: dict[bytes, int] = {}
        self.forward()

    def fast(self, server: ServerConnection, data: bytes) -> bool:
        """Session mode's common requests: one read holding one whole Query, or a batch of
        unwatched messages ending in Sync (Bind, Execute of a prepared statement). Forwarded as
        they came in, then noted as `inspect` would (nothing can answer before this returns),
        without the relay's spans. False (nothing done) for anything else."""
        if self.statement_effects:
            return False  # Bind must be looked at
        start = 0  # where the Bind starts (after the Parse of the unnamed statement, if any)
        if data[0] == m.F_PARSE:
            # Parse of the unnamed statement with a plain text, then Bind... Sync: a driver's
            # parameterized query (psycopg, pgbench -M extended). Named ones are kept for moves.
            start = _unnamed_parse_end(data, self.max_message)
            if start < 0:
                return self.core.marking and self._named_parse_run(server, data)
            kind = _plain_kind(data, 6)
            if kind < 0:
                if first_keyword(data, 6) not in _COMMITS:
                    return False
                kind = REQUEST_COMMIT  # (pgjdbc's COMMIT: nothing to note)
            if self.relay.quiet_run(data, _SESSION_WATCH, start) != m.F_SYNC:
                return False
            kind = merge_kinds(self.batch_kind, kind)
            self.batch_kind = None
        else:
            last = self.relay.quiet_run(data, _SESSION_WATCH)
            if last == m.F_QUERY:
                if data[0] != m.F_QUERY:
                    return False  # unwatched messages, then a Query: the general path
                kind = -1
            elif last == m.F_SYNC:
                kind = REQUEST_OTHER if self.batch_kind is None else self.batch_kind
                self.batch_kind = None
            else:
                return False
        out = server.transport
        if out is not None:
            if kind < 0 and self.core.marking:
                status = server.tx_status
                if status == m.TX_IN_BLOCK:
                    out.write(self.core.commit_marker(server, data))  # (`data` unless a plain COMMIT)
                elif status == m.TX_IDLE and WRAP_INITIALS[data[5]] and server.outstanding == 0:
                    out.write(self.core.wrap_write(server, data))  # (`data` unless a lone write)
                else:
                    out.write(data)
            elif kind != REQUEST_READ and self.core.marking and (start or self.marked_names):
                mark, bind_end = self._mark_of(server, data, start, kind)
                if mark != MARK_NONE:
                    if mark == MARK_COMMIT:
                        kind = REQUEST_COMMIT
                    data = self.core.mark_batch(server, data, mark, start > 0, len(data) - bind_end == 22)
                out.write(data)
            else:
                out.write(data)
        server.outstanding += 1  # one ReadyForQuery will answer it
        server.in_flight.push(self._note_statement(data, 5) if kind < 0 else kind)
        return True

    def _named_parse_run(self, server: ServerConnection, data: bytes) -> bool:
        """Parse of a named statement and a lone execution of it, in one batch (pgjdbc's first
        COMMIT on a connection, a statement's first run once prepared): sent here, marked, when
        the commit-outcome ledger has to do with it (a COMMIT in a block, a write outside one),
        with what `inspect` notes of a named Parse. False (nothing done) for anything else."""
        n = len(data)
        if n < 12 or self.batch_kind is not None:
            return False
        parse_end = 1 + length_at(data, 1)
        name_end = data.find(b"\x00", 5, parse_end)
        if parse_end >= n or parse_end > self.max_message or name_end < 0:
            return False
        bind_end = lone_execution(data, parse_end)
        bound_end = data.find(b"\x00", parse_end + 6, bind_end) if bind_end > 0 else -1
        if bound_end < 0 or data[parse_end + 6 : bound_end] != data[5:name_end]:
            return False  # not one run of the statement it parses
        mark = mark_here(mark_kind(data, name_end + 1), server)
        if mark == MARK_NONE:
            return False
        out = server.transport
        if out is None:
            return False
        parse = data[:parse_end]
        self.session_statements[data[5:name_end].decode("utf-8", "replace")] = parse
        self._note_mark(parse)
        described = n - bind_end == 22
        out.write(self.core.mark_batch(server, data, mark, True, described, named=True))
        server.outstanding += 1
        server.in_flight.push(REQUEST_COMMIT if mark == MARK_COMMIT else REQUEST_OTHER)
        return True

    def _mark_of(self, server: ServerConnection, data: bytes, start: int, kind: int) -> tuple[int, int]:
        """(MARK_* of the statement a lone execution runs, where its Bind ends), or MARK_NONE when
        `data` is not one or the ledger does not mark it here (`core.mark_here`)."""
        if start and (server.tx_status == m.TX_IN_BLOCK) != (kind == REQUEST_COMMIT):
            return MARK_NONE, -1  # (the unnamed Parse's kind already says whether it is a COMMIT)
        bind_end = lone_execution(data, start)
        if bind_end < 0:
            return MARK_NONE, -1
        if start:
            mark = mark_kind(data, 6)  # the unnamed Parse's text
        else:
            name_end = data.find(b"\x00", 6, bind_end)
            mark = self.marked_names.get(data[6:name_end], MARK_NONE)
        mark = mark_here(mark, server)
        return (mark, bind_end) if mark != MARK_NONE else (MARK_NONE, -1)

    def take_held(self, held: bytes) -> bool:
        server = self.core.server
        return server is not None and self.between_transactions() and self.fast(server, held)

    def between_transactions(self) -> bool:
        """Nothing in flight and no transaction open, so new input starts a new one."""
        server = self.core.server
        return (
            server is not None
            and server.outstanding == 0
            and server.tx_status == m.TX_IDLE
            and not self.relay.mid_message
        )

    def watch(self) -> bytes:
        if self.core.wants_ready:
            return _SESSION_WATCH_BATCH
        return _SESSION_WATCH_BIND if self.statement_effects else _SESSION_WATCH

    def inspect(self, type_byte: int, msg: memoryview) -> Action:
        if type_byte == m.F_TERMINATE:
            # The server connection outlives the client: never forward its Terminate.
            return Action.DROP_PAUSE
        server = self.core.server
        if type_byte == m.F_PARSE:
            offset = _parse_query_offset(msg)
            name = bytes(msg[5 : offset - 1]).decode("utf-8", "replace")
            if self.statement_effects:
                self.statement_effects.pop(name, None)
            kind = self._note_statement(msg, offset, name)
            if offset > 6:  # named: kept so the session can move to another server
                parse = bytes(msg)
                self.session_statements[name] = parse
                self._note_mark(parse)
            self.batch_kind = merge_kinds(self.batch_kind, kind)
            return Action.FORWARD
        if type_byte == m.F_BIND:
            if self.statement_effects:
                portal_end = bytes(msg[5:]).find(b"\x00")
                effects = self.statement_effects.get(_cstring(msg, 5 + portal_end + 1))
                if effects is not None:
                    self.core.note_effects(effects)
            if self.core.wants_ready:
                self._batch_open()
            return Action.FORWARD
        if type_byte == m.F_CLOSE:
            if msg[5] == 0x53:  # 'S'
                self.session_statements.pop(_cstring(msg, 6), None)
                if self.marked_names:
                    self.marked_names.pop(bytes(msg[6 : len(msg) - 1]), None)
            if self.core.wants_ready:
                self._batch_open()
            return Action.FORWARD
        if type_byte == m.F_FUNCTION_CALL:
            if server is not None:
                server.outstanding += 1
                server.in_flight.push(REQUEST_OTHER)
            return Action.FORWARD
        if type_byte != m.F_QUERY and type_byte != m.F_SYNC:
            # Describe, Execute, Flush: watched only while the settings are to be read back.
            self._batch_open()
            return Action.FORWARD
        if server is not None:
            server.outstanding += 1  # a Query or Sync: one ReadyForQuery will answer it
            if type_byte == m.F_QUERY:
                server.in_flight.push(self._note_statement(msg, 5))
            else:
                batch = self.batch_kind
                server.in_flight.push(REQUEST_OTHER if batch is None else batch)
                self.batch_kind = None
        return Action.FORWARD

    def _batch_open(self) -> None:
        """An extended-protocol message went to the server: until the client's Sync, a
        ReadyForQuery is not a quiet point (the server has more to answer). Sync sends the
        batch's kind, REQUEST_OTHER when no Parse said otherwise: marking it so changes nothing."""
        if self.batch_kind is None:
            self.batch_kind = REQUEST_OTHER

    def _note_statement(self, msg: bytes | memoryview, sql_offset: int, parsed_as: str | None = None) -> int:
        """Note what a statement does to session state; returns its REQUEST_* kind. `parsed_as`:
        the name it is being prepared under (Parse), so settings it changes count when it runs.

        Cheap for ordinary statements: one byte decides most, a C regex the rest; pglast only
        parses the few that can change settings or pin the session.
        """
        if not session_keyword_at(msg, sql_offset):
            return REQUEST_READ if empty_query(msg, sql_offset) else REQUEST_OTHER
        if lone_select(msg, sql_offset):
            return REQUEST_READ
        keyword = first_keyword(msg, sql_offset)
        if keyword in _COMMITS:
            return REQUEST_COMMIT
        if keyword == b"select" and not mentions_session_functions(msg, sql_offset):
            return _read_kind(msg, sql_offset)
        effects = classify(_cstring(msg, sql_offset))
        if parsed_as is not None and (effects.changes_settings or effects.discard_all):
            self.statement_effects[parsed_as] = effects
            self.relay.set_watch(self.watch())
        else:
            self.core.note_effects(effects)
        if effects.deallocate is Deallocate.ALL or effects.discard_all:
            self.session_statements.clear()
            self.marked_names.clear()
        elif effects.deallocate is Deallocate.ONE and effects.deallocate_name:
            self.session_statements.pop(effects.deallocate_name, None)
            self.marked_names.pop(effects.deallocate_name.encode(), None)
        if effects.discard_all:
            self._unmovable = None
        elif effects.not_poolable and self._unmovable is None:
            self._unmovable = effects.not_poolable.split(" (")[0]
        return REQUEST_OTHER

    # ---------------------------------------------------------------- Mode: statements, moves

    def known_statements(self) -> dict[str, bytes]:
        return dict(self.session_statements)

    def learn_statement(self, name: str, parse: bytes, replace: bool) -> None:
        self.session_statements[name] = parse
        self._note_mark(parse)

    def forget_statement(self, name: str) -> None:
        self.session_statements.pop(name, None)
        self.marked_names.pop(name.encode(), None)

    def _note_mark(self, parse: bytes) -> None:
        """A named statement prepared: whether the ledger marks it (`marked_names`)."""
        name_end = parse.find(b"\x00", 5)
        mark = mark_kind(parse, name_end + 1)
        if mark != MARK_NONE:
            self.marked_names[parse[5:name_end]] = mark
        elif self.marked_names:
            self.marked_names.pop(parse[5:name_end], None)

    def statements_for_new_server(self) -> list[bytes]:
        return list(self.session_statements.values())

    def statement_text(self, name: str) -> str | None:
        parse = self.session_statements.get(name)
        return None if parse is None else m.decode_parse(memoryview(parse)[5:]).query

    def unmovable(self) -> str | None:
        return self._unmovable
