"""Replay the spool into the database, in record id order, exactly once.

Each record becomes one upstream transaction:

    BEGIN
    SELECT set_config(name, value, true)            -- the session's settings, transaction-local
    INSERT INTO pgsidecar.spool_applied (id) VALUES ($1) ON CONFLICT DO NOTHING
      -> 0 rows: applied before (a crash between COMMIT and removal): ROLLBACK, "duplicate"
    <each statement: Parse (record's types) / Bind (record's formats, raw values) / Execute>
    COMMIT
    -> only then is the record removed from the store

The ledger row commits or rolls back with the record's own rows, so whatever fails, and wherever
the sidecar crashes, a record is applied at most once, and it stays in the store until it is.

Errors: a transient one (connection lost, server shutting down, serialization failure, writer
turned read-only...) stops the drain; the record stays pending and is retried at the next drain.
Any other error (unique violation, missing table, bad value) is the record's own: it is rolled
back and moved to the dead letters with the error, and the drain goes on with the next record.

A lease held in the store (renewed by a heartbeat) keeps several sidecars sharing one store from
draining at the same time, which keeps the replay in order; exactly-once does not depend on it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction

from .. import logs
from ..metrics import Stats
from ..protocol import messages as m
from ..protocol.sqlstate import ProxyError
from ..server import ServerConnection, UpstreamError
from .classify import Column, insert_target, pin_defaults, text_refusal
from .record import SpoolRecord
from .store import SpoolError, SpoolStore

Connector = Callable[[str, str], Awaitable[ServerConnection]]
"""(user, database) -> a logged-in upstream connection to the current writer."""

LEDGER_SCHEMA = "pgsidecar"
LEDGER_TABLE = "pgsidecar.spool_applied"
LEDGER_DDL = (
    "CREATE SCHEMA IF NOT EXISTS pgsidecar; "
    "CREATE TABLE IF NOT EXISTS pgsidecar.spool_applied "
    "(id text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now()); "
    # Records are replayed as the user who wrote them, whoever that is. Ids are unguessable, so
    # letting anyone insert costs nothing; letting anyone read shows only ids and times.
    "GRANT USAGE ON SCHEMA pgsidecar TO PUBLIC; "
    "GRANT SELECT, INSERT ON pgsidecar.spool_applied TO PUBLIC"
)
# In the replay transaction itself: a conflict must abort it (a record is applied at most once).
LEDGER_CLAIM = "INSERT INTO pgsidecar.spool_applied (id) VALUES ($1)"
UNIQUE_VIOLATION = "23505"
SET_CONFIG = "SELECT pg_catalog.set_config($1, $2, true)"

# Reported by the server but not settable: a record may carry them if the caller copied every
# ParameterStatus; they say nothing about how to read the record, so they are skipped.
READ_ONLY_SETTINGS = frozenset(
    {"server_version", "server_encoding", "is_superuser", "session_authorization", "integer_datetimes",
     "in_hot_standby", "scram_iterations"}
)  # fmt: skip

# Settings the replay sets itself, whatever the record says (see `_opening`).
_REPLACED_SETTINGS = frozenset({"standard_conforming_strings", "escape_string_warning"})

# SQLSTATEs that say "not now" rather than "never": the record is retried at the next drain.
TRANSIENT_CLASSES = ("08", "53", "57P", "58")
TRANSIENT_CODES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "25006",  # read_only_sql_transaction: the writer was demoted under us
        "57014",  # query_canceled (statement_timeout, an operator's cancel)
        "55P03",  # lock_not_available
    }
)

DEFAULT_LEASE_TTL = 30.0
DEFAULT_RECORD_TIMEOUT = 60.0
TEXT_OID = 25


def is_transient(sqlstate: str) -> bool:
    return sqlstate in TRANSIENT_CODES or sqlstate.startswith(TRANSIENT_CLASSES)


def _statement(
    sql: bytes, oids: Sequence[int], formats: Sequence[int], values: Sequence[bytes | None]
) -> bytes:
    # Results all in text: they are discarded anyway.
    return m.parse("", sql, oids) + m.bind("", "", formats, values) + m.execute()


# PostgreSQL encoding names that Python spells differently (others are found by codecs.lookup).
_PG_CODECS = {
    "UTF8": "utf-8", "UNICODE": "utf-8", "SQL_ASCII": "latin-1", "LATIN1": "iso8859-1",
    "LATIN2": "iso8859-2", "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9",
    "LATIN6": "iso8859-10", "LATIN7": "iso8859-13", "LATIN8": "iso8859-14", "LATIN9": "iso8859-15",
    "LATIN10": "iso8859-16", "EUC_CN": "gb2312", "UHC": "cp949", "SJIS": "shift_jis",
    "KOI8R": "koi8_r", "KOI8U": "koi8_u", "ALT": "cp866",
}  # fmt: skip


def python_codec(pg_encoding: str | None) -> str:
    """The Python codec for a PostgreSQL client_encoding name (UTF-8 when unknown or unset)."""
    if not pg_encoding:
        return "utf-8"
    name = pg_encoding.upper().replace("-", "_")
    if name in _PG_CODECS:
        return _PG_CODECS[name]
    if name.startswith("WIN"):
        name = "cp" + name[3:]
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


# ------------------------------------------------------------------------------------------


class ApplyOutcome(Enum):
    APPLIED = "replayed"
    DUPLICATE = "duplicate"


class ReplayFailed(Exception):
    """A record could not be applied. `retry`: not the record's fault (stop, try again later)."""

    def __init__(self, message: str, sqlstate: str, retry: bool) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.retry = retry


