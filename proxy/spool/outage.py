"""Playing the server for one client session while no writer exists (cluster state OUTAGE).

`OutageResponder` is sans-I/O (like `proxy.local.AbortedTransaction`): the session feeds it each
client message and sends back the bytes it returns. It answers

* introspection queries from the front-door cache (exact bytes a real server sent earlier);
* transaction control (BEGIN/COMMIT/ROLLBACK, savepoints) and the few SETs that matter;
* spoolable INSERTs (see `classify`), in explicit transactions, in autocommit, in the simple and
  the extended protocol (named/unnamed statements and portals, pipelines).

It never stores anything itself. When a transaction is to be committed it returns a `Store`
verdict carrying the `SpoolRecord`; the session awaits the durable append and then calls
`stored()` (for the COMMIT/INSERT answer and ReadyForQuery) or `store_failed(error)`. A statement
that needs the database gives an `Unspoolable` verdict: the session holds the client (up to
failover.hold_timeout) and then calls `refuse(reason)` for the 57P03 error. While a verdict is
outstanding no other message may be fed.

Transaction semantics follow PostgreSQL's: a simple Query with several statements and no BEGIN is
one implicit transaction, as is everything between two Syncs in the extended protocol; an error
inside an explicit block aborts it (25P02 for what follows, COMMIT answers ROLLBACK); an error in
an extended batch skips to Sync.

Known limitation: Describe of a statement reports the parameter types given in Parse and 0
(unspecified) for the rest; PostgreSQL would infer them from the table, which needs the database.
Clients that send parameters as text (psycopg, pg8000, libpq) are unaffected.
"""

from __future__ import annotations

import datetime as dt
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..protocol import messages as m
from ..protocol.sqlstate import ProtocolViolation
from .classify import (
    SPOOL_SETTINGS,
    UNREPLAYABLE_SETTINGS,
    Classifier,
    Kind,
    Statement,
    is_utf8,
    text_refusal,
)
from .frontdoor import FrontDoorCache, describe_and_rows
from .record import SpooledStatement, SpoolRecord, new_record_id

NO_WRITER = "57P03"  # cannot_connect_now: what a client gets for work that needs the database
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")

_PARSE_COMPLETE = m.parse_complete()
_BIND_COMPLETE = m.bind_complete()
_CLOSE_COMPLETE = m.close_complete()
_NO_DATA = m.no_data()

# Settings a record always carries (from the server's ParameterStatus unless the client set
# them): how replay must read the text and the bytes, and what the pinned clock casts use.
_BASELINE = ("TimeZone", "DateStyle", "IntervalStyle", "client_encoding", "standard_conforming_strings")


@dataclass(frozen=True)
class Store:
    """Append `record` durably, then call `stored()` (or `store_failed(error)`)."""

    record: SpoolRecord


@dataclass(frozen=True)
class Unspoolable:
    """The client asked for something that needs the database. Hold it; then `refuse(reason)`."""

    reason: str


Verdict = Store | Unspoolable


@dataclass
class Reply:
    """What to do after a message: send `data` to the client now, then act on `verdict`."""

    data: bytes = b""
    verdict: Verdict | None = None


