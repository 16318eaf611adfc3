"""`pgsidecar demo` (until the Cafe demo lands): real clusters, the sidecar in front, queries through it.

Builds region A (writer + synchronous standby) and region B (standby) with initdb, starts the
sidecar listing the *standby first* (so the topology monitor has to find the writer), and runs a
short workload through it with psycopg: DDL, inserts in a transaction, COPY, a prepared query, and
a check on the writer itself that every acknowledged row is there exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import yaml

from .cluster import USERS, Topology, free_port, make_pg_dir, make_topology

ROWS = 1000


def _write_config(topo: Topology, workdir: Path) -> tuple[Path, int]:
    port = free_port()
    config = {
        "listen": f"127.0.0.1:{port}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "auth": {
            "method": "scram-sha-256",
            "users": [{"name": "app_scram", "password": "env:DEMO_PASSWORD"}],
        },
        "upstream": {
            "tls": "disable",
            "regions": [
                {"name": "region-a", "hosts": [topo.a2.hostport, topo.a1.hostport]},
                {"name": "region-b", "hosts": [topo.b1.hostport]},
            ],
        },
        "spool": {"backend": "none"},
    }
    path = workdir / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"sidecar did not listen on {port}:\n{log.read_text()[-2000:]}")


def _workload(dsn: str, writer_dsn: str) -> list[tuple[str, str]]:
    report: list[tuple[str, str]] = []
    with psycopg.connect(dsn, application_name="pgsidecar-demo", prepare_threshold=0) as conn:
        row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery(), version()").fetchone()
        assert row is not None
        report.append(("writer found behind the sidecar", f"port {row[0]}, in recovery: {row[1]}"))
        conn.execute("DROP TABLE IF EXISTS demo_orders")
        conn.execute("CREATE TABLE demo_orders (id int PRIMARY KEY, item text NOT NULL)")
        with conn.transaction():
            for i in range(ROWS // 2):
                conn.execute("INSERT INTO demo_orders VALUES (%s, %s)", (i, f"espresso #{i}"))
        with conn.cursor().copy("COPY demo_orders FROM STDIN") as copy:
            for i in range(ROWS // 2, ROWS):
                copy.write_row((i, f"flat white #{i}"))
        count = conn.execute("SELECT count(*) FROM demo_orders WHERE id < %s", (ROWS,)).fetchone()
        report.append(("rows acknowledged through the sidecar", str(count[0] if count else None)))
    with psycopg.connect(writer_dsn) as direct:
        row = direct.execute("SELECT count(*), count(DISTINCT id) FROM demo_orders").fetchone()
        assert row is not None
        report.append(("rows on the writer (total / distinct)", f"{row[0]} / {row[1]}"))
        if row[0] != ROWS or row[1] != ROWS:
            raise RuntimeError(f"expected {ROWS} rows exactly once on the writer, found {row}")
    return report


def run_smoke_demo() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pgsidecar-demo-"))
    base = make_pg_dir(prefix="pgsidecar-demo-pg-")
    print("pgsidecar demo: building region A (writer + sync standby) and region B (standby)...")
    topo = make_topology(base)
    proc: subprocess.Popen[bytes] | None = None
    log = workdir / "sidecar.log"
    try:
        config_path, port = _write_config(topo, workdir)
        password = USERS["app_scram"] or ""
        env = {**os.environ, "DEMO_PASSWORD": password}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        _wait_listening(port, proc, log)
        print(f"pgsidecar listening on 127.0.0.1:{port} (config {config_path})")
        dsn = f"host=127.0.0.1 port={port} user=app_scram password={password} dbname=appdb"
        report = _workload(dsn, topo.a1.dsn(dbname="appdb"))
        width = max(len(k) for k, _ in report)
        for key, value in report:
            print(f"  {key.ljust(width)}  {value}")
        print("demo OK: every acknowledged row is on the writer exactly once.")
        return 0
    except Exception as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr)
        if log.exists():
            print(log.read_text()[-3000:], file=sys.stderr)
        return 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        topo.stop_all()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
