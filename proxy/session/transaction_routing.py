"""Transaction mode's routing: a server per transaction (fast paths `attach_query`,
`_attach_prepared`, `_prepare_here`, `_attach_parsed`), and the inspector that renames prepared
statements (`statements.StatementRouter`) and refuses what cannot be transaction-pooled.

Uses of the core: its state and transition, server, pool, gate, relay, settings and
`note_effects`. Receives at construction: the `Attach` part (a fast path's server: the parked
one via `unpark`, or the pool `pool_for_request` names) and the sidecar's statement registry.
Offers, besides the `Mode` interface: `between_answers` and `attach_query` (for the dispatcher),
and the session's `router` (its statements under their shared names).
"""

from __future__ import annotations

import itertools

from ..protocol import messages as m
from ..protocol.framing import Action, length_at
from ..protocol.sqlstate import (
    ProtocolViolation,
)
from ..server import (
    REQUEST_COMMIT,
    REQUEST_OTHER,
    REQUEST_READ,
    ServerConnection,
    merge_kinds,
)
from ..sqlclass import (
    Deallocate,
    classify,
    first_keyword,
    has_more_statements,
    needs_transaction_check,
)
from ..statements import (
    ClientStatement,
    Entry,
    Expect,
    LocalStatement,
    StatementRegistry,
    StatementRouter,
    prepare_on,
)
from .attach import Attach
from .core import MARK_COMMIT, MARK_NONE, WRAP_INITIALS, SessionCore, mark_here, mark_kind
from .mode import Mode
from .scan import (
    _BIND_DESCRIBE_EXECUTE,
    _BIND_EXECUTE,
    _COMMITS,
    _PARSE,
    _QUERY_ANSWER,
    _SYNC,
    _TRANSACTION_WATCH,
    _cstring,
    _parse_query_offset,
    _plain_kind,
    _raise_sql,
    _request_kind,
    _unnamed_parse_end,
    lone_execution,
)
from .states import (
    LINKED,
    PARKED,
)


