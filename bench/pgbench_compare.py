"""pgbench through pgsidecar, PgBouncer and directly, measured in the same run (ARCHITECTURE.md, Testing).

``python -m bench.pgbench_compare`` (``make bench``; extra flags via ``make bench ARGS="..."``):

1. Makes sure PgBouncer is installed (Debian package; installed with apt-get when we are root).
2. Builds one fresh PostgreSQL 15 primary (``demo_app.cluster``) with a scale-10 pgbench database.
3. Throughput: for every case (``-S`` simple, ``-S -M extended``, ``-S -M prepared``, tpcb-like,
   ``-S -C``) runs ``pgbench -c 8 -j 2`` against direct PostgreSQL, PgBouncer (session, transaction)
   and the sidecar (session, transaction), alternating targets within each round so that drift of
   the machine (page cache, CPU frequency, noisy neighbours) hits every target alike; the median
   of the rounds is reported.
4. Memory, after the throughput runs (measured first, it left the machine in a state that moved
   the Python proxies' ratios to PgBouncer by about -0.07 in the runs that followed; cause not
   found): starts a sidecar and a PgBouncer in session mode, reads their VmRSS at idle, opens 1,000
   client connections that log in with SCRAM and then stay idle, reads VmRSS again.
5. Prints a table with TPS, mean latency and the ratios sidecar/PgBouncer (same pool mode) and
   sidecar/direct; each proxy's CPU per transaction (user, kernel) and the share of each run it
   spent on a CPU and waiting for one, read from /proc around every run; the memory figures; and
   the targets of the issue marked PASS or MISS.

Every process it starts (PostgreSQL, PgBouncer, sidecars) listens on a free loopback port and is
stopped on the way out (try/finally plus atexit), also after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
import scramp
import yaml

from bench import exit_on_sigterm
from demo_app.cluster import (
    APP_DB,
    PG_OS_USER,
    USERS,
    PgNode,
    find_bindir,
    free_port,
    make_pg_dir,
    make_primary,
)
from proxy import compiled

PROJECT_ROOT = Path(__file__).resolve().parents[1]

USER = "app_scram"
PASSWORD = USERS[USER] or ""
SCALE = 10
CLIENTS = 8
THREADS = 2
POOL_SIZE = 20
IDLE_CLIENTS = 1000
# pool.max_clients / max_client_conn: the 1,000 idle clients plus room for readiness probes.
MAX_CLIENTS = IDLE_CLIENTS + 100
# In session mode the sidecar pins one server connection per client from login on (README: "each
# client gets one upstream connection for its lifetime"), so the memory run needs a pool, and a
# PostgreSQL, that can hold one server per idle client; the benchmarks use POOL_SIZE.
MEMORY_SIDECAR_POOL = IDLE_CLIENTS + 10
MAX_CONNECTIONS = IDLE_CLIENTS + 200

Mode = Literal["session", "transaction"]
Kind = Literal["direct", "splice", "pgbouncer", "sidecar"]


# ---------------------------------------------------------------------------------------------
# Cases, targets, thresholds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    args: tuple[str, ...]
    # pgbench -n skips its own VACUUM/TRUNCATE (which would go through the pooler under test and
    # could differ per target); for tpcb-like we do it directly before each run instead.
    reset_tables: bool = False


CASES: dict[str, Case] = {
    c.key: c
    for c in (
        Case("select", "select-only, simple (-S)", ("-S",)),
        Case("extended", "select-only, extended (-S -M extended)", ("-S", "-M", "extended")),
        Case("prepared", "select-only, prepared (-S -M prepared)", ("-S", "-M", "prepared")),
        Case("tpcb", "tpcb-like (default script)", (), reset_tables=True),
        Case("connect", "select-only, connect per tx (-S -C)", ("-S", "-C")),
    )
}


@dataclass(frozen=True)
class Target:
    name: str
    kind: Kind
    mode: Mode | None
    port: int


# Order within a round: each proxy run sits next to its PgBouncer counterpart.
TARGET_ORDER = (
    "direct",
    "splice",
    "pgbouncer-session",
    "sidecar-session",
    "pgbouncer-transaction",
    "sidecar-transaction",
)


@dataclass(frozen=True)
class Threshold:
    label: str
    case: str
    mode: Mode
    minimum: float


THRESHOLDS = (
    Threshold("select-only (-S), session mode", "select", "session", 0.9),
    Threshold("select-only (-S), transaction mode", "select", "transaction", 0.8),
    Threshold("-S -M prepared, transaction mode", "prepared", "transaction", 0.8),
    Threshold("-S -C (connect per transaction), session mode", "connect", "session", 0.7),
    Threshold("-S -C (connect per transaction), transaction mode", "connect", "transaction", 0.7),
)
RSS_LIMIT_MIB = 80.0


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and carries the relevant log tail."""


def as_root() -> bool:
    return os.geteuid() == 0


def say(text: str = "") -> None:
    print(text, flush=True)


def tail(text: str, lines: int = 15) -> str:
    rows = [r for r in text.strip().splitlines() if r.strip()]
    return "\n".join("    | " + r for r in rows[-lines:]) or "    | (no output)"


def file_tail(path: Path, lines: int = 15) -> str:
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError:
        return "    | (no log file)"


def client_env() -> dict[str, str]:
    # Ambient PG* variables (PGHOST, PGSERVICE, ...) would silently redirect pgbench.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGPASSWORD=PASSWORD,
        # None of the targets offers TLS here; "prefer" would only add an SSLRequest round trip
        # to every connection (which -C would measure).
        PGSSLMODE="disable",
        PGCONNECT_TIMEOUT="10",
        LC_ALL="C",
    )
    return env


