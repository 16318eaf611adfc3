"""Failover carry-over: a session whose server is cut (lost writer, closed connection, FATAL
goodbye) is told exactly what happened to its requests in flight and moves on; a cut transaction
block is answered locally as aborted (`local.AbortedTransaction`) until the client ends it.

Everything about a cut is decided here (`_server_gone`), transaction replay included: the
session's journal (the current transaction's requests as forwarded, a digest of the answers
relayed) is replayed on the confirmed new writer (`_replay`, with `replay.plan` and
`replay.ReplayClient`); only if that cannot be done, or the replay's answers differ, is the client
told as before (`_tell_client`). ARCHITECTURE.md, "Transaction replay".

Uses of the core: its state and transition, server, pool, relay, `send`, `fail`. Receives at
construction: the pool mode (`Mode`: the client's statements, whether the session can move), the
`Attach` part (a server for input held across the cut), and from the host the counters, the
topology (to report the failure) and `writer_connection_lost` (to hold new transactions until
the writer is confirmed). Offers: `server_lost`, `cut_server`, and the ABORTED state's
`inspect_aborted` and `after_aborted` (for the dispatcher).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING

from .. import logs
from ..journal import EQUAL, Verifier
from ..local import AbortedTransaction, failover_error
from ..outcome import resolve as resolve_marker
from ..protocol import messages as m
from ..protocol.framing import Action
from ..protocol.sqlstate import (
    CannotConnectNow,
    ProxyError,
    SqlState,
    UpstreamUnavailable,
)
from ..server import (
    REQUEST_COMMIT,
    REQUEST_OTHER,
    REQUEST_READ,
    ServerConnection,
)
from ..settings import sync_sql
from ..spooling import SpoolNow
from . import replay
from .attach import Attach
from .core import SessionCore
from .mode import Mode
from .states import (
    ABORTED,
    GATED,
    HELD,
    IDLE,
)

if TYPE_CHECKING:
    from sidecar_config import Endpoint

    from ..metrics import Stats
    from ..pool import Pool
    from ..topology import TopologyMonitor


class Cut:
    """What a cut server left owed to the client: the answers `_tell_client` gives if no replay
    does."""

    def __init__(self, server: str, in_flight: int, kinds: list[int], in_block: bool, broken: bool) -> None:
        self.server = server
        # The cut connection's backend and when it was opened (monotonic): if the writer that
        # answers is the same server, its old backend must be gone before the marker is read.
        self.backend_pid: int | None = None
        self.opened = 0.0
        self.in_flight = in_flight
        self.kinds = kinds
        self.in_block = in_block
        self.broken = broken
        # The COMMIT in flight is known not to have committed (its marker is not on the new
        # writer): it is answered 40001, not 08007.
        self.rolled_back = False
        # What was cut is an autocommit write sent wrapped (`SessionCore.wrap_write`).
        self.wrapped = False
        # A marked COMMIT's answer if it committed (`ServerConnection.marker_answer`).
        self.commit_answer = b""


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
        # `OutageSession.take_over`, when the spool is on (`_into_spool`).
        self.spool_take_over: Callable[[list[bytes], Callable[[bytes], bool]], bool] | None = None

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
        unmovable = self.mode.unmovable()
        if unmovable is not None:
            core.fail(
                UpstreamUnavailable(
                    f"the database failed over and this session holds state that cannot move to the "
                    f"new writer ({unmovable}); reconnect"
                )
            )
            return
        cut = Cut(str(server.endpoint), in_flight, kinds, in_block, broken)
        marker_id = server.marker_id
        wrapped = server.wrapped
        if (
            marker_id is not None
            and kinds
            and (
                (wrapped is None and kinds[-1] == REQUEST_COMMIT and kinds.count(REQUEST_COMMIT) == 1)
                or (wrapped is not None and len(kinds) == 1 and not wrapped.statement_failed)
            )
            and core.task is None
        ):
            # A wrapped autocommit write: committed, the client gets the statement's held answer.
            cut.wrapped = wrapped is not None
            cut.commit_answer = server.marker_answer
            cut.backend_pid = server.backend_key[0] if server.backend_key is not None else None
            cut.opened = server.created_at
            self._start_resolve(cut, marker_id, wrapped.committed_answer() if wrapped is not None else None)
            return
        journal = core.journal
        if journal is not None and (in_flight or in_block):
            if self._start_replay(cut):
                return
            journal.reset()
        self._tell_client(cut)

    def _tell_client(self, cut: Cut) -> None:
        """The answers owed for what the cut server left unanswered, as PostgreSQL's errors, and
        the session goes on (a cut transaction block answered locally as aborted)."""
        core = self.core
        if cut.broken:
            core.fail(UpstreamUnavailable(f"lost upstream {cut.server} in the middle of a response"))
            return
        in_flight = cut.in_flight
        kinds = cut.kinds
        in_block = cut.in_block
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
            if kind == REQUEST_COMMIT and cut.rolled_back:
                errors[SqlState.SERIALIZATION_FAILURE.value] += 1
                owed += failover_error(True) + m.ready_for_query(m.TX_IDLE)
                status = m.TX_IDLE
                continue
            if kind == REQUEST_COMMIT:
                self._stats.commit_outcomes["unknown"] += 1
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

    # ---------------------------------------------------------------- transaction replay

    def _start_replay(self, cut: Cut) -> bool:
        """Replay the cut transaction (or re-run the cut read) on the new writer, if it can be:
        the session is HELD meanwhile, its input kept. False: answer as before."""
        core = self.core
        journal = core.journal
        if journal is None or core.task is not None:
            return False
        verdict = replay.plan(
            journal,
            cut.in_block,
            cut.kinds,
            cut.in_flight,
            core.transaction_mode,
            self.mode.known_statements(),
        )
        if isinstance(verdict, str):
            if verdict != replay.COMMIT_IN_FLIGHT:
                self._stats.transaction_replays[verdict] += 1
                logs.event("transaction_not_replayed", logs.WARNING, conn=core.id, reason=verdict)
            return False
        core.to(HELD)
        self.attach.start(self._replay(cut, verdict))
        return True

    async def _replay(self, cut: Cut, plan: replay.Plan) -> None:
        """On a server of the confirmed new writer (through the gate, as any held request): the
        session's settings and statements, then the journal's requests, each answer compared with
        what the client got. Equal: the session links to that server and goes on. Else the server
        is discarded (its transaction rolled back) and the client is told as before."""
        core = self.core
        journal = core.journal
        assert journal is not None
        # Where the journal's own first request would go now: the writer for anything that may
        # write; for a read cut on a replica (or while no writer exists), another replica.
        requests = b"".join(journal.requests)
        held = await self._held_server(cut, self.attach.pool_for_request(requests), plan, requests)
        if held is not None:
            await self._run_replay(held[0], held[1], cut, plan)

    async def _ask_outcome(
        self, server: ServerConnection, pool: Pool, cut: Cut, marker_id: str
    ) -> str | ProxyError:
        """`outcome.resolve` on `server` (acquired for it): "committed" or "not_committed", or
        why it could not be asked (`server` then released)."""
        core = self.core
        core.own_query_on = server
        try:
            if str(server.endpoint) == cut.server:
                # The same server (a cut connection, or a restart): the old backend, if it still
                # lives, may still be committing; it is ended first (`outcome.resolve`).
                old_age = monotonic() - cut.opened
                return await resolve_marker(server, marker_id, cut.backend_pid, old_age)
            return await resolve_marker(server, marker_id)
        except asyncio.CancelledError:
            pool.release(server, reset=not core.transaction_mode, unknown=True)
            raise
        except ProxyError as exc:
            pool.release(server, reset=False)
            return exc
        finally:
            core.own_query_on = None

    async def _outcome_server(self, cut: Cut, deadline: float) -> tuple[ServerConnection, Pool] | None:
        """A server of the writer, to learn a cut COMMIT's outcome: waited for past
        `failover.hold_timeout` (a COMMIT cut while no writer exists anywhere waits for one to
        return, rather than be told 08007 at once), up to `deadline` (the loop's clock:
        `failover.commit_outcome_timeout` after the cut); then, or if the client left, None (the
        client told as before)."""
        core = self.core
        loop = asyncio.get_running_loop()
        failover = core.host.config.failover
        while True:
            pool = core.writer_pool  # (a marked COMMIT ran on the writer, and is resolved there)
            reason = "no writer is known"
            if pool is not None:
                try:
                    server = await self.attach.acquire(pool)
                except (SpoolNow, UpstreamUnavailable, CannotConnectNow) as exc:
                    reason = str(exc) or "spooling"
                except ProxyError as exc:
                    self._replay_failed(cut, str(exc))
                    return None
                else:
                    if core.state != HELD:
                        pool.release(server, reset=False)
                        return None
                    return server, pool
            if core.state != HELD:
                return None
            if loop.time() >= deadline:
                self._replay_failed(cut, f"no writer within failover.commit_outcome_timeout: {reason}")
                return None
            await asyncio.sleep(min(float(failover.check_interval), max(0.0, deadline - loop.time())))

    async def _held_server(
        self, cut: Cut, pool: Pool | None, plan: replay.Plan, requests: bytes
    ) -> tuple[ServerConnection, Pool] | None:
        """A server for the replay of `requests` from `pool` (through the gate, as any held
        request), and its pool; or None: no writer came (hold_timeout; the cut requests then get
        today's answers, unless the spool takes the cut transaction over, `_into_spool`), or the
        client left meanwhile. A read held for the writer that never came is routed again: with
        no writer known, read routing may now send it to a replica, where it runs instead."""
        if pool is None:
            self._replay_failed(cut, "no pool")
            return None
        attach = self.attach
        no_writer: ProxyError | SpoolNow | None = None
        try:
            # (A replica's pool is not behind the failover's gate: that is the point of it.)
            server = await (attach.acquire(pool) if pool.replica is None else attach.acquire_replica(pool))
        except (SpoolNow, UpstreamUnavailable, CannotConnectNow) as exc:
            no_writer = exc
        except ProxyError as exc:
            self._replay_failed(cut, str(exc))
            return None
        if no_writer is not None:
            # (Not awaited in the except block: ARCHITECTURE.md, "The compiled data path".)
            other = attach.pool_for_request(requests) if pool.replica is None else None
            if other is not None and other.replica is not None and self.core.state == HELD:
                return await self._held_server(cut, other, plan, requests)
            if not isinstance(no_writer, SpoolNow):
                self._replay_failed(cut, str(no_writer))
            elif not self._into_spool(cut, plan):
                self._replay_failed(cut, "no writer anywhere, and the spool cannot take the transaction")
            return None
        if self.core.state != HELD:
            pool.release(server, reset=False)
            return None
        return server, pool

    async def _run_replay(self, server: ServerConnection, pool: Pool, cut: Cut, plan: replay.Plan) -> bool:
        """`_replay` on `server` (acquired, HELD): True if the session went on there."""
        core = self.core
        journal = core.journal
        assert journal is not None
        core.own_query_on = server
        try:
            await self._restore(server, plan)
        except asyncio.CancelledError:
            pool.release(server, reset=not core.transaction_mode, unknown=True)
            raise
        except ProxyError as exc:
            pool.discard(server, f"restoring a session for a replay failed: {exc}")
            self._replay_failed(cut, str(exc))
            return False
        finally:
            core.own_query_on = None
        if core.state != HELD:
            pool.release(server, reset=False)
            return False
        verifier = Verifier(journal)
        witness = replay.ReplayClient(core, journal, verifier, plan.answers)
        try:
            if core.transaction_mode:
                replay.send_routed(server, witness, journal.requests, self.mode)
            else:
                server.link(witness, tracked=False)
                server.send(b"".join(journal.requests))
            result = await witness.done
        except asyncio.CancelledError:
            server.unlink()
            pool.discard(server, "client left during a transaction replay")
            raise
        except ProxyError:
            result = replay.LOST
        if server.client is witness:
            server.unlink()
        if result == EQUAL and core.state == HELD:
            self._stats.transaction_replays["replayed"] += 1
            logs.event(
                "transaction_replayed",
                conn=core.id,
                server=server.id,
                upstream=str(server.endpoint),
                requests=len(journal.requests),
                answers=plan.answers,
                in_transaction=cut.in_block,
            )
            journal.framing.reset()
            if server.tx_status == m.TX_IDLE:
                journal.reset()  # a re-run read: nothing open to journal any more
            server.unnamed_from = None  # (transaction mode: unnamed statements re-prepared on use)
            core.pool = pool  # (the server goes back to the pool it came from)
            core.link(server)
            return True
        pool.discard(server, "transaction replay did not match" if result != replay.LOST else "lost")
        if result == replay.LOST and witness.relayed:
            # Part of the replay's answers went to the client: nothing else can be said now.
            core.fail(UpstreamUnavailable("the new writer was lost too while a cut transaction was replayed"))
            return False
        if result != replay.LOST:
            self._stats.transaction_replays["diverged"] += 1
            logs.event(
                "transaction_replay_diverged",
                logs.WARNING,
                conn=core.id,
                answers=verifier.done,
                bytes=verifier.seen,
                expected_answers=len(verifier.expected_ends),
                expected_bytes=verifier.expected_total,
            )
        self._replay_failed(cut, "answers differ" if result != replay.LOST else "the new server was lost")
        return False

    # ---------------------------------------------------------------- commit outcomes

    def _start_resolve(self, cut: Cut, marker_id: str, wrapped: bytes | None = None) -> None:
        """A COMMIT sent behind a commit marker (or an autocommit write sent wrapped,
        `SessionCore.wrap_write`: `wrapped` is then what the client gets if it committed, None if
        that is not known) is unanswered: find out on the new writer."""
        self.core.to(HELD)
        self.attach.start(self._resolve(cut, marker_id, wrapped))

    async def _resolve(self, cut: Cut, marker_id: str, wrapped: bytes | None) -> None:
        """Committed (the marker is on the confirmed new writer): the client gets PostgreSQL's
        answer. Not committed: the transaction is replayed there and committed once (or, if it
        cannot be, 40001: it did not commit). Unknown: 08007, as before.

        A wrapped autocommit write is the same transaction: committed, the client gets the
        statement's answer as the old writer sent it (held by the sidecar until the COMMIT's), or
        08007 if that never came (its row count is not known); not committed, the statement is
        run again on the new writer, once, in autocommit."""
        core = self.core
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(core.host.config.failover.commit_outcome_timeout)
        while True:
            found = await self._outcome_server(cut, deadline)
            if found is None:
                return
            server, pool = found
            asked = await self._ask_outcome(server, pool, cut, marker_id)
            if isinstance(asked, str):
                outcome = asked
                break
            if isinstance(asked, UpstreamUnavailable) and loop.time() < deadline and core.state == HELD:
                # The connection went down under the question: a writer confirmed just as it
                # crashed, or a pooled connection to it not yet found dead. Nothing was learnt,
                # and the next confirmed writer can still tell, until the deadline.
                logs.event("commit_outcome_retry", conn=core.id, marker=marker_id, reason=str(asked))
                await asyncio.sleep(float(core.host.config.failover.check_interval))
                continue
            self._replay_failed(cut, f"commit outcome unknown: {asked}")
            return
        if core.state != HELD:
            pool.release(server, reset=False)
            return
        logs.event("commit_outcome", conn=core.id, marker=marker_id, outcome=outcome)
        journal = core.journal
        if outcome == "committed":
            if cut.wrapped and wrapped is None:
                pool.release(server, reset=False)
                self._replay_failed(cut, "committed, but the statement's answer never came")
                return
            self._stats.commit_outcomes["committed"] += 1
            if wrapped is not None:
                answer = wrapped
            else:
                # (Of a batch's answer, what the old writer had sent already is not sent again:
                # PostgreSQL sends it all at once, so that is nothing unless the sidecar's relay
                # was cut in its middle.)
                counted = journal is not None and not (journal.too_large or journal.blocked)
                relayed = journal.relayed if journal is not None and counted else 0
                answer = cut.commit_answer[relayed:]
            if not await self._restore_committed(server, pool, answer):
                return
            core.send(answer + m.ready_for_query(m.TX_IDLE))
            if journal is not None:
                journal.reset()
            core.pool = pool
            core.link(server)
            return
        cut.rolled_back = True  # whatever happens now, the client may be told it did not commit
        kinds = [REQUEST_OTHER] * len(cut.kinds)
        verdict: replay.Plan | str = "not_replayable"
        if journal is not None:
            known = self.mode.known_statements()
            verdict = replay.plan(journal, True, kinds, cut.in_flight, core.transaction_mode, known, True)
        if isinstance(verdict, str):
            self._stats.transaction_replays[verdict] += 1
            pool.release(server, reset=False)
            self._replay_failed(cut, f"not committed, and not replayable: {verdict}")
            return
        if await self._run_replay(server, pool, cut, verdict):
            self._stats.commit_outcomes["replayed"] += 1

    async def _restore_committed(self, server: ServerConnection, pool: Pool, answer: bytes) -> bool:
        """The session's settings and statements on the server its committed transaction's
        answer is given from (the session goes on there): True if it can. Else the client is
        told that it committed, then loses the session (its state could not be moved)."""
        core = self.core
        core.own_query_on = server
        try:
            await self._restore(server, replay.Plan(0, set()))
        except asyncio.CancelledError:
            pool.release(server, reset=not core.transaction_mode, unknown=True)
            raise
        except ProxyError as exc:
            pool.discard(server, f"restoring a session after its commit failed: {exc}")
            if core.state == HELD:
                core.send(answer + m.ready_for_query(m.TX_IDLE))
                core.fail(UpstreamUnavailable(f"the session could not be moved to the new writer: {exc}"))
            return False
        finally:
            core.own_query_on = None
        if core.state != HELD:
            pool.release(server, reset=False)
            return False
        return True

    async def _restore(self, server: ServerConnection, plan: replay.Plan) -> None:
        """The session's settings (as at the start of the transaction: they are read back only
        between transactions), and its named statements but those the journal prepares itself.
        (Transaction mode: the statements are prepared as the replay's Binds need them,
        `replay.send_routed`.)"""
        core = self.core
        sql = sync_sql(core.settings, server.applied)
        if sql is not None:
            await server.simple_query(sql)
            server.applied = dict(core.settings)
        if core.transaction_mode:
            return
        known = self.mode.known_statements()
        statements = [parse for name, parse in known.items() if name not in plan.parsed]
        if statements:
            failed = await server.prepare(statements)
            if failed:
                logs.event("statements_not_restored", logs.WARNING, conn=core.id, errors=failed)

    def _into_spool(self, cut: Cut, plan: replay.Plan) -> bool:
        """No writer anywhere, and the spool is on: a cut transaction block (or a lone BEGIN in
        flight) whose journal the outage responder answers exactly as the client was answered
        (BEGIN and simple INSERTs: the spool's own answers match PostgreSQL's byte for byte) goes
        on in the spool, as if the outage had begun before it; its COMMIT is spooled and replayed
        once a writer is back. Anything else (a read, a statement the spool does not take, an
        answer that differs): False, and the client is told as before. An answer the client never
        got (a statement in flight) is the responder's, relayed (ARCHITECTURE.md, "Transaction
        replay")."""
        core = self.core
        journal = core.journal
        take_over = self.spool_take_over
        if take_over is None or journal is None or core.state != HELD:
            return False
        verifier = Verifier(journal)
        witness = replay.ReplayClient(core, journal, verifier, plan.answers)

        def answered(data: bytes) -> bool:
            witness.feed(data)
            return not witness.done.done() or witness.done.result() == EQUAL

        requests = len(journal.requests)
        if not take_over(list(journal.requests), answered) or not witness.done.done():
            if witness.relayed:
                # (Cannot happen: a statement the spool answers is answered whole.)
                core.fail(UpstreamUnavailable("the spool could not take over a cut transaction"))
            return False
        self._stats.transaction_replays["replayed"] += 1
        logs.event(
            "transaction_replayed",
            conn=core.id,
            server="spool",
            upstream="spool",
            requests=requests,
            answers=plan.answers,
            in_transaction=cut.in_block,
        )
        journal.framing.reset()
        journal.reset()  # (the transaction is the responder's now)
        return True

    def _replay_failed(self, cut: Cut, reason: str) -> None:
        core = self.core
        logs.event("transaction_replay_failed", logs.WARNING, conn=core.id, reason=reason)
        journal = core.journal
        if journal is not None:
            journal.reset()
        if core.state == HELD:
            core.to(IDLE)
        elif core.state != IDLE:
            return  # closed meanwhile
        self._tell_client(cut)

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
