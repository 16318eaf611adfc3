"""README's quick start, as a newcomer follows it: examples/local-postgres.yaml with only the user
name and the hosts edited (here: the test cluster's), the password from APP_DB_PASSWORD,
`pgsidecar check-config`, `pgsidecar init-db`, `pgsidecar run`, and an application that changes
only its DSN."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import yaml

from tests.harness import pg
from tests.harness.sidecar import SIDECAR_PASSWORDS, SidecarProcess, free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local-postgres.yaml"
USER = "app_scram"


def test_local_example_fronts_a_real_postgresql(shared_topology: pg.Topology, tmp_path: Path) -> None:
    a1, a2 = shared_topology.a1, shared_topology.a2
    database = f"quick_{uuid.uuid4().hex[:8]}"
    a1.execute(f"CREATE DATABASE {database} OWNER {USER}")
    try:
        config = yaml.safe_load(EXAMPLE.read_text())
        # What README tells the user to edit: the user name and the hosts (the primary first,
        # then its standby). Ports and the spool file: only so that tests can run side by side.
        config["auth"]["users"][0]["name"] = USER
        config["upstream"]["regions"][0]["hosts"] = [a1.hostport, a2.hostport]
        config["upstream"]["probe_database"] = database
        config["listen"], config["metrics_listen"] = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config["spool"]["path"] = str(tmp_path / "spool.db")
        assert config["auth"]["users"][0]["password"] == "env:APP_DB_PASSWORD"
        env = {"APP_DB_PASSWORD": SIDECAR_PASSWORDS[USER]}
        sidecar = SidecarProcess(config, tmp_path / "sidecar", env=env)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "proxy", *args, "-c", str(sidecar.config_path)],
                cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=90,
            )  # fmt: skip

        checked = cli("check-config")
        assert checked.returncode == 0, checked.stderr
        ledger = cli("init-db", "-d", database)
        assert ledger.returncode == 0, ledger.stderr
        with sidecar.start():
            dsn = f"postgresql://{USER}:{SIDECAR_PASSWORDS[USER]}@127.0.0.1:{sidecar.port}/{database}"
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute("CREATE TABLE bookings (id serial PRIMARY KEY, guest text NOT NULL)")
                conn.execute("INSERT INTO bookings (guest) VALUES (%s)", ["first user"])
        assert a1.query("SELECT guest FROM bookings", dbname=database) == [("first user",)]
        assert a1.query("SELECT to_regclass('pgsidecar.spool_applied') IS NOT NULL", dbname=database) == [
            (True,)
        ]
    finally:
        a1.execute(f"DROP DATABASE {database} WITH (FORCE)")