class _Error(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class _NeedsDatabase(Exception):
    pass


@dataclass
class _Prepared:
    sql: str
    oids: tuple[int, ...]
    stmt: Statement | None  # None when the front door answers it (a known SELECT/SHOW)
    param_count: int


@dataclass
class _Portal:
    prepared: _Prepared
    formats: tuple[int, ...]
    values: tuple[bytes | None, ...]
    answer: bytes | None = None  # front-door answer for this portal


@dataclass
class _Savepoint:
    name: str
    pending: int
    settings: dict[str, str]


@dataclass
class _Continuation:
    """What `stored()` does: the bytes to send, then (simple Query) the statements left to run."""

    data: bytes
    rest: list[Statement] = field(default_factory=list)
    simple: bool = True
    extended_commit: bool = False
    is_commit: bool = False  # simple Query: an explicit COMMIT (the Query goes on after it)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def session_settings(startup: Mapping[str, str], server: Mapping[str, str] | None) -> dict[str, str]:
    """The settings a record carries: the server's reported baseline, then the client's startup
    values (including `options=-c name=value`), for the names in SPOOL_SETTINGS."""
    settings: dict[str, str] = {}
    for name in _BASELINE:
        if server and name in server:
            settings[name] = server[name]
    for key, value in _session_values(startup):
        canonical = SPOOL_SETTINGS.get(key)
        if canonical is not None:
            settings[canonical] = value
    return settings


def _session_values(startup: Mapping[str, str]) -> list[tuple[str, str]]:
    """(lowercase name, value) of every setting the session was given, in the order PostgreSQL
    applies them (the last one wins): `options` first, then the other startup parameters, then
    (as the session passes them, after those) what the session SET before the outage."""
    pairs = [(k.lower(), v) for k, v in _options(startup.get("options", ""))]
    pairs.extend((k.lower(), v) for k, v in startup.items() if k.lower() != "options")
    return pairs


def _session_value(startup: Mapping[str, str], name: str) -> str | None:
    found = None
    for key, value in _session_values(startup):
        if key == name:
            found = value
    return found


def _options(options: str) -> list[tuple[str, str]]:
    """`-c name=value` / `--name=value` pairs of libpq's `options` (backslash escapes spaces)."""
    words: list[str] = []
    current = ""
    escaped = False
    for ch in options:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                words.append(current)
            current = ""
        else:
            current += ch
    if current:
        words.append(current)
    pairs = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            word, i = words[i + 1], i + 1
        elif word.startswith("-c") or word.startswith("--"):
            word = word[2:]
        else:
            i += 1
            continue
        if "=" in word:
            name, value = word.split("=", 1)
            pairs.append((name.replace("-", "_"), value))
        i += 1
    return pairs


class OutageResponder:
    """One client session served without a database. See the module docstring."""

    def __init__(
        self,
        frontdoor: FrontDoorCache,
        classifier: Classifier,
        user: str,
        database: str,
        settings: Mapping[str, str],
        clock: Callable[[], dt.datetime] = _utc_now,
        new_id: Callable[[], str] = new_record_id,
    ) -> None:
        self.frontdoor = frontdoor
        self.classifier = classifier
        self.user = user
        self.database = database
        self._startup = dict(settings)
        self.settings = session_settings(settings, frontdoor.parameters(user, database))
        # Read only to decide what text may be spooled (never replayed: see classify).
        self._backslash_quote = _session_value(settings, "backslash_quote")
        self._unreplayable = sorted(
            name for name in UNREPLAYABLE_SETTINGS
            if (_session_value(settings, name) or "").lower() not in ("", "none", "default", "origin")
        )  # fmt: skip
        self._clock = clock
        self._new_id = new_id
        self.status = m.TX_IDLE  # what the next ReadyForQuery reports
        self.explicit = False  # inside BEGIN ... COMMIT
        self.read_only = False
        self.pending: list[SpooledStatement] = []  # the current transaction's statements
        self._tx_settings: dict[str, str] | None = None  # settings at BEGIN (SET LOCAL undo)
        self._tx_instant: dt.datetime | None = None  # now() of the current transaction
        self._savepoints: list[_Savepoint] = []
        self._statements: dict[str, _Prepared] = {}
        self._portals: dict[str, _Portal] = {}
        self._skipping = False  # extended protocol: an error happened, ignore until Sync
        self._local: set[str] = set()  # names SET LOCAL in the current transaction
        self._held = b""  # simple Query: answers withheld until its implicit commit is stored
        self._waiting: _Continuation | None = None  # a Store verdict is outstanding
        self._refusing: bool | None = None  # an Unspoolable verdict is outstanding (simple?)

    # ------------------------------------------------------------------ public API

    @property
    def in_transaction(self) -> bool:
        return self.explicit

    def feed(self, type_byte: int, body: bytes) -> Reply:
        """One client message (type byte, body without the 5-byte header)."""
        if self._waiting is not None or self._refusing is not None:
            raise RuntimeError("OutageResponder fed while a verdict is outstanding")
        if type_byte == m.F_QUERY:
            if not is_utf8(self.settings.get("client_encoding")) and not body.isascii():
                # Not UTF-8 (nor to be decoded as such): refused before reading it. See classify.
                reason = text_refusal(body, self.settings, self._backslash_quote)
                if reason is not None:
                    self._held = b""
                    self._refusing = True
                    return Reply(verdict=Unspoolable(reason))
            return self._simple(m.decode_query(body))
        if type_byte == m.F_SYNC:
            return self._sync()
        if type_byte == m.F_FLUSH:
            return Reply()
        if self._skipping:
            return Reply()
        try:
            if type_byte == m.F_PARSE:
                return Reply(self._parse(body))
            if type_byte == m.F_BIND:
                return Reply(self._bind(body))
            if type_byte == m.F_DESCRIBE:
                return Reply(self._describe(body))
            if type_byte == m.F_EXECUTE:
                return self._execute(body)
            if type_byte == m.F_CLOSE:
                kind, name = m.decode_close(body)
                (self._statements if kind == "S" else self._portals).pop(name, None)
                return Reply(_CLOSE_COMPLETE)
            if type_byte == m.F_FUNCTION_CALL:
                raise _NeedsDatabase("a function call needs the database")
        except _Error as exc:
            return Reply(self._extended_error(exc.sqlstate, exc.message))
        except _NeedsDatabase as exc:
            self._refusing = False
            return Reply(verdict=Unspoolable(str(exc)))
        # COPY data with no COPY in progress: PostgreSQL ignores it too (until Sync).
        return Reply()

    def stored(self) -> Reply:
        """The record of the last `Store` verdict is durable: acknowledge the commit."""
        then = self._waiting
        if then is None:
            raise RuntimeError("stored() without an outstanding Store verdict")
        self._waiting = None
        self._end_transaction(commit=True)
        if then.extended_commit:
            return Reply(then.data)
        if then.simple and then.is_commit:
            # The statements after COMMIT in the same Query (often none: then just ReadyForQuery).
            more = self._run_statements(then.rest)
            return Reply(then.data + more.data, more.verdict)
        return Reply(then.data)

    def store_failed(self, error: str) -> bytes:
        """The append failed: the transaction is not committed; tell the client so."""
        then = self._waiting
        if then is None:
            raise RuntimeError("store_failed() without an outstanding Store verdict")
        self._waiting = None
        self._end_transaction(commit=False)
        self._held = b""
        err = m.error_response(
            NO_WRITER,
            f"no database writer is available and the transaction could not be spooled: {error}",
            detail="The transaction was not committed.",
        )
        if then.extended_commit:
            # Execute(COMMIT) failed: the rest of the batch is skipped; Sync reports idle.
            self._skipping = True
            return err
        return err + m.ready_for_query(m.TX_IDLE)

    def refuse(self, reason: str) -> bytes:
        """The hold is over and still no writer: the 57P03 error for the held request."""
        simple = self._refusing
        if simple is None:
            raise RuntimeError("refuse() without an outstanding Unspoolable verdict")
        self._refusing = None
        err = m.error_response(
            NO_WRITER,
            f"no database writer is available: {reason}",
            hint="During a database outage only transactions of simple INSERTs are accepted; retry later.",
        )
        held, self._held = self._held, b""
        self._abort()
        if simple:
            return held + err + m.ready_for_query(self.status)
        self._skipping = True
        return err

    def named_statements(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, query, parameter types) of the named statements the session has now."""
        return [(name, p.sql, p.oids) for name, p in self._statements.items() if name]

    def handoff(self) -> list[SpooledStatement]:
        """Statements of the open transaction, for a session that moves to a returning writer in
        the middle of one (they must be run there before the held request)."""
        return list(self.pending)

    # ------------------------------------------------------------------ transactions

    def _begin(self, read_only: bool = False) -> None:
        self.explicit = True
        self.read_only = read_only
        self.status = m.TX_IN_BLOCK
        self._tx_settings = dict(self.settings)
        if self._tx_instant is None:
            self._tx_instant = self._clock()

    def _end_transaction(self, commit: bool) -> None:
        self.explicit = False
        self.read_only = False
        self.status = m.TX_IDLE
        self.pending = []
        self._savepoints = []
        self._tx_instant = None
        if self._tx_settings is not None:
            # SET LOCAL ends with the transaction; a rolled-back SET is undone too.
            if commit:
                self.settings = {k: v for k, v in self.settings.items() if k not in self._local}
                self.settings.update({k: v for k, v in self._tx_settings.items() if k in self._local})
            else:
                self.settings = self._tx_settings
        self._tx_settings = None
        self._local = set()

    def _abort(self) -> None:
        """An error: an explicit block becomes failed, an implicit transaction is rolled back."""
        if self.explicit:
            self.status = m.TX_FAILED
        else:
            self._end_transaction(commit=False)

    def _record(self) -> SpoolRecord:
        # created_at is the transaction's pinned instant: the time its now() values show.
        created = self._instant().timestamp()
        return SpoolRecord(
            self._new_id(), created, self.user, self.database, dict(self.settings), tuple(self.pending)
        )

    def _instant(self) -> dt.datetime:
        if self._tx_instant is None:
            self._tx_instant = self._clock()
        return self._tx_instant

    # ------------------------------------------------------------------ statements

    def _run(self, stmt: Statement, values: tuple[bytes | None, ...] = (), formats: tuple[int, ...] = (),
             oids: tuple[int, ...] = ()) -> bytes | None:  # fmt: skip
        """Execute one classified statement; returns its answer, or None for a COMMIT that needs
        storing (the caller makes the Store verdict). Raises _Error / _NeedsDatabase."""
        kind = stmt.kind
        if self.status == m.TX_FAILED and kind not in (Kind.ROLLBACK, Kind.COMMIT, Kind.ROLLBACK_TO):
            raise _Error(
                "25P02", "current transaction is aborted, commands ignored until end of transaction block"
            )
        if kind is Kind.INSERT and self._unreplayable:
            raise _NeedsDatabase(
                f"this session has {', '.join(self._unreplayable)} set, which a replay cannot reproduce"
            )
        if kind is Kind.INSERT:
            if self.read_only:
                raise _Error("25006", "cannot execute INSERT in a read-only transaction")
            self.pending.append(
                SpooledStatement(stmt.sql_at(self._instant()), oids[: len(values)], formats, values, stmt.tag)
            )
            return m.command_complete(stmt.tag)
        if kind is Kind.BEGIN:
            if self.explicit:
                return _warning("25001", "there is already a transaction in progress") + m.command_complete(
                    stmt.tag
                )
            self._begin(stmt.read_only)
            return m.command_complete(stmt.tag)
        if kind is Kind.COMMIT:
            if self.status == m.TX_FAILED:
                self._end_transaction(commit=False)
                return m.command_complete("ROLLBACK")
            if not self.explicit:
                return _warning("25P01", "there is no transaction in progress") + m.command_complete("COMMIT")
            if self.pending:
                return None
            self._end_transaction(commit=True)
            return m.command_complete("COMMIT")
        if kind is Kind.ROLLBACK:
            if not self.explicit:
                return _warning("25P01", "there is no transaction in progress") + m.command_complete(
                    "ROLLBACK"
                )
            self._end_transaction(commit=False)
            return m.command_complete("ROLLBACK")
        if kind is Kind.SAVEPOINT:
            if not self.explicit:
                raise _Error("25P01", "SAVEPOINT can only be used in transaction blocks")
            self._savepoints.append(_Savepoint(stmt.name, len(self.pending), dict(self.settings)))
            return m.command_complete("SAVEPOINT")
        if kind in (Kind.RELEASE, Kind.ROLLBACK_TO):
            if not self.explicit:
                verb = "RELEASE SAVEPOINT" if kind is Kind.RELEASE else "ROLLBACK TO SAVEPOINT"
                raise _Error("25P01", f"{verb} can only be used in transaction blocks")
            for index in range(len(self._savepoints) - 1, -1, -1):
                if self._savepoints[index].name == stmt.name:
                    break
            else:
                raise _Error("3B001", f'savepoint "{stmt.name}" does not exist')
            point = self._savepoints[index]
            if kind is Kind.RELEASE:
                del self._savepoints[index:]
                return m.command_complete("RELEASE")
            # ROLLBACK TO keeps the savepoint itself; later ones go.
            del self._savepoints[index + 1 :]
            del self.pending[point.pending :]
            self.settings = dict(point.settings)
            self.status = m.TX_IN_BLOCK
            return m.command_complete("ROLLBACK")
        if kind is Kind.SET:
            if stmt.name:
                self._apply_set(stmt)
            return m.command_complete(stmt.tag)
        if kind is Kind.DEALLOCATE:
            if stmt.name:
                if self._statements.pop(stmt.name, None) is None:
                    raise _Error("26000", f'prepared statement "{stmt.name}" does not exist')
            else:
                self._statements.clear()
            return m.command_complete(stmt.tag)
        if kind is Kind.DISCARD:
            if self.explicit:
                raise _Error("25001", "DISCARD ALL cannot run inside a transaction block")
            self._statements.clear()
            self._portals.clear()
            self.settings = session_settings(
                self._startup, self.frontdoor.parameters(self.user, self.database)
            )
            return m.command_complete(stmt.tag)
        if kind is Kind.EMPTY:
            return m.empty_query_response()
        if kind is Kind.SYNTAX_ERROR:
            raise _Error("42601", stmt.reason)
        raise _NeedsDatabase(stmt.reason)

    def _apply_set(self, stmt: Statement) -> None:
        if stmt.local and not self.explicit:
            return  # SET LOCAL outside a block: PostgreSQL warns and does nothing
        if self._tx_settings is None and self.explicit:
            self._tx_settings = dict(self.settings)
        if stmt.local:
            self._local = self._local | {stmt.name}
        if stmt.value is None:
            baseline = session_settings({}, self.frontdoor.parameters(self.user, self.database))
            if stmt.name in baseline:
                self.settings[stmt.name] = baseline[stmt.name]
            else:
                self.settings.pop(stmt.name, None)
        else:
            self.settings[stmt.name] = stmt.value

    # ------------------------------------------------------------------ simple protocol

    def _simple(self, sql: str) -> Reply:
        self._held = b""
        if self.status != m.TX_FAILED:
            answer = self.frontdoor.answer(self.user, self.database, sql)
            if answer is not None:
                return Reply(answer + m.ready_for_query(self.status))
        # PostgreSQL reads the whole Query string under the settings in force when it arrives
        # (a SET inside it applies to the next one): so is it checked here.
        reason = text_refusal(sql, self.settings, self._backslash_quote)
        if reason is not None:
            self._refusing = True
            return Reply(verdict=Unspoolable(reason))
        statements = list(self.classifier.classify(sql).statements)
        if len(statements) == 1 and statements[0].kind is Kind.EMPTY:
            return Reply(m.empty_query_response() + m.ready_for_query(self.status))
        statements = [s for s in statements if s.kind is not Kind.EMPTY]
        return self._run_statements(statements)

    def _run_statements(self, statements: list[Statement]) -> Reply:
        # `out` can go to the client at once; `self._held` starts at the first INSERT of an
        # implicit transaction (no BEGIN) and everything after it waits until that transaction is
        # stored, so the client never sees "INSERT 0 1" for a row that was not spooled.
        out = b""
        for index, stmt in enumerate(statements):
            implicit = not self.explicit
            try:
                answer = self._run(stmt)
            except _Error as exc:
                data = out + self._held + m.error_response(exc.sqlstate, exc.message)
                self._held = b""
                self._abort()
                return Reply(data + m.ready_for_query(self.status))
            except _NeedsDatabase as exc:
                self._refusing = True  # refuse() sends the held answers, then the error
                return Reply(out, Unspoolable(str(exc)))
            if answer is None:  # COMMIT of a transaction with statements: store it first
                self._waiting = _Continuation(
                    self._held + m.command_complete(stmt.tag), statements[index + 1 :], is_commit=True
                )
                self._held = b""
                return Reply(out, Store(self._record()))
            if self._held or (implicit and stmt.kind is Kind.INSERT):
                self._held += answer
            else:
                out += answer
        if not self.explicit and self.pending:
            self._waiting = _Continuation(self._held + m.ready_for_query(m.TX_IDLE))
            self._held = b""
            return Reply(out, Store(self._record()))
        if not self.explicit:
            self._end_transaction(commit=True)
        held, self._held = self._held, b""
        return Reply(out + held + m.ready_for_query(self.status))

    # ------------------------------------------------------------------ extended protocol

    def _extended_error(self, sqlstate: str, message: str) -> bytes:
        self._skipping = True
        self._abort()
        return m.error_response(sqlstate, message)

    def _parse(self, body: bytes) -> bytes:
        msg = m.decode_parse(body)
        if msg.name and msg.name in self._statements:
            raise _Error("42P05", f'prepared statement "{msg.name}" already exists')
        answer = self.frontdoor.answer(self.user, self.database, msg.query, ())
        known = answer is not None or any(sql == msg.query for sql, _ in self.frontdoor.known_extended())
        statements = self.classifier.classify(msg.query).statements
        if len(statements) > 1:
            raise _Error("42601", "cannot insert multiple commands into a prepared statement")
        stmt = statements[0]
        # Parse reads the text under the settings in force now; the statement keeps that
        # reading. Refused at Describe/Execute, like any statement that needs the database (a
        # Parse gives no verdict: the session also replays its prepared statements through here).
        reason = None if known else text_refusal(msg.query, self.settings, self._backslash_quote)
        if reason is not None and stmt.kind is not Kind.SYNTAX_ERROR:
            stmt = Statement(Kind.REFUSED, msg.query, reason=reason)
        if stmt.kind is Kind.SYNTAX_ERROR:
            raise _Error("42601", stmt.reason)
        count = max(stmt.param_count, len(msg.param_types))
        if known and not stmt.spoolable:
            count = max(count, _count_params(msg.query))
            self._statements[msg.name] = _Prepared(msg.query, msg.param_types, None, count)
        else:
            self._statements[msg.name] = _Prepared(msg.query, msg.param_types, stmt, count)
        return _PARSE_COMPLETE

    def _bind(self, body: bytes) -> bytes:
        portal, name, formats, values = _decode_bind(body)
        prepared = self._statements.get(name)
        if prepared is None:
            raise _Error("26000", f'prepared statement "{name}" does not exist')
        if prepared.stmt is not None and prepared.stmt.spoolable and len(values) != prepared.param_count:
            raise _Error(
                "08P01",
                f'bind message supplies {len(values)} parameters, but prepared statement "{name}" '
                f"requires {prepared.param_count}",
            )
        if len(formats) == 0:
            expanded = (0,) * len(values)
        elif len(formats) == 1:
            expanded = formats * len(values)
        elif len(formats) == len(values):
            expanded = formats
        else:
            raise _Error(
                "08P01", f"bind message has {len(formats)} parameter formats but {len(values)} parameters"
            )
        answer = None
        if prepared.stmt is None:
            if any(f != 0 for f in expanded):
                raise _NeedsDatabase("a binary-parameter catalog query needs the database")
            answer = self.frontdoor.answer(
                self.user,
                self.database,
                prepared.sql,
                tuple(v.decode("utf-8", "replace") if v is not None else None for v in values),
            )
        self._portals[portal] = _Portal(prepared, expanded, values, answer)
        return _BIND_COMPLETE

    def _describe(self, body: bytes) -> bytes:
        kind, name = m.decode_close(body)
        if kind == "S":
            prepared = self._statements.get(name)
            if prepared is None:
                raise _Error("26000", f'prepared statement "{name}" does not exist')
            oids = prepared.oids + (0,) * (prepared.param_count - len(prepared.oids))
            description = m.parameter_description(oids)
            if prepared.stmt is None:
                # A known catalog query: its row shape is that of any cached answer to it.
                answer = self.frontdoor.answer(
                    self.user, self.database, prepared.sql, ()
                ) or self._any_answer(prepared.sql)
                if answer is None:
                    raise _NeedsDatabase("this query needs the database")
                return description + describe_and_rows(answer)[0]
            if not prepared.stmt.spoolable:
                raise _NeedsDatabase(prepared.stmt.reason)
            return description + _NO_DATA
        portal = self._portals.get(name)
        if portal is None:
            raise _Error("34000", f'portal "{name}" does not exist')
        if portal.prepared.stmt is None:
            if portal.answer is None:
                raise _NeedsDatabase("this query needs the database (no cached answer)")
            return describe_and_rows(portal.answer)[0]
        if not portal.prepared.stmt.spoolable:
            raise _NeedsDatabase(portal.prepared.stmt.reason)
        return _NO_DATA

    def _any_answer(self, sql: str) -> bytes | None:
        for known, params in self.frontdoor.known_extended():
            if known == sql:
                return self.frontdoor.answer(self.user, self.database, sql, params)
        return None

    def _execute(self, body: bytes) -> Reply:
        portal_name = body.split(b"\x00", 1)[0].decode("utf-8", "replace")
        portal = self._portals.get(portal_name)
        if portal is None:
            raise _Error("34000", f'portal "{portal_name}" does not exist')
        prepared = portal.prepared
        if prepared.stmt is None:
            if self.status == m.TX_FAILED:
                raise _Error(
                    "25P02", "current transaction is aborted, commands ignored until end of transaction block"
                )
            if portal.answer is None:
                raise _NeedsDatabase("this query needs the database (no cached answer)")
            return Reply(describe_and_rows(portal.answer)[1])
        stmt = prepared.stmt
        answer = self._run(stmt, portal.values, portal.formats, prepared.oids)
        if answer is None:
            self._waiting = _Continuation(m.command_complete(stmt.tag), simple=False, extended_commit=True)
            return Reply(verdict=Store(self._record()))
        return Reply(answer)

    def _sync(self) -> Reply:
        self._skipping = False
        if self.explicit:
            return Reply(m.ready_for_query(self.status))
        if self.pending:
            # The batch's implicit transaction commits at Sync.
            self._waiting = _Continuation(m.ready_for_query(m.TX_IDLE), simple=False)
            return Reply(verdict=Store(self._record()))
        self._end_transaction(commit=True)
        return Reply(m.ready_for_query(m.TX_IDLE))


def _warning(sqlstate: str, text: str) -> bytes:
    return m.error_response(sqlstate, text, severity="WARNING", notice=True)


def _count_params(sql: str) -> int:
    found = [int(n) for n in re.findall(r"\$(\d+)", sql)]
    return max(found, default=0)


def _decode_bind(body: bytes) -> tuple[str, str, tuple[int, ...], tuple[bytes | None, ...]]:
    """Bind: (portal, statement, parameter format codes as sent, raw values)."""
    try:
        end = body.index(b"\x00")
        portal = body[:end].decode()
        pos = end + 1
        end = body.index(b"\x00", pos)
        name = body[pos:end].decode()
        pos = end + 1
        (nformats,) = _I16.unpack_from(body, pos)
        pos += 2
        formats = struct.unpack_from(f"!{nformats}h", body, pos)
        pos += 2 * nformats
        (nvalues,) = _I16.unpack_from(body, pos)
        pos += 2
        values: list[bytes | None] = []
        for _ in range(nvalues):
            (length,) = _I32.unpack_from(body, pos)
            pos += 4
            if length == -1:
                values.append(None)
            else:
                if length < 0 or pos + length > len(body):
                    raise ProtocolViolation("malformed Bind message: truncated value")
                values.append(body[pos : pos + length])
                pos += length
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolViolation("malformed Bind message") from exc
    if any(f not in (0, 1) for f in formats):
        raise ProtocolViolation("malformed Bind message: format code not 0 or 1")
    return portal, name, tuple(formats), tuple(values)
