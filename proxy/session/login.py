"""Login: SSL/GSS negotiation, the startup packet, authentication, cancel requests and keys,
the first server (or the admin console, or an outage login), bounded by
`limits.client_login_timeout`.
"""

from __future__ import annotations

import asyncio
import shlex
from os import urandom
from time import monotonic  # by name: compiled, `time.monotonic` is a module getattr per call
from typing import Final, cast

from .. import logs
from ..protocol import messages as m
from ..protocol.auth import ClientAuthenticator
from ..protocol.sqlstate import (
    CannotConnectNow,
    FeatureNotSupported,
    ProtocolViolation,
    ProxyError,
    UnknownUser,
)
from ..server import (
    ServerConnection,
)
from ..settings import lower_keys, sync_sql
from ..spooling import SpoolNow
from .host import ADMIN_DATABASE
from .outage_session import OutageSession
from .scan import _HOLD_LIMIT, _KEY_PARTS, _MADE_UP_PIDS
from .states import (
    ADMIN,
    CLOSED,
    CONNECTING,
    IDLE,
    OUTAGE,
)

_NOT_SETTABLE: Final = frozenset({"user", "database", "replication", "options"})


def parse_options(options: str) -> dict[str, str]:
    """Settings from the libpq `options` startup parameter (`-c name=value` / `--name=value`)."""
    settings: dict[str, str] = {}
    try:
        words = shlex.split(options.replace("\\ ", "\x00"))
    except ValueError as exc:
        raise ProtocolViolation(f"invalid options startup parameter: {exc}") from exc
    words = [w.replace("\x00", " ") for w in words]
    it = iter(words)
    for word in it:
        if word == "-c":
            word = next(it, "")
        elif word.startswith("-c") or word.startswith("--"):
            word = word[2:]
        else:
            raise ProtocolViolation(f"unsupported option {word!r} in the options startup parameter")
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ProtocolViolation(f"invalid option {word!r}: expected -c name=value")
        settings[name.replace("-", "_")] = value
    return settings


