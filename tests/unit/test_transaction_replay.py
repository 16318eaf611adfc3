"""Transaction replay driven with fakes (tests/unit/session_fakes.py): a real `ClientSession` and
real `ServerConnection`s on recording transports. The cut, the replay's requests on the new server,
and what the client sees. (End to end with real clusters: tests/integration/test_transaction_replay.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.journal import (
    EQUAL,
    SEG_ANSWER,
    SEG_ANSWER_END,
    SEG_NOTICE,
    SEG_NOTIFY,
    Framing,
    TransactionJournal,
    Verifier,
)
from proxy.outcome_answer import COMBINED_WROTE, PREPARE_MARKED_COMMIT, marked_commit_query
from proxy.protocol import messages as m
from proxy.server import REQUEST_OTHER, ServerConnection
from proxy.session import replay
from proxy.session.states import ClientState
from proxy.statements import ServerStatements
from sidecar_config import Endpoint

from .session_fakes import (
    COMPILED,
    SYNC,
    FakeHost,
    answer,
    bind,
    execute,
    logged_in,
    msg,
    new_client,
    parse,
    query,
    rows,
    server_out,
    settle,
)

pytestmark = pytest.mark.skipif(COMPILED, reason="run from the sources: test_session_sources.py")

S = ClientState


def select_answer(value: bytes, status: bytes = b"I") -> bytes:
    row = msg(b"D", b"\x00\x01" + len(value).to_bytes(4, "big") + value)
    return row + m.command_complete("SELECT 1") + msg(b"Z", status)


async def replayed_on(host: FakeHost, old: ServerConnection) -> ServerConnection:
    await settle()
    new = next(iter(s for s in host.pool.active if s is not old))
    return new


def test_a_lone_read_in_flight_is_re_run_and_the_client_sees_only_its_answer() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session", servers=2)
        old = client.server
        assert old is not None
        client.data_received(query("SELECT x FROM t"))
        client.cut_server("writer lost")
        assert client.state == S.HELD and transport.take() == b""
        new = await replayed_on(host, old)
        assert server_out(new).take().endswith(query("SELECT x FROM t"))
        new.data_received(select_answer(b"42"))
        await settle()
        assert transport.take() == select_answer(b"42")
        assert client.state == S.LINKED and client.server is new
        assert host.stats.transaction_replays["replayed"] == 1
        assert client.journal is not None and not client.journal.requests  # at rest again

    asyncio.run(run())


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_begin_in_flight_is_re_run_and_what_follows_it_is_in_the_block(pipelined: bool) -> None:
    """SQLAlchemy (psycopg, not autocommit) sends BEGIN on its own first: cut with it in flight
    (status still idle), it is run again; pipelined behind it, the transaction's INSERT too."""

    async def run() -> None:
        client, transport, host = await logged_in("session", servers=2)
        old = client.server
        assert old is not None
        sent = query("BEGIN") + (query("INSERT INTO t VALUES (1)") if pipelined else b"")
        client.data_received(sent)
        client.cut_server("writer lost")
        assert client.state == S.HELD and transport.take() == b""
        new = await replayed_on(host, old)
        assert server_out(new).take().endswith(sent)
        answers = m.command_complete("BEGIN") + msg(b"Z", b"T")
        if pipelined:
            answers += m.command_complete("INSERT 0 1") + msg(b"Z", b"T")
        new.data_received(answers)
        await settle()
        assert transport.take() == answers
        assert client.state == S.LINKED and client.server is new
        assert host.stats.transaction_replays["replayed"] == 1

    asyncio.run(run())


def test_an_autocommit_write_after_a_begin_that_ended_is_not_re_run() -> None:
    """`BEGIN; INSERT; COMMIT` sent as one Query outside a block: it may have committed."""

    async def run() -> None:
        client, transport, host = await logged_in("session")
        client.data_received(query("BEGIN; INSERT INTO t VALUES (1); COMMIT"))
        client.cut_server("writer lost")
        assert b"08007" in transport.take()
        assert host.stats.transaction_replays["replayed"] == 0

    asyncio.run(run())


GOODBYE = msg(
    b"N", b"SWARNING\x00VWARNING\x00C57P01\x00Mterminating connection due to immediate shutdown\x00\x00"
)


