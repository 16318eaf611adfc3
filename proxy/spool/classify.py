r"""What may be spooled while no writer exists (ARCHITECTURE.md, P5), decided by PostgreSQL's own parser.

A statement is spoolable when replaying it later cannot give a different result from running it
now: `INSERT INTO t [(cols)] VALUES (...)[, ...] [ON CONFLICT [target] DO NOTHING]` whose values
are constants, parameters, casts of those, DEFAULT, NULL or ARRAY[...] of those. The clock
functions (now(), CURRENT_TIMESTAMP, LOCALTIMESTAMP, CURRENT_DATE, ...) are allowed because they
are *pinned*: the statement is rewritten with the spool time as a literal, so the replay writes
the instant the client was told its transaction committed, not the replay time.

Everything else (SELECT, UPDATE, RETURNING, subqueries, any other function...) needs the database
and is refused with a reason a human can act on. Transaction control (BEGIN/COMMIT/ROLLBACK,
savepoints) and the few SETs that shape how spooled text is read are classified too, so the
outage responder can play the server for whole transactions.

Results are cached by SQL text (bounded LRU): drivers send the same text over and over.

What the text means, at acknowledgement and at replay
------------------------------------------------------
pglast reads SQL as PostgreSQL does with its defaults: `standard_conforming_strings=on`, UTF-8.
The replay must run the stored text under rules that give it the meaning the classifier checked,
and the client must never be told "committed" for text PostgreSQL would read otherwise in its
session. Setting by setting (`text_refusal` and the replayer implement this):

* standard_conforming_strings: with `off`, a backslash inside '...' escapes the next character,
  so `'x1\', ' || wipe()) -- '` is two constants to pglast and a call of wipe() to PostgreSQL.
  The two readings differ only at a backslash inside a plain '...' (or N'...') literal, and
  PostgreSQL rejects U&'...' under `off`; before the first such point both scanners see the same
  tokens. So while the session's value is off (startup packet, `options=-c`, a SET before or
  during the outage, or the server's default), SQL text containing a backslash or U&' is refused
  (57P03, nothing stored); other text reads the same under both values. The value that counts is
  the one in force when the text arrives (PostgreSQL parses a whole Query string, then runs its
  SETs). The replay always runs with `on`, whatever the record says; a record stored by an older
  sidecar under `off` with a backslash in it is dead-lettered rather than guessed at.
* escape_string_warning: only adds a WARNING under `off`; never changes a value. Not carried.
* backslash_quote: only decides whether \' in an E'' string (or under `off`) is an error; it
  never gives accepted text another meaning. A session with `off` (or `safe_encoding` with a
  client-only encoding) has \' text refused, so nothing PostgreSQL would reject is acknowledged.
  SET backslash_quote during the outage needs the database (refused).
* client_encoding: the server converts the bytes from the client's encoding before it scans
  them; in client-only encodings (SJIS, BIG5, GBK, UHC, GB18030) a multibyte character may end
  in the byte 0x5C, the backslash. The spool reads text as UTF-8; under any other encoding, text
  with a byte above 0x7F is refused. ASCII reads the same in every encoding PostgreSQL accepts
  from clients. Parameter values are stored as raw bytes and replayed under the record's
  client_encoding, so the server converts them exactly as it would have.
* search_path: resolves the table. The record carries it when the session set it (startup,
  options, a SET before or during the outage); otherwise the replay logs in as the same user to
  the same database and gets the same role/database default.
* DateStyle, IntervalStyle, TimeZone: change how date/time/interval literals (and the pinned
  clock's casts) are read. Every record carries the session's values (the server's reported
  defaults unless the client set them) and the replay applies them with set_config(..., true).
  Likewise lc_monetary (money input), array_nulls (array input), timezone_abbreviations
  (timestamp input) and xmloption (xml input) are carried when the session set them.
* bytea_output, extra_float_digits, application_name: output only (a spooled INSERT returns no
  rows: RETURNING is refused). Carried, harmless.
* SET ROLE / SESSION AUTHORIZATION / session_replication_role: the replay cannot reproduce them
  as the login user; a session that has them set gets its INSERTs refused.
* Column defaults that read the clock (`DEFAULT now()`, CURRENT_DATE, ...) are pinned at replay
  to the acknowledgement instant, like an explicit now() (see `proxy.spool.replay`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from pglast import parse_sql
from pglast.ast import (
    A_ArrayExpr,
    A_Const,
    A_Expr,
    DeallocateStmt,
    DiscardStmt,
    FuncCall,
    InsertStmt,
    Node,
    ParamRef,
    RawStmt,
    ResTarget,
    SelectStmt,
    SetToDefault,
    SQLValueFunction,
    String,
    TransactionStmt,
    TypeCast,
    TypeName,
    VariableSetStmt,
)
from pglast.enums import (
    A_Expr_Kind,
    DiscardMode,
    LimitOption,
    OnConflictAction,
    SetOperation,
    SQLValueFunctionOp,
    TransactionStmtKind,
    VariableSetKind,
)
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Visitor

# Settings a client may SET during an outage: the ones that change how spooled SQL text and
# parameter bytes are read at replay (so the record carries them), plus application_name, which
# is harmless. Keys are lowercase (as the parser gives them); values are the canonical spelling.
SPOOL_SETTINGS: dict[str, str] = {
    "search_path": "search_path",
    "timezone": "TimeZone",
    "datestyle": "DateStyle",
    "intervalstyle": "IntervalStyle",
    "client_encoding": "client_encoding",
    "standard_conforming_strings": "standard_conforming_strings",
    "application_name": "application_name",
    "extra_float_digits": "extra_float_digits",
    "bytea_output": "bytea_output",
    "lc_monetary": "lc_monetary",
    "array_nulls": "array_nulls",
    "timezone_abbreviations": "timezone_abbreviations",
    "xmloption": "xmloption",
}

# Session state the replay cannot reproduce as the login user: INSERTs are refused while set.
UNREPLAYABLE_SETTINGS = frozenset({"role", "session_authorization", "session_replication_role"})

# Client encodings where a multibyte character may contain the byte 0x5C (PostgreSQL accepts them
# from clients only): `backslash_quote = safe_encoding` rejects \' for them.
_CLIENT_ONLY_ENCODINGS = frozenset({"sjis", "shiftjis", "mskanji", "big5", "gbk", "cp936", "uhc",
                                    "gb18030", "shiftjis2004", "win936", "win949", "win950"})  # fmt: skip


def pg_bool(value: str | None, default: bool) -> bool:
    """A boolean setting as PostgreSQL reads it (on/off, true/false, yes/no, 1/0 and unique
    prefixes); `default` when unset. Anything unreadable counts as False, the cautious reading
    for standard_conforming_strings."""
    if value is None:
        return default
    text = value.strip().strip("'").lower()
    if not text:
        return False
    return text in ("1", "on") or "true".startswith(text) or "yes".startswith(text)


def encoding_key(name: str | None) -> str:
    """PostgreSQL's encoding-name normalization: lowercase, letters and digits only."""
    return "".join(ch for ch in (name or "utf8").lower() if ch.isalnum())


