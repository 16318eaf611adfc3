"""Full-outage spool drills through the real sidecar process (ARCHITECTURE.md, P2 and P5).

Each drill builds its own a1/a2/b1 topology, crashes every PostgreSQL node, spools orders from
real clients, and brings a writer back with `start` + `pg_promote()` on a2:

1. orders from psycopg (autocommit and pipeline), fresh SQLAlchemy engines and pg8000 (native
   and DB-API) are acknowledged, reads get 57P03, the sidecar is SIGKILLed and restarted in the
   middle of the outage (it greets new clients from the front-door cache on disk and keeps
   spooling); after recovery every acknowledged row is there once, in acknowledgement order;
2. the sidecar is SIGKILLed while it replays a backlog of a few hundred transactions; after a
   restart the rest is replayed and nothing is applied twice (the ledger turns an applied but
   not yet forgotten record into a duplicate);
3. two sidecars share one DynamoDB spool table: both spool, both recover, rows exactly once;
4. a record that hits a unique violation goes to the dead letters (CLI and metric), the rest of
   the backlog still replays, and `spool replay --retry` applies it once the conflict is gone.

Order is checked with a `bigserial` column filled at replay time: the rows sorted by it must
carry the client's sequence numbers in the order the orders were acknowledged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pg8000.dbapi
import pg8000.native
import psycopg
import pytest
import sqlalchemy as sa

from tests.harness import pg
from tests.harness.clients import http_get as http
from tests.harness.sidecar import PROJECT_ROOT, SIDECAR_PASSWORDS, SidecarProcess
from tests.integration.test_failover import USER, connect, metric, sqlstate_of_call, wait_state

BACKENDS = ["sqlite", "dynamodb"]
BACKLOG = 200  # transactions spooled for the kill-during-replay drill


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials for moto (the sidecar subprocess inherits the environment)."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)


# ---------------------------------------------------------------------------------------------
# Helpers


def spool_config(backend: str, tmp_path: Path, endpoint: str, table: str | None = None) -> dict[str, Any]:
    spool: dict[str, Any] = {"backend": backend, "path": str(tmp_path / "spool.db")}
    if backend == "dynamodb":
        spool["dynamodb"] = {"table": table or f"spool-{uuid.uuid4().hex[:8]}", "region": "us-east-1",
                             "endpoint_url": endpoint}  # fmt: skip
    return spool


def make_orders(node: pg.PgNode) -> str:
    """A table whose `n` is assigned when a row is really inserted (at replay for spooled ones)."""
    name = f"orders_{uuid.uuid4().hex[:10]}"
    users = ", ".join(pg.USERS)
    node.execute(
        f"CREATE TABLE {name} (n bigserial PRIMARY KEY, seq int NOT NULL, id text NOT NULL UNIQUE, "
        f"client text NOT NULL, at timestamptz DEFAULT now()); "
        f"GRANT ALL ON {name} TO {users}; GRANT ALL ON SEQUENCE {name}_n_seq TO {users}",
        dbname=pg.APP_DB,
    )
    return name


def rows(node: pg.PgNode, table: str) -> list[tuple[int, str]]:
    """(seq, id) of every row, in the order the rows were inserted."""
    return [
        (int(r[0]), str(r[1]))
        for r in node.query(f"SELECT seq, id FROM {table} ORDER BY n", dbname=pg.APP_DB)
    ]


def crash_everything(topo: pg.Topology) -> None:
    for node in (topo.a1, topo.a2, topo.b1):
        node.crash()


def warm_up(sidecar: SidecarProcess, conn: psycopg.Connection[Any], table: str, topo: pg.Topology) -> None:
    """While the database is up: one order, the front-door cache filled (and saved to disk), a
    SQLAlchemy engine's first connect seen, and a2 holding everything a1 committed."""
    conn.execute(f"INSERT INTO {table} (seq, id, client) VALUES (0, 'before', 'psycopg')")
    sidecar.wait_for_log("event=frontdoor_filled", timeout=10)
    engine = sa.create_engine(sa_url(sidecar), pool_pre_ping=True)
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT 1")).scalar() == 1
    engine.dispose()
    topo.a1.wait_caught_up([topo.a2])


