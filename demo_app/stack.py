"""Building blocks of the demo stack, shared by the runner (`demo_app.demo`) and the tests.

One `DemoStack` is: region A (writer a1 + synchronous standby a2) and region B (standby b1) from
`demo_app.cluster`; a local DynamoDB endpoint (moto) when the spool uses DynamoDB; pgsidecar as a
subprocess in front of the three nodes; and the Cafe app on a local HTTP port, whose DSN points at
the sidecar. Everything started is stopped by `close()` (also on an exception or a signal that
the caller turns into one): no orphan PostgreSQL, sidecar, or server thread is left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import yaml
from werkzeug.serving import BaseWSGIServer, make_server

from .cafe import create_app, install_schema
from .cluster import APP_DB, USERS, Topology, free_port, make_pg_dir, make_topology, set_sync_standbys

APP_USER = "app_scram"
APP_PASSWORD = USERS[APP_USER] or ""
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SpoolBackend = Literal["none", "sqlite", "dynamodb"]

# moto accepts any credentials; explicit fake ones keep boto3 from looking for real ones (and from
# ever talking to real AWS with them).
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# ---------------------------------------------------------------------------------------------
# Local DynamoDB
# ---------------------------------------------------------------------------------------------


class LocalDynamoDB:
    """moto's DynamoDB on a free loopback port (a real HTTP endpoint; boto3 talks to it as to AWS),
    in its own process (demo_app/dynamodb_endpoint.py: one request at a time), its output in
    `log_path`."""

    def __init__(self, log_path: Path, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "demo_app.dynamodb_endpoint", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # a Ctrl-C reaches the runner, which stops it last
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the local DynamoDB endpoint exited with {self.proc.returncode}: "
                                   f"see {log_path}")  # fmt: skip
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local DynamoDB endpoint did not listen within {timeout:g}s: "
                                   f"see {log_path}")  # fmt: skip
            time.sleep(0.05)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---------------------------------------------------------------------------------------------
# The sidecar subprocess
# ---------------------------------------------------------------------------------------------


@dataclass
class SidecarStatus:
    """What the sidecar's /metrics and /readyz say right now (error: why they could not be read)."""

    state: str = "unknown"
    writer_host: str | None = None
    writer_region: str | None = None
    spool_pending: int = 0
    spool_records: dict[str, int] = field(default_factory=dict)
    failovers: dict[str, int] = field(default_factory=dict)
    held_requests: int = 0
    ready: bool = False
    reason: str = ""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state, "writer_host": self.writer_host, "writer_region": self.writer_region,
            "spool_pending": self.spool_pending, "spool_records": self.spool_records,
            "failovers": self.failovers, "held_requests": self.held_requests, "ready": self.ready,
            "reason": self.reason, "error": self.error,
        }  # fmt: skip