def is_utf8(name: str | None) -> bool:
    return encoding_key(name) in ("utf8", "unicode")


def text_refusal(
    text: str | bytes, settings: Mapping[str, str], backslash_quote: str | None = None
) -> str | None:
    """Why SQL `text` (as received, or as stored) cannot be spooled under the session's
    `settings` (canonical names, as a record carries them), or None when pglast's reading is
    PostgreSQL's. See the module docstring."""
    encoding = settings.get("client_encoding")
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if not is_utf8(encoding) and not raw.isascii():
        return (
            f"SQL text with non-ASCII characters cannot be spooled under client_encoding {encoding} "
            "(only UTF8; pass such values as parameters)"
        )
    if b"\\" not in raw and b"&'" not in raw:
        return None
    if not pg_bool(settings.get("standard_conforming_strings"), True):
        if b"\\" in raw:
            return (
                "SQL text with a backslash cannot be spooled while standard_conforming_strings is off "
                "(pass the value as a parameter, or use standard_conforming_strings = on)"
            )
        if re.search(rb"[uU]&'", raw):
            return "U&'...' literals are not allowed while standard_conforming_strings is off"
    if b"\\'" in raw:
        quote = (backslash_quote or "safe_encoding").strip().lower()
        if quote in ("off", "false", "no", "0") or (
            quote not in ("on", "true", "yes", "1") and encoding_key(encoding) in _CLIENT_ONLY_ENCODINGS
        ):
            return "\\' in a string literal is not allowed under this session's backslash_quote"
    return None


