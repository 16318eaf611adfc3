"""Session mode's relay: the fast path for whole common requests, the inspector of the
general path, and what a statement does to session state (`_note_statement`).
"""

from __future__ import annotations

from ..protocol import messages as m
from ..protocol.framing import Action
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
    first_keyword,
    lone_select,
    mentions_session_functions,
    session_keyword_at,
)
from .attach import Attaching
from .scan import (
    _COMMITS,
    _SESSION_WATCH,
    _SESSION_WATCH_BATCH,
    _cstring,
    _parse_query_offset,
    _plain_kind,
    _read_kind,
    _unnamed_parse_end,
)
from .states import (
    GATED,
)


class SessionRelay(Attaching):
    def _session_fast(self, server: ServerConnection, data: bytes) -> bool:
        """Session mode's common requests: one read holding one whole Query, or a batch of
        unwatched messages ending in Sync (Bind, Execute of a prepared statement). Forwarded as
        they came in, then noted as `_inspect_session` would (nothing can answer before this
        returns), without the relay's spans. False (nothing done) for anything else."""
        if self._statement_effects:
            return False  # Bind must be looked at
        if data[0] == m.F_PARSE:
            # Parse of the unnamed statement with a plain text, then Bind... Sync: a driver's
            # parameterized query (psycopg, pgbench -M extended). Named ones are kept for moves.
            start = _unnamed_parse_end(data, self._max_message)
            kind = _plain_kind(data, 6) if start > 0 else -1
            if kind < 0 or self._relay.quiet_run(data, _SESSION_WATCH, start) != m.F_SYNC:
                return False
            kind = merge_kinds(self._batch_kind, kind)
            self._batch_kind = None
        else:
            last = self._relay.quiet_run(data, _SESSION_WATCH)
            if last == m.F_QUERY:
                if data[0] != m.F_QUERY:
                    return False  # unwatched messages, then a Query: the general path
                kind = -1
            elif last == m.F_SYNC:
                kind = REQUEST_OTHER if self._batch_kind is None else self._batch_kind
                self._batch_kind = None
            else:
                return False
        out = server.transport
        if out is not None:
            out.write(data)
        server.outstanding += 1  # one ReadyForQuery will answer it
        server.in_flight.push(self._note_statement(data, 5) if kind < 0 else kind)
        return True

    def _between_transactions(self) -> bool:
        """Session mode: nothing in flight and no transaction open, so new input starts a new one."""
        server = self.server
        return (
            server is not None
            and not self.transaction_mode
            and server.outstanding == 0
            and server.tx_status == m.TX_IDLE
            and not self._relay.mid_message
        )

    async def _resume_after_gate(self) -> None:
        await self.sidecar.pass_gate()
        if self.state == GATED and self.server is not None:  # (IDLE if the server was cut meanwhile)
            self._link(self.server)

    def _inspect_session(self, type_byte: int, msg: memoryview) -> Action:
        if type_byte == m.F_TERMINATE:
            # The server connection outlives the client: never forward its Terminate.
            return Action.DROP_PAUSE
        server = self.server
        if type_byte == m.F_PARSE:
            offset = _parse_query_offset(msg)
            name = bytes(msg[5 : offset - 1]).decode("utf-8", "replace")
            if self._statement_effects:
                self._statement_effects.pop(name, None)
            kind = self._note_statement(msg, offset, name)
            if offset > 6:  # named: kept so the session can move to another server
                self._session_statements[name] = bytes(msg)
            self._batch_kind = merge_kinds(self._batch_kind, kind)
            return Action.FORWARD
        if type_byte == m.F_BIND:
            if self._statement_effects:
                portal_end = bytes(msg[5:]).find(b"\x00")
                effects = self._statement_effects.get(_cstring(msg, 5 + portal_end + 1))
                if effects is not None:
                    self._note_effects(effects)
            if self.wants_ready:
                self._batch_open()
            return Action.FORWARD
        if type_byte == m.F_CLOSE:
            if msg[5] == 0x53:  # 'S'
                self._session_statements.pop(_cstring(msg, 6), None)
            if self.wants_ready:
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
                batch = self._batch_kind
                server.in_flight.push(REQUEST_OTHER if batch is None else batch)
                self._batch_kind = None
        return Action.FORWARD

    def _batch_open(self) -> None:
        """An extended-protocol message went to the server: until the client's Sync, a
        ReadyForQuery is not a quiet point (the server has more to answer). Sync sends the
        batch's kind, REQUEST_OTHER when no Parse said otherwise: marking it so changes nothing."""
        if self._batch_kind is None:
            self._batch_kind = REQUEST_OTHER

    def _note_statement(self, msg: bytes | memoryview, sql_offset: int, parsed_as: str | None = None) -> int:
        """Note what a statement does to session state; returns its REQUEST_* kind. `parsed_as`:
        the name it is being prepared under (Parse), so settings it changes count when it runs.

        Cheap for ordinary statements: one byte decides most, a C regex the rest; pglast only
        parses the few that can change settings or pin the session.
        """
        if not session_keyword_at(msg, sql_offset):
            return REQUEST_OTHER
        if lone_select(msg, sql_offset):
            return REQUEST_READ
        keyword = first_keyword(msg, sql_offset)
        if keyword in _COMMITS:
            return REQUEST_COMMIT
        if keyword == b"select" and not mentions_session_functions(msg, sql_offset):
            return _read_kind(msg, sql_offset)
        effects = classify(_cstring(msg, sql_offset))
        if parsed_as is not None and (effects.changes_settings or effects.discard_all):
            self._statement_effects[parsed_as] = effects
            self._relay.set_inspector(self._inspect_session, self._session_watch())
        else:
            self._note_effects(effects)
        if effects.deallocate is Deallocate.ALL or effects.discard_all:
            self._session_statements.clear()
        elif effects.deallocate is Deallocate.ONE and effects.deallocate_name:
            self._session_statements.pop(effects.deallocate_name, None)
        if effects.discard_all:
            self._unmovable = None
        elif effects.not_poolable and self._unmovable is None:
            self._unmovable = effects.not_poolable.split(" (")[0]
        return REQUEST_OTHER

    def _note_effects(self, effects: Effects) -> None:
        if not (effects.changes_settings or effects.discard_all):
            return
        if (
            not self.wants_ready
            and not self.transaction_mode
            and self._outage is None
            and self._aborted is None
        ):
            self._relay.set_watch(_SESSION_WATCH_BATCH)
        self.wants_ready = True
        self._settings_dirty |= effects.changes_settings
        if effects.custom_names:
            self._custom_names |= effects.custom_names
        self._reset_all |= effects.reset_all
        self._reset_names |= effects.reset_names
        self._discarded |= effects.discard_all
