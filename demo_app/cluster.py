"""Real PostgreSQL 15 clusters for integration tests (ARCHITECTURE.md, Testing).

Builds a region-A writer (``a1``), a region-A standby (``a2``) and a region-B standby (``b1``) on
127.0.0.1 with free ports in temp dirs, and offers the faults the sidecar must survive: crash,
promotion, re-pointing a standby at a new primary, restarting an old primary alone.

PostgreSQL refuses to run as root, so when we are root every PostgreSQL binary runs as the
``postgres`` OS user through ``runuser`` and every directory it touches is owned by that user.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

__all__ = [
    "APP_DB",
    "DEFAULT_BINDIR",
    "PG_OS_USER",
    "REGION_A",
    "REGION_B",
    "USERS",
    "USER_AUTH_METHODS",
    "PgHarnessError",
    "PgNode",
    "Topology",
    "find_bindir",
    "free_port",
    "make_pg_dir",
    "make_primary",
    "make_standby",
    "make_topology",
    "set_sync_standbys",
    "stop_all_nodes",
]

DEFAULT_BINDIR = "/usr/lib/postgresql/15/bin"
PG_OS_USER = "postgres"
APP_DB = "appdb"

# Login roles present on every cluster (created in the template, so standbys have them too).
# The password decides how the sidecar (or a test) authenticates upstream.
USERS: dict[str, str | None] = {
    "app_scram": "scram-secret",
    "app_md5": "md5-secret",
    "app_clear": "clear-secret",
    "app_trust": None,
}
# The pg_hba.conf method each role meets on a TCP connection.
USER_AUTH_METHODS: dict[str, str] = {
    "app_scram": "scram-sha-256",
    "app_md5": "md5",
    "app_clear": "password",
    "app_trust": "trust",
}

# Generous for a loaded CI box, still far below pytest's 120 s test timeout.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
STREAM_TIMEOUT = 30.0
# libpq's minimum; a refused loopback connection fails at once anyway.
CONNECT_TIMEOUT = 2
POLL = 0.02

# Appended to the initdb-generated postgresql.conf of the template. Durability settings
# (fsync, synchronous_commit, full_page_writes) deliberately stay at their defaults: the sidecar's
# "nothing lost" promise is tested against crashes, so the servers must be as durable as production.
BASE_SETTINGS: dict[str, str | int] = {
    "listen_addresses": "127.0.0.1",
    "wal_level": "replica",
    "max_wal_senders": 10,
    "hot_standby": "on",
    "wal_keep_size": "64MB",
    "max_connections": 200,
    "shared_buffers": "32MB",
    "password_encryption": "scram-sha-256",
    # A standby whose primary vanished (or was re-pointed) retries after this, not the 5 s default,
    # so failover scenarios do not spend their time sleeping.
    "wal_retrieve_retry_interval": "100ms",
    # pg_stat_replication (and the Aurora emulation built on it) should be fresh within a second.
    "wal_receiver_status_interval": "1s",
    "log_line_prefix": "'%m [%p] %q%a@%d '",
    "log_min_messages": "info",
}

HBA = """\
# Written by tests/harness/pg.py. One line per harness role so every auth method is exercised.
local all all trust
local replication all trust
host all postgres 127.0.0.1/32 trust
host all app_scram 127.0.0.1/32 scram-sha-256
host all app_md5 127.0.0.1/32 md5
host all app_clear 127.0.0.1/32 password
host all app_trust 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""

# Messages a standby logs when the new primary's timeline forked before the standby's own replay
# position: it can never stream from that primary and has to be rebuilt. (Not "requested starting
# point ... is ahead of the WAL flush position": that one is transient, e.g. behind a lagging
# cascading upstream.)
_DIVERGED_PATTERNS = (
    "forked off current database system timeline",
    "is not a child of database system timeline",
    "is not in this server's history",
)


class PgHarnessError(RuntimeError):
    """A harness step failed; the message carries the PostgreSQL log tail when there is one."""


# ---------------------------------------------------------------------------------------------
# Binaries, users, directories
# ---------------------------------------------------------------------------------------------

