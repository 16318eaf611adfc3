"""ClientSession: one application connection, from startup packet to close.

This class is the asyncio Protocol and the dispatcher: `data_received` looks at the session's state
(`session/states.py`, one int compare per read on the hot path) and hands the bytes to the step that
runs in that state. The steps live in one module each under `proxy/session/`, stacked as layers
of one native class (each module adds its methods to the one below; mypyc compiles the stack as
one class, so a call between layers costs what a call within one class did):

    core               fields, the state transition `_to`, linking, failing and closing
    attach             getting a server for held input, parking, maintenance at quiet points
    session_relay      session mode: the fast path and the inspector
    transaction_routing  transaction mode: the fast paths and the statement-renaming inspector
    carryover          a cut server: what the client is told; the aborted-transaction answerer
    outage_session     no writer anywhere: the spool's OutageResponder plays the server
    login              negotiation, authentication, cancel keys, the first server, the admin hand-off

What the session needs from the process is `session/host.py`'s `SessionHost`; nothing here
imports `proxy.app` or `proxy.admin`. ARCHITECTURE.md, "Client session", has the states and their
transitions.
"""

from __future__ import annotations

import asyncio
from typing import cast

from .session.login import Login
from .session.scan import _HOLD_LIMIT
from .session.states import (
    ABORTED,
    CLOSED,
    GATED,
    IDLE,
    LINKED,
    OUTAGE,
    PARKED,
)


class ClientSession(Login):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        self.sidecar.client_opened(self)
        self._handshake_task = asyncio.get_running_loop().create_task(self._handshake())

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == LINKED:
            server = self.server
            if self._gate.closed and self._between_transactions():
                self._unlink(GATED)
                self._hold(data)
                self._start(self._resume_after_gate())
                return
            if server is not None:
                if not self.transaction_mode:
                    if self._session_fast(server, data):
                        return
                elif self._between_answers(server) and self._attach_query(data):
                    return  # the next request of an open transaction, on its own server
            try:
                spans = self._relay.feed(data)
            except Exception as exc:  # (costs nothing unless raised)
                self._malformed(exc)
                return
            out = server.transport if server is not None else None
            if out is not None:
                for span in spans:
                    out.write(span)
            if self._relay.paused and self.state == LINKED:  # Terminate
                self._relay_stopped()
            return
        if state == OUTAGE:
            try:
                self._relay.feed(data)
            except Exception as exc:
                self._malformed(exc)
                return
            # Answered locally, each message as it is read; held (bounded) while the client
            # does not read its answers or a spool write is under way.
            if self._write_paused or self._relay.buffered > _HOLD_LIMIT:
                self._pause_reading()
            return
        if state == ABORTED:
            try:
                self._relay.feed(data)
            except Exception as exc:
                self._malformed(exc)
                return
            self._after_aborted()
            return
        if LINKED < state < ABORTED:  # IDLE, PARKED, HELD, GATED, MAINTAINING: held unless...
            idle = state in (IDLE, PARKED) and self._task is None
            if idle and self.transaction_mode and self._attach_query(data):
                return
            self._hold(data)
            return
        if state == CLOSED:
            return
        # The handshake, a login waiting for a server, the admin console: each reads whole
        # messages when it is ready for them. Past the bound, stop reading the socket until it is
        # (`_wait_input`): what the client sends meanwhile waits in its own socket buffers.
        reader = self._reader
        reader.feed(data)
        if reader.buffered > _HOLD_LIMIT:
            self._pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.state != CLOSED:
            reason = f"client connection lost: {exc}" if exc else "client disconnected"
            self._finish(reason)
        self._wake()

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading the server (bounded buffers).
        self._write_paused = True
        server = self.server
        if server is not None and server.transport is not None:
            server.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        server = self.server
        if server is not None and server.transport is not None:
            server.transport.resume_reading()
        if self.state == OUTAGE and self._task is None:
            self._answer_outage_input()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def drained(self) -> None:
        """Returns once the client is reading its answers (the transport's write buffer is under
        its high-water mark): a local answerer (the admin console) waits here before making more."""
        while self._write_paused and self.transport is not None:
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None
