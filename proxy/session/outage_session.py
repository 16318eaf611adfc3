"""The outage session: with no writer anywhere, an `OutageResponder` plays the server and
spools simple INSERTs; the session leaves it when a writer is back (see ARCHITECTURE.md, "Path of
one spooled INSERT").
"""

from __future__ import annotations

import asyncio
import contextlib

from .. import logs
from ..protocol import messages as m
from ..protocol.framing import Action
from ..protocol.sqlstate import (
    ProtocolViolation,
    SqlState,
    UpstreamUnavailable,
)
from ..spool import SpoolError
from ..spool.outage import OutageResponder, Store, Unspoolable
from ..statements import ClientStatement
from .carryover import Carryover
from .states import (
    IDLE,
    OUTAGE,
)


class OutageSession(Carryover):
    def _enter_outage(self) -> None:
        """Serve this session with an OutageResponder until a writer is back."""
        spooling = self.sidecar.spooling
        assert spooling is not None
        responder = spooling.responder(self.user, self.database, {**self.startup_params, **self.settings})
        # The session's prepared statements stay usable: the responder learns them first.
        for parse in self._known_statements().values():
            responder.feed(m.F_PARSE, parse[5:])
        self._outage = responder
        self._outage_batch = False
        logs.event("session_spooling", conn=self.id)
        self._to(OUTAGE)
        self._relay.resume()

    def _inspect_outage(self, type_byte: int, msg: memoryview) -> Action:
        responder = self._outage
        if responder is None:
            return Action.HOLD
        if type_byte == m.F_TERMINATE:
            self.close("client sent Terminate")
            return Action.DROP_PAUSE
        if self._write_paused:
            # The client is not reading its answers: answer no more until it does
            # (`resume_writing`), and read no more meanwhile.
            self._pause_reading()
            return Action.HOLD
        if (
            not self._outage_batch
            and not responder.in_transaction
            and self.sidecar.topology.writer is not None
        ):
            # A writer is back and this starts a new transaction: leave the spool behind.
            self._leave_outage()
            return Action.HOLD
        # Nothing of a transaction has been answered locally yet: if this request needs the
        # database and a writer comes back within the hold, it can simply run there.
        fresh = not self._outage_batch and not responder.in_transaction and not responder.pending
        if type_byte == m.F_SYNC:
            self._outage_batch = False
        elif type_byte != m.F_QUERY:
            self._outage_batch = True
        try:
            reply = responder.feed(type_byte, bytes(msg[5:]))
        except ProtocolViolation as exc:
            self.fail(exc)
            return Action.DROP_PAUSE
        self._send(reply.data)
        if reply.verdict is None:
            return Action.DROP
        handback = None
        if (
            isinstance(reply.verdict, Unspoolable)
            and fresh
            and not reply.data
            and (type_byte == m.F_QUERY or (type_byte == m.F_PARSE and msg[5] == 0))  # unnamed
        ):
            handback = bytes(msg)
        self._start(self._act_on_verdict(responder, reply.verdict, handback))
        return Action.DROP_PAUSE

    async def _act_on_verdict(
        self, responder: OutageResponder, verdict: Store | Unspoolable | None, handback: bytes | None = None
    ) -> None:
        spooling = self.sidecar.spooling
        assert spooling is not None
        while verdict is not None:
            if isinstance(verdict, Store):
                try:
                    await spooling.append(verdict.record)
                except SpoolError as exc:
                    logs.event("spool_append_failed", logs.ERROR, conn=self.id, error=str(exc))
                    self._send(responder.store_failed(str(exc)))
                    break
                reply = responder.stored()
                self._send(reply.data)
                verdict = reply.verdict
            else:
                # Needs the database: held like any request while no writer exists, then refused
                # (what was spooled of the transaction so far is discarded, never stored).
                hold = self.sidecar.config.failover.hold_timeout
                writer = None
                with contextlib.suppress(UpstreamUnavailable):  # no writer within the hold
                    writer = await self.sidecar.topology.wait_for_writer(hold)
                if (
                    writer is not None
                    and handback is not None
                    and self.state == OUTAGE
                    and self._outage is responder
                    and not spooling.spooling
                ):
                    # The writer is back within the hold and nothing of this transaction was
                    # answered locally: it runs there, like any request held by a failover.
                    logs.event("spooling_request_handed_back", conn=self.id, writer=str(writer))
                    self._relay.unread(handback)
                    self._outage_batch = False
                    self._leave_outage()
                    return
                self.sidecar.stats.client_errors[SqlState.CANNOT_CONNECT_NOW.value] += 1
                self._send(responder.refuse(verdict.reason))
                break
        if self.state == OUTAGE and self._outage is responder:
            self._answer_outage_input()

    def _answer_outage_input(self) -> None:
        """Answer what the client sent while the responder waited (a spool write, a client not
        reading its answers), then read on if nothing more is held."""
        if not self._active():
            return
        if self._relay.paused:
            try:
                self._relay.resume()
            except Exception as exc:
                self._malformed(exc)
                return
        if self.state == OUTAGE and not self._relay.paused and not self._write_paused:
            self._resume_reading()

    def _leave_outage(self) -> None:
        responder = self._outage
        self._outage = None
        if responder is not None:
            self._adopt_statements(responder)
        self._to(IDLE)
        logs.event("session_spooling_ended", conn=self.id)
        # HOLD left the relay paused with the message in hand: get a server for it.
        asyncio.get_running_loop().call_soon(self._after_outage)

    def _after_outage(self) -> None:
        if self._needs_server():
            self._attach_soon()

    def _adopt_statements(self, responder: OutageResponder) -> None:
        """Statements the client prepared during the outage exist on no server: learn them so
        they are prepared wherever the session's next transaction runs."""
        for name, sql, types in responder.named_statements():
            if self.router is None:
                self._session_statements[name] = m.parse(name, sql, types)
            elif name not in self.router.statements:
                global_name = self.sidecar.statements.name_for(sql, types)
                self.router.statements[name] = ClientStatement(global_name, m.parse(global_name, sql, types))
