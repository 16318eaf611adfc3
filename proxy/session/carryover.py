"""Failover carry-over: a session whose server is cut (lost writer, closed connection, FATAL
goodbye) is told exactly what happened to its requests in flight and moves on; a cut transaction
block is answered locally as aborted (`local.AbortedTransaction`) until the client ends it. The
future home of transaction replay.
"""

from __future__ import annotations

from .. import logs
from ..local import AbortedTransaction, failover_error
from ..protocol import messages as m
from ..protocol.framing import Action
from ..protocol.sqlstate import (
    SqlState,
    UpstreamUnavailable,
)
from ..server import (
    REQUEST_COMMIT,
    REQUEST_OTHER,
    REQUEST_READ,
    ServerConnection,
)
from ..statements import ClientStatement
from .states import (
    ABORTED,
    IDLE,
)
from .transaction_routing import TransactionRouting


class Carryover(TransactionRouting):
    def server_lost(self, server: ServerConnection, reason: str) -> None:
        """The linked server connection closed (crash, shutdown, network)."""
        if server is self.server:
            # Before the session moves on: its next transaction waits for the writer's confirmation.
            self.sidecar.writer_connection_lost(server.endpoint, reason)
        self._server_gone(server, reason)

    def cut_server(self, reason: str) -> None:
        """The sidecar stopped trusting this session's server (the writer was lost or changed)."""
        if self.server is not None:
            self._server_gone(self.server, reason)

    def _server_gone(self, server: ServerConnection, reason: str) -> None:
        """Carry the session over the loss of its server (ARCHITECTURE.md, "Failover carry-over").

        Between transactions: nothing to tell; the next transaction runs on the new writer with
        the session's settings and prepared statements. Mid-transaction: 40001 (08007 for a
        COMMIT whose answer never came), and the cut transaction is answered locally as aborted
        until the client rolls back. The client connection stays usable either way, unless half
        a message already went out, or the session holds state that cannot move.
        """
        if server is not self.server:
            return
        in_flight = len(server.in_flight)
        kinds = server.in_flight.kinds()
        in_block = server.tx_status in (m.TX_IN_BLOCK, m.TX_FAILED)
        broken = server.mid_response
        self.server = None
        active = self._active()
        if active and self.state != IDLE:
            self._to(IDLE)
        self._relay.hold()
        server.unlink()
        if self.pool is not None:
            self.pool.forget(server)
        server.close(reason)
        self.sidecar.topology.report_failure(server.endpoint, reason)
        logs.event(
            "session_cut",
            logs.WARNING,
            conn=self.id,
            server=server.id,
            upstream=str(server.endpoint),
            in_flight=in_flight,
            in_transaction=in_block,
            reason=reason,
        )
        if not active:
            return  # a login's first server (the login fails on it), or the session is closing
        if broken:
            self.fail(
                UpstreamUnavailable(f"lost upstream {server.endpoint} in the middle of a response: {reason}")
            )
            return
        if self._unmovable is not None and not self.transaction_mode:
            self.fail(
                UpstreamUnavailable(
                    f"the database failed over and this session holds state that cannot move to the "
                    f"new writer ({self._unmovable}); reconnect"
                )
            )
            return
        if in_flight == 0 and not in_block:
            if self._relay.buffered and self._task is None:
                self._attach_soon()
            return
        owed = b""
        status = m.TX_FAILED if in_block else m.TX_IDLE
        first = True
        errors = self.sidecar.stats.client_errors
        for index in range(in_flight):
            kind = kinds[index] if index < len(kinds) else REQUEST_OTHER
            if kind == REQUEST_COMMIT:
                owed += m.error_response(
                    SqlState.TRANSACTION_RESOLUTION_UNKNOWN.value,
                    "the database failed over while COMMIT was in flight: the transaction may or may "
                    "not have committed",
                    hint="Check whether its effects are present before retrying.",
                ) + m.ready_for_query(m.TX_IDLE)
                status = m.TX_IDLE
            elif not in_block and kind != REQUEST_READ:
                # Sent outside a transaction block: an autocommit statement commits on its own,
                # so it may have been applied just before the crash. 40001 would invite a retry
                # that duplicates it; say the outcome is unknown instead. (A SELECT is taken to
                # be a read and gets 40001: retrying it is safe.)
                owed += m.error_response(
                    SqlState.TRANSACTION_RESOLUTION_UNKNOWN.value,
                    "the database failed over while this statement was running outside a "
                    "transaction block: it may or may not have been applied",
                    hint="Check whether its effects are present before retrying.",
                ) + m.ready_for_query(m.TX_IDLE)
            else:
                errors[SqlState.SERIALIZATION_FAILURE.value if first else "25P02"] += 1
                owed += failover_error(first) + m.ready_for_query(status)
                first = False
                continue
            errors[SqlState.TRANSACTION_RESOLUTION_UNKNOWN.value] += 1
        self._send(owed)
        if status == m.TX_FAILED:
            self._answer_aborted(first_error_sent=in_flight > 0)
        elif self._relay.buffered and self._task is None and self.state == IDLE:
            self._attach_soon()

    def _answer_aborted(self, first_error_sent: bool) -> None:
        """Answer the client locally until it ends the transaction the failover cut."""
        # Statements prepared before the cut still exist for the client (a driver may have
        # prepared its ROLLBACK long ago), as they would in PostgreSQL after an error.
        self._aborted = AbortedTransaction(first_error_sent, self._known_statements())
        self._to(ABORTED)
        try:
            self._relay.resume()  # everything held is answered (dropped) by _inspect_aborted
        except Exception as exc:
            self._malformed(exc)
            return
        self._after_aborted()

    def _inspect_aborted(self, type_byte: int, msg: memoryview) -> Action:
        aborted = self._aborted
        if type_byte == m.F_TERMINATE or aborted is None:
            return Action.DROP_PAUSE
        self._send(aborted.on_message(type_byte, msg))
        if not aborted.done:
            return Action.DROP
        # The rest of an extended-protocol batch after its ROLLBACK is the server's to answer.
        return Action.HOLD if aborted.hand_back_message else Action.DROP_PAUSE

    def _after_aborted(self) -> None:
        aborted = self._aborted
        if aborted is None or not self._relay.paused:
            return
        if not aborted.done:  # Terminate
            self.close("client sent Terminate")
            return
        self._aborted = None
        self._adopt_aborted_statements(aborted)
        self._to(IDLE)
        if aborted.handback is not None:
            # What followed the ROLLBACK in the client's query string runs on the server, answered
            # as part of the same request (ROLLBACK; DEALLOCATE ALL: two results, one ReadyForQuery).
            self._relay.unread(aborted.handback)
        logs.event("aborted_transaction_ended", conn=self.id)
        if self._relay.buffered and self._task is None:
            self._attach_soon()

    def _adopt_aborted_statements(self, aborted: AbortedTransaction) -> None:
        """Named statements the client prepared or closed while its transaction was answered
        here: PostgreSQL keeps both past the end of the block, so the session does too."""
        router = self.router
        for name in aborted.closed:
            if router is None:
                self._session_statements.pop(name, None)
            else:
                router.statements.pop(name, None)
                router.local.pop(name, None)
        for name, parse in aborted.parsed.items():
            if router is None:
                self._session_statements[name] = parse
                continue
            decoded = m.decode_parse(parse[5:])
            global_name = self.sidecar.statements.name_for(decoded.query, decoded.param_types)
            router.local.pop(name, None)
            router.statements[name] = ClientStatement(
                global_name, m.parse(global_name, decoded.query, decoded.param_types)
            )
