"""Framing of the v3 byte stream: the data-path `Relay` and the handshake `MessageReader`.

Everything here is bytes in, spans/messages out: no sockets, no database.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.protocol import messages as m
from proxy.protocol.framing import (
    HEADER_SIZE,
    MAX_AUTH_MESSAGE,
    MAX_STARTUP_PACKET,
    Action,
    Inspector,
    MessageReader,
    Relay,
    Span,
    valid_type_table,
    watch_table,
)
from proxy.protocol.sqlstate import ProtocolViolation, SqlState

MAX = 1 << 20  # limits.max_message_size used unless a test is about the limit
TYPES = b"DZECTdSNA"  # a mix of backend and frontend type bytes
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bodies are slices of a pattern with a prime period, so a span that is shifted, duplicated or
# cut short does not compare equal by accident.
_PATTERN = bytes(range(251)) * 16


def frame(type_byte: int, body: bytes) -> bytes:
    return bytes((type_byte,)) + struct.pack("!i", len(body) + 4) + body


def joined(spans: Iterable[Span]) -> bytes:
    return b"".join(bytes(s) for s in spans)


def cut(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def forward_all(_type: int, _view: memoryview) -> Action:
    return Action.FORWARD


def collecting(seen: list[bytes]) -> Inspector:
    def inspect(_type: int, view: memoryview) -> Action:
        seen.append(bytes(view))
        return Action.FORWARD

    return inspect


# --------------------------------------------------------------------------------------------
# Relay: property tests over random message streams, random chunking and every Action.


@dataclass(frozen=True)
class Msg:
    type_byte: int
    body: bytes
    action: Action | None  # what the inspector answers; None for unwatched types

    @property
    def wire(self) -> bytes:
        return frame(self.type_byte, self.body)

    @property
    def forwarded(self) -> bool:
        return self.action not in (Action.DROP, Action.DROP_PAUSE)


@st.composite
def streams(
    draw: st.DrawFn, max_messages: int = 12, max_body: int = 3000
) -> tuple[frozenset[int], list[Msg]]:
    watched = draw(st.frozensets(st.sampled_from(list(TYPES))))
    msgs = []
    for i in range(draw(st.integers(0, max_messages))):
        type_byte = draw(st.sampled_from(list(TYPES)))
        size = draw(st.one_of(st.integers(0, 6), st.integers(0, max_body)))
        start = (i * 37) % 251
        body = _PATTERN[start : start + size]
        # HOLD re-inspects the message on resume, so it has its own test below.
        action = (
            draw(st.sampled_from([a for a in Action if a is not Action.HOLD]))
            if type_byte in watched
            else None
        )
        msgs.append(Msg(type_byte, body, action))
    return watched, msgs


@st.composite
def chunkings(draw: st.DrawFn, msgs: Sequence[Msg]) -> list[bytes]:
    """The concatenated stream cut at random points, inside headers, and into 1-byte chunks."""
    stream = b"".join(msg.wire for msg in msgs)
    if not stream:
        return []
    cuts = set(draw(st.lists(st.integers(1, len(stream)), max_size=30)))
    offset = 0
    for msg in msgs:
        where = draw(st.sampled_from(["none", "header", "one-byte"]))
        if where == "header":  # split the 5-byte header (or just after it)
            cuts.add(offset + draw(st.integers(1, HEADER_SIZE)))
        elif where == "one-byte":
            at = offset + draw(st.integers(0, len(msg.wire) - 1))
            cuts.update((at, at + 1))
        offset += len(msg.wire)
    return cut(stream, cuts)


class Recorder:
    """An inspector that answers each watched message with its scripted Action and keeps a copy."""

    def __init__(self, msgs: Sequence[Msg]) -> None:
        self._actions = iter([msg.action for msg in msgs if msg.action is not None])
        self.seen: list[tuple[int, bytes]] = []

    def __call__(self, type_byte: int, view: memoryview) -> Action:
        self.seen.append((type_byte, bytes(view)))
        action = next(self._actions)
        assert action is not None
        return action


@FAST
@given(st.data())
def test_relay_forwards_everything_but_dropped_messages_and_shows_watched_ones_whole(
    data: st.DataObject,
) -> None:
    watched, msgs = data.draw(streams())
    chunks = data.draw(chunkings(msgs))
    expected = b"".join(msg.wire for msg in msgs if msg.forwarded)
    watched_msgs = [msg for msg in msgs if msg.type_byte in watched]
    # What must have been written once the relay pauses on the k-th watched message: everything
    # before it, plus the message itself unless it was dropped.
    prefix_at_pause = []
    for k, msg in enumerate(msgs):
        if msg.type_byte in watched:
            prefix_at_pause.append(b"".join(x.wire for x in msgs[: k + 1] if x.forwarded))

    inspector = Recorder(msgs)
    relay = Relay(watch_table(watched), inspector, MAX)
    out: list[Span] = []
    pending = list(chunks)
    pauses = 0
    while pending:
        out += relay.feed(pending.pop(0))
        assert expected.startswith(joined(out))
        while relay.paused:
            pauses += 1
            paused_on = watched_msgs[len(inspector.seen) - 1]
            assert paused_on.action in (Action.FORWARD_PAUSE, Action.DROP_PAUSE)
            # Nothing after the pausing message has been written; everything before it has.
            assert joined(out) == prefix_at_pause[len(inspector.seen) - 1]
            # More input while paused is held, not scanned or written.
            for _ in range(data.draw(st.integers(0, min(3, len(pending))), label="feeds while paused")):
                seen_before = len(inspector.seen)
                assert relay.feed(pending.pop(0)) == []
                assert len(inspector.seen) == seen_before
                assert relay.paused
            out += relay.resume()
            assert expected.startswith(joined(out))

    assert joined(out) == expected
    assert inspector.seen == [(msg.type_byte, msg.wire) for msg in watched_msgs]
    assert pauses == sum(msg.action in (Action.FORWARD_PAUSE, Action.DROP_PAUSE) for msg in msgs)
    assert relay.at_boundary
    assert relay.buffered == 0
    assert not relay.paused


@settings(max_examples=40, deadline=None)
@given(streams(max_messages=8, max_body=40))
def test_relay_fed_one_byte_at_a_time(case: tuple[frozenset[int], list[Msg]]) -> None:
    watched, msgs = case
    stream = b"".join(msg.wire for msg in msgs)
    inspector = Recorder(msgs)
    relay = Relay(watch_table(watched), inspector, MAX)
    out: list[Span] = []
    for i in range(len(stream)):
        out += relay.feed(stream[i : i + 1])
        while relay.paused:
            out += relay.resume()
    assert joined(out) == b"".join(msg.wire for msg in msgs if msg.forwarded)
    assert inspector.seen == [(msg.type_byte, msg.wire) for msg in msgs if msg.type_byte in watched]
    assert relay.at_boundary


@pytest.mark.parametrize("action", [a for a in Action if a is not Action.HOLD])
def test_each_action_on_a_message_in_the_middle_of_one_read(action: Action) -> None:
    before, target, after = frame(ord("D"), b"row"), frame(ord("Z"), b"I"), frame(ord("C"), b"SELECT 1\0")
    relay = Relay(watch_table(b"Z"), lambda _t, _v: action, MAX)

    out = relay.feed(before + target + after)

    if action is Action.FORWARD:
        assert joined(out) == before + target + after
    elif action is Action.DROP:
        assert joined(out) == before + after
    else:
        written = before + target if action is Action.FORWARD_PAUSE else before
        assert joined(out) == written
        assert relay.paused
        assert relay.buffered == len(after)
        assert not relay.at_boundary
        assert joined(relay.resume()) == after
        assert not relay.paused
    assert relay.at_boundary


@pytest.mark.parametrize("action", [Action.FORWARD_PAUSE, Action.DROP_PAUSE])
def test_pause_on_a_message_completed_by_a_later_read(action: Action) -> None:
    target = frame(ord("Z"), b"T")
    after = frame(ord("D"), b"next")
    relay = Relay(watch_table(b"Z"), lambda _t, _v: action, MAX)

    assert relay.feed(target[:3]) == []
    out = relay.feed(target[3:] + after[:2])

    assert joined(out) == (target if action is Action.FORWARD_PAUSE else b"")
    assert relay.paused
    assert relay.feed(after[2:]) == []
    assert joined(relay.resume()) == after
    assert relay.at_boundary


def test_resume_with_nothing_held_returns_nothing() -> None:
    relay = Relay(watch_table(b"Z"), lambda _t, _v: Action.FORWARD_PAUSE, MAX)
    assert joined(relay.feed(frame(ord("Z"), b"I"))) == frame(ord("Z"), b"I")
    assert relay.paused
    assert relay.resume() == []
    assert not relay.paused
    assert relay.at_boundary


def test_resume_empty_only_when_nothing_is_held_carried_or_streamed() -> None:
    relay = Relay(watch_table(b"Z"), lambda _t, _v: Action.FORWARD_PAUSE, MAX)
    relay.feed(frame(ord("Z"), b"I") + b"N")  # paused at Z, with the start of another message
    assert relay.paused and relay.buffered == 1
    assert not relay.resume_empty()
    assert relay.paused and relay.buffered == 1  # nothing done
    streaming = Relay(watch_table(b"Z"), lambda _t, _v: Action.FORWARD, MAX)
    streaming.feed(frame(ord("D"), bytes(100))[:50])  # half of an unwatched message passed on
    streaming.hold()
    assert not streaming.resume_empty()
    quiet = Relay(watch_table(b"Z"), lambda _t, _v: Action.FORWARD_PAUSE, MAX)
    quiet.feed(frame(ord("Z"), b"I"))
    assert quiet.resume_empty()
    assert not quiet.paused


def test_new_inspector_and_watch_set_apply_to_messages_held_during_a_pause() -> None:
    first_seen: list[int] = []
    second_seen: list[int] = []

    def first(type_byte: int, _view: memoryview) -> Action:
        first_seen.append(type_byte)
        return Action.FORWARD_PAUSE

    def second(type_byte: int, _view: memoryview) -> Action:
        second_seen.append(type_byte)
        return Action.DROP if type_byte == ord("X") else Action.FORWARD

    stream = frame(ord("Q"), b"BEGIN\0") + frame(ord("Q"), b"x\0") + frame(ord("X"), b"")
    relay = Relay(watch_table(b"Q"), first, MAX)

    assert joined(relay.feed(stream)) == frame(ord("Q"), b"BEGIN\0")
    relay.set_inspector(second, watch_table(b"X"))
    assert joined(relay.resume()) == frame(ord("Q"), b"x\0")
    assert first_seen == [ord("Q")]
    assert second_seen == [ord("X")]


def test_whole_unwatched_messages_in_one_read_are_one_uncopied_span() -> None:
    data = frame(ord("D"), b"a") + frame(ord("D"), b"b") + frame(ord("C"), b"SELECT 2\0")
    spans = Relay(watch_table(b"Z"), forward_all, MAX).feed(data)
    assert len(spans) == 1
    span = spans[0]
    assert span is data or (isinstance(span, memoryview) and span.obj is data)


# --------------------------------------------------------------------------------------------
# Relay: memory stays bounded by the largest watched message.


def test_a_10mb_unwatched_message_is_streamed_not_buffered() -> None:
    big = frame(ord("D"), bytes(10_000_000))
    tail = frame(ord("Z"), b"I")
    stream = big + tail
    seen: list[bytes] = []
    relay = Relay(watch_table(b"Z"), collecting(seen), 16 << 20)
    written = 0
    most_buffered = 0
    for i in range(0, len(stream), 64 * 1024):
        chunk = stream[i : i + 64 * 1024]
        written += sum(len(s) for s in relay.feed(chunk))
        most_buffered = max(most_buffered, relay.buffered)
        # Every byte is written in the read it arrived in, bar an incomplete header.
        assert written + relay.buffered == i + len(chunk)
    assert most_buffered < HEADER_SIZE
    assert written == len(stream)
    assert seen == [tail]
    assert relay.at_boundary


def test_a_watched_message_is_held_whole_until_complete() -> None:
    error = frame(ord("E"), b"S" + bytes(1_000_000) + b"\0\0")
    seen: list[bytes] = []
    relay = Relay(watch_table(b"E"), collecting(seen), MAX + 4096)
    out: list[Span] = []
    step = 64 * 1024
    for i in range(0, len(error), step):
        out += relay.feed(error[i : i + step])
        if i + step < len(error):
            assert out == []
            assert relay.buffered == i + step
    assert seen == [error]
    assert joined(out) == error
    assert relay.buffered == 0


# --------------------------------------------------------------------------------------------
# Relay: limits and malformed input.


def _violation(relay: Relay, *chunks: bytes) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        for chunk in chunks:
            relay.feed(chunk)
    exc = info.value
    assert exc.code == SqlState.PROTOCOL_VIOLATION.value == "08P01"
    assert exc.fatal
    return exc


HUGE = struct.pack("!i", 0x7FFFFFF0)


@pytest.mark.parametrize("type_byte", [b"D", b"Z"], ids=["unwatched", "watched"])
@pytest.mark.parametrize(
    "chunks",
    [
        lambda t: [t + HUGE],
        lambda t: [frame(ord("C"), b"ok\0") + t + HUGE],
        lambda t: [t + HUGE[:2], HUGE[2:]],
        lambda t: [t, HUGE[:1], HUGE[1:] + b"body"],
    ],
    ids=["alone", "after-a-message", "header-split", "header-split-thrice"],
)
def test_length_near_2gib_is_rejected_from_the_header(
    chunks: Callable[[bytes], list[bytes]], type_byte: bytes
) -> None:
    relay = Relay(watch_table(b"Z"), forward_all, MAX)
    exc = _violation(relay, *chunks(type_byte))
    assert "limits.max_message_size" in exc.message
    assert str(0x7FFFFFF0) in exc.message


def test_length_exactly_at_the_limit_is_accepted_and_one_more_is_not() -> None:
    limit = 1000
    at_limit = frame(ord("D"), bytes(limit - 4))
    assert joined(Relay(watch_table(b""), forward_all, limit).feed(at_limit)) == at_limit
    exc = _violation(Relay(watch_table(b""), forward_all, limit), frame(ord("D"), bytes(limit - 3)))
    assert "limits.max_message_size" in exc.message


@pytest.mark.parametrize("length", [3, 0, -1, -(2**31)])
@pytest.mark.parametrize("split", [False, True])
def test_length_below_4_is_an_invalid_length(length: int, split: bool) -> None:
    header = b"D" + struct.pack("!i", length)
    relay = Relay(watch_table(b"Z"), forward_all, MAX)
    exc = _violation(relay, *([header[:2], header[2:]] if split else [header]))
    assert "invalid message length" in exc.message


@pytest.mark.parametrize("split", [False, True])
def test_unknown_type_byte_is_rejected_when_valid_types_are_given(split: bool) -> None:
    valid = valid_type_table(m.FRONTEND_TYPES)
    relay = Relay(watch_table(b"X"), forward_all, MAX, valid_types=valid)
    good = m.query("SELECT 1")
    assert joined(relay.feed(good)) == good
    bad = frame(ord("z"), b"")
    exc = _violation(relay, *([bad[:1], bad[1:]] if split else [bad]))
    assert "unknown message type" in exc.message
    assert "b'z'" in exc.message


def test_any_type_byte_is_framed_without_valid_types() -> None:
    data = frame(0, b"") + frame(255, b"x")
    assert joined(Relay(watch_table(b""), forward_all, MAX).feed(data)) == data


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Random bytes, often with plausible headers mixed in so some of it frames."""
    parts = draw(
        st.lists(
            st.one_of(
                st.binary(max_size=24),
                st.builds(
                    lambda t, n, body: bytes((t,)) + struct.pack("!i", n) + body,
                    st.sampled_from([*TYPES, 0, 0x7A]),
                    st.integers(-8, 80),
                    st.binary(max_size=40),
                ),
            ),
            max_size=8,
        )
    )
    return b"".join(parts)


