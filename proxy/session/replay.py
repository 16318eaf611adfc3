"""Transaction replay: what can be replayed after a cut (`plan`), and the client a replaying
server is linked to (`ReplayClient`), which compares the replay's answers with what the real
client already got (`journal.Verifier`) and relays only what the client has not seen.

The flow itself (a server on the confirmed new writer, the session restored, the journal sent,
then link or fall back) is `Carryover`'s. ARCHITECTURE.md, "Transaction replay".
"""

from __future__ import annotations

import asyncio
from typing import Final

from ..journal import (
    DIVERGED,
    EQUAL,
    SEG_ANSWER_END,
    SEG_NOTIFY,
    Framing,
    TransactionJournal,
    Verifier,
)
from ..protocol import messages as m
from ..protocol.framing import Action, Relay, watch_table
from ..protocol.sqlstate import ProtocolViolation
from ..readonly import is_rerunnable_read
from ..server import REQUEST_COMMIT, REQUEST_OTHER, LinkedClient, ServerConnection
from ..sqlclass import classify, first_keyword, has_more_statements, needs_transaction_check
from ..statements import Expect, StatementRouter
from .mode import Mode
from .replay_sink import ReplaySink
from .transaction_routing import TransactionRouting

# ReplayClient outcomes, besides journal.EQUAL and journal.DIVERGED.
LOST: Final = 3  # the new server was lost too

# `plan` verdicts that are not metric labels: the cut is answered as before replay existed.
COMMIT_IN_FLIGHT: Final = "commit"

_COPY_MESSAGES: Final = (ord("d"), ord("c"), ord("f"))
# First keywords of statements that end a transaction (or may: PREPARE TRANSACTION).
_ENDS_TRANSACTION: Final = (b"commit", b"end", b"rollback", b"abort", b"prepare")
_COMMIT_WORDS: Final = (b"commit", b"end")
# Messages that run something (after the final COMMIT nothing may).
_RUNS: Final = (m.F_QUERY, m.F_PARSE, m.F_BIND, m.F_FUNCTION_CALL)
_STARTS_TRANSACTION: Final = (b"begin", b"start")
# Transaction mode: statements the session's relay answers or acts on itself (DEALLOCATE of the
# client's names, DISCARD ALL of them), which a replay through `StatementRouter` alone would not.
_ROUTED_LOCALLY: Final = (b"deallocate", b"discard")
# A replay's requests are the journal's whole messages: every one is looked at.
_EVERY_MESSAGE: Final = watch_table(range(256))


class Plan:
    """A replay `plan` allows: how many ReadyForQuery the journal's requests get, and the named
    statements they prepare themselves (not to be prepared beforehand)."""

    def __init__(self, answers: int, parsed: set[str]) -> None:
        self.answers = answers
        self.parsed = parsed