# Functions equal to the transaction's (or statement's) start instant: pinned to the spool time.
# clock_timestamp() is deliberately absent: it differs row by row and is "another function".
_TIMESTAMPTZ_FUNCTIONS = frozenset({"now", "transaction_timestamp", "statement_timestamp"})

# How each SQL value function is pinned. The pinned instant is a timestamptz literal in UTC; the
# cast that follows is exactly the conversion PostgreSQL itself applies for these functions
# (timestamptz -> timestamp/date/time/timetz uses the session TimeZone), and the replay runs with
# the record's session settings, so the value is the one the client would have got at spool time.
_SVF_CASTS: dict[SQLValueFunctionOp, str | None] = {
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP: None,
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N: None,
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP: "timestamp",
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N: "timestamp",
    SQLValueFunctionOp.SVFOP_CURRENT_DATE: "date",
    SQLValueFunctionOp.SVFOP_CURRENT_TIME: "timetz",
    SQLValueFunctionOp.SVFOP_CURRENT_TIME_N: "timetz",
    SQLValueFunctionOp.SVFOP_LOCALTIME: "time",
    SQLValueFunctionOp.SVFOP_LOCALTIME_N: "time",
}
_SVF_NAMES: dict[SQLValueFunctionOp, str] = {
    SQLValueFunctionOp.SVFOP_CURRENT_ROLE: "current_role",
    SQLValueFunctionOp.SVFOP_CURRENT_USER: "current_user",
    SQLValueFunctionOp.SVFOP_USER: "user",
    SQLValueFunctionOp.SVFOP_SESSION_USER: "session_user",
    SQLValueFunctionOp.SVFOP_CURRENT_CATALOG: "current_catalog",
    SQLValueFunctionOp.SVFOP_CURRENT_SCHEMA: "current_schema",
}


class Kind(Enum):
    INSERT = "insert"
    BEGIN = "begin"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    SAVEPOINT = "savepoint"
    RELEASE = "release"
    ROLLBACK_TO = "rollback_to"
    DEALLOCATE = "deallocate"  # DEALLOCATE name/ALL: the session's own prepared statements
    DISCARD = "discard"  # DISCARD ALL: statements and settings back to the start
    SET = "set"  # a SET/RESET of one of SPOOL_SETTINGS (or SET TRANSACTION ...: a no-op)
    EMPTY = "empty"  # only blanks / comments / semicolons
    REFUSED = "refused"  # needs the database: `reason` says why
    SYNTAX_ERROR = "syntax_error"  # PostgreSQL itself would reject it: `reason` is its message


@dataclass(frozen=True)
class Statement:
    """One classified statement. Immutable and shared through the cache."""

    kind: Kind
    sql: str  # the statement's own text (one statement of a multi-statement string)
    reason: str = ""  # REFUSED / SYNTAX_ERROR
    tag: str = ""  # the CommandComplete tag to answer with ("INSERT 0 2", "BEGIN", "SET", ...)
    rows: int = 0  # INSERT: number of VALUES rows
    param_count: int = 0  # highest $n used (what ParameterDescription must describe)
    table: str = ""  # INSERT: the target as written ("s.t" or "t")
    name: str = ""  # SAVEPOINT/RELEASE/ROLLBACK TO: the savepoint; SET: canonical setting name
    value: str | None = None  # SET: the new value; None = back to the session's default
    local: bool = False  # SET LOCAL: for the current transaction only
    read_only: bool = False  # BEGIN READ ONLY
    # INSERT using clock functions: the parse tree to pin and deparse per execution (never
    # mutated: `pinned_sql` works on a fresh parse).
    needs_pin: bool = False

    @property
    def spoolable(self) -> bool:
        return self.kind is not Kind.REFUSED and self.kind is not Kind.SYNTAX_ERROR

    def sql_at(self, instant: dt.datetime) -> str:
        """The text to spool: the statement itself, or with the clock functions pinned to
        `instant` (an aware datetime)."""
        return pin_clock(self.sql, instant) if self.needs_pin else self.sql