@FAST
@given(
    garbage(),
    st.lists(st.integers(1, 400), max_size=10),
    st.booleans(),
    st.frozensets(st.sampled_from(TYPES)),
)
def test_garbage_either_frames_cleanly_or_is_a_protocol_violation(
    data: bytes, cuts: list[int], check_types: bool, watched: frozenset[int]
) -> None:
    valid = valid_type_table(TYPES) if check_types else None
    relay = Relay(watch_table(watched), forward_all, 64, valid_types=valid)
    out: list[Span] = []
    try:
        for chunk in cut(data, cuts):
            out += relay.feed(chunk)
    except ProtocolViolation as exc:
        assert exc.code == "08P01"
        return
    # Framed cleanly: what was written is the input minus the incomplete message still held.
    assert joined(out) == data[: len(data) - relay.buffered]


# --------------------------------------------------------------------------------------------
# MessageReader (handshake).


def test_startup_packet_arriving_a_byte_at_a_time() -> None:
    packet = m.startup_message({"user": "alice", "database": "app", "application_name": "t"})
    reader = MessageReader(MAX)
    for byte in packet[:-1]:
        reader.feed(bytes((byte,)))
        assert reader.read_startup() is None
    reader.feed(packet[-1:])
    body = reader.read_startup()
    assert body == packet[4:]
    assert m.decode_startup(body).params == {"user": "alice", "database": "app", "application_name": "t"}
    assert reader.take_rest() == b""


