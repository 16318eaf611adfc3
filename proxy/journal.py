"""The transaction journal: what one client sent in its current transaction, and a digest of the
answers it was given, so that the transaction can be replayed on a new writer after a failover and
continued only if every answer there is what the client already saw.

Sans-I/O and per client; the session drives it:

* `begin()` when a transaction starts (or `reset()` when it ends: the same thing);
* `record_request(data)` with each request as the client sent it: one simple Query, or the whole
  extended-protocol batch up to and including its Sync (`last=False` for the parts of a batch
  forwarded in several pieces, the final part with `last=True`), or in transaction mode each
  message as the session's relay reads it (before its statement names are rewritten);
* `answer_bytes(view)` with the bytes of the answers as they are relayed to the client, and
  `answer_done()` at the ReadyForQuery that ends each. NotificationResponse messages (another
  session's NOTIFY, timing-dependent) must not be fed: they are not part of any answer.

The answers are hashed as one stream (blake2b, 128 bits), from the caller's memoryviews, never
copied, and the journal notes the offset in that stream where each answer ended. Two runs gave the
same answers exactly when their streams are equal and the answers end at the same offsets, so that
is what `Verifier` compares; the hash is finalised only when a replay needs it (`digest()`), not
per answer (finalising costs more than hashing a short answer).

Hashing is deferred as well: the fast path's whole answers are immutable `bytes`, so the journal
keeps a reference to each (no copy) and hashes them only when a replay asks for the digest, or
when something must be hashed after them (the general path's views, which are not kept), or when
they pass `HELD_ANSWERS_MAX`. Almost every transaction ends without a failover, and its answers
are then never hashed at all.

Bounded: past `max_bytes` of requests (failover.replay_max_bytes) the journal drops what it holds,
marks itself `too_large`, and records nothing more until the next `begin()`; besides the requests
it keeps one int per answer.

A partly relayed answer (the cut came in the middle of it) is compared on the part relayed: the
replay's answers must give the same first `relayed_total` bytes. If they do, the client has seen
exactly the beginning of the replay's own answer, and the rest of that answer is relayed from the
replay (the client gets one genuine answer, never a mix); if not, the replay diverged.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Final

from .requests import REQUEST_READ

DIGEST_SIZE: Final = 16
# Answer bytes held unhashed (by reference) per client, counted with each object's own overhead.
HELD_ANSWERS_MAX: Final = 16384
_HELD_OVERHEAD: Final = 48  # a bytes object's header and the list's pointer to it
# Copied rather than constructed for each new stream: a copy of a fresh object is the cheaper.
_FRESH: Final = blake2b(digest_size=DIGEST_SIZE)

_READY: Final = 0x5A  # 'Z' ReadyForQuery: an answer ends with it
_NOTIFY: Final = 0x41  # 'A' NotificationResponse: not part of any answer
_NOTICE: Final = 0x4E  # 'N' NoticeResponse
# The SQLSTATE field of a dying server's WARNING ("terminating connection due to immediate
# shutdown command", 57P01/57P02/57P03): sent at the cut, outside or inside an answer, and not
# part of it: left out of the digest.
_GOING_AWAY: Final = b"\x00C57P0"
_TX_IDLE: Final = 0x49  # 'I'

# `Framing.split` segment kinds.
SEG_ANSWER: Final = 0  # answer bytes
SEG_ANSWER_END: Final = 1  # answer bytes ending with a ReadyForQuery: the answer is complete
SEG_NOTIFY: Final = 2  # a NotificationResponse (or part of one): relayed, never compared
SEG_NOTICE: Final = 3  # a whole NoticeResponse: answer bytes, unless a dying server's goodbye


class Framing:
    """Follows the message boundaries of a server->client byte stream written in arbitrary pieces
    (the relay's spans may end in the middle of a message), so that ReadyForQuery ends and
    NotificationResponses can be found without copying: `split` cuts a piece into segments.
    Costs one step per message, not per byte; only on the general path (the fast path's reads
    are whole answers)."""

    def __init__(self) -> None:
        self.type = -1  # the current message's type byte; -1: at a message boundary
        self.left = -1  # bytes left of the current message; -1: its length is not read yet
        self.header = bytearray()  # the length bytes read so far, when split between pieces
        self.length = 0  # the current message's length field

    def reset(self) -> None:
        self.type = -1
        self.left = -1
        self.header.clear()

    def split(self, data: bytes | memoryview) -> list[tuple[int, int, int]]:
        """(start, end, SEG_*) segments covering `data`, in order."""
        out: list[tuple[int, int, int]] = []
        n = len(data)
        pos = 0
        start = 0  # of the segment being built
        while pos < n:
            mtype = self.type
            if mtype < 0:
                mtype = data[pos]
                if mtype in (_NOTIFY, _NOTICE) and pos > start:
                    out.append((start, pos, SEG_ANSWER))
                    start = pos
                self.type = mtype
                self.left = -1
                self.header.clear()
                pos += 1
                continue
            if self.left < 0:
                take = min(4 - len(self.header), n - pos)
                self.header += data[pos : pos + take]
                pos += take
                if len(self.header) < 4:
                    continue
                self.length = int.from_bytes(self.header, "big")
                self.left = self.length - 4
            else:
                take = min(self.left, n - pos)
                pos += take
                self.left -= take
            if self.left == 0:
                self.type = -1
                if mtype == _NOTIFY:
                    out.append((start, pos, SEG_NOTIFY))
                    start = pos
                elif mtype == _READY:
                    out.append((start, pos, SEG_ANSWER_END))
                    start = pos
                elif mtype == _NOTICE:
                    whole = pos - start == self.length + 1
                    out.append((start, pos, SEG_NOTICE if whole else SEG_ANSWER))
                    start = pos
        if pos > start:
            out.append((start, pos, SEG_NOTIFY if self.type == _NOTIFY else SEG_ANSWER))
        return out


# Verifier.status values.
PENDING: Final = 0  # still comparing
EQUAL: Final = 1  # every answer byte the client saw was given again, with the same boundaries
DIVERGED: Final = 2  # an answer differs: the replay must be rolled back (40001)


class TransactionJournal:
    """One client's current transaction: requests to re-send, and the answers given, digested."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes  # failover.replay_max_bytes
        # Whole requests, in order, to re-send (`requests`): a transaction's first one in
        # `_lone`, the list only from the second on, so that the usual autocommit statement costs
        # no list append and clear.
        self._lone: bytes | None = None
        self._more: list[bytes] = []
        self.size = 0  # bytes held in `requests` (and in the open part)
        self.too_large = False  # over max_bytes: this transaction cannot be replayed
        self._open = bytearray()  # a request still being recorded (a batch forwarded in pieces)
        self._partial = False  # whether `_open` holds anything (a flag: cheaper to ask)
        self._hash = _FRESH.copy()  # every answer byte relayed in this transaction, in order
        self._hashed = False  # whether `_hash` has been fed since the transaction began
        # Whole answers relayed after everything in `_hash`, not hashed yet (see the docstring).
        self._held: list[bytes] = []
        self._held_size = 0
        self.relayed_total = 0  # answer bytes relayed in this transaction
        # Where each answer hashed so far ended (relayed_total then); the held answers' ends are
        # added as they are hashed (`answer_ends` has them all).
        self._ends: list[int] = []
        # An autocommit request other than a read was answered while more were in flight: it is
        # done and must never be sent again, so nothing recorded can be replayed until `reset`.
        self.blocked = False
        self.framing = Framing()  # the general path's answer stream (`relay_view`)

    def begin(self) -> None:
        """A new transaction: forget the previous one."""
        self.reset()

    def reset(self) -> None:
        self._lone = None
        self._more.clear()
        self._ends.clear()
        self._open.clear()
        self._partial = False
        self.size = 0
        self.too_large = False
        self.blocked = False
        if self.relayed_total:
            if self._held:
                self._held.clear()
                self._held_size = 0
            if self._hashed:
                self._hash = _FRESH.copy()
                self._hashed = False
            self.relayed_total = 0

    def record_request(self, data: bytes | memoryview, last: bool = True) -> bool:
        """Keep a request (or, with `last=False`, a part of one) for a replay; False once the
        transaction is too large to replay."""
        if self.too_large:
            return False
        if isinstance(data, bytes) and last and not self._partial:
            # The usual request, whole and in a bytes object, kept as it is (no copy; the
            # checks are native on bytes, generic on the union).
            n = len(data)
            if self.size + n > self.max_bytes:
                self._give_up()
                return False
            self.size += n
            if self._lone is None and not self._more:
                self._lone = data  # (the usual first request: `_keep` inlined)
            else:
                self._keep(data)
            return True
        n = len(data)
        if self.size + n > self.max_bytes:
            self._give_up()
            return False
        self.size += n
        if last and not self._partial:
            self._keep(bytes(data))
        else:
            self._open += data
            self._partial = len(self._open) > 0
            if last:
                self._keep(bytes(self._open))
                self._open.clear()
                self._partial = False
        return True

    def _keep(self, request: bytes) -> None:
        if self._lone is None and not self._more:
            self._lone = request
            return
        if self._lone is not None:
            self._more.append(self._lone)
            self._lone = None
        self._more.append(request)

    @property
    def requests(self) -> list[bytes]:
        """The transaction's whole requests, in order."""
        lone = self._lone
        return [lone] if lone is not None else self._more

    def _give_up(self) -> None:
        self._lone = None
        self._more.clear()
        self._ends.clear()
        self._open.clear()
        self._partial = False
        self._held.clear()
        self._held_size = 0
        self.size = 0
        self.too_large = True

    def answer_bytes(self, view: bytes | memoryview) -> None:
        """Bytes of the current answer, as relayed to the client."""
        if self.too_large:
            return
        self._hash_view(view)
        self.relayed_total += len(view)

    def _hash_view(self, view: bytes | memoryview) -> None:
        # After whatever is held: the stream's order is the answers' order.
        if self._held:
            self._fold()
        self._hash.update(view)
        self._hashed = True

    def _fold(self) -> None:
        held = self._held
        update = self._hash.update
        ends = self._ends
        # The held answers are the stream's last bytes: where the first of them started.
        end = self.relayed_total - (self._held_size - _HELD_OVERHEAD * len(held))
        for answer in held:
            update(answer)
            end += len(answer)
            ends.append(end)
        held.clear()
        self._held_size = 0
        self._hashed = True

    def answer_done(self) -> None:
        """The current answer is complete (its ReadyForQuery relayed)."""
        if not self.too_large:
            self._ends.append(self.relayed_total)

    def whole_answer(self, data: bytes, status: int, more: int, kind: int) -> None:
        """The relay's fast path wrote `data`, one whole answer ending in a ReadyForQuery of
        `status`; `more` requests are still in flight; `kind` is the answered request's REQUEST_*.
        The common autocommit case (status idle, nothing more in flight) only resets."""
        if status == _TX_IDLE:
            if not more:
                if self.relayed_total or self._ends or self.blocked or self.too_large or self._partial:
                    self.reset()
                elif self._lone is not None:  # the usual autocommit statement: nothing hashed
                    self._lone = None
                    self.size = 0
                elif self._more:
                    self._more.clear()
                    self.size = 0
                return
            if kind != REQUEST_READ:
                self.blocked = True
        if self.too_large or self.blocked:
            return
        n = len(data)
        held = self._held_size + n + _HELD_OVERHEAD
        if held <= HELD_ANSWERS_MAX:
            self._held.append(data)  # (its end is noted when it is hashed: `_fold`)
            self._held_size = held
            self.relayed_total += n
        else:
            self._hash_view(data)
            self.relayed_total += n
            self._ends.append(self.relayed_total)

    def answered_in_pipeline(self, status: int, more: int, kind: int) -> None:
        """The general path saw a ReadyForQuery (see `whole_answer` for the arguments)."""
        if status == _TX_IDLE and more and kind != REQUEST_READ:
            self.blocked = True

    def relay_view(self, data: bytes | memoryview) -> None:
        """The general path wrote `data` (any piece of the answer stream) to the client."""
        segments = self.framing.split(data)
        if self.too_large or self.blocked:
            return
        view = memoryview(data)
        for start, end, kind in segments:
            if kind == SEG_NOTIFY or (kind == SEG_NOTICE and _GOING_AWAY in bytes(view[start:end])):
                continue
            self._hash_view(view[start:end])
            self.relayed_total += end - start
            if kind == SEG_ANSWER_END:
                self._ends.append(self.relayed_total)

    def settled(self, status: int, more: int) -> None:
        """After the general path's write: at status idle with nothing in flight the transaction
        is over (the framing is at a boundary after its ReadyForQuery)."""
        if (status == _TX_IDLE and not more and self.framing.type < 0) and (
            self._lone is not None
            or self._more
            or self.relayed_total
            or self.blocked
            or self.too_large
            or self._partial
        ):
            self.reset()

    def digest(self) -> bytes:
        """The digest of every answer byte relayed so far (at the cut)."""
        if self._held:
            self._fold()
        return self._hash.copy().digest()

    @property
    def answer_ends(self) -> list[int]:
        """answer_ends[i]: `relayed_total` when answer i ended."""
        if self._held:
            self._fold()
        return self._ends

    @property
    def answered(self) -> int:
        """Requests whose answer the client got in full."""
        return len(self._ends) + len(self._held)

    @property
    def relayed(self) -> int:
        """Bytes relayed of the answer in progress (0: none is)."""
        if self._held:
            return 0  # (the last answer relayed is held, so whole)
        ends = self._ends
        return self.relayed_total - (ends[-1] if ends else 0)

    @property
    def replayable(self) -> bool:
        """Whether a replay can be attempted: nothing was dropped and no request is half recorded."""
        return not self.too_large and not self._partial and not self.blocked


class Verifier:
    """Compares a replay's answers with what the client was given.

    Built from the journal at the cut. Feed the replay's answers, in order, with `answer_bytes`,
    and `answer_done` at each one's ReadyForQuery, until `status` is not PENDING:

    * the replay's answer stream is hashed up to the length the client saw (`relayed_total`) and
      compared with the journal's digest; each answer must end where the original ended (checked
      at each `answer_done`, so a different row count is usually caught before the digest);
    * `answer_bytes` returns how many bytes of the view it compared: past `relayed_total` the rest
      belongs to the client (only ever the rest of the partly relayed answer, once all matched);
    * answers to requests the client sent but got nothing of are not compared: relay them.

    DIVERGED as soon as a difference is certain (an answer ending early or late included).
    """

    def __init__(self, journal: TransactionJournal) -> None:
        self.expected_total = journal.relayed_total
        self.expected_ends: list[int] = list(journal.answer_ends)
        self.expected_digest = journal.digest()
        self._hash = _FRESH.copy()
        self.seen = 0  # replay answer bytes compared
        self.done = 0  # replay answers ended
        self._bytes_match = self.expected_total == 0
        self.status = PENDING
        self._settle()

    def _settle(self) -> None:
        if self._bytes_match and self.done == len(self.expected_ends):
            self.status = EQUAL

    def answer_bytes(self, view: bytes | memoryview) -> int:
        """Feed replay answer bytes; returns how many of them were compared (the rest, if any,
        belongs to the client)."""
        if self.status != PENDING or self._bytes_match:
            return 0
        n = len(view)
        wanted = self.expected_total - self.seen
        if n <= wanted:
            self._hash.update(view)
            take = n
        else:
            self._hash.update(memoryview(view)[:wanted])
            take = wanted
        self.seen += take
        if self.seen == self.expected_total:
            if self._hash.digest() != self.expected_digest:
                self.status = DIVERGED
                return take
            self._bytes_match = True
            self._settle()
        return take

    def answer_done(self) -> int:
        """The replay's current answer ended (its ReadyForQuery fed); returns `status`."""
        if self.status != PENDING:
            return self.status
        ends = self.expected_ends
        if self.done >= len(ends) or self.seen != ends[self.done]:
            self.status = DIVERGED  # it ended where the client's did not
            return self.status
        self.done += 1
        self._settle()
        return self.status
