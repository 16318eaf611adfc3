"""Authentication, both ends: the sidecar as server (`ClientAuthenticator`) and as client
(`UpstreamAuthenticator`), driven against each other and against hand-written clients.

Messages cross between the two as framed bytes, exactly as they would on a socket.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import traceback

import pytest
from scramp import ScramClient, ScramMechanism

from proxy.protocol import messages as m
from proxy.protocol.auth import (
    SCRAM,
    SCRAM_ITERATIONS,
    ClientAuthenticator,
    ScramVerifier,
    UpstreamAuthenticator,
    md5_password_hash,
    md5_response,
)
from proxy.protocol.framing import MessageReader
from proxy.protocol.sqlstate import (
    AuthenticationFailed,
    FeatureNotSupported,
    ProtocolViolation,
    ProxyError,
    SqlState,
)

USER = "app_user"
PASSWORD = "c0rrect-h0rse-battery"
WRONG = "Tr0ub4dor&3-wrong"


def read_one(wire: bytes) -> tuple[int, bytes]:
    """Frame one message off the wire, asserting nothing else is there."""
    reader = MessageReader(1 << 16)
    reader.feed(wire)
    msg = reader.read_message()
    assert msg is not None
    assert reader.take_rest() == b""
    return msg


def auth_request(wire: bytes) -> tuple[int, bytes]:
    type_byte, body = read_one(wire)
    assert type_byte == m.B_AUTH
    return m.decode_auth(body)


def authenticate(server: ClientAuthenticator, client: UpstreamAuthenticator) -> list[int]:
    """Run an exchange until the client reads AuthenticationOk; the request codes it saw."""
    codes = []
    # AuthenticationOk is the caller's to send, once the exchange (if any) is done.
    to_client = server.start() or m.auth_ok()
    for _ in range(8):
        code, payload = auth_request(to_client)
        codes.append(code)
        reply = client.handle(code, payload)
        if code == m.AUTH_OK:
            assert reply is None
            assert server.done
            return codes
        if reply is None:  # the client accepted SASLFinal; the server then sends AuthenticationOk
            assert code == m.AUTH_SASL_FINAL
            assert server.done
            to_client = m.auth_ok()
            continue
        assert not server.done
        answer = server.step(*read_one(reply))
        to_client = m.auth_ok() if answer is None else answer
    raise AssertionError(f"exchange did not finish: {codes}")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def pg_scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """SaltedPassword, StoredKey and ServerKey as PostgreSQL computes them (RFC 5802)."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return salted, stored_key, server_key


def scramp_verifier(password: str, salt: bytes | None = None) -> str:
    """A `SCRAM-SHA-256$...` verifier, as stored in pg_authid.rolpassword, built with scramp."""
    salt, stored_key, server_key, iterations = ScramMechanism(SCRAM).make_auth_info(
        password, iteration_count=SCRAM_ITERATIONS, salt=salt
    )
    return f"{SCRAM}${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def assert_no_secret(exc: BaseException, *secret_values: str) -> None:
    rendered = "".join(traceback.format_exception(exc))
    for secret in secret_values:
        assert secret not in rendered
        assert secret not in repr(exc.args)


def assert_password_failure(exc: AuthenticationFailed) -> None:
    assert exc.code == SqlState.INVALID_PASSWORD.value == "28P01"
    assert exc.message == f'password authentication failed for user "{USER}"'
    assert_no_secret(exc, PASSWORD, WRONG)


# --------------------------------------------------------------------------------------------
# Successful exchanges.


def test_scram_with_a_plain_password() -> None:
    server = ClientAuthenticator("scram-sha-256", USER, PASSWORD)
    assert authenticate(server, UpstreamAuthenticator(USER, PASSWORD)) == [
        m.AUTH_SASL,
        m.AUTH_SASL_CONTINUE,
        m.AUTH_SASL_FINAL,
        m.AUTH_OK,
    ]


