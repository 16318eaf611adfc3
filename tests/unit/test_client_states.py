"""The client session's state machine, driven with fakes (tests/unit/session_fakes.py): a real
`ClientSession` and real `ServerConnection`s on recording transports, a fake host and pool."""

from __future__ import annotations

import asyncio

import pytest

from proxy import admin
from proxy.protocol import messages as m
from proxy.session import states
from proxy.session.host import ADMIN_DATABASE
from proxy.session.states import ClientState, IllegalTransition

from .session_fakes import (
    COMPILED,
    SYNC,
    FakeHost,
    answer,
    bind,
    describe_portal,
    execute,
    logged_in,
    new_client,
    parse,
    query,
    rows,
    server_out,
    settle,
)

pytestmark = pytest.mark.skipif(COMPILED, reason="run from the sources: test_session_sources.py")

S = ClientState


def test_constants_match_the_enum() -> None:
    for state in ClientState:
        assert getattr(states, state.name) == state.value
    assert len(ClientState) == states.COUNT
    assert ADMIN_DATABASE == admin.ADMIN_DATABASE
    assert len(states.METRIC_LABELS) == states.COUNT


def test_table_every_state_may_close_and_closed_is_final() -> None:
    for state in ClientState:
        closes = states.allowed[state * states.COUNT + S.CLOSED]
        assert closes == (0 if state is S.CLOSED else 1)
    assert not any(states.allowed[S.CLOSED * states.COUNT + new] for new in ClientState)


def test_illegal_transition_raises() -> None:
    async def run() -> None:
        client, _ = new_client(FakeHost())
        assert client.state == S.LOGGING_IN and client.metric_state == "login"
        with pytest.raises(IllegalTransition, match="logging_in -> parked"):
            client.to(S.PARKED)
        assert client.state == S.LOGGING_IN
        client.close("test")
        assert client.state == S.CLOSED
        with pytest.raises(IllegalTransition):
            client.to(S.IDLE)

    asyncio.run(run())


def test_each_session_builds_the_parts_its_configuration_needs() -> None:
    async def run() -> None:
        session, _ = new_client(FakeHost("session"))
        assert session.session_relay is not None and session.routing is None
        assert session.mode is session.session_relay
        assert session.outage is None  # no spool configured
        transaction, _ = new_client(FakeHost("transaction"))
        assert transaction.routing is not None and transaction.session_relay is None
        assert transaction.mode is transaction.routing
        # Every part works on the one session object, and the parts given to others are shared.
        for client in (session, transaction):
            assert client.attach.core is client and client.carryover.core is client
            assert client.login.core is client
            assert client.carryover.attach is client.attach and client.carryover.mode is client.mode
            assert client.login.attach is client.attach
        assert transaction.routing.core is transaction and transaction.routing.attach is transaction.attach
        assert session.session_relay.core is session
        session.close("test")
        transaction.close("test")

    asyncio.run(run())


def test_a_parked_server_is_given_back_through_the_attach_part() -> None:
    """The pool's `Parker` is the session's `Attach`, which gives the server back."""

    async def run() -> None:
        client, _, host = await logged_in("transaction")
        client.data_received(query("SELECT 1"))
        server = client.server
        assert server is not None
        server.data_received(answer("SELECT 1"))
        assert client.state == S.PARKED and host.pool.parked == {server: client.attach}

    asyncio.run(run())


def test_session_mode_login_links_and_query_round_trip() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session")
        assert client.state == S.LINKED and client.metric_state == "active"
        server = client.server
        assert server is not None
        client.data_received(query("SELECT 1"))
        assert server_out(server).take() == query("SELECT 1")
        assert server.outstanding == 1
        server.data_received(answer("SELECT 1"))
        assert transport.take() == answer("SELECT 1")
        assert server.outstanding == 0 and client.state == S.LINKED
        client.data_received(m.terminate())
        assert client.state == S.CLOSED
        assert host.pool.released == [(server, True)]  # reset on the way back

    asyncio.run(run())


def test_session_mode_gate_holds_between_transactions() -> None:
    async def run() -> None:
        client, _, host = await logged_in("session")
        server = client.server
        assert server is not None
        host.gate.closed = True
        client.data_received(query("SELECT 1"))
        assert client.state == S.GATED and client.metric_state == "active"
        assert server_out(server).take() == b""  # held
        host.gate.closed = False
        await settle()
        assert client.state == S.LINKED
        assert server_out(server).take() == query("SELECT 1")

    asyncio.run(run())


