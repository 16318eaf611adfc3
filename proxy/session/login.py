"""Login: SSL/GSS negotiation, the startup packet, authentication, cancel requests and keys,
the first server (or the admin console, or an outage login), bounded by
`limits.client_login_timeout`.

Uses of the core: its identity fields (user, database, startup parameters and settings, backend
key, password), its transport, state and transition, `link`, `send`. Receives at construction:
the host (what a login asks of the process: admission, authentication, cancel keys, pools, the
writer), the admin console factory, the `Attach` part (the first server, through the gate) and
the outage session (a login while no writer exists), if spooling is on. Offers: `run` (the
handshake task), and the reading of whole messages until the session is logged in, which the
admin console goes on using (`feed`, `wake`, `read_message`).
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable
from os import urandom
from time import monotonic  # by name: compiled, `time.monotonic` is a module getattr per call
from typing import Any, Final, cast

from .. import logs
from ..outcome_answer import pool_key
from ..protocol import messages as m
from ..protocol.auth import ClientAuthenticator
from ..protocol.framing import MessageReader
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
from .attach import READS_BALANCE, Attach
from .core import SessionCore
from .host import ADMIN_DATABASE, AdminFactory, SessionHost
from .outage_session import OutageSession
from .scan import _HOLD_LIMIT, _KEY_PARTS, _MADE_UP_PIDS
from .states import (
    ADMIN,
    CLOSED,
    CONNECTING,
    IDLE,
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


class Login:
    def __init__(
        self,
        core: SessionCore,
        host: SessionHost[Any],
        admin: AdminFactory[Any],
        attach: Attach,
        outage: OutageSession | None,
    ) -> None:
        self.core = core
        self.host = host
        self._admin = admin  # makes the admin console for a login to ADMIN_DATABASE
        self.attach = attach
        self.outage = outage
        self.reader = MessageReader(core.max_message)
        self._wakeup: asyncio.Future[None] | None = None
        self._eof = False

    def feed(self, data: bytes) -> None:
        """Input while the handshake, a login waiting for a server or the admin console reads
        whole messages when it is ready for them. Past the bound, stop reading the socket until it
        is (`_wait_input`): what the client sends meanwhile waits in its own socket buffers."""
        reader = self.reader
        reader.feed(data)
        if reader.buffered > _HOLD_LIMIT:
            self.core.pause_reading()
        self.wake()

    def eof(self) -> None:
        self._eof = True
        self.wake()

    def wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _wait_input(self) -> None:
        if self._eof or self.core.transport is None:
            raise ConnectionResetError("client disconnected during login")
        self.core.resume_reading()  # no whole message is left: read on (the message is bounded)
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def _read_startup(self) -> m.StartupPacket:
        while True:
            body = self.reader.read_startup()
            if body is not None:
                return m.decode_startup(body)
            await self._wait_input()

    async def read_message(self) -> tuple[int, bytes]:
        while True:
            msg = self.reader.read_message()
            if msg is not None:
                return msg
            await self._wait_input()

    async def run(self, hand_over: Callable[[], None]) -> None:
        """The login, from the first byte to the first ReadyForQuery; then `hand_over` (what the
        client sent past the handshake goes the way of any later input)."""
        core = self.core
        # A timer, not asyncio.timeout(): that context manager runs as interpreted coroutines,
        # about 25k instructions per login, which connect-per-transaction clients pay every time.
        # On expiry the client is failed and closed, which cancels this task.
        deadline = asyncio.get_running_loop().call_later(
            self.host.config.limits.client_login_timeout, self._login_timed_out
        )
        try:
            try:
                startup = await self._negotiate()
                if startup is None:
                    return
                await self._authenticate(startup)
                self.reader.authenticated()
            finally:
                deadline.cancel()
            if await self._attach_server():
                hand_over()
        except ProxyError as exc:
            core.fail(exc)
        except ConnectionResetError as exc:
            core.close(str(exc))
        except Exception as exc:  # a bug here must cost one client, not the sidecar
            logs.event("client_internal_error", logs.ERROR, conn=core.id, error=repr(exc))
            core.fail(ProxyError(f"internal error in pgsidecar: {exc!r}"))

    def _login_timed_out(self) -> None:
        self.core.fail(
            ProtocolViolation(
                "client did not complete startup and authentication within "
                f"limits.client_login_timeout ({self.host.config.limits.client_login_timeout:g}s)"
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
                self.core.send(b"N")
                continue
            if startup.code in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE):
                raise FeatureNotSupported(
                    f"unsupported frontend protocol {startup.major}.{startup.minor}: "
                    "server supports 3.0 to 3.0"
                )
            if startup.code == m.CANCEL_REQUEST_CODE:
                assert startup.cancel_key is not None
                await self.host.forward_cancel(startup.cancel_key, self.core.id)
                self.core.close("cancel request handled")
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
                self.core.send(m.negotiate_protocol_version(0, unsupported))
            return startup

    async def _answer_ssl_request(self) -> bool:
        """Answer an SSLRequest; True if the connection is now encrypted."""
        core = self.core
        ctx = self.host.client_ssl_context
        if ctx is None or core.transport is None:
            self.core.send(b"N")
            return False
        if self.reader.take_rest():
            # Bytes after SSLRequest but before the handshake would be unencrypted injection.
            raise ProtocolViolation("received unencrypted data after SSLRequest")
        self.core.send(b"S")
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(core.transport, core, ctx, server_side=True)
        # uvloop's transports implement asyncio.Transport without subclassing it.
        core.transport = cast(asyncio.Transport, transport)
        return True

    async def _authenticate(self, startup: m.StartupPacket) -> None:
        core = self.core
        host = self.host
        params = startup.params
        user = core.user = params.get("user", "")
        if not user:
            raise ProtocolViolation("no PostgreSQL user name specified in startup packet")
        core.database = params.get("database") or user
        core.pool_key = pool_key(user, core.database)
        core.startup_params = {
            k: v for k, v in params.items() if k not in ("user", "database") and not k.startswith("_pq_.")
        }
        logs.event(
            "client_login",
            conn=core.id,
            peer=core.peer,
            user=user,
            database=core.database,
            application_name=params.get("application_name"),
        )
        host.admit(core)
        core.counted = True
        auth_cfg = host.config.auth
        user_cfg = auth_cfg.user(user)
        mock = None
        if user_cfg is None and auth_cfg.method in ("md5", "scram-sha-256"):
            # Not configured: a password exchange all the same, failing as a wrong password does.
            mock = host.mock_salt(user)
        elif user_cfg is None and auth_cfg.users and auth_cfg.method != "passthrough":
            raise UnknownUser(f'role "{user}" is not configured in pgsidecar (auth.users)')
        secret = user_cfg.password.get_secret_value() if user_cfg and user_cfg.password else None
        authenticator = ClientAuthenticator(
            auth_cfg.method, user, secret, host.scram_verifier(user, secret), mock
        )
        first = authenticator.start()
        if first:
            core.send(first)
        while not authenticator.done:
            type_byte, body = await self.read_message()
            reply = authenticator.step(type_byte, body)
            if reply is not None:
                core.send(reply)
        core.password = authenticator.password if auth_cfg.method == "passthrough" else None

    async def _attach_server(self) -> bool:
        """The first server, or the admin console, or an outage login. True: logged in, the
        client's further input to be handed over."""
        core = self.core
        host = self.host
        if core.database == ADMIN_DATABASE:
            # Served by the sidecar itself: no pool, no upstream, and not held by the gate (an
            # operator must be able to RESUME a paused sidecar).
            console = self._admin(core, self.read_message, core.send)
            await console.login(core.password)
            core.to(ADMIN)
            host.stats.clients_accepted += 1
            core.close(await console.serve(self._register_backend_key()))
            return False
        core.to(CONNECTING)
        pool = core.writer_pool = core.pool = host.pool_for(core.user, core.database)
        passthrough = host.config.auth.method == "passthrough"
        if passthrough and not host.passthrough_known(core.user, core.password):
            await self._verify_upstream_password()
        # No writer, and read routing on: the login is served by a replica if one qualifies (the
        # session's read-only work can run there; anything else is held as it would be).
        replica_pool = self.attach.login_pool() if not passthrough else None
        try:
            server: ServerConnection | None = None
            if replica_pool is not None:
                failure: ProxyError | None = None
                try:
                    server = await self.attach.acquire_replica(replica_pool)
                    pool = core.pool = replica_pool
                except ProxyError as exc:
                    failure = exc  # (no await in a handler: ARCHITECTURE.md, compiled data path rule 1)
                if failure is not None:
                    assert replica_pool.replica is not None
                    host.topology.report_replica_failure(replica_pool.replica, failure.message)
            if server is None:
                server = await self.attach.acquire(pool)
        except SpoolNow:
            self._degraded_login()
            return True
        if core.state == CLOSED:  # the client gave up while we waited
            pool.release(server, reset=not core.transaction_mode)
            return False
        core.server = server
        try:
            await self._apply_startup_settings(server)
        except ProxyError:
            core.server = None
            pool.release(server, reset=not core.transaction_mode)
            raise
        if passthrough:
            host.passthrough_verified(core.user, core.password)
        if host.spooling is not None:
            host.spooling.note_login(core.user, core.database, core.password)
        first_backend = server.backend_key
        own_pid = first_backend[0] if first_backend is not None and not core.transaction_mode else None
        self._logged_in(server.params, own_pid)
        logs.event(
            "client_ready",
            conn=core.id,
            server=server.id,
            upstream=str(server.endpoint),
            mode=host.config.pool.mode,
            ms=round((monotonic() - core.connected_at) * 1000, 1),
        )
        if core.transaction_mode:
            # The server only served the login; each transaction gets one from the pool.
            core.server = None
            pool.release(server, reset=False)
            core.relay.hold()
        else:
            core.reroute = self.attach.reads == READS_BALANCE or pool is not core.writer_pool
            core.link(server)
        return True

    def _degraded_login(self) -> None:
        """No writer anywhere: finish the login from the front-door cache (what a server of this
        user and database reported the last time one was up), then serve from the spool."""
        core = self.core
        spooling = self.host.spooling
        outage = self.outage
        assert spooling is not None and outage is not None
        params = spooling.frontdoor.startup_parameters(core.user, core.database, core.startup_params)
        if params is None:
            raise CannotConnectNow(
                f'no writable database, and user "{core.user}" database "{core.database}" was never '
                "seen while one was up, so pgsidecar cannot stand in for it: "
                f"{self.host.topology.problem}"
            )
        self._take_startup_settings()
        self._logged_in(params)
        logs.event("client_ready", conn=core.id, upstream=None, mode="outage (spooling)")
        core.relay.hold()
        outage.enter()

    async def _verify_upstream_password(self) -> None:
        """Passthrough: the password is right exactly when PostgreSQL accepts it."""
        core = self.core
        writer = await self.host.topology.wait_for_writer(self.host.config.upstream.connect_timeout)
        params = {"user": core.user, "database": core.database, "application_name": "pgsidecar-auth"}
        probe = await self.host.open_server(writer, params, core.password)
        probe.close("passthrough password verified")

    def _take_startup_settings(self) -> None:
        """The client's startup parameters (and `options`) are its session's settings."""
        core = self.core
        wanted = {k: v for k, v in core.startup_params.items() if k not in _NOT_SETTABLE}
        if "options" in core.startup_params:
            wanted.update(parse_options(core.startup_params["options"]))
        core.startup_settings = lower_keys(wanted)
        core.settings = dict(core.startup_settings)

    def _logged_in(self, params: dict[str, str], pid: int | None = None) -> None:
        """Tell the client it is in: AuthenticationOk, the server's parameters, our key, ready.
        `pid`: the process id to hand out (session mode: its first server's)."""
        core = self.core
        core.send(
            m.frames(
                [
                    m.auth_ok(),
                    *(m.parameter_status(k, v) for k, v in params.items()),
                    self._register_backend_key(pid),
                    m.ready_for_query(m.TX_IDLE),
                ]
            )
        )
        core.params_told = params
        core.to(IDLE)  # then LINKED (session mode), OUTAGE (a login during an outage) or IDLE
        self.host.stats.clients_accepted += 1

    async def _apply_startup_settings(self, server: ServerConnection) -> None:
        """Make the pooled server match the client's startup parameters, in one round trip."""
        core = self.core
        self._take_startup_settings()
        sql = sync_sql(core.settings, server.applied)
        if sql is not None:
            await server.simple_query(sql)
        server.applied = dict(core.settings)

    def _register_backend_key(self, pid: int | None = None) -> bytes:
        """The BackendKeyData for this session, registered for CancelRequests under its secret.
        `pid`: the process id to show (None: a made-up one that names no real process)."""
        keys = self.host.cancel_keys
        while True:
            # One read of the system CSPRNG (what `secrets` draws on) for both halves, where two
            # secrets.randbits calls cost two trips through random.SystemRandom's Python code.
            drawn, secret = _KEY_PARTS.unpack(urandom(8))
            if secret not in keys:
                break
        if pid is None:
            pid = _MADE_UP_PIDS + (drawn & 0x7FFFFFFF) % ((1 << 31) - _MADE_UP_PIDS)
        self.core.backend_key = (pid, secret)
        keys[secret] = self.core
        return m.backend_key_data(pid, secret)