def test_the_dying_servers_warning_is_not_part_of_any_answer() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session", servers=2)
        client.data_received(query("BEGIN"))
        old = client.server
        assert old is not None
        old.data_received(answer("BEGIN", b"T"))
        client.data_received(query("SELECT x FROM t"))
        old.data_received(select_answer(b"1", b"T"))
        old.data_received(GOODBYE)  # relayed to the client, as PostgreSQL sends it at the crash
        assert transport.take().endswith(GOODBYE)
        client.cut_server("writer lost")
        new = await replayed_on(host, old)
        new.data_received(answer("BEGIN", b"T") + select_answer(b"1", b"T"))
        await settle()
        assert client.state == S.LINKED and host.stats.transaction_replays["replayed"] == 1

    asyncio.run(run())


def test_an_autocommit_write_of_a_prepared_statement_is_not_re_run() -> None:
    """psycopg prepares a statement run often: then its INSERT is Bind/Execute/Sync, no text."""

    async def run() -> None:
        client, transport, host = await logged_in("session")
        server = client.server
        assert server is not None
        client.data_received(parse("_pg3_0", "INSERT INTO t VALUES ($1)") + SYNC)
        server.data_received(msg(b"1") + msg(b"Z", b"I"))
        transport.take()
        client.data_received(bind("_pg3_0") + execute() + SYNC)  # in flight at the cut
        client.cut_server("writer lost")
        assert b"08007" in transport.take()
        assert host.stats.transaction_replays["not_replayable"] == 1

    asyncio.run(run())


def test_a_prepared_read_is_re_run() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session", servers=2)
        server = client.server
        assert server is not None
        client.data_received(parse("r", "SELECT x FROM t") + SYNC)
        server.data_received(msg(b"1") + msg(b"Z", b"I"))
        transport.take()
        client.data_received(bind("r") + execute() + SYNC)
        client.cut_server("writer lost")
        new = await replayed_on(host, server)
        sent = server_out(new).take()
        assert sent.startswith(parse("r", "SELECT x FROM t"))  # re-prepared first
        new.data_received(msg(b"1") + msg(b"Z", b"I"))  # (the re-prepare's answer, read by the sidecar)
        await settle()
        assert sent.endswith(bind("r") + execute() + SYNC) or server_out(new).take().endswith(SYNC)
        answer_rows = msg(b"2") + select_answer(b"5")
        new.data_received(answer_rows)
        await settle()
        assert transport.take() == answer_rows
        assert host.stats.transaction_replays["replayed"] == 1

    asyncio.run(run())


def test_a_volatile_read_is_not_re_run() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session")
        client.data_received(query("SELECT random()"))
        client.cut_server("writer lost")
        assert b"40001" in transport.take()
        assert host.stats.transaction_replays["not_replayable"] == 1

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_an_open_transaction_is_replayed_and_goes_on(mode: str) -> None:
    async def run() -> None:
        client, transport, host = await logged_in(mode, servers=2)
        client.data_received(query("BEGIN"))
        old = client.server
        assert old is not None
        old.data_received(answer("BEGIN", b"T"))
        client.data_received(query("INSERT INTO t VALUES (1)"))
        old.data_received(answer("INSERT 0 1", b"T"))
        seen = transport.take()
        assert seen == answer("BEGIN", b"T") + answer("INSERT 0 1", b"T")
        client.data_received(query("UPDATE t SET x = 2"))  # in flight at the cut
        client.cut_server("writer lost")
        assert transport.take() == b""
        new = await replayed_on(host, old)
        sent = server_out(new).take()
        assert sent.endswith(query("BEGIN") + query("INSERT INTO t VALUES (1)") + query("UPDATE t SET x = 2"))
        new.data_received(answer("BEGIN", b"T") + answer("INSERT 0 1", b"T"))
        assert transport.take() == b""  # seen already: compared, not relayed
        new.data_received(answer("UPDATE 1", b"T"))
        await settle()
        assert transport.take() == answer("UPDATE 1", b"T")
        assert client.state == S.LINKED and client.server is new
        assert host.stats.transaction_replays["replayed"] == 1
        client.data_received(query("COMMIT"))
        assert server_out(new).take() == query("COMMIT")
        new.data_received(answer("COMMIT"))
        assert transport.take() == answer("COMMIT")

    asyncio.run(run())


def test_a_replay_whose_answers_differ_is_rolled_back_and_the_client_gets_40001() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session", servers=2)
        client.data_received(query("BEGIN"))
        old = client.server
        assert old is not None
        old.data_received(answer("BEGIN", b"T"))
        client.data_received(query("SELECT x FROM t"))
        old.data_received(select_answer(b"1", b"T"))
        transport.take()
        client.cut_server("writer lost")
        new = await replayed_on(host, old)
        new.data_received(answer("BEGIN", b"T") + select_answer(b"2", b"T"))  # the data changed
        await settle()
        assert new in host.pool.forgotten  # discarded: its transaction rolled back
        assert host.stats.transaction_replays["diverged"] == 1
        assert client.state == S.ABORTED
        client.data_received(query("SELECT 1"))
        assert b"C40001" in transport.take()

    asyncio.run(run())