class TransactionRouting(Mode):
    def __init__(self, core: SessionCore, attach: Attach, statements: StatementRegistry) -> None:
        super().__init__(core.relay)
        self.core = core
        self.attach = attach
        self.max_message = core.max_message
        self.router = StatementRouter(statements)
        self.forward()

    def between_answers(self, server: ServerConnection) -> bool:
        """Transaction mode, linked: nothing in flight and the client's input at a clean boundary,
        so the next request may take the fast paths (on this server)."""
        tracker = server.tracker
        return not tracker and not tracker.skipping and not self.relay.paused and self.relay.at_boundary

    def attach_query(self, data: bytes) -> bool:
        """Transaction mode's most common request: one whole, plain Query (no session state, one
        statement) arriving between transactions, sent at once to an idle server that already has
        the client's settings. What `Attach.hold`, `Attach.attach_now`, `SessionCore.link` and the
        relay's inspection of a Query do, without the hold, the scan or the statement's closer
        look; False (nothing done) for anything else. Inside a transaction, with nothing in
        flight, the same requests go to its server this way (`between_answers`)."""
        if data[0] == m.F_BIND:
            return self._attach_prepared(data)
        if data[0] == m.F_PARSE:
            # (Answering a Parse here says the transaction status is idle: not inside one.)
            return (
                (self.core.state != LINKED and self._prepare_here(data))
                or self._attach_parsed(data)
                or (self.core.marking and self._attach_named_parse_run(data))
            )
        if self.relay.whole(data) != m.F_QUERY:
            return False
        kind = _plain_kind(data, 5)
        if kind < 0:
            # The COMMIT that ends an open transaction: nothing to check or rewrite either.
            if (
                self.core.state != LINKED
                or first_keyword(data, 5) not in _COMMITS
                or has_more_statements(data, 5)
            ):
                return False
            kind = REQUEST_COMMIT
        server = self._server_now(data)
        if server is None:
            return False
        router = self.router
        router.unnamed = None  # as `_transaction_query`: a simple Query replaces the unnamed statement
        server.unnamed_from = None
        if self.core.marking:
            if kind == REQUEST_COMMIT:
                if server.tx_status == m.TX_IN_BLOCK:
                    data = self.core.commit_marker(server, data)  # (`data` unless a plain COMMIT)
            elif server.tx_status == m.TX_IDLE and WRAP_INITIALS[data[5]] and len(server.in_flight) == 0:
                data = self.core.wrap_write(server, data)  # (`data` unless a lone autocommit write)
        self._send_fast(server, _QUERY_ANSWER, kind, data)
        return True

    def take_held(self, held: bytes) -> bool:
        first = held[0]
        if first == m.F_BIND or first == m.F_PARSE or first == m.F_QUERY:
            return self.attach_query(held)
        return False

    def _attach_prepared(self, data: bytes) -> bool:
        """The other common request: Bind (unnamed portal) of a statement the client prepared,
        Describe of the portal or not, Execute (all rows), Sync, in one read, to an idle server
        that has the statement prepared. The Bind goes out renamed, as `StatementRouter.on_bind`
        makes it; False (nothing done) for anything else."""
        router = self.router
        n = len(data)
        if (
            n < 21
            or n > self.max_message
            or data[5] != 0
            or router.local
            or router.local_portals
            or self.batch_kind is not None
        ):
            return False  # a named portal, or statements the sidecar answers itself
        # libpq (psycopg, pgbench) sends Describe of the portal too: 7 bytes; Execute 10; Sync 5.
        # pgjdbc asks for one row of a statement it expects none from.
        bind_end = lone_execution(data, 0)
        if bind_end < 0 or self.relay.buffered:
            return False  # not exactly Bind, [Describe], Execute, Sync, all of the unnamed portal
        described = n - bind_end == 22
        name_end = 6
        while name_end < bind_end and data[name_end] != 0:
            name_end += 1
        if name_end == 6 or name_end == bind_end:
            return False  # the unnamed statement: the general path carries it across servers
        stmt = router.statements.get(data[6:name_end].decode("utf-8", "replace"))
        if stmt is None:
            return False
        mark = MARK_NONE
        if self.core.marking:
            parse = stmt.parse_message
            mark = mark_kind(parse, parse.find(b"\x00", 5) + 1)
        # (A statement the ledger marks goes to any server: prepared there first if need be, so
        # that a commit marker never depends on which server the pool hands out.)
        server = self._server_now(data, stmt.global_name if mark == MARK_NONE else None)
        if server is None:
            return False
        # The Bind renamed as `rename_in` would, and what follows it, in one copy.
        name = stmt.global_name.encode()
        length = bind_end - 1 + len(name) - (name_end - 6)
        renamed = b"".join((b"B", length.to_bytes(4, "big"), b"\x00", name, data[name_end:]))
        expected = _BIND_DESCRIBE_EXECUTE if described else _BIND_EXECUTE
        hidden = 0
        statements = server.statements
        if stmt.global_name in statements:
            statements.touch(stmt.global_name)
        else:
            prefix, hidden = prepare_on(server, stmt)
            renamed = prefix + renamed
        kind = REQUEST_OTHER
        mark = mark_here(mark, server)
        if mark != MARK_NONE:
            renamed = self.core.mark_batch(server, renamed, mark, False, described, hidden)
            if mark == MARK_COMMIT:
                kind = REQUEST_COMMIT
        if hidden:
            # (The hidden answers must be matched: the general path's way, entry by entry.)
            for entry in expected:
                server.tracker.expect(entry.kind)
            server.in_flight.push(kind)
            out = server.transport
            if out is not None:
                out.write(renamed)
        else:
            self._send_fast(server, expected, kind, renamed)
        return True

    def _attach_named_parse_run(self, data: bytes) -> bool:
        """Parse of a named statement and one run of it, in one batch (pgjdbc's first COMMIT on
        a connection, a statement's prepareThreshold-th run), when the commit-outcome ledger
        marks its text (a COMMIT inside a transaction, a write outside one): sent as `on_parse`
        and `_attach_prepared` would send them, and marked. False (nothing done) else."""
        router = self.router
        n = len(data)
        if router.local or router.local_portals or self.batch_kind is not None or self.relay.buffered:
            return False
        if n < 12 or data[5] == 0:
            return False
        parse_end: int = 1 + int(length_at(data, 1))
        if parse_end >= n or parse_end > self.max_message:
            return False
        name_end = data.find(b"\x00", 5, parse_end)
        bind_end = lone_execution(data, parse_end) if name_end > 0 else -1
        bound_end = data.find(b"\x00", parse_end + 6, bind_end) if bind_end > 0 else -1
        if bound_end < 0 or data[parse_end + 6 : bound_end] != data[5:name_end]:
            return False  # not one run of the statement it parses
        mark = mark_kind(data, name_end + 1)
        if mark == MARK_NONE:
            return False
        try:
            parse = m.decode_parse(memoryview(data)[5:parse_end])
        except ProtocolViolation:
            return False  # the general path says what is wrong with it
        server = self._server_now(data)
        if server is None:
            return False
        # The server is linked: from here the request is this path's, marked or not.
        global_name = router.registry.name_for(parse.query, parse.param_types)
        stmt = ClientStatement(global_name, m.parse(global_name, parse.query, parse.param_types))
        router.local.pop(parse.name, None)
        router.statements[parse.name] = stmt
        tracker = server.tracker
        prefix = b""
        hidden = 0
        owed = b""
        statements = server.statements
        if global_name in statements:
            statements.touch(global_name)
            owed = tracker.expect(Expect.SYNTHETIC, data=m.parse_complete(), tx_status=server.tx_status)
        else:
            prefix, hidden = prepare_on(server, stmt, hidden_parse=False)  # (the Parse is the client's)
        name = global_name.encode()
        length = bind_end - parse_end - 1 + len(name) - (bound_end - parse_end - 6)
        renamed = b"".join((b"B", length.to_bytes(4, "big"), b"\x00", name, data[bound_end:]))
        described = n - bind_end == 22
        kind = REQUEST_COMMIT if mark == MARK_COMMIT else REQUEST_OTHER
        mark = mark_here(mark, server)
        if mark != MARK_NONE:
            renamed = self.core.mark_batch(
                server, prefix + renamed, mark, not owed, described, hidden, named=True
            )
        else:
            renamed = prefix + renamed
        self._owe(owed)  # (the client's ParseComplete, the server having the statement already)
        for entry in _BIND_DESCRIBE_EXECUTE if described else _BIND_EXECUTE:
            tracker.expect(entry.kind)
        server.in_flight.push(kind)
        out = server.transport
        if out is not None:
            out.write(renamed)
        return True

    def _prepare_here(self, data: bytes) -> bool:
        """Parse of a named statement with its Sync, alone, between transactions (libpq's
        PQprepare: pgbench -M prepared, psycopg's prepare), when a server of the pool already has
        the same text and parameter types prepared: answered here, ParseComplete then
        ReadyForQuery, as `StatementRouter.on_parse` answers a known statement, but with no server
        at all. A client that prepares synchronously while its own other connections hold every
        server (pgbench, several clients per thread) would otherwise wait for one in vain. Errors
        the text could still raise come at its first Bind, on whichever server runs it."""
        router = self.router
        pool = self.attach.pool_for_request(data)
        n = len(data)
        if pool is None or n < 14 or n > self.max_message or data[5] == 0 or not data.endswith(_SYNC):
            return False
        if self.relay.buffered or self.batch_kind is not None or 1 + length_at(data, 1) != n - 5:
            return False
        sql_offset = data.find(b"\x00", 5, n - 5) + 1
        keyword = first_keyword(data, sql_offset)
        if keyword == b"deallocate" or needs_transaction_check(keyword, data, sql_offset):
            return False  # the general path notes it, refuses it or answers it itself
        try:
            parse = m.decode_parse(memoryview(data)[5 : n - 5])
        except ProtocolViolation:
            return False  # the general path says what is wrong with it
        global_name = router.registry.name_for(parse.query, parse.param_types)
        servers = itertools.chain(pool.idle, pool.parked, pool.active)
        if not any(global_name in server.statements for server in servers):
            return False
        router.local.pop(parse.name, None)
        router.statements[parse.name] = ClientStatement(
            global_name, m.parse(global_name, parse.query, parse.param_types)
        )
        answer = m.parse_complete() + m.ready_for_query(m.TX_IDLE)
        self.core.send(answer)
        journal = self.core.journal
        if journal is not None:
            journal.relay_view(answer)  # (the Parse is journaled: its answer too, for a replay's count)
        return True

    def _attach_parsed(self, data: bytes) -> bool:
        """A driver's parameterized query (psycopg, pgbench -M extended): Parse of the unnamed
        statement with a plain text, Bind of it to the unnamed portal, Describe of the portal or
        not, Execute (all rows), Sync, in one read. Sent as it came in to an idle server, with
        what `StatementRouter.on_parse` and friends note for it; False (nothing done) else."""
        router = self.router
        if router.local or router.local_portals or self.batch_kind is not None or self.relay.buffered:
            return False
        parse_end = _unnamed_parse_end(data, self.max_message)
        if parse_end < 0:
            return False
        bind_end = lone_execution(data, parse_end)
        if bind_end < 0 or data[parse_end + 6] != 0:  # (the Bind's statement: the unnamed one)
            return False
        kind = _plain_kind(data, 6)
        if kind < 0:
            # The COMMIT that ends an open transaction (pgjdbc's): nothing to check or rewrite.
            if self.core.state != LINKED or first_keyword(data, 6) not in _COMMITS:
                return False
            kind = REQUEST_COMMIT
        server = self._server_now(data)
        if server is None:
            return False
        # Kept whole, as `on_parse` keeps it: a Bind in a later transaction, on another server,
        # re-prepares it there.
        router.unnamed = server.unnamed_from = data[:parse_end]
        described = len(data) - bind_end == 22
        expected = _BIND_DESCRIBE_EXECUTE if described else _BIND_EXECUTE
        if self.core.marking and kind != REQUEST_READ:
            mark = mark_here(mark_kind(data, 6), server)
            if mark != MARK_NONE:
                data = self.core.mark_batch(server, data, mark, True, described)
                if mark != MARK_COMMIT:
                    # The wrap's COMMIT, a simple Query, drops the unnamed statement: a later
                    # Bind of it is re-prepared first (`StatementRouter.on_bind`).
                    server.unnamed_from = None
        self._send_fast(server, _PARSE + expected, kind, data)
        return True

    @staticmethod
    def _send_fast(server: ServerConnection, expected: tuple[Entry, ...], kind: int, data: bytes) -> None:
        """A fast path's request to the server `_server_now` gave: queue the answers it expects
        (the last at its Sync or Query) as `tracker.fast`, note it in flight, and send it."""
        server.tracker.expect_fast(expected)  # (nothing in flight, skipping nothing: checked)
        server.in_flight.push(kind)
        out = server.transport
        if out is not None:
            out.write(data)

    def _server_now(self, data: bytes, prepared: str | None = None) -> ServerConnection | None:
        """The server for a fast path's request, with the `prepared` statement if one is named, or
        None (nothing done: the general path). Inside a transaction: its own server. Between
        transactions, if the gate is open: the server kept from the last one, else an idle server
        that already has the client's settings, linked (`Attach.attach_now` for the fast paths)."""
        core = self.core
        if core.state == LINKED:  # inside a transaction: its own server (the caller checked it is free)
            linked = core.server
            if linked is None or (prepared is not None and prepared not in linked.statements):
                return None
            return linked
        pool = self.attach.pool_for_request(data)
        if pool is None or core.gate.closed:
            return None
        if core.state == PARKED:
            kept = core.server
            assert kept is not None
            if kept.tracker.skipping or (prepared is not None and prepared not in kept.statements):
                return None  # `Attach.hold` runs it on this server through the general path
            if core.pool is not pool:
                self.attach.give_back(kept)  # read routing sends this request elsewhere
            elif self.attach.unpark(data) is not None:
                core.to(LINKED)
                self.relay.resume()  # (as below)
                return kept
        server = pool.take_idle_now()
        if server is None:
            return None
        if (
            server.applied != core.settings
            or server.tracker.skipping
            or (prepared is not None and prepared not in server.statements)
        ):
            pool.release(server, reset=False)  # the general path prepares it
            return None
        core.server = server
        core.pool = pool
        core.to(LINKED)
        server.link(core, tracked=True)
        if server.params is not core.params_told:
            core.tell_parameters(server.params)
        self.relay.resume()  # nothing is held: this only ends the pause between transactions
        return server

    def inspect(self, type_byte: int, msg: memoryview) -> Action:
        core = self.core
        server = core.server
        router = self.router
        assert server is not None
        tracker = server.tracker
        journal = core.journal
        if journal is not None and type_byte != m.F_TERMINATE:
            # The client's message as it came (not as rewritten for this server): a replay on
            # another server rewrites it again for that one (`replay.send_routed`).
            journal.record_request(msg)
        if type_byte == m.F_SYNC:
            tracker.sync_sent()
            tracker.expect(Expect.SYNC)
            kind = self.batch_kind
            server.in_flight.push(REQUEST_OTHER if kind is None else kind)
            self.batch_kind = None
            return Action.FORWARD
        if type_byte == m.F_TERMINATE:
            return Action.DROP_PAUSE
        if tracker.skipping:
            # Ignored by the server until Sync, a Query too: no answer to expect, nothing it
            # would do (a SET, a refused statement) happens.
            return Action.FORWARD
        if type_byte == m.F_BIND:
            action, owed = router.on_bind(msg, server, self.relay)
            self._owe(owed)
            return action
        if type_byte == m.F_EXECUTE:
            action, owed = router.on_execute(msg, server)
            self._owe(owed)
            return action
        if type_byte == m.F_PARSE:
            offset = _parse_query_offset(msg)
            keyword = first_keyword(msg, offset)
            self.batch_kind = merge_kinds(self.batch_kind, _request_kind(keyword, msg, offset))
            refused = self._check_poolable(msg, offset, keyword)
            if refused is not None:
                # Let the server itself fail where this Parse would have answered: an unnamed
                # statement that raises, run at once (its ParseComplete and BindComplete hidden).
                # The transaction aborts as PostgreSQL would make it, and the server skips the
                # client's own Bind/Execute until Sync.
                self.relay.insert(m.parse("", _raise_sql(refused)) + m.bind() + m.execute())
                tracker.expect(Expect.PARSE_HIDDEN)
                tracker.expect(Expect.BIND_HIDDEN)
                tracker.expect(Expect.EXECUTE)
                return Action.DROP
            local = self._local_statement(msg, offset, server)
            action, owed = router.on_parse(msg, server, self.relay, local)
            self._owe(owed)
            return action
        if type_byte == m.F_DESCRIBE:
            action, owed = router.on_describe(msg, server, self.relay)
            self._owe(owed)
            return action
        if type_byte == m.F_CLOSE:
            action, owed = router.on_close(msg, server)
            self._owe(owed)
            return action
        if type_byte == m.F_QUERY:
            keyword = first_keyword(msg, 5)
            server.in_flight.push(_request_kind(keyword, msg, 5))
            return self._transaction_query(msg, server, keyword)
        if type_byte == m.F_FUNCTION_CALL:
            server.in_flight.push(REQUEST_OTHER)
            tracker.expect(Expect.QUERY)
        return Action.FORWARD  # Flush

    def _transaction_query(self, msg: memoryview, server: ServerConnection, keyword: bytes) -> Action:
        tracker = server.tracker
        refused = self._check_poolable(msg, 5, keyword)
        if refused is not None:
            # Let the server raise it, so the transaction state is exactly what PostgreSQL makes it.
            self.relay.insert(m.query(_raise_sql(refused)))
            tracker.expect(Expect.QUERY)
            return Action.DROP
        router = self.router
        # A simple Query replaces the session's unnamed statement.
        router.unnamed = None
        server.unnamed_from = None
        local = self._local_statement(msg, 5, server)
        if local is not None:
            # Answered here, but the server still answers a Sync in its place: its ReadyForQuery
            # carries the true transaction status and ends the transaction for the pool.
            self._owe(
                tracker.expect(Expect.SYNTHETIC, data=router.run_local(local), tx_status=server.tx_status)
            )
            self.relay.insert(m.sync())
            tracker.expect(Expect.SYNC)
            return Action.DROP
        if keyword == b"discard" or keyword == b"deallocate":
            # What reaches the server may drop the marked COMMIT's statements too.
            server.marker_prepared = False
        # DISCARD ALL succeeds only outside a transaction block; there it drops the client's
        # statement names too (the server's shared statements are re-read at the quiet point).
        discards = keyword == b"discard" and server.tx_status == m.TX_IDLE
        if discards and classify(_cstring(msg, 5)).discard_all:
            router.deallocate(None)
        tracker.expect(Expect.QUERY)
        return Action.FORWARD

    def _local_statement(
        self, msg: memoryview, offset: int, server: ServerConnection
    ) -> LocalStatement | None:
        """DEALLOCATE of names this client prepared: answered by the sidecar (the statements are
        shared on the servers under other names). An unknown name, or a failed transaction, goes
        to the server, which answers exactly as PostgreSQL does (26000, 25P02)."""
        router = self.router
        if first_keyword(msg, offset) != b"deallocate" or server.tx_status == m.TX_FAILED:
            return None
        effects = classify(_cstring(msg, offset))
        if not effects.single_statement or effects.deallocate is Deallocate.NONE:
            return None
        if effects.deallocate is Deallocate.ALL:
            return LocalStatement("DEALLOCATE ALL", None)
        name = effects.deallocate_name
        if name is None or name not in router.statements:
            return None
        return LocalStatement("DEALLOCATE", name)

    def _check_poolable(self, msg: memoryview, sql_offset: int, keyword: bytes) -> str | None:
        """Why this statement cannot run under transaction pooling, or None; also notes settings.
        `keyword`: the statement's first keyword, already read by the caller."""
        if not needs_transaction_check(keyword, msg, sql_offset):
            return None
        effects = classify(_cstring(msg, sql_offset))
        self.core.note_effects(effects)
        if effects.not_poolable is None:
            return None
        return f"not supported with pool.mode transaction: {effects.not_poolable}"

    def _owe(self, data: bytes) -> None:
        core = self.core
        if data and core.transport is not None:
            core.transport.write(data)
            journal = core.journal
            if journal is not None:
                # Part of the answers the client got (a replay's must match it): owed only with
                # nothing in flight, so in its place in the answer stream.
                journal.relay_view(data)

    # ---------------------------------------------------------------- Mode: statements

    def watch(self) -> bytes:
        return _TRANSACTION_WATCH

    def known_statements(self) -> dict[str, bytes]:
        known = {}
        for name, stmt in self.router.statements.items():
            parse = m.decode_parse(stmt.parse_message[5:])
            known[name] = m.parse(name, parse.query, parse.param_types)
        return known

    def learn_statement(self, name: str, parse: bytes, replace: bool) -> None:
        router = self.router
        if not replace and name in router.statements:
            return
        if replace:
            router.local.pop(name, None)
        decoded = m.decode_parse(parse[5:])
        global_name = router.registry.name_for(decoded.query, decoded.param_types)
        router.statements[name] = ClientStatement(
            global_name, m.parse(global_name, decoded.query, decoded.param_types)
        )

    def statement_text(self, name: str) -> str | None:
        stmt = self.router.statements.get(name)
        return None if stmt is None else m.decode_parse(memoryview(stmt.parse_message)[5:]).query

    def forget_statement(self, name: str) -> None:
        self.router.statements.pop(name, None)
        self.router.local.pop(name, None)
