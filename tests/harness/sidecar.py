"""Run the real sidecar (``python -m proxy run -c sidecar.yaml``) as a subprocess for tests.

The sidecar is a separate process, as in production, so tests exercise its CLI, config loading,
signal handling and sockets exactly as deployed.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml
from psycopg.conninfo import make_conninfo

from tests.harness.pg import REGION_A, USERS, PgNode, Topology, free_port

__all__ = [
    "DEFAULT_ARGV",
    "REMOVE",
    "SIDECAR_PASSWORDS",
    "SidecarError",
    "SidecarProcess",
    "deep_merge",
    "free_port",
    "sidecar_config",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# ``{config}`` is replaced by the path of the written sidecar.yaml.
DEFAULT_ARGV: tuple[str, ...] = (sys.executable, "-m", "proxy", "run", "-c", "{config}")

# What clients use to log in to the sidecar. app_trust has no password upstream (pg_hba trust), but
# a client still has to prove itself to a scram-sha-256 sidecar, so it gets one here.
SIDECAR_PASSWORDS: dict[str, str] = {
    user: (pw if pw is not None else "trust-secret") for user, pw in USERS.items()
}


class _Remove:
    def __repr__(self) -> str:
        return "REMOVE"


# Use as an override value to delete a key from the default config.
REMOVE: Any = _Remove()


class SidecarError(RuntimeError):
    """The sidecar did not start / stop as expected; the message carries its log tail."""


_registry_lock = threading.Lock()
_registry: list[SidecarProcess] = []


def _kill_all() -> None:
    # Backstop for an interrupted session: no sidecar may outlive the test run.
    with _registry_lock:
        procs = list(_registry)
    for p in procs:
        with contextlib.suppress(Exception):
            p.kill()


atexit.register(_kill_all)


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {value!r}")
    return host, int(port)


class SidecarProcess:
    """A sidecar subprocess with its own config file and log file in ``tmp_dir``."""

    def __init__(
        self,
        config: Mapping[str, Any],
        tmp_dir: str | Path,
        *,
        argv: Sequence[str] = DEFAULT_ARGV,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.config: dict[str, Any] = copy.deepcopy(dict(config))
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "sidecar.yaml"
        self.log_path = self.dir / "sidecar.log"
        self.argv = [a.replace("{config}", str(self.config_path)) for a in argv]
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config()

    # -- config ---------------------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any] | None = None) -> None:
        """(Re)write sidecar.yaml; pair with ``send_signal(SIGHUP)`` to test a reload."""
        if config is not None:
            self.config = copy.deepcopy(dict(config))
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    @property
    def host(self) -> str:
        return _split_hostport(str(self.config["listen"]))[0]

    @property
    def port(self) -> int:
        return _split_hostport(str(self.config["listen"]))[1]

    @property
    def metrics_port(self) -> int | None:
        value = self.config.get("metrics_listen")
        return None if not value else _split_hostport(str(value))[1]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def dsn(
        self,
        user: str = "app_scram",
        password: str | None = None,
        dbname: str = "appdb",
        **extra: str | int,
    ) -> str:
        """libpq key=value DSN through the sidecar; the password defaults to the harness one."""
        params: dict[str, str | int] = {"host": self.host, "port": self.port, "user": user,
                                        "dbname": dbname}
        pw = password if password is not None else SIDECAR_PASSWORDS.get(user)
        if pw is not None:
            params["password"] = pw
        params.update(extra)
        return make_conninfo("", **params)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        """Start and wait until ``listen`` accepts TCP connections."""
        if self.proc is not None:
            raise SidecarError("already started")
        env = {**os.environ, **self.extra_env}
        # The project root on the path lets ``-m proxy`` resolve without an installed package;
        # unbuffered output keeps the log file current for wait_for_log().
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.dir),
                env=env,
                # Own process group: a Ctrl-C meant for pytest must not reach it first, so
                # shutdown order stays under the harness's control.
                start_new_session=True,
            )
        with _registry_lock:
            _registry.append(self)
        try:
            self._wait_listening(self.start_timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                raise self._fail(f"exited with code {code} before listening on {self.port}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise self._fail(f"not listening on {self.host}:{self.port} after {timeout}s")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise SidecarError("not started")
        return self.proc.pid

    def poll(self) -> int | None:
        """Exit code, or None while running (or not started)."""
        return None if self.proc is None else self.proc.poll()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        if self.proc is None:
            raise SidecarError("not started")
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            raise SidecarError("not started")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise self._fail(f"still running after {timeout}s") from exc

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (drain, then exit) and return the exit code.

        A sidecar that ignores SIGTERM is killed and reported as an error: graceful shutdown is
        part of the contract.
        """
        if self.proc is None:
            raise SidecarError("not started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._fail(f"did not exit within {timeout}s of SIGTERM; killed") from None
        finally:
            self._unregister()

    def kill(self) -> int | None:
        """SIGKILL (a crash of the sidecar) and return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(10)
        self._unregister()
        return code

    def stop(self, timeout: float = 5.0) -> None:
        """Best-effort teardown: SIGTERM, then SIGKILL; never raises."""
        if self.proc is None:
            return
        with contextlib.suppress(SidecarError):
            self.terminate(timeout)
        self.kill()

    def _unregister(self) -> None:
        with _registry_lock:
            if self in _registry:
                _registry.remove(self)

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- log ------------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        """Current log length, to pass as ``since`` to wait_for_log()."""
        return len(self.log_text())

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, substring: str, timeout: float = 10.0, since: int = 0) -> str:
        """Wait until ``substring`` appears in the log (after offset ``since``); returns the line."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()[since:]
            idx = text.find(substring)
            if idx >= 0:
                start = text.rfind("\n", 0, idx) + 1
                end = text.find("\n", idx)
                return text[start: end if end >= 0 else len(text)]
            if self.proc is not None and self.proc.poll() is not None:
                # Re-read once: the last words may have landed after the read above.
                if substring in self.log_text()[since:]:
                    continue
                raise self._fail(f"exited with code {self.proc.returncode} without logging {substring!r}")
            if time.monotonic() > deadline:
                raise self._fail(f"{substring!r} not logged within {timeout}s")
            time.sleep(0.05)

    def _fail(self, what: str) -> SidecarError:
        return SidecarError(f"sidecar ({' '.join(self.argv)}) {what}\n"
                            f"--- {self.log_path} (tail) ---\n{self.log_tail()}")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: dicts recursively, anything else replaced;
    ``REMOVE`` deletes the key. Neither input is modified."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is REMOVE:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


HostsSpec = Topology | Mapping[str, Sequence[PgNode | str]] | Sequence[PgNode | str]


def _regions(hosts: HostsSpec) -> list[dict[str, Any]]:
    if isinstance(hosts, Topology):
        mapping: Mapping[str, Sequence[PgNode | str]] = hosts.regions()
    elif isinstance(hosts, Mapping):
        mapping = hosts
    else:
        mapping = {REGION_A: hosts}
    return [
        {"name": region, "hosts": [h.hostport if isinstance(h, PgNode) else str(h) for h in nodes]}
        for region, nodes in mapping.items()
    ]


def sidecar_config(
    topology_or_hosts: HostsSpec | None = None,
    overrides: Mapping[str, Any] | None = None,
    **kw_overrides: Any,
) -> dict[str, Any]:
    """Default sidecar config for tests, with ``overrides`` then ``kw_overrides`` deep-merged.

    ``topology_or_hosts``: a Topology (region-a: a1, a2; region-b: b1), a mapping region -> nodes
    or ``host:port`` strings, or a plain list (one region, region-a).
    """
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "auth": {
            "method": "scram-sha-256",
            "users": [{"name": u, "password": pw} for u, pw in SIDECAR_PASSWORDS.items()],
        },
        "upstream": {
            "topology": "static",
            # The test clusters have no server certificates; "prefer" would only add a round trip.
            "tls": "disable",
            "regions": _regions(topology_or_hosts) if topology_or_hosts is not None else [],
        },
        # Test failovers take a few hundred ms; production-like 30 s holds would only slow tests.
        "failover": {"check_interval": "100ms", "hold_timeout": "10s"},
        "spool": {"backend": "none"},
        # The failover and outage tests check what happens to work while there is no writer, with
        # plain SELECTs among it: with the default (`failover`) a standby would answer those.
        # Read routing's own tests (test_read_routing.py) set it.
        "routing": {"reads": "writer"},
    }
    if overrides:
        config = deep_merge(config, overrides)
    if kw_overrides:
        config = deep_merge(config, kw_overrides)
    return config