class LedgerMissing(Exception):
    """The ledger table is absent and could not be created with the replaying user's rights."""


@dataclass
class DrainResult:
    replayed: int = 0
    duplicate: int = 0
    dead_letter: int = 0
    remaining: int = 0  # pending records after the drain (-1: the store could not say)
    stopped_by_error: str | None = None  # why the drain stopped early; None: it ran to the end
    lease_busy: bool = False  # another replayer holds the lease: nothing was attempted

    @property
    def complete(self) -> bool:
        """The spool was emptied (dead letters aside): the work held behind it may go on."""
        return self.stopped_by_error is None and not self.lease_busy and self.remaining == 0


@dataclass
class _Reply:
    tags: list[str]
    error: dict[str, str] | None
    error_at: int  # how many commands completed before the error
    status: int


async def _exchange(conn: ServerConnection, data: bytes) -> _Reply:
    """Send a batch ending in Sync and read up to its ReadyForQuery."""
    conn.send(data)
    tags: list[str] = []
    error: dict[str, str] | None = None
    error_at = -1
    while True:
        type_byte, body = await conn.read_message()
        if type_byte == m.B_COMMAND_COMPLETE:
            tags.append(m.decode_command_complete(body))
        elif type_byte == m.B_EMPTY_QUERY:
            tags.append("")
        elif type_byte == m.B_ERROR:
            if error is None:  # after an error the server skips to Sync: there is only one
                error = m.decode_error_fields(body)
                error_at = len(tags)
        elif type_byte == m.B_PARAMETER_STATUS:
            name, value = m.decode_parameter_status(body)
            conn.note_parameter(name, value)  # (never edited in place: the dict may be shared)
        elif type_byte == m.B_READY_FOR_QUERY:
            conn.tx_status = m.decode_ready_for_query(body)
            return _Reply(tags, error, error_at, conn.tx_status)
        # ParseComplete, BindComplete, DataRow (RETURNING), NoData, notices: nothing to do.


async def _exchange_rows(
    conn: ServerConnection, data: bytes
) -> tuple[_Reply, list[list[list[bytes | None]]]]:
    """`_exchange`, also keeping each command's rows (the list at index i: command i's)."""
    conn.send(data)
    tags: list[str] = []
    rows: list[list[list[bytes | None]]] = [[]]
    error: dict[str, str] | None = None
    error_at = -1
    while True:
        type_byte, body = await conn.read_message()
        if type_byte == m.B_DATA_ROW:
            rows[-1].append(m.decode_data_row(body))
        elif type_byte == m.B_COMMAND_COMPLETE:
            tags.append(m.decode_command_complete(body))
            rows.append([])
        elif type_byte == m.B_ERROR:
            if error is None:
                error = m.decode_error_fields(body)
                error_at = len(tags)
        elif type_byte == m.B_PARAMETER_STATUS:
            name, value = m.decode_parameter_status(body)
            conn.note_parameter(name, value)
        elif type_byte == m.B_READY_FOR_QUERY:
            conn.tx_status = m.decode_ready_for_query(body)
            return _Reply(tags, error, error_at, conn.tx_status), rows


