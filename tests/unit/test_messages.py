"""The message codec: encode -> decode round trips, exact wire layouts, and malformed input."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parse_sql

from proxy.protocol import messages as m
from proxy.protocol.sqlstate import ProtocolViolation

INT32 = st.integers(-(2**31), 2**31 - 1)
# Text a C string can carry: anything but NUL (and lone surrogates, which UTF-8 cannot encode).
CTEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
FAST = settings(max_examples=80, deadline=None)


def split(wire: bytes, type_byte: bytes) -> bytes:
    """The body of one typed message, after checking its type byte and length field."""
    assert wire[:1] == type_byte
    (length,) = struct.unpack_from("!i", wire, 1)
    assert length == len(wire) - 1, "the length counts itself and the body, not the type byte"
    return wire[5:]


def untyped(packet: bytes) -> bytes:
    (length,) = struct.unpack_from("!i", packet, 0)
    assert length == len(packet)
    return packet[4:]


# --------------------------------------------------------------------------------------------
# Untyped first packets.


@FAST
@given(st.dictionaries(CTEXT.filter(bool), CTEXT, max_size=6))
def test_startup_message_round_trip(params: dict[str, str]) -> None:
    packet = m.decode_startup(untyped(m.startup_message(params)))
    assert packet.code == m.PROTOCOL_3_0
    assert (packet.major, packet.minor) == (3, 0)
    assert packet.params == params
    assert packet.cancel_key is None


def test_startup_message_layout() -> None:
    assert m.startup_message({"user": "bob"}) == (
        b"\x00\x00\x00\x12"  # length 18
        b"\x00\x03\x00\x00"  # protocol 3.0
        b"user\x00bob\x00"
        b"\x00"
    )


def test_startup_with_a_newer_minor_version_keeps_the_version() -> None:
    packet = m.decode_startup(untyped(m.startup_message({"user": "u"}, version=(3 << 16) | 2)))
    assert (packet.major, packet.minor) == (3, 2)
    assert packet.params == {"user": "u"}


def test_startup_with_an_unknown_major_is_not_parsed_further() -> None:
    packet = m.decode_startup(struct.pack("!i", 2 << 16) + b"garbage without terminator")
    assert packet.major == 2
    assert packet.params == {}


@FAST
@given(INT32, INT32)
def test_cancel_request_round_trip(pid: int, secret: int) -> None:
    wire = m.cancel_request(pid, secret)
    assert len(wire) == 16
    packet = m.decode_startup(untyped(wire))
    assert packet.code == m.CANCEL_REQUEST_CODE
    assert packet.cancel_key == (pid, secret)


def test_request_codes_are_the_protocol_constants() -> None:
    # 1234 << 16 | 5678 (cancel), 5679 (SSL), 5680 (GSSAPI encryption).
    assert m.CANCEL_REQUEST_CODE == (1234 << 16) | 5678
    assert m.SSL_REQUEST_CODE == (1234 << 16) | 5679
    assert m.GSSENC_REQUEST_CODE == (1234 << 16) | 5680
    assert m.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert m.cancel_request(7, 9) == b"\x00\x00\x00\x10\x04\xd2\x16\x2e" + b"\x00\x00\x00\x07\x00\x00\x00\x09"
    assert m.decode_startup(untyped(m.ssl_request())).code == m.SSL_REQUEST_CODE
    assert m.decode_startup(struct.pack("!i", m.GSSENC_REQUEST_CODE)).code == m.GSSENC_REQUEST_CODE


# --------------------------------------------------------------------------------------------
# Backend messages.


@FAST
@given(
    st.text("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5),
    CTEXT,
    st.sampled_from(["ERROR", "FATAL", "PANIC"]),
    st.none() | CTEXT.filter(bool),
    st.none() | CTEXT.filter(bool),
)
def test_error_response_round_trip(
    code: str, text: str, severity: str, detail: str | None, hint: str | None
) -> None:
    wire = m.error_response(code, text, severity=severity, detail=detail, hint=hint)
    fields = m.decode_error_fields(split(wire, b"E"))
    expected = {"S": severity, "V": severity, "C": code, "M": text}
    if detail:
        expected["D"] = detail
    if hint:
        expected["H"] = hint
    assert fields == expected
    assert m.error_summary(fields) == f"{code}: {text}"


def test_error_response_layout_matches_the_protocol() -> None:
    # ErrorResponse: 'E', int32 length, then (field code byte, C string)*, then a zero byte.
    assert m.error_response("08P01", "bad", severity="FATAL") == (
        b"E\x00\x00\x00\x1f"  # type, length 31
        b"SFATAL\x00"  # severity (localized)
        b"VFATAL\x00"  # severity (never localized)
        b"C08P01\x00"  # SQLSTATE
        b"Mbad\x00"  # message
        b"\x00"  # end of fields
    )
    assert m.error_response("57P01", "x", detail="d", hint="h") == (
        b"E\x00\x00\x00\x23SERROR\x00VERROR\x00C57P01\x00Mx\x00Dd\x00Hh\x00\x00"
    )


def test_notice_response_uses_type_n() -> None:
    wire = m.error_response("01000", "careful", severity="WARNING", notice=True)
    assert m.decode_error_fields(split(wire, b"N"))["V"] == "WARNING"


def test_negotiate_protocol_version_layout_matches_the_protocol() -> None:
    # NegotiateProtocolVersion: 'v', int32 length, int32 newest minor version supported,
    # int32 number of unrecognised options, then each option name as a C string.
    assert m.negotiate_protocol_version(0, ["_pq_.compression", "_pq_.x"]) == (
        b"v\x00\x00\x00\x24"  # type, length 36
        b"\x00\x00\x00\x00"  # newest minor version supported: 0
        b"\x00\x00\x00\x02"  # two options not recognised
        b"_pq_.compression\x00"
        b"_pq_.x\x00"
    )
    assert m.negotiate_protocol_version(2, []) == b"v\x00\x00\x00\x0c\x00\x00\x00\x02\x00\x00\x00\x00"


@FAST
@given(CTEXT.filter(bool), CTEXT)
def test_parameter_status_round_trip(name: str, value: str) -> None:
    assert m.decode_parameter_status(split(m.parameter_status(name, value), b"S")) == (name, value)


@FAST
@given(INT32, INT32)
def test_backend_key_data_round_trip(pid: int, secret: int) -> None:
    wire = m.backend_key_data(pid, secret)
    assert len(wire) == 13
    assert m.decode_backend_key_data(split(wire, b"K")) == (pid, secret)


@pytest.mark.parametrize(
    ("wire", "code", "payload"),
    [
        (m.auth_ok(), m.AUTH_OK, b""),
        (m.auth_cleartext(), m.AUTH_CLEARTEXT, b""),
        (m.auth_md5(b"\x01\x02\x03\x04"), m.AUTH_MD5, b"\x01\x02\x03\x04"),
        (m.auth_sasl_continue(b"r=abc,s=c2FsdA==,i=4096"), m.AUTH_SASL_CONTINUE, b"r=abc,s=c2FsdA==,i=4096"),
        (m.auth_sasl_final(b"v=sig"), m.AUTH_SASL_FINAL, b"v=sig"),
    ],
    ids=["ok", "cleartext", "md5", "sasl-continue", "sasl-final"],
)
def test_authentication_requests_round_trip(wire: bytes, code: int, payload: bytes) -> None:
    assert m.decode_auth(split(wire, b"R")) == (code, payload)


def test_authentication_codes_and_layout() -> None:
    assert (m.AUTH_OK, m.AUTH_CLEARTEXT, m.AUTH_MD5) == (0, 3, 5)
    assert (m.AUTH_SASL, m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL) == (10, 11, 12)
    assert m.auth_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.auth_md5(b"salt") == b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt"
    # AuthenticationSASL: mechanism names as C strings, the list ended by an empty string.
    assert m.auth_sasl(["SCRAM-SHA-256"]) == b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"


@pytest.mark.parametrize("mechanisms", [["SCRAM-SHA-256"], ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"], []])
def test_sasl_mechanism_list_round_trip(mechanisms: list[str]) -> None:
    code, payload = m.decode_auth(split(m.auth_sasl(mechanisms), b"R"))
    assert code == m.AUTH_SASL
    assert m.decode_sasl_mechanisms(payload) == mechanisms


@FAST
@given(st.lists(st.text("abcXYZ019_- ", min_size=1, max_size=12), max_size=4))
def test_command_complete_and_row_description_round_trip(names: list[str]) -> None:
    assert m.decode_row_description(split(m.row_description(names), b"T")) == names
    tag = " ".join(names) or "SELECT 0"
    assert m.decode_command_complete(split(m.command_complete(tag), b"C")) == tag


def test_row_description_field_layout() -> None:
    body = split(m.row_description(["id"], type_oid=23), b"T")
    # count, then name, table oid, attnum, type oid, typlen, typmod, format (text).
    assert body == b"\x00\x01" + b"id\x00" + struct.pack("!ihihih", 0, 0, 23, -1, -1, 0)


@FAST
@given(st.lists(st.none() | st.binary(max_size=20) | CTEXT, max_size=6))
def test_data_row_round_trip_with_nulls(values: list[str | bytes | None]) -> None:
    decoded = m.decode_data_row(split(m.data_row(values), b"D"))
    assert decoded == [v.encode() if isinstance(v, str) else v for v in values]


def test_data_row_distinguishes_null_from_empty() -> None:
    body = split(m.data_row([None, "", b"x"]), b"D")
    assert body == b"\x00\x03" + b"\xff\xff\xff\xff" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x01x"
    assert m.decode_data_row(body) == [None, b"", b"x"]


@pytest.mark.parametrize("status", [m.TX_IDLE, m.TX_IN_BLOCK, m.TX_FAILED])
def test_ready_for_query_round_trip(status: int) -> None:
    assert m.decode_ready_for_query(split(m.ready_for_query(status), b"Z")) == status
    assert m.decode_ready_for_query(memoryview(split(m.ready_for_query(status), b"Z"))) == status


def test_fixed_messages() -> None:
    assert m.ready_for_query() == b"Z\x00\x00\x00\x05I"
    assert m.empty_query_response() == b"I\x00\x00\x00\x04"
    assert m.sync() == b"S\x00\x00\x00\x04"
    assert m.terminate() == b"X\x00\x00\x00\x04"


# --------------------------------------------------------------------------------------------
# Frontend messages.


@FAST
@given(CTEXT)
def test_password_round_trip(password: str) -> None:
    assert m.decode_password(split(m.password_message(password), b"p")) == password
    assert m.decode_password(split(m.password_message(password.encode()), b"p")) == password


@FAST
@given(st.sampled_from(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]), st.binary(max_size=100))
def test_sasl_initial_response_round_trip(mechanism: str, data: bytes) -> None:
    wire = m.sasl_initial_response(mechanism, data)
    assert m.decode_sasl_initial_response(split(wire, b"p")) == (mechanism, data)


def test_sasl_initial_response_with_no_data() -> None:
    # Length -1 means "no initial response" in SASLInitialResponse.
    body = b"SCRAM-SHA-256\x00" + struct.pack("!i", -1)
    assert m.decode_sasl_initial_response(body) == ("SCRAM-SHA-256", b"")


def test_sasl_response_is_the_raw_data() -> None:
    assert split(m.sasl_response(b"c=biws,r=x,p=y"), b"p") == b"c=biws,r=x,p=y"


@FAST
@given(CTEXT)
def test_query_round_trip(sql: str) -> None:
    assert m.decode_query(split(m.query(sql), b"Q")) == sql


def parse_message(name: str, sql: str, oids: list[int]) -> bytes:
    """A Parse message built by hand from the protocol description ('P' has no encoder here)."""
    body = name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack(f"!h{len(oids)}i", len(oids), *oids)
    return m.message(b"P", body)


@FAST
@given(CTEXT, CTEXT, st.lists(st.integers(0, 2**31 - 1), max_size=5))
def test_parse_decodes_name_query_and_param_oids(name: str, sql: str, oids: list[int]) -> None:
    assert m.decode_parse(split(parse_message(name, sql, oids), b"P")) == m.Parse(name, sql, tuple(oids))


@pytest.mark.parametrize("kind", ["S", "P"])
def test_close_decodes_kind_and_name(kind: str) -> None:
    wire = m.message(b"C", kind.encode() + b"stmt_1\0")
    assert m.decode_close(split(wire, b"C")) == (kind, "stmt_1")
    assert m.decode_close(kind.encode() + b"\0") == (kind, "")


# Each builder against the layout in PostgreSQL's "Message Formats" chapter, written out by hand:
# type byte, Int32 length counting itself and the body but not the type byte, then the fields.


def test_extended_query_frontend_layouts() -> None:
    # Parse: Byte1('P'), Int32 len, String name, String query, Int16 count, Int32[count] OIDs.
    assert m.parse("s1", "SELECT $1", [23]) == (
        b"P\x00\x00\x00\x17s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"
    )
    assert m.parse("", "SELECT 1") == b"P\x00\x00\x00\x10\x00SELECT 1\x00\x00\x00"
    # Bind: Byte1('B'), Int32 len, String portal, String statement, Int16 C + Int16[C] parameter
    # formats, Int16 N + N x (Int32 length, -1 for NULL; bytes), Int16 R + Int16[R] result formats.
    assert m.bind("p", "s", (1,), (b"ab", None), (0, 1)) == (
        b"B\x00\x00\x00\x1e" b"p\x00" b"s\x00" b"\x00\x01\x00\x01"
        b"\x00\x02" b"\x00\x00\x00\x02ab" b"\xff\xff\xff\xff"
        b"\x00\x02\x00\x00\x00\x01"
    )  # fmt: skip
    assert m.bind() == b"B\x00\x00\x00\x0c" + b"\x00" * 8
    # Describe / Close: Byte1, Int32 len, Byte1 'S' or 'P', String name.
    assert m.describe("P") == b"D\x00\x00\x00\x06P\x00"
    assert m.describe("S", "s1") == b"D\x00\x00\x00\x08Ss1\x00"
    assert m.close("S", "s1") == b"C\x00\x00\x00\x08Ss1\x00"
    assert m.close("P") == b"C\x00\x00\x00\x06P\x00"
    # Execute: Byte1('E'), Int32 len, String portal, Int32 max rows (0: no limit).
    assert m.execute() == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    assert m.execute("p", 10) == b"E\x00\x00\x00\x0ap\x00\x00\x00\x00\x0a"


def test_extended_query_backend_layouts() -> None:
    assert m.parse_complete() == b"1\x00\x00\x00\x04"
    assert m.bind_complete() == b"2\x00\x00\x00\x04"
    assert m.close_complete() == b"3\x00\x00\x00\x04"
    assert m.no_data() == b"n\x00\x00\x00\x04"
    # ParameterDescription: Byte1('t'), Int32 len, Int16 count, Int32[count] OIDs.
    assert m.parameter_description(()) == b"t\x00\x00\x00\x06\x00\x00"
    assert m.parameter_description((23, 25)) == b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19"


def test_builders_take_text_as_bytes_unchanged() -> None:
    # The replayer sends SQL already encoded in the recorded client_encoding.
    sql = "SELECT 'é'".encode("latin-1")
    assert (
        m.parse(b"", sql)
        == b"P" + struct.pack("!i", 4 + 1 + len(sql) + 1 + 2) + b"\x00" + sql + b"\x00\x00\x00"
    )
    assert m.bind(b"p", b"s") == m.bind("p", "s")
    assert m.execute(b"p") == m.execute("p")
    assert m.describe("S", b"s") == m.describe("S", "s")


def test_oids_above_int32_go_out_as_the_client_sent_them() -> None:
    # The decoders read an OID as int32, so 4294967295 comes back as -1: either goes out as ff ff ff ff.
    assert m.parse("", "x", [-1]) == m.parse("", "x", [0xFFFFFFFF])
    assert m.parse("", "x", [-1]).endswith(b"\x00\x01\xff\xff\xff\xff")
    assert m.parameter_description([-1]) == m.parameter_description([0xFFFFFFFF])


@FAST
@given(CTEXT, CTEXT, st.lists(INT32, max_size=5))
def test_parse_round_trip(name: str, sql: str, oids: list[int]) -> None:
    wire = m.parse(name, sql, oids)
    assert wire == parse_message(name, sql, oids)
    assert m.decode_parse(split(wire, b"P")) == m.Parse(name, sql, tuple(oids))


@FAST
@given(st.sampled_from(["S", "P"]), CTEXT)
def test_describe_and_close_round_trip(kind: str, name: str) -> None:
    assert m.decode_close(split(m.describe(kind, name), b"D")) == (kind, name)
    assert m.decode_close(split(m.close(kind, name), b"C")) == (kind, name)


# --------------------------------------------------------------------------------------------
# Malformed bodies: always ProtocolViolation, never IndexError / struct.error / UnicodeDecodeError.

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "startup": m.decode_startup,
    "error_fields": m.decode_error_fields,
    "parameter_status": m.decode_parameter_status,
    "backend_key_data": m.decode_backend_key_data,
    "auth": m.decode_auth,
    "sasl_mechanisms": m.decode_sasl_mechanisms,
    "password": m.decode_password,
    "sasl_initial_response": m.decode_sasl_initial_response,
    "query": m.decode_query,
    "command_complete": m.decode_command_complete,
    "parse": m.decode_parse,
    "close": m.decode_close,
    "row_description": m.decode_row_description,
    "data_row": m.decode_data_row,
    "ready_for_query": m.decode_ready_for_query,
}

VALID_BODIES: dict[str, bytes] = {
    "startup": untyped(m.startup_message({"user": "u", "database": "d"})),
    "error_fields": split(m.error_response("42601", "syntax", detail="d", hint="h"), b"E"),
    "parameter_status": split(m.parameter_status("TimeZone", "UTC"), b"S"),
    "backend_key_data": split(m.backend_key_data(1, 2), b"K"),
    "auth": split(m.auth_md5(b"salt"), b"R"),
    "sasl_mechanisms": b"SCRAM-SHA-256\x00SCRAM-SHA-256-PLUS\x00\x00",
    "password": split(m.password_message("pw"), b"p"),
    "sasl_initial_response": split(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"), b"p"),
    "query": split(m.query("SELECT 1"), b"Q"),
    "command_complete": split(m.command_complete("INSERT 0 1"), b"C"),
    "parse": split(parse_message("s1", "SELECT $1, $2", [23, 25]), b"P"),
    "close": b"Sname\x00",
    "row_description": split(m.row_description(["a", "b"]), b"T"),
    "data_row": split(m.data_row(["1", None, "three"]), b"D"),
    "ready_for_query": b"I",
}


def decodes_or_violates(decode: Callable[[bytes], Any], body: bytes) -> None:
    try:
        decode(body)
    except ProtocolViolation as exc:
        assert exc.code == "08P01"
        assert "malformed" in exc.message


@pytest.mark.parametrize("name", DECODERS)
def test_every_truncation_of_a_valid_body_decodes_or_is_a_protocol_violation(name: str) -> None:
    body = VALID_BODIES[name]
    DECODERS[name](body)  # the untruncated body is fine
    for end in range(len(body)):
        decodes_or_violates(DECODERS[name], body[:end])
        decodes_or_violates(DECODERS[name], memoryview(body)[:end])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", DECODERS)
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=48))
def test_random_bytes_decode_or_are_a_protocol_violation(name: str, data: bytes) -> None:
    decodes_or_violates(DECODERS[name], data)


@pytest.mark.parametrize(
    ("decode", "body"),
    [
        (m.decode_backend_key_data, b"\x00\x00\x00\x01\x00\x00"),
        (m.decode_auth, b"\x00\x00"),
        (m.decode_parameter_status, b"TimeZone\x00UTC"),
        (m.decode_query, b"SELECT 1"),
        (m.decode_query, b"SELECT '\xff'\x00"),
        (m.decode_error_fields, b"Mno terminator"),
        (m.decode_startup, b"\x00\x03\x00\x00user\x00u\x00"),
        (m.decode_startup, b"\x00\x03\x00\x00user\x00\xc3\x28\x00\x00"),
        (m.decode_startup, struct.pack("!ii", m.CANCEL_REQUEST_CODE, 1)),
        (m.decode_sasl_initial_response, b"SCRAM-SHA-256\x00\x00\x00\x00\x10short"),
        (m.decode_sasl_initial_response, b"SCRAM-SHA-256\x00\xff\xff\xff\xfe"),
        (m.decode_parse, b"\x00SELECT $1\x00\x00\x02\x00\x00\x00\x17"),
        (m.decode_row_description, b"\x00\x02a\x00" + bytes(18)),
        (m.decode_row_description, b"\x00\x01a\x00" + bytes(17)),
        (m.decode_data_row, b"\x00\x01\x00\x00\x00\x05abc"),
        (m.decode_data_row, b"\x00\x01\xff\xff\xff\xfe"),
        (m.decode_data_row, b"\x00\x02\xff\xff\xff\xff"),
        (m.decode_close, b""),
        (m.decode_close, b"S"),
        (m.decode_ready_for_query, b""),
        (m.decode_ready_for_query, b"II"),
        (m.decode_password, b"\xff\xfe\x00"),
    ],
)
def test_specific_malformed_bodies_are_protocol_violations(
    decode: Callable[[bytes], Any], body: bytes
) -> None:
    with pytest.raises(ProtocolViolation) as info:
        decode(body)
    assert info.value.code == "08P01"


def test_error_fields_with_a_non_ascii_field_code_are_kept() -> None:
    fields = m.decode_error_fields(b"\xffodd\x00Mmsg\x00\x00")
    assert fields["M"] == "msg"
    assert len(fields) == 2


# --------------------------------------------------------------------------------------------
# Quoting.


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("plain", "E'plain'"),
        ("it's", "E'it''s'"),
        ("back\\slash", "E'back\\\\slash'"),
        ("\\'", "E'\\\\'''"),
        ("", "E''"),
    ],
)
def test_quote_literal_escapes_quotes_and_backslashes(value: str, quoted: str) -> None:
    assert m.quote_literal(value) == quoted


@pytest.mark.parametrize(
    ("name", "quoted"),
    [("t", '"t"'), ('we"ird', '"we""ird"'), ("back\\slash", '"back\\slash"'), ("it's", '"it\'s"')],
)
def test_quote_ident_doubles_double_quotes_only(name: str, quoted: str) -> None:
    assert m.quote_ident(name) == quoted


SQL_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)


@FAST
@given(SQL_TEXT)
def test_quote_literal_is_read_back_verbatim_by_the_postgresql_parser(value: str) -> None:
    (stmt,) = parse_sql(f"SELECT {m.quote_literal(value)}")
    select: Any = stmt.stmt
    assert select.targetList[0].val.val.sval == value


@FAST
# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; stay under that.
@given(SQL_TEXT.filter(lambda name: 0 < len(name.encode()) < 64))
def test_quote_ident_is_read_back_verbatim_by_the_postgresql_parser(name: str) -> None:
    (stmt,) = parse_sql(f"SELECT 1 AS {m.quote_ident(name)}")
    select: Any = stmt.stmt
    assert select.targetList[0].name == name


def test_error_and_parameter_text_in_a_non_utf8_client_encoding_still_decodes() -> None:
    # A session with client_encoding=LATIN1 gets server messages in LATIN1: the data path must
    # still read the SQLSTATE rather than call the server connection broken.
    body = b"SERROR\x00C22012\x00Mdivision par z\xe9ro\x00\x00"
    fields = m.decode_error_fields(body)
    assert fields["C"] == "22012"
    assert fields["M"].startswith("division par z")
    assert m.decode_parameter_status(b"application_name\x00caf\xe9\x00")[0] == "application_name"
