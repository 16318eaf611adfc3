"""Run pgjdbc, a real JDBC client, against a sidecar for the integration tests: JdbcWorkload.java
(threads, each a connection, checking every answer), JdbcSessions.java (connections driven step
by step, so a test can fail the database over between two steps), JdbcContinuity.java (calls
answered when done, so a statement or a COMMIT can be left in flight at a crash) and
JdbcQueryTimeout.java (Statement.setQueryTimeout, which cancels through a CancelRequest).

Java runs the file as a single source program (Java 11+) with Debian's pgjdbc on the class path;
`make test` installs both (default-jdk-headless, libpostgresql-jdbc-java) when missing.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from tests.harness import workloads

JDBC_JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java
WORKLOAD = Path(__file__).with_name("JdbcWorkload.java")
SESSIONS = Path(__file__).with_name("JdbcSessions.java")
QUERY_TIMEOUT = Path(__file__).with_name("JdbcQueryTimeout.java")
CONTINUITY = Path(__file__).with_name("JdbcContinuity.java")
TIMEOUT = 180  # the JVM compiles the source first: a few seconds before any connection


def java() -> str:
    binary = shutil.which("java")
    if binary is None or shutil.which("javac") is None or not JDBC_JAR.exists():
        pytest.fail(
            "a JDK or pgjdbc not found: `make test` installs Debian's default-jdk-headless and "
            "libpostgresql-jdbc-java",
            pytrace=False,
        )
    return binary


def _argv(source: Path, *args: str) -> list[str]:
    return [java(), "-cp", str(JDBC_JAR), str(source), *args]


def run_source(source: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a single-file Java program of this folder with pgjdbc on the class path."""
    return subprocess.run(_argv(source, *args), capture_output=True, text=True, timeout=TIMEOUT)


def run_workload(
    host: str, port: int, db: str, user: str, password: str, table: str, ref: str, workers: int, rounds: int
) -> workloads.WorkloadResult:
    """Run the workload (see JdbcWorkload.java): `table (w int, i int)` takes its inserts, `ref (id,
    label)` holds ids 1..100 labelled 'r<id>'."""
    out = run_source(WORKLOAD, host, str(port), db, user, password, table, ref, str(workers), str(rounds))
    summary = re.search(r"^inserted=(\d+) errors=\d+$", out.stdout, re.M)
    return workloads.WorkloadResult(
        returncode=out.returncode,
        inserted=int(summary.group(1)) if summary else None,
        errors=[line for line in out.stdout.splitlines() if line.startswith("ERROR")],
        output=out.stdout + out.stderr,
    )


@dataclass(frozen=True)
class Step:
    inserted: int  # inserts acknowledged so far, all steps together
    errors: list[str]  # this step's "ERROR <sqlstate> ..." lines


class JdbcSessions:
    """JdbcSessions.java as a context manager: `step(n)` runs n rounds on every connection."""

    def __init__(self, host: str, port: int, db: str, user: str, password: str, table: str, connections: int):
        self._argv = _argv(SESSIONS, host, str(port), db, user, password, table, str(connections))
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._proc: subprocess.Popen[str] | None = None
        self._seen: list[str] = []

    def __enter__(self) -> JdbcSessions:
        self._proc = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # the process ended

    def step(self, rounds: int, timeout: float = TIMEOUT) -> Step:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(f"step {rounds}\n")
        self._proc.stdin.flush()
        errors: list[str] = []
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"JdbcSessions: no answer within {timeout}s: {self._seen}") from None
            if line is None:
                raise AssertionError(f"JdbcSessions ended: exit {self._proc.wait()}; output: {self._seen}")
            self._seen.append(line)
            done = re.fullmatch(r"done inserted=(\d+) errors=\d+", line)
            if done:
                return Step(int(done.group(1)), errors)
            if line.startswith("ERROR"):
                errors.append(line)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None and proc.poll() is None:
                proc.stdin.write("quit\n")
                proc.stdin.close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Answer:
    """What pgjdbc made of one call: `sqlstate` None on success (then `value`: the update count,
    or the rows as 'col,col;col,col'), else the SQLException's SQLState and message."""

    sqlstate: str | None
    value: str

    def __str__(self) -> str:
        return (
            f"ok {self.value!r}" if self.sqlstate is None else f"SQLException {self.sqlstate}: {self.value}"
        )


class JdbcCalls:
    """JdbcContinuity.java as a context manager: `call(conn, op, *args)` sends one call to the
    named connection and returns at once; the Future is the answer (see the Java file)."""

    def __init__(self, host: str, port: int, db: str, user: str, password: str):
        self._argv = _argv(CONTINUITY, host, str(port), db, user, password)
        self._proc: subprocess.Popen[str] | None = None
        self._pending: dict[str, Future[Answer]] = {}
        self._lock = threading.Lock()
        self._next = 0
        self.output: list[str] = []  # everything the program printed (stderr too)

    def __enter__(self) -> JdbcCalls:
        self._proc = subprocess.Popen(
            self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.output.append(line.rstrip("\n"))
            fields = line.rstrip("\n").split("\t")
            with self._lock:
                future = self._pending.pop(fields[0], None) if len(fields) >= 3 else None
            if future is None:
                continue
            if fields[1] == "ok":
                future.set_result(Answer(None, fields[2]))
            else:
                future.set_result(Answer(fields[2], "\t".join(fields[3:])))
        ended = RuntimeError(f"JdbcContinuity ended: {self.output[-20:]}")
        with self._lock:
            for future in self._pending.values():
                future.set_exception(ended)
            self._pending.clear()

    def call(self, conn: str, op: str, *args: str) -> Future[Answer]:
        assert self._proc is not None and self._proc.stdin is not None
        assert all("\t" not in a and "\n" not in a for a in (conn, op, *args))
        future: Future[Answer] = Future()
        with self._lock:
            self._next += 1
            call_id = str(self._next)
            self._pending[call_id] = future
        self._proc.stdin.write("\t".join((call_id, conn, op, *args)) + "\n")
        self._proc.stdin.flush()
        return future

    def run(self, conn: str, op: str, *args: str, timeout: float = TIMEOUT) -> Answer:
        """`call` and wait for its answer."""
        return self.call(conn, op, *args).result(timeout)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None and proc.poll() is None:
                proc.stdin.close()
            proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