@pytest.mark.parametrize("length", [7, 4, 0, -1, MAX_STARTUP_PACKET + 1, 0x7FFFFFFF])
def test_startup_length_out_of_range_is_rejected_once_the_length_is_read(length: int) -> None:
    reader = MessageReader(MAX)
    reader.feed(struct.pack("!i", length))
    with pytest.raises(ProtocolViolation, match=f"invalid startup packet length {length}") as info:
        reader.read_startup()
    assert info.value.code == "08P01"


@pytest.mark.parametrize("length", [8, MAX_STARTUP_PACKET])
def test_startup_length_at_the_bounds_is_accepted(length: int) -> None:
    packet = struct.pack("!ii", length, m.PROTOCOL_3_0) + bytes(length - 8)
    reader = MessageReader(MAX)
    reader.feed(packet)
    assert reader.read_startup() == packet[4:]


def test_ssl_request_then_startup_then_pipelined_query() -> None:
    rest = m.query("SELECT 1") + m.sync()[:2]
    reader = MessageReader(MAX)
    reader.feed(m.ssl_request() + m.startup_message({"user": "u"})[:5])
    ssl = reader.read_startup()
    assert ssl is not None
    assert m.decode_startup(ssl).code == m.SSL_REQUEST_CODE
    assert reader.read_startup() is None
    reader.feed(m.startup_message({"user": "u"})[5:] + rest)
    startup = reader.read_startup()
    assert startup is not None
    assert m.decode_startup(startup).params == {"user": "u"}
    assert reader.take_rest() == rest
    assert reader.take_rest() == b""
    assert reader.read_message() is None


