"""AWS features against real PostgreSQL: passwords from Secrets Manager, logins with RDS IAM tokens.

Secrets Manager is a real HTTP endpoint from moto's server on a free port; boto3 reaches it through
the standard ``AWS_ENDPOINT_URL`` variable, exactly as it would reach AWS.

IAM tokens need no endpoint at all (signing is local), but PostgreSQL does not know IAM: on RDS a
token is checked by the rds_iam PAM module. What can be proven here is everything on the sidecar's
side: it signs a token for the right host, port, user and region, sends it as the password, and
logs in with it. To show that, a relay in front of PostgreSQL first plays PostgreSQL and records
the password the sidecar sends; the role is then given exactly that token as its password and the
relay starts forwarding to the real server, where the sidecar's next logins (same cached token)
succeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
import yaml
from psycopg import sql

from sidecar_config import ConfigError, load_config
from tests.harness import pg
from tests.harness.sidecar import PROJECT_ROOT, sidecar_config
from tests.unit.test_aws import verify_token

REGION = "us-east-1"
FAKE_SECRET_KEY = "pgsidecar-integration-secret-key"


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Standard AWS variables pointing at moto with fake credentials, for this process (and to be
    passed to sidecar subprocesses). No profile files and no instance metadata lookups."""
    env = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "AKIDPGSIDECARINTEG",
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _create_secret(value: str | dict[str, Any]) -> tuple[str, str]:
    """A new secret (unique name; the moto server lives for the module); returns (name, ARN)."""
    name = f"pgsidecar/test/{uuid.uuid4().hex[:8]}"
    text = value if isinstance(value, str) else json.dumps(value)
    arn = boto3.client("secretsmanager").create_secret(Name=name, SecretString=text)["ARN"]
    return name, str(arn)


def _check_config(
    config: dict[str, Any], path: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(path)],
        capture_output=True, text=True, timeout=60, check=False, cwd=str(PROJECT_ROOT),
        env={**os.environ, **env},
    )


# ---------------------------------------------------------------------------------------------
# Secrets Manager
# ---------------------------------------------------------------------------------------------


def test_passwords_from_secrets_manager(sidecar_factory, shared_topology, aws_env, tmp_path):
    # A JSON secret as RDS-managed and rotated secrets look, read by key; and a plain one by name.
    _, json_arn = _create_secret({"username": "app_scram", "password": pg.USERS["app_scram"], "port": 5432})
    plain_name, _ = _create_secret(str(pg.USERS["app_md5"]))
    overrides = {
        "auth": {
            "users": [
                {"name": "app_scram", "password": f"secretsmanager:{json_arn}:password"},
                {"name": "app_md5", "password": f"secretsmanager:{plain_name}"},
            ]
        }
    }
    config = sidecar_config(shared_topology, overrides)

    checked = _check_config(config, tmp_path / "check.yaml", aws_env)
    assert checked.returncode == 0, checked.stderr
    effective = yaml.safe_load(checked.stdout)
    assert [u["password"] for u in effective["auth"]["users"]] == ["***", "***"]
    for secret in (pg.USERS["app_scram"], pg.USERS["app_md5"]):
        assert str(secret) not in checked.stdout + checked.stderr

    sidecar = sidecar_factory(overrides, env=aws_env)
    for user in ("app_scram", "app_md5"):
        # The resolved password checks the client (SCRAM) and logs in upstream.
        with psycopg.connect(sidecar.dsn(user), connect_timeout=10) as conn:
            assert conn.execute("SELECT current_user, pg_is_in_recovery()").fetchone() == (user, False)
        assert str(pg.USERS[user]) not in sidecar.log_text()


def _config_problem(config: dict[str, Any], path: Path) -> tuple[str, str]:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    return problem.path, problem.reason


def test_missing_secret_is_a_config_error_naming_the_field_and_arn(shared_topology, aws_env, tmp_path):
    missing = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:pgsidecar/nope-AbCdEf"
    config = sidecar_config(
        shared_topology, {"auth": {"users": [{"name": "app_scram", "password": f"secretsmanager:{missing}"}]}}
    )
    path, reason = _config_problem(config, tmp_path / "missing.yaml")
    assert path == "auth.users[0].password"
    assert reason == f"secret {missing} not found in AWS Secrets Manager"

    checked = _check_config(config, tmp_path / "missing-cli.yaml", aws_env)
    assert checked.returncode == 2
    assert f"auth.users[0].password: secret {missing} not found" in checked.stderr
    assert "Traceback" not in checked.stderr


