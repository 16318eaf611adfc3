"""Which client statements change session state the sidecar must track or refuse.

Checked on the data path for every Query and Parse, so it works in two steps: a byte-level look at
the first keyword (no decoding, no allocation for an ordinary SELECT/INSERT/UPDATE), and only for
the few keywords that matter a parse with pglast, PostgreSQL's own parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Final

from mypy_extensions import mypyc_attr
from pglast import parse_sql
from pglast.ast import (
    CreateStmt,
    DeallocateStmt,
    DeclareCursorStmt,
    DiscardStmt,
    FuncCall,
    ListenStmt,
    Node,
    PrepareStmt,
    VariableSetStmt,
)
from pglast.enums import DiscardMode, VariableSetKind
from pglast.visitors import Visitor

# Keywords after which session state may change. `select`/`with`/`values` are in the transaction
# set only because of session advisory locks, and only when the text mentions them.
_SETTINGS_WORDS: Final = frozenset({b"set", b"reset", b"discard"})
_TX_WORDS: Final = _SETTINGS_WORDS | frozenset({b"deallocate", b"listen", b"declare", b"create", b"prepare"})

_WS: Final = b" \t\r\n\f\v"
_BLANK: Final = bytes(1 if byte in _WS else 0 for byte in range(256))  # by byte value


# Blanks, comments and opening parentheses, then the first word. `re` runs this in C, over the
# message buffer itself.
_FIRST_WORD: Final = re.compile(rb"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/|\()*([A-Za-z]{1,16})", re.S)


def first_keyword(buf: bytes | memoryview, start: int = 0) -> bytes:
    """The first SQL keyword at `buf[start:]`, lowercased, skipping blanks and comments."""
    match = _FIRST_WORD.match(buf, start)
    return match.group(1).lower() if match else b""


# First letters of every keyword session mode cares about: SET/SELECT, RESET, DISCARD/DEALLOCATE/
# DECLARE, LISTEN, CREATE/COMMIT, PREPARE, END, WITH/VALUES (an advisory lock in a CTE).
_SESSION_INITIALS: Final = bytes(1 if byte in b"srdlcpewv" else 0 for byte in range(256))  # by byte
# Functions that change session state from inside a SELECT. Looked for in a lowercased copy: one
# C pass each, several times quicker than a case-insensitive regex (`re` has no fast search for it).
_SESSION_FUNCTIONS: Final = (b"advisory", b"set_config")


def session_keyword_at(buf: bytes | memoryview, start: int) -> bool:
    """False when the statement at `start` certainly leaves session state alone (one byte tells,
    for most statements); True means look closer."""
    if start >= len(buf):
        return False
    if not isinstance(buf, bytes):
        # (The usual caller passes bytes, which makes the read below native when compiled.)
        return session_keyword_at(bytes(buf[start : start + 1]), 0)
    first = buf[start] | 0x20
    return not (0x61 <= first <= 0x7A) or _SESSION_INITIALS[first] != 0


def mentions_session_functions(buf: bytes | memoryview, start: int) -> bool:
    # (A memoryview is copied once, from `start`; bytes are searched where they are.)
    raw = buf if isinstance(buf, bytes) else bytes(buf[start:])
    # A function is called with parentheses: without one (most UPDATEs and DELETEs, many SELECTs)
    # nothing is called, and the lowercased copy and its two searches (generic calls compiled,
    # over 3,000 instructions) are not needed. (Over the whole message: a `(` in its header only
    # means looking closer.)
    if 0x28 not in raw:
        return False
    text = (raw[start:] if isinstance(buf, bytes) else raw).lower()
    return text.find(_SESSION_FUNCTIONS[0]) >= 0 or text.find(_SESSION_FUNCTIONS[1]) >= 0


def _one_ending_semicolon(raw: bytes, start: int) -> bool:
    """The NUL-terminated text at `start` has a `;` only at its very end (psql and pgbench end
    their statements so): one statement, decided without a regex or a decoded copy."""
    n = len(raw)
    return n >= start + 2 and raw[n - 1] == 0 and raw[n - 2] == 0x3B and 0x3B not in raw[start : n - 2]


def empty_query(buf: bytes | memoryview, start: int) -> bool:
    """True when the query text at `start` (up to its NUL, or the end) is only blanks and
    semicolons: an empty query, which PostgreSQL answers EmptyQueryResponse, so running it again
    does nothing (SQLAlchemy's psycopg dialect pings with ";"). One byte decides for the rest."""
    n = len(buf)
    if start >= n or not (_BLANK[buf[start]] or buf[start] == 0x3B or buf[start] == 0):
        return False
    i = start
    while i < n and buf[i] != 0:
        if not (_BLANK[buf[i]] or buf[i] == 0x3B):
            return False
        i += 1
    return True


def lone_select(buf: bytes | memoryview, start: int) -> bool:
    """True when the query text at `start` is one plain SELECT calling no session function: a read
    that leaves session state alone, the data path's most common statement. False means look
    closer (it may still be a read).

    Per query, so written for the compiled data path: byte reads for the keyword, then `str`
    searches (mypyc runs str methods natively, bytes methods through generic calls) on a latin-1
    copy; `mentions_session_functions` only when the text calls a function at all."""
    raw = buf if isinstance(buf, bytes) else bytes(buf)
    n = len(raw)
    if (
        start + 7 > n
        or raw[start] | 0x20 != 0x73  # s
        or raw[start + 1] | 0x20 != 0x65  # e
        or raw[start + 2] | 0x20 != 0x6C  # l
        or raw[start + 3] | 0x20 != 0x65  # e
        or raw[start + 4] | 0x20 != 0x63  # c
        or raw[start + 5] | 0x20 != 0x74  # t
        or not _BLANK[raw[start + 6]]
    ):
        return False
    # The common case decided on the bytes, without a decoded copy: no parenthesis (no call) and
    # no semicolon but one ending the text (psql and pgbench end theirs so). `in` with an int
    # needle: a bytes needle is first tried as an int, an exception raised and cleared inside;
    # and no bytes methods (`find`), which compiled are generic calls costlier than the copy.
    if 0x28 not in raw:
        if 0x3B not in raw:
            return True
        if _one_ending_semicolon(raw, start + 7):
            return True
    text = raw.decode("latin-1")
    semicolon = text.find(";", start + 7)
    if semicolon >= 0 and (semicolon + 1 == n or raw[semicolon + 1] != 0):
        end = text.find("\x00", semicolon)
        if text[semicolon + 1 : end if end >= 0 else n].strip():
            return False  # more statements follow (or, past the text, bytes that look so)
    if text.find("(", start + 7) < 0:
        return True  # no call: `pg_advisory_lock(...)`, `set_config(...)` need a parenthesis
    return not mentions_session_functions(raw, start)


def may_change_settings(keyword: bytes) -> bool:
    return keyword in _SETTINGS_WORDS


# A `;` followed by more than blanks: several statements in one Query, any of which may matter.
_MORE_STATEMENTS: Final = re.compile(rb";\s*[^\s\x00]")


def has_more_statements(text: bytes | memoryview, start: int = 0) -> bool:
    # The usual answers without the regex: no `;` at all, or only the one ending a Query's text.
    # (A memoryview, from the general path, goes to the regex as it is: no copy.)
    if isinstance(text, bytes) and (0x3B not in text or _one_ending_semicolon(text, start)):
        return False
    return _MORE_STATEMENTS.search(text, start) is not None


def needs_transaction_check(keyword: bytes, text: bytes | memoryview, start: int = 0) -> bool:
    """True when a statement might carry session state that transaction pooling must handle
    (False is certain; True means parse it)."""
    return keyword in _TX_WORDS or mentions_session_functions(text, start) or has_more_statements(text, start)


class Deallocate(Enum):
    NONE = 0
    ONE = 1
    ALL = 2


@dataclass(frozen=True)
class Effects:
    """What a statement (or multi-statement Query) does to session state."""

    changes_settings: bool = False  # SET / RESET / DISCARD: the session's settings must be re-read
    reset_all: bool = False  # RESET ALL / DISCARD ALL: every setting back to its startup value
    reset_names: frozenset[str] = frozenset()  # RESET x / SET x TO DEFAULT (lowercase)
    discard_all: bool = False
    deallocate: Deallocate = Deallocate.NONE
    deallocate_name: str | None = None
    single_statement: bool = True
    # Why this cannot run with transaction pooling (LISTEN, WITH HOLD cursor, ...), if it cannot.
    not_poolable: str | None = None
    # Custom (dotted) settings it sets or resets: PostgreSQL lists them in pg_settings only once
    # an extension defines them, so they are read back by name (lowercase).
    custom_names: frozenset[str] = frozenset()


_HOLD_CURSOR: Final = 0x0020  # CURSOR_OPT_HOLD in PostgreSQL's parsenodes.h
_SESSION_LOCKS: Final = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                            "pg_try_advisory_lock_shared"})  # fmt: skip


