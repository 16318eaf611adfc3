"""The data path's byte-level statement checks (proxy.sqlclass): what they let through without a
closer look must really leave session state alone; everything else must be looked at."""

from __future__ import annotations

import pytest

from proxy.protocol import messages as m
from proxy.requests import REQUEST_READ
from proxy.session.scan import _plain_kind, _request_kind
from proxy.sqlclass import (
    empty_query,
    first_keyword,
    has_more_statements,
    lone_select,
    mentions_session_functions,
)


def query(sql: str) -> bytes:
    body = sql.encode() + b"\x00"
    return b"Q" + (len(body) + 4).to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("sql", "plain"),
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;", True),
        ("select 1", True),
        ("SeLeCt\n1 ; \n", True),
        ("SELECT 'a;b'", False),  # a `;` in a literal: looked at closer, not misread
        ("select 1; select 2", False),
        ("select 1 ;;", False),
        ("SELECT a FROM t WHERE b = ';';", False),  # ends in `;`, but another came before
        ("SELECT 1; SELECT 2;", False),
        ("SELECT pg_advisory_lock(1)", False),
        ("SELECT PG_TRY_ADVISORY_LOCK(1)", False),
        ("SELECT set_config('app.x', '1', false)", False),
        ("SELECT SET_CONFIG('app.x', '1', false)", False),
        ("SELECT pg_advisory_unlock_all ()", False),
        ("SELECT count(*) FROM t WHERE id IN (1, 2);", True),  # calls: the closer look clears them
        ("SELECT advisory, set_config FROM t", True),  # columns: no call without a parenthesis
        ("selectx", False),
        ("select", False),
        ("/* c */ SELECT 1", False),  # comments first: the regex-based path decides
        ("SET search_path = public", False),
        ("INSERT INTO t VALUES (1)", False),
    ],
)
def test_lone_select(sql: str, plain: bool) -> None:
    assert lone_select(query(sql), 5) is plain


def test_lone_select_reads_a_parse_message_only_up_to_its_query_text() -> None:
    # Parse: name, query, parameter count and OIDs; bytes after the text may look like `;`.
    body = b"stmt\x00select $1\x00" + b"\x00\x01" + (59).to_bytes(4, "big")
    parse = b"P" + (len(body) + 4).to_bytes(4, "big") + body
    assert lone_select(parse, 10)


def test_session_function_and_statement_checks_ignore_case_and_position() -> None:
    assert mentions_session_functions(query("select x from t where pg_Advisory_Xact_Lock(1)"), 5)
    assert not mentions_session_functions(query("select advisor from t"), 5)
    assert has_more_statements(query("select 1;  update t set a = 1"), 5)
    assert not has_more_statements(query("select 1;  "), 5)


@pytest.mark.parametrize(
    ("sql", "more"),
    [
        ("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7;", False),  # one, ending
        ("update t set a = 1", False),  # none
        ("select 1;select 2", True),
        ("select 1; select 2;", True),
        ("select ';'", True),  # a `;` inside a literal: looked at, and taken as more (the safe side)
        ("select 1;\n  ", False),  # only blanks after it
    ],
)
def test_more_statements_decided_without_the_regex_where_it_can_be(sql: str, more: bool) -> None:
    assert has_more_statements(query(sql), 5) is more
    assert has_more_statements(memoryview(query(sql)), 5) is more
    assert has_more_statements(sql.encode()) is more  # a bare text, not NUL-terminated


def test_session_functions_need_a_call() -> None:
    # No parenthesis anywhere: nothing can be called.
    assert not mentions_session_functions(query("update t set advisory = 1 where set_config = 2"), 5)
    assert mentions_session_functions(query("SELECT SET_CONFIG('a.b', 'c', false)"), 5)
    assert mentions_session_functions(memoryview(query("select pg_advisory_lock(1)")), 5)
    # A `(` only in the message header (length 40) still gets the full, correct look.
    sql = "select advisor_name from teams where x=1"
    message = query(sql[: 40 - 5])
    assert message[1:5] == (40).to_bytes(4, "big") and 0x28 in message[:5]
    assert not mentions_session_functions(message, 5)


@pytest.mark.parametrize(
    ("text", "empty"),
    [(";", True), ("  ;; \n", True), ("", True), ("insert into t values (1)", False), (" ;x", False)],
)
def test_an_empty_query_is_known_as_one(text: str, empty: bool) -> None:
    """SQLAlchemy's psycopg dialect pings with ";": a request that may be run again (a read) when
    its server is lost in flight, as PostgreSQL answers it EmptyQueryResponse and does nothing."""
    msg = m.query(text)
    assert empty_query(msg, 5) is empty
    assert (_plain_kind(msg, 5) == REQUEST_READ) is empty
    assert (_request_kind(first_keyword(msg, 5), memoryview(msg), 5) == REQUEST_READ) is empty