def chown_pg(path: Path, mode: int) -> None:
    """PgBouncer runs as postgres when we are root: its files must be readable by that user."""
    path.chmod(mode)
    if as_root():
        pw = pwd.getpwnam(PG_OS_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS in /proc/{pid}/status")


@dataclass(frozen=True)
class CpuSample:
    """A proxy process's CPU so far: user and system ticks of all its threads (/proc/PID/stat), and
    its main thread's time on a CPU and runnable but waiting for one (/proc/PID/schedstat, ns).
    The proxies here do their work on the main thread (the others are idle resolver pools)."""

    user_ticks: int
    sys_ticks: int
    run_ns: int
    wait_ns: int
    at: float  # monotonic seconds


def cpu_sample(pid: int) -> CpuSample | None:
    """None when /proc does not say (another OS, a kernel without schedstat, the process gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        # Fields after the command name, which may itself hold spaces and parentheses.
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        run_ns, wait_ns = (int(x) for x in Path(f"/proc/{pid}/schedstat").read_text().split()[:2])
        return CpuSample(int(stat[11]), int(stat[12]), run_ns, wait_ns, time.monotonic())
    return None


@dataclass
class ProxyCpu:
    """What one pgbench run cost the proxy in its path, per transaction and as shares of the run."""

    user_us: float  # CPU per transaction, user side
    sys_us: float  # ... and in the kernel
    on_cpu: float  # fraction of the run the proxy's main thread was on a CPU
    waiting: float  # fraction it was runnable but waiting for a CPU

    @property
    def total_us(self) -> float:
        return self.user_us + self.sys_us


def proxy_cpu(before: CpuSample | None, after: CpuSample | None, transactions: int) -> ProxyCpu | None:
    if before is None or after is None or transactions <= 0 or after.at <= before.at:
        return None
    ticks = (after.user_ticks - before.user_ticks) + (after.sys_ticks - before.sys_ticks)
    run_us = (after.run_ns - before.run_ns) / 1000
    # The split from the tick counters (coarse, 100 Hz), the amount from schedstat (ns).
    user_share = (after.user_ticks - before.user_ticks) / ticks if ticks > 0 else 0.0
    per_tx = run_us / transactions
    wall_ns = (after.at - before.at) * 1e9
    return ProxyCpu(
        per_tx * user_share,
        per_tx * (1 - user_share),
        (after.run_ns - before.run_ns) / wall_ns,
        (after.wait_ns - before.wait_ns) / wall_ns,
    )


def nofile_limit(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def raise_nofile(wanted: int) -> int:
    """Raise our soft RLIMIT_NOFILE (inherited by the sidecars and PgBouncer) to ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return int(soft)


def wait_listening(port: int, alive: Callable[[], bool], what: str, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise BenchError(f"{what} exited before listening on port {port}\n{file_tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not listening on port {port} after {timeout}s\n{file_tail(log)}")
        time.sleep(0.05)


def wait_query_ok(port: int, what: str, log: Path | None, timeout: float = 20.0) -> None:
    """Log in as the benchmark user and run SELECT 1 (a proxy may listen before it found the writer)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=port,
                user=USER,
                password=PASSWORD,
                dbname=APP_DB,
                sslmode="disable",
                connect_timeout=5,
                autocommit=True,
            ) as conn:
                conn.execute("SELECT 1").fetchall()
            return
        except psycopg.Error as exc:
            if time.monotonic() > deadline:
                detail = file_tail(log) if log is not None else ""
                raise BenchError(f"{what} on port {port} does not answer SELECT 1: {exc}\n{detail}") from exc
            time.sleep(0.2)


class Cleanup:
    """Teardown steps run last-in first-out, once: from main's finally and, as a backstop, atexit."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self._steps.append((what, fn))

    def run(self) -> None:
        while self._steps:
            what, fn = self._steps.pop()
            try:
                fn()
            except Exception as exc:
                print(f"warning: cleanup of {what} failed: {exc}", file=sys.stderr, flush=True)


CLEANUP = Cleanup()
atexit.register(CLEANUP.run)


# ---------------------------------------------------------------------------------------------
# PgBouncer
# ---------------------------------------------------------------------------------------------


def pgbouncer_binary() -> str | None:
    # /usr/sbin is not on a non-root PATH on Debian.
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )


def ensure_pgbouncer() -> str:
    """The pgbouncer binary; installs the Debian package first when missing and we are root."""
    binary = pgbouncer_binary()
    if binary is not None:
        return binary
    if not as_root():
        raise BenchError(
            "PgBouncer is not installed. Install it with `sudo apt-get install -y pgbouncer` "
            "(or run this benchmark as root, which installs it), then run again."
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def install() -> subprocess.CompletedProcess[str]:
        say("PgBouncer not found: apt-get install -y pgbouncer")
        return subprocess.run(
            ["apt-get", "install", "-y", "pgbouncer"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=900,
        )

    proc = install()
    if proc.returncode != 0:
        # Only now: a stale or empty package index is the usual reason, and updating costs time.
        say("install failed; apt-get update, then again")
        subprocess.run(
            ["apt-get", "update"], capture_output=True, text=True, env=env, check=False, timeout=900
        )
        proc = install()
    binary = pgbouncer_binary()
    if proc.returncode != 0 or binary is None:
        raise BenchError(
            f"could not install PgBouncer (apt-get exited {proc.returncode})\n"
            f"{tail(proc.stdout + proc.stderr)}"
        )
    return binary


def pgbouncer_version(binary: str) -> tuple[int, int, str]:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    m = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.\d+)?", out)
    if m is None:
        raise BenchError(f"cannot read the PgBouncer version from {out!r}")
    return int(m.group(1)), int(m.group(2)), m.group(0).split()[1]


class PgBouncer:
    kind: Kind = "pgbouncer"

    def __init__(
        self,
        binary: str,
        version: tuple[int, int],
        workdir: Path,
        mode: Mode,
        upstream: PgNode,
        pool_size: int,
        label: str = "",
    ) -> None:
        self.binary = binary
        self.version = version
        self.mode = mode
        self.name = f"pgbouncer-{mode}"
        # label: the memory run's instances get directories of their own.
        self.dir = workdir / f"{self.name}{label}"
        self.dir.mkdir()
        chown_pg(self.dir, 0o700)
        self.port = free_port()
        self.upstream = upstream
        self.pool_size = pool_size
        self.log = self.dir / "pgbouncer.log"
        self.pidfile = self.dir / "pgbouncer.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    def _write_config(self) -> Path:
        userlist = self.dir / "userlist.txt"
        # PgBouncer's recommended SCRAM setup: the role's verifier exactly as pg_authid holds it
        # (derived from the same password the sidecar gets). Checking a client's proof then costs
        # no PBKDF2 (a plain-text entry costs 4096 HMAC rounds per login, which -C would charge to
        # PgBouncer), and the keys from the client's proof log PgBouncer in upstream.
        verifier = self.upstream.query("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (USER,))
        if not verifier or not str(verifier[0][0]).startswith("SCRAM-SHA-256$"):
            raise BenchError(f"role {USER} has no SCRAM verifier in pg_authid: {verifier!r}")
        userlist.write_text(f'"{USER}" "{verifier[0][0]}"\n')
        chown_pg(userlist, 0o600)
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": str(userlist),
            "pool_mode": self.mode,
            "default_pool_size": self.pool_size,
            "max_client_conn": MAX_CLIENTS,
            "pidfile": str(self.pidfile),
            # The sidecar runs at log_level warning: neither logs a line per connection (-C).
            "log_connections": 0,
            "log_disconnections": 0,
            "server_reset_query": "DISCARD ALL",
            "server_tls_sslmode": "disable",
        }
        if self.mode == "transaction" and self.version >= (1, 21):
            # Protocol-level prepared statements in transaction mode arrived in 1.21; with it the
            # -M prepared comparison is like for like (the sidecar tracks 200 per server too).
            settings["max_prepared_statements"] = 200
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{APP_DB} = host=127.0.0.1 port={self.upstream.port} dbname={APP_DB}\n\n"
            "[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )
        chown_pg(ini, 0o600)
        return ini

    def start(self) -> PgBouncer:
        ini = self._write_config()
        # PgBouncer does not raise its own soft RLIMIT_NOFILE, and runuser's PAM session
        # (pam_limits) resets it to 1024: too few for max_client_conn. A shell raises it towards
        # the hard limit (best effort; measure_memory warns if it stayed low), then execs, so the
        # pid file still names PgBouncer itself.
        nofile = MAX_CLIENTS + 2 * POOL_SIZE + 100
        argv = ["sh", "-c", 'ulimit -n "$0" 2>/dev/null; exec "$@"', str(nofile), self.binary, str(ini)]
        if as_root():
            # PgBouncer refuses to run as root.
            argv = ["runuser", "-u", PG_OS_USER, "--", *argv]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.dir),
                start_new_session=True,
            )
        CLEANUP.push(self.name, self.stop)
        proc = self.proc
        wait_listening(self.port, lambda: proc.poll() is None, self.name, self.log)
        wait_query_ok(self.port, self.name, self.log)
        return self

    @property
    def pid(self) -> int:
        """PgBouncer's own pid (under runuser the child we started is runuser, not pgbouncer)."""
        if self._pid is None:
            try:
                pid = int(self.pidfile.read_text().split()[0])
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except (OSError, ValueError, IndexError) as exc:
                raise BenchError(f"{self.name}: cannot read {self.pidfile}: {exc}") from exc
            # A stale pid file could name any process; RSS and signals must reach PgBouncer.
            if comm != "pgbouncer":
                raise BenchError(f"{self.name}: pid {pid} from {self.pidfile} is {comm!r}, not pgbouncer")
            self._pid = pid
        return self._pid

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        pid: int | None = None
        with contextlib.suppress(BenchError):
            pid = self.pid
        if proc.poll() is None:
            # SIGINT: PgBouncer's safe shutdown; by the time we stop it no client is connected.
            target = pid if pid is not None else proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                for p in (pid, proc.pid):
                    if p is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)
                proc.wait(10)


