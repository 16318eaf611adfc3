"""Continuous write load through the sidecar, for failover tests and ``bench/failover_drill.py``
(plus a TCP black hole to partition a node, and helpers to judge a run and read the sidecar log).

Every logical transaction inserts rows whose ids the client generates (uuid4), so that after a
failover the new writer can be checked for "every acknowledged row present exactly once" (count
and distinct). Each attempt is timed (wall clock, ``time.time()``, comparable with the sidecar's
log timestamps) and keeps the SQLSTATE it failed with, so a test can tell errors of transactions
in flight at the fault from errors of transactions that started while the sidecar held them.

Retry policy, as an application written for PostgreSQL would do it: ``40001`` → run the
transaction again with the same ids; ``08007`` (transaction resolution unknown) → first look whether
the rows are there, and only retry if they are not. Anything else ends the transaction as failed.

Client kinds (``Load(mix={kind: workers})``):

- ``autocommit``: psycopg 3, autocommit, one INSERT per transaction;
- ``explicit``: psycopg 3, ``BEGIN; INSERT; INSERT; COMMIT``;
- ``sqlalchemy``: SQLAlchemy 2 engine over psycopg, QueuePool (pool_size 5) shared by the workers,
  ``engine.begin()`` per transaction;
- ``asyncpg``: one asyncpg pool (max 5) in its own event loop thread; workers are tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

KINDS = ("autocommit", "explicit", "sqlalchemy", "asyncpg")
RETRYABLE = "40001"
UNKNOWN = "08007"
MAX_ATTEMPTS = 5

DDL = "CREATE TABLE {table} (id text NOT NULL, client text NOT NULL, at timestamptz DEFAULT now())"


@dataclass(frozen=True)
class Target:
    """Where the clients connect (the sidecar) and as whom."""

    host: str
    port: int
    user: str
    password: str
    dbname: str

    def conninfo(self, **extra: Any) -> str:
        return psycopg.conninfo.make_conninfo(
            "", host=self.host, port=self.port, user=self.user, password=self.password,
            dbname=self.dbname, **extra,
        )  # fmt: skip


@dataclass
class Attempt:
    start: float
    end: float
    sqlstate: str | None = None  # None: it succeeded
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Txn:
    """One logical transaction: its rows and every attempt made to commit them."""

    kind: str
    worker: int
    ids: tuple[str, ...]
    attempts: list[Attempt] = field(default_factory=list)
    # committed: acknowledged (or, after 08007, found present); failed: gave up on an error
    outcome: str = "pending"

    @property
    def start(self) -> float:
        return self.attempts[0].start

    @property
    def end(self) -> float:
        return self.attempts[-1].end

    @property
    def seconds(self) -> float:
        return self.end - self.start


def sqlstate_of(exc: BaseException) -> str:
    """The SQLSTATE of a driver error (psycopg, asyncpg, SQLAlchemy), else the exception's class."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy DBAPIError wraps the driver's exception
    if orig is not None and orig is not exc:
        return sqlstate_of(orig)
    code = getattr(exc, "sqlstate", None)
    return str(code) if code else type(exc).__name__