@FAST
@given(
    st.lists(st.tuples(st.sampled_from(list(TYPES)), st.binary(max_size=300)), max_size=8),
    st.lists(st.integers(1, 3000), max_size=20),
)
def test_typed_messages_split_anywhere(msgs: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(frame(t, body) for t, body in msgs)
    reader = MessageReader(MAX)
    got = []
    for chunk in cut(stream, cuts):
        reader.feed(chunk)
        while (msg := reader.read_message()) is not None:
            got.append(msg)
    assert got == msgs
    assert reader.take_rest() == b""


def test_message_reader_rejects_oversized_and_short_lengths_from_the_header() -> None:
    reader = MessageReader(100)
    reader.feed(b"p" + struct.pack("!i", 101))
    with pytest.raises(ProtocolViolation, match=r"limits\.max_message_size"):
        reader.read_message()
    reader = MessageReader(100)
    reader.feed(b"p" + struct.pack("!i", 3))
    with pytest.raises(ProtocolViolation, match="invalid message length 3"):
        reader.read_message()


def test_before_authentication_a_message_over_65535_bytes_is_refused_from_its_header() -> None:
    # PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH, whatever limits.max_message_size allows later.
    reader = MessageReader(64 * 1024 * 1024)
    reader.feed(b"p" + struct.pack("!i", 60 * 1024 * 1024 + 4))
    with pytest.raises(ProtocolViolation, match=r"invalid message length 62914564 .* before auth") as info:
        reader.read_message()
    assert info.value.code == SqlState.PROTOCOL_VIOLATION.value
    at_limit = frame(m.F_PASSWORD, b"x" * (MAX_AUTH_MESSAGE - 4))
    reader = MessageReader(64 * 1024 * 1024)
    reader.feed(at_limit)
    assert reader.read_message() == (m.F_PASSWORD, at_limit[5:])


def test_after_authentication_messages_up_to_max_message_size_are_read() -> None:
    big = frame(m.F_QUERY, b"x" * 100_000)
    reader = MessageReader(MAX)
    reader.authenticated()
    reader.feed(big[:70_000])
    assert reader.read_message() is None
    assert reader.buffered == 70_000
    reader.feed(big[70_000:])
    assert reader.read_message() == (m.F_QUERY, big[5:])
    assert reader.buffered == 0


def test_relay_keeps_the_spans_before_a_malformed_message() -> None:
    # Two good messages, then an unknown type byte: what came before it is handed over by `stop`.
    good = frame(ord("Q"), b"SELECT 1\0") + frame(ord("S"), b"")
    seen: list[bytes] = []
    relay = Relay(watch_table(b"Q"), collecting(seen), MAX, valid_types=valid_type_table(b"QS"))
    with pytest.raises(ProtocolViolation, match="unknown message type"):
        relay.feed(good + b"\x00\x00\x00\x00\x04" + frame(ord("Q"), b"SELECT 2\0"))
    assert joined(relay.stop()) == good
    assert seen == [good[:14]]
    assert relay.paused and relay.buffered == 0 and relay.stop() == []
    relay.feed(frame(ord("Q"), b"more\0"))  # held, never scanned
    assert seen == [good[:14]]


def test_relay_keeps_the_spans_before_a_message_its_inspector_refuses() -> None:
    def refuse_second(_type: int, view: memoryview) -> Action:
        if bytes(view[5:]) == b"bad\0":
            raise ProtocolViolation("refused")
        return Action.FORWARD

    first = frame(ord("Q"), b"one\0")
    relay = Relay(watch_table(b"Q"), refuse_second, MAX)
    assert joined(relay.feed(first[:3])) == b""
    with pytest.raises(ProtocolViolation, match="refused"):
        relay.feed(first[3:] + frame(ord("Q"), b"bad\0"))
    assert joined(relay.stop()) == first
    # Refused as the message completing a carried header: nothing before it in this read.
    relay = Relay(watch_table(b"Q"), refuse_second, MAX)
    bad = frame(ord("Q"), b"bad\0")
    relay.feed(bad[:4])
    with pytest.raises(ProtocolViolation):
        relay.feed(bad[4:])
    assert relay.stop() == []


def test_take_rest_returns_the_partial_message_after_the_last_whole_one() -> None:
    password = m.password_message("secret")
    query = m.query("SELECT now()")
    reader = MessageReader(MAX)
    reader.feed(password + query[:7])
    assert reader.read_message() == (m.F_PASSWORD, b"secret\0")
    assert reader.read_message() is None
    assert reader.take_rest() == query[:7]
    assert reader.read_message() is None


@FAST
@given(st.binary(max_size=64), st.lists(st.integers(1, 64), max_size=6))
def test_message_reader_on_garbage_raises_only_protocol_violation(data: bytes, cuts: list[int]) -> None:
    reader = MessageReader(64)
    got = []
    try:
        for chunk in cut(data, cuts):
            reader.feed(chunk)
            while (msg := reader.read_message()) is not None:
                got.append(msg)
    except ProtocolViolation:
        return
    rest = reader.take_rest()
    assert b"".join(frame(t, body) for t, body in got) + rest == data


# --------------------------------------------------------------------------------------------
# Relay.insert: bytes placed exactly before the inspected message, across any chunking.


def _msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!i", len(body) + 4) + body


@given(cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=12))
@settings(max_examples=200, deadline=None)
def test_insert_places_bytes_before_the_inspected_message_whatever_the_chunking(cuts: list[int]) -> None:
    stream = _msg(b"1", b"") + _msg(b"2", b"") + _msg(b"D", b"row") + _msg(b"2", b"") + _msg(b"Z", b"I")
    relay: Relay

    def inspect(type_byte: int, msg: memoryview) -> Action:
        if type_byte == ord("2"):
            relay.insert(b"<synthetic>")
            return Action.FORWARD
        if type_byte == ord("1"):
            relay.insert(b"<rewritten>")
            return Action.DROP
        return Action.FORWARD

    relay = Relay(watch_table(b"12Z"), inspect, 1 << 20)
    out = b""
    pos = 0
    for cut in cuts:
        out += b"".join(bytes(s) for s in relay.feed(stream[pos : pos + cut]))
        pos = min(len(stream), pos + cut)
    out += b"".join(bytes(s) for s in relay.feed(stream[pos:]))
    expected = (
        b"<rewritten>"
        + b"<synthetic>"
        + _msg(b"2", b"")
        + _msg(b"D", b"row")
        + b"<synthetic>"
        + _msg(b"2", b"")
        + _msg(b"Z", b"I")
    )
    assert out == expected