def _describe(fields: dict[str, str]) -> str:
    """An error's message and detail (the SQLSTATE is kept apart, in its own field)."""
    detail = fields.get("D")
    return fields.get("M", "error") + (f" ({detail})" if detail else "")


async def _rollback(conn: ServerConnection) -> None:
    if conn.tx_status != m.TX_IDLE:
        with contextlib.suppress(UpstreamError):
            await conn.simple_query("ROLLBACK")


async def ensure_ledger(conn: ServerConnection) -> None:
    """Create the ledger schema and table (idempotent; needs CREATE on the database)."""
    for attempt in range(2):
        try:
            await conn.simple_query(LEDGER_DDL)
            return
        except UpstreamError as exc:
            # Two sidecars creating it at once: one gets a unique violation on the catalog; the
            # second attempt finds it in place.
            if attempt == 0 and exc.code in ("23505", "42P06", "42P07"):
                continue
            raise


async def ledger_exists(conn: ServerConnection) -> bool:
    result = await conn.simple_query(f"SELECT to_regclass('{LEDGER_TABLE}') IS NOT NULL")
    return bool(result.rows) and result.rows[0][0] == "t"


def _opening(
    conn: ServerConnection, record: SpoolRecord
) -> tuple[list[bytes], list[tuple[str, str]], str | None, str]:
    """BEGIN and the record's settings (as messages), the settings applied, the record's
    client_encoding and the codec its statements are written in."""
    conn_codec = python_codec(conn.params.get("client_encoding"))
    settings = [
        (k, v) for k, v in record.settings.items()
        if k.lower() not in READ_ONLY_SETTINGS and k.lower() not in _REPLACED_SETTINGS
    ]  # fmt: skip
    # The classifier read the text with standard_conforming_strings on (text it could not read
    # the same way was refused, or is dead-lettered: `ambiguity`): so is it replayed.
    settings.append(("standard_conforming_strings", "on"))
    # client_encoding last: from then on the server reads text in the client's encoding, which is
    # how the record's statements and text parameters were written.
    settings.sort(key=lambda kv: kv[0].lower() == "client_encoding")
    client_encoding = next((v for k, v in settings if k.lower() == "client_encoding"), None)
    record_codec = python_codec(client_encoding) if client_encoding else conn_codec
    batch = [_statement(b"BEGIN", (), (), ())]
    for name, value in settings:
        batch.append(
            _statement(SET_CONFIG.encode(), (TEXT_OID, TEXT_OID), (0, 0), (name.encode(conn_codec),
                       value.encode(conn_codec)))
        )  # fmt: skip
    return batch, settings, client_encoding, record_codec


# The columns of a spooled INSERT's table, with their defaults, as the replay transaction's
# search_path resolves the name: what `ClockDefaults` pins.
COLUMNS_SQL = (
    "SELECT a.attname, pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attgenerated <> '' "
    # A column the user may not INSERT into (column privileges) is left to its default.
    "OR NOT pg_catalog.has_column_privilege(a.attrelid, a.attnum, 'INSERT') "
    "FROM pg_catalog.pg_attribute a LEFT JOIN pg_catalog.pg_attrdef d "
    "ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
    "WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped "
    "ORDER BY a.attnum"
)