def test_a_partly_relayed_answer_is_finished_from_the_replay() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session", servers=2)
        old = client.server
        assert old is not None
        client.data_received(query("SELECT x FROM t"))
        whole = select_answer(b"7")
        old.data_received(whole[:9])  # half the DataRow went out
        client.cut_server("writer lost")
        assert transport.take() == whole[:9]
        new = await replayed_on(host, old)
        new.data_received(whole)
        await settle()
        assert transport.take() == whole[9:]
        assert client.state == S.LINKED

    asyncio.run(run())


def test_over_replay_max_bytes_gets_40001() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session", replay_max=1024)
        client.data_received(query("BEGIN"))
        old = client.server
        assert old is not None
        old.data_received(answer("BEGIN", b"T"))
        client.data_received(query("SELECT '" + "x" * 2000 + "'"))
        client.cut_server("writer lost")
        assert b"40001" in transport.take()
        assert host.stats.transaction_replays["too_large"] == 1

    asyncio.run(run())


def test_an_autocommit_write_answered_in_a_pipeline_is_never_sent_again() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session")
        old = client.server
        assert old is not None
        client.data_received(query("INSERT INTO t VALUES (1)") + query("SELECT x FROM t"))
        old.data_received(answer("INSERT 0 1"))  # answered, the SELECT still in flight
        client.cut_server("writer lost")
        assert b"40001" in transport.take()
        assert host.stats.transaction_replays["not_replayable"] == 1

    asyncio.run(run())


def test_commit_in_flight_keeps_08007() -> None:
    async def run() -> None:
        client, transport, _ = await logged_in("session")
        client.data_received(query("BEGIN"))
        old = client.server
        assert old is not None
        old.data_received(answer("BEGIN", b"T"))
        client.data_received(query("COMMIT"))
        client.cut_server("writer lost")
        assert b"08007" in transport.take()

    asyncio.run(run())


def test_framing_finds_answer_ends_across_pieces_and_leaves_notifications_out() -> None:
    notify = msg(b"A", b"\x00\x00\x00\x01chan\x00payload\x00")
    stream = select_answer(b"abc", b"T") + notify + answer("INSERT 0 1", b"T")
    for cut in range(1, len(stream)):
        framing = Framing()
        kinds: list[tuple[int, bytes]] = []
        for piece in (stream[:cut], stream[cut:]):
            kinds += [(kind, piece[a:b]) for a, b, kind in framing.split(piece)]
        assert b"".join(p for _, p in kinds) == stream
        assert b"".join(p for k, p in kinds if k == SEG_NOTIFY) == notify
        assert sum(1 for k, _ in kinds if k == SEG_ANSWER_END) == 2
        assert all(k in (SEG_ANSWER, SEG_ANSWER_END, SEG_NOTIFY, SEG_NOTICE) for k, _ in kinds)
        journal = TransactionJournal(1 << 20)
        journal.relay_view(stream[:cut])
        journal.relay_view(stream[cut:])
        verifier = Verifier(journal)
        verifier.answer_bytes(select_answer(b"abc", b"T"))
        verifier.answer_done()
        verifier.answer_bytes(answer("INSERT 0 1", b"T"))
        assert verifier.answer_done() == EQUAL


MARKER = "0123abcd-0000-0000-0000-000000000001"


def marker_answer(marked: bytes = b"t") -> bytes:
    row = msg(b"D", b"\x00\x01" + len(marked).to_bytes(4, "big") + marked)
    return (
        msg(b"T", b"\x00\x01mark_commit\x00" + b"\x00" * 18)
        + row
        + m.command_complete("SELECT 1")
        + msg(b"Z", b"T")
    )