@dataclass(frozen=True)
class Classification:
    """All statements of one SQL string (a simple Query may hold several)."""

    statements: tuple[Statement, ...]

    @property
    def refused(self) -> Statement | None:
        for stmt in self.statements:
            if not stmt.spoolable:
                return stmt
        return None


class _Refused(Exception):
    pass


@dataclass
class _Scan:
    """What a walk over an INSERT's values found."""

    max_param: int = 0
    clock: bool = False
    notes: list[str] = field(default_factory=list)


def _func_name(node: FuncCall) -> str:
    parts = [str(getattr(p, "sval", "")) for p in (node.funcname or ())]
    # pg_catalog.now() is now(); any other schema is a user function.
    if len(parts) == 2 and parts[0] == "pg_catalog":
        return parts[1].lower()
    return ".".join(parts).lower()


def _check_value(node: Node | None, scan: _Scan) -> None:
    """Raise _Refused unless `node` is a value that replays identically (or is pinned)."""
    if node is None or isinstance(node, (A_Const, SetToDefault)):
        return
    if isinstance(node, ParamRef):
        scan.max_param = max(scan.max_param, node.number or 0)
        return
    if isinstance(node, TypeCast):
        _check_value(node.arg if isinstance(node.arg, Node) else None, scan)
        return
    if isinstance(node, A_ArrayExpr):
        for element in node.elements or ():
            _check_value(element, scan)
        return
    if isinstance(node, A_Expr) and node.kind == A_Expr_Kind.AEXPR_OP and node.lexpr is None:
        # Unary minus/plus on a parameter or a cast constant (`-$1`, `-'1'::int`): pure.
        op = [str(getattr(p, "sval", "")) for p in (node.name or ())]
        if op in (["-"], ["+"]):
            _check_value(node.rexpr if isinstance(node.rexpr, Node) else None, scan)
            return
    if isinstance(node, SQLValueFunction):
        if node.op in _SVF_CASTS:
            scan.clock = True
            return
        name = _SVF_NAMES.get(node.op, "this value function") if node.op is not None else "?"
        raise _Refused(f"{name} is not allowed in a spooled INSERT (only constants and parameters)")
    if isinstance(node, FuncCall):
        name = _func_name(node)
        if name in _TIMESTAMPTZ_FUNCTIONS and not node.args and not node.agg_star:
            scan.clock = True
            return
        raise _Refused(f"function {name}() is not allowed in a spooled INSERT")
    if isinstance(node, SelectStmt) or type(node).__name__ == "SubLink":
        raise _Refused("a subquery needs the database")
    if isinstance(node, A_Expr):
        raise _Refused("an expression is not allowed in a spooled INSERT (only constants and parameters)")
    raise _Refused(
        f"{type(node).__name__} is not allowed in a spooled INSERT (only constants and parameters)"
    )


def _table_allowed(schema: str | None, name: str, allowed: frozenset[str] | None) -> bool:
    """`spool.tables` entries: `t` allows t in any schema; `s.t` allows s.t and an unqualified
    t (which search_path resolves; the operator named that table). Case-insensitive."""
    if allowed is None:
        return True
    name = name.lower()
    if name in allowed:
        return True
    if schema is not None:
        return f"{schema.lower()}.{name}" in allowed
    return any(entry.rsplit(".", 1)[-1] == name for entry in allowed if "." in entry)


