"""Incremental framing of the PostgreSQL v3 byte stream.

Two framers, for two very different phases of a connection:

* `MessageReader` — the handshake (startup, authentication): a few small messages that are each
  decoded whole. Simple and strict; speed does not matter here.
* `Relay` — the data path. It reads only the 5-byte headers and returns spans of the input to be
  written out as they are. A message is handed to the inspector only when its type is watched
  (ReadyForQuery, ErrorResponse, ...). Bytes of a long unwatched message (a big DataRow or CopyData)
  are streamed through before the message is complete, so memory per connection stays bounded by
  the largest *watched* message, not by the largest row.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Final

from mypy_extensions import i64

from .sqlstate import ProtocolViolation

_LEN: Final = struct.Struct("!i")
_len_from: Final = _LEN.unpack_from


def length_at(data: bytes, pos: i64) -> i64:
    """The message length (big-endian int32) at `data[pos:pos + 4]`, read as unsigned: a negative
    one comes out above any limit. Compiled (mypyc), four byte reads and shifts cost a tenth of
    `struct.unpack_from` and its tuple; this runs for every message header on the data path, so
    in machine integers (i64), not Python ints that mypyc checks for overflow at every step. (Typed
    locals rather than `i64(...)` calls, which run as Python calls when the sources run.)"""
    b0: i64 = data[pos]
    b1: i64 = data[pos + 1]
    b2: i64 = data[pos + 2]
    b3: i64 = data[pos + 3]
    return (b0 << 24) | (b1 << 16) | (b2 << 8) | b3


HEADER_SIZE: Final = 5
# The longest startup packet PostgreSQL itself accepts (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET: Final = 10000
# The longest message PostgreSQL reads before authentication is done (PG_MAX_AUTH_TOKEN_LENGTH: a
# password, a SASL message). limits.max_message_size applies only after: an unauthenticated peer
# must not make the sidecar buffer 64 MiB per connection.
MAX_AUTH_MESSAGE: Final = 65535


class MessageReader:
    """Buffers handshake bytes and yields whole messages. Not for the data path.

    Until `authenticated()`, a typed message may be at most MAX_AUTH_MESSAGE bytes, as in
    PostgreSQL; after, limits.max_message_size (the admin console reads through this too)."""

    __slots__ = ("_authenticated", "_buf", "_max")

    def __init__(self, max_message_size: int) -> None:
        self._buf = bytearray()
        self._max = max_message_size
        self._authenticated = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as whole messages."""
        return len(self._buf)

    def authenticated(self) -> None:
        """The peer proved who it is: messages up to limits.max_message_size from now on."""
        self._authenticated = True

    def read_startup(self) -> bytes | None:
        """The body (after the int32 length) of an untyped startup packet, once complete."""
        if len(self._buf) < 4:
            return None
        (length,) = _len_from(self._buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolViolation(f"invalid startup packet length {length}")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        return body

    def read_message(self) -> tuple[int, bytes] | None:
        """(type byte, body) of the next typed message, once complete."""
        if len(self._buf) < HEADER_SIZE:
            return None
        (length,) = _len_from(self._buf, 1)
        if not self._authenticated and length > MAX_AUTH_MESSAGE:
            # PostgreSQL's words ("invalid message length"), with the limit that was crossed.
            raise ProtocolViolation(
                f"invalid message length {length} for message type {bytes(self._buf[:1])!r} before "
                f"authentication (at most {MAX_AUTH_MESSAGE} bytes)"
            )
        check_length(self._buf[0], length, self._max)
        end = 1 + length
        if len(self._buf) < end:
            return None
        type_byte = self._buf[0]
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return type_byte, body

    def take_rest(self) -> bytes:
        """Whatever arrived after the last whole message (a client may pipeline past the handshake)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def check_length(type_byte: int, length: int, max_message_size: int) -> None:
    if length < 4:
        raise ProtocolViolation(f"invalid message length {length} for message type {type_byte!r}")
    if length > max_message_size:
        raise ProtocolViolation(
            f"message of {length} bytes exceeds limits.max_message_size ({max_message_size} bytes)"
        )


class Action(IntEnum):
    """What the inspector wants done with a watched message."""

    FORWARD = 0  # pass it on with the surrounding span
    DROP = 1  # swallow it (e.g. the client's Terminate: the server connection is pooled)
    FORWARD_PAUSE = 2  # pass it on, then stop scanning until `resume()` (routing must change)
    DROP_PAUSE = 3  # swallow it, then stop scanning until `resume()`
    HOLD = 4  # stop before it: it and what follows wait, unread, for `resume()` (destination changes)


Span = bytes | memoryview
Inspector = Callable[[int, memoryview], Action]


def watch_table(types: Iterable[int]) -> bytes:
    """A 256-entry lookup table: indexing bytes is the cheapest membership test on the hot path."""
    table = bytearray(256)
    for t in types:
        table[t] = 1
    return bytes(table)


def valid_type_table(types: Iterable[int]) -> bytes:
    return watch_table(types)


class Relay:
    """Splits an inbound byte stream into spans to forward, handing watched messages to `inspect`.

    `feed(data)` returns the spans to write, in order. Spans are memoryviews of `data` (no copy)
    except around a message that straddled two reads, which is carried over in a small buffer.
    """

    __slots__ = (
        "_carry", "_insert", "_inspect", "_max", "_paused", "_stream_left", "_valid", "_watch",
        "spans_before_error",
    )  # fmt: skip

    def __init__(
        self,
        watch: bytes,
        inspect: Inspector,
        max_message_size: int,
        valid_types: bytes | None = None,
    ) -> None:
        self._watch = watch
        self._inspect = inspect
        self._max = max_message_size
        self._valid = valid_types
        self._carry = bytearray()  # an incomplete header, an incomplete watched message, or
        # everything after a pause
        self._stream_left = 0  # bytes of an unwatched message still to pass through
        self._paused = False
        self._insert: list[bytes] = []  # bytes the inspector wants placed before the current message
        # When `feed` raises (a malformed message, or the inspector refused one): the spans of the
        # input before that message, still to be written (`stop` hands them over).
        self.spans_before_error: list[Span] = []

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def buffered(self) -> int:
        """Bytes held back (bounded by one watched message unless paused)."""
        return len(self._carry)

    @property
    def at_boundary(self) -> bool:
        """True between messages: nothing partial is held or being streamed."""
        return self._stream_left == 0 and not self._carry

    def set_inspector(self, inspect: Inspector, watch: bytes | None = None) -> None:
        self._inspect = inspect
        if watch is not None:
            self._watch = watch

    def set_watch(self, watch: bytes) -> None:
        """Look at other message types from now on (from inside `inspect` too: the messages after
        the one being inspected are read with the new table)."""
        self._watch = watch

    @property
    def mid_message(self) -> bool:
        """True while part of a message has been passed on and the rest is still to come."""
        return self._stream_left > 0

    def hold(self) -> None:
        """Stop producing spans (input accumulates) until `resume()`: the destination is busy."""
        self._paused = True

    def unread(self, data: bytes) -> None:
        """Put whole messages back in front of what is held (while paused at a message
        boundary): they are inspected again by whichever inspector is set at `resume()`."""
        self._carry[:0] = data

    def peek(self, count: int) -> bytes:
        return bytes(self._carry[:count])

    def insert(self, data: bytes) -> None:
        """From inside `inspect`: place `data` in the output just before the message being inspected.

        With Action.DROP this replaces the message (a rewritten Parse or Bind); with FORWARD it
        precedes it (a synthetic ParseComplete the client expects before a BindComplete).
        """
        self._insert.append(data)

    def stop(self) -> list[Span]:
        """After `feed` raised: drop everything held and stop for good (nothing after a malformed
        message can be framed). Returns the spans of what came before it, to be written."""
        spans = self.spans_before_error
        self.spans_before_error = []
        self._carry.clear()
        self._insert.clear()
        self._stream_left = 0
        self._paused = True
        return spans

    def resume_empty(self) -> bool:
        """Continue after a pause if nothing is held, carried or being streamed (True); else
        False, nothing done."""
        if self._carry or self._stream_left:
            return False
        self._paused = False
        return True

    def take_held(self) -> bytes:
        """Paused at a message boundary: everything held back, taken out whole, and the relay
        resumed with nothing held (b"", nothing done, if there is nothing to take)."""
        if not self._paused or self._stream_left or not self._carry:
            return b""
        held = bytes(self._carry)
        self._carry.clear()
        self._paused = False
        return held

    def resume(self) -> list[Span]:
        """Continue after a pause with whatever was held back."""
        self._paused = False
        if not self._carry:
            return []
        held = bytes(self._carry)
        self._carry.clear()
        return self.feed(held)

    def whole(self, data: bytes) -> int:
        """The type byte of `data` if it is exactly one whole, well-formed message met at a clean
        boundary (nothing carried or streamed; the caller checks `paused` where it matters), else
        -1. The callers' fast path for the common request: `data` itself is forwarded, no spans."""
        n = len(data)
        if n < HEADER_SIZE or self._carry or self._stream_left:
            return -1
        type_byte = data[0]
        length = length_at(data, 1)
        if length + 1 != n or length < 4 or length > self._max:
            return -1
        valid = self._valid
        if valid is not None and not valid[type_byte]:
            return -1
        return type_byte

    def quiet_run(self, data: bytes, watch: bytes, start: int = 0) -> int:
        """The type byte of the last message in `data` when `data` is whole messages at a clean
        boundary and none before the last is of a type in the `watch` table (nothing there to
        look at); else -1 and the caller takes the general path, `feed`. The fast path for a whole
        request (ending in Sync) or a whole answer (ending in ReadyForQuery). `start`: where the
        messages to check begin (the caller has looked at those before it)."""
        if self._paused or self._stream_left or len(self._carry):
            return -1
        # (Machine integers: compiled, the loop's arithmetic then needs no overflow checks.)
        n: i64 = len(data)
        limit: i64 = self._max
        valid = self._valid
        pos: i64 = start
        while pos + HEADER_SIZE <= n:
            type_byte = data[pos]
            length = length_at(data, pos + 1)
            if length < 4 or length > limit or (valid is not None and not valid[type_byte]):
                return -1  # malformed: `feed` says so
            pos += 1 + length
            if pos == n:
                return type_byte
            if watch[type_byte]:
                return -1
        return -1

    def feed(self, data: bytes) -> list[Span]:
        out: list[Span] = []
        if self._paused:
            self._carry += data
            return out
        n = len(data)
        pos = 0
        if self._stream_left:
            take = self._stream_left if self._stream_left < n else n
            out.append(data if take == n else memoryview(data)[:take])
            self._stream_left -= take
            pos = take
            if pos == n:
                return out
        if self._carry:
            try:
                pos = self._finish_carried(data, pos, out)
            except Exception:
                self.spans_before_error = out
                raise
            if pos < 0 or self._paused:
                return out
        return self._scan(data, pos, out)

    def _finish_carried(self, data: bytes, pos: int, out: list[Span]) -> int:
        """Complete the message that straddled reads. Returns the new position, -1 if still short."""
        carry = self._carry
        n = len(data)
        if len(carry) < HEADER_SIZE:
            need = HEADER_SIZE - len(carry)
            carry += data[pos : pos + need]
            pos = min(n, pos + need)
            if len(carry) < HEADER_SIZE:
                return -1
        type_byte = carry[0]
        length: int = _len_from(carry, 1)[0]
        self._check(type_byte, length)
        total = length + 1
        if not self._watch[type_byte]:
            # Only the header was carried: send it and stream the body from `data`.
            out.append(bytes(carry))
            carry.clear()
            left = total - HEADER_SIZE
            take = min(left, n - pos)
            if take:
                out.append(memoryview(data)[pos : pos + take])
            self._stream_left = left - take
            return pos + take
        need = total - len(carry)
        carry += data[pos : pos + need]
        pos = min(n, pos + need)
        if len(carry) < total:
            return -1
        whole = bytes(carry)
        carry.clear()
        action = self._inspect(type_byte, memoryview(whole))
        if action is Action.HOLD:
            self._paused = True
            carry += whole
            carry += data[pos:]
            return pos
        if self._insert:
            out.extend(self._insert)
            self._insert.clear()
        if action is Action.FORWARD or action is Action.FORWARD_PAUSE:
            out.append(whole)
        if action >= Action.FORWARD_PAUSE:
            self._paused = True
            carry += data[pos:]
        return pos

    def _scan(self, data: bytes, pos: int, out: list[Span]) -> list[Span]:
        # The hot loop: locals only, one header unpack per message, spans emitted only where a
        # message is dropped or inserted before, so a chunk of whole forwarded messages goes out
        # as the very `data` object that came in.
        n = len(data)
        watch = self._watch
        valid = self._valid
        limit = self._max
        inspect = self._inspect
        span_start = pos
        view: memoryview | None = None
        # (One try around the loop, entered once per read: it costs nothing per message.)
        try:
            while pos + HEADER_SIZE <= n:
                type_byte = data[pos]
                length = length_at(data, pos + 1)
                if length < 4 or length > limit or (valid is not None and not valid[type_byte]):
                    self._check(type_byte, length)
                end = pos + 1 + length
                if not watch[type_byte]:
                    if end > n:
                        # Stream the head of a long unwatched message now; the rest follows later.
                        self._stream_left = end - n
                        pos = n
                        break
                    pos = end
                    continue
                if end > n:
                    break
                if view is None:
                    view = memoryview(data)
                action = inspect(type_byte, view[pos:end])
                watch = self._watch  # (the inspector may have changed it: for what follows)
                if self._insert:
                    span_start = self._emit(data, view, span_start, pos, out)
                    out.extend(self._insert)
                    self._insert.clear()
                if action is Action.FORWARD:
                    pos = end
                    continue
                if action is Action.HOLD:
                    self._emit(data, view, span_start, pos, out)
                    self._paused = True
                    self._carry += view[pos:]
                    return out
                if action is Action.FORWARD_PAUSE:
                    pos = end
                    span_start = self._emit(data, view, span_start, pos, out)
                else:
                    self._emit(data, view, span_start, pos, out)
                    pos = span_start = end
                if action >= Action.FORWARD_PAUSE:
                    self._paused = True
                    self._carry += view[pos:]
                    return out
        except Exception:
            # The message at `pos` is malformed (or its inspector refused it): keep what came
            # before it, whole messages all, for the caller to write before it fails the peer.
            self._insert.clear()
            self._emit(data, memoryview(data), span_start, pos, out)
            self.spans_before_error = out
            raise
        if span_start < pos:
            if span_start == 0 and pos == n:
                out.append(data)
            else:
                if view is None:
                    view = memoryview(data)
                out.append(view[span_start:pos])
        if pos < n:
            self._carry += data[pos:]
        return out

    @staticmethod
    def _emit(data: bytes, view: memoryview, start: int, end: int, out: list[Span]) -> int:
        if start < end:
            out.append(data if start == 0 and end == len(data) else view[start:end])
        return end

    def _check(self, type_byte: int, length: int) -> None:
        if self._valid is not None and not self._valid[type_byte]:
            raise ProtocolViolation(f"unknown message type {bytes((type_byte,))!r}")
        # (`length_at` reads unsigned; the error names a negative length as the peer sent it.)
        check_length(type_byte, length - (1 << 32) if length >= 1 << 31 else length, self._max)