async def in_block(mode: str, servers: int = 2) -> tuple[Any, Any, FakeHost, ServerConnection]:
    client, transport, host = await logged_in(mode, servers=servers)
    host.commit_outcome.marker = MARKER
    client.data_received(query("BEGIN"))
    old = client.server
    assert old is not None
    old.data_received(answer("BEGIN", b"T"))
    client.data_received(query("INSERT INTO t VALUES (1)"))
    old.data_received(answer("INSERT 0 1", b"T"))
    transport.take()
    server_out(old).take()
    return client, transport, host, old


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_commit_goes_out_behind_its_marker_whose_answer_the_client_never_sees(mode: str) -> None:
    async def run() -> None:
        client, transport, _, server = await in_block(mode)
        client.data_received(query("COMMIT"))
        # The marker and the COMMIT in one batch: one flush of the server's answer for both; on
        # a connection that has not run one yet, behind the two statements' preparation.
        assert server_out(server).take() == PREPARE_MARKED_COMMIT + marked_commit_query(MARKER)
        assert server.marker_id == MARKER  # (read back from the batch: what a cut resolves)
        prepared = msg(b"3", b"") * 2 + msg(b"1", b"") * 2
        server.data_received(prepared + COMBINED_WROTE)  # (no ReadyForQuery of its own)
        assert transport.take() == b""
        server.data_received(answer("COMMIT"))
        assert transport.take() == answer("COMMIT")
        assert server.marker is None and server.marker_id is None
        assert server.marker_prepared
        # The next one goes without the preparation, its answer swallowed whole.
        client.data_received(query("BEGIN"))
        assert server_out(server).take() == query("BEGIN")
        server.data_received(answer("BEGIN", b"T"))
        assert transport.take() == answer("BEGIN", b"T")
        client.data_received(query("COMMIT"))
        assert server_out(server).take() == marked_commit_query(MARKER)
        assert server.marker_id == MARKER
        server.data_received(COMBINED_WROTE + answer("COMMIT"))
        assert transport.take() == answer("COMMIT")
        assert server.marker is None and server.marker_prepared
        await settle()

    asyncio.run(run())


@pytest.mark.parametrize("whole", [True, False], ids=["one-read", "message-by-message"])
def test_a_failed_marker_makes_the_commit_answer_its_error(whole: bool) -> None:
    """The marker failed, so the COMMIT after it in the same Query was not run (the server
    answers ReadyForQuery 'E'): the sidecar rolls back, and the client gets the marker's error
    in place of COMMIT, then ReadyForQuery 'I', as for a deferred check failing at COMMIT."""

    async def run() -> None:
        client, transport, _, server = await in_block("session")
        client.data_received(query("COMMIT"))
        assert server_out(server).take() == PREPARE_MARKED_COMMIT + marked_commit_query(MARKER)
        error = m.error_response("42883", "function pgsidecar.mark_commit(uuid) does not exist")
        pieces = [error, msg(b"Z", b"E")]
        for piece in [b"".join(pieces)] if whole else pieces:
            server.data_received(piece)
        assert server_out(server).take() == query("ROLLBACK")
        assert transport.take() == b""
        server.data_received(answer("ROLLBACK"))
        assert transport.take() == error + msg(b"Z", b"I")
        assert server.marker is None and server.tx_status == m.TX_IDLE
        assert not server.marker_prepared  # (prepared again, closed first, next time)

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_an_unanswered_commit_whose_marker_is_on_the_new_writer_succeeds(mode: str) -> None:
    async def run() -> None:
        client, transport, host, old = await in_block(mode)
        client.data_received(query("COMMIT"))
        old.endpoint = Endpoint("10.0.0.1", 5432)  # the old writer: another node than the new
        client.cut_server("writer lost")
        new = await replayed_on(host, old)
        assert b"commit_marked('" + MARKER.encode() in server_out(new).take()
        new.data_received(rows(("t", "f")) + answer("SELECT 1"))
        await settle()
        assert transport.take() == answer("COMMIT")
        assert host.stats.commit_outcomes["committed"] == 1
        assert client.state == S.LINKED and client.server is new

    asyncio.run(run())


def test_an_unanswered_commit_that_did_not_commit_is_replayed_once() -> None:
    async def run() -> None:
        client, transport, host, old = await in_block("session")
        client.data_received(query("COMMIT"))
        old.endpoint = Endpoint("10.0.0.1", 5432)
        client.cut_server("writer lost")
        new = await replayed_on(host, old)
        server_out(new).take()
        new.data_received(rows(("f", "f")) + answer("SELECT 1"))
        await settle()
        assert (
            server_out(new)
            .take()
            .endswith(query("BEGIN") + query("INSERT INTO t VALUES (1)") + query("COMMIT"))
        )
        new.data_received(answer("BEGIN", b"T") + answer("INSERT 0 1", b"T") + answer("COMMIT"))
        await settle()
        assert transport.take() == answer("COMMIT")
        assert host.stats.commit_outcomes["replayed"] == 1
        assert host.stats.transaction_replays["replayed"] == 1

    asyncio.run(run())