def _classify_insert(stmt: InsertStmt, sql: str, allowed: frozenset[str] | None) -> Statement:
    rel = stmt.relation
    if rel is None:
        raise _Refused("INSERT without a table")
    table = f"{rel.schemaname}.{rel.relname}" if rel.schemaname else str(rel.relname)
    if stmt.withClause is not None:
        raise _Refused("WITH needs the database")
    # pglast follows PostgreSQL 18 (returningClause); older grammars had returningList.
    if getattr(stmt, "returningClause", None) or getattr(stmt, "returningList", None):
        raise _Refused("RETURNING needs the database")
    if (
        stmt.onConflictClause is not None
        and stmt.onConflictClause.action != OnConflictAction.ONCONFLICT_NOTHING
    ):
        raise _Refused("ON CONFLICT DO UPDATE needs the database")
    if not _table_allowed(rel.schemaname, str(rel.relname), allowed):
        raise _Refused(f"table {table} is not in spool.tables")
    scan = _Scan()
    select = stmt.selectStmt
    if select is None:
        rows = 1  # INSERT ... DEFAULT VALUES
    else:
        if not isinstance(select, SelectStmt) or not select.valuesLists:
            raise _Refused("INSERT ... SELECT needs the database")
        if (select.sortClause or select.limitCount or select.limitOffset or select.withClause
                or select.lockingClause):  # fmt: skip
            raise _Refused("INSERT ... VALUES with ORDER BY/LIMIT needs the database")
        rows = len(select.valuesLists)
        for row in select.valuesLists:
            for value in row:
                _check_value(value, scan)
    # ON CONFLICT (col) WHERE pred: the arbiter's WHERE is evaluated against the index, not data;
    # it only selects which unique index applies, so it is as deterministic as the target itself.
    for target in stmt.cols or ():
        if isinstance(target, ResTarget) and target.indirection:
            raise _Refused("assigning to a subfield or array element is not supported while spooling")
    return Statement(
        Kind.INSERT,
        sql,
        tag=f"INSERT 0 {rows}",
        rows=rows,
        param_count=scan.max_param,
        table=table,
        needs_pin=scan.clock,
    )


def _set_value(stmt: VariableSetStmt) -> str:
    """The SET's value as current_setting() would show it (the form set_config() accepts)."""
    parts: list[str] = []
    for arg in stmt.args or ():
        if isinstance(arg, A_Const) and arg.val is not None:
            value = getattr(arg.val, "sval", None)
            if value is None:
                value = getattr(arg.val, "ival", None)
            if value is None:
                value = getattr(arg.val, "fval", None)
            if value is None:
                value = getattr(arg.val, "boolval", None)
                value = None if value is None else ("on" if value else "off")
            if value is None:
                raise _Refused("this SET value is not supported while spooling")
            text = str(value)
            # search_path is a list of identifiers: quote the ones that need it, as PostgreSQL
            # shows them, so set_config() at replay reads back the same schemas.
            if stmt.name == "search_path" and not (text.isidentifier() and text == text.lower()):
                text = '"' + text.replace('"', '""') + '"'
            parts.append(text)
        else:
            raise _Refused("this SET value is not supported while spooling")
    return ", ".join(parts)


def _classify_set(stmt: VariableSetStmt, sql: str) -> Statement:
    kind = stmt.kind
    name = (stmt.name or "").lower()
    if kind == VariableSetKind.VAR_SET_MULTI and name in ("transaction", "session characteristics"):
        # SET TRANSACTION ISOLATION LEVEL ... / SET SESSION CHARACTERISTICS: no effect on INSERTs
        # replayed one transaction at a time.
        return Statement(Kind.SET, sql, tag="SET", name="")
    if kind == VariableSetKind.VAR_RESET_ALL:
        raise _Refused("RESET ALL needs the database")
    canonical = SPOOL_SETTINGS.get(name)
    if canonical is None:
        raise _Refused(
            f"SET {name or '...'} needs the database (only {', '.join(SPOOL_SETTINGS)} while spooling)"
        )
    tag = "RESET" if kind == VariableSetKind.VAR_RESET else "SET"
    if kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_SET_DEFAULT):
        return Statement(Kind.SET, sql, tag=tag, name=canonical, value=None, local=bool(stmt.is_local))
    if kind != VariableSetKind.VAR_SET_VALUE:
        raise _Refused(f"this form of SET {name} is not supported while spooling")
    return Statement(
        Kind.SET, sql, tag=tag, name=canonical, value=_set_value(stmt), local=bool(stmt.is_local)
    )


def _read_only(stmt: TransactionStmt) -> bool:
    for option in stmt.options or ():
        if getattr(option, "defname", "") == "transaction_read_only":
            arg = getattr(option, "arg", None)
            val = getattr(arg, "val", None)
            if getattr(val, "ival", 0) == 1 or getattr(val, "boolval", False):
                return True
    return False


