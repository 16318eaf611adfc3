"""Login hardening, bytes only: the mock password exchange for users that are not configured,
and the config warning about a probe user without a password."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from proxy.protocol import messages as m
from proxy.protocol.auth import (
    ClientAuthenticator,
    ScramVerifier,
    UpstreamAuthenticator,
    mock_salt,
)
from proxy.protocol.framing import MessageReader
from proxy.protocol.sqlstate import AuthenticationFailed
from sidecar_config import SidecarConfig

KEY = b"k" * 32


def _auth(wire: bytes) -> tuple[int, bytes]:
    reader = MessageReader(1 << 16)
    reader.feed(wire)
    msg = reader.read_message()
    assert msg is not None and msg[0] == m.B_AUTH
    return m.decode_auth(msg[1])


def _exchange(server: ClientAuthenticator, password: str) -> tuple[str, AuthenticationFailed]:
    """Run the client side until the server refuses; the server-first message and the error."""
    client = UpstreamAuthenticator(server.user, password)
    reply = client.handle(*_auth(server.start()))
    assert reply is not None
    server_first = ""
    with pytest.raises(AuthenticationFailed) as failed:
        while True:
            answer = server.step(m.F_PASSWORD, reply[5:])
            assert answer is not None
            code, payload = _auth(answer)
            if code == m.AUTH_SASL_CONTINUE:
                server_first = payload.decode()
            reply = client.handle(code, payload)
            assert reply is not None
    return server_first, failed.value


def test_mock_salt_is_stable_per_name_and_as_long_as_a_real_one() -> None:
    assert mock_salt("nobody", KEY) == mock_salt("nobody", KEY)
    assert mock_salt("nobody", KEY) != mock_salt("somebody", KEY)
    assert mock_salt("nobody", KEY) != mock_salt("nobody", b"other key")
    assert len(mock_salt("nobody", KEY)) == len(ScramVerifier.from_password("pw").salt) == 16


def test_scram_for_an_unknown_user_runs_to_the_end_and_fails_as_a_wrong_password() -> None:
    real = ClientAuthenticator("scram-sha-256", "app", "right", ScramVerifier.from_password("right"))
    real_first, real_error = _exchange(real, "wrong")
    mock = ClientAuthenticator("scram-sha-256", "nobody", None, None, mock_salt("nobody", KEY))
    mock_first, mock_error = _exchange(mock, "whatever")
    attrs = dict(part.split("=", 1) for part in mock_first.split(","))
    assert base64.b64decode(attrs["s"]) == mock_salt("nobody", KEY)
    assert attrs["i"] == dict(part.split("=", 1) for part in real_first.split(","))["i"]
    assert (mock_error.code, mock_error.message) == (
        real_error.code,
        real_error.message.replace('"app"', '"nobody"'),
    )
    assert mock_error.code == "28P01"


def test_md5_for_an_unknown_user_gets_a_salt_then_the_wrong_password_error() -> None:
    mock = ClientAuthenticator("md5", "nobody", None, None, mock_salt("nobody", KEY))
    code, salt = _auth(mock.start())
    assert code == m.AUTH_MD5 and len(salt) == 4
    with pytest.raises(AuthenticationFailed) as failed:
        mock.step(m.F_PASSWORD, m.password_message("md5" + "0" * 32)[5:])
    assert failed.value.code == "28P01"
    assert failed.value.message == 'password authentication failed for user "nobody"'


def _config(**overrides: Any) -> SidecarConfig:
    data: dict[str, Any] = {"upstream": {"regions": [{"name": "r", "hosts": ["127.0.0.1:5432"]}]}}
    data.update(overrides)
    return SidecarConfig.model_validate(data)


def test_no_warning_when_the_probe_user_has_a_password() -> None:
    cfg = _config(auth={"method": "passthrough", "users": [{"name": "app", "password": "pw"}]})
    assert cfg.warnings() == []
    assert _config(auth={"method": "passthrough"}, upstream={
        "regions": [{"name": "r", "hosts": ["127.0.0.1:5432"]}], "iam_auth": True,
    }).warnings() == []  # fmt: skip


@pytest.mark.parametrize(
    ("auth", "upstream", "why"),
    [
        ({"method": "passthrough"}, {}, "auth.users is empty"),
        ({"method": "passthrough", "users": [{"name": "app"}]}, {}, 'no password for "app"'),
        ({"method": "trust", "users": [{"name": "app", "password": "pw"}]}, {"probe_user": "probe"},
         'no password for "probe"'),
    ],
)  # fmt: skip
def test_a_probe_user_without_a_password_is_warned_about(
    auth: dict[str, Any], upstream: dict[str, Any], why: str
) -> None:
    cfg = _config(auth=auth, upstream={"regions": [{"name": "r", "hosts": ["127.0.0.1:5432"]}], **upstream})
    (warning,) = cfg.warnings()
    assert warning.startswith("upstream.probe_user")
    assert why in warning and "pg_hba.conf trust" in warning
