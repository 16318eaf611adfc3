"""Differential test: the fast paths against the general path.

The fast paths (`SessionRelay.fast`, `TransactionRouting.attach_query`, `_attach_prepared`,
`_prepare_here`, `_attach_parsed`, and the one in `ServerConnection.data_received`) act only when
one read is exactly a whole request, or a whole answer ending in ReadyForQuery. Delivered one byte
at a time, the same bytes can never take them: every read is part of a message, so each goes
through the general path (`Relay` and the inspectors). The general path is thus callable directly,
without a switch in the compiled code. Hypothesis draws request sequences; each runs twice, on
fresh fakes (tests/unit/session_fakes.py): whole reads, and byte by byte, on both the client and
the server side. The bytes each side writes and the end state must be the same.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.client import ClientSession
from proxy.protocol import messages as m
from proxy.server import ServerConnection

from .session_fakes import (
    COMPILED,
    SYNC,
    FakeHost,
    FakePool,
    bind,
    describe_portal,
    execute,
    msg,
    new_client,
    parse,
    query,
    server_out,
    settle,
)

pytestmark = pytest.mark.skipif(COMPILED, reason="run from the sources: test_session_sources.py")

# The requests a driver sends most, each one whole request ending in Query or Sync.
REQUESTS: dict[str, bytes] = {
    "select": query("SELECT 1"),
    "select_other": query("SELECT 2"),
    "begin": query("BEGIN"),
    "commit": query("COMMIT"),
    "rollback": query("ROLLBACK"),
    "insert": query("INSERT INTO t VALUES (1)"),
    "unnamed_extended": parse("", "SELECT 1") + bind("") + describe_portal() + execute() + SYNC,
    "unnamed_no_describe": parse("", "SELECT 3") + bind("") + execute() + SYNC,
    "prepare_s1": parse("s1", "SELECT 1") + SYNC,
    "prepare_s2": parse("s2", "SELECT 2") + m.message(b"D", b"Ss2\x00") + SYNC,
    "run_s1": bind("s1") + execute() + SYNC,
    "run_s1_described": bind("s1") + describe_portal() + execute() + SYNC,
    "run_s2": bind("s2") + execute() + SYNC,
}


class MiniServer:
    """Answers whatever a server connection was sent, message by message, as PostgreSQL would
    for these requests (every statement succeeds and returns no rows)."""

    def __init__(self) -> None:
        self.status = b"I"
        self.prepared: set[bytes] = set()

    def answer(self, data: bytes) -> bytes:
        out = b""
        at = 0
        while at < len(data):
            kind = data[at : at + 1]
            (length,) = struct.unpack_from("!i", data, at + 1)
            body = data[at + 5 : at + 1 + length]
            at += 1 + length
            if kind == b"Q":
                sql = body.rstrip(b"\x00").strip().upper()
                out += self._statement(sql) + msg(b"Z", self.status)
            elif kind == b"P":
                name = body[: body.index(b"\x00")]
                if name:
                    self.prepared.add(name)
                out += msg(b"1")
            elif kind == b"B":
                out += msg(b"2")
            elif kind == b"D":
                out += (msg(b"t", b"\x00\x00") if body[:1] == b"S" else b"") + msg(b"n")
            elif kind == b"E":
                out += m.command_complete("SELECT 0")
            elif kind == b"C":
                out += msg(b"3")
            elif kind == b"S":
                out += msg(b"Z", self.status)
            elif kind == b"X":
                pass
            else:
                raise AssertionError(f"unexpected message {kind!r}")
        return out

    def _statement(self, sql: bytes) -> bytes:
        if sql.startswith(b"BEGIN"):
            self.status = b"T"
            return m.command_complete("BEGIN")
        if sql.startswith(b"COMMIT") or sql.startswith(b"ROLLBACK"):
            self.status = b"I"
            return m.command_complete(sql.split()[0].decode())
        if sql.startswith(b"INSERT"):
            return m.command_complete("INSERT 0 1")
        return m.command_complete("SELECT 0")


def _feed(receiver: Any, data: bytes, whole: bool) -> None:
    if whole:
        receiver.data_received(data)
    else:
        for i in range(len(data)):
            receiver.data_received(data[i : i + 1])


def _state(client: ClientSession, host: FakeHost, servers: list[ServerConnection]) -> tuple[Any, ...]:
    routing = client.routing
    relay = client.session_relay
    return (
        client.state,
        client.metric_state,
        client.settings,
        sorted(relay.session_statements) if relay is not None else [],
        sorted(routing.router.statements) if routing is not None else None,
        client.mode.batch_kind,
        len(host.pool.idle),
        [(s.outstanding, s.tx_status, len(s.in_flight), bool(s.tracker), len(s.statements)) for s in servers],
    )


async def _run(mode: str, steps: list[str], whole: bool) -> tuple[list[bytes], list[bytes], tuple[Any, ...]]:
    host = FakeHost(mode, FakePool(1))
    client, transport = new_client(host)
    client.data_received(m.startup_message({"user": "app", "database": "db"}))
    await settle()
    assert client.backend_key is not None
    transport.take()
    servers: list[ServerConnection] = [*host.pool.idle, *([client.server] if client.server else [])]
    pg = MiniServer()
    to_client: list[bytes] = []
    to_server: list[bytes] = []
    for step in steps:
        _feed(client, REQUESTS[step], whole)
        await settle()
        sent = b"".join(server_out(s).take() for s in servers)
        to_server.append(sent)
        if sent:
            # The answer goes back through the server the client is linked to.
            server = client.server
            assert server is not None
            _feed(server, pg.answer(sent), whole)
        await settle()
        to_client.append(transport.take())
    return to_client, to_server, _state(client, host, servers)


def _compare(mode: str, steps: list[str]) -> None:
    fast = asyncio.run(_run(mode, steps, whole=True))
    general = asyncio.run(_run(mode, steps, whole=False))
    for index, step in enumerate(steps):
        if fast[1][index] == b"" and general[1][index] == SYNC:
            # `_prepare_here` by design: a named Parse that a server already has, answered with no
            # server at all (the general path answers the Parse itself too, but sends the Sync).
            continue
        assert fast[1][index] == general[1][index], f"to the server at step {index} ({step}), {steps}"
        assert fast[0][index] == general[0][index], f"to the client at step {index} ({step}), {steps}"
    assert fast[2] == general[2]


_steps = st.lists(st.sampled_from(sorted(REQUESTS)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(_steps)
def test_session_mode_fast_paths_match_the_general_path(steps: list[str]) -> None:
    _compare("session", steps)


@settings(max_examples=60, deadline=None)
@given(_steps)
def test_transaction_mode_fast_paths_match_the_general_path(steps: list[str]) -> None:
    _compare("transaction", steps)


def test_a_single_byte_never_takes_a_fast_path() -> None:
    """The premise: the entry points of the fast paths decline every one-byte read (and take the
    whole requests, so the differential tests above do compare two different paths)."""

    async def run() -> None:
        host = FakeHost("session", FakePool(1))
        client, _ = new_client(host)
        client.data_received(m.startup_message({"user": "app", "database": "db"}))
        await settle()
        server = client.server
        assert server is not None
        relay = client.session_relay
        assert relay is not None
        for data in REQUESTS.values():
            for byte in data:
                assert not relay.fast(server, bytes([byte]))
        assert relay.fast(server, REQUESTS["select"])
        host = FakeHost("transaction", FakePool(1))
        client, _ = new_client(host)
        client.data_received(m.startup_message({"user": "app", "database": "db"}))
        await settle()
        routing = client.routing
        assert routing is not None
        for data in REQUESTS.values():
            for byte in data:
                assert not routing.attach_query(bytes([byte]))
        assert routing.attach_query(REQUESTS["select"])

    asyncio.run(run())
