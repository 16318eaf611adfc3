"""Spool classification: what may be acknowledged without a database, and the pinned clock."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from pglast import parse_sql
from pglast.ast import A_Const, InsertStmt, SelectStmt, String

from proxy.spool import SpoolRecord
from proxy.spool.classify import (
    Classifier,
    Column,
    Kind,
    Statement,
    classify_sql,
    insert_target,
    pg_bool,
    pin_clock,
    pin_defaults,
    pinned_default,
    pinned_literal,
    text_refusal,
)
from proxy.spool.replay import acknowledged_at

AT = dt.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=dt.UTC)


def one(sql: str, tables: list[str] | None = None) -> Statement:
    (stmt,) = classify_sql(sql, tables).statements
    return stmt


@pytest.mark.parametrize(
    ("sql", "tag", "params"),
    [
        ("INSERT INTO t VALUES (1, 'a')", "INSERT 0 1", 0),
        ("insert into t (a, b) values ($1, $2)", "INSERT 0 1", 2),
        ("insert into public.t (a, b) values ($1::int, CAST($2 AS text))", "INSERT 0 1", 2),
        ("insert into t values (1, DEFAULT), (-2, NULL), ($3, 'x'::text)", "INSERT 0 3", 3),
        ("insert into t values (1) on conflict do nothing", "INSERT 0 1", 0),
        ("insert into t (a) values ($1) on conflict (a) do nothing", "INSERT 0 1", 1),
        ("insert into t default values", "INSERT 0 1", 0),
        ("insert into t values (ARRAY[1, $1], '{1,2}'::int[], -$2)", "INSERT 0 1", 2),
        ("insert into t values (now(), current_timestamp, localtimestamp, current_date)", "INSERT 0 1", 0),
        (
            "insert into t values (CURRENT_TIMESTAMP(3), transaction_timestamp(), pg_catalog.now())",
            "INSERT 0 1",
            0,
        ),
    ],
)
def test_spoolable_inserts(sql: str, tag: str, params: int) -> None:
    stmt = one(sql)
    assert stmt.kind is Kind.INSERT and stmt.spoolable
    assert stmt.tag == tag
    assert stmt.param_count == params


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT 1", "SELECT is not a simple INSERT"),
        ("update t set a = 1", "UPDATE is not a simple INSERT"),
        ("delete from t", "DELETE is not a simple INSERT"),
        ("insert into t values (random())", "function random() is not allowed in a spooled INSERT"),
        ("insert into t values (nextval('s'))", "function nextval() is not allowed in a spooled INSERT"),
        ("insert into t values (clock_timestamp())", "function clock_timestamp() is not allowed"),
        ("insert into t values (1) returning a", "RETURNING needs the database"),
        ("insert into t values ((select 1))", "a subquery needs the database"),
        ("insert into t select 1", "INSERT ... SELECT needs the database"),
        (
            "insert into t values (1) on conflict (a) do update set a = 2",
            "ON CONFLICT DO UPDATE needs the database",
        ),
        ("with x as (select 1) insert into t values (1)", "WITH needs the database"),
        ("insert into t values (1 + 1)", "an expression is not allowed"),
        ("insert into t values (current_user)", "current_user is not allowed"),
        ("set work_mem = '1MB'", "SET work_mem needs the database"),
        ("show server_version", "SHOW is not a simple INSERT"),
        ("prepare transaction 'x'", "two-phase commit needs the database"),
        ("copy t from stdin", "COPY is not a simple INSERT"),
    ],
)
def test_refused_with_reason(sql: str, reason: str) -> None:
    stmt = one(sql)
    assert stmt.kind is Kind.REFUSED and not stmt.spoolable
    assert reason in stmt.reason


def test_tables_filter_qualified_and_unqualified() -> None:
    tables = ["public.orders", "events"]
    assert one("insert into orders values (1)", tables).spoolable
    assert one("insert into public.orders values (1)", tables).spoolable
    assert one("insert into PUBLIC.Orders values (1)", tables).spoolable
    assert one("insert into events values (1)", tables).spoolable
    assert one("insert into audit.events values (1)", tables).spoolable  # unqualified entry: any schema
    other = one("insert into other.orders values (1)", tables)
    assert other.reason == "table other.orders is not in spool.tables"
    assert one("insert into x values (1)", tables).reason == "table x is not in spool.tables"
    assert one("insert into x values (1)", None).spoolable


@pytest.mark.parametrize(
    ("sql", "kind", "tag"),
    [
        ("BEGIN", Kind.BEGIN, "BEGIN"),
        ("begin isolation level serializable", Kind.BEGIN, "BEGIN"),
        ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ", Kind.BEGIN, "START TRANSACTION"),
        ("begin transaction", Kind.BEGIN, "BEGIN"),
        ("COMMIT", Kind.COMMIT, "COMMIT"),
        ("end", Kind.COMMIT, "COMMIT"),
        ("ROLLBACK", Kind.ROLLBACK, "ROLLBACK"),
        ("abort", Kind.ROLLBACK, "ROLLBACK"),
        ('SAVEPOINT "_pg3_1"', Kind.SAVEPOINT, "SAVEPOINT"),
        ('RELEASE "_pg3_1"', Kind.RELEASE, "RELEASE"),
        ("rollback to savepoint a", Kind.ROLLBACK_TO, "ROLLBACK"),
        ("set transaction isolation level serializable", Kind.SET, "SET"),
        (";", Kind.EMPTY, ""),
        ("  -- only a comment", Kind.EMPTY, ""),
    ],
)
def test_transaction_control(sql: str, kind: Kind, tag: str) -> None:
    stmt = one(sql)
    assert stmt.kind is kind and stmt.tag == tag


def test_read_only_begin() -> None:
    assert one("begin read only").read_only
    assert not one("begin read write").read_only


def test_set_statements() -> None:
    tz = one("SET TIME ZONE 'Europe/Paris'")
    assert (tz.kind, tz.name, tz.value, tz.tag) == (Kind.SET, "TimeZone", "Europe/Paris", "SET")
    sp = one('set search_path = "MySchema", public')
    assert (sp.name, sp.value) == ("search_path", '"MySchema", public')
    ds = one("set local datestyle to iso, mdy")
    assert (ds.name, ds.value, ds.local) == ("DateStyle", "iso, mdy", True)
    reset = one("reset timezone")
    assert (reset.name, reset.value, reset.tag) == ("TimeZone", None, "RESET")
    assert one("set application_name = 'x'").value == "x"
    assert one("reset all").kind is Kind.REFUSED


def test_multi_statement_split() -> None:
    sql = "BEGIN; insert into t values ('a;b', 'é'); ; INSERT INTO t VALUES (2), (3); COMMIT"
    kinds = [(s.kind, s.sql, s.tag) for s in classify_sql(sql).statements]
    assert kinds == [
        (Kind.BEGIN, "BEGIN", "BEGIN"),
        (Kind.INSERT, "insert into t values ('a;b', 'é')", "INSERT 0 1"),
        (Kind.INSERT, "INSERT INTO t VALUES (2), (3)", "INSERT 0 2"),
        (Kind.COMMIT, "COMMIT", "COMMIT"),
    ]
    mixed = classify_sql("insert into t values (1); select 1")
    refused = mixed.refused
    assert refused is not None and refused.reason == "SELECT is not a simple INSERT"


def test_syntax_error() -> None:
    stmt = one("insert into t valuez (1)")
    assert stmt.kind is Kind.SYNTAX_ERROR
    assert 'syntax error at or near "valuez"' in stmt.reason


def test_unpinned_sql_is_kept_verbatim() -> None:
    sql = "insert   into t (a)\n values ($1)"
    stmt = one(sql)
    assert not stmt.needs_pin and stmt.sql_at(AT) == sql


def test_pinned_clock() -> None:
    assert pinned_literal(AT) == "2026-11-23 10:00:00.123456+00"
    stmt = one(
        "insert into t (a, b, c, d, e) values ($1, now(), localtimestamp, current_date, CURRENT_TIMESTAMP(2))"
    )
    assert stmt.needs_pin
    sql = stmt.sql_at(AT.astimezone(dt.timezone(dt.timedelta(hours=5))))  # any zone: same instant
    lit = "'2026-11-23 10:00:00.123456+00'"
    assert sql == (
        f"INSERT INTO t (a, b, c, d, e) VALUES ($1, CAST({lit} AS timestamp with time zone), "
        f"CAST(CAST({lit} AS timestamp with time zone) AS timestamp), "
        f"CAST(CAST({lit} AS timestamp with time zone) AS pg_catalog.date), "
        f"CAST({lit} AS timestamp(2) with time zone))"
    )
    # The pinned text is itself spoolable, with no clock left to pin.
    again = one(sql)
    assert again.spoolable and not again.needs_pin
    with pytest.raises(ValueError):
        pinned_literal(dt.datetime(2026, 1, 1))  # naive


def test_pin_inside_casts_and_arrays() -> None:
    sql = pin_clock("insert into t values (now()::date, ARRAY[now()])", AT)
    assert "now" not in sql.lower()
    assert sql.count("2026-11-23 10:00:00.123456+00") == 2


def test_cache_returns_same_object_and_is_bounded() -> None:
    classifier = Classifier(None, cache_size=2)
    first = classifier.classify("insert into t values (1)")
    assert classifier.classify("insert into t values (1)") is first
    classifier.classify("select 1")
    classifier.classify("select 2")
    assert classifier.classify("insert into t values (1)") is not first  # evicted, re-parsed


# ---------------------------------------------------------------- text PostgreSQL reads otherwise

ON = {"standard_conforming_strings": "on", "client_encoding": "UTF8"}
OFF = {"standard_conforming_strings": "off", "client_encoding": "UTF8"}
WIPE = "INSERT INTO t(v) VALUES ('x1\\', ' || wipe()) -- ')"


@pytest.mark.parametrize(
    ("sql", "settings", "backslash_quote", "refused"),
    [
        (WIPE, ON, None, None),  # read as PostgreSQL reads it under on: two constants
        (WIPE, OFF, None, "backslash"),
        (WIPE, {"standard_conforming_strings": "false"}, None, "backslash"),
        (WIPE, {"standard_conforming_strings": "of"}, None, "backslash"),  # a prefix of off
        (WIPE, {"standard_conforming_strings": "bogus"}, None, "backslash"),  # unreadable: cautious
        ("INSERT INTO t VALUES (E'a\\\\b')", OFF, None, "backslash"),
        ("INSERT INTO t VALUES ('plain', $1)", OFF, None, None),
        ("INSERT INTO t VALUES (U&'d\\0061t')", ON, None, None),
        ("INSERT INTO t VALUES (U&'dat')", OFF, None, "U&"),
        ("INSERT INTO t VALUES ('été')", {"client_encoding": "LATIN1"}, None, "client_encoding LATIN1"),
        ("INSERT INTO t VALUES ('ete')", {"client_encoding": "SJIS"}, None, None),
        ("INSERT INTO t VALUES ('été')", {"client_encoding": "utf-8"}, None, None),
        ("INSERT INTO t VALUES (E'\\'')", ON, "off", "backslash_quote"),
        ("INSERT INTO t VALUES (E'\\'')", ON, None, None),
        ("INSERT INTO t VALUES (E'\\'')", {"client_encoding": "SJIS"}, "safe_encoding", "backslash_quote"),
        ("INSERT INTO t VALUES (E'\\'')", {"client_encoding": "SJIS"}, "on", None),
    ],
)
def test_text_refusal(
    sql: str, settings: dict[str, str], backslash_quote: str | None, refused: str | None
) -> None:
    reason = text_refusal(sql, settings, backslash_quote)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason
    assert text_refusal(sql.encode("utf-8"), settings, backslash_quote) == reason


def test_pg_bool() -> None:
    assert all(pg_bool(v, False) for v in ("on", "ON", "true", "t", "tr", "yes", "y", "1", "'on'"))
    assert not any(pg_bool(v, True) for v in ("off", "of", "false", "f", "no", "n", "0", "", "o", "junk"))
    assert pg_bool(None, True) and not pg_bool(None, False)


# ---------------------------------------------------------------- clock defaults, pinned at replay

COLUMNS = [
    Column("n", "nextval('t_n_seq'::regclass)"),
    Column("id", None),
    Column("at", None),
    Column("Created At", "now()"),
    Column("day", "CURRENT_DATE"),
    Column("later", "(now() + '01:00:00'::interval)"),
    Column("g", "now()", generated=True),
]
PINNED_TEXT = "2026-11-23 10:00:00.123456+00"
PINNED = f"CAST('{PINNED_TEXT}' AS timestamp with time zone)"


def test_pin_defaults_adds_omitted_clock_columns() -> None:
    out = pin_defaults("INSERT INTO s.t (id, at) VALUES ($1, now())", COLUMNS, AT)
    assert out == (
        f'INSERT INTO s.t (id, at, "Created At", day, later) VALUES ($1, now(), {PINNED}, '
        f"CAST({PINNED} AS pg_catalog.date), {PINNED} + CAST('01:00:00' AS interval))"
    )


def test_pin_defaults_positional_keyword_and_default_values() -> None:
    positional = pin_defaults("INSERT INTO t VALUES (DEFAULT, 1, 2), (3, 4, 5)", COLUMNS, AT)
    assert positional.startswith(
        'INSERT INTO t (n, id, at, "Created At", day, later) VALUES (DEFAULT, 1, 2, '
    )
    keyword = pin_defaults("""INSERT INTO t (id, "Created At") VALUES (1, DEFAULT), (2, '2020-01-01')""",
                           COLUMNS[:4], AT)  # fmt: skip
    assert keyword == f"""INSERT INTO t (id, "Created At") VALUES (1, {PINNED}), (2, '2020-01-01')"""
    assert pin_defaults("INSERT INTO t DEFAULT VALUES", COLUMNS[:4], AT) == (
        f'INSERT INTO t ("Created At") VALUES ({PINNED})'
    )


def test_pin_defaults_leaves_other_statements_verbatim() -> None:
    sql = "insert into t (id, \"Created At\") values (1, '2020-01-01')  -- given"
    assert pin_defaults(sql, COLUMNS[:4], AT) == sql
    assert pin_defaults("insert into t (id) values (1)", COLUMNS[:3], AT) == "insert into t (id) values (1)"
    assert insert_target('insert into "S".t values (1)') == ("S", "t")
    assert pinned_default("nextval('s'::regclass)", AT) is None
    assert pinned_default("clock_timestamp()", AT) is None  # row by row: not a transaction instant


def test_pinned_statement_keeps_backslash_literals_for_standard_conforming_strings_on() -> None:
    # The replay runs with standard_conforming_strings on: the deparsed text must read back as
    # the same constants there (pglast reads as on does).
    sql = "INSERT INTO t (id, v) VALUES (1, 'a\\b\\\\c''d'), (2, E'e\\\\f\\'')"
    out = pin_defaults(sql, COLUMNS[:4], AT)
    assert out != sql and text_refusal(out, ON) is None

    def strings(text: str) -> list[str]:
        stmt = parse_sql(text)[0].stmt
        assert isinstance(stmt, InsertStmt) and isinstance(stmt.selectStmt, SelectStmt)
        return [str(v.val.sval) for row in stmt.selectStmt.valuesLists or () for v in row
                if isinstance(v, A_Const) and isinstance(v.val, String)]  # fmt: skip

    assert strings(sql) == ["a\\b\\\\c'd", "e\\f'"]
    assert strings(out) == strings(sql) and out.count(PINNED) == 2


def test_acknowledgement_instant_survives_the_record_to_the_microsecond() -> None:
    # Records keep it as float seconds (created_at); DEFAULT now() is pinned from that, and
    # must equal what an explicit now() was pinned to.
    rng = random.Random(18)
    for _ in range(20_000):
        instant = dt.datetime(2020, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
            microseconds=rng.randrange(0, 80 * 365 * 86400 * 10**6)  # 2020 to 2100
        )
        record = SpoolRecord("r", instant.timestamp(), "u", "d")
        assert acknowledged_at(SpoolRecord.from_json(record.to_json())) == instant
