"""TLS on both legs, with certificates made here by a throw-away CA.

* client -> sidecar: ``client_tls`` terminates TLS; libpq's ``verify-full`` checks the sidecar's
  certificate against the test CA, and plain-text clients are still served.
* sidecar -> PostgreSQL: a writer with ``ssl = on`` and a server certificate from the same CA;
  ``upstream.tls`` modes behave as libpq's modes of the same names, and the topology probe uses
  the same TLS settings as pooled connections.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import pwd
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness import pg
from tests.harness.sidecar import SIDECAR_PASSWORDS
from tests.harness.wire import RawClient

# ---------------------------------------------------------------------------------------------
# A small PKI
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_cert: Path  # the CA that signed server_cert
    server_cert: Path  # CN/SAN 127.0.0.1 and localhost
    server_key: Path
    other_ca_cert: Path  # an unrelated CA: verifying server_cert against it must fail


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            # Both: the sidecar and libpq are reached as 127.0.0.1, and verify-full matches an IP
            # address host only against IP SANs (never against the CN).
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int, owner_postgres: bool = False) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    if owner_postgres and os.geteuid() == 0:
        # PostgreSQL refuses a key file that is not its own with mode 0600 (or root's with 0640).
        entry = pwd.getpwnam(pg.PG_OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def make_pki(directory: Path, owner_postgres: bool = False) -> Pki:
    ca_key, ca_cert = _make_ca("pgsidecar test CA")
    _, other_ca = _make_ca("some other CA")
    server_key, server_cert = _make_server_cert(ca_key, ca_cert)
    return Pki(
        ca_cert=_write(directory / "ca.crt", _pem_cert(ca_cert), 0o644, owner_postgres),
        server_cert=_write(directory / "server.crt", _pem_cert(server_cert), 0o644, owner_postgres),
        server_key=_write(directory / "server.key", _pem_key(server_key), 0o600, owner_postgres),
        other_ca_cert=_write(directory / "other-ca.crt", _pem_cert(other_ca), 0o644, owner_postgres),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------------------------------
# client -> sidecar
# ---------------------------------------------------------------------------------------------


def _client_tls(pki: Pki) -> dict[str, object]:
    return {"client_tls": {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}}


def test_client_tls_verify_full_through_the_sidecar(sidecar_factory, pki):
    sidecar = sidecar_factory(_client_tls(pki))
    dsn = sidecar.dsn(sslmode="verify-full", sslrootcert=str(pki.ca_cert))
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user, 6 * 7").fetchone() == ("app_scram", 42)
        # The extended protocol and a large-ish result over TLS (records span TLS frames).
        rows = conn.execute("SELECT g, repeat('x', 1000) FROM generate_series(1, 2000) g").fetchall()
        assert len(rows) == 2000
        assert rows[-1][0] == 2000


def test_client_tls_is_optional_for_plain_clients(sidecar_factory, pki):
    sidecar = sidecar_factory(_client_tls(pki))
    with psycopg.connect(sidecar.dsn(sslmode="disable"), connect_timeout=10) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_client_verify_full_rejects_a_sidecar_cert_from_another_ca(sidecar_factory, pki):
    sidecar = sidecar_factory(_client_tls(pki))
    dsn = sidecar.dsn(sslmode="verify-full", sslrootcert=str(pki.other_ca_cert))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn, connect_timeout=10)
    # The failed handshake cost the sidecar nothing.
    with psycopg.connect(sidecar.dsn(sslmode="require"), connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use


def test_client_ssl_request_without_client_tls_is_declined(sidecar_factory):
    sidecar = sidecar_factory()
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(sidecar.dsn(sslmode="require"), connect_timeout=10)
    with psycopg.connect(sidecar.dsn(sslmode="prefer"), connect_timeout=10) as conn:
        assert not conn.pgconn.ssl_in_use


def test_plain_bytes_after_ssl_request_are_refused(sidecar_factory, pki):
    # Data pipelined behind an SSLRequest would reach the session unencrypted (CVE-2021-23222 in
    # libpq, -23214 in the server): the sidecar must refuse it rather than run the TLS handshake.
    sidecar = sidecar_factory({**_client_tls(pki), "auth": {"method": "trust"}})
    client = RawClient(sidecar.port)
    client.send(b"\x00\x00\x00\x08\x04\xd2\x16\x2f" + b"\x00\x00\x00\x08\x00\x03\x00\x00")
    data = b""
    while True:
        chunk = client.sock.recv(4096)
        if not chunk:
            break
        data += chunk
    assert b"S" not in data[:1]
    assert b"08P01" in data and b"unencrypted data after SSLRequest" in data


# ---------------------------------------------------------------------------------------------
# sidecar -> PostgreSQL
# ---------------------------------------------------------------------------------------------

TLS_ONLY_ROLE = "app_tls"
TLS_ONLY_PASSWORD = "tls-secret"


@dataclass
class TlsTopology:
    topo: pg.Topology
    pki: Pki  # files owned by postgres, inside the topology's directory


@pytest.fixture(scope="module")
def tls_topology(pg_base_dir: Path) -> Iterator[TlsTopology]:
    """A fresh a1/a2/b1 topology whose writer a1 speaks TLS with a certificate from a test CA.

    Module-scoped (the tests here only read from it), so the restart happens once. a1 also gets
    a role that pg_hba.conf admits over TLS only (hostssl, with hostnossl reject), so PostgreSQL
    itself proves the sidecar's connection was encrypted; the harness's `host` lines still work.
    """
    topo = pg.make_topology(pg_base_dir)
    try:
        pki_dir = topo.a1.node_dir / "pki"
        pki_dir.mkdir(mode=0o700)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(pg.PG_OS_USER)
            os.chown(pki_dir, entry.pw_uid, entry.pw_gid)
        certs = make_pki(pki_dir, owner_postgres=True)
        a1 = topo.a1
        a1.execute(f"CREATE ROLE {TLS_ONLY_ROLE} LOGIN PASSWORD '{TLS_ONLY_PASSWORD}'")
        a1.execute(f"GRANT ALL ON DATABASE {pg.APP_DB} TO {TLS_ONLY_ROLE}")
        hba = a1.datadir / "pg_hba.conf"
        lines = (
            f"hostssl all {TLS_ONLY_ROLE} 127.0.0.1/32 scram-sha-256\n"
            f"hostnossl all {TLS_ONLY_ROLE} 127.0.0.1/32 reject\n"
        )
        _write(hba, (lines + hba.read_text()).encode(), 0o600, owner_postgres=True)
        a1.set_config(
            {"ssl": "on", "ssl_cert_file": str(certs.server_cert), "ssl_key_file": str(certs.server_key)},
            reload=False,
        )
        a1.restart()
        assert a1.query("SHOW ssl") == [("on",)]
        yield TlsTopology(topo, certs)
    finally:
        topo.stop_all()


def _upstream(tls: str, ca_file: Path | None = None, **extra: object) -> dict[str, object]:
    upstream: dict[str, object] = {"tls": tls, **extra}
    if ca_file is not None:
        upstream["ca_file"] = str(ca_file)
    return {"upstream": upstream}


def _a1_only(tt: TlsTopology) -> dict[str, list[pg.PgNode]]:
    # Only the TLS writer: the plain-text standbys would fail verify-full probes and add noise.
    return {pg.REGION_A: [tt.topo.a1]}


def _ssl_backends(node: pg.PgNode, user: str) -> list[tuple[str, bool]]:
    return [
        (str(app), bool(ssl))
        for app, ssl in node.query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)"
            " WHERE a.usename = %s ORDER BY a.application_name",
            (user,),
        )
    ]


def test_upstream_verify_full_encrypts_pool_and_probe_connections(sidecar_factory, tls_topology):
    tt = tls_topology
    users = [{"name": u, "password": pw} for u, pw in SIDECAR_PASSWORDS.items()]
    users.append({"name": TLS_ONLY_ROLE, "password": TLS_ONLY_PASSWORD})
    sidecar = sidecar_factory(
        {**_upstream("verify-full", tt.pki.ca_cert), "auth": {"users": users}}, topology=_a1_only(tt)
    )
    with psycopg.connect(sidecar.dsn(application_name="tls-app"), connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user, pg_is_in_recovery()").fetchone() == ("app_scram", False)
        # Asked of PostgreSQL itself: every backend of the sidecar, the probe's too, is on TLS.
        backends = _ssl_backends(tt.topo.a1, "app_scram")
        assert ("tls-app", True) in backends
        assert ("pgsidecar-probe", True) in backends
        assert all(ssl for _, ssl in backends), backends
    # A role that pg_hba.conf lets in over TLS only.
    dsn = sidecar.dsn(TLS_ONLY_ROLE, password=TLS_ONLY_PASSWORD)
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (TLS_ONLY_ROLE,)
    # The same role straight to PostgreSQL without TLS is refused: the hba lines are live.
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(
            tt.topo.a1.dsn(TLS_ONLY_ROLE, password=TLS_ONLY_PASSWORD, sslmode="disable"),
            connect_timeout=10,
        )


def test_upstream_require_and_prefer_encrypt_without_verifying(sidecar_factory, tls_topology):
    tt = tls_topology
    for mode in ("require", "prefer"):
        # other_ca_cert is ignored by these modes (as libpq's): encryption, no verification.
        sidecar = sidecar_factory(_upstream(mode), topology=_a1_only(tt))
        with psycopg.connect(sidecar.dsn("app_md5", application_name=f"mode-{mode}"),
                             connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert (f"mode-{mode}", True) in _ssl_backends(tt.topo.a1, "app_md5")
        sidecar.stop()


def _login_error(port: int) -> asyncpg.PostgresError:
    """The error a client gets logging in (asyncpg: libpq-based drivers do not expose the
    SQLSTATE of an error received during connection startup)."""

    async def attempt() -> asyncpg.PostgresError:
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=port, user="app_scram", password=SIDECAR_PASSWORDS["app_scram"],
                database="appdb", ssl=False, timeout=15,
            )
        except asyncpg.PostgresError as exc:
            return exc
        await conn.close()
        raise AssertionError("login unexpectedly succeeded")

    return asyncio.run(attempt())


def test_upstream_verify_full_with_the_wrong_ca_fails_clearly(sidecar_factory, tls_topology):
    tt = tls_topology
    sidecar = sidecar_factory(
        _upstream("verify-full", tt.pki.other_ca_cert, connect_timeout="2s"), topology=_a1_only(tt)
    )
    err = _login_error(sidecar.port)
    assert err.sqlstate == "08006", str(err)
    message = str(err)
    assert tt.topo.a1.hostport in message, message
    assert "TLS certificate verification failed: unable to get local issuer certificate" in message
    assert "upstream.tls is verify-full" in message
    # The probe logs it too: an operator sees why there is no writer without a client trying.
    sidecar.wait_for_log("unable to get local issuer certificate")


class _WrongNameTlsServer:
    """Answers SSLRequest with 'S' and presents a certificate from the right CA for another name."""

    def __init__(self, directory: Path) -> None:
        ca_key, ca = _make_ca("pgsidecar test CA (second)")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("elsewhere.test"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("elsewhere.test")]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_cert = _write(directory / "second-ca.crt", _pem_cert(ca), 0o644)
        cert_file = _write(directory / "elsewhere.crt", _pem_cert(cert), 0o644)
        key_file = _write(directory / "elsewhere.key", _pem_key(key), 0o600)
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(cert_file), str(key_file))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.handshakes = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(5)
                try:
                    if len(conn.recv(8)) == 8:
                        conn.sendall(b"S")
                        self.handshakes += 1
                        with self.ctx.wrap_socket(conn, server_side=True) as tls:
                            tls.recv(1)
                except OSError:
                    pass  # the sidecar aborts the handshake: that is the point

    def close(self) -> None:
        self.sock.close()


def test_upstream_verify_full_checks_the_host_name(sidecar_factory, tmp_path):
    server = _WrongNameTlsServer(tmp_path)
    try:
        sidecar = sidecar_factory(
            _upstream("verify-full", server.ca_cert, connect_timeout="2s"),
            topology={pg.REGION_A: [f"127.0.0.1:{server.port}"]},
        )
        err = _login_error(sidecar.port)
        assert err.sqlstate == "08006", str(err)
        message = str(err)
        assert f"127.0.0.1:{server.port}" in message, message
        assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in message, message
        assert server.handshakes > 0
    finally:
        server.close()


def test_upstream_verify_full_accepts_a_dns_name_from_the_certificate(sidecar_factory, tls_topology):
    # Hosts are matched against the certificate's DNS SANs as well as its IP SANs.
    tt = tls_topology
    sidecar = sidecar_factory(
        _upstream("verify-full", tt.pki.ca_cert),
        topology={pg.REGION_A: [f"localhost:{tt.topo.a1.port}"]},
    )
    with psycopg.connect(sidecar.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_upstream_require_against_a_plain_server_fails_clearly(sidecar_factory, shared_topology):
    sidecar = sidecar_factory(
        _upstream("require", connect_timeout="2s"), topology={pg.REGION_A: [shared_topology.a1]}
    )
    err = _login_error(sidecar.port)
    assert err.sqlstate == "08006", str(err)
    message = str(err)
    expected = f"upstream {shared_topology.a1.hostport} does not support TLS and upstream.tls is require"
    assert expected in message, message


def test_upstream_prefer_against_a_plain_server_falls_back_to_plain_text(sidecar_factory, shared_topology):
    sidecar = sidecar_factory(_upstream("prefer"))
    with psycopg.connect(sidecar.dsn(application_name="prefer-plain"), connect_timeout=10) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        assert ("prefer-plain", False) in _ssl_backends(shared_topology.a1, "app_scram")


def test_tls_on_both_legs(sidecar_factory, tls_topology):
    tt = tls_topology
    sidecar = sidecar_factory(
        {**_upstream("verify-full", tt.pki.ca_cert), **_client_tls(tt.pki)}, topology=_a1_only(tt)
    )
    dsn = sidecar.dsn(sslmode="verify-full", sslrootcert=str(tt.pki.ca_cert), application_name="both")
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        # COPY out streams through two TLS layers without being buffered whole.
        sql = "COPY (SELECT g FROM generate_series(1, 50000) g) TO STDOUT"
        with conn.cursor() as cur, cur.copy(sql) as copy:
            total = sum(1 for _ in copy.rows())
        assert total == 50000
        assert ("both", True) in _ssl_backends(tt.topo.a1, "app_scram")