def test_scram_with_a_postgresql_verifier_string() -> None:
    server = ClientAuthenticator("scram-sha-256", USER, scramp_verifier(PASSWORD))
    assert authenticate(server, UpstreamAuthenticator(USER, PASSWORD))[-1] == m.AUTH_OK


def test_scram_with_a_verifier_object() -> None:
    server = ClientAuthenticator("scram-sha-256", USER, None, verifier=ScramVerifier.from_password(PASSWORD))
    assert authenticate(server, UpstreamAuthenticator(USER, PASSWORD))[-1] == m.AUTH_OK


def test_scram_offers_only_scram_sha_256() -> None:
    code, payload = auth_request(ClientAuthenticator("scram-sha-256", USER, PASSWORD).start())
    assert code == m.AUTH_SASL
    assert m.decode_sasl_mechanisms(payload) == ["SCRAM-SHA-256"]


def test_md5_with_a_plain_password() -> None:
    server = ClientAuthenticator("md5", USER, PASSWORD)
    assert authenticate(server, UpstreamAuthenticator(USER, PASSWORD)) == [m.AUTH_MD5, m.AUTH_OK]


def test_md5_with_a_stored_md5_hash() -> None:
    stored = "md5" + hashlib.md5((PASSWORD + USER).encode()).hexdigest()
    assert md5_password_hash(USER, PASSWORD) == stored
    server = ClientAuthenticator("md5", USER, stored)
    assert authenticate(server, UpstreamAuthenticator(USER, PASSWORD)) == [m.AUTH_MD5, m.AUTH_OK]


def test_md5_upstream_can_answer_with_the_stored_hash() -> None:
    server = ClientAuthenticator("md5", USER, PASSWORD)
    assert (
        authenticate(server, UpstreamAuthenticator(USER, md5_password_hash(USER, PASSWORD)))[-1] == m.AUTH_OK
    )


def test_md5_response_is_the_postgresql_formula() -> None:
    salt = b"\x9a\x01\xff\x10"
    inner = hashlib.md5((PASSWORD + USER).encode()).hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    assert md5_response(USER, PASSWORD, salt) == expected
    code, payload = auth_request(m.auth_md5(salt))
    reply = UpstreamAuthenticator(USER, PASSWORD).handle(code, payload)
    assert reply == m.password_message(expected)


def test_md5_salt_is_fresh_for_each_exchange() -> None:
    salts = {auth_request(ClientAuthenticator("md5", USER, PASSWORD).start())[1] for _ in range(8)}
    assert len(salts) == 8
    assert all(len(salt) == 4 for salt in salts)


def test_passthrough_collects_the_password_in_cleartext() -> None:
    server = ClientAuthenticator("passthrough", USER, None)
    assert authenticate(server, UpstreamAuthenticator(USER, PASSWORD)) == [m.AUTH_CLEARTEXT, m.AUTH_OK]
    assert server.password == PASSWORD


def test_trust_sends_no_request_and_is_done_at_once() -> None:
    server = ClientAuthenticator("trust", USER, None)
    assert server.start() == b""
    assert server.done


def test_trust_needs_no_password_upstream() -> None:
    server = ClientAuthenticator("trust", USER, None)
    assert authenticate(server, UpstreamAuthenticator(USER, None)) == [m.AUTH_OK]
    assert server.password is None


# --------------------------------------------------------------------------------------------
# Wrong passwords.


@pytest.mark.parametrize(
    "secret",
    [PASSWORD, scramp_verifier(PASSWORD)],
    ids=["plain", "verifier"],
)
def test_scram_with_a_wrong_password_fails(secret: str) -> None:
    server = ClientAuthenticator("scram-sha-256", USER, secret)
    with pytest.raises(AuthenticationFailed) as info:
        authenticate(server, UpstreamAuthenticator(USER, WRONG))
    assert_password_failure(info.value)
    assert not server.done


