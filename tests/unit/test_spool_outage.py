"""OutageResponder fed the exact messages psycopg 3 and pg8000 send (captured with a recording relay
in front of PostgreSQL 15), and the simple-protocol sequences of SQLAlchemy 2."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from proxy.protocol import messages as m
from proxy.spool.classify import Classifier
from proxy.spool.frontdoor import FrontDoorCache, split_messages
from proxy.spool.outage import OutageResponder, Reply, Store, Unspoolable

AT = dt.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=dt.UTC)
PARAMS = {
    "server_version": "15.18", "TimeZone": "Etc/UTC", "DateStyle": "ISO, MDY", "client_encoding": "UTF8",
    "IntervalStyle": "postgres", "standard_conforming_strings": "on", "integer_datetimes": "on",
}  # fmt: skip
VERSION_ANSWER = (
    m.row_description(["version"]) + m.data_row(["PostgreSQL 15.18"]) + m.command_complete("SELECT 1")
)

# psycopg 3: conn.execute("insert into spool_t (id, name) values (%s, %s)", (1, "a")) (binary int)
PSYCOPG_INSERT = [
    ("P", b"\x00insert into spool_t (id, name) values ($1, $2)\x00\x00\x02\x00\x00\x00\x15\x00\x00\x00\x00"),
    (
        "B",
        b"\x00\x00\x00\x02\x00\x01\x00\x00\x00\x02\x00\x00\x00\x02\x00\x01\x00\x00\x00\x01a\x00\x01\x00\x00",
    ),
    ("D", b"P\x00"),
    ("E", b"\x00\x00\x00\x00\x00"),
    ("S", b""),
]
# pg8000 (dbapi, autocommit off): begin transaction (simple), then the INSERT and commit, each
# Parse/Flush/Sync, Describe S/Flush/Sync, Bind/Flush/Execute/Flush/Sync.
PG8000_TX = [
    ("Q", b"begin transaction\x00"),
    ("P", b"\x00insert into spool_t (id, name, at) values ($1, $2, $3)\x00\x00\x00"),
    ("H", b""), ("S", b""), ("D", b"S\x00"), ("H", b""), ("S", b""),
    ("B", b"\x00\x00\x00\x00\x00\x03\x00\x00\x00\x0210\x00\x00\x00\x01j"
          b"\x00\x00\x00\x192020-01-01T00:00:00+00:00\x00\x00"),
    ("H", b""), ("E", b"\x00\x00\x00\x00\x00"), ("H", b""), ("S", b""),
    ("P", b"\x00commit\x00\x00\x00"), ("H", b""), ("S", b""), ("D", b"S\x00"), ("H", b""), ("S", b""),
    ("B", b"\x00\x00\x00\x00\x00\x00\x00\x00"), ("H", b""), ("E", b"\x00\x00\x00\x00\x00"),
    ("H", b""), ("S", b""),
]  # fmt: skip


def decode(data: bytes) -> list[tuple[str, bytes]]:
    return [(chr(t), raw[5:]) for t, raw in split_messages(data)]


class Session:
    """Drives a responder like the integrator does: Store verdicts are stored at once."""

    def __init__(self, tables: list[str] | None = None, settings: dict[str, str] | None = None) -> None:
        self.frontdoor = FrontDoorCache()
        self.frontdoor.record_parameters("app", "appdb", PARAMS)
        self.frontdoor.store_answer("app", "appdb", "select pg_catalog.version()", VERSION_ANSWER)
        ids = itertools.count(1)
        self.responder = OutageResponder(
            self.frontdoor, Classifier(tables), "app", "appdb", settings or {"application_name": "t"},
            clock=lambda: AT, new_id=lambda: f"r{next(ids)}",
        )  # fmt: skip
        self.records: list = []  # type: ignore[type-arg]
        self.refusals: list[str] = []

    def send(self, messages: list[tuple[str, bytes]], refuse: bool = True) -> list[tuple[str, bytes]]:
        out = b""
        for type_char, body in messages:
            out += self._settle(self.responder.feed(ord(type_char), body), refuse)
        return decode(out)

    def _settle(self, reply: Reply, refuse: bool) -> bytes:
        out = reply.data
        while reply.verdict is not None:
            if isinstance(reply.verdict, Store):
                self.records.append(reply.verdict.record)
                reply = self.responder.stored()
                out += reply.data
            else:
                assert isinstance(reply.verdict, Unspoolable)
                self.refusals.append(reply.verdict.reason)
                return out + self.responder.refuse(reply.verdict.reason)
        return out

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        return self.send([("Q", sql.encode() + b"\x00")])


def tags(replies: list[tuple[str, bytes]]) -> list[str]:
    out = []
    for t, body in replies:
        if t == "C":
            out.append(body[:-1].decode())
        elif t == "Z":
            out.append("Z" + body.decode())
        elif t == "E":
            out.append("E" + m.decode_error_fields(body)["C"])
        else:
            out.append(t)
    return out


def test_psycopg_autocommit_insert_extended() -> None:
    s = Session()
    assert tags(s.send(PSYCOPG_INSERT)) == ["1", "2", "n", "INSERT 0 1", "ZI"]
    (record,) = s.records
    assert record.id == "r1" and record.user == "app" and record.database == "appdb"
    assert record.created_at == AT.timestamp()
    (stmt,) = record.statements
    assert stmt.sql == "insert into spool_t (id, name) values ($1, $2)"
    assert stmt.param_oids == (21, 0) and stmt.param_formats == (1, 0)
    assert stmt.values == (b"\x00\x01", b"a") and stmt.tag == "INSERT 0 1"
    assert record.settings["application_name"] == "t"
    assert record.settings["TimeZone"] == "Etc/UTC" and record.settings["DateStyle"] == "ISO, MDY"


def test_psycopg_explicit_transaction_and_prepared_statement() -> None:
    s = Session()
    assert tags(s.query("BEGIN")) == ["BEGIN", "ZT"]
    assert tags(s.send(PSYCOPG_INSERT)) == ["1", "2", "n", "INSERT 0 1", "ZT"]
    named = [("P", PSYCOPG_INSERT[0][1].replace(b"\x00insert", b"_pg3_0\x00insert", 1)),
             ("B", b"\x00_pg3_0" + PSYCOPG_INSERT[1][1][1:]), ("D", b"P\x00"), ("E", b"\x00\x00\x00\x00\x00"),
             ("B", b"\x00_pg3_0" + PSYCOPG_INSERT[1][1][1:]), ("D", b"P\x00"), ("E", b"\x00\x00\x00\x00\x00"),
             ("S", b""), ("H", b"")]  # fmt: skip
    assert tags(s.send(named)) == ["1", "2", "n", "INSERT 0 1", "2", "n", "INSERT 0 1", "ZT"]
    assert s.records == []
    assert tags(s.query("COMMIT")) == ["COMMIT", "ZI"]
    (record,) = s.records
    assert len(record.statements) == 3
    # The named statement survives the transaction; re-Parse of the same name is an error.
    assert tags(s.send(named[1:])) == ["2", "n", "INSERT 0 1", "2", "n", "INSERT 0 1", "ZI"]
    assert len(s.records) == 2 and len(s.records[1].statements) == 2
    assert tags(s.send([named[0], ("S", b"")])) == ["E42P05", "ZI"]


def test_pipeline_is_one_implicit_transaction() -> None:
    s = Session()
    batch = PSYCOPG_INSERT[:4] + PSYCOPG_INSERT[:4] + [("S", b""), ("H", b"")]
    assert tags(s.send(batch)) == ["1", "2", "n", "INSERT 0 1"] * 2 + ["ZI"]
    (record,) = s.records
    assert len(record.statements) == 2


def test_pg8000_transaction() -> None:
    s = Session()
    replies = s.send(PG8000_TX)
    assert tags(replies) == ["BEGIN", "ZT", "1", "ZT", "t", "n", "ZT", "2", "INSERT 0 1", "ZT",
                             "1", "ZT", "t", "n", "ZT", "2", "COMMIT", "ZI"]  # fmt: skip
    # Describe statement: 3 parameters of unknown type (0), as given in Parse.
    t_body = next(body for t, body in replies if t == "t")
    assert t_body == b"\x00\x03" + b"\x00\x00\x00\x00" * 3
    (record,) = s.records
    (stmt,) = record.statements
    assert stmt.values == (b"10", b"j", b"2020-01-01T00:00:00+00:00")
    assert stmt.param_formats == (0, 0, 0) and stmt.param_oids == ()


def test_simple_protocol_sqlalchemy_style() -> None:
    s = Session()
    init = s.query("BEGIN") + s.query("select pg_catalog.version()") + s.query('SAVEPOINT "_pg3_1"')
    init += s.query('RELEASE "_pg3_1"') + s.query("ROLLBACK")
    assert tags(init) == ["BEGIN", "ZT", "T", "D", "SELECT 1", "ZT", "SAVEPOINT", "ZT", "RELEASE", "ZT",
                          "ROLLBACK", "ZI"]  # fmt: skip
    assert tags(s.query(";")) == ["I", "ZI"]  # pool_pre_ping
    assert s.records == []


def test_multi_statement_query_and_now_pinned() -> None:
    s = Session()
    replies = s.query("BEGIN; insert into t values (now()); insert into t values (1), (2); COMMIT")
    assert tags(replies) == ["BEGIN", "INSERT 0 1", "INSERT 0 2", "COMMIT", "ZI"]
    (record,) = s.records
    assert "2026-11-23 10:00:00.123456+00" in record.statements[0].sql
    assert [st.tag for st in record.statements] == ["INSERT 0 1", "INSERT 0 2"]
    # Without BEGIN: one implicit transaction, one record.
    assert tags(s.query("insert into t values (1); insert into t values (2)")) == [
        "INSERT 0 1",
        "INSERT 0 1",
        "ZI",
    ]
    assert len(s.records) == 2 and len(s.records[1].statements) == 2


def test_autocommit_insert_answer_waits_for_the_store() -> None:
    s = Session()
    reply = s.responder.feed(m.F_QUERY, b"insert into t values (1)\x00")
    assert reply.data == b"" and isinstance(reply.verdict, Store)
    with pytest.raises(RuntimeError):
        s.responder.feed(m.F_QUERY, b"select 1\x00")
    assert tags(decode(s.responder.stored().data)) == ["INSERT 0 1", "ZI"]


def test_store_failure_reports_not_committed() -> None:
    s = Session()
    s.query("BEGIN")
    s.query("insert into t values (1)")
    reply = s.responder.feed(m.F_QUERY, b"COMMIT\x00")
    assert isinstance(reply.verdict, Store)
    replies = decode(s.responder.store_failed("disk full"))
    assert tags(replies) == ["E57P03", "ZI"]
    assert "disk full" in m.decode_error_fields(replies[0][1])["M"]
    assert s.responder.pending == [] and not s.responder.in_transaction


def test_unspoolable_in_transaction_aborts_it() -> None:
    s = Session()
    s.query("BEGIN")
    s.query("insert into t values (1)")
    replies = s.query("select * from t")
    assert tags(replies) == ["E57P03", "ZE"]
    assert s.refusals == ["SELECT is not a simple INSERT"]
    assert "SELECT is not a simple INSERT" in m.decode_error_fields(replies[0][1])["M"]
    assert tags(s.query("insert into t values (2)")) == ["E25P02", "ZE"]
    assert tags(s.query("COMMIT")) == ["ROLLBACK", "ZI"]  # as PostgreSQL does
    assert s.records == []


def test_unspoolable_outside_transaction() -> None:
    s = Session()
    assert tags(s.query("update t set a = 1")) == ["E57P03", "ZI"]
    assert tags(s.query("insert into t values (1); select 1")) == ["INSERT 0 1", "E57P03", "ZI"]
    assert s.records == []


def test_unspoolable_in_extended_batch_skips_to_sync() -> None:
    s = Session()
    select = [("P", b"\x00select * from t where a = $1\x00\x00\x00"),
              ("B", b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00"), ("D", b"P\x00"),
              ("E", b"\x00\x00\x00\x00\x00")]  # fmt: skip
    assert tags(s.send(select + PSYCOPG_INSERT)) == ["1", "2", "E57P03", "ZI"]
    assert s.records == []
    assert tags(s.send(PSYCOPG_INSERT)) == ["1", "2", "n", "INSERT 0 1", "ZI"]  # usable afterwards


def test_savepoint_rollback_to_drops_later_inserts() -> None:
    s = Session()
    s.query("BEGIN")
    s.query("insert into t values (1)")
    s.query("SAVEPOINT a")
    s.query("insert into t values (2)")
    assert tags(s.query("ROLLBACK TO SAVEPOINT a")) == ["ROLLBACK", "ZT"]
    s.query("insert into t values (3)")
    s.query("COMMIT")
    (record,) = s.records
    assert [st.sql for st in record.statements] == ["insert into t values (1)", "insert into t values (3)"]


def test_set_goes_into_the_record_and_set_local_is_undone() -> None:
    s = Session()
    assert tags(s.query("SET TIME ZONE 'Europe/Paris'")) == ["SET", "ZI"]
    s.query("BEGIN")
    s.query("SET LOCAL search_path = app, public")
    s.query("insert into t values (1)")
    s.query("COMMIT")
    s.query("insert into t values (2)")
    first, second = s.records
    assert first.settings["TimeZone"] == "Europe/Paris" and first.settings["search_path"] == "app, public"
    assert second.settings["TimeZone"] == "Europe/Paris" and "search_path" not in second.settings
    assert tags(s.query("SET work_mem = '1MB'")) == ["E57P03", "ZI"]


def test_table_filter_and_read_only() -> None:
    s = Session(tables=["orders"])
    assert tags(s.query("insert into t values (1)")) == ["E57P03", "ZI"]
    assert s.refusals == ["table t is not in spool.tables"]
    s.query("BEGIN READ ONLY")
    assert tags(s.query("insert into orders values (1)")) == ["E25006", "ZE"]


def test_syntax_error_is_answered_at_once() -> None:
    s = Session()
    assert tags(s.query("selec 1")) == ["E42601", "ZI"]
    assert tags(s.send([("P", b"\x00selec 1\x00\x00\x00"), ("B", b"\x00\x00\x00\x00\x00\x00\x00\x00"),
                        ("S", b"")])) == ["E42601", "ZI"]  # fmt: skip
    assert s.refusals == []


def test_close_and_missing_statement() -> None:
    s = Session()
    s.send(PSYCOPG_INSERT)
    assert tags(s.send([("C", b"S\x00"), ("S", b"")])) == ["3", "ZI"]
    assert tags(s.send([("B", PSYCOPG_INSERT[1][1]), ("S", b"")])) == ["E26000", "ZI"]


def test_startup_settings_and_options() -> None:
    s = Session(settings={"TimeZone": "Asia/Tokyo", "options": "-c search_path=app -c datestyle=German"})
    s.query("insert into t values (1)")
    (record,) = s.records
    assert record.settings["TimeZone"] == "Asia/Tokyo"
    assert record.settings["search_path"] == "app" and record.settings["DateStyle"] == "German"


def test_deallocate_and_discard_all() -> None:
    # SQLAlchemy's psycopg dialect sends DEALLOCATE ALL when a connection returns to the pool.
    s = Session()
    named = [("P", PSYCOPG_INSERT[0][1].replace(b"\x00insert", b"st\x00insert", 1)), ("S", b"")]
    assert tags(s.send(named)) == ["1", "ZI"]
    assert tags(s.query("DEALLOCATE ALL")) == ["DEALLOCATE ALL", "ZI"]
    assert tags(s.send(named)) == ["1", "ZI"]  # the name is free again
    assert tags(s.query("DEALLOCATE st")) == ["DEALLOCATE", "ZI"]
    assert tags(s.query("DEALLOCATE st")) == ["E26000", "ZI"]
    s.query("SET TIME ZONE 'Europe/Paris'")
    assert tags(s.query("DISCARD ALL")) == ["DISCARD ALL", "ZI"]
    s.query("insert into t values (1)")
    assert s.records[0].settings["TimeZone"] == "Etc/UTC"


# ---------------------------------------------------------------- text PostgreSQL reads otherwise

WIPE = b"INSERT INTO t(v) VALUES ('x1\\', ' || wipe()) -- ')"


def test_backslash_under_standard_conforming_strings_off_is_refused() -> None:
    s = Session()
    assert tags(s.query("SET standard_conforming_strings = off")) == ["SET", "ZI"]
    assert tags(s.send([("Q", WIPE + b"\x00")])) == ["E57P03", "ZI"]
    assert "standard_conforming_strings" in s.refusals[-1]
    # Extended protocol: Parse is answered, the statement refused at Describe/Execute.
    parse = ("P", b"\x00" + WIPE + b"\x00\x00\x00")
    bind = ("B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
    assert tags(s.send([parse, bind, ("D", b"P\x00"), ("E", b"\x00\x00\x00\x00\x00"), ("S", b"")])) == [
        "1", "2", "E57P03", "ZI"
    ]  # fmt: skip
    # Text without a backslash reads the same under both values; parameters are not SQL text.
    assert tags(s.query("insert into t values ('plain')")) == ["INSERT 0 1", "ZI"]
    assert tags(s.send(PSYCOPG_INSERT)) == ["1", "2", "n", "INSERT 0 1", "ZI"]
    assert len(s.records) == 2 and all(b"\\" not in r.statements[0].sql.encode() for r in s.records)
    # Back to on: the same text is read as pglast reads it, and spooled.
    s.query("SET standard_conforming_strings = on")
    assert tags(s.send([("Q", WIPE + b"\x00")])) == ["INSERT 0 1", "ZI"]


def test_the_setting_in_force_when_the_query_arrives_counts() -> None:
    # PostgreSQL parses a whole Query string before running the SET in it.
    s = Session()
    sql = b"SET standard_conforming_strings = off; " + WIPE + b"\x00"
    assert tags(s.send([("Q", sql)])) == ["SET", "INSERT 0 1", "ZI"]
    assert tags(s.send([("Q", WIPE + b"\x00")])) == ["E57P03", "ZI"]


def test_standard_conforming_strings_off_from_options_or_the_server() -> None:
    s = Session(settings={"options": "-c standard_conforming_strings=off"})
    assert tags(s.send([("Q", WIPE + b"\x00")])) == ["E57P03", "ZI"]
    s = Session(settings={"standard_conforming_strings": "off"})  # captured before the outage
    assert tags(s.send([("Q", WIPE + b"\x00")])) == ["E57P03", "ZI"]
    assert s.records == []


def test_non_utf8_client_encoding_takes_ascii_text_only() -> None:
    s = Session(settings={"client_encoding": "SJIS"})
    # 0x95 0x5C is one SJIS character whose second byte is a backslash.
    assert tags(s.send([("Q", b"insert into t values ('\x95\\', 1)\x00")])) == ["E57P03", "ZI"]
    assert "client_encoding" in s.refusals[-1]
    assert tags(s.query("insert into t values ('ascii')")) == ["INSERT 0 1", "ZI"]
    assert s.records[0].settings["client_encoding"] == "SJIS"


def test_session_set_before_options_and_unreplayable_role() -> None:
    # options first, then the startup parameters and what the session SET: the last one wins.
    s = Session(settings={"options": "-c DateStyle=German", "datestyle": "ISO, DMY"})
    s.query("insert into t values (1)")
    assert s.records[0].settings["DateStyle"] == "ISO, DMY"
    s = Session(settings={"session_replication_role": "replica"})
    assert tags(s.query("insert into t values (1)")) == ["E57P03", "ZI"]
    assert "session_replication_role" in s.refusals[-1]