_bindir_cache: Path | None = None


def find_bindir() -> Path:
    """Directory holding initdb/pg_ctl/postgres; raises (never skips) when PostgreSQL is missing."""
    global _bindir_cache
    if _bindir_cache is not None:
        return _bindir_cache
    candidates: list[Path] = []
    if env := os.environ.get("PGSIDECAR_PG_BINDIR"):
        candidates.append(Path(env))
    # pg_config may come from libpq-dev of another major version, so its answer is only trusted
    # when the server binaries are really there.
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        if out:
            candidates.append(Path(out))
    candidates.append(Path(DEFAULT_BINDIR))
    for cand in candidates:
        if all((cand / b).is_file() for b in ("initdb", "pg_ctl", "postgres", "pg_basebackup")):
            _bindir_cache = cand
            return cand
    raise PgHarnessError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_basebackup) not found in "
        f"{[str(c) for c in candidates]}; install postgresql-15 or set PGSIDECAR_PG_BINDIR"
    )


def _as_root() -> bool:
    return os.geteuid() == 0


def _pg_ids() -> tuple[int, int]:
    pw = pwd.getpwnam(PG_OS_USER)
    return pw.pw_uid, pw.pw_gid


def _chown_pg(path: Path) -> None:
    if _as_root():
        uid, gid = _pg_ids()
        os.chown(path, uid, gid)


def make_pg_dir(parent: str | Path | None = None, prefix: str = "pgsidecar-") -> Path:
    """A new temp dir the PostgreSQL OS user owns and can reach.

    pytest's own tmp dirs live under a root-only 0700 parent that ``postgres`` cannot traverse, so
    the default parent is ``$PGSIDECAR_PG_TMPDIR`` or else the system temp dir. (Copying a data dir
    means creating ~1300 small files; on a slow disk PGSIDECAR_PG_TMPDIR=/dev/shm speeds builds
    up, at the price of no-op fsyncs.)
    """
    if parent is None:
        parent = os.environ.get("PGSIDECAR_PG_TMPDIR") or tempfile.gettempdir()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=str(parent)))
    path.chmod(0o700)
    _chown_pg(path)
    return path


def _mkdir_pg(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=False, exist_ok=False)
    _chown_pg(path)
    return path


def _write_pg_file(path: Path, text: str) -> None:
    # Files inside a data dir must be readable by the server, which runs as postgres.
    path.write_text(text)
    path.chmod(0o600)
    _chown_pg(path)


def _pg_env() -> dict[str, str]:
    # Ambient PG* variables (PGHOST, PGPORT, PGDATA, ...) would silently redirect the tools.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def run_pg(
    binary: str,
    *args: str,
    timeout: float = 60.0,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL binary (as ``postgres`` when we are root) and capture its output."""
    argv = [str(find_bindir() / binary), *args]
    if _as_root():
        argv = ["runuser", "-u", PG_OS_USER, "--", *argv]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_pg_env(),
            # The postgres user needs a cwd it can read; the caller's (root's) cwd may not be.
            cwd=str(cwd) if cwd is not None else tempfile.gettempdir(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PgHarnessError(f"{binary} {' '.join(args)} timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise PgHarnessError(
            f"{binary} {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


# ---------------------------------------------------------------------------------------------
# Ports
# ---------------------------------------------------------------------------------------------

_port_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, never the same one twice in this process.

    Binding port 0 and closing leaves a small race with other processes, but remembering the
    ports already given out removes the race between nodes and sidecars of this test session.
    """
    with _port_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port
    raise PgHarnessError("could not find a free port")


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------

_registry_lock = threading.Lock()
_registry: list[PgNode] = []


def _register(node: PgNode) -> None:
    with _registry_lock:
        if node not in _registry:
            _registry.append(node)


def stop_all_nodes() -> None:
    """Stop every node this process created (session teardown; also registered with atexit)."""
    with _registry_lock:
        nodes = list(_registry)
    for node in nodes:
        with contextlib.suppress(Exception):
            if node.is_running():
                # Immediate: at teardown nobody cares about a clean checkpoint, only about speed.
                node.crash()


