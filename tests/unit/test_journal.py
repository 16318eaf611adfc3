"""The transaction journal and its verifier, with bytes only."""

from __future__ import annotations

import hashlib

from proxy.journal import DIVERGED, EQUAL, HELD_ANSWERS_MAX, PENDING, TransactionJournal, Verifier
from proxy.protocol import messages as m

Q1 = m.query("SELECT 1")
Q2 = m.query("UPDATE t SET x = x + 1 WHERE id = 1")
A1 = m.row_description(["?column?"]) + m.data_row(["1"]) + m.command_complete("SELECT 1")
A1 += m.ready_for_query(m.TX_IN_BLOCK)
A2 = m.command_complete("UPDATE 1") + m.ready_for_query(m.TX_IN_BLOCK)


def journal_of(*exchanges: tuple[bytes, bytes], max_bytes: int = 1 << 20) -> TransactionJournal:
    journal = TransactionJournal(max_bytes)
    journal.begin()
    for request, answer in exchanges:
        journal.record_request(request)
        journal.answer_bytes(memoryview(answer))
        journal.answer_done()
    return journal


def replay(verifier: Verifier, *answers: bytes, chunk: int = 7) -> int:
    """Feed answers in small pieces, as they would come off a socket."""
    for answer in answers:
        view = memoryview(answer)
        for start in range(0, len(view), chunk):
            verifier.answer_bytes(view[start : start + chunk])
        if verifier.answer_done() != PENDING:
            break
    return verifier.status


def test_requests_are_kept_in_order_and_answers_digested() -> None:
    journal = journal_of((Q1, A1), (Q2, A2))
    assert journal.requests == [Q1, Q2]
    assert journal.answer_ends == [len(A1), len(A1) + len(A2)]
    assert journal.digest() == hashlib.blake2b(A1 + A2, digest_size=16).digest()
    assert journal.answered == 2 and journal.replayable and journal.relayed == 0


def test_answer_digest_does_not_depend_on_how_it_was_split() -> None:
    whole = journal_of((Q1, A1))
    split = TransactionJournal(1 << 20)
    split.record_request(Q1)
    for i in range(len(A1)):
        split.answer_bytes(memoryview(A1)[i : i + 1])
    split.answer_done()
    assert (split.digest(), split.answer_ends) == (whole.digest(), whole.answer_ends)


def test_a_memoryview_request_is_copied() -> None:
    buffer = bytearray(Q1)
    journal = TransactionJournal(1 << 20)
    journal.record_request(memoryview(buffer))
    buffer[5:] = b"x" * (len(buffer) - 5)  # the session reuses its read buffer
    assert journal.requests == [Q1]


def test_a_batch_recorded_in_parts_is_one_request() -> None:
    parse = b"P" + (20).to_bytes(4, "big") + b"\x00SELECT $1::int\x00\x00\x00"
    sync = b"S\x00\x00\x00\x04"
    journal = TransactionJournal(1 << 20)
    assert journal.record_request(parse, last=False)
    assert not journal.replayable  # a batch half recorded cannot be replayed
    journal.record_request(sync)
    assert journal.requests == [parse + sync]
    assert journal.replayable


def test_over_the_bound_the_journal_drops_everything_and_says_too_large() -> None:
    journal = TransactionJournal(len(Q1) + len(Q2) - 1)
    assert journal.record_request(Q1)
    journal.answer_bytes(A1)
    journal.answer_done()
    assert not journal.record_request(Q2)
    assert journal.too_large and not journal.replayable
    assert journal.requests == [] and journal.answer_ends == [] and journal.size == 0
    # Nothing more is kept until the next transaction.
    assert not journal.record_request(b"Q\x00\x00\x00\x05\x00")
    journal.answer_bytes(A2)
    journal.answer_done()
    assert journal.requests == [] and journal.answer_ends == []
    journal.begin()
    assert not journal.too_large
    assert journal.record_request(Q1) and journal.requests == [Q1]


def test_exactly_at_the_bound_is_still_replayable() -> None:
    journal = TransactionJournal(len(Q1) + len(Q2))
    assert journal.record_request(Q1) and journal.record_request(Q2)
    assert not journal.too_large and journal.size == len(Q1) + len(Q2)


def test_reset_forgets_a_partial_answer() -> None:
    journal = journal_of((Q1, A1))
    journal.record_request(Q2)
    journal.answer_bytes(A2[:3])
    assert journal.relayed == 3
    journal.reset()
    assert journal.relayed == 0 and journal.requests == [] and journal.answer_ends == []
    fresh = journal_of((Q1, A1))
    journal.record_request(Q1)
    journal.answer_bytes(A1)
    journal.answer_done()
    assert (journal.digest(), journal.answer_ends) == (fresh.digest(), fresh.answer_ends)


def test_the_same_answers_verify_equal() -> None:
    journal = journal_of((Q1, A1), (Q2, A2))
    assert replay(Verifier(journal), A1, A2) == EQUAL


def test_a_different_value_diverges() -> None:
    journal = journal_of((Q1, A1), (Q2, A2))
    other = A1.replace(m.data_row(["1"]), m.data_row(["2"]))
    assert replay(Verifier(journal), other, A2) == DIVERGED
    none_updated = m.command_complete("UPDATE 0") + m.ready_for_query(m.TX_IN_BLOCK)
    assert replay(Verifier(journal), A1, none_updated) == DIVERGED


def test_verification_stops_at_the_first_difference() -> None:
    journal = journal_of((Q1, A1), (Q2, A2))
    verifier = Verifier(journal)
    verifier.answer_bytes(A2)
    assert verifier.answer_done() == DIVERGED
    assert verifier.answer_bytes(A2) == 0 and verifier.answer_done() == DIVERGED


