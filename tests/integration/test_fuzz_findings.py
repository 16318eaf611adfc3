"""Regressions for what the protocol fuzzer (tests/fuzz/) found, each reduced to a few raw messages.

Each test sends the bytes a real client would never send, through the real sidecar, and checks
the outcome PostgreSQL itself gives for the same bytes: the answers, or an ErrorResponse before
the connection closes, within a bound far below the sidecar's own 30 s backstop.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from demo_app.cluster import APP_DB
from tests.harness.sidecar import SidecarProcess
from tests.harness.streams import message, query
from tests.harness.wire import Msg, RawClient, login_trust

# Well above any answer on a loaded box, well below the 30 s the sidecar waits at most for the
# answers owed before it closes a client that sent a malformed message.
ANSWER_TIMEOUT = 10.0

Factory = Callable[..., SidecarProcess]


def _sidecar(factory: Factory, mode: str, **pool: Any) -> SidecarProcess:
    return factory({"auth": {"method": "trust"}, "pool": {"mode": mode, **pool}})


def _until(client: RawClient, done: Callable[[list[Msg]], bool]) -> list[Msg]:
    """Messages until `done(messages)` or EOF; fails at ANSWER_TIMEOUT."""
    client.sock.settimeout(ANSWER_TIMEOUT)
    out: list[Msg] = []
    try:
        while not done(out):
            msg = client.read()
            if msg is None:
                break
            out.append(msg)
    except TimeoutError:
        got = [(m.type, m.body[:60]) for m in out]
        raise AssertionError(f"no answer within {ANSWER_TIMEOUT:g}s; got {got}") from None
    return out


def _rows(msgs: list[Msg]) -> list[bytes]:
    return [m.body for m in msgs if m.type == "D"]


def _parse(sql: str, name: str = "") -> bytes:
    return message(b"P", name.encode() + b"\x00" + sql.encode() + b"\x00\x00\x00")


SYNC = message(b"S")
FLUSH = message(b"H")
# A message of a type that does not exist (0x0a): malformed wherever it comes.
BAD_TYPE = b"\x0a\x00\x00\x00\x04"


@pytest.fixture
def table(shared_topology) -> Iterator[str]:
    """A table of the app database the raw clients (app_trust) may fill."""
    name = f"fz_findings_{uuid.uuid4().hex[:8]}"
    writer = shared_topology.a1
    writer.execute(f"CREATE TABLE {name} (a text); GRANT ALL ON {name} TO app_trust", dbname=APP_DB)
    yield name
    writer.execute(f"DROP TABLE {name}", dbname=APP_DB)


@pytest.mark.parametrize("mode", ["transaction"])
def test_query_skipped_after_an_extended_protocol_error_is_not_awaited(sidecar_factory, mode):
    """After an error in an extended-protocol batch PostgreSQL ignores every message up to Sync, a
    simple Query too: Parse(bad), Query, Sync get one ErrorResponse and one ReadyForQuery. The
    sidecar must not wait for an answer to that Query (the server would stay checked out, in
    transaction mode for good), and the next request is answered as usual."""
    sidecar = _sidecar(sidecar_factory, mode, size=1)
    client = login_trust(sidecar.port)
    client.send(_parse("SELEC nonsense") + query("SELECT 'skipped'") + SYNC + query("SELECT 'next'"))
    msgs = _until(client, lambda out: any(m.type == "D" for m in out) and out[-1].type == "Z")
    assert [m.type for m in msgs][:2] == ["E", "Z"], msgs
    assert msgs[0].sqlstate == "42601"
    assert [r for r in _rows(msgs)] == [b"\x00\x01\x00\x00\x00\x04next"]
    if mode == "transaction":
        # The server went back to the pool (size 1): another client gets it.
        other = login_trust(sidecar.port)
        other.query("SELECT 'other'")
        rows = _rows(_until(other, lambda out: bool(out) and out[-1].type == "Z"))
        assert rows == [b"\x00\x01\x00\x00\x00\x05other"]
    # And a malformed message now ends the session at once: nothing is owed.
    client.send(BAD_TYPE)
    msgs = _until(client, lambda out: False)
    assert msgs and msgs[-1].type == "E" and msgs[-1].sqlstate == "08P01", msgs


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_malformed_message_during_copy_from_stdin(sidecar_factory, shared_topology, table, mode):
    """A malformed message while the client feeds a COPY FROM STDIN: the COPY cannot end by
    itself (its server waits for the rest of the data), so its answer, which the sidecar waits
    for before the 08P01, never came; the client heard nothing for 30 s. The sidecar now ends the
    COPY with CopyFail: the client gets the COPY's error (57014, nothing copied), then the 08P01,
    at once. (PostgreSQL answers 08P01 for the COPY itself, then its FATAL.)"""
    sidecar = _sidecar(sidecar_factory, mode)
    client = login_trust(sidecar.port)
    client.query(f"COPY {table} FROM STDIN")
    started = _until(client, lambda out: bool(out) and out[-1].type in "GEZ")
    assert started[-1].type == "G", started
    client.send(message(b"d", b"copied?\n") + BAD_TYPE)
    msgs = _until(client, lambda out: False)  # until the sidecar closes the connection
    answers = [(m.type, m.sqlstate) for m in msgs if m.type in "EZ"]
    assert answers == [("E", "57014"), ("Z", None), ("E", "08P01")], msgs
    assert shared_topology.a1.query(f"SELECT count(*) FROM {table}", dbname=APP_DB) == [(0,)]


def _bind_execute() -> bytes:
    """Bind the unnamed statement to the unnamed portal (text results), Execute it."""
    return message(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00") + message(b"E", b"\x00\x00\x00\x00\x00")


def test_session_settings_read_back_only_after_the_batch_in_progress(sidecar_factory):
    """Session mode reads a changed setting back (its own query on the server) at the next quiet
    point. A ReadyForQuery is not one while the client has more extended-protocol messages on the
    server that no Sync ended yet: the server answers those first, and the sidecar took their
    answers for its own (a DataRow of one column: "not enough values to unpack", XX000 for the
    client). Found by the protocol fuzzer (pgjdbc stream cut short after its SET)."""
    sidecar = _sidecar(sidecar_factory, "session")
    client = login_trust(sidecar.port)
    # The Parse alone first (answered at the Flush), as the fuzzer's split writes had it.
    client.send(_parse("SET application_name = 'findings'") + FLUSH)
    assert [m.type for m in _until(client, lambda out: bool(out))] == ["1"]
    client.send(_bind_execute() + SYNC + _parse("SELECT 'one'") + _bind_execute())
    first = _until(client, lambda out: bool(out) and out[-1].type == "Z")
    assert [m.type for m in first if m.type != "S"] == ["2", "C", "Z"], first
    client.send(SYNC)
    second = _until(client, lambda out: bool(out) and out[-1].type == "Z")
    assert [m.type for m in second] == ["1", "2", "D", "C", "Z"], second
    assert _rows(second) == [b"\x00\x01\x00\x00\x00\x03one"]
    client.query("SHOW application_name")
    shown = _until(client, lambda out: bool(out) and out[-1].type == "Z")
    assert _rows(shown) == [b"\x00\x01\x00\x00\x00\x08findings"]


def test_client_leaving_during_the_sidecars_own_query_does_not_hand_its_answer_on(sidecar_factory):
    """Transaction mode, a SET: after its ReadyForQuery the sidecar reads the session's settings
    back with its own query on the server. A client that leaves at that moment had its server
    handed to the next client with that query's answer still to come, so the next client got
    it (a RowDescription and DataRows it never asked for) and every later answer one behind
    (found by the protocol fuzzer: probes answered with the previous probe's rows). The window
    is a round trip to PostgreSQL wide, so it is tried a number of times, each on the one server
    of the pool."""
    sidecar = _sidecar(sidecar_factory, "transaction", size=1)
    for attempt in range(30):
        leaving = login_trust(sidecar.port)
        leaving.query("SET datestyle = 'ISO, DMY'")
        _until(leaving, lambda out: bool(out) and out[-1].type == "Z")
        leaving.close()  # while the sidecar reads the setting back
        client = login_trust(sidecar.port)
        client.query(f"SELECT 'mine-{attempt}'")
        answer = _until(client, lambda out: bool(out) and out[-1].type == "Z")
        assert [m.type for m in answer] == ["T", "D", "C", "Z"], (attempt, answer)
        mine = f"mine-{attempt}".encode()
        assert _rows(answer) == [b"\x00\x01" + len(mine).to_bytes(4, "big") + mine], (attempt, answer)
        client.close()


def test_server_skipping_to_sync_is_not_handed_on(sidecar_factory):
    """Transaction mode: a client whose Parse failed (answered at its Flush) leaves before its
    Sync. Its server ignores everything until a Sync, so the next client that got it waited
    forever for its first answer (found by the protocol fuzzer: the bystander's request
    unanswered, the fuzz clients' probes too). Such a server is closed instead."""
    sidecar = _sidecar(sidecar_factory, "transaction", size=1)
    for attempt in range(3):
        leaving = login_trust(sidecar.port)
        leaving.send(_parse("SELEC nonsense") + FLUSH)
        failed = _until(leaving, lambda out: bool(out))
        assert failed[0].type == "E" and failed[0].sqlstate == "42601", failed
        leaving.close()
        client = login_trust(sidecar.port)
        client.query(f"SELECT 'mine-{attempt}'")
        answer = _until(client, lambda out: bool(out) and out[-1].type == "Z")
        assert [m.type for m in answer] == ["T", "D", "C", "Z"], (attempt, answer)
        client.close()