def acknowledged_at(record: SpoolRecord) -> dt.datetime:
    """The instant the record's transaction was acknowledged (its now()), to the microsecond:
    created_at is that instant's timestamp(), a float within 0.25 us of it until 2106; the
    product is taken exactly (a float product could round by another 0.25 us)."""
    return _EPOCH + dt.timedelta(microseconds=round(Fraction(record.created_at) * 1_000_000))


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def ambiguity(record: SpoolRecord) -> str | None:
    """Why a stored record cannot be replayed with the meaning it was acknowledged with (only
    records from before the text checks at acknowledgement can have one), or None."""
    for index, stmt in enumerate(record.statements):
        reason = text_refusal(stmt.sql, record.settings)
        if reason is not None:
            return f"statement {index + 1}: {reason}; its meaning at acknowledgement is ambiguous"
    return None


class ClockDefaults:
    """Pins column defaults that read the clock (`DEFAULT now()`, CURRENT_DATE, ...) to the
    acknowledgement instant: the columns each spooled INSERT leaves to such a default are added
    to it with the pinned value, exactly as an explicit now() is pinned when spooled.

    The table's columns are read from the catalog (one round trip per table, search path, user
    and database; kept for one drain) under the record's own settings, in a transaction that is
    rolled back. Not pinned: clock readings in triggers, in domain defaults, and clock_timestamp()
    (which differs row by row anyway).
    """

    def __init__(self) -> None:
        self._columns: dict[tuple[str, str, str, tuple[str, ...]], list[Column]] = {}
        self._targets: dict[str, tuple[str, ...] | None] = {}  # by statement text: drivers repeat it

    def _target(self, sql: str) -> tuple[str, ...] | None:
        if sql not in self._targets:
            if len(self._targets) >= 4096:
                self._targets.clear()
            self._targets[sql] = insert_target(sql)
        return self._targets[sql]

    async def statements(self, conn: ServerConnection, record: SpoolRecord) -> list[str]:
        """The record's statements as they are to run: with clock defaults pinned."""
        targets = [self._target(stmt.sql) for stmt in record.statements]
        where = (record.user, record.database, record.settings.get("search_path", ""))
        missing = sorted({t for t in targets if t is not None and (*where, t) not in self._columns})
        if missing:
            looked_up = await self._lookup(conn, record, missing)
            for name, columns in zip(missing, looked_up, strict=True):
                self._columns[(*where, name)] = columns
        instant = acknowledged_at(record)
        out = []
        for stmt, target in zip(record.statements, targets, strict=True):
            found = self._columns.get((*where, target)) if target is not None else None
            out.append(pin_defaults(stmt.sql, found, instant) if found else stmt.sql)
        return out

    async def _lookup(
        self, conn: ServerConnection, record: SpoolRecord, targets: list[tuple[str, ...]]
    ) -> list[list[Column]]:
        batch, settings, _, record_codec = _opening(conn, record)
        for target in targets:
            name = ".".join(m.quote_ident(part) for part in target)
            batch.append(_statement(COLUMNS_SQL.encode(), (TEXT_OID,), (0,), (name.encode(record_codec),)))
        batch.append(_statement(b"ROLLBACK", (), (), ()))
        batch.append(m.sync())
        reply, rows = await _exchange_rows(conn, b"".join(batch))
        if reply.error is not None:
            await _rollback(conn)
            code = reply.error.get("C", "XX000")
            raise ReplayFailed(f"reading column defaults: {_describe(reply.error)}", code,
                               retry=is_transient(code))  # fmt: skip
        first = 1 + len(settings)
        out = []
        for index in range(len(targets)):
            columns = []
            for row in rows[first + index]:
                attname, default, generated = row
                columns.append(Column(
                    (attname or b"").decode(record_codec),
                    None if default is None else default.decode(record_codec),
                    generated == b"t",
                ))  # fmt: skip
            out.append(columns)
        return out