# Not a native class when compiled: pglast finds the visit_* methods with inspect.ismethod, which a
# compiled method is not.
@mypyc_attr(native_class=False)
class _FunctionNames(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.configured: set[str] = set()  # literal first arguments of set_config()

    def visit_FuncCall(self, _ancestors: object, node: FuncCall) -> None:
        if node.funcname:
            last = node.funcname[-1]
            name = str(getattr(last, "sval", "")).lower()
            self.names.add(name)
            if name == "set_config" and node.args:
                first = node.args[0]
                value = getattr(getattr(first, "val", None), "sval", None)
                if isinstance(value, str):
                    self.configured.add(value.lower())


def classify(sql: str) -> Effects:
    """The session effects of `sql`. Unparseable text is assumed to change settings (the server
    will report the syntax error; re-reading settings afterwards is harmless)."""
    try:
        statements = parse_sql(sql)
    except Exception:
        return Effects(changes_settings=True)
    changes = reset_all = discard = False
    reset_names: set[str] = set()
    custom: set[str] = set()
    dealloc = Deallocate.NONE
    dealloc_name: str | None = None
    not_poolable: str | None = None
    for raw in statements:
        stmt: Node | None = raw.stmt
        if isinstance(stmt, VariableSetStmt):
            changes = True
            if stmt.name and "." in stmt.name:
                custom.add(stmt.name.lower())
            # RESET and SET ... TO DEFAULT return to the *startup* value, which a pooled server
            # does not know: the sidecar puts the client's startup value back afterwards.
            if stmt.kind == VariableSetKind.VAR_RESET_ALL:
                reset_all = True
            elif stmt.kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_SET_DEFAULT) and stmt.name:
                reset_names.add(stmt.name.lower())
        elif isinstance(stmt, DiscardStmt):
            changes = True
            if stmt.target == DiscardMode.DISCARD_ALL:
                reset_all = discard = True
        elif isinstance(stmt, DeallocateStmt):
            dealloc = Deallocate.ONE if stmt.name else Deallocate.ALL
            dealloc_name = stmt.name
        elif isinstance(stmt, ListenStmt):
            not_poolable = "LISTEN needs a session of its own"
        elif isinstance(stmt, DeclareCursorStmt) and (stmt.options or 0) & _HOLD_CURSOR:
            not_poolable = "a WITH HOLD cursor outlives its transaction"
        elif isinstance(stmt, CreateStmt) and stmt.relation and stmt.relation.relpersistence == "t":
            not_poolable = "a temporary table lives as long as the server session"
        elif isinstance(stmt, PrepareStmt):
            not_poolable = (
                "SQL-level PREPARE lives as long as the server session "
                "(protocol-level prepared statements work)"
            )
        elif stmt is not None:
            finder = _FunctionNames()
            finder(stmt)
            if "set_config" in finder.names:
                changes = True  # set_config(name, value, false): a SET in disguise
                custom |= {name for name in finder.configured if "." in name}
            if finder.names & _SESSION_LOCKS:
                not_poolable = (
                    "a session-level advisory lock outlives the transaction (pg_advisory_xact_lock works)"
                )
    return Effects(
        changes_settings=changes,
        reset_all=reset_all,
        reset_names=frozenset(reset_names),
        discard_all=discard,
        deallocate=dealloc,
        deallocate_name=dealloc_name,
        single_statement=len(statements) == 1,
        not_poolable=not_poolable,
        custom_names=frozenset(custom),
    )
