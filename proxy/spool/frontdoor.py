"""The front door: what a new client needs to log in and get going while no writer exists.

During an outage the sidecar still accepts clients (ARCHITECTURE.md, P5), so it must play the server's
part of the handshake and of the first queries drivers and ORMs send before any INSERT:

* the ParameterStatus values the last real server reported for this (user, database)
  (server_version, TimeZone, integer_datetimes, ...), which drivers read to pick their codecs;
* the answers to a fixed list of introspection queries (SQLAlchemy's `select
  pg_catalog.version()`, `select current_schema()`, `show transaction isolation level`, ...),
  kept as the exact encoded backend messages PostgreSQL sent (RowDescription, DataRows,
  CommandComplete; no ReadyForQuery), so the client cannot tell the difference.

Both are filled while the database is up (`fill_from_server`, once per (user, database), refreshed
now and then) and persisted to a JSON file next to the spool so a restarted sidecar has them.

The query list comes from running the drivers against PostgreSQL with log_statement=all (and a
recording relay for the exact messages):

* SQLAlchemy 2 (psycopg and pg8000 dialects), first connect of an engine, inside BEGIN ...
  ROLLBACK: `select pg_catalog.version()`, `select current_schema()`,
  `show transaction isolation level`, `show standard_conforming_strings`; the psycopg dialect then
  runs psycopg's TypeInfo query for hstore (extended protocol, one text parameter `hstore`) inside
  `SAVEPOINT "_pg3_1"` / `RELEASE "_pg3_1"`. `pool_pre_ping` sends an empty query (`;`).
* psycopg 3 and pg8000 send nothing at connect; their transactions are BEGIN (`begin
  transaction` for pg8000) / COMMIT / ROLLBACK (pg8000: extended protocol), which the outage
  responder answers itself.
A few common pool pings and version probes are cached as well.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import struct
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..protocol import messages as m


class FillServer(Protocol):
    """The logged-in server connection the cache is filled from (a `ServerConnection`, which is
    above this module), detached from any client: its input is read whole."""

    tx_status: int

    @property
    def params(self) -> Mapping[str, str]: ...

    def send(self, data: bytes) -> None: ...

    async def read_message(self) -> tuple[int, bytes]: ...

    def note_parameter(self, name: str, value: str) -> None: ...

FORMAT_VERSION = 1

# psycopg's TypeInfo.fetch() query (psycopg/_typeinfo.py), as psycopg 3.3 sends it; SQLAlchemy's
# psycopg dialect runs it for "hstore" on the first connect of every engine.
PSYCOPG_TYPEINFO_SQL = """\
SELECT
    typname AS name, oid, typarray AS array_oid,
    oid::regtype::text AS regtype, typdelim AS delimiter
FROM pg_type t
WHERE t.oid = to_regtype($1)
ORDER BY t.oid
"""

# Simple-protocol queries answered from the cache.
KNOWN_QUERIES: tuple[str, ...] = (
    # SQLAlchemy 2 dialect initialize (psycopg, pg8000, asyncpg dialects alike)
    "select pg_catalog.version()",
    "select current_schema()",
    "show transaction isolation level",
    "show standard_conforming_strings",
    # common pool pings and probes
    "SELECT 1",
    "select 1",
    "SELECT version()",
    "select version()",
    "SELECT current_schema()",
    "SHOW TRANSACTION ISOLATION LEVEL",
    "SHOW server_version",
    "show server_version",
    "SELECT pg_is_in_recovery()",
)

# Extended-protocol queries (SQL, text parameters) answered from the cache.
KNOWN_EXTENDED: tuple[tuple[str, tuple[str | None, ...]], ...] = ((PSYCOPG_TYPEINFO_SQL, ("hstore",)),)

# ParameterStatus values a client may override in its startup packet (they are GUC_REPORT and
# settable per session): the client must see its own value, as the server would report it.
CLIENT_REPORTED = ("application_name", "client_encoding", "DateStyle", "IntervalStyle", "TimeZone",
                   "standard_conforming_strings", "extra_float_digits")  # fmt: skip

# Runs of blanks outside quotes. Quoted text (string literals, quoted identifiers) is kept exactly
# so two queries that differ only inside a literal never share an answer.
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\s+")


def normalize(sql: str) -> str:
    """The cache key of a query: blank runs outside quotes become one space, leading/trailing
    blanks and semicolons go. Case is kept: `SELECT 1` and `select 1` are cached separately, which
    costs a few bytes and never answers a query with another's result."""

    def one(match: re.Match[str]) -> str:
        text = match.group(0)
        return text if text[0] in "'\"" else " "

    return _TOKENS.sub(one, sql).strip().rstrip(";").strip()