def parse_metrics(text: str) -> SidecarStatus:
    """The demo-relevant part of the sidecar's Prometheus exposition (names: README.md, Metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    status = SidecarStatus()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "pgsidecar_cluster_state" and value == 1:
                status.state = labels.get("state", "?")
            elif name == "pgsidecar_writer_info" and value == 1:
                status.writer_host, status.writer_region = labels.get("host"), labels.get("region")
            elif name == "pgsidecar_spool_pending":
                status.spool_pending = int(value)
            elif name == "pgsidecar_spool_records_total":
                status.spool_records[labels.get("result", "?")] = int(value)
            elif name == "pgsidecar_failovers_total":
                status.failovers[labels.get("kind", "?")] = int(value)
            elif name == "pgsidecar_held_requests":
                status.held_requests = int(value)
    return status


class SidecarProcess:
    """`python -m proxy run -c sidecar.yaml` with its log in `workdir`."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.config_path = workdir / "sidecar.yaml"
        self.log_path = (log_dir or workdir) / "sidecar.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    @staticmethod
    def _hostport(value: str) -> tuple[str, int]:
        host, _, port = value.rpartition(":")
        return host, int(port)

    @property
    def port(self) -> int:
        return self._hostport(str(self.config["listen"]))[1]

    @property
    def metrics_url(self) -> str:
        host, port = self._hostport(str(self.config["metrics_listen"]))
        return f"http://{host}:{port}"

    def app_url(self, user: str = APP_USER, password: str = APP_PASSWORD, dbname: str = APP_DB) -> str:
        """The SQLAlchemy URL an app uses to reach the database through the sidecar."""
        return f"postgresql+psycopg://{user}:{password}@127.0.0.1:{self.port}/{dbname}"

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        return env

    def init_db(self, database: str = APP_DB, user: str = APP_USER, timeout: float = 60.0) -> None:
        """`pgsidecar init-db` for `database`, as a deployment does once: the spool's replay ledger
        and the commit-outcome marker. Without the marker a COMMIT cut by a failover gets 08007
        (outcome unknown) instead of its outcome, and the Cafe would show an error page for it."""
        argv = [sys.executable, "-m", "proxy", "init-db", "-c", str(self.config_path)]
        argv += ["-d", database, "-U", user]
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            cwd=str(self.workdir), env=self._env(), timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"pgsidecar init-db exited with {done.returncode}:\n{done.stderr.strip()}")

    def start(self, timeout: float = 20.0) -> None:
        env = self._env()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(self.workdir), env=env,
                # Its own session: a Ctrl-C at the terminal reaches only the runner, which then
                # stops the sidecar in order (SIGTERM) after the load that uses it.
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgsidecar exited with {self.proc.returncode}:\n{self.log_tail()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgsidecar not listening on {self.port} after {timeout}s:\n"
                                   + self.log_tail())
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until /readyz says a writer is known."""
        deadline = time.monotonic() + timeout
        while not self.status().ready:
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgsidecar not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def status(self) -> SidecarStatus:
        try:
            with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=2) as resp:
                status = parse_metrics(resp.read().decode())
        except (OSError, ValueError) as exc:
            return SidecarStatus(error=f"/metrics: {exc}")
        try:
            with urllib.request.urlopen(self.metrics_url + "/readyz", timeout=2) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 503: not ready, the body says why
            body = json.loads(exc.read() or b"{}")
        except (OSError, ValueError) as exc:
            body = {"ready": False, "reason": f"/readyz: {exc}"}
        status.ready, status.reason = bool(body.get("ready")), str(body.get("reason", ""))
        return status

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the sidecar drains and exits), SIGKILL if it does not."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def sidecar_config(
    topo: Topology,
    workdir: Path,
    spool: SpoolBackend,
    dynamodb_endpoint: str | None = None,
    hold_timeout: str = "5s",
    check_interval: str = "250ms",
    max_replica_lag: str = "5s",
) -> dict[str, Any]:
    """The demo's sidecar.yaml. Region A lists the standby first: the sidecar has to find the writer.
    Routing is spelled out (these are the defaults) so a reader of the file sees where reads go:
    to the writer, and to a standby within `max_replica_lag` only while there is no writer."""
    spool_cfg: dict[str, Any] = {"backend": spool}
    if spool == "sqlite":
        spool_cfg["path"] = str(workdir / "spool.db")
    elif spool == "dynamodb":
        spool_cfg["dynamodb"] = {
            "table": "pgsidecar-demo-spool", "region": "us-east-1", "endpoint_url": dynamodb_endpoint,
        }  # fmt: skip
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "auth": {
            "method": "scram-sha-256",
            "users": [{"name": APP_USER, "password": "env:CAFE_DB_PASSWORD"}],
        },
        "upstream": {
            "topology": "static",
            # The local clusters have no server certificates.
            "tls": "disable",
            # The probe checks the commit-outcome ledger where the app's data is.
            "probe_database": APP_DB,
            "regions": [
                {"name": "region-a", "hosts": [topo.a2.hostport, topo.a1.hostport]},
                {"name": "region-b", "hosts": [topo.b1.hostport]},
            ],
        },
        "failover": {"check_interval": check_interval, "hold_timeout": hold_timeout},
        "routing": {"reads": "failover", "max_replica_lag": max_replica_lag},
        "spool": spool_cfg,
    }


# ---------------------------------------------------------------------------------------------
# The Cafe app on a local HTTP port
# ---------------------------------------------------------------------------------------------


class CafeServer:
    """The Cafe (a threaded WSGI server in a thread of this process) on `preferred_port` if free."""

    def __init__(self, dsn: str, preferred_port: int = 8080) -> None:
        self.app = create_app(dsn)
        # One line per request would drown the demo's own output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.preferred_port = preferred_port
        self.server: BaseWSGIServer
        try:
            self.server = make_server("127.0.0.1", preferred_port, self.app, threaded=True)
        except OSError:
            self.server = make_server("127.0.0.1", free_port(), self.app, threaded=True)
        self.port = self.server.port
        self._thread = threading.Thread(target=self.server.serve_forever, name="cafe-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fell_back(self) -> bool:
        return self.port != self.preferred_port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.app.extensions["cafe_engine"].dispose()


# ---------------------------------------------------------------------------------------------
# The whole stack
# ---------------------------------------------------------------------------------------------


class DemoStack:
    """Clusters + (moto) + sidecar + Cafe. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        spool: SpoolBackend = "dynamodb",
        topology: Topology | None = None,
        workdir: Path | None = None,
        cafe_port: int = 8080,
        hold_timeout: str = "5s",
        say: Any = print,
        log_dir: Path | None = None,
        max_replica_lag: str = "5s",
    ) -> None:
        """`log_dir`: where the sidecar's and the DynamoDB endpoint's logs go, left in place by
        `close()` (default: the work directory, removed with it)."""
        self.spool: SpoolBackend = spool
        self.say = say
        self.cafe_port = cafe_port
        self.hold_timeout = hold_timeout
        self.max_replica_lag = max_replica_lag
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="pgsidecar-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir or self.workdir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._pg_base: Path | None = None
        self.topo: Topology | None = topology
        self._own_topo = topology is None
        self.dynamodb: LocalDynamoDB | None = None
        self.sidecar: SidecarProcess | None = None
        self.cafe: CafeServer | None = None

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        if self.topo is None:
            self.say("building region A (writer a1 + sync standby a2) and region B (standby b1) ...")
            self._pg_base = make_pg_dir(prefix="pgsidecar-demo-pg-")
            self.topo = make_topology(self._pg_base, sync=True)
        topo = self.topo
        # Only a2 acknowledges a1's commits: a2 is the one promoted by an in-region failover, so it
        # has every acknowledged order (with "ANY 1 (a2, b1)" an order only b1 had would be lost).
        set_sync_standbys(topo.a1, ["a2"])
        install_schema(topo.a1.dsn(dbname=APP_DB), APP_USER)
        env = {"CAFE_DB_PASSWORD": APP_PASSWORD}
        endpoint = None
        if self.spool == "dynamodb":
            self.dynamodb = LocalDynamoDB(self.log_dir / "dynamodb.log")
            endpoint = self.dynamodb.endpoint_url
            env.update(FAKE_AWS_ENV)
        config = sidecar_config(topo, self.workdir, self.spool, endpoint, hold_timeout=self.hold_timeout,
                                max_replica_lag=self.max_replica_lag)  # fmt: skip
        self.sidecar = SidecarProcess(config, self.workdir, env, log_dir=self.log_dir)
        self.sidecar.init_db()
        topo.a1.wait_caught_up([topo.a2, topo.b1])
        self.sidecar.start()
        self.sidecar.wait_ready()
        self.cafe = CafeServer(self.sidecar.app_url(), self.cafe_port)
        # The first request makes SQLAlchemy connect and introspect the server while a writer is
        # up, so the sidecar has those answers cached for a later outage.
        with urllib.request.urlopen(self.cafe.url + "/orders", timeout=30) as resp:
            resp.read()

    def writer_conninfo(self) -> str:
        """Superuser DSN of the current writer (raises when there is none)."""
        assert self.topo is not None
        return self.topo.writer().dsn(dbname=APP_DB)

    def writer_dsn_or_none(self) -> str | None:
        try:
            return self.writer_conninfo()
        except Exception:
            return None

    def close(self) -> None:
        """Stop everything this stack started, in reverse order; never raises."""
        if self.cafe is not None:
            with contextlib.suppress(Exception):
                self.cafe.stop()
            self.cafe = None
        if self.sidecar is not None:
            with contextlib.suppress(Exception):
                self.sidecar.stop()
        if self.dynamodb is not None:
            self.dynamodb.stop()
            self.dynamodb = None
        if self.topo is not None and self._own_topo:
            with contextlib.suppress(Exception):
                self.topo.stop_all()
        if self._pg_base is not None:
            shutil.rmtree(self._pg_base, ignore_errors=True)
            self._pg_base = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