atexit.register(stop_all_nodes)


def _conf_value(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    if value.startswith("'") and value.endswith("'") and len(value) >= 2:
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _render_conf(settings: Mapping[str, str | int]) -> str:
    return "".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items())


@dataclass(eq=False)
class PgNode:
    """One PostgreSQL server: its data dir, port and log, and the operations tests need on it."""

    name: str
    port: int
    node_dir: Path
    # Per-node settings, rendered into ``<datadir>/node.conf`` (included last by postgresql.conf).
    settings: dict[str, str | int] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.node_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.node_dir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        return self.node_dir

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def hostport(self) -> str:
        """``127.0.0.1:<port>`` as the sidecar config lists hosts."""
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"PgNode({self.name!r}, port={self.port})"

    # -- configuration ------------------------------------------------------------------------

    def write_node_conf(self) -> None:
        settings: dict[str, str | int] = {
            "port": self.port,
            "cluster_name": self.name,
            "unix_socket_directories": str(self.socket_dir),
        }
        settings.update(self.settings)
        _write_pg_file(self.datadir / "node.conf", "# per-node settings (tests/harness/pg.py)\n"
                       + _render_conf(settings))

    def set_config(self, settings: Mapping[str, str | int | None], reload: bool = True) -> None:
        """Change per-node settings (``None`` removes one); reloads a running server.

        Written to node.conf rather than through ALTER SYSTEM so that pg_basebackup does not copy
        them into standbys (a promoted standby must not inherit its old primary's sync list).
        """
        for key, value in settings.items():
            if value is None:
                self.settings.pop(key, None)
            else:
                self.settings[key] = value
        self.write_node_conf()
        if reload and self.is_running():
            self.reload()

    def reload(self) -> None:
        run_pg("pg_ctl", "reload", "-D", str(self.datadir), cwd=self.node_dir)

    def _set_primary_conninfo(self, primary: PgNode) -> None:
        # postgresql.auto.conf is where pg_basebackup -R puts primary_conninfo; it is read after
        # postgresql.conf, so the value is replaced there rather than shadowed from node.conf.
        auto = self.datadir / "postgresql.auto.conf"
        lines = auto.read_text().splitlines() if auto.exists() else []
        lines = [ln for ln in lines if not re.match(r"\s*primary_conninfo\s*=", ln)]
        conninfo = make_conninfo(
            "", host=primary.host, port=primary.port, user="postgres", application_name=self.name
        )
        lines.append(f"primary_conninfo = {_conf_value(conninfo)}")
        _write_pg_file(auto, "\n".join(lines) + "\n")

    # -- lifecycle ------------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log file)"
        return "\n".join(text.splitlines()[-lines:])

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _fail(self, what: str, cause: BaseException | str | None = None) -> PgHarnessError:
        detail = f": {cause}" if cause is not None else ""
        return PgHarnessError(f"{self.name} (port {self.port}) {what}{detail}\n"
                              f"--- {self.log_file} (tail) ---\n{self.log_tail()}")

    def _pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        """True when the postmaster of this data dir is alive (from postmaster.pid, no connection)."""
        pid = self._pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists but belongs to postgres and we are not root
        # A postmaster killed with SIGKILL leaves its pid file behind and the pid may be reused.
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip() in ("postgres", "postmaster")
        except OSError:
            return True  # no /proc: trust the signal probe

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start and wait until it accepts connections (read-only ones for a hot standby)."""
        _register(self)
        proc = run_pg(
            "pg_ctl", "start", "-D", str(self.datadir), "-l", str(self.log_file),
            "-w", "-t", str(int(timeout)),
            timeout=timeout + 10, check=False, cwd=self.node_dir,
        )
        if proc.returncode != 0:
            raise self._fail("did not start", (proc.stdout + proc.stderr).strip())
        self.wait_ready(timeout)

    def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """``pg_ctl stop -m <mode>`` (smart | fast | immediate); a stopped node is left alone."""
        if not self.is_running():
            return
        proc = run_pg(
            "pg_ctl", "stop", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(int(timeout)),
            timeout=timeout + 10, check=False, cwd=self.node_dir,
        )
        if proc.returncode != 0 and self.is_running():
            raise self._fail(f"did not stop (-m {mode})", (proc.stdout + proc.stderr).strip())

    def crash(self) -> None:
        """Simulate a crash: ``pg_ctl stop -m immediate`` (no shutdown checkpoint; crash recovery on
        the next start)."""
        self.stop(mode="immediate")

    def restart(self, mode: str = "fast", timeout: float = START_TIMEOUT) -> None:
        self.stop(mode=mode)
        self.start(timeout=timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until a superuser connection and ``SELECT 1`` succeed."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                self.query("SELECT 1")
                return
            except psycopg.Error as exc:
                last = exc
                if not self.is_running():
                    raise self._fail("exited while waiting for it to accept connections", exc) from exc
            time.sleep(POLL)
        raise self._fail(f"not ready after {timeout}s", last)

    # -- SQL ------------------------------------------------------------------------------------

    def dsn(
        self,
        user: str = "postgres",
        dbname: str = "postgres",
        password: str | None = None,
        **extra: str | int,
    ) -> str:
        """libpq key=value DSN on 127.0.0.1 (TCP, so pg_hba.conf's host lines apply)."""
        params: dict[str, str | int] = {"host": self.host, "port": self.port, "user": user,
                                        "dbname": dbname}
        if password is not None:
            params["password"] = password
        params.update(extra)
        return make_conninfo("", **params)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """Superuser autocommit connection (caller closes it)."""
        return psycopg.connect(
            self.dsn(dbname=dbname), autocommit=True, connect_timeout=CONNECT_TIMEOUT, **kwargs
        )

    def query(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run one statement as superuser (autocommit) and return its rows ([] when none)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        dbname: str = "postgres",
    ) -> None:
        """Run one statement as superuser (autocommit), discarding any rows."""
        with self.connect(dbname) as conn:
            conn.execute(sql, params)

    def in_recovery(self) -> bool:
        return bool(self.query("SELECT pg_is_in_recovery()")[0][0])

    def timeline(self) -> int:
        """Current timeline: from the WAL file name on a primary (right after promotion the
        control file still shows the old one until the next checkpoint); on a standby the
        newer of the streamed timeline and the last restartpoint's."""
        walfile, received, checkpoint = self.query(
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL"
            "            ELSE pg_walfile_name(pg_current_wal_lsn()) END,"
            "       (SELECT received_tli FROM pg_stat_wal_receiver),"
            "       (SELECT timeline_id FROM pg_control_checkpoint())"
        )[0]
        if walfile is not None:
            return int(str(walfile)[:8], 16)
        return max(int(received or 0), int(checkpoint))

    def current_lsn(self) -> str:
        """Write LSN on a primary, last replayed LSN on a standby."""
        return str(self.query(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_lsn() END::text"
        )[0][0])

    def promote(self, timeout: float = START_TIMEOUT) -> None:
        """Promote a standby and wait until it is out of recovery (and accepts writes)."""
        try:
            done = self.query("SELECT pg_promote(true, %s)", (int(timeout),))[0][0]
        except psycopg.Error as exc:
            raise self._fail("could not be promoted", exc) from exc
        if not done:
            raise self._fail(f"promotion did not finish within {timeout}s")
        deadline = time.monotonic() + timeout
        while self.in_recovery():
            if time.monotonic() > deadline:
                raise self._fail("still in recovery after promotion")
            time.sleep(POLL)

    # -- replication ----------------------------------------------------------------------------

    def replication(self) -> dict[str, dict[str, Any]]:
        """pg_stat_replication of this node keyed by application_name."""
        rows = self.query(
            "SELECT application_name, state, sync_state, sent_lsn::text, flush_lsn::text,"
            "       replay_lsn::text FROM pg_stat_replication"
        )
        keys = ("state", "sync_state", "sent_lsn", "flush_lsn", "replay_lsn")
        return {str(r[0]): dict(zip(keys, r[1:], strict=True)) for r in rows}

    def wait_for_standby(self, name: str, timeout: float = STREAM_TIMEOUT) -> None:
        """Wait until standby ``name`` streams from this node (pg_stat_replication)."""
        deadline = time.monotonic() + timeout
        # One connection for the whole wait: a new backend per poll would be a fork every 20 ms.
        with self.connect() as conn:
            while not conn.execute(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
                (name,),
            ).fetchall():
                if time.monotonic() > deadline:
                    raise self._fail(f"standby {name!r} not streaming after {timeout}s "
                                     f"(pg_stat_replication: {self.replication()})")
                time.sleep(POLL)

    def wait_caught_up(self, standbys: Iterable[PgNode], timeout: float = STREAM_TIMEOUT) -> None:
        """Wait until every standby has replayed everything this primary has written so far.

        Asked of the standbys themselves: pg_stat_replication's replay_lsn is only as fresh as the
        last status message.
        """
        target = self.query("SELECT pg_current_wal_lsn()::text")[0][0]
        deadline = time.monotonic() + timeout
        for sb in standbys:
            with sb.connect() as conn:
                while conn.execute(
                    "SELECT pg_last_wal_replay_lsn() IS NULL OR pg_last_wal_replay_lsn() < %s::pg_lsn",
                    (target,),
                ).fetchall()[0][0]:
                    if time.monotonic() > deadline:
                        raise sb._fail(f"did not replay up to {target} of {self.name} in {timeout}s")
                    time.sleep(POLL)

    def repoint(
        self,
        primary: PgNode,
        timeout: float = STREAM_TIMEOUT,
        rebuild_if_diverged: bool = True,
    ) -> None:
        """Make this standby follow ``primary`` (region failover: b1 follows a promoted a2).

        primary_conninfo is reloadable since PostgreSQL 13 and recovery_target_timeline defaults
        to 'latest', so a reload is enough for the standby to fetch the new timeline's history and
        switch to it. If the standby had already replayed WAL the new primary never got (its
        timeline forked earlier), it can never follow; with ``rebuild_if_diverged`` it is then
        re-cloned from ``primary`` (pg_basebackup), as an operator (or Aurora) would. The same
        happens to a node that is no standby at all, e.g. an old primary rejoining as a replica.
        """
        if self is primary:
            raise PgHarnessError(f"{self.name} cannot follow itself")
        if not (self.datadir / "standby.signal").exists():
            # An old primary has WAL of its own past the fork: only a fresh copy can follow.
            if not rebuild_if_diverged:
                raise self._fail(f"is not a standby; cannot follow {primary.name} without a rebuild")
            self._rebuild_from(primary, timeout)
            return
        offset = self._log_size()
        self._set_primary_conninfo(primary)
        if self.is_running():
            self.reload()
        else:
            self.start()
        deadline = time.monotonic() + timeout
        tli = primary.timeline()
        # Judged on the standby: a diverged standby may still stream the old timeline up to the
        # fork point, so the primary can briefly list it as 'streaming' although it never follows.
        # Following means receiving from this primary on its current timeline.
        diverged = False
        with self.connect() as conn:
            while conn.execute(
                "SELECT 1 FROM pg_stat_wal_receiver"
                " WHERE status = 'streaming' AND sender_port = %s AND received_tli = %s",
                (primary.port, tli),
            ).fetchone() is None:
                if any(p in self._log_since(offset) for p in _DIVERGED_PATTERNS):
                    diverged = True
                    break
                if time.monotonic() > deadline:
                    raise self._fail(f"not streaming from {primary.name} after {timeout}s")
                time.sleep(POLL)
        if diverged:
            if not rebuild_if_diverged:
                raise self._fail(f"diverged from {primary.name}; cannot follow it")
            self._rebuild_from(primary, timeout)
            return
        primary.wait_for_standby(self.name, max(1.0, deadline - time.monotonic()))

    def _rebuild_from(self, primary: PgNode, timeout: float) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.datadir)
        _basebackup(primary, self)
        self.start()
        primary.wait_for_standby(self.name, timeout)


