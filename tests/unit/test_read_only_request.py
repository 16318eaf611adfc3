"""`read_routing.read_only_request`: which client requests read routing may send to a replica
(whole messages as the client sent them; anything unsure is a write)."""

from __future__ import annotations

from proxy.protocol import messages as m
from proxy.read_routing import read_only_request

KNOWN = {"_pg3_0": "SELECT * FROM items WHERE id = $1", "ins": "INSERT INTO items VALUES ($1)"}


def ro(data: bytes) -> bool:
    return read_only_request(data, KNOWN.get)


def test_simple_queries() -> None:
    assert ro(m.query("SELECT 1"))
    assert ro(m.query("BEGIN READ ONLY"))
    assert ro(m.query("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
    assert not ro(m.query("BEGIN"))
    assert not ro(m.query("INSERT INTO items VALUES (1)"))
    assert not ro(m.query("SELECT 1; INSERT INTO items VALUES (1)"))
    assert not ro(m.query("SELECT nextval('s')"))
    assert not ro(m.query("SELECT * FROM items FOR UPDATE"))
    assert not ro(m.query("SELECT 1")[:-2])  # cut short: not whole


def test_extended_batches() -> None:
    batch = m.parse("", "BEGIN READ ONLY") + m.bind() + m.execute() + m.sync()
    assert ro(batch)
    assert not ro(batch[:-5])  # no Sync yet: the rest could write
    assert not ro(m.parse("", "SELECT 1") + m.bind() + m.execute() + m.parse("", "DELETE FROM t") + m.sync())
    # A statement prepared earlier, by name.
    assert ro(m.bind("", "_pg3_0") + m.execute() + m.sync())
    assert not ro(m.bind("", "ins") + m.execute() + m.sync())
    assert not ro(m.bind("", "unknown") + m.execute() + m.sync())
    assert not ro(m.bind() + m.execute() + m.sync())  # the unnamed statement of an earlier request
    # asyncpg prepares with Parse, Describe, Flush.
    assert ro(
        m.parse("__asyncpg_stmt_1__", "SELECT 1")
        + m.describe("S", "__asyncpg_stmt_1__")
        + m.message(b"H", b"")
    )
    assert not ro(m.parse("x", "SELECT 1") + m.message(b"H", b"") + m.bind("", "x"))
    assert not ro(b"")


def test_common_reads_are_decided_without_parsing_and_the_rest_parsed() -> None:
    # (Both ways give the same verdicts; the quick one only spares pglast the common texts.)
    assert ro(m.query("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"))
    assert ro(m.query("select a, b from t where c = 'for' and d <> $1"))
    assert not ro(m.query("SELECT * FROM t FOR UPDATE"))
    assert not ro(m.query("SELECT * FROM t FOR NO KEY UPDATE"))
    assert not ro(m.query("SELECT 1 INTO t"))
    assert not ro(m.query("SELECT nextval('s')"))
    assert not ro(m.query("SELECT 1; DELETE FROM t"))