async def apply_record(conn: ServerConnection, record: SpoolRecord,
                       defaults: ClockDefaults | None = None) -> ApplyOutcome:  # fmt: skip
    """Apply one record as one transaction on `conn` (does not touch the store).

    Raises ReplayFailed for an SQL error (the transaction is rolled back first, the connection
    stays usable) and ProxyError/OSError when the connection itself fails.
    """
    await _rollback(conn)  # a connection left mid-transaction by an earlier failure
    unclear = ambiguity(record)
    if unclear is not None:
        raise ReplayFailed(unclear, "22P06", retry=False)
    sqls = await (defaults or ClockDefaults()).statements(conn, record)
    # One round trip: open the transaction, apply the settings, claim the record in the ledger,
    # run the statements, commit. A record already applied makes the ledger INSERT fail with a
    # unique violation, and the server then skips everything up to the Sync: nothing of it runs.
    batch, settings, client_encoding, record_codec = _opening(conn, record)
    batch.append(_statement(LEDGER_CLAIM.encode(), (TEXT_OID,), (0,), (record.id.encode(),)))
    try:
        for stmt, sql in zip(record.statements, sqls, strict=True):
            batch.append(_statement(sql.encode(record_codec), stmt.param_oids, stmt.param_formats,
                                    stmt.values))  # fmt: skip
    except UnicodeEncodeError as exc:
        raise ReplayFailed(
            f"statement text cannot be encoded as {client_encoding}: {exc}", "22021", retry=False
        ) from exc
    batch.append(_statement(b"COMMIT", (), (), ()))
    batch.append(m.sync())
    reply = await _exchange(conn, b"".join(batch))
    ledger_at = 1 + len(settings)
    first_statement = ledger_at + 1
    count = len(record.statements)
    if reply.error is not None:
        await _rollback(conn)  # status I here means the COMMIT itself failed: nothing to undo
        code = reply.error.get("C", "XX000")
        summary = _describe(reply.error)
        if reply.error_at == ledger_at:
            if code == UNIQUE_VIOLATION:
                return ApplyOutcome.DUPLICATE  # applied before: this transaction changed nothing
            # The ledger itself failed (privileges, a dropped table): every record would; stop.
            raise ReplayFailed(f"ledger insert failed: {summary}", code, retry=True)
        if 1 <= reply.error_at < ledger_at:
            name = settings[reply.error_at - 1][0]
            raise ReplayFailed(f"setting {name} failed: {summary}", code, retry=is_transient(code))
        if reply.error_at == 0:
            raise ReplayFailed(f"BEGIN failed: {summary}", code, retry=True)
        index = reply.error_at - first_statement
        where = f"statement {index + 1}" if index < count else "COMMIT"
        raise ReplayFailed(f"{where}: {summary}", code, retry=is_transient(code))
    if len(reply.tags) != first_statement + count + 1 or reply.tags[-1] != "COMMIT":
        # "ROLLBACK", or not the answer this batch gets from PostgreSQL: never count it applied.
        await _rollback(conn)
        raise ReplayFailed(f"COMMIT was not confirmed (answers: {reply.tags})", "40000", retry=False)
    statement_tags = reply.tags[first_statement : first_statement + count]
    for stmt, tag in zip(record.statements, statement_tags, strict=True):
        if stmt.tag and tag != stmt.tag:
            # Committed; but the client was told something else (a trigger, a concurrent row for
            # ON CONFLICT DO NOTHING). Worth an operator's look, not a reason to undo.
            logs.event("spool_replay_tag_mismatch", logs.WARNING, record=record.id, acknowledged=stmt.tag,
                       replayed=tag)  # fmt: skip
    return ApplyOutcome.APPLIED


@dataclass
class _Removal:
    """Applied records whose removal from the store is under way; counted once it is done (a
    record applied but not removed is met again, as a duplicate, and must not count twice)."""

    future: asyncio.Future[None]
    outcome: ApplyOutcome
    count: int


def _removal(store: SpoolStore, ids: list[str], outcome: ApplyOutcome) -> _Removal:
    return _Removal(asyncio.ensure_future(store.remove_many(ids)), outcome, len(ids))


