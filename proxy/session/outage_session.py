"""The outage session: with no writer anywhere, an `OutageResponder` plays the server and
spools simple INSERTs; the session leaves it when a writer is back (see ARCHITECTURE.md, "Path of
one spooled INSERT").

Uses of the core: its state and transition, relay, the login's user, database and settings,
`send`, `fail`, `close`, the reading flags. Receives at construction: the pool mode (`Mode`: the
client's statements, shown to the responder and learnt back from it), the `Attach` part (a server
for the request that ends the outage, and the step under way), the spool service, the topology
(is a writer back?), the counters and `failover.hold_timeout`. Offers: `enter`, the OUTAGE state's
`inspect` and `answer_input` (for the dispatcher).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import logs
from ..protocol import messages as m
from ..protocol.framing import Action, length_at
from ..protocol.sqlstate import (
    ProtocolViolation,
    SqlState,
    UpstreamUnavailable,
)
from ..spool import SpoolError
from ..spool.outage import OutageResponder, Store, Unspoolable
from .attach import Attach
from .core import SessionCore
from .host import Spooling
from .mode import Mode
from .states import (
    IDLE,
    OUTAGE,
)

if TYPE_CHECKING:
    from ..metrics import Stats
    from ..topology import TopologyMonitor


class OutageSession:
    def __init__(
        self,
        core: SessionCore,
        mode: Mode,
        attach: Attach,
        spooling: Spooling,
        topology: TopologyMonitor,
        stats: Stats,
        hold_timeout: float,
    ) -> None:
        self.core = core
        self.mode = mode
        self.attach = attach
        self.relay = core.relay
        self._spooling = spooling
        self._topology = topology
        self._stats = stats
        self._hold_timeout = hold_timeout
        self._outage: OutageResponder | None = None  # playing the server while no writer exists
        self._outage_batch = False  # an extended-protocol batch is open (no Sync yet)
        # Read routing: the request in hand was looked at already (`_try_replica`) and stays here.
        self._replica_checked = False

    def enter(self) -> None:
        """Serve this session with an OutageResponder until a writer is back."""
        self._serve(self._new_responder(), False)

    def take_over(self, requests: list[bytes], answered: Callable[[bytes], bool]) -> bool:
        """A transaction block cut while no writer exists anywhere (`Carryover._into_spool`): its
        requests, as the journal kept them, fed to a fresh responder, each reply's bytes given to
        `answered` (False: it differs from what the client got). True if the responder answered
        every one itself and alike: the session goes on spooling, inside that transaction, as if
        the outage had begun before it. False (a request needs the database, or an answer
        differs): nothing changed."""
        responder = self._new_responder()
        batch = False
        data = b"".join(requests)
        pos, end = 0, len(data)
        while pos < end:
            type_byte = data[pos]
            size = length_at(data, pos + 1)
            if size < 4 or pos + 1 + size > end:
                return False
            try:
                reply = responder.feed(type_byte, data[pos + 5 : pos + 1 + size])
            except ProtocolViolation:
                return False
            if reply.verdict is not None or not answered(reply.data):
                return False
            if type_byte == m.F_SYNC:
                batch = False
            elif type_byte != m.F_QUERY:
                batch = True
            pos += 1 + size
        self._serve(responder, batch)
        return True

    def _new_responder(self) -> OutageResponder:
        core = self.core
        responder = self._spooling.responder(
            core.user, core.database, {**core.startup_params, **core.settings}
        )
        # The session's prepared statements stay usable: the responder learns them first.
        for parse in self.mode.known_statements().values():
            responder.feed(m.F_PARSE, parse[5:])
        return responder

    def _serve(self, responder: OutageResponder, batch: bool) -> None:
        core = self.core
        self._outage = responder
        self._outage_batch = batch
        logs.event("session_spooling", conn=core.id)
        core.to_answering(OUTAGE, self.inspect)
        self.relay.resume()

    def inspect(self, type_byte: int, msg: memoryview) -> Action:
        responder = self._outage
        core = self.core
        if responder is None:
            return Action.HOLD
        if type_byte == m.F_TERMINATE:
            core.close("client sent Terminate")
            return Action.DROP_PAUSE
        if core.write_paused:
            # The client is not reading its answers: answer no more until it does
            # (`resume_writing`), and read no more meanwhile.
            core.pause_reading()
            return Action.HOLD
        if not self._outage_batch and not responder.in_transaction and self._topology.writer is not None:
            # A writer is back and this starts a new transaction: leave the spool behind.
            self._leave_outage()
            return Action.HOLD
        if not self._outage_batch and not responder.in_transaction and self.attach.reads:
            if not self._replica_checked:
                # Read routing: read-only work goes to a replica if one qualifies, never to the
                # responder. Looked at once the request is held whole (`_try_replica`).
                self._replica_checked = True
                asyncio.get_running_loop().call_soon(self._try_replica, responder)
                return Action.HOLD
            self._replica_checked = False
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
            core.fail(exc)
            return Action.DROP_PAUSE
        core.send(reply.data)
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
        self.attach.start(self._act_on_verdict(responder, reply.verdict, handback))
        return Action.DROP_PAUSE

    async def _act_on_verdict(
        self, responder: OutageResponder, verdict: Store | Unspoolable | None, handback: bytes | None = None
    ) -> None:
        spooling = self._spooling
        core = self.core
        while verdict is not None:
            if isinstance(verdict, Store):
                try:
                    await spooling.append(verdict.record)
                except SpoolError as exc:
                    logs.event("spool_append_failed", logs.ERROR, conn=core.id, error=str(exc))
                    core.send(responder.store_failed(str(exc)))
                    break
                reply = responder.stored()
                core.send(reply.data)
                verdict = reply.verdict
            else:
                # Needs the database: held like any request while no writer exists, then refused
                # (what was spooled of the transaction so far is discarded, never stored).
                writer = None
                with contextlib.suppress(UpstreamUnavailable):  # no writer within the hold
                    writer = await self._topology.wait_for_writer(self._hold_timeout)
                if (
                    writer is not None
                    and handback is not None
                    and core.state == OUTAGE
                    and self._outage is responder
                    and not spooling.spooling
                ):
                    # The writer is back within the hold and nothing of this transaction was
                    # answered locally: it runs there, like any request held by a failover.
                    logs.event("spooling_request_handed_back", conn=core.id, writer=str(writer))
                    self.relay.unread(handback)
                    self._outage_batch = False
                    self._leave_outage()
                    return
                self._stats.client_errors[SqlState.CANNOT_CONNECT_NOW.value] += 1
                core.send(responder.refuse(verdict.reason))
                break
        if core.state == OUTAGE and self._outage is responder:
            self.answer_input()

    def _try_replica(self, responder: OutageResponder) -> None:
        """The request that starts a transaction is held: if it is read-only work and a replica
        qualifies, the session leaves the outage and it runs there; else the responder answers it
        as before (`_replica_checked` lets it through)."""
        core = self.core
        # (The step that entered the outage may still be finishing: `core.task` is not looked at.)
        if core.state != OUTAGE or self._outage is not responder:
            return
        pool = self.attach.pool_for_request()
        if pool is not None and pool.replica is not None:
            self._replica_checked = False
            logs.event("spooling_request_to_replica", logs.DEBUG, conn=core.id, replica=str(pool.replica))
            self._leave_outage()
            return
        self.answer_input()

    def answer_input(self) -> None:
        """Answer what the client sent while the responder waited (a spool write, a client not
        reading its answers), then read on if nothing more is held."""
        core = self.core
        if not core.active():
            return
        if self.relay.paused:
            try:
                self.relay.resume()
            except Exception as exc:
                core.malformed(exc)
                return
        if core.state == OUTAGE and not self.relay.paused and not core.write_paused:
            core.resume_reading()

    def _leave_outage(self) -> None:
        responder = self._outage
        self._outage = None
        if responder is not None:
            self._adopt_statements(responder)
        self.core.to(IDLE)
        logs.event("session_spooling_ended", conn=self.core.id)
        # HOLD left the relay paused with the message in hand: get a server for it.
        asyncio.get_running_loop().call_soon(self._after_outage)

    def _after_outage(self) -> None:
        if self.attach.needs_server():
            self.attach.attach_soon()

    def _adopt_statements(self, responder: OutageResponder) -> None:
        """Statements the client prepared during the outage exist on no server: learn them so
        they are prepared wherever the session's next transaction runs."""
        for name, sql, types in responder.named_statements():
            self.mode.learn_statement(name, m.parse(name, sql, types), replace=False)