def _classify_transaction(stmt: TransactionStmt, sql: str) -> Statement:
    kind = stmt.kind
    if kind in (TransactionStmtKind.TRANS_STMT_BEGIN, TransactionStmtKind.TRANS_STMT_START):
        tag = "START TRANSACTION" if kind == TransactionStmtKind.TRANS_STMT_START else "BEGIN"
        return Statement(Kind.BEGIN, sql, tag=tag, read_only=_read_only(stmt))
    if stmt.chain:
        raise _Refused("COMMIT/ROLLBACK AND CHAIN needs the database")
    if kind == TransactionStmtKind.TRANS_STMT_COMMIT:
        return Statement(Kind.COMMIT, sql, tag="COMMIT")
    if kind == TransactionStmtKind.TRANS_STMT_ROLLBACK:
        return Statement(Kind.ROLLBACK, sql, tag="ROLLBACK")
    if kind == TransactionStmtKind.TRANS_STMT_SAVEPOINT:
        return Statement(Kind.SAVEPOINT, sql, tag="SAVEPOINT", name=str(stmt.savepoint_name))
    if kind == TransactionStmtKind.TRANS_STMT_RELEASE:
        return Statement(Kind.RELEASE, sql, tag="RELEASE", name=str(stmt.savepoint_name))
    if kind == TransactionStmtKind.TRANS_STMT_ROLLBACK_TO:
        return Statement(Kind.ROLLBACK_TO, sql, tag="ROLLBACK", name=str(stmt.savepoint_name))
    raise _Refused("two-phase commit needs the database")


# PostgreSQL's command names for the refusal message ("SELECT is not a simple INSERT").
_COMMAND_NAMES = {
    "SelectStmt": "SELECT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE", "MergeStmt": "MERGE",
    "CopyStmt": "COPY", "CreateStmt": "CREATE TABLE", "VariableShowStmt": "SHOW",
    "ExplainStmt": "EXPLAIN", "CallStmt": "CALL", "DoStmt": "DO", "TruncateStmt": "TRUNCATE",
    "LockStmt": "LOCK", "DeclareCursorStmt": "DECLARE", "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE", "ListenStmt": "LISTEN", "NotifyStmt": "NOTIFY",
}  # fmt: skip


def _classify_one(raw: RawStmt, sql: str, allowed: frozenset[str] | None) -> Statement:
    stmt = raw.stmt
    try:
        if isinstance(stmt, InsertStmt):
            return _classify_insert(stmt, sql, allowed)
        if isinstance(stmt, TransactionStmt):
            return _classify_transaction(stmt, sql)
        if isinstance(stmt, VariableSetStmt):
            return _classify_set(stmt, sql)
        if isinstance(stmt, DeallocateStmt):
            # Pools and drivers clean up with DEALLOCATE (SQLAlchemy's psycopg dialect sends
            # DEALLOCATE ALL when a connection goes back to the pool): it touches only the session.
            if stmt.name:
                return Statement(Kind.DEALLOCATE, sql, tag="DEALLOCATE", name=stmt.name)
            return Statement(Kind.DEALLOCATE, sql, tag="DEALLOCATE ALL")
        if isinstance(stmt, DiscardStmt) and stmt.target == DiscardMode.DISCARD_ALL:
            return Statement(Kind.DISCARD, sql, tag="DISCARD ALL")
    except _Refused as exc:
        return Statement(Kind.REFUSED, sql, reason=str(exc))
    kind = type(stmt).__name__
    name = _COMMAND_NAMES.get(kind, kind.removesuffix("Stmt").upper())
    return Statement(Kind.REFUSED, sql, reason=f"{name} is not a simple INSERT")


def _split(sql: str, statements: tuple[RawStmt, ...]) -> list[str]:
    """Each statement's own text (pglast gives locations in characters of the str it parsed)."""
    texts = []
    for stmt in statements:
        start = stmt.stmt_location or 0
        end = start + stmt.stmt_len if stmt.stmt_len else len(sql)
        texts.append(sql[start:end].strip().lstrip(";").strip())
    return texts


