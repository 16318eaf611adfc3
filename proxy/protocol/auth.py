"""Authentication exchanges, sans I/O, for both ends of the sidecar.

* `ClientAuthenticator`: the sidecar acting as the server towards an application
  (trust, md5, scram-sha-256 via `scramp`, and passthrough, which only collects the password).
* `UpstreamAuthenticator`: the sidecar acting as a client towards PostgreSQL (trust, cleartext,
  md5, SCRAM-SHA-256 via `scramp`).

Each is fed decoded message bodies and returns the bytes to send back; failures raise
`AuthenticationFailed` with a message that never contains a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from scramp import ScramClient, ScramException, ScramMechanism

from sidecar_config.scram import ScramVerifier as ConfiguredVerifier

from . import messages as m
from .sqlstate import AuthenticationFailed, FeatureNotSupported, ProtocolViolation

SCRAM = "SCRAM-SHA-256"
_MECHANISM = ScramMechanism(SCRAM)
# PostgreSQL's own default; a verifier computed here costs the same to check as the server's.
SCRAM_ITERATIONS = 4096
# The server's nonce: 18 random bytes in base64, 24 characters, as PostgreSQL's own
# (SCRAM_RAW_NONCE_LEN). scramp's default is 64 hex characters, and it checks every character of
# each nonce in Python, twice over: the shorter nonce cuts that work at each login by about half
# with 144 bits of randomness kept.
SERVER_NONCE_BYTES = 18
# The length of the salts PostgreSQL makes (SCRAM_DEFAULT_SALT_LEN); the sidecar's too, mock or not.
MOCK_SALT_BYTES = 16


def md5_hex(data: bytes) -> str:
    # md5 is what the PostgreSQL protocol mandates for this method, not a choice made here.
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_password_hash(user: str, password: str) -> str:
    """The `md5...` form PostgreSQL stores: md5(password || user)."""
    return "md5" + md5_hex(password.encode() + user.encode())


def md5_response(user: str, password: str, salt: bytes) -> str:
    """What a client answers to AuthenticationMD5Password."""
    stored = md5_password_hash(user, password) if not _is_md5_hash(password) else password
    return "md5" + md5_hex(stored[3:].encode() + salt)


def _is_md5_hash(secret: str) -> bool:
    return len(secret) == 35 and secret.startswith("md5")


@dataclass(frozen=True, slots=True)
class ScramVerifier(ConfiguredVerifier):
    """A configured verifier (parsed by the config package, which imports nothing of `proxy`), or
    one derived here from a configured password."""

    @classmethod
    def from_password(cls, password: str) -> ScramVerifier:
        # A salt as long as PostgreSQL's (scramp's own is twice that): every salt the sidecar
        # shows, real or mock, then has the same length.
        salt, stored_key, server_key, iterations = _MECHANISM.make_auth_info(
            password, iteration_count=SCRAM_ITERATIONS, salt=secrets.token_bytes(MOCK_SALT_BYTES)
        )
        return cls(salt, stored_key, server_key, iterations)

    @classmethod
    def for_secret(cls, secret: str) -> ScramVerifier:
        """The verifier for a configured secret: parsed if it is one, derived if it is a password."""
        return cls.parse(secret) if cls.is_verifier(secret) else cls.from_password(secret)


class ClientAuthenticator:
    """Authenticates an application's connection against the configured secret.

    `secret` is the configured password (plain text, an `md5...` hash, or a SCRAM verifier), or None
    for trust and passthrough. For passthrough the collected password is in `password` afterwards;
    the caller proves it by logging in upstream.

    `mock_salt`: the user is not configured. As PostgreSQL does for a role that does not exist, the
    exchange still runs (a SCRAM salt derived from the user name, stable from one attempt to the
    next as a real user's is; a random md5 salt) and fails only at its end, with the very error a
    wrong password gets: nobody learns from the answers which users exist.
    """

    def __init__(
        self,
        method: str,
        user: str,
        secret: str | None,
        verifier: ScramVerifier | None = None,
        mock_salt: bytes | None = None,
    ):
        self.method = method
        self.user = user
        self._secret = secret
        self._verifier = verifier
        self._mock_salt = mock_salt
        self._salt = b""
        self._scram: Any = None  # scramp's ScramServer (untyped library)
        self.password: str | None = None  # passthrough only
        self.done = False

    def start(self) -> bytes:
        """The first message to send (nothing for trust, which is `done` at once).

        AuthenticationOk itself is the caller's to send: it follows whatever else login needs
        (a server connection, a passthrough password proven upstream).
        """
        if self.method == "trust":
            self.done = True
            return b""
        if self.method == "passthrough":
            return m.auth_cleartext()
        if self.method == "md5":
            if self._mock_salt is not None:
                self._salt = secrets.token_bytes(4)
                return m.auth_md5(self._salt)
            if self._secret is None or ScramVerifier.is_verifier(self._secret):
                raise FeatureNotSupported(
                    f'md5 authentication needs a plain or md5 password for user "{self.user}"'
                )
            self._salt = secrets.token_bytes(4)
            return m.auth_md5(self._salt)
        if self.method == "scram-sha-256":
            verifier = self._verifier
            if self._mock_salt is not None:
                # Random keys: no proof can match them.
                keys = secrets.token_bytes(32), secrets.token_bytes(32)
                verifier = ScramVerifier(self._mock_salt, *keys, SCRAM_ITERATIONS)
            elif verifier is None:
                if self._secret is None:
                    raise AuthenticationFailed(self._failure())
                verifier = ScramVerifier.for_secret(self._secret)
            info = (verifier.salt, verifier.stored_key, verifier.server_key, verifier.iterations)
            # PostgreSQL clients send an empty SCRAM user name; the startup user is what counts.
            self._scram = _MECHANISM.make_server(lambda _username: info, s_nonce=server_nonce())
            return m.auth_sasl([SCRAM])
        raise FeatureNotSupported(f"authentication method {self.method!r} is not supported")

    def step(self, type_byte: int, body: bytes) -> bytes | None:
        """Handle one client message; returns the reply, or None when the exchange is complete."""
        if type_byte != m.F_PASSWORD:
            raise ProtocolViolation(
                f"expected a password message during authentication, got {bytes((type_byte,))!r}"
            )
        if self.method == "passthrough":
            self.password = m.decode_password(body)
            self.done = True
            return None
        if self.method == "md5":
            answer = m.decode_password(body)
            if self._mock_salt is not None:
                raise AuthenticationFailed(self._failure())
            assert self._secret is not None
            expected = md5_response(self.user, self._secret, self._salt)
            if not hmac.compare_digest(answer.encode(), expected.encode()):
                raise AuthenticationFailed(self._failure())
            self.done = True
            return None
        return self._scram_step(body)

    def _scram_step(self, body: bytes) -> bytes | None:
        server = self._scram
        if server is None:
            raise ProtocolViolation("unexpected SASL message")
        try:
            if server.stage is None:
                mechanism, data = m.decode_sasl_initial_response(body)
                if mechanism != SCRAM:
                    raise ProtocolViolation(f"client selected an unsupported SASL mechanism {mechanism!r}")
                _set_client_first(server, data.decode())
                return m.auth_sasl_continue(server.get_server_first().encode())
            server.set_client_final(bytes(body).decode())
            final = server.get_server_final().encode()
        except (ScramException, UnicodeDecodeError) as exc:
            raise AuthenticationFailed(self._failure()) from exc
        self.done = True
        return m.auth_sasl_final(final)

    def _failure(self) -> str:
        return f'password authentication failed for user "{self.user}"'


def mock_salt(user: str, key: bytes) -> bytes:
    """The SCRAM salt shown for a user that is not configured: what PostgreSQL's scram_mock_salt
    makes (SHA-256 of the name and a secret nonce), so it is the same at every attempt."""
    return hmac.new(key, user.encode(), hashlib.sha256).digest()[:MOCK_SALT_BYTES]


def server_nonce() -> str:
    return base64.b64encode(secrets.token_bytes(SERVER_NONCE_BYTES)).decode("ascii")


def _set_client_first(server: Any, client_first: str) -> None:
    """Feed a PostgreSQL client-first message to a scramp server.

    PostgreSQL clients send an empty SCRAM user name (`n=,`: the startup packet names the user),
    which RFC 5802 and so scramp reject. scramp parses a copy with the placeholder `*` (what
    pgjdbc sends); the AuthMessage that the proof signs must then use the bytes the client really
    sent, so the original bare message is put back.
    """
    gs2_end = client_first.find(",", client_first.find(",") + 1) + 1
    bare = client_first[gs2_end:]
    if not bare.startswith("n=,"):
        server.set_client_first(client_first)
        return
    server.set_client_first(client_first[:gs2_end] + "n=*" + bare[2:])
    server.client_first_bare = bare


class UpstreamAuthenticator:
    """Answers PostgreSQL's authentication requests on behalf of a session."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self._password = password
        self._scram: ScramClient | None = None

    def handle(self, code: int, payload: bytes) -> bytes | None:
        """The reply to an Authentication request; None when nothing is to be sent."""
        if code in (m.AUTH_OK, m.AUTH_SASL_FINAL):
            if code == m.AUTH_SASL_FINAL and self._scram is not None:
                try:
                    self._scram.set_server_final(payload.decode())
                except (ScramException, UnicodeDecodeError) as exc:
                    raise AuthenticationFailed("upstream server's SCRAM signature is invalid") from exc
            return None
        password = self._require_password(code)
        if code == m.AUTH_CLEARTEXT:
            return m.password_message(password)
        if code == m.AUTH_MD5:
            return m.password_message(md5_response(self.user, password, payload[:4]))
        if code == m.AUTH_SASL:
            offered = m.decode_sasl_mechanisms(payload)
            if SCRAM not in offered:
                raise FeatureNotSupported(f"upstream offers no supported SASL mechanism ({offered})")
            self._scram = ScramClient([SCRAM], self.user, password)
            return m.sasl_initial_response(SCRAM, self._scram.get_client_first().encode())
        if code == m.AUTH_SASL_CONTINUE:
            if self._scram is None:
                raise ProtocolViolation("upstream sent SASLContinue before SASL")
            try:
                self._scram.set_server_first(payload.decode())
                return m.sasl_response(self._scram.get_client_final().encode())
            except (ScramException, UnicodeDecodeError) as exc:
                raise AuthenticationFailed(f"upstream SCRAM exchange failed: {exc}") from exc
        raise FeatureNotSupported(f"upstream requested unsupported authentication method (code {code})")

    def _require_password(self, code: int) -> str:
        if self._password is None:
            raise AuthenticationFailed(
                f'upstream requires a password for user "{self.user}" (auth code {code}) '
                "and none is configured"
            )
        if ScramVerifier.is_verifier(self._password):
            raise AuthenticationFailed(
                f'user "{self.user}" is configured with a SCRAM verifier, which cannot log in upstream; '
                "configure the plain password"
            )
        return self._password
