"""Hypothesis strategies that turn recorded client streams into hostile inputs.

A stream phase is cut into its messages (segments); a few operators then damage it the way a
buggy driver, a proxy in the middle or an attacker would: bodies cut short (with a matching
length), bit flips, random type bytes, corrupt or huge length fields, deleted, duplicated,
swapped or foreign (spliced) messages, random bytes, truncation. How the result reaches the
sidecar is drawn too: in how many writes (split at random points) and whether the client
vanishes part-way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import strategies as st

from tests.harness.streams import GSSENC_REQUEST, SSL_REQUEST, Stream, frames

Phase = Literal["login", "session"]

# Lengths a length field is set to: the edges a framer gets wrong (below the header, off by one,
# just over a limit, sign bit, near 2 GiB).
LENGTHS = (0, 1, 3, 4, 5, -1, -(2**31), 2**31 - 1, 2**30, 2**20 + 1, 10_001, 65_536)

OPERATORS = (
    "shorten", "flip", "type", "length", "delete", "duplicate", "swap", "splice", "insert", "truncate",
)  # fmt: skip


@dataclass
class FuzzInput:
    """One hostile connection: what is sent, in which pieces, and whether the client then vanishes."""

    stream: str
    phase: Phase
    data: bytes
    cuts: tuple[int, ...] = ()  # write boundaries (offsets into data)
    disconnect_at: int | None = None  # close after sending data[:n] instead of waiting for answers
    ops: list[str] = field(default_factory=list)  # what was done, for the failure report

    @property
    def complete(self) -> bool:
        """Every byte belongs to a whole typed message (session phase only): the sidecar has
        everything it needs to answer, so it must answer (or close with an error)."""
        if self.phase != "session" or self.disconnect_at is not None:
            return False
        _, rest = frames(self.data)
        return not rest

    @property
    def terminates(self) -> bool:
        """A Terminate at a message boundary: the sidecar may close without an error."""
        msgs, _ = frames(self.data)
        return any(m[:1] == b"X" for m in msgs)

    def describe(self) -> str:
        return (
            f"stream={self.stream} phase={self.phase} ops={self.ops} cuts={list(self.cuts)} "
            f"disconnect_at={self.disconnect_at} data={self.data!r}"
        )


def login_segments(login: bytes) -> list[bytes]:
    """The login phase cut into packets: untyped ones (negotiation requests, then the startup
    packet), then typed password messages; a tail that forms no packet is the last segment."""
    segs: list[bytes] = []
    pos = 0
    untyped = True
    while len(login) - pos >= 5:
        if untyped:
            (length,) = struct.unpack_from("!i", login, pos)
            end = pos + length
            if length < 8 or end > len(login):
                break
            untyped = _negotiation(login[pos:end])
        else:
            (length,) = struct.unpack_from("!i", login, pos + 1)
            end = pos + 1 + length
            if length < 4 or end > len(login):
                break
        segs.append(login[pos:end])
        pos = end
    if pos < len(login):
        segs.append(login[pos:])
    return segs


def _negotiation(seg: bytes) -> bool:
    return len(seg) == 8 and struct.unpack_from("!i", seg, 4)[0] in (SSL_REQUEST, GSSENC_REQUEST)


def session_segments(session: bytes) -> list[bytes]:
    """Session messages, without a final Terminate (the fuzzer's probe ends the session)."""
    msgs, rest = frames(session)
    if msgs and msgs[-1][:1] == b"X":
        msgs.pop()
    return msgs + ([rest] if rest else [])


def _length_offset(seg: bytes, phase: Phase) -> int:
    # Untyped packets (startup, SSLRequest) start with the length; typed messages with their type.
    if phase == "login" and seg[:1] == b"\x00":
        return 0
    return 1


@st.composite
def fuzz_inputs(
    draw: st.DrawFn,
    streams: list[Stream],
    phase: Phase,
    max_ops: int = 4,
    allow_disconnect: bool = True,
) -> FuzzInput:
    stream = draw(st.sampled_from(streams))
    if phase == "login":
        segs = login_segments(stream.login)
        if draw(st.booleans()):  # the negotiation libpq does first
            segs.insert(0, struct.pack("!ii", 8, draw(st.sampled_from((SSL_REQUEST, GSSENC_REQUEST)))))
    else:
        segs = session_segments(stream.session)
    donors = [m for s in streams for m in session_segments(s.session)]
    ops: list[str] = []
    truncate_at: int | None = None
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(OPERATORS))
        if not segs:
            segs.append(b"")
        i = draw(st.integers(0, len(segs) - 1))
        seg = bytearray(segs[i])
        if op == "shorten" and len(seg) >= 5 and _length_offset(bytes(seg), phase) == 1:
            # A well-framed message whose body ends early: the decoders' bounds, not the framer's.
            keep = draw(st.integers(0, len(seg) - 5))
            seg = bytearray(seg[:1] + struct.pack("!i", 4 + keep) + seg[5 : 5 + keep])
            ops.append(f"shorten seg{i} body to {keep}")
        elif op == "flip" and seg:
            j = draw(st.integers(0, len(seg) - 1))
            bit = draw(st.integers(0, 7))
            seg[j] ^= 1 << bit
            ops.append(f"flip seg{i}[{j}] bit{bit}")
        elif op == "type" and seg and _length_offset(bytes(seg), phase) == 1:
            seg[0] = draw(st.integers(0, 255))
            ops.append(f"type seg{i}={seg[0]:#04x}")
        elif op == "length" and len(seg) >= 5:
            off = _length_offset(bytes(seg), phase)
            value = draw(st.sampled_from(LENGTHS) | st.integers(-(2**31), 2**31 - 1))
            seg[off : off + 4] = struct.pack("!i", value)
            ops.append(f"length seg{i}={value}")
        elif op == "delete":
            del segs[i]
            ops.append(f"delete seg{i}")
            continue
        elif op == "duplicate":
            n = draw(st.integers(1, 3))
            segs[i:i] = [bytes(seg)] * n
            ops.append(f"duplicate seg{i} x{n}")
            continue
        elif op == "swap":
            k = draw(st.integers(0, len(segs) - 1))
            segs[i], segs[k] = segs[k], segs[i]
            ops.append(f"swap seg{i} seg{k}")
            continue
        elif op == "splice" and donors:
            donor = draw(st.sampled_from(donors))
            segs.insert(i, donor)
            ops.append(f"splice at seg{i} {donor[:1]!r}")
            continue
        elif op == "insert":
            junk = draw(st.binary(min_size=1, max_size=16))
            j = draw(st.integers(0, len(seg)))
            seg[j:j] = junk
            ops.append(f"insert seg{i}[{j}] {junk!r}")
        elif op == "truncate":
            truncate_at = draw(st.integers(0, max(0, sum(map(len, segs)) - 1)))
            ops.append(f"truncate at {truncate_at}")
        segs[i] = bytes(seg)
    data = b"".join(segs)
    if truncate_at is not None:
        data = data[:truncate_at]
    cuts = tuple(sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3)))))
    disconnect_at = None
    if allow_disconnect and data and draw(st.integers(0, 5)) == 3:
        disconnect_at = draw(st.integers(0, len(data)))
    return FuzzInput(stream.name, phase, data, cuts, disconnect_at, ops)