@pytest.mark.parametrize(
    "secret",
    [PASSWORD, md5_password_hash(USER, PASSWORD)],
    ids=["plain", "md5-hash"],
)
def test_md5_with_a_wrong_password_fails(secret: str) -> None:
    server = ClientAuthenticator("md5", USER, secret)
    with pytest.raises(AuthenticationFailed) as info:
        authenticate(server, UpstreamAuthenticator(USER, WRONG))
    assert_password_failure(info.value)
    assert not server.done


def test_md5_answer_for_another_user_fails() -> None:
    server = ClientAuthenticator("md5", USER, PASSWORD)
    with pytest.raises(AuthenticationFailed) as info:
        authenticate(server, UpstreamAuthenticator("someone_else", PASSWORD))
    assert_password_failure(info.value)


def test_upstream_rejects_a_forged_server_signature() -> None:
    server = ClientAuthenticator("scram-sha-256", USER, PASSWORD)
    client = UpstreamAuthenticator(USER, PASSWORD)
    reply = client.handle(*auth_request(server.start()))
    assert reply is not None
    cont = server.step(*read_one(reply))
    assert cont is not None
    reply = client.handle(*auth_request(cont))
    assert reply is not None
    final = server.step(*read_one(reply))
    assert final is not None
    code, payload = auth_request(final)
    forged = b"v=" + base64.b64encode(bytes(32))
    assert payload != forged
    with pytest.raises(AuthenticationFailed) as info:
        client.handle(code, forged)
    assert info.value.code == "28P01"


# --------------------------------------------------------------------------------------------
# PostgreSQL clients send an empty SCRAM user name (`n=,`).