# ---------------------------------------------------------------------------------------------
# Sidecar
# ---------------------------------------------------------------------------------------------


class _PythonService:
    """A Python process of ours under test (the sidecar, the splice): stopped with SIGTERM."""

    name: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None

    def _launch(self, module: str, *args: str) -> None:
        """`python -m module args...` from the project root, output to `log`; returns once it listens."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(PROJECT_ROOT),
                env=env,
                start_new_session=True,
            )
        CLEANUP.push(self.name, self.stop)
        proc = self.proc
        wait_listening(self.port, lambda: proc.poll() is None, self.name, self.log)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} is not running")
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


class Sidecar(_PythonService):
    kind: Kind = "sidecar"

    def __init__(self, workdir: Path, mode: Mode, upstream: PgNode, pool_size: int, label: str = "") -> None:
        self.mode = mode
        self.name = f"sidecar-{mode}"
        self.dir = workdir / f"{self.name}{label}"
        self.dir.mkdir()
        self.port = free_port()
        self.upstream = upstream
        self.pool_size = pool_size
        self.log = self.dir / "sidecar.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sidecar:
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "metrics_listen": None,
            "log_level": "warning",
            "shutdown_timeout": "5s",
            "pool": {"mode": self.mode, "size": self.pool_size, "max_clients": MAX_CLIENTS},
            "auth": {"method": "scram-sha-256", "users": [{"name": USER, "password": PASSWORD}]},
            "upstream": {
                "topology": "static",
                "tls": "disable",
                "regions": [{"name": "local", "hosts": [self.upstream.hostport]}],
            },
            "spool": {"backend": "none"},
        }
        path = self.dir / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        self._launch("proxy", "run", "-c", str(path))
        wait_query_ok(self.port, self.name, self.log)
        return self


class Splice(_PythonService):
    """`bench.splice`: a naive uvloop byte splice, the floor for a Python proxy on this machine
    (one upstream connection per client, like session mode; no parsing at all)."""

    kind: Kind = "splice"
    mode: Mode = "session"

    def __init__(self, workdir: Path, upstream: PgNode) -> None:
        self.name = "splice"
        self.dir = workdir / self.name
        self.dir.mkdir()
        self.port = free_port()
        self.upstream = upstream
        self.log = self.dir / "splice.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Splice:
        upstream = f"{self.upstream.host}:{self.upstream.port}"
        self._launch("bench.splice", "--listen", f"127.0.0.1:{self.port}", "--upstream", upstream)
        return self


Service = PgBouncer | Sidecar | Splice


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------


def build_database(base: Path) -> PgNode:
    say(f"building a PostgreSQL primary in {base} ...")
    node = make_primary(base, "bench")
    CLEANUP.push("PostgreSQL", lambda: node.stop(mode="immediate"))
    node.set_config(
        {
            "max_connections": MAX_CONNECTIONS,
            # The scale-10 database (~160 MB) fits, so select-only runs never wait for I/O.
            "shared_buffers": "256MB",
            # A commit's WAL flush would dominate tpcb-like latency and hide the proxies' own cost,
            # which is what is compared here; fsync stays on.
            "synchronous_commit": "off",
        },
        reload=False,
    )
    node.restart()
    pgbench = str(find_bindir() / "pgbench")
    say(f"pgbench -i -s {SCALE} (as {USER}) ...")
    t0 = time.monotonic()
    proc = subprocess.run(
        # G: generate the rows server side, much faster than streaming them with COPY.
        [
            pgbench,
            "-i",
            "-s",
            str(SCALE),
            "-I",
            "dtGvp",
            "-q",
            "-h",
            node.host,
            "-p",
            str(node.port),
            "-U",
            USER,
            APP_DB,
        ],
        capture_output=True,
        text=True,
        env=client_env(),
        cwd=tempfile.gettempdir(),
        check=False,
        timeout=900,
    )
    if proc.returncode != 0:
        raise BenchError(f"pgbench -i failed (exit {proc.returncode})\n{tail(proc.stderr + proc.stdout)}")
    say(f"  done in {time.monotonic() - t0:.1f}s")
    return node


def reset_tpcb_tables(node: PgNode) -> None:
    # What pgbench itself does before a tpcb-like run without -n, done directly so that it never
    # depends on (or is timed through) the target under test.
    for sql in ("VACUUM pgbench_branches", "VACUUM pgbench_tellers", "TRUNCATE pgbench_history"):
        node.execute(sql, dbname=APP_DB)


def server_connections(node: PgNode) -> int:
    rows = node.query(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s", (USER, APP_DB)
    )
    return int(rows[0][0])


# ---------------------------------------------------------------------------------------------
# pgbench
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    tps: float
    latency_ms: float
    transactions: int = 0
    cpu: ProxyCpu | None = None  # the proxy's, where the target is one


class PgbenchFailed(RuntimeError):
    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(f"pgbench exited {returncode}")
        self.returncode = returncode
        self.output = output  # stderr (where pgbench reports errors), else stdout


_TPS = re.compile(r"^tps = ([0-9.]+)", re.M)
_LAT = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_TXNS = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


def run_pgbench(port: int, case: Case, duration: int) -> Run:
    argv = [
        str(find_bindir() / "pgbench"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        USER,
        "-n",
        "-c",
        str(CLIENTS),
        "-j",
        str(THREADS),
        "-T",
        str(duration),
        *case.args,
        APP_DB,
    ]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=client_env(),
            cwd=tempfile.gettempdir(),
            check=False,
            timeout=duration + 120,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise PgbenchFailed(-1, f"timed out after {duration + 120}s\n{out}") from exc
    tps, lat, txns = _TPS.search(proc.stdout), _LAT.search(proc.stdout), _TXNS.search(proc.stdout)
    # Exit code 2 means some client aborted ("Run was aborted; the above results are incomplete"):
    # its partial figures would flatter nobody, so the run counts as failed.
    if proc.returncode != 0 or tps is None or lat is None:
        raise PgbenchFailed(proc.returncode, proc.stderr if proc.stderr.strip() else proc.stdout)
    return Run(float(tps.group(1)), float(lat.group(1)), int(txns.group(1)) if txns else 0)


@dataclass
class Cell:
    """One case on one target: its runs, or why it has none."""

    runs: list[Run] = field(default_factory=list)
    error: str | None = None  # pgbench's output tail
    note: str | None = None  # what the table shows instead of figures

    @property
    def tps(self) -> float | None:
        return statistics.median(r.tps for r in self.runs) if self.runs and self.error is None else None

    @property
    def latency_ms(self) -> float | None:
        return (
            statistics.median(r.latency_ms for r in self.runs) if self.runs and self.error is None else None
        )

    @property
    def cpu(self) -> ProxyCpu | None:
        """The proxy's CPU figures, each the median over the rounds."""
        cpus = [r.cpu for r in self.runs if r.cpu is not None]
        if not cpus or self.error is not None:
            return None
        return ProxyCpu(
            statistics.median(c.user_us for c in cpus),
            statistics.median(c.sys_us for c in cpus),
            statistics.median(c.on_cpu for c in cpus),
            statistics.median(c.waiting for c in cpus),
        )

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the TPS over the rounds: how far one round can be trusted."""
        med = self.tps
        if med is None or len(self.runs) < 2 or med == 0:
            return None
        values = [r.tps for r in self.runs]
        return (max(values) - min(values)) / med


def prepared_unsupported(target: Target, case: Case, pgb_version: tuple[int, int]) -> bool:
    return (
        target.kind == "pgbouncer"
        and target.mode == "transaction"
        and case.key == "prepared"
        and pgb_version < (1, 21)
    )


def benchmark(
    targets: Sequence[Target],
    cases: Sequence[Case],
    node: PgNode,
    duration: int,
    rounds: int,
    pgb_version: tuple[int, int],
    pids: dict[str, int],
) -> dict[str, dict[str, Cell]]:
    """`pids`: the proxy process behind each target that has one, whose CPU each run reads."""
    results: dict[str, dict[str, Cell]] = {c.key: {t.name: Cell() for t in targets} for c in cases}
    for case in cases:
        say(f"\n== {case.label}: {len(targets)} targets x {rounds} round(s) x {duration}s")
        for rnd in range(1, rounds + 1):
            parts: list[str] = []
            for target in targets:
                cell = results[case.key][target.name]
                if cell.error is not None:
                    # It failed in an earlier round: its figures are void anyway, do not spend time.
                    continue
                if case.reset_tables:
                    reset_tpcb_tables(node)
                pid = pids.get(target.name)
                before = cpu_sample(pid) if pid is not None else None
                try:
                    run = run_pgbench(target.port, case, duration)
                except PgbenchFailed as exc:
                    cell.error = exc.output
                    if prepared_unsupported(target, case, pgb_version):
                        short = ".".join(map(str, pgb_version))
                        cell.note = f"n/a (PgBouncer {short} lacks max_prepared_statements)"
                    else:
                        cell.note = f"error (pgbench exit {exc.returncode})"
                    parts.append(f"{target.name} {cell.note}")
                    continue
                if pid is not None:
                    run.cpu = proxy_cpu(before, cpu_sample(pid), run.transactions)
                cell.runs.append(run)
                parts.append(f"{target.name} {run.tps:,.0f}")
            say(f"  round {rnd}: " + " | ".join(parts))
    return results


# ---------------------------------------------------------------------------------------------
# Idle clients (memory)
# ---------------------------------------------------------------------------------------------


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    (length,) = struct.unpack("!I", header[1:])
    return header[:1], await reader.readexactly(length - 4)


def _error_text(body: bytes) -> str:
    fields = {chunk[:1]: chunk[1:].decode(errors="replace") for chunk in body.split(b"\0") if chunk}
    return f"{fields.get(b'C', '?')}: {fields.get(b'M', '?')}"


async def login(port: int) -> asyncio.StreamWriter:
    """A v3 login with SCRAM-SHA-256 and nothing else: the connection then stays idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    params = {"user": USER, "database": APP_DB, "application_name": "bench-idle"}
    body = struct.pack("!I", 196608) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()
    )
    body += b"\0"
    writer.write(struct.pack("!I", len(body) + 4) + body)
    client = scramp.ScramClient(["SCRAM-SHA-256"], USER, PASSWORD)

    def send(type_byte: bytes, payload: bytes) -> None:
        writer.write(type_byte + struct.pack("!I", len(payload) + 4) + payload)

    try:
        while True:
            kind, msg = await _read_message(reader)
            if kind == b"E":
                raise BenchError(f"login refused: {_error_text(msg)}")
            if kind == b"Z":
                return writer
            if kind != b"R":
                continue  # ParameterStatus, BackendKeyData, NoticeResponse
            (code,) = struct.unpack_from("!I", msg)
            if code == 10:  # AuthenticationSASL
                first = client.get_client_first().encode()
                send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first)
            elif code == 11:  # SASLContinue
                client.set_server_first(msg[4:].decode())
                send(b"p", client.get_client_final().encode())
            elif code == 12:  # SASLFinal
                client.set_server_final(msg[4:].decode())
            elif code != 0:
                raise BenchError(f"unexpected authentication request {code}")
            await writer.drain()
    except BaseException:
        writer.close()
        raise


