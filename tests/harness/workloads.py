"""The two tables the client workloads (JdbcWorkload.java, JdbcSessions.java, node/workload.mjs)
run against: `table (w int, i int)` takes their inserts, `ref (id, label)` holds ids 1..100
labelled 'r<id>' for their reads."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg


def create_tables(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """Create both (fresh names) through `conn`, as its user; returns (table, ref)."""
    table, ref = f"t_{uuid.uuid4().hex[:12]}", f"t_{uuid.uuid4().hex[:12]}"
    conn.execute(f"CREATE TABLE {table} (w int, i int)")
    conn.execute(f"CREATE TABLE {ref} (id int PRIMARY KEY, label text)")
    conn.execute(f"INSERT INTO {ref} SELECT g, 'r' || g FROM generate_series(1, 100) g")
    return table, ref