def extended_key(sql: str, params: Sequence[str | bytes | None]) -> str:
    """Key of an extended-protocol answer: the normalized text plus the text parameters."""
    values = [
        None if p is None else (p.decode("utf-8", "replace") if isinstance(p, bytes) else p) for p in params
    ]
    return normalize(sql) + "\x00" + json.dumps(values)


@dataclass
class _Entry:
    parameters: dict[str, str] = field(default_factory=dict)
    answers: dict[str, bytes] = field(default_factory=dict)
    filled_at: float = 0.0


class FrontDoorCache:
    """ParameterStatus values and introspection answers per (user, database)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[tuple[str, str], _Entry] = {}
        self.dirty = False

    # ------------------------------------------------------------------ persistence

    @classmethod
    def load(cls, path: str | Path) -> FrontDoorCache:
        """The cache stored at `path`; an empty one if the file is missing. A corrupt file is
        ignored (it is only a cache: the next fill rebuilds it) rather than stopping the sidecar."""
        cache = cls(path)
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return cache
        except (OSError, ValueError):
            return cache
        if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
            return cache
        for item in data.get("sessions", []):
            try:
                entry = _Entry(
                    parameters={str(k): str(v) for k, v in item["parameters"].items()},
                    answers={str(k): base64.b64decode(v) for k, v in item["answers"].items()},
                    filled_at=float(item.get("filled_at", 0.0)),
                )
                cache._entries[(str(item["user"]), str(item["database"]))] = entry
            except (KeyError, TypeError, AttributeError, ValueError):
                continue
        return cache

    def to_json(self) -> str:
        sessions = [
            {
                "user": user,
                "database": database,
                "filled_at": entry.filled_at,
                "parameters": entry.parameters,
                "answers": {k: base64.b64encode(v).decode("ascii") for k, v in entry.answers.items()},
            }
            for (user, database), entry in sorted(self._entries.items())
        ]
        return json.dumps({"v": FORMAT_VERSION, "sessions": sessions}, indent=1, sort_keys=True)

    def save(self, path: str | Path | None = None) -> None:
        """Write atomically (temp file, fsync, rename): a crash leaves the old file or the new."""
        target = Path(path) if path is not None else self.path
        if target is None:
            return
        # mkstemp: owner-only (the file holds answers of the application's database) whatever
        # the umask, and a name of its own, so two saves at once never write into one file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
        try:
            with open(fd, "w") as fh:
                fh.write(self.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.dirty = False

    # ------------------------------------------------------------------ filling

    def known_queries(self) -> list[str]:
        return list(KNOWN_QUERIES)

    def known_extended(self) -> list[tuple[str, tuple[str | None, ...]]]:
        return list(KNOWN_EXTENDED)

    def _entry(self, user: str, database: str) -> _Entry:
        return self._entries.setdefault((user, database), _Entry())

    def record_parameters(self, user: str, database: str, params: Mapping[str, str]) -> None:
        """The ParameterStatus values a real server sent at login for (user, database)."""
        entry = self._entry(user, database)
        if entry.parameters != dict(params):
            entry.parameters = dict(params)
            self.dirty = True

    def store_answer(self, user: str, database: str, sql: str, response: bytes,
                     params: Sequence[str | bytes | None] | None = None) -> None:  # fmt: skip
        """`response`: the backend messages answering `sql` (RowDescription, DataRows,
        CommandComplete; no ReadyForQuery). `params`: for an extended-protocol query."""
        key = normalize(sql) if params is None else extended_key(sql, params)
        entry = self._entry(user, database)
        if entry.answers.get(key) != response:
            entry.answers[key] = response
            self.dirty = True

    def mark_filled(self, user: str, database: str, when: float | None = None) -> None:
        self._entry(user, database).filled_at = time.time() if when is None else when
        self.dirty = True

    def needs_fill(self, user: str, database: str, max_age: float = 3600.0, now: float | None = None) -> bool:
        entry = self._entries.get((user, database))
        current = time.time() if now is None else now
        return entry is None or not entry.answers or current - entry.filled_at > max_age

    # ------------------------------------------------------------------ answering

    def answer(self, user: str, database: str, sql: str,
               params: Sequence[str | bytes | None] | None = None) -> bytes | None:  # fmt: skip
        entry = self._entries.get((user, database))
        if entry is None:
            return None
        if params is None:
            return entry.answers.get(normalize(sql))
        found = entry.answers.get(extended_key(sql, params))
        if found is None and not params:
            # A parameterless query sent with the extended protocol gets the same text-format
            # messages as the simple protocol.
            found = entry.answers.get(normalize(sql))
        return found

    def parameters(self, user: str, database: str) -> dict[str, str] | None:
        entry = self._entries.get((user, database))
        if entry is None or not entry.parameters:
            return None
        return dict(entry.parameters)

    def startup_parameters(
        self, user: str, database: str, startup: Mapping[str, str]
    ) -> dict[str, str] | None:
        """The ParameterStatus values to send a client logging in during an outage: the server's,
        with the client's own startup settings where it gave them (as the server would report).
        None if this (user, database) was never seen."""
        params = self.parameters(user, database)
        if params is None:
            return None
        lowered = {k.lower(): v for k, v in startup.items()}
        for name in CLIENT_REPORTED:
            if name.lower() in lowered and name in params:
                params[name] = lowered[name.lower()]
        return params

    def sessions(self) -> list[tuple[str, str]]:
        return sorted(self._entries)


def parameter_status_messages(params: Mapping[str, str]) -> bytes:
    return b"".join(m.parameter_status(k, v) for k, v in params.items())


# --------------------------------------------------------------------------------------------
# Filling from a live server.

_I32 = struct.Struct("!i")
_ANSWER_TYPES = frozenset(
    {m.B_ROW_DESCRIPTION, m.B_DATA_ROW, m.B_COMMAND_COMPLETE, m.B_EMPTY_QUERY, ord("n")}
)


def _parse_bind_text(sql: str, params: Sequence[str | None]) -> bytes:
    """Parse/Bind/Describe portal/Execute/Sync for `sql` with text parameters, text results —
    what psycopg sends for TypeInfo.fetch()."""
    values = [None if value is None else value.encode() for value in params]
    return (m.parse("", sql, (0,) * len(params)) + m.bind("", "", (0,), values, (0,))
            + m.describe("P") + m.execute() + m.sync())  # fmt: skip


async def _collect(server: FillServer) -> bytes | None:
    """The answer messages up to ReadyForQuery, raw; None if the server reported an error."""
    out: list[bytes] = []
    failed = False
    while True:
        type_byte, body = await server.read_message()
        if type_byte == m.B_READY_FOR_QUERY:
            server.tx_status = m.decode_ready_for_query(body)
            return None if failed else b"".join(out)
        if type_byte == m.B_ERROR:
            failed = True
        elif type_byte in _ANSWER_TYPES:
            out.append(m.message(bytes((type_byte,)), body))
        elif type_byte == m.B_PARAMETER_STATUS:
            name, value = m.decode_parameter_status(body)
            server.note_parameter(name, value)


async def fill_from_server(
    cache: FrontDoorCache,
    server: FillServer,
    user: str,
    database: str,
    queries: Iterable[str] | None = None,
    extended: Iterable[tuple[str, tuple[str | None, ...]]] | None = None,
) -> int:
    """Run the known queries on `server` (logged in as `user` to `database`, idle, not linked to
    a client) and store their answers; returns how many were stored. The server's ParameterStatus
    values are recorded too. A query that fails upstream is skipped (it is then not answered
    during an outage, which is what the server would have done anyway: refuse it)."""
    cache.record_parameters(user, database, server.params)
    stored = 0
    for sql in KNOWN_QUERIES if queries is None else queries:
        server.send(m.query(sql))
        response = await _collect(server)
        if response is not None:
            cache.store_answer(user, database, sql, response)
            stored += 1
    for sql, params in KNOWN_EXTENDED if extended is None else extended:
        server.send(_parse_bind_text(sql, params))
        response = await _collect(server)
        if response is not None:
            # ParseComplete / BindComplete are not part of the answer: the responder sends its own.
            cache.store_answer(user, database, sql, response, params)
            stored += 1
    cache.mark_filled(user, database)
    return stored


def split_messages(data: bytes) -> list[tuple[int, bytes]]:
    """(type byte, whole message) for each message of an encoded backend answer."""
    out = []
    pos = 0
    while pos + 5 <= len(data):
        (length,) = _I32.unpack_from(data, pos + 1)
        out.append((data[pos], data[pos : pos + 1 + length]))
        pos += 1 + length
    return out


def describe_and_rows(answer: bytes) -> tuple[bytes, bytes]:
    """Split an answer into what Describe (portal) returns — its RowDescription, or NoData —
    and what Execute returns (DataRows and CommandComplete)."""
    parts = split_messages(answer)
    if parts and parts[0][0] == m.B_ROW_DESCRIPTION:
        return parts[0][1], b"".join(p for _, p in parts[1:])
    if parts and parts[0][0] == ord("n"):
        return parts[0][1], b"".join(p for _, p in parts[1:])
    return m.no_data(), answer


def cache_summary(cache: FrontDoorCache) -> list[dict[str, Any]]:
    """For the admin console / logs: what is cached per (user, database)."""
    return [
        {
            "user": u,
            "database": d,
            "answers": len(cache._entries[(u, d)].answers),
            "filled_at": cache._entries[(u, d)].filled_at,
        }
        for u, d in cache.sessions()
    ]