async def open_idle_clients(
    port: int, count: int, concurrency: int = 50
) -> tuple[list[asyncio.StreamWriter], list[str]]:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> asyncio.StreamWriter:
        async with sem:
            return await asyncio.wait_for(login(port), 60)

    outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    writers = [o for o in outcomes if isinstance(o, asyncio.StreamWriter)]
    errors = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    return writers, errors


async def close_clients(writers: Sequence[asyncio.StreamWriter]) -> None:
    for w in writers:
        with contextlib.suppress(Exception):
            w.write(b"X\0\0\0\4")  # Terminate, so proxies release rather than mourn the session
            w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


@dataclass
class Memory:
    target: str
    note: str
    idle_kib: int
    loaded_kib: int | None = None
    clients_open: int = 0
    server_connections: int | None = None
    errors: list[str] = field(default_factory=list)


def measure_memory(service: Service, node: PgNode, note: str) -> Memory:
    say(f"  {service.name}:")
    time.sleep(1.0)  # let start-up work (topology probe, readiness login) settle
    mem = Memory(service.name, note, rss_kib(service.pid))
    limit = nofile_limit(service.pid)
    if limit is not None and limit < MAX_CLIENTS + 100:
        say(f"    warning: {service.name} may open only {limit} files")

    async def go() -> None:
        t0 = time.monotonic()
        writers, errors = await open_idle_clients(service.port, IDLE_CLIENTS)
        mem.clients_open, mem.errors = len(writers), errors
        say(
            f"    {len(writers)} idle clients logged in ({time.monotonic() - t0:.1f}s)"
            + (f", {len(errors)} failed, e.g. {errors[0]}" if errors else "")
        )
        try:
            await asyncio.sleep(2.0)  # idle means idle: let buffers and pools settle first
            mem.loaded_kib = rss_kib(service.pid)
            mem.server_connections = server_connections(node)
        finally:
            await close_clients(writers)

    asyncio.run(go())
    return mem


