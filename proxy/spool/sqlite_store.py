"""The embedded default spool: one SQLite file, written by one thread with group commit.

Durability: WAL journal with `synchronous=FULL`, so a COMMIT has been fsynced before any append
it contains is acknowledged. Throughput under many concurrent clients comes from group commit:
appends queue up while the writer thread is busy with a commit (an fsync), and the next
transaction takes all of them at once; every caller's future is resolved after that commit.

Every SQLite call runs on the store's own thread (sqlite3 connections are bound to a thread, and
a commit's fsync must never stall the event loop); results come back to the loop through
`call_soon_threadsafe`. Several processes may open one file (e.g. `pgsidecar spool replay` next to
a running sidecar): SQLite's file locks serialize their writes and a lease row keeps their
replayers from draining at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import logs
from .record import DeadLetter, SpoolRecord
from .store import SpoolRefused, SpoolStore, SpoolUnavailable, owner_only

# Far above any sane transaction of simple INSERTs, far below what would make one commit stall
# every other client for long.
DEFAULT_MAX_RECORD_BYTES = 16 * 1024**2
# Another process holding the write lock (a commit in progress) is waited for this long.
BUSY_TIMEOUT_MS = 10_000
LEASE_NAME = "replay"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pending ( id TEXT PRIMARY KEY, created_at REAL NOT NULL, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS dead ("
    " id TEXT PRIMARY KEY, created_at REAL NOT NULL, body TEXT NOT NULL,"
    " error TEXT NOT NULL, sqlstate TEXT NOT NULL, failed_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS lease (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL)",
)


@dataclass
class _Op:
    """One request to the writer thread and where its answer goes."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    # An append (grouped with its neighbours into one transaction) ...
    record: SpoolRecord | None = None
    body: str = ""
    # ... or any other operation, run alone (`write`: inside BEGIN IMMEDIATE ... COMMIT).
    fn: Callable[[sqlite3.Connection], Any] | None = None
    write: bool = False
    results: list[Any] = field(default_factory=list)


_STOP = object()


def _settle(op: _Op, result: Any = None, error: BaseException | None = None) -> None:
    """On the loop: give `op`'s caller its outcome (unless it gave up and cancelled)."""
    if op.future.done():  # the caller gave up (cancelled); the outcome stands regardless
        return
    if error is not None:
        op.future.set_exception(error)
    else:
        op.future.set_result(result)


def _deliver(op: _Op, result: Any = None, error: BaseException | None = None) -> None:
    # The loop may be gone (process shutting down); nobody is left to tell then.
    with contextlib.suppress(RuntimeError):
        op.loop.call_soon_threadsafe(_settle, op, result, error)


def _settle_all(outcomes: list[tuple[_Op, BaseException | None]]) -> None:
    for op, error in outcomes:
        _settle(op, error=error)


def _deliver_all(outcomes: list[tuple[_Op, BaseException | None]]) -> None:
    """A group's outcomes: one wake-up of each loop for the whole group, not one per append
    (every call_soon_threadsafe writes to the loop's self-pipe and costs the thread the GIL)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, BaseException | None]]] = {}
    for op, error in outcomes:
        by_loop.setdefault(op.loop, []).append((op, error))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle_all, batch)


def make_spool_directory(path: Path) -> None:
    """Create the missing directories above `path` (spool.path), owner-only, and log it; an
    existing one that cannot be used raises SpoolUnavailable naming spool.path."""
    problem = spool_path_problem(path)
    if problem is not None:
        raise SpoolUnavailable(problem)
    parent = path.parent
    if not parent.is_dir():
        missing = []
        here = parent
        while not here.exists() and here != here.parent:
            missing.append(here)
            here = here.parent
        try:
            for directory in reversed(missing):
                directory.mkdir(mode=0o700)
        except OSError as exc:
            raise SpoolUnavailable(
                f"cannot create the directory {str(parent)!r} for the spool file (spool.path "
                f"{str(path)!r}): {exc.strerror or exc}"
            ) from exc
        if missing:
            logs.event("spool_directory_created", path=str(parent), mode="0700")


def spool_path_problem(path: Path) -> str | None:
    """Why the spool file `path` (spool.path) cannot be created or written, or None. Missing
    directories are fine when the nearest existing one is writable (they will be created)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"spool.path {str(path)!r} is unusable: {str(parent)!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"spool.path {str(path)!r} is unusable: the directory {str(parent)!r} is not writable"
    if path.exists() and (path.is_dir() or not os.access(path, os.R_OK | os.W_OK)):
        return f"spool.path {str(path)!r} is unusable: not a writable file"
    return None