def classify_sql(sql: str, allowed_tables: Iterable[str] | None = None) -> Classification:
    """Classify every statement of `sql` (uncached; see `Classifier` for the cached form)."""
    allowed = None if allowed_tables is None else frozenset(t.lower() for t in allowed_tables)
    return _classify(sql, allowed)


def _classify(sql: str, allowed: frozenset[str] | None) -> Classification:
    try:
        parsed = parse_sql(sql)
    except ParseError as exc:
        return Classification((Statement(Kind.SYNTAX_ERROR, sql, reason=str(exc.args[0])),))
    if not parsed:
        return Classification((Statement(Kind.EMPTY, sql),))
    texts = _split(sql, parsed)
    return Classification(
        tuple(_classify_one(raw, text, allowed) for raw, text in zip(parsed, texts, strict=True))
    )


class Classifier:
    """`classify(sql)` with a bounded LRU cache keyed by the exact text."""

    def __init__(self, allowed_tables: Iterable[str] | None = None, cache_size: int = 1024) -> None:
        self.allowed = None if allowed_tables is None else frozenset(t.lower() for t in allowed_tables)
        self._cache: OrderedDict[str, Classification] = OrderedDict()
        self._size = cache_size

    def classify(self, sql: str) -> Classification:
        hit = self._cache.get(sql)
        if hit is not None:
            self._cache.move_to_end(sql)
            return hit
        result = _classify(sql, self.allowed)
        self._cache[sql] = result
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return result


# --------------------------------------------------------------------------------------------
# Pinning the clock.


def pinned_literal(instant: dt.datetime) -> str:
    """`instant` as a timestamptz literal in UTC with microseconds (PostgreSQL's resolution)."""
    if instant.tzinfo is None:
        raise ValueError("the spool time must be timezone-aware")
    utc = instant.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%d %H:%M:%S.%f") + "+00"


def _cast(node: Node, type_name: str, typmod: int = -1) -> TypeCast:
    mods = None if typmod < 0 else (A_Const(val=_integer(typmod)),)
    return TypeCast(
        arg=node,
        typeName=TypeName(
            names=(String(sval="pg_catalog"), String(sval=type_name)), typmods=mods, typemod=-1
        ),
    )


def _integer(value: int) -> Node:
    from pglast.ast import Integer

    return Integer(ival=value)


def _pinned_node(literal: str, cast: str | None, typmod: int) -> Node:
    node: Node = _cast(A_Const(val=String(sval=literal)), "timestamptz", typmod if cast is None else -1)
    if cast is not None:
        node = _cast(node, cast, typmod)
    return node


def _pin(node: Node | None, literal: str) -> Node | None:
    if isinstance(node, SQLValueFunction) and node.op in _SVF_CASTS:
        return _pinned_node(literal, _SVF_CASTS[node.op], node.typmod if node.typmod is not None else -1)
    if isinstance(node, FuncCall) and _func_name(node) in _TIMESTAMPTZ_FUNCTIONS:
        return _pinned_node(literal, None, -1)
    if isinstance(node, TypeCast):
        node.arg = _pin(node.arg if isinstance(node.arg, Node) else None, literal)
    elif isinstance(node, A_ArrayExpr) and node.elements:
        node.elements = tuple(_pin(e, literal) for e in node.elements)
    elif isinstance(node, A_Expr):
        node.rexpr = _pin(node.rexpr if isinstance(node.rexpr, Node) else None, literal)
    return node


def pin_clock(sql: str, instant: dt.datetime) -> str:
    """`sql` (one spoolable INSERT) with every clock function replaced by `instant`."""
    literal = pinned_literal(instant)
    (raw,) = parse_sql(sql)
    stmt = raw.stmt
    assert isinstance(stmt, InsertStmt) and isinstance(stmt.selectStmt, SelectStmt)
    stmt.selectStmt.valuesLists = tuple(
        tuple(_pin(value, literal) for value in row) for row in stmt.selectStmt.valuesLists or ()
    )
    return str(RawStream()(stmt))


# --------------------------------------------------------------------------------------------
# Pinning the clock in column defaults (done at replay, where the table's defaults are known).


