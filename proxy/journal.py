"""The transaction journal: what one client sent in its current transaction, and a digest of every
answer it was given, so that the transaction can be replayed on a new writer after a failover and
continued only if every answer there is what the client already saw.

Sans-I/O and per client; the session drives it:

* `begin()` when a transaction starts (or `reset()` when it ends: the same thing);
* `record_request(data)` with each request as the client sent it: one simple Query, or the whole
  extended-protocol batch up to and including its Sync (`last=False` for the parts of a batch
  forwarded in several pieces, the final part with `last=True`);
* `answer_bytes(view)` with the bytes of the current answer as they are relayed to the client, and
  `answer_done()` at the ReadyForQuery that ends it. NotificationResponse messages (another
  session's NOTIFY, timing-dependent) must not be fed: they are not part of any answer.

Bounded: past `max_bytes` of requests (failover.replay_max_bytes) the journal drops what it holds,
marks itself `too_large`, and records nothing more until the next `begin()`; digests are 16 bytes
per request. Answers are hashed as they pass, from the caller's memoryviews, never copied.

A partly relayed answer (the cut came in the middle of it) is compared on the part relayed: its
first `relayed` bytes must hash to `partial_digest()`. If they do, the client has seen exactly the
beginning of the replay's own answer, and the rest of that answer is relayed from the replay (the
client gets one genuine answer, never a mix); if not, the replay diverged. `Verifier` does this.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Final

DIGEST_SIZE: Final = 16

# Verifier.status values.
PENDING: Final = 0  # still comparing
EQUAL: Final = 1  # every answer the client saw was given again, byte for byte
DIVERGED: Final = 2  # an answer differs: the replay must be rolled back (40001)


class TransactionJournal:
    """One client's current transaction: requests to re-send and digests of answers given."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes  # failover.replay_max_bytes
        self.requests: list[bytes] = []  # whole requests, in order, to re-send
        self.digests: list[bytes] = []  # digests[i]: the full answer to requests[i], as relayed
        self.size = 0  # bytes held in `requests` (and in the open part)
        self.too_large = False  # over max_bytes: this transaction cannot be replayed
        self._open = bytearray()  # a request still being recorded (a batch forwarded in pieces)
        self._hash = blake2b(digest_size=DIGEST_SIZE)  # the answer being relayed
        self.relayed = 0  # bytes of the current answer relayed so far

    def begin(self) -> None:
        """A new transaction: forget the previous one."""
        self.reset()

    def reset(self) -> None:
        self.requests.clear()
        self.digests.clear()
        self._open.clear()
        self.size = 0
        self.too_large = False
        if self.relayed:
            self._hash = blake2b(digest_size=DIGEST_SIZE)
            self.relayed = 0

    def record_request(self, data: bytes | memoryview, last: bool = True) -> bool:
        """Keep a request (or, with `last=False`, a part of one) for a replay; False once the
        transaction is too large to replay."""
        if self.too_large:
            return False
        n = len(data)
        if self.size + n > self.max_bytes:
            self._give_up()
            return False
        self.size += n
        if last and not self._open:
            self.requests.append(bytes(data))
        else:
            self._open += data
            if last:
                self.requests.append(bytes(self._open))
                self._open.clear()
        return True

    def _give_up(self) -> None:
        self.requests.clear()
        self.digests.clear()
        self._open.clear()
        self.size = 0
        self.too_large = True

    def answer_bytes(self, view: bytes | memoryview) -> None:
        """Bytes of the current answer, as relayed to the client."""
        if self.too_large:
            return
        self._hash.update(view)
        self.relayed += len(view)

    def answer_done(self) -> None:
        """The current answer is complete (its ReadyForQuery relayed)."""
        if not self.too_large:
            self.digests.append(self._hash.digest())
        self._hash = blake2b(digest_size=DIGEST_SIZE)
        self.relayed = 0

    def partial_digest(self) -> bytes:
        """The digest of the `relayed` bytes of the answer in progress."""
        return self._hash.copy().digest()

    @property
    def answered(self) -> int:
        """Requests whose answer the client got in full."""
        return len(self.digests)

    @property
    def replayable(self) -> bool:
        """Whether a replay can be attempted: nothing was dropped and no request is half recorded."""
        return not self.too_large and not self._open


class Verifier:
    """Compares a replay's answers with what the client was given, request by request.

    Built from the journal at the cut. Feed the replay's answer to request 0, 1, ... with
    `answer_bytes` and close each with `answer_done`, until `status` is not PENDING:

    * answers the client got in full are compared whole (digest against digest);
    * the answer the client got part of (`relayed` bytes): `answer_bytes` consumes only up to that
      many bytes and returns how many it took; the rest of the view, and of that answer, goes to the
      client (status is EQUAL as soon as the prefix matched);
    * answers to requests the client sent but got nothing of are not compared: relay them.

    DIVERGED as soon as one differs (an answer shorter than the relayed prefix included).
    """

    def __init__(self, journal: TransactionJournal) -> None:
        self.expected: list[bytes] = list(journal.digests)
        self.prefix_len = journal.relayed  # 0: no answer was in progress at the cut
        self.prefix_digest = journal.partial_digest() if journal.relayed else b""
        self.index = 0  # the request whose answer is being compared
        self.status = EQUAL if not self.expected and not self.prefix_len else PENDING
        self._hash = blake2b(digest_size=DIGEST_SIZE)
        self._seen = 0  # bytes of the current replay answer hashed

    @property
    def comparing_prefix(self) -> bool:
        return self.status == PENDING and self.index == len(self.expected)

    def answer_bytes(self, view: bytes | memoryview) -> int:
        """Feed replay answer bytes; returns how many of them were compared (the rest, if any,
        belongs to the client: only ever in the partly relayed answer, once it matched)."""
        if self.status != PENDING:
            return 0
        if self.index < len(self.expected):
            self._hash.update(view)
            self._seen += len(view)
            return len(view)
        wanted = self.prefix_len - self._seen
        n = len(view)
        take = n if n <= wanted else wanted
        if take == n:
            self._hash.update(view)
        else:
            self._hash.update(memoryview(view)[:take])
        self._seen += take
        if self._seen == self.prefix_len:
            self.status = EQUAL if self._hash.digest() == self.prefix_digest else DIVERGED
        return take

    def answer_done(self) -> int:
        """The replay's current answer ended (its ReadyForQuery fed); returns `status`."""
        if self.status != PENDING:
            return self.status
        if self.index == len(self.expected):
            self.status = DIVERGED  # ended before the part the client saw
            return self.status
        if self._hash.digest() != self.expected[self.index]:
            self.status = DIVERGED
            return self.status
        self.index += 1
        self._hash = blake2b(digest_size=DIGEST_SIZE)
        self._seen = 0
        if self.index == len(self.expected) and not self.prefix_len:
            self.status = EQUAL
        return self.status