class SqliteSpoolStore(SpoolStore):
    name = "sqlite"

    def __init__(self, path: str | Path, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.path = Path(path)
        self.max_record_bytes = max_record_bytes
        self.commits = 0  # append transactions committed (group commit makes this < appends)
        self.appends = 0  # records appended
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(_Op(loop, ready),), name=f"spool-sqlite:{self.path.name}", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread = None
            self._closed = True
            raise

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        self._closed = True
        if thread is None:
            return
        # Queued operations ahead of the stop marker are still carried out and answered.
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)

    # ---------------------------------------------------------------- writer thread

    def _connect(self) -> sqlite3.Connection:
        make_spool_directory(self.path)
        try:
            # Owner-only, whatever the umask: the records hold application data. SQLite gives
            # the -wal and -shm files the main file's permissions.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            owner_only(self.path)
        except OSError as exc:
            raise SpoolUnavailable(
                f"cannot create the spool file {str(self.path)!r} (spool.path): {exc.strerror or exc}"
            ) from exc
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT), so a
            # group commit is exactly one transaction and nothing is committed behind our back.
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolUnavailable(
                    f"the spool file {str(self.path)!r} (spool.path) cannot use WAL journaling "
                    f"(got {mode!r}); put it on a local file system"
                )
            # FULL: the WAL is fsynced at every commit, so an acknowledged append survives power loss.
            conn.execute("PRAGMA synchronous = FULL")
            for ddl in _SCHEMA:
                conn.execute(ddl)
            # Files an older version (or another process) created with wider permissions.
            for suffix in ("-wal", "-shm"):
                owner_only(self.path.with_name(self.path.name + suffix))
        except sqlite3.Error as exc:
            raise SpoolUnavailable(
                f"cannot open the spool file {str(self.path)!r} (spool.path): {exc}"
            ) from exc
        return conn

    def _run(self, ready: _Op) -> None:
        try:
            conn = self._connect()
        except Exception as exc:
            _deliver(ready, error=exc)
            return
        _deliver(ready)
        try:
            while True:
                ops: list[_Op | object] = [self._queue.get()]
                # Everything queued meanwhile joins this round: that is the group in group commit.
                while True:
                    try:
                        ops.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                appends: list[_Op] = []
                for op in ops:
                    if isinstance(op, _Op) and op.record is not None:
                        appends.append(op)
                        continue
                    # Keep order: appends queued before another operation commit before it runs.
                    if appends:
                        self._commit_appends(conn, appends)
                        appends = []
                    if op is _STOP:
                        self._fail_rest()
                        return
                    assert isinstance(op, _Op)
                    self._run_one(conn, op)
                if appends:
                    self._commit_appends(conn, appends)
        finally:
            conn.close()

    def _fail_rest(self) -> None:
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(op, _Op):
                _deliver(op, error=SpoolUnavailable("the spool store is closed"))

    def _commit_appends(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        outcomes: list[BaseException | None] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            # One look at the dead letters for the whole group (ids are checked in chunks that stay
            # below SQLite's limit on bound parameters).
            dead: set[str] = set()
            ids = [op.record.id for op in ops if op.record is not None]
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ",".join("?" * len(chunk))
                dead.update(r[0] for r in conn.execute(f"SELECT id FROM dead WHERE id IN ({marks})", chunk))
            for op in ops:
                record = op.record
                assert record is not None
                if record.id in dead:
                    outcomes.append(SpoolRefused(f"spool record id {record.id} already exists"))
                    continue
                try:
                    conn.execute(
                        "INSERT INTO pending (id, created_at, body) VALUES (?, ?, ?)",
                        (record.id, record.created_at, op.body),
                    )
                    outcomes.append(None)
                except sqlite3.IntegrityError:
                    # A failed statement does not abort the SQLite transaction: the others commit.
                    outcomes.append(SpoolRefused(f"spool record id {record.id} already exists"))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            logs.event(
                "spool_write_failed", logs.ERROR, backend="sqlite", path=str(self.path), error=str(exc)
            )
            message = f"spool file {str(self.path)!r} write failed: {exc}"
            _deliver_all([(op, SpoolUnavailable(message)) for op in ops])
            return
        self.commits += 1
        self.appends += sum(1 for o in outcomes if o is None)
        _deliver_all(list(zip(ops, outcomes, strict=True)))

    def _run_one(self, conn: sqlite3.Connection, op: _Op) -> None:
        assert op.fn is not None
        try:
            if op.write:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = op.fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            else:
                result = op.fn(conn)
        except sqlite3.Error as exc:
            _deliver(op, error=SpoolUnavailable(f"spool file {str(self.path)!r}: {exc}"))
        except Exception as exc:  # e.g. a malformed stored record: the caller sees it, the thread lives
            _deliver(op, error=exc)
        else:
            _deliver(op, result)

    # ---------------------------------------------------------------- requests

    def _submit(self, op: _Op) -> asyncio.Future[Any]:
        if self._closed or self._thread is None:
            raise SpoolUnavailable("the spool store is not open")
        self._queue.put(op)
        return op.future

    async def _call(self, fn: Callable[[sqlite3.Connection], Any], write: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        return await self._submit(_Op(loop, loop.create_future(), fn=fn, write=write))

    async def append(self, record: SpoolRecord) -> None:
        body = record.to_json()
        if len(body) > self.max_record_bytes:
            raise SpoolRefused(
                f"transaction too large to spool: {len(body)} bytes (limit {self.max_record_bytes})"
            )
        loop = asyncio.get_running_loop()
        await self._submit(_Op(loop, loop.create_future(), record=record, body=body))

    async def pending(self, limit: int = 100) -> list[SpoolRecord]:
        def read(conn: sqlite3.Connection) -> list[SpoolRecord]:
            rows = conn.execute("SELECT body FROM pending ORDER BY id LIMIT ?", (limit,)).fetchall()
            return [SpoolRecord.from_json(body) for (body,) in rows]

        result: list[SpoolRecord] = await self._call(read)
        return result

    async def count(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM pending").fetchone()[0])

        result: int = await self._call(read)
        return result

    async def remove(self, record_id: str) -> None:
        await self._call(
            lambda conn: conn.execute("DELETE FROM pending WHERE id = ?", (record_id,)), write=True
        )

    async def remove_many(self, record_ids: Sequence[str]) -> None:
        # One transaction, one fsync for a whole replayed chunk.
        rows = [(record_id,) for record_id in record_ids]
        await self._call(lambda conn: conn.executemany("DELETE FROM pending WHERE id = ?", rows), write=True)

    async def dead_letter(self, record: SpoolRecord, error: str, sqlstate: str) -> None:
        def move(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT body FROM pending WHERE id = ?", (record.id,)).fetchone()
            if row is None:
                return  # no longer pending: another replayer has dealt with it
            conn.execute("DELETE FROM pending WHERE id = ?", (record.id,))
            conn.execute(
                "INSERT OR REPLACE INTO dead (id, created_at, body, error, sqlstate, failed_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (record.id, record.created_at, row[0], error, sqlstate, time.time()),
            )

        await self._call(move, write=True)

    async def dead_letters(self) -> list[DeadLetter]:
        def read(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute("SELECT body, error, sqlstate, failed_at FROM dead ORDER BY id").fetchall()
            return [DeadLetter(SpoolRecord.from_json(b), e, s, f) for b, e, s, f in rows]

        result: list[DeadLetter] = await self._call(read)
        return result

    async def retry_dead_letters(self, ids: list[str] | None = None) -> int:
        def move(conn: sqlite3.Connection) -> int:
            if ids is None:
                rows = conn.execute("SELECT id, created_at, body FROM dead").fetchall()
            else:
                rows = [
                    row
                    for rid in ids
                    for row in conn.execute("SELECT id, created_at, body FROM dead WHERE id = ?", (rid,))
                ]
            for rid, created_at, body in rows:
                conn.execute(
                    "INSERT OR IGNORE INTO pending (id, created_at, body) VALUES (?, ?, ?)",
                    (rid, created_at, body),
                )
                conn.execute("DELETE FROM dead WHERE id = ?", (rid,))
            return len(rows)

        result: int = await self._call(move, write=True)
        return result

    # ---------------------------------------------------------------- lease

    async def acquire_lease(self, owner: str, ttl: float) -> bool:
        def take(conn: sqlite3.Connection) -> bool:
            now = time.time()
            row = conn.execute("SELECT owner, expires_at FROM lease WHERE name = ?", (LEASE_NAME,)).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO lease (name, owner, expires_at) VALUES (?, ?, ?)",
                (LEASE_NAME, owner, now + ttl),
            )
            return True

        result: bool = await self._call(take, write=True)
        return result

    async def renew_lease(self, owner: str, ttl: float) -> bool:
        def renew(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE lease SET expires_at = ? WHERE name = ? AND owner = ?",
                (time.time() + ttl, LEASE_NAME, owner),
            )
            return cur.rowcount == 1

        result: bool = await self._call(renew, write=True)
        return result

    async def release_lease(self, owner: str) -> None:
        await self._call(
            lambda conn: conn.execute("DELETE FROM lease WHERE name = ? AND owner = ?", (LEASE_NAME, owner)),
            write=True,
        )