async def apply_chunk(conn: ServerConnection, records: Sequence[SpoolRecord],
                      defaults: ClockDefaults | None = None) -> bool:  # fmt: skip
    """Apply several records (same user, database and settings) in ONE transaction and one
    round trip: one commit flush for all of them. True when committed. On any error (a
    duplicate among them, a failing statement) everything is rolled back and False returned:
    the caller then applies them one by one, which tells each outcome apart. Exactly once holds
    either way: each record's ledger row commits or rolls back with its rows.
    """
    await _rollback(conn)
    if any(ambiguity(record) is not None for record in records):
        return False  # one by one: that record goes to the dead letters with the reason
    defaults = defaults or ClockDefaults()
    try:
        texts = [await defaults.statements(conn, record) for record in records]
    except ReplayFailed:
        return False  # one by one: the failure is reported there
    batch, settings, _, record_codec = _opening(conn, records[0])
    expected = 2 + len(settings)
    try:
        for record, sqls in zip(records, texts, strict=True):
            batch.append(_statement(LEDGER_CLAIM.encode(), (TEXT_OID,), (0,), (record.id.encode(),)))
            for stmt, sql in zip(record.statements, sqls, strict=True):
                batch.append(_statement(sql.encode(record_codec), stmt.param_oids,
                                        stmt.param_formats, stmt.values))  # fmt: skip
            expected += 1 + len(record.statements)
    except UnicodeEncodeError:
        return False
    batch.append(_statement(b"COMMIT", (), (), ()))
    batch.append(m.sync())
    reply = await _exchange(conn, b"".join(batch))
    if reply.error is None and len(reply.tags) == expected and reply.tags[-1] == "COMMIT":
        return True
    await _rollback(conn)
    return False


# Settings that do not change what an INSERT writes: records that differ only in these may
# share a replay transaction (which then runs with the first record's value).
_COSMETIC_SETTINGS = frozenset({"application_name"})


def _meaning(record: SpoolRecord) -> tuple[str, str, dict[str, str]]:
    settings = {k: v for k, v in record.settings.items() if k.lower() not in _COSMETIC_SETTINGS}
    return record.user, record.database, settings


def chunks(records: Sequence[SpoolRecord], size: int) -> list[list[SpoolRecord]]:
    """Consecutive runs (in id order) of records that may share one replay transaction: same
    user, database and settings that matter, at most `size` long."""
    out: list[list[SpoolRecord]] = []
    key: tuple[str, str, dict[str, str]] | None = None
    for record in records:
        this = _meaning(record)
        if out and len(out[-1]) < size and this == key:
            out[-1].append(record)
        else:
            out.append([record])
            key = this
    return out