class Login(OutageSession):
    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _wait_input(self) -> None:
        if self._eof or self.transport is None:
            raise ConnectionResetError("client disconnected during login")
        self._resume_reading()  # no whole message is left: read on (the message is bounded)
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def _read_startup(self) -> m.StartupPacket:
        while True:
            body = self._reader.read_startup()
            if body is not None:
                return m.decode_startup(body)
            await self._wait_input()

    async def _read_message(self) -> tuple[int, bytes]:
        while True:
            msg = self._reader.read_message()
            if msg is not None:
                return msg
            await self._wait_input()

    async def _handshake(self) -> None:
        # A timer, not asyncio.timeout(): that context manager runs as interpreted coroutines,
        # about 25k instructions per login, which connect-per-transaction clients pay every time.
        # On expiry the client is failed and closed, which cancels this task.
        deadline = asyncio.get_running_loop().call_later(
            self.sidecar.config.limits.client_login_timeout, self._login_timed_out
        )
        try:
            try:
                startup = await self._negotiate()
                if startup is None:
                    return
                await self._authenticate(startup)
                self._reader.authenticated()
            finally:
                deadline.cancel()
            await self._attach_server()
        except ProxyError as exc:
            self.fail(exc)
        except ConnectionResetError as exc:
            self.close(str(exc))
        except Exception as exc:  # a bug here must cost one client, not the sidecar
            logs.event("client_internal_error", logs.ERROR, conn=self.id, error=repr(exc))
            self.fail(ProxyError(f"internal error in pgsidecar: {exc!r}"))

    def _login_timed_out(self) -> None:
        self.fail(
            ProtocolViolation(
                "client did not complete startup and authentication within "
                f"limits.client_login_timeout ({self.sidecar.config.limits.client_login_timeout:g}s)"
            )
        )

    async def _negotiate(self) -> m.StartupPacket | None:
        """Read startup packets until a StartupMessage; None when the connection was a cancel."""
        ssl_done = gss_done = False
        while True:
            startup = await self._read_startup()
            # Each encryption request is answered once, as PostgreSQL does (a GSSENCRequest only
            # until SSL is on); another one is a protocol version no server speaks.
            if startup.code == m.SSL_REQUEST_CODE and not ssl_done:
                ssl_done = True
                gss_done = await self._answer_ssl_request() or gss_done
                continue
            if startup.code == m.GSSENC_REQUEST_CODE and not gss_done:
                gss_done = True
                self._send(b"N")
                continue
            if startup.code in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE):
                raise FeatureNotSupported(
                    f"unsupported frontend protocol {startup.major}.{startup.minor}: "
                    "server supports 3.0 to 3.0"
                )
            if startup.code == m.CANCEL_REQUEST_CODE:
                assert startup.cancel_key is not None
                await self.sidecar.forward_cancel(startup.cancel_key, self.id)
                self.close("cancel request handled")
                return None
            if startup.major != 3:
                raise ProtocolViolation(
                    f"unsupported frontend protocol {startup.major}.{startup.minor}: "
                    "pgsidecar speaks protocol 3.0"
                )
            unsupported = sorted(k for k in startup.params if k.startswith("_pq_."))
            if startup.minor > 0 or unsupported:
                # Newer minor versions and protocol extensions are declined; the client continues
                # with 3.0 (libpq >= 17 and others handle this message).
                self._send(m.negotiate_protocol_version(0, unsupported))
            return startup

    async def _answer_ssl_request(self) -> bool:
        """Answer an SSLRequest; True if the connection is now encrypted."""
        ctx = self.sidecar.client_ssl_context
        if ctx is None or self.transport is None:
            self._send(b"N")
            return False
        if self._reader.take_rest():
            # Bytes after SSLRequest but before the handshake would be unencrypted injection.
            raise ProtocolViolation("received unencrypted data after SSLRequest")
        self._send(b"S")
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, ctx, server_side=True)
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        return True

    async def _authenticate(self, startup: m.StartupPacket) -> None:
        params = startup.params
        self.user = params.get("user", "")
        if not self.user:
            raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
        self.database = params.get("database") or self.user
        self.startup_params = {
            k: v for k, v in params.items() if k not in ("user", "database") and not k.startswith("_pq_.")
        }
        logs.event(
            "client_login",
            conn=self.id,
            peer=self.peer,
            user=self.user,
            database=self.database,
            application_name=params.get("application_name"),
        )
        self.sidecar.admit(self)
        self._counted = True
        auth_cfg = self.sidecar.config.auth
        user_cfg = auth_cfg.user(self.user)
        mock = None
        if user_cfg is None and auth_cfg.method in ("md5", "scram-sha-256"):
            # Not configured: a password exchange all the same, failing as a wrong password does.
            mock = self.sidecar.mock_salt(self.user)
        elif user_cfg is None and auth_cfg.users and auth_cfg.method != "passthrough":
            raise UnknownUser(f'role "{self.user}" is not configured in pgsidecar (auth.users)')
        secret = user_cfg.password.get_secret_value() if user_cfg and user_cfg.password else None
        authenticator = ClientAuthenticator(
            auth_cfg.method, self.user, secret, self.sidecar.scram_verifier(self.user, secret), mock
        )
        first = authenticator.start()
        if first:
            self._send(first)
        while not authenticator.done:
            type_byte, body = await self._read_message()
            reply = authenticator.step(type_byte, body)
            if reply is not None:
                self._send(reply)
        self._password = authenticator.password if auth_cfg.method == "passthrough" else None

    async def _attach_server(self) -> None:
        if self.database == ADMIN_DATABASE:
            # Served by the sidecar itself: no pool, no upstream, and not held by the gate (an
            # operator must be able to RESUME a paused sidecar).
            console = self._admin(self, self._read_message, self._send)
            await console.login(self._password)
            self._to(ADMIN)
            self.sidecar.stats.clients_accepted += 1
            self.close(await console.serve(self._register_backend_key()))
            return
        self._to(CONNECTING)
        pool = self.sidecar.pool_for(self.user, self.database)
        self.pool = pool
        passthrough = self.sidecar.config.auth.method == "passthrough"
        if passthrough and not self.sidecar.passthrough_known(self.user, self._password):
            await self._verify_upstream_password()
        try:
            server = await self._acquire(pool)
        except SpoolNow:
            self._degraded_login()
            return
        if self.state == CLOSED:  # the client gave up while we waited
            pool.release(server, reset=not self.transaction_mode)
            return
        self.server = server
        try:
            await self._apply_startup_settings(server)
        except ProxyError:
            self.server = None
            pool.release(server, reset=not self.transaction_mode)
            raise
        if passthrough:
            self.sidecar.passthrough_verified(self.user, self._password)
        if self.sidecar.spooling is not None:
            self.sidecar.spooling.note_login(self.user, self.database, self._password)
        first_backend = server.backend_key
        own_pid = first_backend[0] if first_backend is not None and not self.transaction_mode else None
        self._logged_in(server.params, own_pid)
        logs.event(
            "client_ready",
            conn=self.id,
            server=server.id,
            upstream=str(server.endpoint),
            mode=self.sidecar.config.pool.mode,
            ms=round((monotonic() - self.connected_at) * 1000, 1),
        )
        if self.transaction_mode:
            # The server only served the login; each transaction gets one from the pool.
            self.server = None
            pool.release(server, reset=False)
            self._relay.hold()
        else:
            self._link(server)
        self._hand_over_input()

    def _hand_over_input(self) -> None:
        """Logged in: what the client sent past the handshake goes the way of any later input,
        and reading (paused at the handshake's bound) goes on under that path's bounds."""
        rest = self._reader.take_rest()
        if rest:
            self.data_received(rest)
        if self.state == OUTAGE:
            if self._task is None:  # (else the spool write under way answers the rest)
                self._answer_outage_input()
        elif self._active() and self._relay.buffered <= _HOLD_LIMIT:
            self._resume_reading()

    def _degraded_login(self) -> None:
        """No writer anywhere: finish the login from the front-door cache (what a server of this
        user and database reported the last time one was up), then serve from the spool."""
        spooling = self.sidecar.spooling
        assert spooling is not None
        params = spooling.frontdoor.startup_parameters(self.user, self.database, self.startup_params)
        if params is None:
            raise CannotConnectNow(
                f'no writable database, and user "{self.user}" database "{self.database}" was never '
                "seen while one was up, so pgsidecar cannot stand in for it: "
                f"{self.sidecar.topology.problem}"
            )
        self._take_startup_settings()
        self._logged_in(params)
        logs.event("client_ready", conn=self.id, upstream=None, mode="outage (spooling)")
        self._relay.hold()
        self._enter_outage()
        self._hand_over_input()

    async def _verify_upstream_password(self) -> None:
        """Passthrough: the password is right exactly when PostgreSQL accepts it."""
        writer = await self.sidecar.topology.wait_for_writer(self.sidecar.config.upstream.connect_timeout)
        params = {"user": self.user, "database": self.database, "application_name": "pgsidecar-auth"}
        probe = await self.sidecar.open_server(writer, params, self._password)
        probe.close("passthrough password verified")

    def _take_startup_settings(self) -> None:
        """The client's startup parameters (and `options`) are its session's settings."""
        wanted = {k: v for k, v in self.startup_params.items() if k not in _NOT_SETTABLE}
        if "options" in self.startup_params:
            wanted.update(parse_options(self.startup_params["options"]))
        self.startup_settings = lower_keys(wanted)
        self.settings = dict(self.startup_settings)

    def _logged_in(self, params: dict[str, str], pid: int | None = None) -> None:
        """Tell the client it is in: AuthenticationOk, the server's parameters, our key, ready.
        `pid`: the process id to hand out (session mode: its first server's)."""
        self._send(
            m.frames(
                [
                    m.auth_ok(),
                    *(m.parameter_status(k, v) for k, v in params.items()),
                    self._register_backend_key(pid),
                    m.ready_for_query(m.TX_IDLE),
                ]
            )
        )
        self.params_told = params
        self._to(IDLE)  # then LINKED (session mode), OUTAGE (a login during an outage) or IDLE
        self.sidecar.stats.clients_accepted += 1

    async def _apply_startup_settings(self, server: ServerConnection) -> None:
        """Make the pooled server match the client's startup parameters, in one round trip."""
        self._take_startup_settings()
        sql = sync_sql(self.settings, server.applied)
        if sql is not None:
            await server.simple_query(sql)
        server.applied = dict(self.settings)

    def _register_backend_key(self, pid: int | None = None) -> bytes:
        """The BackendKeyData for this session, registered for CancelRequests under its secret.
        `pid`: the process id to show (None: a made-up one that names no real process)."""
        keys = self.sidecar.cancel_keys
        while True:
            # One read of the system CSPRNG (what `secrets` draws on) for both halves, where two
            # secrets.randbits calls cost two trips through random.SystemRandom's Python code.
            drawn, secret = _KEY_PARTS.unpack(urandom(8))
            if secret not in keys:
                break
        if pid is None:
            pid = _MADE_UP_PIDS + (drawn & 0x7FFFFFFF) % ((1 << 31) - _MADE_UP_PIDS)
        self.backend_key = (pid, secret)
        keys[secret] = self
        return m.backend_key_data(pid, secret)