@given(cuts=st.lists(st.integers(min_value=1, max_value=30), max_size=10))
@settings(max_examples=200, deadline=None)
def test_hold_stops_before_the_message_and_resume_inspects_it_again(cuts: list[int]) -> None:
    # The session answers the client itself until a ROLLBACK, then hands the rest to a server.
    stream = _msg(b"Q", b"a\x00") + _msg(b"Q", b"ROLLBACK\x00") + _msg(b"Q", b"next\x00") + _msg(b"S", b"")
    seen: list[bytes] = []
    held_once: set[bytes] = set()

    def inspect(type_byte: int, msg: memoryview) -> Action:
        body = bytes(msg[5:])
        seen.append(body)
        if body == b"next\x00" and body not in held_once:
            held_once.add(body)
            return Action.HOLD
        return Action.FORWARD

    relay = Relay(watch_table(b"QS"), inspect, 1 << 20)
    out = b""
    pos = 0
    for size in cuts:
        out += b"".join(bytes(s) for s in relay.feed(stream[pos : pos + size]))
        pos = min(len(stream), pos + size)
    out += b"".join(bytes(s) for s in relay.feed(stream[pos:]))
    assert relay.paused
    assert out == _msg(b"Q", b"a\x00") + _msg(b"Q", b"ROLLBACK\x00")
    out += b"".join(bytes(s) for s in relay.resume())
    assert out == stream
    assert seen == [b"a\x00", b"ROLLBACK\x00", b"next\x00", b"next\x00", b""]


