"""What the integration tests that drive real clients through a sidecar share.

They log in as the harness user app_scram into appdb, name their objects uniquely so they can
share clusters and sidecars, check what reached the writer by querying it directly (superuser),
run psql with a clean environment, and poll for conditions instead of sleeping.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import orm

from . import pg
from .sidecar import SIDECAR_PASSWORDS, SidecarProcess

USER = "app_scram"
PASSWORD = SIDECAR_PASSWORDS[USER]
DB = pg.APP_DB
CONNECT_TIMEOUT = 5
# psql, pgbench: a hung client must fail the test, not the whole run.
TOOL_TIMEOUT = 60


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def query_writer(node: pg.PgNode, sql: str, params: Any = None, dbname: str = DB) -> list[tuple[Any, ...]]:
    """Query the writer directly (superuser), bypassing the sidecar."""
    return node.query(sql, params, dbname=dbname)


def connect(
    sidecar: SidecarProcess, autocommit: bool = True, dbname: str = DB, **kwargs: Any
) -> psycopg.Connection[Any]:
    """psycopg connection through the sidecar; extra kwargs are psycopg's (prepare_threshold, ...)
    or libpq connection parameters (application_name, options, ...)."""
    return psycopg.connect(
        sidecar.dsn(USER, dbname=dbname, connect_timeout=CONNECT_TIMEOUT), autocommit=autocommit, **kwargs
    )


def direct(writer: pg.PgNode, autocommit: bool = True, **kwargs: Any) -> psycopg.Connection[Any]:
    """The same login as through the sidecar, straight to the writer: the reference behaviour."""
    return psycopg.connect(
        writer.dsn(USER, dbname=DB, password=PASSWORD, connect_timeout=CONNECT_TIMEOUT),
        autocommit=autocommit,
        **kwargs,
    )


@contextmanager
def scratch_database(writer: pg.PgNode, owner: str = USER) -> Iterator[str]:
    """A fresh database on the writer; dropped at the end (forcibly: a sidecar pools connections
    to it)."""
    name = unique_name("db")
    writer.execute(f"CREATE DATABASE {name} OWNER {owner}")
    try:
        yield name
    finally:
        writer.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def sqlalchemy_url(host: str, port: int, dbname: str = DB) -> sa.URL:
    return sa.URL.create(
        "postgresql+psycopg",
        username=USER,
        password=PASSWORD,
        host=host,
        port=port,
        database=dbname,
        query={"connect_timeout": str(CONNECT_TIMEOUT)},
    )


def item_model(table: str) -> tuple[sa.MetaData, Any]:
    """A SQLAlchemy ORM class for `table` (id serial, worker int, label text) and the metadata that
    creates it: a declarative base of its own, so `create_all` makes this table only."""

    class Base(orm.DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = table
        id: orm.Mapped[int] = orm.mapped_column(primary_key=True, autoincrement=True)
        worker: orm.Mapped[int]
        label: orm.Mapped[str]

    return Base.metadata, Item


def tool_env() -> dict[str, str]:
    """The environment for psql and pgbench: no PG* variables of the caller, the harness password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=PASSWORD, PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT), LC_ALL="C", LANG="C")
    return env


def psql_argv(host: str, port: int, *args: str, dbname: str = DB) -> list[str]:
    return [str(pg.find_bindir() / "psql"), "-X", "-w", "-h", host, "-p", str(port), "-U", USER,
            "-d", dbname, *args]  # fmt: skip


def psql(host: str, port: int, *args: str, dbname: str = DB) -> subprocess.CompletedProcess[str]:
    return run_tool(psql_argv(host, port, *args, dbname=dbname))


def pgbench(sidecar: SidecarProcess, dbname: str, *args: str) -> subprocess.CompletedProcess[str]:
    """pgbench through the sidecar."""
    return run_tool(
        [
            str(pg.find_bindir() / "pgbench"),
            "-h",
            sidecar.host,
            "-p",
            str(sidecar.port),
            "-U",
            USER,
            *args,
            dbname,
        ]
    )


def run_tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL client program to completion (TOOL_TIMEOUT at most), its output captured."""
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        env=tool_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def with_log(sidecar: SidecarProcess, what: str) -> str:
    """An assertion message followed by the tail of the sidecar's log."""
    return f"{what}\n--- sidecar log (tail) ---\n{sidecar.log_tail(30)}"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def http_get(sidecar: SidecarProcess, path: str) -> tuple[int, str]:
    """GET `path` from the sidecar's metrics/health listener: status and body (errors included)."""
    try:
        with urllib.request.urlopen(sidecar.metrics_url + path, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