def test_an_unanswered_commit_whose_outcome_cannot_be_known_gets_08007() -> None:
    async def run() -> None:
        client, transport, host, old = await in_block("session")
        client.data_received(query("COMMIT"))
        old.endpoint = Endpoint("10.0.0.1", 5432)
        client.cut_server("writer lost")
        new = await replayed_on(host, old)
        new.data_received(rows(("f", "t")) + answer("SELECT 1"))  # in recovery: not a writer
        await settle()
        assert b"C08007" in transport.take()
        assert host.stats.commit_outcomes["unknown"] == 1

    asyncio.run(run())


def test_a_marker_left_behind_does_not_swallow_the_next_clients_answers() -> None:
    async def run() -> None:
        client, _, host, server = await in_block("session", servers=1)
        client.data_received(query("COMMIT"))
        assert server.marker is not None
        client.close("client left with its COMMIT in flight")  # (the pool reads past its answers)
        host.pool.idle = [server]
        other, transport = new_client(host)
        other.data_received(m.startup_message({"user": "app", "database": "db"}))
        await settle()
        assert other.server is server
        transport.take()
        other.data_received(query("SELECT 1"))
        server.data_received(answer("SELECT 1"))
        assert transport.take() == answer("SELECT 1")

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# Transaction mode: named prepared statements (the client's names; shared names on the servers)


def journal_of(*requests: bytes, answered: int = 0) -> TransactionJournal:
    journal = TransactionJournal(1 << 20)
    for request in requests:
        journal.record_request(request)
    for _ in range(answered):
        journal.answer_done()
    return journal


INSERT = "INSERT INTO t VALUES ($1)"


def test_plan_accepts_named_statements_in_transaction_mode() -> None:
    """The statement the journal prepares itself, and one prepared before the transaction (its
    Parse known from the session)."""
    journal = journal_of(
        query("BEGIN"),
        parse("s1", INSERT) + SYNC,
        bind("s1") + execute() + SYNC,
        bind("s0") + execute() + SYNC,
        answered=3,
    )
    known = {"s0": parse("s0", "SELECT x FROM t")}
    verdict = replay.plan(journal, True, [REQUEST_OTHER], 1, True, known)
    assert isinstance(verdict, replay.Plan), verdict
    assert verdict.answers == 4 and verdict.parsed == {"s1"}


def test_plan_refuses_a_named_statement_whose_text_is_not_known() -> None:
    journal = journal_of(query("BEGIN"), bind("gone") + execute() + SYNC, answered=1)
    assert replay.plan(journal, True, [REQUEST_OTHER], 1, True, {}) == "not_replayable"


@pytest.mark.parametrize(
    "sql",
    ["DEALLOCATE s0", "DEALLOCATE ALL", "DISCARD ALL", "LISTEN chan", "CREATE TEMP TABLE tt (x int)"],
)
def test_plan_refuses_what_transaction_mode_answers_or_refuses_itself(sql: str) -> None:
    """The session's relay answers these itself (DEALLOCATE of the client's names) or refuses
    them: a replay through the statement router alone would run them on the server."""
    for request in (query(sql), parse("", sql) + bind("") + execute() + SYNC):
        journal = journal_of(query("BEGIN"), request, answered=2)
        assert replay.plan(journal, True, [], 0, True, {}) == "not_replayable", (sql, request[:1])
        assert isinstance(replay.plan(journal, True, [], 0, False, {}), replay.Plan)


def test_plan_accepts_a_final_commit_after_named_statements() -> None:
    """The replay of a COMMIT known not to have committed (`Carryover._resolve`)."""
    journal = journal_of(
        query("BEGIN"),
        parse("s1", INSERT) + SYNC,
        bind("s1") + execute() + SYNC,
        query("COMMIT"),
        answered=3,
    )
    verdict = replay.plan(journal, True, [REQUEST_OTHER], 1, True, {}, final_commit=True)
    assert isinstance(verdict, replay.Plan) and verdict.answers == 4


def shared_name(host: FakeHost, sql: str) -> str:
    return host.statements.name_for(sql, ())