class _ClockPinner(Visitor):
    """Replaces every clock reading of an expression with the pinned instant."""

    def __init__(self, literal: str) -> None:
        super().__init__()
        self.literal = literal
        self.found = False

    def visit_FuncCall(self, ancestors: object, node: FuncCall) -> Node | None:
        if _func_name(node) in _TIMESTAMPTZ_FUNCTIONS and not node.args and not node.agg_star:
            self.found = True
            return _pinned_node(self.literal, None, -1)
        return None

    def visit_SQLValueFunction(self, ancestors: object, node: SQLValueFunction) -> Node | None:
        if node.op in _SVF_CASTS:
            self.found = True
            typmod = node.typmod if node.typmod is not None else -1
            return _pinned_node(self.literal, _SVF_CASTS[node.op], typmod)
        return None


def pinned_default(expression: str, instant: dt.datetime) -> Node | None:
    """A column default (as pg_get_expr shows it) with its clock readings pinned to `instant`;
    None when it does not read the clock (it is then left to the database)."""
    try:
        (raw,) = parse_sql(f"SELECT {expression}")
    except (ParseError, ValueError):
        return None
    select = raw.stmt
    if not isinstance(select, SelectStmt) or not select.targetList or len(select.targetList) != 1:
        return None
    pinner = _ClockPinner(pinned_literal(instant))
    pinner(select)
    if not pinner.found:
        return None
    target = select.targetList[0]
    return target.val if isinstance(target, ResTarget) and isinstance(target.val, Node) else None


@dataclass(frozen=True)
class Column:
    """A column of a spooled INSERT's table, from the catalog at replay."""

    name: str
    default: str | None  # pg_get_expr of the default, or None
    generated: bool = False  # (or not insertable by the user): never given a value


def insert_target(sql: str) -> tuple[str, ...] | None:
    """The name parts of a spooled INSERT's table ([catalog,] [schema,] name), or None."""
    try:
        (raw,) = parse_sql(sql)
    except (ParseError, ValueError):
        return None
    stmt = raw.stmt
    if not isinstance(stmt, InsertStmt) or stmt.relation is None:
        return None
    rel = stmt.relation
    return tuple(str(p) for p in (rel.catalogname, rel.schemaname, rel.relname) if p)


def pin_defaults(sql: str, columns: list[Column], instant: dt.datetime) -> str:
    """`sql` (one spooled INSERT) with the columns it leaves to a clock-reading default (omitted,
    or given as DEFAULT) set to that default pinned to `instant`, so `DEFAULT now()` writes the
    acknowledgement instant like an explicit now() does. Unchanged when there is none."""
    pins: dict[str, Node] = {}
    for column in columns:
        if column.default is not None and not column.generated:
            node = pinned_default(column.default, instant)
            if node is not None:
                pins[column.name] = node
    if not pins:
        return sql
    (raw,) = parse_sql(sql)
    stmt = raw.stmt
    assert isinstance(stmt, InsertStmt)
    select = stmt.selectStmt
    if select is None:  # DEFAULT VALUES
        rows: list[list[Node | None]] = [[]]
        names: list[str] = []
    else:
        assert isinstance(select, SelectStmt)
        rows = [list(row) for row in select.valuesLists or ()]
        width = len(rows[0]) if rows else 0
        if stmt.cols:
            names = [str(t.name) for t in stmt.cols if isinstance(t, ResTarget)]
        else:
            names = [c.name for c in columns][:width]
    changed = False
    for name, node in pins.items():
        if name in names:
            index = names.index(name)
            for row in rows:
                if index < len(row) and isinstance(row[index], SetToDefault):
                    row[index] = node
                    changed = True
        else:
            names.append(name)
            for row in rows:
                row.append(node)
            changed = True
    if not changed:
        return sql
    stmt.cols = tuple(ResTarget(name=name) for name in names)
    values = tuple(tuple(row) for row in rows)
    if select is None:
        stmt.selectStmt = SelectStmt(valuesLists=values, limitOption=LimitOption.LIMIT_OPTION_DEFAULT,
                                     op=SetOperation.SETOP_NONE)  # fmt: skip
    else:
        select.valuesLists = values
    return str(RawStream()(stmt))
