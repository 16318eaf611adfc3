"""Run JdbcWorkload.java (pgjdbc, a real JDBC client) against a sidecar, for the integration tests.

Java runs the file as a single source program (Java 11+) with Debian's pgjdbc on the class path;
`make test` installs both (default-jdk-headless, libpostgresql-jdbc-java) when missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

JDBC_JAR = Path("/usr/share/java/postgresql.jar")  # Debian's libpostgresql-jdbc-java
WORKLOAD = Path(__file__).with_name("JdbcWorkload.java")
TIMEOUT = 180  # the JVM compiles the source first: a few seconds before any connection


@dataclass(frozen=True)
class WorkloadResult:
    returncode: int
    errors: list[str]  # the workload's "ERROR ..." lines: one per failed round
    inserted: int | None  # rows its INSERTs reported, from the summary line (None: no summary)
    output: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\n{self.output}"


def java() -> str:
    binary = shutil.which("java")
    if binary is None or shutil.which("javac") is None or not JDBC_JAR.exists():
        pytest.fail(
            "a JDK or pgjdbc not found: `make test` installs Debian's default-jdk-headless and "
            "libpostgresql-jdbc-java",
            pytrace=False,
        )
    return binary


def run_workload(
    host: str, port: int, db: str, user: str, password: str, table: str, ref: str, workers: int, rounds: int
) -> WorkloadResult:
    """Run the workload (see JdbcWorkload.java): `table (w int, i int)` takes its inserts, `ref (id,
    label)` holds ids 1..100 labelled 'r<id>'."""
    out = subprocess.run(
        [java(), "-cp", str(JDBC_JAR), str(WORKLOAD), host, str(port), db, user, password, table, ref,
         str(workers), str(rounds)],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    summary = re.search(r"^inserted=(\d+) errors=\d+$", out.stdout, re.M)
    return WorkloadResult(
        returncode=out.returncode,
        errors=[line for line in out.stdout.splitlines() if line.startswith("ERROR")],
        inserted=int(summary.group(1)) if summary else None,
        output=out.stdout + out.stderr,
    )