# ---------------------------------------------------------------------------------------------
# Template (one initdb per test session)
# ---------------------------------------------------------------------------------------------

_template_lock = threading.Lock()
_template_dir: Path | None = None


def _create_roles(node: PgNode) -> None:
    with node.connect() as conn:
        conn.execute("CREATE ROLE app_scram LOGIN PASSWORD 'scram-secret'")
        # Stored as an md5 hash, so the md5 pg_hba method (which needs one) works for this role.
        conn.execute("SET password_encryption = 'md5'")
        conn.execute("CREATE ROLE app_md5 LOGIN PASSWORD 'md5-secret'")
        conn.execute("RESET password_encryption")
        conn.execute("CREATE ROLE app_clear LOGIN PASSWORD 'clear-secret'")
        conn.execute("CREATE ROLE app_trust LOGIN")
        conn.execute(f"CREATE DATABASE {APP_DB} OWNER app_scram")
        conn.execute(f"GRANT ALL ON DATABASE {APP_DB} TO {', '.join(USERS)}")
    with node.connect(APP_DB) as conn:
        # PostgreSQL 15 no longer lets every role create objects in public.
        conn.execute(f"GRANT ALL ON SCHEMA public TO {', '.join(USERS)}")


def _build_template() -> Path:
    tmpl_root = make_pg_dir(prefix="pgsidecar-template-")
    atexit.register(shutil.rmtree, tmpl_root, True)
    node = PgNode("template", free_port(), tmpl_root)
    run_pg(
        "initdb", "-D", str(node.datadir), "-U", "postgres", "--auth-local=trust",
        "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-instructions",
        # Only skips flushing the freshly written template files to disk; the servers themselves
        # keep fsync=on, and a test "crash" kills processes, not the OS page cache.
        "--no-sync",
        cwd=tmpl_root, timeout=120,
    )
    conf = node.datadir / "postgresql.conf"
    _write_pg_file(
        conf,
        conf.read_text()
        + "\n# --- tests/harness/pg.py ---\n"
        + _render_conf(BASE_SETTINGS)
        # Last, so per-node values (port, cluster_name, sync standbys) win.
        + "include_if_exists = 'node.conf'\n",
    )
    _write_pg_file(node.datadir / "pg_hba.conf", HBA)
    node.write_node_conf()
    node.start()
    try:
        _create_roles(node)
    finally:
        # A clean shutdown leaves a consistent data dir that copies start from without recovery.
        node.stop("fast")
    with _registry_lock:
        if node in _registry:
            _registry.remove(node)
    (node.datadir / "node.conf").unlink()
    with contextlib.suppress(FileNotFoundError):
        node.log_file.unlink()
    return node.datadir