def spooling_sidecar(
    sidecar_factory: Any, topo: pg.Topology, spool: dict[str, Any], app: str
) -> tuple[SidecarProcess, psycopg.Connection[Any], str]:
    """A fresh orders table, a sidecar with a 1 s hold and `spool`, and a warmed-up connection
    (application_name `app`) to it: the start of every outage drill here."""
    table = make_orders(topo.a1)
    sidecar = sidecar_factory({"failover": {"hold_timeout": "1s"}, "spool": spool}, topology=topo)
    conn = connect(sidecar, application_name=app)
    warm_up(sidecar, conn, table, topo)
    return sidecar, conn, table


def sa_url(sidecar: SidecarProcess, driver: str = "psycopg") -> sa.URL:
    return sa.engine.make_url(f"postgresql+{driver}://").set(
        username=USER, password=SIDECAR_PASSWORDS[USER], host=sidecar.host, port=sidecar.port,
        database=pg.APP_DB,
    )  # fmt: skip


def restart(sidecar: SidecarProcess) -> int:
    """SIGKILL the sidecar and start it again with the same config (same spool, same front-door
    file); returns the log offset where the new process starts."""
    sidecar.kill()
    sidecar.proc = None
    offset = sidecar.log_offset()
    sidecar.start()
    return offset


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, sidecar: SidecarProcess | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = f"\n{sidecar.log_tail(40)}" if sidecar is not None else ""
            raise AssertionError(f"{what}: not within {timeout}s{tail}")
        time.sleep(0.05)


def wait_drained(sidecar: SidecarProcess, timeout: float = 30.0) -> None:
    wait_for("spool_pending == 0", lambda: metric(sidecar, "pgsidecar_spool_pending") == 0, timeout, sidecar)


def log_field(line: str, name: str) -> str:
    for part in line.split():
        if part.startswith(name + "="):
            return part[len(name) + 1 :]
    raise AssertionError(f"no {name}= in {line!r}")


class Orders:
    """Places orders with increasing sequence numbers and remembers which were acknowledged."""

    def __init__(self, sidecar: SidecarProcess, table: str) -> None:
        self.sidecar = sidecar
        self.table = table
        self.acked: list[tuple[int, str]] = [(0, "before")]
        self.transactions = 0  # acknowledged transactions (spool records) placed by this object
        self._next = 1

    def _take(self, client: str, count: int = 1) -> list[tuple[int, str]]:
        taken = [(self._next + i, f"{client}-{self._next + i}") for i in range(count)]
        self._next += count
        return taken

    def _sql(self, client: str, style: str) -> str:
        values = {"psycopg": "(%s, %s, 'psycopg')", "named": f"(:p_a, :p_b, '{client}')"}[style]
        return f"INSERT INTO {self.table} (seq, id, client) VALUES {values}"

    def psycopg_autocommit(self, conn: psycopg.Connection[Any]) -> None:
        [(seq, oid)] = self._take("ac")
        conn.execute(self._sql("psycopg", "psycopg"), (seq, oid))
        self.acked.append((seq, oid))
        self.transactions += 1

    def psycopg_pipeline(self, conn: psycopg.Connection[Any], count: int = 3) -> None:
        taken = self._take("pipe", count)
        with conn.pipeline():
            for seq, oid in taken:
                conn.execute(self._sql("psycopg", "psycopg"), (seq, oid))
        self.acked.extend(taken)
        # psycopg sends one Sync when the pipeline block ends: the statements between two Syncs
        # are one implicit transaction on PostgreSQL, and so one spool record.
        self.transactions += 1

    def sqlalchemy_fresh(self) -> None:
        """BEGIN; INSERT ... VALUES (:p_a, :p_b, ...); COMMIT from an engine that never connected."""
        [(seq, oid)] = self._take("sa")
        engine = sa.create_engine(sa_url(self.sidecar), pool_pre_ping=True)
        try:
            with engine.begin() as c:
                c.execute(sa.text(self._sql("sqlalchemy", "named")), {"p_a": seq, "p_b": oid})
        finally:
            engine.dispose()
        self.acked.append((seq, oid))
        self.transactions += 1

    def pg8000_native(self) -> None:
        [(seq, oid)] = self._take("native")
        conn = pg8000.native.Connection(
            USER, host=self.sidecar.host, port=self.sidecar.port, database=pg.APP_DB,
            password=SIDECAR_PASSWORDS[USER], timeout=15,
        )  # fmt: skip
        try:
            conn.run(self._sql("pg8000", "named").replace(":p_a", ":a").replace(":p_b", ":b"), a=seq, b=oid)
        finally:
            conn.close()
        self.acked.append((seq, oid))
        self.transactions += 1

    def pg8000_dbapi(self, count: int = 2) -> None:
        taken = self._take("dbapi", count)
        conn = pg8000.dbapi.connect(USER, host=self.sidecar.host, port=self.sidecar.port, database=pg.APP_DB,
                                    password=SIDECAR_PASSWORDS[USER], timeout=15)  # fmt: skip
        try:
            cur = conn.cursor()
            for seq, oid in taken:
                cur.execute(
                    f"INSERT INTO {self.table} (seq, id, client) VALUES (%s, %s, 'pg8000-dbapi')", (seq, oid)
                )
            conn.commit()
        finally:
            conn.close()
        self.acked.extend(taken)
        self.transactions += 1