class Load:
    """Worker threads writing through `target` until `stop()`."""

    def __init__(self, target: Target, table: str, mix: dict[str, int], pause: float = 0.0) -> None:
        unknown = set(mix) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown client kinds {sorted(unknown)}; known: {KINDS}")
        self.target = target
        self.table = table
        self.mix = mix
        self.pause = pause  # think time between transactions
        self.txns: list[Txn] = []  # appended from several threads (list.append is atomic)
        self.crashes: list[str] = []  # a worker that died of a bug in this module, not a DB error
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._insert = f"INSERT INTO {table} (id, client) VALUES (%s, %s)"
        self._count = f"SELECT count(*) FROM {table} WHERE id = ANY(%s)"

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> Load:
        for kind, n in self.mix.items():
            if kind in ("autocommit", "explicit"):
                for i in range(n):
                    self._spawn(f"{kind}-{i}", self._psycopg_worker, kind, i)
        if self.mix.get("sqlalchemy"):
            self._spawn_sqlalchemy(self.mix["sqlalchemy"])
        if self.mix.get("asyncpg"):
            self._spawn("asyncpg", self._asyncpg_thread, self.mix["asyncpg"])
        return self

    def _spawn(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # a bug in the load itself must be visible, not silent
                self.crashes.append(f"{name}: {exc!r}")

        t = threading.Thread(target=run, name=f"load-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def stop(self, timeout: float = 20.0) -> list[str]:
        """Stop the workers (each finishes its transaction); returns the names of hung ones."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------------------ the retry loop

    def _run_txn(
        self,
        kind: str,
        worker: int,
        nrows: int,
        attempt: Callable[[tuple[str, ...]], None],
        present: Callable[[tuple[str, ...]], int],
    ) -> Txn:
        """One logical transaction with the retry policy of the module docstring."""
        ids = tuple(f"{kind}-{worker}-{uuid.uuid4().hex}" for _ in range(nrows))
        txn = Txn(kind, worker, ids)
        self.txns.append(txn)
        while True:
            t0 = time.time()
            try:
                attempt(ids)
            except Exception as exc:
                state = sqlstate_of(exc)
                txn.attempts.append(Attempt(t0, time.time(), state, _one_line(exc)))
                if len(txn.attempts) >= MAX_ATTEMPTS or state not in (RETRYABLE, UNKNOWN):
                    txn.outcome = "failed"
                    return txn
                if state == UNKNOWN:
                    try:
                        found = present(ids)
                    except Exception as check_exc:
                        t1 = time.time()
                        txn.attempts.append(
                            Attempt(t1, t1, sqlstate_of(check_exc), "checking after 08007: "
                                    + _one_line(check_exc))
                        )  # fmt: skip
                        txn.outcome = "failed"
                        return txn
                    if found == len(ids):
                        txn.outcome = "committed"
                        return txn
                continue
            txn.attempts.append(Attempt(t0, time.time()))
            txn.outcome = "committed"
            return txn

    # ------------------------------------------------------------------------------ psycopg

    def _psycopg_worker(self, kind: str, worker: int) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            if conn is None or conn.closed:
                try:
                    conn = psycopg.connect(
                        self.target.conninfo(connect_timeout=10, application_name=f"load-{kind}-{worker}"),
                        autocommit=True,
                    )
                except psycopg.Error as exc:
                    t0 = time.time()
                    txn = Txn(kind, worker, ())
                    txn.attempts.append(Attempt(t0, t0, sqlstate_of(exc), "connect: " + _one_line(exc)))
                    txn.outcome = "failed"
                    self.txns.append(txn)
                    time.sleep(0.1)
                    continue
            c = conn

            def present(ids: tuple[str, ...], c: psycopg.Connection[Any] = c) -> int:
                row = c.execute(self._count, (list(ids),)).fetchone()
                return int(row[0]) if row else 0

            if kind == "autocommit":

                def attempt(ids: tuple[str, ...], c: psycopg.Connection[Any] = c) -> None:
                    c.execute(self._insert, (ids[0], "autocommit"))

                self._run_txn(kind, worker, 1, attempt, present)
            else:

                def attempt(ids: tuple[str, ...], c: psycopg.Connection[Any] = c) -> None:
                    # BEGIN ... COMMIT; an error inside rolls back (psycopg sends ROLLBACK).
                    with c.transaction():
                        for i in ids:
                            c.execute(self._insert, (i, "explicit"))

                self._run_txn(kind, worker, 2, attempt, present)
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    # ------------------------------------------------------------------------------ SQLAlchemy

    def _spawn_sqlalchemy(self, workers: int) -> None:
        import sqlalchemy as sa

        url = sa.engine.URL.create(
            "postgresql+psycopg", username=self.target.user, password=self.target.password,
            host=self.target.host, port=self.target.port, database=self.target.dbname,
        )  # fmt: skip
        engine = sa.create_engine(
            url,
            pool_size=5,
            max_overflow=0,
            pool_timeout=30,
            connect_args={"connect_timeout": 10, "application_name": "load-sqlalchemy"},
        )
        insert = sa.text(f"INSERT INTO {self.table} (id, client) VALUES (:id, 'sqlalchemy')")
        count = sa.text(f"SELECT count(*) FROM {self.table} WHERE id = ANY(:ids)")

        def attempt(ids: tuple[str, ...]) -> None:
            with engine.begin() as conn:
                conn.execute(insert, {"id": ids[0]})

        def present(ids: tuple[str, ...]) -> int:
            with engine.connect() as conn:
                return int(conn.execute(count, {"ids": list(ids)}).scalar_one())

        remaining = [workers]
        lock = threading.Lock()

        def worker(i: int) -> None:
            try:
                while not self._stop.is_set():
                    self._run_txn("sqlalchemy", i, 1, attempt, present)
                    if self.pause:
                        time.sleep(self.pause)
            finally:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        engine.dispose()

        for i in range(workers):
            self._spawn(f"sqlalchemy-{i}", worker, i)

    # ------------------------------------------------------------------------------ asyncpg

    def _asyncpg_thread(self, workers: int) -> None:
        asyncio.run(self._asyncpg_main(workers))

    async def _asyncpg_main(self, workers: int) -> None:
        import asyncpg

        t = self.target
        pool = await asyncpg.create_pool(
            host=t.host, port=t.port, user=t.user, password=t.password, database=t.dbname,
            min_size=1, max_size=5, timeout=10, server_settings={"application_name": "load-asyncpg"},
        )  # fmt: skip
        insert = f"INSERT INTO {self.table} (id, client) VALUES ($1, 'asyncpg')"
        count = f"SELECT count(*) FROM {self.table} WHERE id = ANY($1::text[])"

        async def run_txn(i: int) -> None:
            ids = (f"asyncpg-{i}-{uuid.uuid4().hex}",)
            txn = Txn("asyncpg", i, ids)
            self.txns.append(txn)
            while True:
                t0 = time.time()
                try:
                    async with pool.acquire() as con:
                        await con.execute(insert, ids[0])
                except Exception as exc:
                    state = sqlstate_of(exc)
                    txn.attempts.append(Attempt(t0, time.time(), state, _one_line(exc)))
                    if len(txn.attempts) >= MAX_ATTEMPTS or state not in (RETRYABLE, UNKNOWN):
                        txn.outcome = "failed"
                        return
                    if state == UNKNOWN:
                        try:
                            async with pool.acquire() as con:
                                found = await con.fetchval(count, list(ids))
                        except Exception as check_exc:
                            t1 = time.time()
                            txn.attempts.append(
                                Attempt(t1, t1, sqlstate_of(check_exc), "checking after 08007: "
                                        + _one_line(check_exc))
                            )  # fmt: skip
                            txn.outcome = "failed"
                            return
                        if found == len(ids):
                            txn.outcome = "committed"
                            return
                    continue
                txn.attempts.append(Attempt(t0, time.time()))
                txn.outcome = "committed"
                return

        async def worker(i: int) -> None:
            while not self._stop.is_set():
                await run_txn(i)
                await asyncio.sleep(self.pause)

        try:
            await asyncio.gather(*(worker(i) for i in range(workers)))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 5)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------------------------------------------
# A network partition
# ------------------------------------------------------------------------------------------------


class BlackHole:
    """A TCP forwarder to `upstream` that can be partitioned: it then stops forwarding and stops
    reading (open connections hang without RST or FIN), and new connections are accepted but
    never answered."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.listener.settimeout(0.05)
        self.port = int(self.listener.getsockname()[1])
        self.partitioned = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True, name="blackhole-accept").start()

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._keep(client)
            if self.partitioned.is_set():
                continue  # accepted, never answered
            try:
                server = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                client.close()
                continue
            self._keep(server)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._closed.is_set():
            if self.partitioned.is_set():
                time.sleep(0.05)  # neither read nor forward: the peer's bytes pile up unanswered
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if self.partitioned.is_set():
                    continue  # the partition began while this was on the wire: lost
                dst.sendall(data)
            except (OSError, ValueError):
                break
        if not self.partitioned.is_set():
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def partition(self) -> None:
        self.partitioned.set()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()


# ------------------------------------------------------------------------------------------------
# Judging a run
# ------------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What a load run did to the data and to the clients, relative to a fault window."""

    txns: int
    committed: int
    acked_ids: int
    lost: list[str]  # acknowledged, absent on the new writer
    duplicates: dict[str, int]  # id -> copies (> 1), on the new writer
    in_flight_errors: Counter[str]  # by SQLSTATE: attempts in flight at the fault
    other_errors: list[tuple[Txn, Attempt]]  # any other failed attempt
    failed: list[Txn]  # transactions that gave up
    longest_txn: float
    longest_attempt: float
    latencies: list[float]  # per committed transaction, retries included

    def summary(self) -> str:
        return (
            f"{self.txns} transactions ({self.committed} committed, {self.acked_ids} rows acknowledged), "
            f"in-flight errors {dict(self.in_flight_errors)}, other errors {len(self.other_errors)}, "
            f"lost {len(self.lost)}, duplicates {len(self.duplicates)}, "
            f"longest transaction {self.longest_txn:.3f}s, longest attempt {self.longest_attempt:.3f}s"
        )

    def describe_other_errors(self, limit: int = 10) -> str:
        lines = [
            f"{t.kind}-{t.worker} attempt {a.start:.3f}..{a.end:.3f} ({a.seconds:.3f}s) "
            f"{a.sqlstate}: {a.error}"
            for t, a in self.other_errors[:limit]
        ]
        return "\n".join(lines)


def judge(
    txns: Sequence[Txn],
    rows: Iterable[tuple[str, int]],
    fault_start: float,
    fault_end: float,
    allowed: Iterable[str] = (RETRYABLE, UNKNOWN),
) -> Verdict:
    """`rows`: (id, copies) on the new writer. An attempt is "in flight at the fault" when it started
    before the fault injection returned and ended after it began; only such attempts may fail, and
    only with an `allowed` SQLSTATE."""
    allowed = set(allowed)
    copies = dict(rows)
    acked = [i for t in txns if t.outcome == "committed" for i in t.ids]
    in_flight: Counter[str] = Counter()
    other: list[tuple[Txn, Attempt]] = []
    for t in txns:
        for a in t.attempts:
            if a.sqlstate is None:
                continue
            if a.start <= fault_end and a.end >= fault_start and a.sqlstate in allowed:
                in_flight[a.sqlstate] += 1
            else:
                other.append((t, a))
    done = [t for t in txns if t.attempts]
    return Verdict(
        txns=len(done),
        committed=sum(1 for t in done if t.outcome == "committed"),
        acked_ids=len(acked),
        lost=[i for i in acked if copies.get(i, 0) == 0],
        duplicates={i: n for i, n in copies.items() if n > 1},
        in_flight_errors=in_flight,
        other_errors=other,
        failed=[t for t in done if t.outcome == "failed"],
        longest_txn=max((t.seconds for t in done), default=0.0),
        longest_attempt=max((a.seconds for t in done for a in t.attempts), default=0.0),
        latencies=[t.seconds for t in done if t.outcome == "committed"],
    )


def rows_on(conninfo: str, table: str) -> list[tuple[str, int]]:
    """(id, copies) of every row in `table`, read directly from a node."""
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
        return [(str(r[0]), int(r[1])) for r in conn.execute(f"SELECT id, count(*) FROM {table} GROUP BY id")]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[max(0, min(998, round(q * 1000) - 1))]


# ------------------------------------------------------------------------------------------------
# The sidecar's log
# ------------------------------------------------------------------------------------------------

_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z) .*?\bevent=(\S+)(.*)$")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class LogEvent:
    at: float  # wall clock (seconds since the epoch)
    event: str
    fields: dict[str, str]
    line: str


def log_events(text: str, event: str | None = None, since: float = 0.0) -> list[LogEvent]:
    """Events of a text-format sidecar log (``ts level=... event=name k=v ...``)."""
    out = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        if event is not None and match.group(2) != event:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        if at < since:
            continue
        fields = {k: v.strip('"') for k, v in _FIELD.findall(match.group(3))}
        out.append(LogEvent(at, match.group(2), fields, line))
    return out


def first_state(text: str, state: str, since: float = 0.0, writer: str | None = None) -> LogEvent | None:
    """The first ``event=cluster_state state=<state>`` at or after `since` (and to `writer`)."""
    for ev in log_events(text, "cluster_state", since - 0.002):  # log stamps are whole ms
        if ev.fields.get("state") == state and (writer is None or ev.fields.get("writer") == writer):
            return ev
    return None