def _template() -> Path:
    global _template_dir
    with _template_lock:
        if _template_dir is None or not _template_dir.is_dir():
            _template_dir = _build_template()
        return _template_dir


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def _new_node(base_dir: str | Path, name: str) -> PgNode:
    base = Path(base_dir)
    if not base.is_dir():
        raise PgHarnessError(f"base dir {base} does not exist")
    node_dir = _mkdir_pg(base / name)
    return PgNode(name, free_port(), node_dir)


def _clone_template(base_dir: str | Path, name: str) -> PgNode:
    tmpl = _template()
    node = _new_node(base_dir, name)
    # cp -a as postgres keeps ownership and the 0700 mode PostgreSQL insists on.
    argv = ["cp", "-a", str(tmpl), str(node.datadir)]
    if _as_root():
        argv = ["runuser", "-u", PG_OS_USER, "--", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(node.node_dir), timeout=60,
                          check=False)
    if proc.returncode != 0:
        raise PgHarnessError(f"copying the template for {name} failed: {proc.stderr.strip()}")
    node.write_node_conf()
    return node


def make_primary(base_dir: str | Path, name: str) -> PgNode:
    """A running primary cloned from the session's initdb template (roles and appdb included)."""
    node = _clone_template(base_dir, name)
    node.start()
    return node