def test_session_mode_set_runs_maintenance_then_links_again() -> None:
    async def run() -> None:
        client, _transport, _ = await logged_in("session")
        server = client.server
        assert server is not None
        client.data_received(query("SET work_mem = '8MB'"))
        assert client.wants_ready
        server_out(server).take()
        server.data_received(answer("SET"))
        await settle()
        # Unlinked while the sidecar reads the settings back on the server.
        assert client.state == S.MAINTAINING and client.metric_state == "active"
        assert b"pg_catalog" in server_out(server).take()
        client.data_received(query("SELECT 1"))  # held meanwhile
        assert server_out(server).take() == b""
        server.data_received(rows(("work_mem", "8MB")) + answer("SELECT 1"))
        await settle()
        assert client.state == S.LINKED and client.settings == {"work_mem": "8MB"}
        assert server_out(server).take() == query("SELECT 1")

    asyncio.run(run())


def test_transaction_mode_query_parks_then_reuses() -> None:
    async def run() -> None:
        client, transport, _host = await logged_in("transaction")
        assert client.state == S.IDLE and client.metric_state == "idle" and client.server is None
        client.data_received(query("SELECT 1"))
        assert client.state == S.LINKED and client.metric_state == "active"
        server = client.server
        assert server is not None
        assert server_out(server).take() == query("SELECT 1")
        server.data_received(answer("SELECT 1"))
        assert transport.take() == answer("SELECT 1")
        assert client.state == S.PARKED and client.metric_state == "idle"
        assert client.running_on is None
        client.data_received(query("SELECT 2"))
        assert client.state == S.LINKED and client.server is server
        server.data_received(answer("SELECT 1"))
        assert client.state == S.PARKED
        client.attach.give_back(server)  # another client needs it
        assert client.state == S.IDLE and client.server is None

    asyncio.run(run())


def test_transaction_mode_without_parking_releases_at_each_transaction() -> None:
    async def run() -> None:
        client, _, host = await logged_in("transaction", parking=False)
        client.data_received(query("SELECT 1"))
        server = client.server
        assert server is not None and client.state == S.LINKED
        server.data_received(answer("SELECT 1"))
        assert client.state == S.IDLE and client.server is None
        assert host.pool.idle == [server]

    asyncio.run(run())


def test_transaction_mode_no_idle_server_holds() -> None:
    async def run() -> None:
        client, _, host = await logged_in("transaction", servers=0)
        host.pool.idle.clear()
        host.gate.closed = True  # the fast paths decline; the request waits for a server
        client.data_received(query("SELECT 1"))
        assert client.state == S.HELD and client.metric_state == "waiting"
        host.gate.closed = False
        await settle()
        assert client.state == S.LINKED
        server = client.server
        assert server is not None and server_out(server).take().endswith(query("SELECT 1"))

    asyncio.run(run())


def test_cut_of_a_lone_select_answers_40001_and_stays_usable() -> None:
    async def run() -> None:
        client, transport, host = await logged_in("session", replay=False)
        server = client.server
        assert server is not None
        client.data_received(query("SELECT 1"))
        client.cut_server("writer lost")
        assert client.state == S.IDLE and client.metric_state == "idle"
        out = transport.take()
        assert b"40001" in out and out.endswith(m.ready_for_query(m.TX_IDLE))
        assert host.pool.forgotten == [server]
        client.data_received(query("SELECT 1"))
        await settle()
        assert client.state == S.LINKED and client.server is not server

    asyncio.run(run())


def test_cut_inside_a_block_answers_aborted_until_rollback() -> None:
    async def run() -> None:
        client, transport, _ = await logged_in("transaction", replay=False)
        client.data_received(query("BEGIN"))
        server = client.server
        assert server is not None
        server.data_received(answer("BEGIN", b"T"))
        assert client.state == S.LINKED  # inside a transaction: keeps its server
        transport.take()
        client.cut_server("writer lost")  # nothing in flight, but a block is open
        assert client.state == S.ABORTED
        client.data_received(query("SELECT 1"))
        assert b"C40001" in transport.take()  # the first statement learns of the cut
        client.data_received(query("SELECT 1"))
        assert b"C25P02" in transport.take()
        client.data_received(query("ROLLBACK"))
        assert client.state in (S.IDLE, S.HELD, S.LINKED)
        assert b"ROLLBACK" in transport.take()

    asyncio.run(run())


def test_close_from_every_active_state_releases() -> None:
    async def run() -> None:
        client, _, host = await logged_in("transaction")
        client.data_received(query("SELECT 1"))
        server = client.server
        assert server is not None
        server.data_received(answer("SELECT 1"))
        assert client.state == S.PARKED
        client.connection_lost(None)
        assert client.state == S.CLOSED and client.server is None
        assert host.pool.released[-1][0] is server
        assert client not in host.clients

    asyncio.run(run())


def test_extended_protocol_unnamed_parse_fast_path_states() -> None:
    async def run() -> None:
        client, _transport, _ = await logged_in("transaction")
        request = parse("", "SELECT 1") + bind("") + describe_portal() + execute() + SYNC
        client.data_received(request)
        server = client.server
        assert server is not None and client.state == S.LINKED
        assert server_out(server).take() == request

    asyncio.run(run())
