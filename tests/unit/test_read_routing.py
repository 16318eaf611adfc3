"""proxy/read_routing.py: conservative recognition of read-only work (pure functions, pglast)."""

from __future__ import annotations

import pytest

from proxy.read_routing import (
    default_transaction_read_only,
    is_plain_read,
    parse_bool_setting,
    session_read_only_setting,
    starts_read_only_transaction,
)

READS = [
    "SELECT 1",
    "select * from bookings",
    "SELECT count(*) FROM bookings WHERE day = $1",
    "  /* app */ SELECT id, name FROM cafe.tables ORDER BY id LIMIT 10 OFFSET 5;",
    "SELECT * FROM t1 JOIN t2 USING (id) WHERE t1.x BETWEEN 1 AND 5 AND t2.y LIKE 'a%'",
    "VALUES (1, 'a'), (2, 'b')",
    "TABLE bookings",
    "WITH recent AS (SELECT * FROM bookings WHERE at > now() - interval '1 day') SELECT count(*) FROM recent",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT sum(n) FROM r",
    "SELECT a FROM t UNION SELECT b FROM u EXCEPT SELECT c FROM v",
    "SELECT (SELECT max(x) FROM t) AS m, EXISTS (SELECT 1 FROM u WHERE u.id = 3)",
    "SELECT extract(epoch FROM now()), date_trunc('day', now()), to_char(now(), 'YYYY')",
    "SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t",
    "SELECT jsonb_build_object('a', 1) -> 'a', '{\"a\":1}'::jsonb ->> 'a'",
    "SELECT coalesce(a, 0), nullif(b, 1), greatest(c, d), CASE WHEN e THEN 1 ELSE 2 END FROM t",
    "SELECT x::int, CAST(y AS text) FROM t",
    "SELECT pg_catalog.lower(name) FROM t",
    "SELECT current_user, current_timestamp, session_user",
    "SELECT * FROM generate_series(1, 10) g",
    "SELECT pg_is_in_recovery(), inet_server_port()",
    "SELECT a FROM t WHERE b IN (1, 2, 3) AND c IS DISTINCT FROM d AND e SIMILAR TO 'x%'",
    "SELECT string_agg(name, ', ') FROM t GROUP BY k HAVING count(*) > 1",
    "SELECT $1::text",
]

WRITES = [
    "",
    "   ",
    "INSERT INTO t VALUES (1)",
    "UPDATE t SET a = 1",
    "DELETE FROM t",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE",
    "SELECT * FROM t FOR UPDATE",
    "SELECT * FROM t FOR SHARE",
    "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
    "SELECT * FROM t FOR KEY SHARE",
    "SELECT * INTO new_table FROM t",
    "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i",
    "WITH u AS (UPDATE t SET a = 2 RETURNING *) SELECT count(*) FROM u",
    "SELECT nextval('s')",
    "SELECT currval('s')",
    "SELECT setval('s', 5)",
    "SELECT set_config('a.b', 'c', false)",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT pg_notify('c', 'x')",
    "SELECT pg_sleep(1)",
    "SELECT my_function(1)",
    "SELECT public.lower(name) FROM t",
    "SELECT myschema.count(*) FROM t",
    "SELECT * FROM my_table_function()",
    "SELECT a OPERATOR(myschema.===) b FROM t",
    "SELECT a === b FROM t",
    "SELECT txid_current()",
    "SELECT lo_import('/etc/passwd')",
    "SELECT dblink_exec('x', 'DELETE FROM t')",
    "SELECT 1; SELECT 2",
    "SELECT 1; INSERT INTO t VALUES (1)",
    "BEGIN",
    "BEGIN READ ONLY",
    "COMMIT",
    "SET search_path = x",
    "SHOW search_path",
    "EXPLAIN SELECT 1",
    "EXPLAIN ANALYZE DELETE FROM t",
    "DECLARE c CURSOR FOR SELECT 1",
    "COPY t TO STDOUT",
    "CREATE TABLE x AS SELECT 1",
    "LOCK TABLE t",
    "CALL p()",
    "DO $$ BEGIN DELETE FROM t; END $$",
    "PREPARE p AS SELECT 1",
    "EXECUTE p",
    "SELEC 1",
    "SELECT (",
    "SELECT count(*) FROM t WHERE id IN (SELECT nextval('s'))",
    "SELECT * FROM t WHERE a = (WITH d AS (DELETE FROM u RETURNING 1) SELECT 1 FROM d)",
    "SELECT ARRAY(SELECT my_func(x) FROM t)",
    "VALUES (nextval('s'))",
]


@pytest.mark.parametrize("sql", READS)
def test_plain_reads(sql: str) -> None:
    assert is_plain_read(sql) is True


@pytest.mark.parametrize("sql", WRITES)
def test_everything_else_is_a_write(sql: str) -> None:
    assert is_plain_read(sql) is False