def test_a_transaction_with_named_statements_is_replayed_in_transaction_mode() -> None:
    """Transaction mode: `s0` prepared in an earlier transaction (only bound in the cut one),
    `s1` prepared in it though the old server already had its text (the sidecar answered that
    Parse). On the new server the replay prepares `s0` first (its ParseComplete not the
    client's), sends `s1`'s Parse (its ParseComplete the one the client got), and the client sees
    only the answer it is owed."""

    async def run() -> None:
        client, transport, host = await logged_in("transaction", servers=2)
        for server in [*host.pool.idle, *host.pool.active, *host.pool.parked]:
            server.statements = ServerStatements(10)  # (as the pool sets it up)
        select = "SELECT x FROM t"
        # An earlier transaction: s0 and the INSERT's text prepared on the old server.
        client.data_received(parse("s0", select) + parse("warm", INSERT) + SYNC)
        old = client.server
        assert old is not None
        old.data_received(msg(b"1") + msg(b"1") + msg(b"Z", b"I"))
        await settle()
        client.data_received(query("BEGIN"))
        await settle()
        assert client.server is old
        old.data_received(answer("BEGIN", b"T"))
        client.data_received(parse("s1", INSERT) + SYNC)  # answered by the sidecar: old has it
        assert server_out(old).take().endswith(query("BEGIN") + SYNC)
        old.data_received(msg(b"Z", b"T"))
        assert transport.take().endswith(answer("BEGIN", b"T") + msg(b"1") + msg(b"Z", b"T"))
        client.data_received(bind("s1") + execute() + SYNC)
        assert server_out(old).take() == bind(shared_name(host, INSERT)) + execute() + SYNC
        old.data_received(msg(b"2") + answer("INSERT 0 1", b"T"))
        assert transport.take() == msg(b"2") + answer("INSERT 0 1", b"T")
        client.data_received(bind("s0") + execute() + SYNC)  # in flight at the cut
        client.cut_server("writer lost")
        assert transport.take() == b""
        new = await replayed_on(host, old)
        sent = server_out(new).take()
        s0, s1 = shared_name(host, select), shared_name(host, INSERT)
        assert sent.endswith(
            query("BEGIN")
            + m.parse(s1, INSERT) + SYNC
            + bind(s1) + execute() + SYNC
            + m.parse(s0, select) + bind(s0) + execute() + SYNC
        )  # fmt: skip
        assert s0 in new.statements and s1 in new.statements
        new.data_received(answer("BEGIN", b"T") + msg(b"1") + msg(b"Z", b"T"))
        new.data_received(msg(b"2") + answer("INSERT 0 1", b"T"))
        assert transport.take() == b""  # seen already: compared, not relayed
        owed = msg(b"2") + select_answer(b"1", b"T")
        new.data_received(msg(b"1") + owed)  # the ParseComplete of s0's re-prepare first
        await settle()
        assert transport.take() == owed
        assert client.state == S.LINKED and client.server is new
        assert host.stats.transaction_replays["replayed"] == 1
        client.data_received(bind("s0") + execute() + SYNC)  # on the new server, as prepared there
        assert server_out(new).take() == bind(s0) + execute() + SYNC

    asyncio.run(run())


def test_a_prepared_read_answered_by_the_sidecar_is_re_run_in_transaction_mode() -> None:
    """psycopg in autocommit (prepare_threshold=0) prepares a read the pool's servers already
    have: the sidecar answers that Parse itself (no server). Its Bind cut in flight, the read is
    run again on the new server, the statement prepared there first."""

    async def run() -> None:
        client, transport, host = await logged_in("transaction", servers=2)
        for server in [*host.pool.idle, *host.pool.active, *host.pool.parked]:
            server.statements = ServerStatements(10)
        select = "SELECT x FROM t"
        client.data_received(parse("s0", select) + SYNC)  # prepared on the old server
        old = client.server
        assert old is not None
        old.data_received(msg(b"1") + msg(b"Z", b"I"))
        await settle()
        transport.take()
        client.data_received(parse("s1", select) + SYNC)  # the same text: answered here
        assert transport.take() == msg(b"1") + msg(b"Z", b"I")
        client.data_received(bind("s1") + execute() + SYNC)
        await settle()
        assert client.server is old
        client.cut_server("writer lost")
        new = await replayed_on(host, old)
        shared = shared_name(host, select)
        sent = server_out(new).take()
        assert sent.endswith(m.parse(shared, select) + SYNC + bind(shared) + execute() + SYNC)
        new.data_received(msg(b"1") + msg(b"Z", b"I"))
        assert transport.take() == b""
        owed = msg(b"2") + select_answer(b"5")
        new.data_received(owed)
        await settle()
        assert transport.take() == owed
        assert host.stats.transaction_replays["replayed"] == 1

    asyncio.run(run())
