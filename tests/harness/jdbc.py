"""Run pgjdbc, a real JDBC client, against a sidecar for the integration tests: JdbcWorkload.java
(threads, each a connection, checking every answer), JdbcSessions.java (connections driven step
by step, so a test can fail the database over between two steps) and JdbcQueryTimeout.java
(Statement.setQueryTimeout, which cancels through a CancelRequest).

Java runs the file as a single source program (Java 11+) with Debian's pgjdbc on the class path;
`make test` installs both (default-jdk-headless, libpostgresql-jdbc-java) when missing.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from tests.harness import workloads

JDBC_JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java
WORKLOAD = Path(__file__).with_name("JdbcWorkload.java")
SESSIONS = Path(__file__).with_name("JdbcSessions.java")
QUERY_TIMEOUT = Path(__file__).with_name("JdbcQueryTimeout.java")
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