def test_long_text_is_not_cached_but_still_classified() -> None:
    long_read = "SELECT " + ", ".join(f"c{i}" for i in range(3000)) + " FROM t"
    long_write = "SELECT " + ", ".join(f"c{i}" for i in range(3000)) + ", nextval('s') FROM t"
    assert len(long_read) > 8192
    assert is_plain_read(long_read) is True
    assert is_plain_read(long_write) is False


def test_cache_is_bounded() -> None:
    from proxy.readonly import _plain as _is_plain_read

    for i in range(5000):
        is_plain_read(f"SELECT {i}")
    info = _is_plain_read.cache_info()
    assert info.maxsize == 4096 and info.currsize <= 4096


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("BEGIN READ ONLY", True),
        ("begin transaction read only", True),
        ("START TRANSACTION READ ONLY", True),
        ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", True),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", True),
        ("SET TRANSACTION READ ONLY", True),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", True),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", True),
        ("BEGIN READ ONLY, READ WRITE", False),  # the last one wins, as in PostgreSQL
        ("BEGIN READ WRITE", False),
        ("BEGIN", False),
        ("START TRANSACTION", False),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE", False),
        ("SET TRANSACTION READ WRITE", False),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", False),
        ("COMMIT", False),
        ("SELECT 1", False),
        ("BEGIN READ ONLY; INSERT INTO t VALUES (1)", False),  # several statements: not recognised
        ("BEGIN; SET TRANSACTION READ ONLY", True),  # a driver's two-statement form
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE; SET TRANSACTION READ ONLY", True),
        ("BEGIN READ WRITE; SET TRANSACTION READ ONLY", False),
        ("BEGIN; SET TRANSACTION READ WRITE", False),
        ("BEGIN; SELECT 1", False),
        ("SELECT 1; SET TRANSACTION READ ONLY", False),
        ("SET default_transaction_read_only = on", False),  # a session setting: see below
        ("BEGIN READ ONLY garbage", False),
        ("", False),
    ],
)
def test_read_only_transaction_starts(sql: str, expected: bool) -> None:
    assert starts_read_only_transaction(sql) is expected


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SET default_transaction_read_only = on", (True, True)),
        ("SET default_transaction_read_only TO true", (True, True)),
        ("set default_transaction_read_only = 'yes'", (True, True)),
        ("SET default_transaction_read_only = 1", (True, True)),
        ("SET SESSION default_transaction_read_only = on", (True, True)),
        ("SET default_transaction_read_only = off", (True, False)),
        ("SET default_transaction_read_only = 0", (True, False)),
        ("SET default_transaction_read_only = 'nonsense'", (True, False)),
        ("SET default_transaction_read_only TO DEFAULT", (True, None)),
        ("RESET default_transaction_read_only", (True, None)),
        ("RESET ALL", (True, None)),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", (True, True)),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE", (True, False)),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", (False, None)),
        ("SET LOCAL default_transaction_read_only = on", (False, None)),
        ("SET default_transaction_read_only = on; SET default_transaction_read_only = off", (True, False)),
        ("SET search_path = x", (False, None)),
        ("SET TRANSACTION READ ONLY", (False, None)),
        ("SELECT 1", (False, None)),
        ("not sql at all", (False, None)),
    ],
)
def test_session_setting(sql: str, expected: tuple[bool, bool | None]) -> None:
    assert session_read_only_setting(sql) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("on", True), ("ON", True), ("true", True), ("t", True), ("tr", True), ("yes", True), ("y", True),
        ("1", True), (" on ", True),
        ("off", False), ("of", False), ("false", False), ("f", False), ("no", False), ("n", False),
        ("0", False),
        ("o", None), ("", None), ("2", None), ("truee", None), ("onn", None), ("maybe", None),
    ],
)  # fmt: skip
def test_bool_setting(text: str, expected: bool | None) -> None:
    assert parse_bool_setting(text) is expected


@pytest.mark.parametrize(
    ("startup", "setting", "expected"),
    [
        (None, None, False),
        ({}, None, False),
        ({"default_transaction_read_only": "on"}, None, True),
        ({"default_transaction_read_only": "off"}, None, False),
        ({"options": "-c default_transaction_read_only=on"}, None, True),
        ({"options": "-cdefault_transaction_read_only=true"}, None, True),
        ({"options": "--default_transaction_read_only=yes"}, None, True),
        ({"options": "--default-transaction-read-only=1"}, None, True),
        ({"options": "-c search_path=x -c default_transaction_read_only=off"}, None, False),
        ({"options": "-c statement_timeout=5"}, None, False),
        ({"default_transaction_read_only": "on"}, "off", False),  # a later SET wins
        ({}, "on", True),
    ],
)
def test_session_default(startup: dict[str, str] | None, setting: str | None, expected: bool) -> None:
    assert default_transaction_read_only(startup, setting) is expected