class Replayer:
    """Drains a store into the database. One drain at a time per Replayer (a lock enforces it)."""

    def __init__(
        self,
        store: SpoolStore,
        connect: Connector,
        stats: Stats,
        owner: str,
        lease_ttl: float = DEFAULT_LEASE_TTL,
        *,
        batch_size: int = 100,
        record_timeout: float = DEFAULT_RECORD_TIMEOUT,
        release: Callable[[ServerConnection], None] | None = None,
        chunk_size: int = 50,
    ) -> None:
        self.store = store
        self.connect = connect
        self.stats = stats
        self.chunk_size = chunk_size  # records per replay transaction on the fast path
        self.owner = owner  # lease owner: one per sidecar (host + listen address), stable across restarts
        self.lease_ttl = lease_ttl
        self.batch_size = batch_size
        self.record_timeout = record_timeout  # one record's transaction, both round trips
        # Where healthy connections go after a drain (e.g. back to a pool); default: closed.
        self.release = release
        self._lock = asyncio.Lock()
        self._defaults = ClockDefaults()  # the tables' clock defaults, read once per drain

    async def drain(self) -> DrainResult:
        """Replay pending records until the store is empty or something transient stops it."""
        async with self._lock:
            result = DrainResult()
            try:
                if not await self.store.acquire_lease(self.owner, self.lease_ttl):
                    result.lease_busy = True
                    result.remaining = await self.store.count()
                    logs.event("spool_replay_skipped", reason="another replayer holds the lease",
                               pending=result.remaining)  # fmt: skip
                    return result
            except SpoolError as exc:
                result.stopped_by_error = f"spool store: {exc}"
                result.remaining = -1
                return result
            started = time.monotonic()
            lost = asyncio.Event()
            heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(lost), name="spool-lease")
            conns: dict[tuple[str, str], ServerConnection] = {}
            try:
                await self._drain(result, conns, lost)
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
                self._finish(conns)
                with contextlib.suppress(SpoolError):
                    await self.store.release_lease(self.owner)
            try:
                result.remaining = await self.store.count()
            except SpoolError:
                result.remaining = -1
            logs.event(
                "spool_replay_finished" if result.stopped_by_error is None else "spool_replay_stopped",
                logs.INFO if result.stopped_by_error is None else logs.WARNING,
                replayed=result.replayed,
                duplicate=result.duplicate,
                dead_letter=result.dead_letter,
                remaining=result.remaining,
                error=result.stopped_by_error,
                seconds=round(time.monotonic() - started, 3),
            )
            return result

    async def _drain(
        self, result: DrainResult, conns: dict[tuple[str, str], ServerConnection], lost: asyncio.Event
    ) -> None:
        seen: set[str] = set()
        while True:
            try:
                batch = await self.store.pending(self.batch_size)
            except (SpoolError, ValueError) as exc:
                result.stopped_by_error = f"spool store: {exc}"
                return
            if not batch:
                return
            # Removing an applied record from the store (an fsync) overlaps with applying the
            # next ones; the store's group commit makes one flush of many removals. All are
            # settled before the store is asked for more, so none is listed twice.
            removals: list[_Removal] = []
            try:
                for chunk in chunks(batch, self.chunk_size):
                    if lost.is_set():
                        result.stopped_by_error = "the replay lease was lost to another replayer"
                        return
                    again = next((r.id for r in chunk if r.id in seen), None)
                    if again is not None:
                        # Removed or dead-lettered, yet listed again: the store is not taking our
                        # writes. Stop rather than apply-and-count it forever.
                        result.stopped_by_error = f"record {again} is still pending after being handled"
                        return
                    seen.update(r.id for r in chunk)
                    if len(chunk) > 1 and await self._replay_together(chunk, conns, result, removals):
                        continue
                    for record in chunk:
                        error = await self._replay_one(record, conns, result, removals)
                        if error is not None:
                            result.stopped_by_error = error
                            return
            finally:
                failed = await self._settle(removals, result)
                if failed is not None and result.stopped_by_error is None:
                    # Applied but still pending: the next drain finds it in the ledger (a duplicate).
                    result.stopped_by_error = f"applied but not removed from the spool: {failed}"
            if result.stopped_by_error is not None:
                return

    async def _connection(self, record: SpoolRecord, conns: dict[tuple[str, str], ServerConnection]
                          ) -> ServerConnection:  # fmt: skip
        key = (record.user, record.database)
        conn = conns.get(key)
        if conn is not None and conn.transport is not None:
            return conn
        conns.pop(key, None)
        conn = await self.connect(record.user, record.database)
        conns[key] = conn
        if not await ledger_exists(conn):
            try:
                await ensure_ledger(conn)
            except UpstreamError as exc:
                raise LedgerMissing(
                    f"the ledger table {LEDGER_TABLE} does not exist in database {record.database} and "
                    f"user {record.user} cannot create it ({m.error_summary(exc.fields)}); "
                    "run `pgsidecar init-db` as a privileged user"
                ) from exc
        return conn

    async def _replay_together(
        self,
        chunk: list[SpoolRecord],
        conns: dict[tuple[str, str], ServerConnection],
        result: DrainResult,
        removals: list[_Removal],
    ) -> bool:
        """The fast path: the whole chunk in one transaction. False: apply them one by one."""
        key = (chunk[0].user, chunk[0].database)
        try:
            conn = await asyncio.wait_for(self._connection(chunk[0], conns), self.record_timeout)
            async with asyncio.timeout(self.record_timeout):
                committed = await apply_chunk(conn, chunk, self._defaults)
        except (LedgerMissing, ProxyError, OSError, TimeoutError):
            # Whatever went wrong, the one-by-one path meets it again and reports it properly.
            self._drop(conns, key, "chunked replay failed")
            return False
        if not committed:
            return False
        removals.append(_removal(self.store, [record.id for record in chunk], ApplyOutcome.APPLIED))
        return True

    async def _replay_one(
        self,
        record: SpoolRecord,
        conns: dict[tuple[str, str], ServerConnection],
        result: DrainResult,
        removals: list[_Removal],
    ) -> str | None:
        """Apply one record and settle it in the store; returns why to stop, or None to go on."""
        key = (record.user, record.database)
        try:
            conn = await asyncio.wait_for(self._connection(record, conns), self.record_timeout)
        except LedgerMissing as exc:
            return str(exc)
        except UpstreamError as exc:
            return f"cannot replay as {record.user} in {record.database}: {m.error_summary(exc.fields)}"
        except (ProxyError, OSError, TimeoutError) as exc:
            self._drop(conns, key, "connect failed")
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            return f"cannot connect as {record.user} to {record.database}: {message}"
        try:
            async with asyncio.timeout(self.record_timeout):
                outcome = await apply_record(conn, record, self._defaults)
        except ReplayFailed as exc:
            if exc.retry:
                logs.event("spool_replay_retry_later", logs.WARNING, record=record.id, sqlstate=exc.sqlstate,
                           error=exc.message)  # fmt: skip
                return f"record {record.id}: {exc.message}"
            return await self._dead_letter(record, exc, result)
        except TimeoutError:
            # Mid-exchange: the connection's state is unknown. If COMMIT did go through, the
            # ledger turns the retry into a duplicate.
            self._drop(conns, key, "replay timed out")
            return f"record {record.id}: no answer within {self.record_timeout:g}s"
        except (ProxyError, OSError) as exc:
            self._drop(conns, key, "replay connection failed")
            return f"record {record.id}: connection lost: {getattr(exc, 'message', None) or exc}"
        removals.append(_removal(self.store, [record.id], outcome))
        if outcome is ApplyOutcome.DUPLICATE:
            logs.event("spool_replay_duplicate", record=record.id)
        return None

    async def _settle(self, removals: list[_Removal], result: DrainResult) -> str | None:
        """Wait for every removal and count what it settled; the first failure, if any."""
        if not removals:
            return None
        done = await asyncio.gather(*(r.future for r in removals), return_exceptions=True)
        failure: str | None = None
        for removal, outcome in zip(removals, done, strict=True):
            if isinstance(outcome, BaseException):
                failure = failure or str(outcome) or type(outcome).__name__
                continue
            self.stats.spool_records[removal.outcome.value] += removal.count
            if removal.outcome is ApplyOutcome.APPLIED:
                result.replayed += removal.count
            else:
                result.duplicate += removal.count
        return failure

    async def _dead_letter(self, record: SpoolRecord, exc: ReplayFailed, result: DrainResult) -> str | None:
        try:
            await self.store.dead_letter(record, exc.message, exc.sqlstate)
        except SpoolError as store_exc:
            return f"record {record.id} failed ({exc.message}) and could not be dead-lettered: {store_exc}"
        self.stats.spool_records["dead_letter"] += 1
        result.dead_letter += 1
        logs.event(
            "spool_dead_letter",
            logs.ERROR,
            record=record.id,
            user=record.user,
            database=record.database,
            sqlstate=exc.sqlstate,
            error=exc.message,
        )
        return None

    async def _heartbeat(self, lost: asyncio.Event) -> None:
        ttl = self.lease_ttl
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                if not await self.store.renew_lease(self.owner, ttl):
                    lost.set()
                    return
                renewed = time.monotonic()
            except SpoolError as exc:
                # The store is briefly unreachable: the lease is still ours until it expires.
                if time.monotonic() - renewed > ttl * 2 / 3:
                    logs.event("spool_lease_lost", logs.WARNING, owner=self.owner, error=str(exc))
                    lost.set()
                    return

    @staticmethod
    def _drop(conns: dict[tuple[str, str], ServerConnection], key: tuple[str, str], reason: str) -> None:
        conn = conns.pop(key, None)
        if conn is not None:
            conn.close(reason)

    def _finish(self, conns: dict[tuple[str, str], ServerConnection]) -> None:
        for conn in conns.values():
            if self.release is not None and conn.transport is not None and conn.tx_status == m.TX_IDLE:
                self.release(conn)
            else:
                conn.close("spool replay done")
        conns.clear()