class LibpqScramClient:
    """SCRAM-SHA-256 written from RFC 5802 the way libpq does it: `n,,n=,r=<nonce>`."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.nonce = b64(secrets.token_bytes(18))
        self.client_first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""

    def initial_response(self) -> bytes:
        return m.sasl_initial_response(SCRAM, f"n,,{self.client_first_bare}".encode())

    def response(self, server_first: str) -> bytes:
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        assert attrs["r"].startswith(self.nonce) and len(attrs["r"]) > len(self.nonce)
        salted, stored_key, server_key = pg_scram_keys(
            self.password, base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.client_first_bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return m.sasl_response(f"{without_proof},p={b64(proof)}".encode())


def run_libpq_client(server: ClientAuthenticator, client: LibpqScramClient) -> str:
    code, payload = auth_request(server.start())
    assert (code, m.decode_sasl_mechanisms(payload)) == (m.AUTH_SASL, [SCRAM])
    cont = server.step(*read_one(client.initial_response()))
    assert cont is not None
    code, server_first = auth_request(cont)
    assert code == m.AUTH_SASL_CONTINUE
    final = server.step(*read_one(client.response(server_first.decode())))
    assert final is not None
    code, server_final = auth_request(final)
    assert code == m.AUTH_SASL_FINAL
    return server_final.decode()


@pytest.mark.parametrize("stored", ["plain", "verifier"])
def test_libpq_style_client_with_empty_user_name_authenticates(stored: str) -> None:
    secret = PASSWORD if stored == "plain" else scramp_verifier(PASSWORD)
    server = ClientAuthenticator("scram-sha-256", USER, secret)
    client = LibpqScramClient(PASSWORD)
    server_final = run_libpq_client(server, client)
    assert server.done
    # The server signed the AuthMessage with the `n=,` the client really sent.
    assert server_final == "v=" + b64(client.server_signature)


def test_libpq_style_client_with_empty_user_name_and_wrong_password_fails() -> None:
    server = ClientAuthenticator("scram-sha-256", USER, PASSWORD)
    with pytest.raises(AuthenticationFailed) as info:
        run_libpq_client(server, LibpqScramClient(WRONG))
    assert_password_failure(info.value)


def test_scramp_client_sending_an_empty_user_name_authenticates() -> None:
    # scramp refuses to build a client with an empty user name, so build one with a placeholder
    # and make it send (and sign) `n=,` instead, as PostgreSQL clients do.
    client = ScramClient([SCRAM], "placeholder", PASSWORD)
    client_first = client.get_client_first().replace("n=placeholder,", "n=,", 1)
    assert client_first.startswith("n,,n=,r=")
    client.client_first_bare = client_first[3:]

    server = ClientAuthenticator("scram-sha-256", USER, PASSWORD)
    server.start()
    cont = server.step(*read_one(m.sasl_initial_response(SCRAM, client_first.encode())))
    assert cont is not None
    client.set_server_first(auth_request(cont)[1].decode())
    final = server.step(*read_one(m.sasl_response(client.get_client_final().encode())))
    assert final is not None
    client.set_server_final(auth_request(final)[1].decode())  # raises if the signature is wrong
    assert server.done


# --------------------------------------------------------------------------------------------
# ScramVerifier.parse


def test_parse_accepts_a_real_verifier() -> None:
    salt = bytes(range(16))
    text = scramp_verifier(PASSWORD, salt=salt)
    _, stored_key, server_key = pg_scram_keys(PASSWORD, salt, 4096)
    assert text == f"SCRAM-SHA-256$4096:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
    assert ScramVerifier.parse(text) == ScramVerifier(salt, stored_key, server_key, 4096)


def test_from_password_uses_postgresql_default_iterations() -> None:
    verifier = ScramVerifier.from_password(PASSWORD)
    assert verifier.iterations == 4096
    assert (verifier.stored_key, verifier.server_key) == pg_scram_keys(PASSWORD, verifier.salt, 4096)[1:]


KEY = b64(bytes(32))
SALT = b64(b"0123456789abcdef")


@pytest.mark.parametrize(
    "text",
    [
        "",
        PASSWORD,
        md5_password_hash(USER, PASSWORD),
        f"SCRAM-SHA-1$4096:{SALT}${KEY}:{KEY}",
        f"scram-sha-256$4096:{SALT}${KEY}:{KEY}",
        f"SCRAM-SHA-256$4096:{SALT}${KEY}",
        f"SCRAM-SHA-256$4096{SALT}${KEY}:{KEY}",
        f"SCRAM-SHA-256$many:{SALT}${KEY}:{KEY}",
        f"SCRAM-SHA-256$4096:not base64!${KEY}:{KEY}",
        f"SCRAM-SHA-256$4096:{SALT}${KEY}:{KEY[:-2]}",
        f"SCRAM-SHA-256$4096:{SALT}${KEY}:{KEY}$extra",
        f"SCRAM-SHA-256$4096:{SALT}$é:{KEY}",
    ],
)
def test_parse_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError, match="SCRAM verifier"):
        ScramVerifier.parse(text)


@pytest.mark.parametrize(
    "keys", [f"{b64(b'a')}:{b64(b'b')}", f"{KEY}:{b64(bytes(31))}", f"{b64(bytes(64))}:{KEY}"]
)
def test_parse_rejects_keys_that_are_not_sha256_sized(keys: str) -> None:
    # As PostgreSQL's parse_scram_secret: a mis-pasted verifier is a config error, not a login failure.
    with pytest.raises(ValueError, match="32-byte"):
        ScramVerifier.parse(f"SCRAM-SHA-256$4096:{SALT}${keys}")


# --------------------------------------------------------------------------------------------
# Misconfiguration and protocol misuse.


@pytest.mark.parametrize("code", [m.AUTH_CLEARTEXT, m.AUTH_MD5, m.AUTH_SASL])
def test_upstream_without_a_password_cannot_answer_a_password_request(code: int) -> None:
    payload = {
        m.AUTH_CLEARTEXT: b"",
        m.AUTH_MD5: b"salt",
        m.AUTH_SASL: b"SCRAM-SHA-256\x00\x00",
    }[code]
    with pytest.raises(AuthenticationFailed, match=f'requires a password for user "{USER}"') as info:
        UpstreamAuthenticator(USER, None).handle(code, payload)
    assert info.value.code == "28P01"


def test_upstream_refuses_to_log_in_with_a_scram_verifier() -> None:
    verifier = scramp_verifier(PASSWORD)
    with pytest.raises(AuthenticationFailed, match="SCRAM verifier") as info:
        UpstreamAuthenticator(USER, verifier).handle(m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    assert_no_secret(info.value, verifier)


def test_upstream_needs_scram_sha_256_among_the_offered_mechanisms() -> None:
    with pytest.raises(FeatureNotSupported):
        UpstreamAuthenticator(USER, PASSWORD).handle(m.AUTH_SASL, b"SCRAM-SHA-256-PLUS\x00\x00")


def test_upstream_rejects_unsupported_methods_and_out_of_order_sasl() -> None:
    with pytest.raises(FeatureNotSupported, match="code 7"):
        UpstreamAuthenticator(USER, PASSWORD).handle(7, b"")  # GSSAPI
    with pytest.raises(ProtocolViolation):
        UpstreamAuthenticator(USER, PASSWORD).handle(m.AUTH_SASL_CONTINUE, b"r=x,s=c2FsdA==,i=4096")


def test_upstream_scram_failure_does_not_leak_the_password() -> None:
    client = UpstreamAuthenticator(USER, PASSWORD)
    client.handle(m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    with pytest.raises(AuthenticationFailed) as info:
        client.handle(m.AUTH_SASL_CONTINUE, b"r=not-our-nonce,s=c2FsdA==,i=4096")
    assert_no_secret(info.value, PASSWORD)


@pytest.mark.parametrize("secret", [None, "SCRAM-SHA-256$4096:" + SALT + "$" + KEY + ":" + KEY])
def test_md5_needs_a_plain_or_md5_secret(secret: str | None) -> None:
    with pytest.raises(FeatureNotSupported, match="md5 authentication needs"):
        ClientAuthenticator("md5", USER, secret).start()


def test_scram_without_any_secret_fails_as_a_password_failure() -> None:
    with pytest.raises(AuthenticationFailed) as info:
        ClientAuthenticator("scram-sha-256", USER, None).start()
    assert_password_failure(info.value)


def test_unknown_method_is_not_supported() -> None:
    with pytest.raises(FeatureNotSupported, match="'ldap'"):
        ClientAuthenticator("ldap", USER, PASSWORD).start()


@pytest.mark.parametrize("method", ["md5", "scram-sha-256", "passthrough"])
def test_a_non_password_message_during_authentication_is_a_protocol_violation(method: str) -> None:
    server = ClientAuthenticator(method, USER, PASSWORD)
    server.start()
    with pytest.raises(ProtocolViolation, match="expected a password message"):
        server.step(*read_one(m.query("SELECT 1")))


def test_scram_client_choosing_another_mechanism_is_a_protocol_violation() -> None:
    server = ClientAuthenticator("scram-sha-256", USER, PASSWORD)
    server.start()
    with pytest.raises(ProtocolViolation, match="unsupported SASL mechanism"):
        server.step(
            *read_one(m.sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=x"))
        )


@pytest.mark.parametrize(
    "client_first",
    [b"", b"n,,", b"garbage", b"n,,n=,", b"\xff\xfe", b"x,,n=,r=abc"],
)
def test_malformed_client_first_fails_without_crashing(client_first: bytes) -> None:
    server = ClientAuthenticator("scram-sha-256", USER, PASSWORD)
    server.start()
    with pytest.raises(ProxyError) as info:
        server.step(*read_one(m.sasl_initial_response(SCRAM, client_first)))
    assert isinstance(info.value, AuthenticationFailed | ProtocolViolation)
    assert_no_secret(info.value, PASSWORD)


def test_malformed_client_final_fails_as_a_password_failure() -> None:
    server = ClientAuthenticator("scram-sha-256", USER, PASSWORD)
    server.start()
    assert server.step(*read_one(LibpqScramClient(PASSWORD).initial_response())) is not None
    with pytest.raises(AuthenticationFailed) as info:
        server.step(*read_one(m.sasl_response(b"c=biws,r=wrong-nonce,p=AAAA")))
    assert_password_failure(info.value)
