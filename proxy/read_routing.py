"""Which client work is read-only, recognised conservatively, for routing reads to replicas.

Pure functions over SQL text (pglast, PostgreSQL's own parser), each with a bounded LRU cache per
text: an application sends the same few statements over and over, so the parse is paid once per
distinct text, not per execution. Anything not recognised is a write and goes to the writer: a
wrong "write" costs a little load on the writer, a wrong "read" would lose a write (or get 25006
from the replica, which is relayed as is).

Not on the data path: the session calls these only for the work it considers sending to a replica.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Final

from pglast import parse_sql
from pglast.ast import (
    A_Const,
    DefElem,
    TransactionStmt,
    VariableSetStmt,
)
from pglast.enums import TransactionStmtKind, VariableSetKind

from .readonly import is_plain_read

__all__ = [
    "default_transaction_read_only",
    "is_plain_read",
    "parse_bool_setting",
    "read_only_request",
    "session_read_only_setting",
    "starts_read_only_transaction",
]

# Distinct texts remembered per function; longer texts are parsed every time (never cached), so
# the caches hold at most _CACHE_SIZE * _CACHE_MAX_TEXT characters each.
_CACHE_SIZE: Final = 4096
_CACHE_MAX_TEXT: Final = 8192

def _read_only_option(options: object) -> bool | None:
    """The last `transaction_read_only` among transaction options (READ ONLY / READ WRITE)."""
    found: bool | None = None
    if not isinstance(options, list | tuple):
        return None
    for option in options:
        if isinstance(option, DefElem) and option.defname == "transaction_read_only":
            arg = option.arg
            value = getattr(getattr(arg, "val", None), "ival", None) if isinstance(arg, A_Const) else None
            found = bool(value)
    return found


@lru_cache(maxsize=_CACHE_SIZE)
def _starts_read_only_transaction(sql: str) -> bool:
    try:
        statements = parse_sql(sql)
    except Exception:
        return False
    if len(statements) == 2:
        # `BEGIN; SET TRANSACTION READ ONLY` in one Query (a driver's way to open a read-only
        # transaction): decided here, where both are seen before the transaction has a server.
        first, second = statements[0].stmt, statements[1].stmt
        return (
            isinstance(first, TransactionStmt)
            and first.kind in (TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START)
            and _read_only_option(first.options) is not False
            and isinstance(second, VariableSetStmt)
            and second.kind == VariableSetKind.VAR_SET_MULTI
            and second.name == "TRANSACTION"
            and _read_only_option(second.args) is True
        )
    if len(statements) != 1:
        return False
    stmt = statements[0].stmt
    if isinstance(stmt, TransactionStmt):
        if stmt.kind not in (TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START):
            return False
        return _read_only_option(stmt.options) is True
    if (
        isinstance(stmt, VariableSetStmt)
        and stmt.kind == VariableSetKind.VAR_SET_MULTI
        and stmt.name in ("TRANSACTION", "SESSION CHARACTERISTICS")
    ):
        return _read_only_option(stmt.args) is True
    return False


def starts_read_only_transaction(sql: str) -> bool:
    """Whether `sql` is exactly one of BEGIN READ ONLY, START TRANSACTION READ ONLY (with any
    other options; the last READ ONLY / READ WRITE wins, as in PostgreSQL), SET TRANSACTION READ
    ONLY (inside a transaction: the rest of it is read-only), or SET SESSION CHARACTERISTICS AS
    TRANSACTION READ ONLY (every later transaction of the session; also see
    `session_read_only_setting`, which also says when it is turned off)."""
    if len(sql) > _CACHE_MAX_TEXT:
        return _starts_read_only_transaction.__wrapped__(sql)
    return _starts_read_only_transaction(sql)


@lru_cache(maxsize=_CACHE_SIZE)
def _session_read_only_setting(sql: str) -> tuple[bool, bool | None]:
    try:
        statements = parse_sql(sql)
    except Exception:
        return (False, None)
    changed, value = False, None
    for raw in statements:
        stmt = raw.stmt
        if not isinstance(stmt, VariableSetStmt) or stmt.is_local:
            continue
        if stmt.kind == VariableSetKind.VAR_SET_MULTI and stmt.name == "SESSION CHARACTERISTICS":
            found = _read_only_option(stmt.args)
            if found is not None:
                changed, value = True, found
        elif stmt.name is not None and stmt.name.lower() == "default_transaction_read_only":
            if stmt.kind in (VariableSetKind.VAR_SET_DEFAULT, VariableSetKind.VAR_RESET):
                changed, value = True, None  # back to the startup value, which the caller knows
            elif stmt.kind == VariableSetKind.VAR_SET_VALUE and stmt.args:
                arg = stmt.args[0]
                literal = getattr(arg, "val", None) if isinstance(arg, A_Const) else None
                text = getattr(literal, "sval", None)
                if text is None and getattr(literal, "ival", None) is not None:
                    text = str(literal.ival)  # type: ignore[union-attr]
                if text is None and getattr(literal, "boolval", None) is not None:
                    text = "on" if literal.boolval else "off"  # type: ignore[union-attr]
                parsed = parse_bool_setting(str(text)) if text is not None else None
                changed, value = True, parsed if parsed is not None else False
        elif stmt.kind == VariableSetKind.VAR_RESET_ALL:
            changed, value = True, None
    return (changed, value)


def session_read_only_setting(sql: str) -> tuple[bool, bool | None]:
    """Whether `sql` sets the session's default transaction mode, and to what: (False, None) if
    it does not; (True, True) for SET default_transaction_read_only = on (or true, yes, 1, ...)
    and SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; (True, False) for the opposite or a
    value PostgreSQL would refuse (the session is then treated as read-write); (True, None) for
    RESET / SET ... TO DEFAULT / RESET ALL (back to the startup value). SET LOCAL is ignored (it
    ends with the transaction). With several statements, the last one that sets it counts."""
    if len(sql) > _CACHE_MAX_TEXT:
        return _session_read_only_setting.__wrapped__(sql)
    return _session_read_only_setting(sql)


_TRUE_WORDS: Final = ("true", "yes", "on")
_FALSE_WORDS: Final = ("false", "no", "off")


def parse_bool_setting(value: str) -> bool | None:
    """A boolean setting's value as PostgreSQL reads it (startup options, SET, ParameterStatus):
    on/off, true/false, yes/no, 1/0 and unambiguous prefixes, any case. None: not a boolean."""
    text = value.strip().lower()
    if text in ("1", "0"):
        return text == "1"
    if not text:
        return None
    if text in ("o", "of"):
        return None if text == "o" else False  # "o" could be on or off; "of" only off
    for word in _TRUE_WORDS:
        if word.startswith(text) and not (word == "on" and len(text) < 2):
            return True
    for word in _FALSE_WORDS:
        if word.startswith(text):
            return False
    return None


def default_transaction_read_only(startup: dict[str, str] | None = None, setting: str | None = None) -> bool:
    """Whether a session starts its transactions read-only: from the server's reported
    `default_transaction_read_only` (ParameterStatus is not sent for it by PostgreSQL, so usually
    `setting` is what the session last SET), else from the startup packet (the parameter itself, or
    `-c default_transaction_read_only=on` / `--default_transaction_read_only=on` in `options`)."""
    if setting is not None:
        return parse_bool_setting(setting) is True
    if not startup:
        return False
    found: bool | None = None
    if "default_transaction_read_only" in startup:
        found = parse_bool_setting(startup["default_transaction_read_only"])
    options = startup.get("options", "")
    words = options.split()
    for i, word in enumerate(words):
        pair: str | None = None
        if word == "-c" and i + 1 < len(words):
            pair = words[i + 1]
        elif (word.startswith("-c") and len(word) > 2) or word.startswith("--"):
            pair = word[2:]
        if pair is None or "=" not in pair:
            continue
        name, _, value = pair.partition("=")
        if name.strip().lower().replace("-", "_") == "default_transaction_read_only":
            found = parse_bool_setting(value)
    return found is True


_QUERY: Final = 0x51  # Q
_PARSE: Final = 0x50  # P
_BIND: Final = 0x42  # B
_SYNC: Final = 0x53  # S
_FLUSH: Final = 0x48  # H
_PASSIVE: Final = frozenset({0x44, 0x45, 0x48, 0x43})  # Describe, Execute, Flush, Close


# The common read decided without parsing: one SELECT of names, literals, parameters and the
# arithmetic and comparison operators (no parenthesis, so no function call or subquery; no
# semicolon but a final one), without FOR (locking clauses) or INTO. Anything else is parsed.
# Texts with literals (`WHERE aid = 123`) differ per execution, so the cache would not help them.
_QUICK_READ: Final = re.compile(r"\s*select\s[\w\s,.*=<>!'\"$:+\-/%]*;?\s*", re.IGNORECASE | re.ASCII)
_LOCKING_OR_INTO: Final = re.compile(r"\b(?:for|into)\b", re.IGNORECASE | re.ASCII)


def _reads(sql: str) -> bool:
    if _QUICK_READ.fullmatch(sql) is not None and _LOCKING_OR_INTO.search(sql) is None:
        return True
    return is_plain_read(sql) or starts_read_only_transaction(sql)


def _cstring_at(buf: bytes, start: int, end: int) -> tuple[str, int] | None:
    stop = buf.find(b"\x00", start, end)
    if stop < 0:
        return None
    return buf[start:stop].decode("utf-8", "replace"), stop + 1


def read_only_request(buf: bytes, statement_text: Callable[[str], str | None]) -> bool:
    """Whether the client's next request, the whole messages at the start of `buf`, is read-only
    work: a simple Query that is a plain read or starts a READ ONLY transaction, or an
    extended-protocol batch up to its Sync in which every statement parsed or bound is one
    (`statement_text`: the text of a statement the client prepared earlier, by name). A batch not
    yet ended by Sync (or a Flush that ends `buf`), or any other message, is not: the rest could
    be a write."""
    n = len(buf)
    pos = 0
    parsed: dict[str, bool] = {}
    found = False
    while pos + 5 <= n:
        type_byte = buf[pos]
        end = pos + 1 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if end > n or end < pos + 5:
            return False
        if type_byte == _QUERY:
            if pos != 0:
                return False
            text = _cstring_at(buf, pos + 5, end)
            return text is not None and _reads(text[0])
        if type_byte == _PARSE:
            name = _cstring_at(buf, pos + 5, end)
            if name is None:
                return False
            sql = _cstring_at(buf, name[1], end)
            if sql is None or not _reads(sql[0]):
                return False
            parsed[name[0]] = True
        elif type_byte == _BIND:
            portal = _cstring_at(buf, pos + 5, end)
            stmt = _cstring_at(buf, portal[1], end) if portal is not None else None
            if stmt is None:
                return False
            if stmt[0] not in parsed:
                if not stmt[0]:
                    return False  # the unnamed statement of an earlier request
                known = statement_text(stmt[0])
                if known is None or not _reads(known):
                    return False
            found = True
        elif type_byte == _SYNC or (type_byte == _FLUSH and end == n):
            # (A Flush ending what was sent: asyncpg prepares with Parse, Describe, Flush.)
            return found or bool(parsed)
        elif type_byte not in _PASSIVE:
            return False
        pos = end
    return False