def test_missing_json_key_is_a_config_error_that_never_shows_the_secret(shared_topology, aws_env, tmp_path):
    value = {"username": "app_scram", "password": "do-not-print-me"}
    _, arn = _create_secret(value)
    config = sidecar_config(
        shared_topology,
        {"auth": {"users": [{"name": "app_scram", "password": f"secretsmanager:{arn}:passwd"}]}},
    )
    path, reason = _config_problem(config, tmp_path / "nokey.yaml")
    assert (path, reason) == ("auth.users[0].password", f"secret {arn} has no key 'passwd'")

    # A secret that is not JSON at all: the JSON error (which quotes the document) is not shown.
    _, plain_arn = _create_secret("do-not-print-me-either {")
    config["auth"]["users"][0]["password"] = f"secretsmanager:{plain_arn}:password"
    checked = _check_config(config, tmp_path / "notjson.yaml", aws_env)
    assert checked.returncode == 2
    assert f"secret {plain_arn} is not a JSON object, so it has no key 'password'" in checked.stderr
    assert "do-not-print-me" not in checked.stdout + checked.stderr


def test_secrets_manager_unreachable_is_reported_not_hung(shared_topology, aws_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{pg.free_port()}")
    config = sidecar_config(
        shared_topology, {"auth": {"users": [{"name": "app_scram", "password": "secretsmanager:db/cafe"}]}}
    )
    started = time.monotonic()
    path, reason = _config_problem(config, tmp_path / "down.yaml")
    assert path == "auth.users[0].password"
    assert reason.startswith("secret db/cafe: cannot reach AWS Secrets Manager"), reason
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------------------------
# RDS IAM authentication
# ---------------------------------------------------------------------------------------------

SSL_REQUEST = 80877103


class CaptureThenRelay:
    """In front of PostgreSQL. First it plays PostgreSQL just far enough to ask for a cleartext
    password (as RDS does for IAM users), records it and refuses the login; after `relay_to()` it
    forwards connections byte for byte to the real server."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.logins: list[tuple[str, str, bool]] = []  # (user, password, after SSLRequest)
        self.ssl_requests = 0
        self.target: int | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def relay_to(self, port: int) -> None:
        self.target = port

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            handler = self._capture if self.target is None else self._relay
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_exact(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _capture(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            ssl_requested = False
            while True:
                (length,) = struct.unpack("!i", self._read_exact(conn, 4))
                body = self._read_exact(conn, length - 4)
                if struct.unpack("!i", body[:4])[0] != SSL_REQUEST:
                    break
                ssl_requested = True
                with self._lock:
                    self.ssl_requests += 1
                conn.sendall(b"N")  # no TLS here: upstream.tls prefer goes on in plain text
            parts = body[4:].split(b"\x00")
            params = dict(zip(parts[0::2], parts[1::2], strict=False))
            user = params.get(b"user", b"").decode()
            conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
            type_byte = self._read_exact(conn, 1)
            (length,) = struct.unpack("!i", self._read_exact(conn, 4))
            payload = self._read_exact(conn, length - 4)
            if type_byte != b"p":
                return
            with self._lock:
                self.logins.append((user, payload.rstrip(b"\x00").decode(), ssl_requested))
            fields = (
                b"SFATAL\x00VFATAL\x00C28P01\x00Mpassword authentication failed (recorded by test)\x00\x00"
            )
            conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)

    def _relay(self, conn: socket.socket) -> None:
        assert self.target is not None
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        conn.settimeout(None)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
        back.start()
        pump(conn, upstream)
        back.join(30)
        conn.close()
        upstream.close()


@pytest.fixture
def relay() -> Iterator[CaptureThenRelay]:
    r = CaptureThenRelay()
    yield r
    r.close()


def _wait(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


IAM_ROLE = "app_iam"
IAM_CLIENT_PASSWORD = "iam-client-side"  # how clients prove themselves to the sidecar


def test_sidecar_logs_in_upstream_with_an_iam_token(sidecar_factory, shared_topology, relay, aws_env):
    a1 = shared_topology.a1
    overrides = {
        "auth": {"users": [{"name": IAM_ROLE, "password": IAM_CLIENT_PASSWORD}]},
        "upstream": {"tls": "prefer", "iam_auth": True, "connect_timeout": "3s"},
    }
    # The region's name is an AWS region: tokens are signed for it.
    sidecar = sidecar_factory(overrides, topology={REGION: [f"127.0.0.1:{relay.port}"]}, env=aws_env)
    try:
        # 1. The topology probe logs in as the first auth user with a token as its password.
        _wait(lambda: relay.logins, what="a login at the relay")
        user, token, _ = relay.logins[0]
        assert user == IAM_ROLE
        params = verify_token(
            token, host="127.0.0.1", port=relay.port, user=IAM_ROLE, region=REGION, secret_key=FAKE_SECRET_KEY
        )
        assert params["_access_key"] == aws_env["AWS_ACCESS_KEY_ID"]
        # Every retry reused the cached token rather than signing a new one per attempt.
        _wait(lambda: len(relay.logins) >= 3, what="probe retries")
        assert {pw for _, pw, _ in relay.logins} == {token}

        # 2. PostgreSQL gets a role whose password is that very token, and the relay starts relaying.
        a1.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(IAM_ROLE), sql.Literal(token))
        )
        relay.relay_to(a1.port)

        # 3. The probe now finds the writer and a client's session logs in with the same token.
        deadline = time.monotonic() + 15
        while True:
            try:
                conn = psycopg.connect(
                    sidecar.dsn(IAM_ROLE, password=IAM_CLIENT_PASSWORD, dbname="postgres"), connect_timeout=10
                )
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with conn:
            row = conn.execute("SELECT current_user, pg_is_in_recovery()").fetchone()
            assert row == (IAM_ROLE, False)
        backends = a1.query(
            "SELECT application_name FROM pg_stat_activity WHERE usename = %s ORDER BY 1", (IAM_ROLE,)
        )
        assert ("pgsidecar-probe",) in backends
        # The token is a credential: it is never logged.
        assert token not in sidecar.log_text()
        assert "iam_token_signed" in sidecar.log_text()
    finally:
        sidecar.stop()
        with contextlib.suppress(psycopg.Error):
            a1.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(IAM_ROLE)))


def test_iam_token_is_not_sent_when_tls_is_required_but_refused(sidecar_factory, relay, aws_env):
    overrides = {
        "auth": {"users": [{"name": IAM_ROLE, "password": IAM_CLIENT_PASSWORD}]},
        "upstream": {"tls": "require", "iam_auth": True, "connect_timeout": "2s"},
    }
    sidecar = sidecar_factory(overrides, topology={REGION: [f"127.0.0.1:{relay.port}"]}, env=aws_env)
    _wait(lambda: relay.ssl_requests >= 2, what="TLS attempts")
    with pytest.raises(psycopg.OperationalError, match=r"does not support TLS and upstream\.tls is require"):
        psycopg.connect(sidecar.dsn(IAM_ROLE, password=IAM_CLIENT_PASSWORD), connect_timeout=10)
    assert relay.logins == []  # the relay said no to TLS: the token never left the sidecar


def test_iam_without_credentials_explains_why_no_upstream_login_happens(sidecar_factory, relay, aws_env):
    env = {**aws_env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    overrides = {
        "auth": {"users": [{"name": IAM_ROLE, "password": IAM_CLIENT_PASSWORD}]},
        "upstream": {"tls": "prefer", "iam_auth": True, "connect_timeout": "2s"},
    }
    sidecar = sidecar_factory(overrides, topology={REGION: [f"127.0.0.1:{relay.port}"]}, env=env)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar.dsn(IAM_ROLE, password=IAM_CLIENT_PASSWORD), connect_timeout=10)
    message = str(info.value)
    assert f"cannot sign an IAM token for upstream 127.0.0.1:{relay.port} as {IAM_ROLE}" in message
    assert "no AWS credentials found" in message
    assert relay.logins == []
