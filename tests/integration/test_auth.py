"""Client authentication at the sidecar and upstream authentication to PostgreSQL, per method.

The harness roles cover every upstream method: app_scram (SCRAM-SHA-256), app_md5 (md5),
app_clear (cleartext password) and app_trust (trust).
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from tests.harness.pg import USERS
from tests.harness.sidecar import SIDECAR_PASSWORDS


def _whoami(dsn: str) -> tuple[str, bool]:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT current_user, pg_is_in_recovery()").fetchone()
        assert row is not None
        return str(row[0]), bool(row[1])


def _login_error(port: int, user: str, password: str | None) -> asyncpg.PostgresError:
    async def attempt() -> asyncpg.PostgresError:
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=port, user=user, password=password, database="appdb", ssl=False
            )
        except asyncpg.PostgresError as exc:
            return exc
        await conn.close()
        raise AssertionError(f"login as {user} unexpectedly succeeded")

    return asyncio.run(attempt())


def _assert_no_secrets(log: str) -> None:
    for secret in [*SIDECAR_PASSWORDS.values(), "not-the-password"]:
        assert secret not in log, f"a password reached the sidecar log: {secret!r}"


@pytest.mark.parametrize("user", ["app_scram", "app_md5", "app_clear", "app_trust"])
def test_scram_login_reaches_the_writer_with_every_upstream_method(sidecar_factory, user):
    sidecar = sidecar_factory()
    assert _whoami(sidecar.dsn(user)) == (user, False)
    _assert_no_secrets(sidecar.log_text())


def test_scram_wrong_password_is_rejected_with_28P01(sidecar_factory):
    sidecar = sidecar_factory()
    err = _login_error(sidecar.port, "app_scram", "not-the-password")
    assert err.sqlstate == "28P01"
    assert 'password authentication failed for user "app_scram"' in str(err)
    # The rejected client cost nothing: the right password still works.
    assert _whoami(sidecar.dsn("app_scram"))[0] == "app_scram"
    _assert_no_secrets(sidecar.log_text())


def test_unknown_user_is_rejected_as_a_wrong_password_is(sidecar_factory):
    # As PostgreSQL: an exchange all the same, and the same 28P01, so the answer tells nobody which
    # users exist (test_login_hardening checks the exchange itself).
    sidecar = sidecar_factory()
    err = _login_error(sidecar.port, "nobody_here", "whatever")
    assert err.sqlstate == "28P01"
    assert 'password authentication failed for user "nobody_here"' in str(err)


def test_scram_verifier_in_config_authenticates_clients(sidecar_factory, shared_topology):
    # An operator may store PostgreSQL's SCRAM verifier instead of the password for client auth;
    # that user must then be trust upstream, since a verifier cannot log in anywhere.
    verifier = shared_topology.a1.query("SELECT rolpassword FROM pg_authid WHERE rolname = 'app_scram'")[0][0]
    assert verifier.startswith("SCRAM-SHA-256$")
    users = [{"name": "app_trust", "password": verifier}]
    sidecar = sidecar_factory({"auth": {"users": users}})
    assert _whoami(sidecar.dsn("app_trust", password=USERS["app_scram"]))[0] == "app_trust"
    assert _login_error(sidecar.port, "app_trust", "not-the-password").sqlstate == "28P01"


@pytest.mark.parametrize("user", ["app_scram", "app_md5"])
def test_md5_client_auth(sidecar_factory, user):
    sidecar = sidecar_factory({"auth": {"method": "md5"}})
    assert _whoami(sidecar.dsn(user)) == (user, False)
    assert _login_error(sidecar.port, user, "not-the-password").sqlstate == "28P01"
    _assert_no_secrets(sidecar.log_text())


def test_trust_client_auth_needs_no_password(sidecar_factory):
    sidecar = sidecar_factory({"auth": {"method": "trust"}})
    # The client sends no password at all; upstream still gets the configured one.
    with psycopg.connect(
        f"host=127.0.0.1 port={sidecar.port} user=app_clear dbname=appdb", connect_timeout=10
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app_clear",)


@pytest.mark.parametrize("user", ["app_scram", "app_md5", "app_clear"])
def test_passthrough_verifies_the_password_upstream(sidecar_factory, user):
    sidecar = sidecar_factory({"auth": {"method": "passthrough", "users": []}})
    password = USERS[user]
    assert password is not None
    assert _whoami(sidecar.dsn(user, password=password)) == (user, False)
    # Second login with the same password: accepted again (from the verified-password cache).
    assert _whoami(sidecar.dsn(user, password=password))[0] == user
    err = _login_error(sidecar.port, user, "not-the-password")
    assert err.sqlstate == "28P01"
    _assert_no_secrets(sidecar.log_text())
