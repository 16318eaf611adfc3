"""Failover carry-over: a session whose server is cut (lost writer, closed connection, FATAL
goodbye) is told exactly what happened to its requests in flight and moves on; a cut transaction
block is answered locally as aborted (`local.AbortedTransaction`) until the client ends it.

Everything about a cut is decided here (`_server_gone`), which makes this the home of
transaction replay: a journal of the open transaction's requests kept as they are forwarded, and
replayed on the new writer instead of answering 40001.

Uses of the core: its state and transition, server, pool, relay, `send`, `fail`. Receives at
construction: the pool mode (`Mode`: the client's statements, whether the session can move), the
`Attach` part (a server for input held across the cut), and from the host the counters, the
topology (to report the failure) and `writer_connection_lost` (to hold new transactions until
the writer is confirmed). Offers: `server_lost`, `cut_server`, and the ABORTED state's
`inspect_aborted` and `after_aborted` (for the dispatcher).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

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
from .attach import Attach
from .core import SessionCore
from .mode import Mode
from .states import (
    ABORTED,
    GATED,
    IDLE,
)

if TYPE_CHECKING:
    from sidecar_config import Endpoint

    from ..metrics import Stats
    from ..topology import TopologyMonitor


class Carryover:
    def __init__(
        self,
        core: SessionCore,
        mode: Mode,
        attach: Attach,
        stats: Stats,
        topology: TopologyMonitor,
        writer_connection_lost: Callable[[Endpoint, str], None],
    ) -> None:
        self.core = core
        self.mode = mode
        self.attach = attach
        self.relay = core.relay
        self._stats = stats
        self._topology = topology
        self._writer_connection_lost = writer_connection_lost
        self.aborted: AbortedTransaction | None = None  # answering locally after a cut

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        """The linked server connection closed (crash, shutdown, network)."""
        if server is self.core.server and not self.attach.on_replica():
            # Before the session moves on: its next transaction waits for the writer's confirmation.
            # (A replica's server lost says nothing about the writer.)
            self._writer_connection_lost(server.endpoint, reason)
        self._server_gone(server, reason)

    def cut_server(self, reason: str) -> None:
        """The sidecar stopped trusting this session's server (the writer was lost or changed)."""
        if self.core.server is not None:
            self._server_gone(self.core.server, reason)

    def _server_gone(self, server: ServerConnection, reason: str) -> None:
        """Carry the session over the loss of its server (ARCHITECTURE.md, "Failover carry-over").

        Between transactions: nothing to tell; the next transaction runs on the new writer with
        the session's settings and prepared statements. Mid-transaction: 40001 (08007 for a
        COMMIT whose answer never came), and the cut transaction is answered locally as aborted
        until the client rolls back. The client connection stays usable either way, unless half
        a message already went out, or the session holds state that cannot move.
        """
        core = self.core
        if server is not core.server:
            return
        in_flight = len(server.in_flight)
        kinds = server.in_flight.kinds()
        in_block = server.tx_status in (m.TX_IN_BLOCK, m.TX_FAILED)
        broken = server.mid_response
        core.server = None
        active = core.active()
        gated = core.state == GATED
        if active and core.state != IDLE:
            core.to(IDLE)
        if gated:
            self.attach.stop_gate_wait()  # its input gets a server as any held input now
        self.relay.hold()
        server.unlink()
        if core.pool is not None:
            core.pool.forget(server)
        server.close(reason)
        self.attach.report_lost(server, reason)
        logs.event(
            "session_cut",
            logs.WARNING,
            conn=core.id,
            server=server.id,
            upstream=str(server.endpoint),
            in_flight=in_flight,
            in_transaction=in_block,
            reason=reason,
        )
        if not active:
            return  # a login's first server (the login fails on it), or the session is closing
        if broken:
            core.fail(
                UpstreamUnavailable(f"lost upstream {server.endpoint} in the middle of a response: {reason}")
            )
            return
        unmovable = self.mode.unmovable()
        if unmovable is not None:
            core.fail(
                UpstreamUnavailable(
                    f"the database failed over and this session holds state that cannot move to the "
                    f"new writer ({unmovable}); reconnect"
                )
            )
            return
        if in_flight == 0 and not in_block:
            if self.relay.buffered and core.task is None:
                self.attach.attach_soon()
            return
        owed = b""
        status = m.TX_FAILED if in_block else m.TX_IDLE
        first = True
        errors = self._stats.client_errors
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
        core.send(owed)
        if status == m.TX_FAILED:
            self._answer_aborted(first_error_sent=in_flight > 0)
        elif self.relay.buffered and core.task is None and core.state == IDLE:
            self.attach.attach_soon()

    def _answer_aborted(self, first_error_sent: bool) -> None:
        """Answer the client locally until it ends the transaction the failover cut."""
        # Statements prepared before the cut still exist for the client (a driver may have
        # prepared its ROLLBACK long ago), as they would in PostgreSQL after an error.
        self.aborted = AbortedTransaction(first_error_sent, self.mode.known_statements())
        self.core.to_answering(ABORTED, self.inspect_aborted)
        try:
            self.relay.resume()  # everything held is answered (dropped) by inspect_aborted
        except Exception as exc:
            self.core.malformed(exc)
            return
        self.after_aborted()

    def inspect_aborted(self, type_byte: int, msg: memoryview) -> Action:
        aborted = self.aborted
        if type_byte == m.F_TERMINATE or aborted is None:
            return Action.DROP_PAUSE
        self.core.send(aborted.on_message(type_byte, msg))
        if not aborted.done:
            return Action.DROP
        # The rest of an extended-protocol batch after its ROLLBACK is the server's to answer.
        return Action.HOLD if aborted.hand_back_message else Action.DROP_PAUSE

    def after_aborted(self) -> None:
        """ABORTED, after each read: once the client ended the transaction, back to IDLE."""
        aborted = self.aborted
        core = self.core
        if aborted is None or not self.relay.paused:
            return
        if not aborted.done:  # Terminate
            core.close("client sent Terminate")
            return
        self.aborted = None
        self._adopt_aborted_statements(aborted)
        core.to(IDLE)
        if aborted.handback is not None:
            # What followed the ROLLBACK in the client's query string runs on the server, answered
            # as part of the same request (ROLLBACK; DEALLOCATE ALL: two results, one ReadyForQuery).
            self.relay.unread(aborted.handback)
        logs.event("aborted_transaction_ended", conn=core.id)
        if self.relay.buffered and core.task is None:
            self.attach.attach_soon()

    def _adopt_aborted_statements(self, aborted: AbortedTransaction) -> None:
        """Named statements the client prepared or closed while its transaction was answered
        here: PostgreSQL keeps both past the end of the block, so the session does too."""
        for name in aborted.closed:
            self.mode.forget_statement(name)
        for name, parse in aborted.parsed.items():
            self.mode.learn_statement(name, parse, replace=True)
