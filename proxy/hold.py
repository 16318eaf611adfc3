"""HoldController: whether new work may proceed now, must wait, or goes to the spool.

One owner for what used to be spread over the Sidecar (`_gate`, `gate_reason`,
`_gate_for_failover`, `_outage`, `draining`) and answered three ways. The inputs:

* the cluster state (ARCHITECTURE.md, Cluster state), told by the Sidecar's listener:
  no writer -> held for a failover (bounded by `failover.hold_timeout`); OUTAGE with a spool ->
  held work is spooled (`SpoolNow`); UP -> released;
* an operator's PAUSE and RESUME (held without a limit);
* the drain at shutdown (held: a session between transactions is closed rather than started);
* the drain hold in RECOVERING (`spool.max_drain_hold`), and an outage found at startup;
* a connection to the writer lost under a client: held until a probe confirms the writer
  (`hold_to_confirm`, `confirmed`), or until the failover that probe finds takes the hold over.

What it answers: `gate.closed` (the data path's per-read check, a native attribute of a compiled
object), `pass_()` (wait until new work may start, or raise `SpoolNow` / `CannotConnectNow`),
`spooling` (the one answer to "are we spooling?"), `held` (requests waiting now).

The hold is one gate with one reason, as before this module existed: a failover ending opens it
even when a PAUSE closed it meanwhile, and a request that began waiting behind a PAUSE keeps
waiting without the failover's limit (ARCHITECTURE.md, Known debts). Those rules now live here
alone, so changing them is a change to this file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import logs
from .protocol.sqlstate import CannotConnectNow
from .topology import ClusterState

if TYPE_CHECKING:
    from sidecar_config import Endpoint


class SpoolNow(Exception):
    """Raised to a request waiting for a writer when the cluster enters OUTAGE with a spool:
    serve it with an OutageResponder instead of failing it."""


class Gate:
    """Whether new transactions may start: `closed` while they are held. The HoldController opens
    and closes it; every client read on the data path checks it, and this object, being compiled,
    makes that a native attribute read."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


class HoldController:
    def __init__(self, hold_timeout: float, spool_grace: float | None, problem: Callable[[], str]) -> None:
        """`spool_grace`: None without a spool; else how much longer than `hold_timeout` a request
        held for a failover waits for the OUTAGE transition (one probe interval and one probe
        timeout: the cluster enters OUTAGE at the first probe after the hold). `problem` says why
        no writer is known, for the error a request gets when its hold ends."""
        self.gate = Gate()
        self.reason = ""  # why the gate is closed ("" while open)
        self.for_failover = False  # held by a failover or recovery (bounded) rather than PAUSE
        self.spooling = False  # OUTAGE with a spool: held work is spooled
        self.draining = False  # shutting down: not ready; sessions close as they go idle
        self.held = 0  # requests waiting in `pass_` now
        # The writer whose connection closed under a client, while a probe confirms it is still
        # the writer (new work held meanwhile, as for a failover).
        self.confirming: Endpoint | None = None
        self.hold_timeout = hold_timeout
        self.spool_grace = spool_grace
        self._problem = problem
        self._open = asyncio.Event()
        self._open.set()
        self._spool = asyncio.Event()

    def retune(self, hold_timeout: float, spool_grace: float | None) -> None:
        """A reload changed `failover.*`: requests held from now on use the new limits."""
        self.hold_timeout = hold_timeout
        self.spool_grace = spool_grace

    # ---------------------------------------------------------------- the gate

    def close(self, reason: str) -> None:
        """Hold new work (PAUSE, shutdown; `hold_for_failover` for the cluster's reasons)."""
        if self._open.is_set():
            self.reason = reason
            self._open.clear()
            self.gate.closed = True
            logs.event("transactions_held", reason=reason)

    def open(self) -> None:
        if not self._open.is_set():
            self._open.set()
            self.gate.closed = False
            logs.event("transactions_released", reason=self.reason, waiting=self.held)
            self.reason = ""

    def hold_for_failover(self, reason: str) -> None:
        """No writer (or a backlog to replay first): hold new work, each request for at most
        the failover hold."""
        self.for_failover = True
        self.close(reason)

    def release_failover(self) -> bool:
        """The failover's (or the recovery's) hold ends; False if none was on."""
        if not self.for_failover:
            return False
        self.for_failover = False
        self.open()
        return True

    def hold_to_confirm(self, writer: Endpoint) -> bool:
        """A connection to `writer` closed under a client: hold new work until a probe says
        whether it still is the writer (`confirmed`). False (nothing done) if already held."""
        if not self._open.is_set():
            return False
        self.confirming = writer
        self.hold_for_failover(f"a connection to the writer {writer} was lost: confirming the writer")
        return True

    def confirmed(self, writer: Endpoint, still: bool) -> None:
        """The probe answered: released if `writer` still is the writer, unless something else
        took the hold over meanwhile (a failover, which releases it itself)."""
        if self.confirming != writer:
            return
        self.confirming = None
        if still:
            self.release_failover()

    def drain(self) -> None:
        """Shutting down: a session between transactions that sends more is held instead of
        starting a transaction the deadline could cut (and, held, counts as idle)."""
        self.draining = True
        self.close("shutting down")

    # ---------------------------------------------------------------- the cluster state

    def cluster_state(self, state: ClusterState, writer_known: bool) -> None:
        """Follow a transition of the cluster state machine: spool in OUTAGE (with a spool), hold
        while no writer is known, release when UP. The Sidecar calls `release_failover` itself
        for UP after its own bookkeeping, and this for the rest, first."""
        if state is ClusterState.OUTAGE and self.spool_grace is not None:
            self.start_spooling()
        elif self.spooling:
            self.stop_spooling()
        if not writer_known:
            reason = f"failover: {state.value}"
            if self.confirming is not None:
                # Held already while the lost connection was confirmed: now held by the failover
                # (the same hold, not reopened in between: held requests go on waiting).
                self.confirming = None
                self.reason = reason
                logs.event("transactions_held", reason=reason)
            self.hold_for_failover(reason)

    def start_spooling(self) -> None:
        self.spooling = True
        self._spool.set()
        logs.event("spooling_started", reason=self._problem())

    def stop_spooling(self) -> None:
        self.spooling = False
        self._spool.clear()

    # ---------------------------------------------------------------- waiting

    async def pass_(self) -> None:
        """Return when new work may start: at once, unless held.

        Held by a failover (no writer known), a request waits up to `failover.hold_timeout` and
        then gets 57P03, or SpoolNow once the cluster is in OUTAGE with a spool; held by an
        operator's PAUSE (or the shutdown drain), it waits until RESUME.
        """
        if self._open.is_set():
            return
        if self.spooling and self.for_failover:
            raise SpoolNow
        self.held += 1
        try:
            if not self.for_failover:
                await self._open.wait()
                return
            hold = self.hold_timeout
            if self.spool_grace is not None:
                hold += self.spool_grace
            try:
                async with asyncio.timeout(hold):
                    # Waited for again if it closed before this ran (a hold taken over by another:
                    # a lost writer connection confirmed, then the failover), within the same bound.
                    while not self._open.is_set() and not self._spool.is_set():
                        await _first(self._open.wait(), self._spool.wait())
            except TimeoutError:
                pass
            if self._open.is_set():
                return
            if self.spooling:
                raise SpoolNow
            raise CannotConnectNow(
                f"no writable database: held {self.hold_timeout:g}s "
                f"(failover.hold_timeout) without a writer; {self._problem()}"
            )
        finally:
            self.held -= 1


async def _first(*aws: Awaitable[object]) -> None:
    """Return when the first of `aws` is done; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
