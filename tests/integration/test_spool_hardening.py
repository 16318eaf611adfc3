"""Hardening of the full-outage spool (issue 18): what is acknowledged is what is replayed.

One outage through the real sidecar process, real PostgreSQL 15 and psycopg (simple and extended
protocol):

* the `standard_conforming_strings=off` attacks (a backslash makes PostgreSQL read a quote as
  escaped, so what pglast saw as constants calls `wipe()` or runs a subquery at replay), by `SET`
  during the outage and by `options=-c` at login, get 57P03 and store nothing; the victim table
  is intact after the replay;
* legitimate text survives byte for byte: backslashes under `standard_conforming_strings=on`,
  plain literals and parameters under `off`;
* the record's DateStyle and TimeZone read literals at replay as they were read when
  acknowledged;
* `DEFAULT now()` columns get the acknowledgement instant, like an explicit `now()`;
* the spool file, its WAL/SHM files and the front-door cache are mode 0600.

And `pgsidecar run` / `check-config` with an unusable `spool.path` say so in one line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import yaml
from psycopg.pq import DiagnosticField, ExecStatus

from proxy.metrics import Stats
from proxy.spool import SpooledStatement, SpoolRecord, new_record_id
from proxy.spool.replay import Replayer
from proxy.spool.sqlite_store import SqliteSpoolStore
from tests.harness import pg
from tests.harness.sidecar import PROJECT_ROOT, sidecar_config
from tests.integration.test_failover import connect, metric, sqlstate_of_call, wait_state
from tests.integration.test_spool_drills import wait_drained
from tests.integration.test_spool_replay import USER, _connector

ATTACK = "INSERT INTO {t}(v) VALUES ('x1\\', ' || {wipe}()) -- ')"
SUBQUERY = "INSERT INTO {t}(v) VALUES ('x2\\', ' || (SELECT count(*) FROM {victim})) -- ')"


def simple(conn: psycopg.Connection[Any], sql: str) -> str | None:
    """Run `sql` with the simple Query protocol (libpq PQexec); its SQLSTATE, or None."""
    result = conn.pgconn.exec_(sql.encode())
    if result.status == ExecStatus.FATAL_ERROR:
        code = result.error_field(DiagnosticField.SQLSTATE)
        return code.decode() if code else "?"
    return None


def _objects(node: pg.PgNode) -> dict[str, str]:
    s = uuid.uuid4().hex[:8]
    names = {"victim": f"victim_{s}", "t": f"t_{s}", "wipe": f"wipe_{s}", "calls": f"calls_{s}",
             "dates": f"dates_{s}", "stamps": f"stamps_{s}"}  # fmt: skip
    users = ", ".join(pg.USERS)
    node.execute(
        f"CREATE TABLE {names['victim']} (id int); "
        f"INSERT INTO {names['victim']} SELECT generate_series(1, 5); "
        f"CREATE TABLE {names['calls']} (at timestamptz DEFAULT now()); "
        f"CREATE TABLE {names['t']} (n bigserial PRIMARY KEY, v text); "
        f"CREATE TABLE {names['dates']} (id text, d date, ts timestamptz); "
        f"CREATE TABLE {names['stamps']} (id text, at timestamptz, created_at timestamptz DEFAULT now(), "
        f"day date DEFAULT CURRENT_DATE, noted timestamptz DEFAULT (now() + interval '1 hour')); "
        f"CREATE FUNCTION {names['wipe']}() RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
        f"DELETE FROM {names['victim']}; INSERT INTO {names['calls']} DEFAULT VALUES; "
        f"RETURN 'wiped'; END $$; "
        f"GRANT ALL ON {names['victim']}, {names['calls']}, {names['t']}, {names['dates']}, "
        f"{names['stamps']} TO {users}; GRANT ALL ON SEQUENCE {names['t']}_n_seq TO {users}",
        dbname=pg.APP_DB,
    )
    return names


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outage_spool_means_at_replay_what_it_meant_when_acknowledged(
    fresh_topology: pg.Topology, sidecar_factory: Any, tmp_path: Path
) -> None:
    topo = fresh_topology
    o = _objects(topo.a1)
    spool_path = tmp_path / "spool.db"
    sidecar = sidecar_factory(
        {"failover": {"hold_timeout": "1s"}, "spool": {"backend": "sqlite", "path": str(spool_path)}},
        topology=topo,
    )
    on = connect(sidecar, application_name="scs-on")
    off = connect(sidecar, application_name="scs-off")
    on.execute(f"SELECT count(*) FROM {o['victim']}")
    sidecar.wait_for_log("event=frontdoor_filled", timeout=10)
    topo.a1.wait_caught_up([topo.a2])

    down = time.time()
    topo.a1.crash()
    topo.a2.crash()
    wait_state(sidecar, "outage", down, timeout=15)

    # standard_conforming_strings=off by SET during the outage: both protocols, both variants.
    off.execute("SET standard_conforming_strings = off")
    attack = ATTACK.format(**o)
    state, _ = sqlstate_of_call(lambda: off.execute(attack))
    assert state == "57P03", state
    assert simple(off, attack) == "57P03"
    assert simple(off, SUBQUERY.format(**o)) == "57P03"
    # Under off, text without a backslash reads the same either way, and parameters are not
    # SQL text at all: both are spooled.
    off.execute(f"INSERT INTO {o['t']}(v) VALUES ('off-plain')")
    off.execute(f"INSERT INTO {o['t']}(v) VALUES (%s)", ("off\\param'",))

    # ... and by options=-c at a login during the outage.
    with psycopg.connect(
        sidecar.dsn(connect_timeout=15, application_name="scs-options",
                    options="-c standard_conforming_strings=off"),
        autocommit=True,
    ) as late:  # fmt: skip
        assert simple(late, attack) == "57P03"
        state, _ = sqlstate_of_call(lambda: late.execute(SUBQUERY.format(**o)))
        assert state == "57P03", state
        late.execute(f"INSERT INTO {o['t']}(v) VALUES ('options-plain')")

    # standard_conforming_strings=on: backslashes are ordinary characters, kept byte for byte.
    assert simple(on, f"INSERT INTO {o['t']}(v) VALUES ('on\\simple\\\\''q')") is None
    on.execute(f"INSERT INTO {o['t']}(v) VALUES ('on\\extended'), (E'on\\\\escape')")

    # Literals read with the session's DateStyle / TimeZone.
    assert simple(on, "SET DateStyle = 'SQL, DMY'") is None
    assert simple(on, "SET TimeZone = 'Asia/Tokyo'") is None
    assert simple(on, f"INSERT INTO {o['dates']} VALUES ('dmy', '01/02/2024', '2024-01-01 09:00')") is None
    assert simple(on, "RESET DateStyle") is None

    # DEFAULT now(): pinned to the acknowledgement like an explicit now().
    on.execute(f"INSERT INTO {o['stamps']} (id, at) VALUES ('explicit', now())")
    on.execute(f"INSERT INTO {o['stamps']} (id, created_at) VALUES ('keyword', DEFAULT)")
    with on.transaction():
        on.execute(f"INSERT INTO {o['stamps']} (id) VALUES ('omitted')")
        on.execute(f"INSERT INTO {o['stamps']} VALUES ('positional', now())")
    acknowledged = time.time()
    spooled = 9  # transactions
    assert metric(sidecar, "pgsidecar_spool_records_total", result="spooled") == spooled

    # Owner-only files: the spool (with its WAL and shared memory) and the front-door cache.
    for path in (spool_path, Path(f"{spool_path}-wal"), Path(f"{spool_path}-shm"),
                 spool_path.with_name(spool_path.name + ".frontdoor.json")):  # fmt: skip
        assert path.exists() and _mode(path) == 0o600, (path, oct(_mode(path)))

    time.sleep(1.5)  # the replay runs well after the acknowledgement: DEFAULT now() would show it
    back = time.time()
    topo.a2.start()
    topo.a2.promote()
    wait_state(sidecar, "up", back, writer=topo.a2, timeout=30)
    wait_drained(sidecar)
    assert metric(sidecar, "pgsidecar_spool_records_total", result="replayed") == spooled
    assert metric(sidecar, "pgsidecar_spool_records_total", result="dead_letter") == 0

    a2 = topo.a2
    assert a2.query(f"SELECT count(*) FROM {o['victim']}", dbname=pg.APP_DB) == [(5,)]
    assert a2.query(f"SELECT count(*) FROM {o['calls']}", dbname=pg.APP_DB) == [(0,)]
    values = [r[0] for r in a2.query(f"SELECT v FROM {o['t']} ORDER BY n", dbname=pg.APP_DB)]
    assert values == ["off-plain", "off\\param'", "options-plain", "on\\simple\\\\'q", "on\\extended",
                      "on\\escape"]  # fmt: skip
    (dates,) = a2.query(
        f"SELECT d, ts AT TIME ZONE 'UTC' FROM {o['dates']} WHERE id = 'dmy'", dbname=pg.APP_DB
    )
    assert dates == (dt.date(2024, 2, 1), dt.datetime(2024, 1, 1, 0, 0)), dates

    stamps = {
        r[0]: r[1:]
        for r in a2.query(
            f"SELECT id, extract(epoch FROM at), extract(epoch FROM created_at), day, "
            f"extract(epoch FROM noted - created_at) FROM {o['stamps']}",
            dbname=pg.APP_DB,
        )
    }
    assert set(stamps) == {"explicit", "keyword", "omitted", "positional"}
    explicit_at, explicit_created, _, _ = stamps["explicit"]
    assert explicit_created == explicit_at, stamps  # to the microsecond
    positional_at, positional_created, _, _ = stamps["positional"]
    assert positional_created == positional_at, stamps
    for _at, created, day, noted in stamps.values():
        assert down <= float(created) <= acknowledged < back, (created, acknowledged, back)
        assert float(noted) == 3600.0
        # CURRENT_DATE in the session's TimeZone (Asia/Tokyo) at the acknowledgement.
        assert day == dt.datetime.fromtimestamp(float(created), ZoneInfo("Asia/Tokyo")).date()
    on.close()
    off.close()


# ---------------------------------------------------------------- spool.path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args, "-c", str(config)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_unusable_spool_path_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    config = sidecar_config(
        [f"127.0.0.1:{pg.free_port()}"],
        {"spool": {"backend": "sqlite", "path": str(blocker / "spool.db")}},
    )
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    for command in ("run", "check-config"):
        result = _cli(path, command)
        assert result.returncode != 0, (command, result)
        output = (result.stdout + result.stderr).strip()
        assert "Traceback" not in output, output
        lines = [line for line in output.splitlines() if "spool.path" in line]
        assert len(lines) == 1 and str(blocker) in lines[0], output
        if command == "run":
            assert len(output.splitlines()) <= 3, output


def test_missing_spool_directory_is_created_owner_only(tmp_path: Path) -> None:
    """A missing parent directory is created (mode 0700) and the creation logged; the spool file
    and the front-door cache are 0600 whatever the umask."""
    where = tmp_path / "new" / "deeper" / "spool.db"

    async def main() -> None:
        store = SqliteSpoolStore(where)
        await store.open()
        await store.close()

    asyncio.run(main())
    assert _mode(where.parent) == 0o700 and _mode(where.parent.parent) == 0o700
    assert _mode(where) == 0o600


# ---------------------------------------------------------------- records stored before the fix


def test_a_stored_record_is_replayed_as_the_classifier_read_it(
    shared_topology: pg.Topology, tmp_path: Path
) -> None:
    """A record an older sidecar stored under standard_conforming_strings=off with a backslash
    (the attack, acknowledged) goes to the dead letters instead of running wipe(); one under
    off without a backslash is replayed with on and means the same; a table's clock defaults
    are pinned to the record's acknowledgement instant."""
    a1 = shared_topology.a1
    o = _objects(a1)
    settings = {"standard_conforming_strings": "off", "client_encoding": "UTF8", "TimeZone": "UTC"}
    acked = dt.datetime(2025, 6, 7, 8, 9, 10, 111213, tzinfo=dt.UTC)
    attack = SpoolRecord.new(USER, pg.APP_DB, [SpooledStatement(ATTACK.format(**o), tag="INSERT 0 1")],
                             settings)  # fmt: skip
    plain = SpoolRecord(
        new_record_id(), acked.timestamp(), USER, pg.APP_DB, settings,
        (SpooledStatement(f"INSERT INTO {o['t']}(v) VALUES ('plain')", tag="INSERT 0 1"),
         SpooledStatement(f"INSERT INTO {o['stamps']} (id) VALUES ('old')", tag="INSERT 0 1")),
    )  # fmt: skip
    # Column privileges: a clock default the user may not set explicitly stays a default.
    narrow = f"narrow_{uuid.uuid4().hex[:8]}"
    a1.execute(f"CREATE TABLE {narrow} (id text, created_at timestamptz DEFAULT now()); "
               f"GRANT SELECT, INSERT (id) ON {narrow} TO {USER}", dbname=pg.APP_DB)  # fmt: skip
    column_privilege = SpoolRecord(
        new_record_id(), acked.timestamp(), USER, pg.APP_DB, settings,
        (SpooledStatement(f"INSERT INTO {narrow} (id) VALUES ('n')", tag="INSERT 0 1"),),
    )  # fmt: skip
    stats = Stats()

    async def main() -> None:
        store = SqliteSpoolStore(tmp_path / "old.db")
        await store.open()
        try:
            for record in (attack, plain, column_privilege):
                await store.append(record)
            result = await Replayer(store, _connector(a1), stats, "test-owner", lease_ttl=5).drain()
            assert (result.replayed, result.dead_letter, result.remaining) == (2, 1, 0), result
            (dead,) = await store.dead_letters()
            assert dead.id == attack.id and "ambiguous" in dead.error and dead.sqlstate == "22P06"
        finally:
            await store.close()

    asyncio.run(main())
    assert a1.query(f"SELECT count(*) FROM {o['victim']}", dbname=pg.APP_DB) == [(5,)]
    assert a1.query(f"SELECT count(*) FROM {o['calls']}", dbname=pg.APP_DB) == [(0,)]
    assert a1.query(f"SELECT v FROM {o['t']}", dbname=pg.APP_DB) == [("plain",)]
    (row,) = a1.query(f"SELECT created_at, day, noted - created_at FROM {o['stamps']}", dbname=pg.APP_DB)
    assert row == (acked, acked.date(), dt.timedelta(hours=1)), row
    assert a1.query(f"SELECT id FROM {narrow}", dbname=pg.APP_DB) == [("n",)]
