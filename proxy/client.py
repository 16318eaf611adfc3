"""ClientSession: one application connection, from startup packet to close.

This class is the asyncio Protocol and the dispatcher. It is the session's shared state too (it
extends `session/core.py`'s `SessionCore`: fields, the state transition, linking, failing and
closing), and it builds, per session, the parts that do the work, one module each under
`proxy/session/`:

    attach               Attach: getting a server for held input, parking, the gate, maintenance
    session_relay        SessionRelay: session mode's fast path and inspector      } the pool mode
    transaction_routing  TransactionRouting: transaction mode's fast paths and     } (`Mode`): one
                         statement-renaming inspector                              } of the two
    carryover            Carryover: a cut server, what the client is told, the aborted transaction
    outage_session       OutageSession: no writer anywhere, the spool plays the server (if spooling)
    login                Login: negotiation, authentication, cancel keys, the first server, the
                         admin hand-off

Each part holds the core and what it was given at construction (listed in its module's
docstring), never the parts it was not given. `data_received` looks at the state (one int compare
per read on the hot path) and calls the part that runs in it; the parts are typed by their
classes, so every call from here is a native call (ARCHITECTURE.md, "The compiled data path").

What the session needs from the process is `session/host.py`'s `SessionHost`; nothing here
imports `proxy.app` or `proxy.admin`. ARCHITECTURE.md, "Client session", has the states and their
transitions.
"""

from __future__ import annotations

import asyncio
from typing import cast

from .server import ServerConnection
from .session.attach import Attach
from .session.carryover import Carryover
from .session.core import SessionCore
from .session.host import AdminFactory, SessionHost
from .session.login import Login
from .session.outage_session import OutageSession
from .session.scan import _HOLD_LIMIT
from .session.session_relay import SessionRelay
from .session.states import (
    ABORTED,
    CLOSED,
    IDLE,
    LINKED,
    OUTAGE,
    PARKED,
)
from .session.transaction_routing import TransactionRouting


class ClientSession(SessionCore):
    def __init__(self, host: SessionHost[ClientSession], admin: AdminFactory[ClientSession]) -> None:
        super().__init__(host)
        self.attach = Attach(
            self,
            host.pass_gate,
            host.topology,
            self._enter_outage,
            host.replica_pool_for,
            host.config.routing,
        )
        # The pool mode: exactly one of the two is built.
        self.session_relay: SessionRelay | None = None
        self.routing: TransactionRouting | None = None
        if self.transaction_mode:
            self.routing = TransactionRouting(self, self.attach, host.statements)
            self.mode = self.routing
        else:
            self.session_relay = SessionRelay(self)
            self.mode = self.session_relay
        self.carryover = Carryover(
            self, self.mode, self.attach, host.stats, host.topology, host.writer_connection_lost
        )
        spooling = host.spooling
        self.outage: OutageSession | None = None
        if spooling is not None:
            self.outage = OutageSession(
                self,
                self.mode,
                self.attach,
                spooling,
                host.topology,
                host.stats,
                host.config.failover.hold_timeout,
            )
            self.carryover.spool_take_over = self.outage.take_over
        self.login = Login(self, host, admin, self.attach, self.outage)

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.host.client_opened(self)
        self.handshake_task = asyncio.get_running_loop().create_task(self.login.run(self._hand_over_input))

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == LINKED:
            server = self.server
            session_relay = self.session_relay
            if (
                (self.gate.closed or self.reroute)
                and session_relay is not None
                and session_relay.between_transactions()
                and self.attach.next_transaction(data)
            ):
                return  # held at the gate, or moved to another server (read routing)
            if server is not None:
                if session_relay is not None:
                    if session_relay.fast(server, data):
                        if self.journal is not None:
                            self.journal.record_request(data)  # (a reference: no copy)
                        return
                else:
                    routing = self.routing
                    if routing is not None and routing.between_answers(server) and routing.attach_query(data):
                        if self.journal is not None:
                            self.journal.record_request(data)
                        return  # the next request of an open transaction, on its own server
            try:
                spans = self.relay.feed(data)
            except Exception as exc:  # (costs nothing unless raised)
                self.malformed(exc)
                return
            out = server.transport if server is not None else None
            if out is not None:
                for span in spans:
                    out.write(span)
                if self.journal is not None:
                    self.record_spans(spans)
            if self.relay.paused and self.state == LINKED:  # Terminate
                self.relay_stopped()
            return
        if state == OUTAGE:
            try:
                self.relay.feed(data)
            except Exception as exc:
                self.malformed(exc)
                return
            # Answered locally, each message as it is read; held (bounded) while the client
            # does not read its answers or a spool write is under way.
            if self.write_paused or self.relay.buffered > _HOLD_LIMIT:
                self.pause_reading()
            return
        if state == ABORTED:
            try:
                self.relay.feed(data)
            except Exception as exc:
                self.malformed(exc)
                return
            self.carryover.after_aborted()
            return
        if LINKED < state < ABORTED:  # IDLE, PARKED, HELD, GATED, MAINTAINING: held unless...
            if state in (IDLE, PARKED) and self.task is None:
                routing = self.routing
                if routing is not None and routing.attach_query(data):
                    if self.journal is not None:
                        self.journal.record_request(data)
                    return
            self.attach.hold(data)
            return
        if state == CLOSED:
            return
        # The handshake, a login waiting for a server, the admin console: each reads whole
        # messages when it is ready for them.
        self.login.feed(data)

    def eof_received(self) -> bool | None:
        self.login.eof()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.state != CLOSED:
            reason = f"client connection lost: {exc}" if exc else "client disconnected"
            self.finish(reason)
        self.login.wake()

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading the server (bounded buffers).
        self.write_paused = True
        server = self.server
        if server is not None and server.transport is not None:
            server.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        server = self.server
        if server is not None and server.transport is not None:
            server.transport.resume_reading()
        outage = self.outage
        if self.state == OUTAGE and self.task is None and outage is not None:
            outage.answer_input()
        self.writable()

    # ---------------------------------------------------------------- the server's calls, routed

    def quiet_point(self) -> None:
        self.attach.quiet_point()

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        self.carryover.server_lost(server, reason)

    # ---------------------------------------------------------------- the process's calls

    def cut_server(self, reason: str) -> None:
        """The sidecar stopped trusting this session's server (the writer was lost or changed)."""
        self.carryover.cut_server(reason)

    # ---------------------------------------------------------------- between the parts

    def _enter_outage(self) -> None:
        """`Attach` found no writer and the spool takes the session (the pool raises SpoolNow
        only when spooling is on)."""
        outage = self.outage
        assert outage is not None
        outage.enter()

    def _hand_over_input(self) -> None:
        """Logged in: what the client sent past the handshake goes the way of any later input,
        and reading (paused at the handshake's bound) goes on under that path's bounds."""
        rest = self.login.reader.take_rest()
        if rest:
            self.data_received(rest)
        if self.state == OUTAGE:
            outage = self.outage
            if self.task is None and outage is not None:  # (else the spool write under way answers the rest)
                outage.answer_input()
        elif self.active() and self.relay.buffered <= _HOLD_LIMIT:
            self.resume_reading()