def plan(
    journal: TransactionJournal,
    in_block: bool,
    kinds: list[int],
    in_flight: int,
    transaction_mode: bool,
    known: dict[str, bytes] | None = None,
    final_commit: bool = False,
) -> Plan | str:
    """A `Plan`, or why the journal cannot be replayed: a REPLAY_RESULTS label (too_large,
    not_replayable) or COMMIT_IN_FLIGHT.

    Outside a transaction block only rerunnable reads are (a write may have committed on its own),
    and a lone BEGIN / START TRANSACTION, which changes nothing; what follows it is inside a block.
    Inside one: anything but COPY, several statements in one Query (one of them could be a COMMIT
    that did happen), and in transaction mode what the session's relay answers or refuses itself
    (DEALLOCATE, DISCARD, what cannot be transaction-pooled). (Transaction mode journals the
    client's own messages, named statements under the client's names: `send_routed` prepares
    them on the new server as the live relay would.) Outside a block, a Bind runs a statement whose
    text must be known (prepared in the journal, or one of the session's `known` Parse messages)
    and a rerunnable read: a driver's prepared INSERT is Bind/Execute/Sync with no text at all.
    Inside one too every Bind's text must be known, and nothing may end a transaction (COMMIT,
    ROLLBACK, PREPARE TRANSACTION...: what followed it ran on its own and may have committed),
    except, with `final_commit`, the COMMIT that is the journal's last request (a COMMIT known
    not to have committed, replayed once)."""
    if REQUEST_COMMIT in kinds:
        return COMMIT_IN_FLIGHT
    if journal.too_large:
        return "too_large"
    if not journal.replayable or not journal.requests:
        return "not_replayable"
    data = b"".join(journal.requests)
    n = len(data)
    pos = 0
    answers = 0
    parsed: set[str] = set()
    texts: dict[str, bytes] = {}  # statement name -> its text, as the journal prepares them
    block = in_block  # (a BEGIN in the journal opens one for what follows it)
    # With `final_commit`: where the journal's last request starts (a COMMIT may end it, sent as
    # a Query or run by a Bind in that batch, with nothing run after it), and whether it ran.
    last = n - len(journal.requests[-1]) if final_commit else n
    committed = False
    while pos + 5 <= n:
        mtype = data[pos]
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        if end > n:
            break  # the rest of it is still to come from the client
        body = data[pos + 5 : end]
        pos = end
        if mtype in _COPY_MESSAGES:
            return "not_replayable"
        if committed and mtype in _RUNS:
            return "not_replayable"  # something after the final COMMIT
        if mtype == m.F_QUERY or mtype == m.F_SYNC or mtype == m.F_FUNCTION_CALL:
            answers += 1
        if mtype == m.F_QUERY:
            text = body[:-1]
            if not block and _starts_block(text):
                block = True
            elif not _replayable_text(text, block):
                return "not_replayable"
            if first_keyword(text) in _ENDS_TRANSACTION and not (final_commit and pos == n):
                return "not_replayable"
            if transaction_mode and not _routed_as_sent(text):
                return "not_replayable"
        elif mtype == m.F_PARSE:
            name_end = body.find(b"\x00")
            query_end = body.find(b"\x00", name_end + 1)
            if name_end < 0 or query_end < 0:
                return "not_replayable"
            name = body[:name_end].decode("utf-8", "replace")
            if name_end > 0:
                parsed.add(name)
            text = body[name_end + 1 : query_end]
            if _starts_block(text):
                pass  # a transaction start changes nothing; where it runs (Bind) opens the block
            elif pos > last and first_keyword(text) in _COMMIT_WORDS:
                pass  # the final COMMIT, prepared in its own batch (it runs at its Bind)
            elif not _replayable_text(text, block) or first_keyword(text) in _ENDS_TRANSACTION:
                return "not_replayable"
            if transaction_mode and not _routed_as_sent(text):
                return "not_replayable"
            texts[name] = text
        elif mtype == m.F_BIND:
            portal_end = body.find(b"\x00")
            statement_end = body.find(b"\x00", portal_end + 1)
            if portal_end < 0 or statement_end < 0:
                return "not_replayable"
            # Every Bind: the statement it runs must be known.
            name = body[portal_end + 1 : statement_end].decode("utf-8", "replace")
            bound = texts.get(name)
            if bound is None:
                known_parse = (known or {}).get(name) if name else None
                if known_parse is None:
                    return "not_replayable"  # the statement's text is not known here
                bound = _parse_text(known_parse)
            if not block and _starts_block(bound):
                block = True
            elif pos > last and first_keyword(bound) in _COMMIT_WORDS and not has_more_statements(bound):
                committed = True  # the final COMMIT, run in the journal's last batch
            elif not _replayable_text(bound, block) or first_keyword(bound) in _ENDS_TRANSACTION:
                return "not_replayable"
        elif mtype == m.F_FUNCTION_CALL and not block:
            return "not_replayable"
    if answers != journal.answered + in_flight:
        return "not_replayable"  # requests and answers do not line up (an ignored Query, ...)
    return Plan(answers, parsed)


def _parse_text(parse: bytes) -> bytes:
    """The query text of a whole Parse message."""
    name_end = parse.find(b"\x00", 5)
    return parse[name_end + 1 : parse.find(b"\x00", name_end + 1)]


def _starts_block(text: bytes) -> bool:
    """A lone BEGIN or START TRANSACTION (any options): run again, it changes no data."""
    return first_keyword(text) in _STARTS_TRANSACTION and not has_more_statements(text)


def _routed_as_sent(text: bytes) -> bool:
    """Transaction mode: whether `text` went to the server as the client sent it (not answered
    by the sidecar, nor refused: replayed through `StatementRouter` alone, it would run)."""
    keyword = first_keyword(text)
    if keyword in _ROUTED_LOCALLY:
        return False
    if not needs_transaction_check(keyword, text):
        return True
    return classify(text.decode("utf-8", "replace")).not_poolable is None


def _replayable_text(text: bytes, in_block: bool) -> bool:
    if not in_block:
        return is_rerunnable_read(text.decode("utf-8", "replace"))
    keyword = first_keyword(text)
    return keyword != b"copy" and not has_more_statements(text)