def _basebackup(primary: PgNode, standby: PgNode) -> None:
    conninfo = make_conninfo(
        "", host=primary.host, port=primary.port, user="postgres", application_name=standby.name
    )
    run_pg(
        "pg_basebackup", "-D", str(standby.datadir), "-d", conninfo,
        "-R", "-X", "stream", "-c", "fast",
        # Same reasoning as initdb --no-sync: the copy only has to survive process crashes.
        "--no-sync",
        cwd=standby.node_dir, timeout=120,
    )
    # -R already wrote primary_conninfo (with application_name); rewriting it keeps one source of
    # truth for repoint(). node.conf came along from the primary and must get this node's port.
    standby._set_primary_conninfo(primary)
    standby.write_node_conf()


def make_standby(
    primary: PgNode,
    base_dir: str | Path,
    name: str,
    sync: bool = True,
    start: bool = True,
) -> PgNode:
    """A running hot standby of ``primary`` (``pg_basebackup -R -X stream -c fast``), streaming.

    With ``sync`` the standby joins the primary's quorum (``ANY 1 (...)``), so a commit
    acknowledged by the primary is on a standby too, as on Aurora.
    """
    node = _new_node(base_dir, name)
    _basebackup(primary, node)
    if start:
        node.start()
        primary.wait_for_standby(name)
        if sync:
            set_sync_standbys(primary, [*_sync_names(primary), name])
    return node