def cli(sidecar: SidecarProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m proxy spool ... -c <the sidecar's config>`, as an operator runs it."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "spool", *args, "-c", str(sidecar.config_path)],
        capture_output=True, text=True, timeout=60, cwd=str(sidecar.dir), env=env, check=False,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 1. Every client style spools; the sidecar is killed and restarted mid-outage.


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_outage_every_client_and_a_sidecar_restart(
    fresh_topology: pg.Topology, sidecar_factory: Any, tmp_path: Path, moto_endpoint: str,
    aws_env: None, backend: str,
) -> None:  # fmt: skip
    topo = fresh_topology
    spool = spool_config(backend, tmp_path, moto_endpoint)
    sidecar, conn, table = spooling_sidecar(sidecar_factory, topo, spool, "orders")
    orders = Orders(sidecar, table)

    down = time.time()
    crash_everything(topo)
    wait_state(sidecar, "outage", down, timeout=15)

    orders.psycopg_autocommit(conn)
    orders.psycopg_pipeline(conn)
    orders.sqlalchemy_fresh()
    orders.sqlalchemy_fresh()
    orders.pg8000_native()
    orders.pg8000_dbapi()
    orders.psycopg_autocommit(conn)
    state, waited = sqlstate_of_call(lambda: conn.execute(f"SELECT count(*) FROM {table}"))
    assert state == "57P03" and 0.8 <= waited <= 5.0, (state, waited)
    before_kill = orders.transactions
    assert metric(sidecar, "pgsidecar_spool_records_total", result="spooled") == before_kill
    assert metric(sidecar, "pgsidecar_spool_pending") == before_kill

    # SIGKILL mid-outage; the same config comes back up with no database at all.
    offset = restart(sidecar)
    opened = sidecar.wait_for_log("event=spool_opened", since=offset)
    assert log_field(opened, "pending") == str(before_kill), opened
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")  # the old connection died with the sidecar
    conn.close()
    # New clients log in from the front-door file and their orders are spooled.
    with connect(sidecar, application_name="after-restart") as again:
        orders.psycopg_autocommit(again)
        orders.psycopg_pipeline(again, count=2)
        state, waited = sqlstate_of_call(lambda: again.execute(f"SELECT count(*) FROM {table}"))
        assert state == "57P03" and waited <= 5.0, (state, waited)
    orders.sqlalchemy_fresh()
    orders.pg8000_native()
    after_restart = orders.transactions - before_kill
    assert metric(sidecar, "pgsidecar_spool_records_total", result="spooled") == after_restart
    assert metric(sidecar, "pgsidecar_spool_pending") == orders.transactions

    back = time.time()
    topo.a2.start()
    topo.a2.promote()
    wait_state(sidecar, "up", back, writer=topo.a2, timeout=30)
    wait_drained(sidecar)
    assert metric(sidecar, "pgsidecar_spool_records_total", result="replayed") == orders.transactions
    assert metric(sidecar, "pgsidecar_spool_records_total", result="duplicate") == 0
    assert metric(sidecar, "pgsidecar_spool_records_total", result="dead_letter") == 0
    # Every acknowledged order once, replayed in the order it was acknowledged.
    assert rows(topo.a2, table) == orders.acked
    # New work after recovery goes to the writer.
    with connect(sidecar, application_name="after-recovery") as fresh:
        orders.psycopg_autocommit(fresh)
        assert fresh.execute(f"SELECT count(*) FROM {table}").fetchone() == (len(orders.acked),)
    assert rows(topo.a2, table) == orders.acked


# ---------------------------------------------------------------------------------------------
# 2. SIGKILL while the backlog replays; the restarted sidecar replays the rest, exactly once.


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_during_replay_then_restart_applies_each_record_once(
    fresh_topology: pg.Topology, sidecar_factory: Any, tmp_path: Path, moto_endpoint: str,
    aws_env: None, backend: str,
) -> None:  # fmt: skip
    topo = fresh_topology
    # Small replay transactions (10 records each) so the kill lands between two of them.
    spool = {**spool_config(backend, tmp_path, moto_endpoint), "replay_batch": 10}
    sidecar, conn, table = spooling_sidecar(sidecar_factory, topo, spool, "backlog")
    orders = Orders(sidecar, table)
    # Each row inserted takes 5 ms, so that the replay lasts about a second and the kill below
    # lands in its middle however quick the rest is (seen: the whole backlog replayed between two
    # polls of the count).
    topo.a1.execute(
        f"CREATE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM pg_sleep(0.005); RETURN NEW; END$$; "
        f"CREATE TRIGGER slow BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {table}_slow()",
        dbname=pg.APP_DB,
    )
    topo.a1.wait_caught_up([topo.a2])

    down = time.time()
    crash_everything(topo)
    wait_state(sidecar, "outage", down, timeout=15)
    for _ in range(BACKLOG):
        orders.psycopg_autocommit(conn)
    conn.close()
    assert metric(sidecar, "pgsidecar_spool_pending") == BACKLOG

    offset = sidecar.log_offset()
    topo.a2.start()
    topo.a2.promote()
    # Kill the sidecar as soon as part, not all, of the backlog is in the database.
    with topo.a2.connect(dbname=pg.APP_DB) as direct:
        deadline = time.monotonic() + 30
        while True:
            (count,) = direct.execute(f"SELECT count(*) FROM {table}").fetchone() or (0,)
            if count > 1 + BACKLOG // 4:  # 'before' plus a quarter of the backlog
                sidecar.kill()
                break
            assert time.monotonic() < deadline, "replay did not start\n" + sidecar.log_tail(30)
            time.sleep(0.005)
        # A COMMIT the sidecar sent just before it died is still applied by its backend: count
        # once the dead sidecar's sessions are gone (seen: 10 more records applied after the count).
        while direct.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone() != (0,):
            assert time.monotonic() < deadline + 10, "the killed sidecar's sessions linger"
            time.sleep(0.01)
        (applied,) = direct.execute(f"SELECT count(*) FROM {table}").fetchone() or (0,)
    applied -= 1
    assert 0 < applied < BACKLOG, (
        f"the sidecar was killed after {applied} of {BACKLOG} replayed records: the drill needs a "
        "kill in the middle of the replay\n" + sidecar.log_tail(20)
    )
    assert "event=spool_replay_finished" not in sidecar.log_text()[offset:]

    offset = restart(sidecar)
    opened = sidecar.wait_for_log("event=spool_opened", since=offset)
    left = int(log_field(opened, "pending"))
    # Applied records that were removed are gone. Removals trail the commits (each replayed
    # chunk of 10 is removed in one write, settled every 2 chunks), so up to 20 applied records
    # can still be in the spool: the ledger turns each into a duplicate below.
    assert BACKLOG - applied <= left <= BACKLOG - applied + 20, (left, applied)
    wait_drained(sidecar, timeout=60)
    # The restarted sidecar took its own lease back at once (the dead process's lease would
    # otherwise hold the replay, and every new transaction behind it, for the lease TTL).
    assert "event=spool_replay_skipped" not in sidecar.log_text()[offset:], sidecar.log_tail(20)
    replayed = metric(sidecar, "pgsidecar_spool_records_total", result="replayed")
    duplicate = metric(sidecar, "pgsidecar_spool_records_total", result="duplicate")
    counts = (replayed, duplicate, left)
    assert replayed + duplicate == left and duplicate == left - (BACKLOG - applied), counts
    assert metric(sidecar, "pgsidecar_spool_records_total", result="dead_letter") == 0
    assert rows(topo.a2, table) == orders.acked
    ledger = topo.a2.query("SELECT count(*) FROM pgsidecar.spool_applied", dbname=pg.APP_DB)
    assert int(ledger[0][0]) == BACKLOG


# ---------------------------------------------------------------------------------------------
# 3. Two sidecars, one DynamoDB spool.


def test_two_sidecars_share_one_dynamodb_spool(
    fresh_topology: pg.Topology, sidecar_factory: Any, tmp_path: Path, moto_endpoint: str, aws_env: None,
) -> None:  # fmt: skip
    topo = fresh_topology
    table = make_orders(topo.a1)
    shared = f"spool-{uuid.uuid4().hex[:8]}"
    sidecars = [
        sidecar_factory(
            {
                "failover": {"hold_timeout": "1s"},
                "spool": spool_config("dynamodb", tmp_path / name, moto_endpoint, table=shared),
            },
            topology=topo,
        )
        for name in ("one", "two")
    ]
    conns = [connect(s, application_name=f"fleet-{i}") for i, s in enumerate(sidecars)]
    warm_up(sidecars[0], conns[0], table, topo)
    conns[1].execute(f"INSERT INTO {table} (seq, id, client) VALUES (-1, 'before-two', 'psycopg')")
    sidecars[1].wait_for_log("event=frontdoor_filled", timeout=10)
    topo.a1.wait_caught_up([topo.a2])

    down = time.time()
    crash_everything(topo)
    for s in sidecars:
        wait_state(s, "outage", down, timeout=15)
    per_sidecar = 40
    expected = {"before", "before-two"}
    for i in range(per_sidecar):  # interleaved, as a fleet behind one load balancer would be
        for k, conn in enumerate(conns):
            oid = f"s{k}-{i}"
            conn.execute(f"INSERT INTO {table} (seq, id, client) VALUES (%s, %s, 'fleet')", (i, oid))
            expected.add(oid)
    for s in sidecars:
        assert metric(s, "pgsidecar_spool_records_total", result="spooled") == per_sidecar

    back = time.time()
    topo.a2.start()
    topo.a2.promote()
    for s in sidecars:
        wait_state(s, "up", back, writer=topo.a2, timeout=60)
        wait_drained(s)
    got = [oid for _, oid in rows(topo.a2, table)]
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    replayed = sum(metric(s, "pgsidecar_spool_records_total", result="replayed") for s in sidecars)
    duplicate = sum(metric(s, "pgsidecar_spool_records_total", result="duplicate") for s in sidecars)
    assert replayed == 2 * per_sidecar and duplicate == 0, (replayed, duplicate)
    # The lease: one sidecar drained the shared backlog; the other either found the lease held
    # (and waited) or came after it was released and found nothing left: which one is timing.
    each = sorted(metric(s, "pgsidecar_spool_records_total", result="replayed") for s in sidecars)
    assert each == [0, 2 * per_sidecar], each
    idle = next(s for s in sidecars if metric(s, "pgsidecar_spool_records_total", result="replayed") == 0)
    idle_log = idle.log_text()
    assert "event=spool_replay_skipped" in idle_log or re.search(
        r"event=spool_replay_finished\b[^\n]*\breplayed=0\b", idle_log
    ), idle.log_tail(30)
    # Each sidecar's own orders were replayed in its acknowledgement order.
    for k in range(2):
        mine = [seq for seq, oid in rows(topo.a2, table) if oid.startswith(f"s{k}-")]
        assert mine == list(range(per_sidecar))
    for conn in conns:
        conn.close()


# ---------------------------------------------------------------------------------------------
# 4. A unique violation at replay: dead letter, the rest replays, `replay --retry` after a fix.


@pytest.mark.parametrize("backend", BACKENDS)
def test_unique_violation_is_dead_lettered_and_retried_after_the_fix(
    fresh_topology: pg.Topology, sidecar_factory: Any, tmp_path: Path, moto_endpoint: str,
    aws_env: None, backend: str,
) -> None:  # fmt: skip
    topo = fresh_topology
    spool = spool_config(backend, tmp_path, moto_endpoint)
    sidecar, conn, table = spooling_sidecar(sidecar_factory, topo, spool, "conflicts")
    # A row the outage client does not know about (made by another app before the outage).
    topo.a1.execute(
        f"INSERT INTO {table} (seq, id, client) VALUES (100, 'taken', 'elsewhere')", dbname=pg.APP_DB
    )
    topo.a1.wait_caught_up([topo.a2])

    down = time.time()
    crash_everything(topo)
    wait_state(sidecar, "outage", down, timeout=15)
    sql = f"INSERT INTO {table} (seq, id, client) VALUES (%s, %s, 'psycopg')"
    conn.execute(sql, (1, "first"))
    conn.execute(sql, (2, "taken"))  # acknowledged: the spool cannot know the id is taken
    conn.execute(sql, (3, "third"))
    conn.execute(sql, (4, "fourth"))

    back = time.time()
    topo.a2.start()
    topo.a2.promote()
    wait_state(sidecar, "up", back, writer=topo.a2, timeout=30)
    wait_drained(sidecar)
    assert metric(sidecar, "pgsidecar_spool_records_total", result="dead_letter") == 1
    assert metric(sidecar, "pgsidecar_spool_records_total", result="replayed") == 3
    assert rows(topo.a2, table) == [(0, "before"), (100, "taken"), (1, "first"), (3, "third"), (4, "fourth")]

    listed = cli(sidecar, "dead-letters")
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if "23505" in line]
    assert len(lines) == 1 and table in lines[0], listed.stdout
    assert "1 dead letter(s)" in listed.stdout, listed.stdout
    status, _ = http(sidecar, "/readyz")
    assert status == 200

    # Retrying before the fix fails again and keeps the record.
    again = cli(sidecar, "replay", "--retry")
    assert again.returncode != 0 and "dead-lettered 1" in again.stdout, (again.stdout, again.stderr)
    assert "1 dead letter(s)" in cli(sidecar, "dead-letters").stdout

    topo.a2.execute(f"DELETE FROM {table} WHERE id = 'taken'", dbname=pg.APP_DB)
    fixed = cli(sidecar, "replay", "--retry")
    assert fixed.returncode == 0, (fixed.stdout, fixed.stderr)
    assert "1 dead letter(s) moved back to pending" in fixed.stdout, fixed.stdout
    assert "replayed 1," in fixed.stdout, fixed.stdout
    assert "0 dead letter(s)" in cli(sidecar, "dead-letters").stdout
    assert rows(topo.a2, table) == [(0, "before"), (1, "first"), (3, "third"), (4, "fourth"), (2, "taken")]
    conn.close()