# ------------------------------------------------------------------ fast-path helpers


@FAST
@given(
    types=st.lists(st.sampled_from(TYPES), min_size=1, max_size=6),
    sizes=st.lists(st.integers(0, 300), min_size=6, max_size=6),
    watched=st.sets(st.sampled_from(TYPES), max_size=3),
)
def test_quiet_run_names_the_last_message_only_when_nothing_before_it_is_watched(
    types: list[int], sizes: list[int], watched: set[int]
) -> None:
    messages = [frame(t, _PATTERN[:n]) for t, n in zip(types, sizes, strict=False)]
    data = b"".join(messages)
    relay = Relay(watch_table(watched), forward_all, MAX)
    expected = types[-1] if not any(t in watched for t in types[:-1]) else -1
    assert relay.quiet_run(data, watch_table(watched)) == expected
    # Cut inside a message: never a verdict on partial input.
    boundaries = set(itertools.accumulate(len(msg) for msg in messages))
    for point in {1, len(data) // 2, len(data) - 1} - boundaries:
        assert relay.quiet_run(data[:point], watch_table(watched)) == -1


def test_quiet_run_and_whole_refuse_what_feed_would_refuse_or_is_mid_stream() -> None:
    valid = valid_type_table(b"QSBE")
    relay = Relay(watch_table(b"Q"), forward_all, 64, valid_types=valid)
    query = frame(ord("Q"), b"SELECT 1\x00")
    assert relay.whole(query) == ord("Q")
    assert relay.quiet_run(query, watch_table(b"Q")) == ord("Q")
    assert relay.whole(query + query) == -1  # two messages: not "one whole message"
    assert relay.whole(frame(ord("x"), b"")) == -1  # a type the client may not send
    assert relay.quiet_run(frame(ord("x"), b"") + frame(ord("S"), b""), watch_table(b"Q")) == -1
    assert relay.whole(frame(ord("Q"), b"a" * 100)) == -1  # over limits.max_message_size
    assert relay.whole(b"Q\x00\x00\x00\x02") == -1  # a length below 4
    # Something carried over from an earlier read: the general path must finish it first.
    relay.feed(query[:3])
    assert relay.whole(query) == -1
    assert relay.quiet_run(query, watch_table(b"Q")) == -1


def test_watch_changed_by_the_inspector_applies_to_the_rest_of_the_same_read() -> None:
    """Session mode starts watching Bind when a Parse prepares a SET, and every extended-protocol
    message while settings are to be read back: the messages after the one being inspected, in
    the very same read, must be looked at with the new table (a driver sends Parse, Bind,
    Execute, Sync in one write)."""
    seen: list[int] = []
    relay: Relay

    def inspect(type_byte: int, msg: memoryview) -> Action:
        seen.append(type_byte)
        if type_byte == m.F_PARSE:
            relay.set_watch(watch_table((m.F_PARSE, m.F_BIND, m.F_SYNC)))
        return Action.FORWARD

    relay = Relay(watch_table((m.F_PARSE, m.F_SYNC)), inspect, MAX)
    data = m.message(b"P", b"\x00SET x = 1\x00\x00\x00") + m.message(b"B", b"\x00" * 8) + m.message(b"S")
    assert b"".join(bytes(s) for s in relay.feed(data)) == data
    assert seen == [m.F_PARSE, m.F_BIND, m.F_SYNC]