def _sync_names(primary: PgNode) -> list[str]:
    value = str(primary.settings.get("synchronous_standby_names", ""))
    m = re.search(r"\((.*)\)", value)
    return [n.strip() for n in m.group(1).split(",") if n.strip()] if m else []


def set_sync_standbys(primary: PgNode, names: Sequence[str], num: int = 1) -> None:
    """``synchronous_standby_names = 'ANY <num> (n1, n2)'`` on ``primary`` and reload.

    An empty list turns synchronous replication off (e.g. before restarting an old primary alone
    as a stale writer: with its old quorum gone its commits would otherwise wait forever).
    """
    names = list(dict.fromkeys(names))
    value = f"ANY {num} ({', '.join(names)})" if names else None
    primary.set_config({"synchronous_standby_names": value})
    if not primary.is_running():
        return
    # The reload is asynchronous; wait until the walsenders of connected standbys show the new
    # role so a test's next commit is really (or really no longer) synchronous.
    deadline = time.monotonic() + STREAM_TIMEOUT
    want = set(names)
    while True:
        # A new connection each round: a backend reads the reloaded file only between queries,
        # and a fresh one is sure to start from the postmaster's reloaded settings.
        with primary.connect() as conn:
            current = conn.execute("SHOW synchronous_standby_names").fetchall()[0][0]
            states = conn.execute(
                "SELECT application_name, sync_state FROM pg_stat_replication WHERE state = 'streaming'"
            ).fetchall()
        if current == (value or "") and all((st != "async") == (app in want) for app, st in states):
            return
        if time.monotonic() > deadline:
            raise primary._fail(f"synchronous_standby_names={value!r} not in effect: {states}")
        time.sleep(POLL)


# ---------------------------------------------------------------------------------------------
# Topology
# ---------------------------------------------------------------------------------------------

REGION_A = "region-a"
REGION_B = "region-b"