def memory_phase(workdir: Path, node: PgNode, binary: str, version: tuple[int, int]) -> list[Memory]:
    say(f"\n== memory: VmRSS at idle, then with {IDLE_CLIENTS} idle clients (SCRAM login, then nothing)")
    raise_nofile(IDLE_CLIENTS + MAX_CLIENTS + 512)
    plans: list[tuple[Callable[[], Service], str]] = [
        (
            lambda: Sidecar(workdir, "session", node, MEMORY_SIDECAR_POOL, label="-mem"),
            f"session, pool.size {MEMORY_SIDECAR_POOL} (a session pins its server from login on)",
        ),
        (
            lambda: PgBouncer(binary, version, workdir, "session", node, POOL_SIZE, label="-mem"),
            f"session, default_pool_size {POOL_SIZE} (servers are assigned at the first query)",
        ),
        (
            lambda: Sidecar(workdir, "transaction", node, POOL_SIZE, label="-mem"),
            f"transaction, pool.size {POOL_SIZE}",
        ),
    ]
    out: list[Memory] = []
    for make, note in plans:
        service = make()
        try:
            service.start()
            mem = measure_memory(service, node, note)
            out.append(mem)
            say(
                f"    VmRSS {mem.idle_kib / 1024:.1f} MiB idle -> "
                f"{(mem.loaded_kib or 0) / 1024:.1f} MiB with {mem.clients_open} idle clients, "
                f"{mem.server_connections} server connections"
            )
        finally:
            service.stop()
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def fmt_ratio(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None else "-"


def print_table(
    targets: Sequence[Target], cases: Sequence[Case], results: dict[str, dict[str, Cell]]
) -> None:
    by_name = {t.name: t for t in targets}
    header = (
        f"{'case':<40} {'target':<22} {'TPS':>10} {'lat ms':>8} {'spread':>7} {'vs PgB':>7} {'vs direct':>9}"
    )
    say("\n" + header)
    say("-" * len(header))
    for case in cases:
        row = results[case.key]
        direct = row.get("direct")
        for i, (name, cell) in enumerate(row.items()):
            t = by_name[name]
            label = case.label if i == 0 else ""
            if cell.tps is None:
                say(f"{label:<40} {name:<22} {cell.note or 'no data':>10}")
                continue
            vs_pgb = "-"
            if t.kind in ("sidecar", "splice") and (pgb := row.get(f"pgbouncer-{t.mode}")) is not None:
                vs_pgb = fmt_ratio(ratio(cell.tps, pgb.tps)) if pgb.tps is not None else "n/a"
            vs_direct = (
                "-" if t.kind == "direct" or direct is None else fmt_ratio(ratio(cell.tps, direct.tps))
            )
            spread = f"{cell.spread * 100:.0f}%" if cell.spread is not None else "-"
            lat = cell.latency_ms or 0.0
            figures = f"{cell.tps:>10,.0f} {lat:>8.3f} {spread:>7} {vs_pgb:>7} {vs_direct:>9}"
            say(f"{label:<40} {name:<22} {figures}")
        say("")
    say("TPS and latency: median over the rounds; spread: (max - min) / median TPS; vs PgB: sidecar TPS /")
    say("PgBouncer TPS in the same pool mode; vs direct: TPS / direct PostgreSQL TPS. splice: a naive uvloop")
    say("byte splice (bench/splice.py, no parsing), the floor for a Python proxy here; vs PgB session mode.")


def print_cpu(targets: Sequence[Target], cases: Sequence[Case], results: dict[str, dict[str, Cell]]) -> None:
    """Each proxy's CPU per transaction: unlike TPS, nearly free of the machine's drift, and it says
    why a ratio is what it is (with the proxy's one thread short of CPU, TPS follows 1 / CPU)."""
    by_name = {t.name: t for t in targets}
    rows = [
        (case, name, cell)
        for case in cases
        for name, cell in results[case.key].items()
        if by_name[name].kind != "direct" and cell.cpu is not None
    ]
    if not rows:
        return
    say("\nProxy CPU per transaction (/proc; median over the rounds)")
    header = (
        f"{'case':<40} {'target':<22} {'user µs':>8} {'kernel µs':>10} {'total µs':>9} {'on CPU':>7}"
        f" {'waiting':>8} {'PgB / it':>9}"
    )
    say(header)
    say("-" * len(header))
    shown: str | None = None
    for case, name, cell in rows:
        cpu = cell.cpu
        assert cpu is not None
        t = by_name[name]
        vs = "-"
        pgb = results[case.key].get(f"pgbouncer-{t.mode}")
        if t.kind in ("sidecar", "splice") and pgb is not None and pgb.cpu is not None and cpu.total_us > 0:
            vs = fmt_ratio(pgb.cpu.total_us / cpu.total_us)
        label = case.label if case.key != shown else ""
        shown = case.key
        say(
            f"{label:<40} {name:<22} {cpu.user_us:>8.2f} {cpu.sys_us:>10.2f} {cpu.total_us:>9.2f}"
            f" {cpu.on_cpu * 100:>6.0f}% {cpu.waiting * 100:>7.0f}% {vs:>9}"
        )
    say("on CPU / waiting: share of the run the proxy's main thread ran, or was runnable but waited for a")
    say("CPU (schedstat). PgB / it: PgBouncer's CPU per transaction over this proxy's, the TPS ratio to")
    say("expect when each proxy gets the same CPU share and that share is what limits the run.")


def print_errors(cases: Sequence[Case], results: dict[str, dict[str, Cell]]) -> None:
    shown = False
    for case in cases:
        for name, cell in results[case.key].items():
            if cell.error is None:
                continue
            if not shown:
                say("\nErrors (pgbench output, tail):")
                shown = True
            say(f"  {case.label} on {name}: {cell.note}")
            say(tail(cell.error, 6))


def print_memory(mems: Sequence[Memory]) -> None:
    say(f"\nMemory (VmRSS; {IDLE_CLIENTS} clients log in with SCRAM-SHA-256 and stay idle)")
    header = f"{'target':<22} {'idle':>10} {'+ clients':>10} {'per client':>11} {'servers':>8}  config"
    say(header)
    say("-" * (len(header) + 40))
    for m in mems:
        loaded = f"{m.loaded_kib / 1024:.1f} MiB" if m.loaded_kib is not None else "-"
        per = (
            f"{(m.loaded_kib - m.idle_kib) / max(m.clients_open, 1):.1f} KiB"
            if m.loaded_kib is not None and m.clients_open
            else "-"
        )
        say(
            f"{m.target:<22} {m.idle_kib / 1024:>6.1f} MiB {loaded:>10} {per:>11} {m.server_connections!s:>8}"
            f"  {m.note}"
        )
        if m.clients_open < IDLE_CLIENTS:
            say(
                f"{'':<22} only {m.clients_open} of {IDLE_CLIENTS} clients logged in; first error: "
                f"{m.errors[0] if m.errors else '?'}"
            )


@dataclass
class Check:
    label: str
    target: str
    value: str
    status: str  # PASS, MISS, n/a, skipped


def paired_ratios(side: Cell, ref: Cell) -> list[float]:
    """sidecar TPS / reference TPS within each round, where the two ran minutes apart at most: how
    far the machine's drift moves the ratio (the verdict is on the ratio of the medians)."""
    if side.tps is None or ref.tps is None:
        return []
    return [a.tps / b.tps for a, b in zip(side.runs, ref.runs, strict=True) if b.tps > 0]


def evaluate(
    results: dict[str, dict[str, Cell]], mems: Sequence[Memory], pgb_version_text: str
) -> list[Check]:
    checks: list[Check] = []
    for th in THRESHOLDS:
        want = f">= {th.minimum}x PgBouncer"
        row = results.get(th.case)
        if row is None:
            checks.append(Check(th.label, want, "case not run", "skipped"))
            continue
        side_cell = row[f"sidecar-{th.mode}"]
        side = side_cell.tps
        ref_cell = row[f"pgbouncer-{th.mode}"]
        ref, notes = ref_cell.tps, []
        if ref is None and th.case == "prepared" and row["pgbouncer-session"].tps is not None:
            # PgBouncer < 1.21 cannot run -M prepared in transaction mode at all. Its session mode
            # (faster still: no per-transaction assignment) is the nearest, and a stricter, reference.
            ref_cell = row["pgbouncer-session"]
            ref = ref_cell.tps
            notes.append(f"PgBouncer {pgb_version_text} cannot; reference: PgBouncer session mode")
        r = ratio(side, ref)
        if r is None:
            why = "sidecar failed" if side is None else "no PgBouncer figure"
            checks.append(Check(th.label, want, why, "n/a"))
            continue
        paired = paired_ratios(side_cell, ref_cell)
        if len(paired) > 1:
            notes.insert(0, f"round by round {min(paired):.2f}-{max(paired):.2f}x")
        splice = row.get("splice")
        floor = splice.tps if splice is not None else None
        if th.mode == "session" and th.case != "connect" and side and ref and floor:
            # The floor of any Python proxy here, in the same run: with the splice itself near or
            # under the target, a miss is not the sidecar's parsing. (Not for -C: the splice does
            # not pool, so each of its connections is a new PostgreSQL backend.)
            notes.append(f"no-parsing splice {floor / ref:.2f}x; pgsidecar / splice {side / floor:.2f}x")
        side_cpu, ref_cpu = side_cell.cpu, ref_cell.cpu
        if side_cpu is not None and ref_cpu is not None:
            notes.append(
                f"proxy CPU per transaction {side_cpu.total_us:.1f} µs, PgBouncer's {ref_cpu.total_us:.1f} µs"
            )
        note = f" ({'; '.join(notes)})" if notes else ""
        checks.append(Check(th.label, want, f"{r:.2f}x{note}", "PASS" if r >= th.minimum else "MISS"))
    label = f"{IDLE_CLIENTS} idle clients, sidecar session mode"
    want = f"<= {RSS_LIMIT_MIB:.0f} MB RSS"
    mem = next((m for m in mems if m.target == "sidecar-session"), None)
    if mem is None:
        checks.append(Check(label, want, "memory not measured", "skipped"))
    elif mem.loaded_kib is None or mem.clients_open < IDLE_CLIENTS:
        checks.append(Check(label, want, f"only {mem.clients_open} clients opened", "MISS"))
    else:
        mib = mem.loaded_kib / 1024
        checks.append(Check(label, want, f"{mib:.1f} MiB", "PASS" if mib <= RSS_LIMIT_MIB else "MISS"))
    return checks


def print_checks(checks: Sequence[Check]) -> None:
    say("\nTargets from the issue (sidecar TPS / PgBouncer TPS, same pool mode)")
    width = max(len(c.label) for c in checks)
    vwidth = max(len(c.value.partition(" (")[0]) for c in checks)
    for c in checks:
        value, _, why = c.value.partition(" (")
        say(f"  {c.status:<7} {c.label:<{width}}  {value:<{vwidth}}  target {c.target}")
        if why:
            say(f"  {'':<7} {'':<{width}}  ({why}")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.pgbench_compare",
        description="pgbench through pgsidecar vs PgBouncer vs direct PostgreSQL, in one run.",
    )
    p.add_argument(
        "--duration", type=int, default=None, metavar="SECONDS", help="per pgbench run (default 10)"
    )
    p.add_argument(
        "--rounds", type=int, default=None, metavar="N", help="rounds per case; median taken (default 3)"
    )
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="smoke run: duration 3, rounds 1")
    p.add_argument("--skip-memory", action="store_true", help="do not measure RSS with idle clients")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration < 1 or args.rounds < 1:
        p.error("--duration and --rounds must be at least 1")
    keys = [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown or not keys:
        p.error(f"--cases: unknown {unknown or 'empty list'}; choose from {','.join(CASES)}")
    args.case_list = [CASES[k] for k in dict.fromkeys(keys)]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm("stopping PostgreSQL, PgBouncer and sidecars")
    try:
        binary = ensure_pgbouncer()
        major, minor, version_text = pgbouncer_version(binary)
        pgb_version = (major, minor)
        raise_nofile(MAX_CLIENTS + 512)
        base = make_pg_dir(prefix="pgsidecar-bench-")
        CLEANUP.push("temp dir", lambda: shutil.rmtree(base, ignore_errors=True))
        node = build_database(base)
        server_version = str(node.query("SHOW server_version")[0][0])
        say(
            f"PostgreSQL {server_version}, PgBouncer {version_text}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs; pgbench -c {CLIENTS} -j {THREADS}, scale {SCALE}, "
            f"pool size {POOL_SIZE}, {args.duration}s x {args.rounds} round(s); "
            f"pgsidecar data path: {compiled.select()}"
        )

        say("\nstarting PgBouncer and sidecars for the benchmark ...")
        services: dict[str, Service] = {"splice": Splice(base, node).start()}
        for mode in ("session", "transaction"):
            services[f"pgbouncer-{mode}"] = PgBouncer(
                binary, pgb_version, base, mode, node, POOL_SIZE
            ).start()
            services[f"sidecar-{mode}"] = Sidecar(base, mode, node, POOL_SIZE).start()
        targets = [Target("direct", "direct", None, node.port)] + [
            Target(name, services[name].kind, services[name].mode, services[name].port)
            for name in TARGET_ORDER[1:]
        ]
        # Warm up every target once (shared buffers, pools, the sidecar's code paths) so that the
        # first measured run is not penalised for being first.
        say("warming up (2s of -S per target) ...")
        for t in targets:
            try:
                run_pgbench(t.port, CASES["select"], 2)
            except PgbenchFailed as exc:
                say(f"  warning: warm-up on {t.name} failed (exit {exc.returncode})\n{tail(exc.output, 6)}")

        pids = {name: svc.pid for name, svc in services.items()}
        results = benchmark(targets, args.case_list, node, args.duration, args.rounds, pgb_version, pids)
        for svc in services.values():
            svc.stop()
        # Memory last: its 1,000 logins (and as many server connections) are a storm the
        # throughput runs should not follow.
        mems = [] if args.skip_memory else memory_phase(base, node, binary, pgb_version)

        say(
            f"\n#### Results: pgbench -c {CLIENTS} -j {THREADS}, scale {SCALE}, {args.duration}s x "
            f"{args.rounds} round(s); PostgreSQL {server_version}, PgBouncer {version_text}, "
            f"{os.cpu_count()} CPUs"
        )
        print_table(targets, args.case_list, results)
        print_cpu(targets, args.case_list, results)
        print_errors(args.case_list, results)
        if mems:
            print_memory(mems)
        checks = evaluate(results, mems, f"{major}.{minor}")
        print_checks(checks)

        if args.json is not None:
            doc: dict[str, Any] = {
                "settings": {
                    "duration_s": args.duration,
                    "rounds": args.rounds,
                    "clients": CLIENTS,
                    "threads": THREADS,
                    "scale": SCALE,
                    "pool_size": POOL_SIZE,
                    "postgresql": server_version,
                    "pgbouncer": version_text,
                    "cpus": os.cpu_count(),
                },
                "results": {
                    case.key: {
                        name: {
                            "tps": cell.tps,
                            "latency_ms": cell.latency_ms,
                            "note": cell.note,
                            "error": cell.error,
                            "proxy_cpu": asdict(cell.cpu) if cell.cpu is not None else None,
                            "runs": [asdict(r) for r in cell.runs],
                        }
                        for name, cell in results[case.key].items()
                    }
                    for case in args.case_list
                },
                "memory": [asdict(m) for m in mems],
                "checks": [asdict(c) for c in checks],
            }
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            say(f"\nJSON written to {args.json}")
        return 0
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        CLEANUP.run()


if __name__ == "__main__":
    sys.exit(main())
