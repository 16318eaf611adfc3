"""Encoding and decoding of the PostgreSQL v3 messages the sidecar builds or must understand.

Pure functions over bytes. Only the messages that routing, authentication or the sidecar's own
answers need are decoded; everything else is relayed as raw spans (see `framing.Relay`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from .sqlstate import ProtocolViolation, SqlState

# Untyped first-packet codes (the int32 after the length).
PROTOCOL_3_0: Final = 196608  # 3 << 16
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102

# Authentication request codes ('R' messages).
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

# Message type bytes, named once so call sites read as protocol, not magic numbers.
# Backend (server -> client)
B_AUTH: Final[int] = ord("R")
B_PARAMETER_STATUS: Final[int] = ord("S")
B_BACKEND_KEY_DATA: Final[int] = ord("K")
B_READY_FOR_QUERY: Final[int] = ord("Z")
B_ERROR: Final[int] = ord("E")
B_NOTICE: Final[int] = ord("N")
B_NOTIFICATION: Final[int] = ord("A")
B_ROW_DESCRIPTION: Final[int] = ord("T")
B_DATA_ROW: Final[int] = ord("D")
B_COMMAND_COMPLETE: Final[int] = ord("C")
B_EMPTY_QUERY: Final[int] = ord("I")
B_NEGOTIATE_PROTOCOL: Final[int] = ord("v")
B_PARSE_COMPLETE: Final[int] = ord("1")
B_BIND_COMPLETE: Final[int] = ord("2")
B_CLOSE_COMPLETE: Final[int] = ord("3")
B_COPY_IN: Final[int] = ord("G")
B_COPY_OUT: Final[int] = ord("H")
B_COPY_BOTH: Final[int] = ord("W")
# Frontend (client -> server)
F_QUERY: Final[int] = ord("Q")
F_PARSE: Final[int] = ord("P")
F_BIND: Final[int] = ord("B")
F_DESCRIBE: Final[int] = ord("D")
F_EXECUTE: Final[int] = ord("E")
F_CLOSE: Final[int] = ord("C")
F_SYNC: Final[int] = ord("S")
F_FLUSH: Final[int] = ord("H")
F_FUNCTION_CALL: Final[int] = ord("F")
F_COPY_DATA: Final[int] = ord("d")
F_COPY_DONE: Final[int] = ord("c")
F_COPY_FAIL: Final[int] = ord("f")
F_PASSWORD: Final[int] = ord("p")  # also SASLInitialResponse / SASLResponse / GSSResponse
F_TERMINATE: Final[int] = ord("X")

FRONTEND_TYPES: Final = frozenset(
    {
        F_QUERY, F_PARSE, F_BIND, F_DESCRIBE, F_EXECUTE, F_CLOSE, F_SYNC, F_FLUSH,
        F_FUNCTION_CALL, F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL, F_PASSWORD, F_TERMINATE,
    }
)  # fmt: skip

# Transaction status bytes carried by ReadyForQuery.
TX_IDLE: Final[int] = ord("I")
TX_IN_BLOCK: Final[int] = ord("T")
TX_FAILED: Final[int] = ord("E")

_I32: Final = struct.Struct("!i")
_HDR: Final = struct.Struct("!ci")
_I32x2 = struct.Struct("!ii")
_I16: Final = struct.Struct("!h")
# Counts of parameters and format codes: PostgreSQL reads them unsigned (up to 65535 parameters).
_U16: Final = struct.Struct("!H")


def _cstr(value: str) -> bytes:
    return value.encode() + b"\x00"


def _text(value: str | bytes) -> bytes:
    """Text as given: a str is UTF-8; bytes are already in the encoding the session uses (the
    replayer sends SQL in the recorded client_encoding)."""
    return value.encode() if isinstance(value, str) else value


def _oids(param_types: Sequence[int]) -> bytes:
    # OIDs are unsigned 32-bit on the wire; the decoders read them as int32, so both forms come
    # here, and each goes back out as the same four bytes.
    return b"".join((oid & 0xFFFFFFFF).to_bytes(4, "big") for oid in param_types)


def message(type_byte: bytes, body: bytes = b"") -> bytes:
    """A typed message: type byte, int32 length (including itself), body."""
    return _HDR.pack(type_byte, len(body) + 4) + body


# --------------------------------------------------------------------------------------------
# Backend messages the sidecar originates.


def auth_ok() -> bytes:
    return message(b"R", _I32.pack(AUTH_OK))


def auth_cleartext() -> bytes:
    return message(b"R", _I32.pack(AUTH_CLEARTEXT))


def auth_md5(salt: bytes) -> bytes:
    return message(b"R", _I32.pack(AUTH_MD5) + salt)


def auth_sasl(mechanisms: Sequence[str]) -> bytes:
    return message(b"R", _I32.pack(AUTH_SASL) + b"".join(_cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(AUTH_SASL_CONTINUE) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(AUTH_SASL_FINAL) + data)


# Each login sends the client every server parameter: the same dozen messages for every client
# of a pool, so they are built once. Bounded: values such as application_name can differ per client.
_PARAMETER_STATUS: dict[tuple[str, str], bytes] = {}
_PARAMETER_STATUS_MAX: Final = 512


def parameter_status(name: str, value: str) -> bytes:
    key = (name, value)
    cached = _PARAMETER_STATUS.get(key)
    if cached is None:
        cached = message(b"S", _cstr(name) + _cstr(value))
        if len(_PARAMETER_STATUS) >= _PARAMETER_STATUS_MAX:
            _PARAMETER_STATUS.clear()
        _PARAMETER_STATUS[key] = cached
    return cached


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", _I32x2.pack(pid, secret))


def ready_for_query(status: int = TX_IDLE) -> bytes:
    return message(b"Z", bytes((status,)))


def negotiate_protocol_version(newest_minor: int, unsupported: Sequence[str]) -> bytes:
    body = _I32x2.pack(newest_minor, len(unsupported)) + b"".join(_cstr(o) for o in unsupported)
    return message(b"v", body)


def error_response(
    sqlstate: str,
    message_text: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    notice: bool = False,
) -> bytes:
    fields = [b"S" + _cstr(severity), b"V" + _cstr(severity), b"C" + _cstr(sqlstate)]
    fields.append(b"M" + _cstr(message_text))
    if detail:
        fields.append(b"D" + _cstr(detail))
    if hint:
        fields.append(b"H" + _cstr(hint))
    return message(b"N" if notice else b"E", b"".join(fields) + b"\x00")


def row_description(columns: Sequence[str], type_oid: int = 25) -> bytes:
    """RowDescription for text columns (the sidecar's own result sets are all text)."""
    parts = [_I16.pack(len(columns))]
    for name in columns:
        # table oid, column attnum, type oid, type size, type modifier, format code (text)
        parts.append(_cstr(name) + struct.pack("!ihihih", 0, 0, type_oid, -1, -1, 0))
    return message(b"T", b"".join(parts))


def data_row(values: Sequence[str | bytes | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            raw = value.encode() if isinstance(value, str) else value
            parts.append(_I32.pack(len(raw)) + raw)
    return message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return message(b"C", _cstr(tag))


def empty_query_response() -> bytes:
    return message(b"I")


# Body-less answers the transaction-mode router owes for each Parse/Bind/Close it hides: built once.
_PARSE_COMPLETE: Final = message(b"1")
_BIND_COMPLETE: Final = message(b"2")
_CLOSE_COMPLETE: Final = message(b"3")
_NO_DATA: Final = message(b"n")


def parse_complete() -> bytes:
    return _PARSE_COMPLETE


def bind_complete() -> bytes:
    return _BIND_COMPLETE


def close_complete() -> bytes:
    return _CLOSE_COMPLETE


def no_data() -> bytes:
    return _NO_DATA


def parameter_description(param_types: Sequence[int]) -> bytes:
    return message(b"t", _U16.pack(len(param_types)) + _oids(param_types))


# --------------------------------------------------------------------------------------------
# Frontend messages the sidecar sends upstream.


def startup_message(params: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(version) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32x2.pack(8, SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _I32x2.pack(pid, secret)


def query(sql: str) -> bytes:
    return message(b"Q", _cstr(sql))


def password_message(password: str | bytes) -> bytes:
    raw = password.encode() if isinstance(password, str) else password
    return message(b"p", raw + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


def terminate() -> bytes:
    return message(b"X")


def sync() -> bytes:
    return message(b"S")


def parse(name: str | bytes, sql: str | bytes, param_types: Sequence[int] = ()) -> bytes:
    """Parse: statement `name` ("" the unnamed one) for `sql`, with parameter type OIDs (0: let
    the server infer)."""
    return message(
        b"P", _text(name) + b"\x00" + _text(sql) + b"\x00" + _U16.pack(len(param_types)) + _oids(param_types)
    )


def bind(
    portal: str | bytes = "",
    statement: str | bytes = "",
    param_formats: Sequence[int] = (),
    values: Sequence[bytes | None] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    """Bind: portal from statement, with parameter format codes (none: all text; one: for all),
    values (None is NULL) and result format codes (same rule)."""
    parts = [_text(portal), b"\x00", _text(statement), b"\x00", _U16.pack(len(param_formats))]
    parts.extend(_I16.pack(code) for code in param_formats)
    parts.append(_U16.pack(len(values)))
    for value in values:
        if value is None:
            parts.append(_I32.pack(-1))
        else:
            parts.append(_I32.pack(len(value)))
            parts.append(value)
    parts.append(_U16.pack(len(result_formats)))
    parts.extend(_I16.pack(code) for code in result_formats)
    return message(b"B", b"".join(parts))


def describe(kind: str, name: str | bytes = "") -> bytes:
    """Describe: `kind` "S" (a prepared statement) or "P" (a portal)."""
    return message(b"D", kind.encode() + _text(name) + b"\x00")


def execute(portal: str | bytes = "", max_rows: int = 0) -> bytes:
    """Execute: run `portal`, returning at most `max_rows` rows (0: all of them)."""
    return message(b"E", _text(portal) + b"\x00" + _I32.pack(max_rows))


def close(kind: str, name: str | bytes = "") -> bytes:
    """Close: `kind` "S" (a prepared statement) or "P" (a portal)."""
    return message(b"C", kind.encode() + _text(name) + b"\x00")


# --------------------------------------------------------------------------------------------
# Decoding. Bodies are given without the 5-byte header (startup packets without the 4-byte
# length). Malformed input raises ProtocolViolation, never IndexError or UnicodeDecodeError.


class _Cursor:
    """Reads fields from a message body, turning every overrun into a ProtocolViolation."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes | memoryview, what: str) -> None:
        self.buf = bytes(buf)
        self.pos = 0
        self.what = what

    def _fail(self, why: str) -> ProtocolViolation:
        return ProtocolViolation(f"malformed {self.what} message: {why}")

    def cstr(self, lenient: bool = False) -> str:
        """A NUL-terminated string. `lenient` for text that may be in the session's
        client_encoding rather than UTF-8 (server messages, parameter values)."""
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise self._fail("unterminated string")
        raw = self.buf[self.pos : end]
        self.pos = end + 1
        if lenient:
            return raw.decode("utf-8", "replace")
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise self._fail("string is not valid UTF-8") from exc

    def int32(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise self._fail("truncated int32")
        (value,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def int16(self) -> int:
        if self.pos + 2 > len(self.buf):
            raise self._fail("truncated int16")
        (value,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(value)

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.buf):
            raise self._fail("truncated field")
        raw = self.buf[self.pos : self.pos + count]
        self.pos += count
        return raw

    def rest(self) -> bytes:
        raw = self.buf[self.pos :]
        self.pos = len(self.buf)
        return raw

    def at_end(self) -> bool:
        return self.pos >= len(self.buf)


class StartupPacket:
    """The untyped first packet: a StartupMessage, or one of the request codes."""

    # A plain class, not a dataclass: mypyc runs a dataclass __init__ with a default factory as
    # interpreted Python, and each login decodes one or two of these.
    def __init__(
        self, code: int, params: dict[str, str] | None = None, cancel_key: tuple[int, int] | None = None
    ) -> None:
        self.code = code
        self.params: dict[str, str] = {} if params is None else params
        self.cancel_key = cancel_key

    @property
    def major(self) -> int:
        return self.code >> 16

    @property
    def minor(self) -> int:
        return self.code & 0xFFFF


def decode_startup(body: bytes | memoryview) -> StartupPacket:
    cur = _Cursor(body, "startup")
    code = cur.int32()
    if code == CANCEL_REQUEST_CODE:
        pid = cur.int32()
        secret = cur.int32()
        return StartupPacket(code, cancel_key=(pid, secret))
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        return StartupPacket(code)
    if code >> 16 != 3:
        # Unknown majors are reported by the caller with the version number; parse nothing more.
        return StartupPacket(code)
    # One split instead of a cursor walk: the pairs are NUL-terminated names and values, and an
    # empty name ends the list. The last part (what follows the last NUL) is never terminated.
    parts = cur.rest().split(b"\x00")
    last = len(parts) - 1
    params: dict[str, str] = {}
    i = 0
    while True:
        if i >= last:
            raise cur._fail("unterminated string")
        key = _startup_text(cur, parts[i])
        if not key:
            break
        if i + 1 >= last:
            raise cur._fail("unterminated string")
        params[key] = _startup_text(cur, parts[i + 1])
        i += 2
    return StartupPacket(code, params)


def _startup_text(cur: _Cursor, raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise cur._fail("string is not valid UTF-8") from exc


def decode_error_fields(body: bytes | memoryview) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields keyed by their one-letter code ('C', 'M', ...)."""
    cur = _Cursor(body, "ErrorResponse")
    fields: dict[str, str] = {}
    while not cur.at_end():
        code = cur.take(1)
        if code == b"\x00":
            break
        fields[code.decode("ascii", "replace")] = cur.cstr(lenient=True)
    return fields


def decode_parameter_status(body: bytes | memoryview) -> tuple[str, str]:
    cur = _Cursor(body, "ParameterStatus")
    return cur.cstr(), cur.cstr(lenient=True)


def decode_backend_key_data(body: bytes | memoryview) -> tuple[int, int]:
    cur = _Cursor(body, "BackendKeyData")
    return cur.int32(), cur.int32()


def decode_auth(body: bytes | memoryview) -> tuple[int, bytes]:
    """An Authentication request: its code and the code-specific payload."""
    cur = _Cursor(body, "Authentication")
    return cur.int32(), cur.rest()


def decode_sasl_mechanisms(payload: bytes | memoryview) -> list[str]:
    cur = _Cursor(payload, "AuthenticationSASL")
    mechanisms = []
    while not cur.at_end():
        name = cur.cstr()
        if not name:
            break
        mechanisms.append(name)
    return mechanisms


def decode_password(body: bytes | memoryview) -> str:
    return _Cursor(body, "PasswordMessage").cstr()


def decode_sasl_initial_response(body: bytes | memoryview) -> tuple[str, bytes]:
    cur = _Cursor(body, "SASLInitialResponse")
    mechanism = cur.cstr()
    length = cur.int32()
    data = b"" if length == -1 else cur.take(length)
    return mechanism, data


def decode_query(body: bytes | memoryview) -> str:
    return _Cursor(body, "Query").cstr()


def decode_command_complete(body: bytes | memoryview) -> str:
    return _Cursor(body, "CommandComplete").cstr()


@dataclass(frozen=True)
class Parse:
    name: str
    query: str
    param_types: tuple[int, ...]


def decode_parse(body: bytes | memoryview) -> Parse:
    cur = _Cursor(body, "Parse")
    name = cur.cstr()
    sql = cur.cstr()
    count = cur.int16()
    return Parse(name, sql, tuple(cur.int32() for _ in range(count)))


def decode_close(body: bytes | memoryview) -> tuple[str, str]:
    """Close / Describe: ('S' statement or 'P' portal, name)."""
    cur = _Cursor(body, "Close")
    kind = cur.take(1).decode("ascii", "replace")
    return kind, cur.cstr()


def decode_row_description(body: bytes | memoryview) -> list[str]:
    cur = _Cursor(body, "RowDescription")
    names = []
    for _ in range(cur.int16()):
        names.append(cur.cstr())
        cur.take(18)
    return names


def decode_data_row(body: bytes | memoryview) -> list[bytes | None]:
    cur = _Cursor(body, "DataRow")
    values: list[bytes | None] = []
    for _ in range(cur.int16()):
        length = cur.int32()
        values.append(None if length == -1 else cur.take(length))
    return values


def decode_ready_for_query(body: bytes | memoryview) -> int:
    if len(body) != 1:
        raise ProtocolViolation("malformed ReadyForQuery message")
    return body[0]


def error_summary(fields: Mapping[str, str]) -> str:
    """A one-line rendering of ErrorResponse fields for logs: `SQLSTATE: message`."""
    return f"{fields.get('C', SqlState.INTERNAL_ERROR.value)}: {fields.get('M', '')}"


def quote_literal(value: str) -> str:
    """A SQL string literal safe under standard_conforming_strings=on (E'' form avoids relying on it)."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def frames(messages: Iterable[bytes]) -> bytes:
    return b"".join(messages)