def test_answers_split_differently_diverge_even_with_the_same_bytes() -> None:
    """Same bytes in total, but the first answer ends elsewhere: not the same answers."""
    journal = journal_of((Q1, A1), (Q2, A2))
    verifier = Verifier(journal)
    verifier.answer_bytes(A1 + A2[:5])
    assert verifier.answer_done() == DIVERGED


def test_an_answer_longer_than_the_original_diverges_at_its_end() -> None:
    journal = journal_of((Q1, A1), (Q2, A2))
    longer = A1[:-6] + m.data_row(["2"]) + A1[-6:]
    verifier = Verifier(journal)
    verifier.answer_bytes(longer)
    assert verifier.answer_done() == DIVERGED


def test_an_empty_transaction_is_trivially_equal() -> None:
    assert Verifier(TransactionJournal(1024)).status == EQUAL


def test_a_partly_relayed_answer_is_compared_on_the_part_relayed() -> None:
    journal = journal_of((Q1, A1))
    journal.record_request(Q2)
    seen = 4  # the cut came 4 bytes into the second answer
    journal.answer_bytes(memoryview(A2)[:seen])
    verifier = Verifier(journal)
    verifier.answer_bytes(A1)
    assert verifier.answer_done() == PENDING
    # The whole replay answer arrives at once: only the relayed part is compared; the rest is
    # for the client, which then has exactly the replay's answer.
    taken = verifier.answer_bytes(memoryview(A2))
    assert taken == seen and verifier.status == EQUAL
    assert A2[:seen] + A2[taken:] == A2


def test_a_partly_relayed_answer_that_differs_in_its_relayed_part_diverges() -> None:
    journal = journal_of((Q1, A1))
    journal.record_request(Q2)
    journal.answer_bytes(A2[:13])  # up to and including the row count's digit
    verifier = Verifier(journal)
    replay(verifier, A1)
    other = m.command_complete("UPDATE 0") + m.ready_for_query(m.TX_IN_BLOCK)
    assert verifier.answer_bytes(other) == 13
    assert verifier.status == DIVERGED


def test_a_replay_answer_shorter_than_the_relayed_part_diverges() -> None:
    journal = TransactionJournal(1 << 20)
    journal.record_request(Q1)
    journal.answer_bytes(A1)  # all of it relayed, but its end was not seen yet
    verifier = Verifier(journal)
    verifier.answer_bytes(A1[:5])
    assert verifier.answer_done() == DIVERGED


def test_the_prefix_may_arrive_split_across_reads() -> None:
    journal = TransactionJournal(1 << 20)
    journal.record_request(Q1)
    journal.answer_bytes(A1[:20])
    verifier = Verifier(journal)
    assert verifier.answer_bytes(A1[:7]) == 7 and verifier.status == PENDING
    assert verifier.answer_bytes(A1[7:15]) == 8 and verifier.status == PENDING
    assert verifier.answer_bytes(A1[15:]) == 5 and verifier.status == EQUAL


def test_whole_answers_held_unhashed_digest_in_stream_order() -> None:
    """The fast path's answers are held by reference and hashed only when needed, before any
    later bytes: whole answers, general-path views and whole answers again, in that order, give
    the digest of the stream as relayed, and a held answer is the caller's object, not a copy."""
    journal = TransactionJournal(1 << 20)
    journal.begin()
    first = bytes(A1)
    journal.whole_answer(first, m.TX_IN_BLOCK, 0, 0)
    assert journal._held == [first] and journal._held[0] is first and not journal._hashed
    journal.relay_view(memoryview(A2))  # the general path: hashed after the held answer
    assert journal._held == [] and journal._hashed
    journal.whole_answer(bytes(A2), m.TX_IN_BLOCK, 0, 0)
    assert journal.digest() == hashlib.blake2b(A1 + A2 + A2, digest_size=16).digest()
    assert journal.answer_ends == [len(A1), len(A1) + len(A2), len(A1) + 2 * len(A2)]
    assert Verifier(journal).expected_digest == journal.digest()


def test_held_answers_are_bounded_and_forgotten_at_the_transaction_end() -> None:
    journal = TransactionJournal(1 << 20)
    journal.begin()
    answers = [bytes(A2) for _ in range(2000)]  # far more than HELD_ANSWERS_MAX of them
    for answer in answers:
        journal.whole_answer(answer, m.TX_IN_BLOCK, 0, 0)
        assert journal._held_size <= HELD_ANSWERS_MAX
    assert journal._hashed and 0 < len(journal._held) < len(answers)
    assert journal.digest() == hashlib.blake2b(b"".join(answers), digest_size=16).digest()
    journal.whole_answer(bytes(A2), m.TX_IDLE, 0, 0)  # the transaction's end
    assert (journal._held, journal._held_size, journal._hashed, journal.relayed_total) == ([], 0, False, 0)
    journal.begin()
    journal.whole_answer(bytes(A1), m.TX_IN_BLOCK, 0, 0)
    assert journal.digest() == hashlib.blake2b(A1, digest_size=16).digest()


def test_a_journal_given_up_holds_no_answers() -> None:
    journal = TransactionJournal(len(Q1))
    journal.begin()
    journal.record_request(Q1)
    journal.whole_answer(bytes(A1), m.TX_IN_BLOCK, 0, 0)
    assert journal._held
    assert not journal.record_request(Q2)  # over the bound: not replayable, nothing kept
    assert journal.too_large and journal._held == [] and journal._held_size == 0
