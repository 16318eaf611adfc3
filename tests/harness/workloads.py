"""The two tables the client workloads (JdbcWorkload.java, JdbcSessions.java, node/workload.mjs)
run against: `table (w int, i int)` takes their inserts, `ref (id, label)` holds ids 1..100
labelled 'r<id>' for their reads."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from tests.harness import pg


@dataclass(frozen=True)
class WorkloadResult:
    """What a workload process reported."""

    returncode: int
    inserted: int | None  # rows its INSERTs reported (None: it printed no summary)
    errors: list[str]  # one line per failed round
    output: str  # stdout and stderr, for assertion messages

    def __str__(self) -> str:
        return f"exit {self.returncode}\n{self.output}"


def create_tables(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """Create both (fresh names) through `conn`, as its user; returns (table, ref)."""
    table, ref = f"t_{uuid.uuid4().hex[:12]}", f"t_{uuid.uuid4().hex[:12]}"
    conn.execute(f"CREATE TABLE {table} (w int, i int)")
    conn.execute(f"CREATE TABLE {ref} (id int PRIMARY KEY, label text)")
    conn.execute(f"INSERT INTO {ref} SELECT g, 'r' || g FROM generate_series(1, 100) g")
    return table, ref


def assert_done(result: WorkloadResult, writer: pg.PgNode, table: str, rows: int) -> None:
    """The workload ended cleanly (no statement mixed up between clients or servers, no error at
    all) and its `rows` inserts are in `table` on the writer, once each."""
    confused = [e for e in result.errors if "does not exist" in e or "already exists" in e]
    assert not confused, confused
    assert result.returncode == 0 and not result.errors, result
    assert result.inserted == rows, result
    got = writer.query(f"SELECT count(*), count(DISTINCT (w, i)) FROM {table}", dbname=pg.APP_DB)
    assert got == [(rows, rows)], got