def send_routed(server: ServerConnection, witness: ReplayClient, requests: list[bytes], mode: Mode) -> None:
    """Transaction mode: send the journal's `requests` (the client's own messages) to `server`,
    rewritten as the live relay rewrites them (`StatementRouter`): each named statement under its
    shared name, prepared first where `server` does not have it (recorded in `server.statements`),
    its answers matched to the client's messages (`server` linked tracked to `witness`), so that
    `witness` compares exactly what the client got: its own ParseComplete whether the statement
    was already prepared or not, none for a statement the sidecar prepared itself.

    The session's own router is not changed: the replay's works on a copy of its statements.
    Raises ProxyError if the server is gone (or a message cannot be read: not replayed)."""
    assert isinstance(mode, TransactionRouting)
    live = mode.router
    router = StatementRouter(live.registry)
    router.statements = dict(live.statements)
    rerouter = _Rerouter(router, server)
    server.link(witness, tracked=True)  # (before the requests: linking forgets what is in flight)
    out = rerouter.relay.feed(b"".join(requests))
    if rerouter.relay.buffered:
        raise ProtocolViolation("a replayed request ends in the middle of a message")
    if rerouter.owed:
        witness.feed(rerouter.owed)  # answered by the sidecar before anything the server sends
    server.send(b"".join([bytes(span) for span in out]))


class _Rerouter:
    """`TransactionRouting.inspect` for a replay: the journal's messages through a
    `StatementRouter`, with what a replay does not meet left out (`plan` refused it: statements
    the relay answers or refuses itself; the settings they note are the session's already)."""

    def __init__(self, router: StatementRouter, server: ServerConnection) -> None:
        self.router = router
        self.server = server
        self.relay = Relay(_EVERY_MESSAGE, self.inspect, 1 << 30)
        self.owed = b""  # synthetic answers due before the server's first

    def inspect(self, type_byte: int, msg: memoryview) -> Action:
        server = self.server
        tracker = server.tracker
        router = self.router
        relay = self.relay
        owed = b""
        action = Action.FORWARD
        if type_byte == m.F_SYNC:
            tracker.sync_sent()
            tracker.expect(Expect.SYNC)
            server.in_flight.push(REQUEST_OTHER)
        elif tracker.skipping:
            pass  # ignored by the server until Sync, as it was live
        elif type_byte == m.F_BIND:
            action, owed = router.on_bind(msg, server, relay)
        elif type_byte == m.F_EXECUTE:
            action, owed = router.on_execute(msg, server)
        elif type_byte == m.F_PARSE:
            action, owed = router.on_parse(msg, server, relay)
        elif type_byte == m.F_DESCRIBE:
            action, owed = router.on_describe(msg, server, relay)
        elif type_byte == m.F_CLOSE:
            action, owed = router.on_close(msg, server)
        elif type_byte == m.F_QUERY:
            router.unnamed = None  # (a simple Query replaces the unnamed statement)
            server.unnamed_from = None
            server.in_flight.push(REQUEST_OTHER)
            tracker.expect(Expect.QUERY)
        elif type_byte == m.F_FUNCTION_CALL:
            server.in_flight.push(REQUEST_OTHER)
            tracker.expect(Expect.QUERY)
        self.owed += owed
        return action


class ReplayClient(LinkedClient):
    """What a server replaying a journal is linked to: its answers go to a `Verifier`; what comes
    after the part the client saw goes to the client (and into the journal, which goes on
    recording the transaction), and `done` gets EQUAL, DIVERGED or LOST."""

    def __init__(
        self,
        client: LinkedClient,
        journal: TransactionJournal,
        verifier: Verifier,
        answers: int,
    ) -> None:
        super().__init__()
        self.transport = ReplaySink(self.feed)
        self.backend_key = client.backend_key
        self.params_told = client.params_told
        self.client = client
        self.replaying = journal
        self.verifier = verifier
        self.answers = answers  # ReadyForQuery expected
        self.seen = 0
        self.relayed = False  # something of the replay's went to the client
        self.framing = Framing()
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def feed(self, data: bytes | memoryview) -> None:
        done = self.done
        if done.done():
            return
        view = memoryview(data)
        verifier = self.verifier
        known = len(verifier.expected_ends)
        for start, end, kind in self.framing.split(view):
            segment = view[start:end]
            if kind == SEG_NOTIFY:
                self._to_client(segment)
                continue
            taken = verifier.answer_bytes(segment)
            if verifier.status == DIVERGED:
                done.set_result(DIVERGED)
                return
            if taken < end - start:
                rest = segment[taken:]
                self._to_client(rest)
                self.replaying.answer_bytes(rest)
            if kind == SEG_ANSWER_END:
                self.seen += 1
                status = verifier.answer_done()
                if status == DIVERGED:
                    done.set_result(DIVERGED)
                    return
                if self.seen > known:
                    self.replaying.answer_done()  # an answer the client gets only now
                if self.seen >= self.answers:
                    done.set_result(EQUAL if status == EQUAL else DIVERGED)
                    return

    def _to_client(self, data: memoryview) -> None:
        out = self.client.transport
        if out is not None and len(data):
            self.relayed = True
            out.write(bytes(data))

    def server_ready(self, status: int) -> bool:
        return False

    def quiet_point(self) -> None:
        pass

    def server_error(self, fields: dict[str, str]) -> None:
        pass

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(LOST)
