"""Which statements may be run again on another server: `proxy.readonly.is_rerunnable_read`."""

from __future__ import annotations

import pytest

from proxy import readonly
from proxy.readonly import is_rerunnable_read

RERUNNABLE = [
    "SELECT 1",
    "select 1;",
    "  SELECT 1 -- a comment\n",
    "/* leading */ SELECT * FROM orders WHERE id = 42",
    "SELECT * FROM public.orders o JOIN customers c ON c.id = o.customer_id ORDER BY o.id LIMIT 10",
    "SELECT count(*), sum(total), avg(total) FROM orders GROUP BY customer_id HAVING count(*) > 1",
    "SELECT row_number() OVER (PARTITION BY a ORDER BY b), rank() OVER w FROM t WINDOW w AS (ORDER BY a)",
    "SELECT now(), current_timestamp, current_date, localtimestamp",
    "SELECT pg_catalog.lower(name), upper(name), length(name) FROM t",
    "SELECT $1::int + $2",
    "SELECT * FROM generate_series(1, 10) AS g(n)",
    "SELECT * FROM unnest(ARRAY[1, 2, 3])",
    "VALUES (1, 'a'), (2, 'b')",
    "TABLE orders",
    "WITH recent AS (SELECT * FROM orders WHERE at > now() - interval '1 day') SELECT count(*) FROM recent",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT n FROM r",
    "SELECT a FROM t WHERE b IN (SELECT b FROM u WHERE c LIKE 'x%')",
    "SELECT EXISTS (SELECT 1 FROM t WHERE id = 1)",
    "SELECT coalesce(a, 0), nullif(b, 0), greatest(a, b), CASE WHEN a > 0 THEN 'p' ELSE 'n' END FROM t",
    "SELECT data->>'name', data #> '{a,b}', data @> '{\"k\": 1}' FROM docs",
    "SELECT to_char(now(), 'YYYY'), date_trunc('day', at), extract(epoch FROM at) FROM t",
    "SELECT current_setting('application_name'), current_user, session_user",
    "SELECT jsonb_build_object('a', 1), json_agg(t) FROM t",
    "SELECT a FROM t UNION SELECT a FROM u EXCEPT SELECT a FROM v",
    "SELECT md5(name), encode(sha256(name::bytea), 'hex') FROM t",
    "SELECT x FROM t WHERE x = ANY($1::int[])",
    "SELECT format('%s-%s', a, b), string_agg(a, ',' ORDER BY a) FROM t",
    "SELECT pg_backend_pid(), version()",
    "SELECT has_table_privilege('t', 'SELECT'), to_regclass('t')",
    "SELECT 1 FROM t OFFSET 5 FETCH FIRST 3 ROWS ONLY",
]

NOT_RERUNNABLE = [
    # writes and other statements
    "INSERT INTO t VALUES (1)",
    "UPDATE t SET a = 1",
    "DELETE FROM t",
    "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE",
    "CREATE TABLE x (a int)",
    "SET search_path = x",
    "BEGIN",
    "COMMIT",
    "COPY t TO STDOUT",
    "EXPLAIN ANALYZE SELECT 1",
    "CALL do_things()",
    "DO $$ BEGIN PERFORM 1; END $$",
    "LOCK TABLE t",
    "DECLARE c CURSOR FOR SELECT 1",
    "FETCH 10 FROM c",
    "LISTEN chan",
    "NOTIFY chan",
    # more than one statement
    "SELECT 1; SELECT 2",
    "SELECT 1; DELETE FROM t",
    # locking clauses
    "SELECT * FROM t FOR UPDATE",
    "SELECT * FROM t WHERE id = 1 FOR NO KEY UPDATE SKIP LOCKED",
    "SELECT * FROM t FOR SHARE",
    "SELECT * FROM t FOR KEY SHARE OF t NOWAIT",
    "SELECT * FROM (SELECT * FROM t FOR UPDATE) s",
    # INTO
    "SELECT * INTO copy FROM t",
    "SELECT * INTO TEMP copy FROM t",
    # data-modifying CTEs
    "WITH gone AS (DELETE FROM t RETURNING *) SELECT count(*) FROM gone",
    "WITH n AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM n",
    "WITH u AS (UPDATE t SET a = a + 1 RETURNING a) SELECT * FROM u",
    "WITH a AS (SELECT 1), b AS (DELETE FROM t RETURNING 1) SELECT * FROM a",
    # volatile or effectful functions
    "SELECT nextval('s')",
    "SELECT setval('s', 10)",
    "SELECT currval('s')",
    "SELECT lastval()",
    "SELECT random()",
    "SELECT gen_random_uuid()",
    "SELECT clock_timestamp()",
    "SELECT pg_sleep(1)",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_try_advisory_xact_lock(1)",
    "SELECT set_config('a.b', 'c', false)",
    "SELECT pg_notify('chan', 'x')",
    "SELECT lo_create(0)",
    "SELECT lo_unlink(1234)",
    "SELECT txid_current()",
    "SELECT pg_current_xact_id()",
    "SELECT pg_terminate_backend(123)",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT query_to_xml('DELETE FROM t RETURNING 1', true, true, '')",
    "SELECT * FROM dblink('host=x', 'DELETE FROM t') AS r(a int)",
    "SELECT a, nextval('s') FROM t",
    "SELECT * FROM t WHERE a > (SELECT nextval('s'))",
    "SELECT * FROM t ORDER BY random()",
    "SELECT * FROM t TABLESAMPLE system(10)",
    "SELECT * FROM t TABLESAMPLE bernoulli(10)",
    # user and extension functions, qualified or not
    "SELECT my_function(1)",
    "SELECT app.total(1)",
    "SELECT public.lower('x')",
    'SELECT "NOW"()',
    "SELECT * FROM my_set_returning_function()",
    # operators outside pg_catalog
    "SELECT a OPERATOR(public.===) b FROM t",
    # not SQL
    "SELEC 1",
    "",
]


@pytest.mark.parametrize("sql", RERUNNABLE)
def test_plain_reads_are_rerunnable(sql: str) -> None:
    assert is_rerunnable_read(sql)


@pytest.mark.parametrize("sql", NOT_RERUNNABLE)
def test_anything_else_is_not(sql: str) -> None:
    assert not is_rerunnable_read(sql)


def test_the_allowlist_holds_immutable_and_stable_built_ins_only() -> None:
    allowed = readonly.ALLOWED_FUNCTIONS
    harmless = {"now", "lower", "count", "row_number", "jsonb_build_object", "to_char", "current_setting"}
    assert harmless <= allowed
    effectful = {"nextval", "setval", "random", "pg_sleep", "set_config", "pg_notify", "txid_current",
                 "pg_current_xact_id", "pg_advisory_lock", "lo_create", "dblink",
                 "clock_timestamp"}  # fmt: skip
    assert not effectful & allowed


def test_answers_are_cached_per_text() -> None:
    readonly._rerunnable.cache_clear()
    sql = "SELECT a FROM t WHERE id = $1"
    assert is_rerunnable_read(sql) and is_rerunnable_read(sql)
    info = readonly._rerunnable.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    assert info.maxsize == readonly.CACHE_SIZE


def test_very_long_texts_are_classified_but_not_cached() -> None:
    readonly._rerunnable.cache_clear()
    sql = "SELECT " + ", ".join(["1"] * (readonly.CACHE_MAX_TEXT // 2))
    assert is_rerunnable_read(sql)
    assert readonly._rerunnable.cache_info().currsize == 0