@dataclass(eq=False)
class Topology:
    """Region A: writer ``a1`` and standby ``a2``; region B: standby ``b1`` (of a1)."""

    a1: PgNode
    a2: PgNode
    b1: PgNode
    base_dir: Path

    @property
    def nodes(self) -> list[PgNode]:
        return [self.a1, self.a2, self.b1]

    def regions(self) -> dict[str, list[PgNode]]:
        """Ordered like the sidecar config: the first region is home."""
        return {REGION_A: [self.a1, self.a2], REGION_B: [self.b1]}

    def node(self, name: str) -> PgNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def writer(self) -> PgNode:
        """The one running node not in recovery; raises when there is none or more than one."""
        writers = [n for n in self.nodes if n.is_running() and not n.in_recovery()]
        if len(writers) != 1:
            raise PgHarnessError(f"expected exactly one writer, found {writers}")
        return writers[0]

    def install_aurora_emulation(self, databases: Sequence[str] = ("postgres",)) -> None:
        """Aurora's topology functions (demo_app/sql/aurora_emulation.sql) on the writer, in each of
        `databases` (the sidecar probes `upstream.probe_database`); replication carries them to the
        standbys. Instance ids are the node names, regions the harness's region names."""
        sql = (Path(__file__).parent / "sql" / "aurora_emulation.sql").read_text()
        writer = self.writer()
        for database in databases:
            writer.execute(sql, dbname=database)
            for node, region in ((self.a1, REGION_A), (self.a2, REGION_A), (self.b1, REGION_B)):
                writer.execute(
                    "INSERT INTO aurora_emulation_nodes VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (node.port, node.name, region),
                    dbname=database,
                )

    def stop_all(self, mode: str = "immediate") -> None:
        """Stop every node (in parallel: pg_ctl polls in 100 ms steps); raises the first failure."""
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            futures = [pool.submit(n.stop, mode) for n in self.nodes]
        errors = [exc for f in futures if (exc := f.exception()) is not None]
        if errors:
            raise errors[0]


def _as_standby_of(node: PgNode, primary: PgNode) -> None:
    """Turn a (not yet started) template clone into a standby of ``primary``, itself a clone.

    The template was shut down cleanly, so every copy starts at the same shutdown checkpoint with
    the same system identifier; a copy with standby.signal replays from there by streaming the
    primary's WAL, which still holds that checkpoint (wal_keep_size). It is the "cold backup of a
    stopped primary" way to seed a standby, and skips pg_basebackup's checkpoint, 40 MB transfer
    and WAL segment: the bulk of a topology's build time.
    """
    _write_pg_file(node.datadir / "standby.signal", "")
    node._set_primary_conninfo(primary)


def make_topology(base_dir: str | Path, sync: bool = True, basebackup: bool = False) -> Topology:
    """Build a1 (writer), a2 and b1 (streaming standbys of a1) in a new dir below ``base_dir``.

    With ``sync`` a1 has ``synchronous_standby_names = 'ANY 1 (a2, b1)'``. The standbys are seeded
    from the session template (see _as_standby_of), or with pg_basebackup when ``basebackup``.
    """
    topo_dir = make_pg_dir(base_dir, prefix="topo-")
    try:
        if basebackup:
            a1 = _clone_template(topo_dir, "a1")
            a1.start()
            # The two base backups are independent; overlapping them nearly halves the time.
            with ThreadPoolExecutor(max_workers=2) as pool:
                fa2 = pool.submit(make_standby, a1, topo_dir, "a2", False)
                fb1 = pool.submit(make_standby, a1, topo_dir, "b1", False)
                a2, b1 = fa2.result(), fb1.result()
        else:
            # Copying is dominated by creating ~1300 small files, which overlaps well; and
            # standbys started before their primary just retry (wal_retrieve_retry_interval), so
            # each node is copied and started independently.
            with ThreadPoolExecutor(max_workers=3) as pool:
                futs = [pool.submit(_clone_template, topo_dir, n) for n in ("a1", "a2", "b1")]
                a1, a2, b1 = (f.result() for f in futs)
                for sb in (a2, b1):
                    _as_standby_of(sb, a1)
                for fut in [pool.submit(n.start) for n in (a1, a2, b1)]:
                    fut.result()
            a1.wait_for_standby("a2")
            a1.wait_for_standby("b1")
    except BaseException:
        stop_all_nodes_in(topo_dir)
        raise
    if sync:
        set_sync_standbys(a1, ["a2", "b1"])
    return Topology(a1=a1, a2=a2, b1=b1, base_dir=topo_dir)


def stop_all_nodes_in(directory: Path) -> None:
    """Stop the nodes whose data lives under ``directory`` (cleanup after a failed build)."""
    with _registry_lock:
        nodes = [n for n in _registry if directory in n.node_dir.parents]
    for n in nodes:
        with contextlib.suppress(Exception):
            n.crash()
