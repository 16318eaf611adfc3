"""Pool: the server connections for one (user, database), shared by that pair's clients.

A connection is in exactly one of `idle`, `parked`, `active` or `resetting` (or being opened,
counted by `connecting`); `size` bounds their sum. Every change of place goes through `_move`,
which also checks that the server's `ServerState` fits its new place (ARCHITECTURE.md, Server
connections and the pool). Waiters are served first come, first served: a
released connection is handed straight to the oldest waiter rather than put back where a newcomer
could take it.

Parked (transaction mode): a server whose client finished a transaction while nobody waited stays
with that client, at rest, so the client's next transaction starts without a checkout. It is idle
in every sense that matters: counted as idle, and taken back from the client the moment another
client needs a server and none is idle (`_reclaim`), before any new connection is opened, so the
pool grows only with the transactions that really run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from . import logs
from .protocol.sqlstate import SERVER_GONE_STATES, ProxyError, TooManyClients, UpstreamUnavailable
from .server import ServerConnection, ServerState, UpstreamError, clock
from .statements import ServerStatements
from .topology import TopologyMonitor
from .writer import WriterCell

if TYPE_CHECKING:
    from sidecar_config import Endpoint

# Where a server is in its pool. NOWHERE: not (yet, or any more) in it: being opened, or closed.
NOWHERE: Final = 0
IDLE: Final = 1  # in `idle`: at rest, detached, ready for any client
ACTIVE: Final = 2  # in `active`: handed to a client (linked, or about to be)
PARKED: Final = 3  # in `parked`: at rest, still linked to the client that used it last
RESETTING: Final = 4  # in `resetting`: running the reset query, a resync or a liveness check
PLACE_NAMES: Final = ("nowhere", "idle", "active", "parked", "resetting")

# The moves `_move` allows, as (from places, server states allowed in the new place), by new place.
# A server is detached (IDLE) whenever the pool holds it at rest or works on it itself; a parked
# one is still linked (ACTIVE) to its client; an active one is linked or about to be.
_MOVES: Final[tuple[tuple[tuple[int, ...], tuple[ServerState, ...]], ...]] = (
    ((NOWHERE, IDLE, ACTIVE, PARKED, RESETTING), ()),  # to NOWHERE: from anywhere, in any state
    ((NOWHERE, ACTIVE, PARKED, RESETTING), (ServerState.IDLE,)),  # to IDLE
    ((NOWHERE, IDLE, ACTIVE, PARKED, RESETTING), (ServerState.IDLE, ServerState.ACTIVE)),  # to ACTIVE
    ((ACTIVE,), (ServerState.ACTIVE,)),  # to PARKED
    ((IDLE, ACTIVE, PARKED), (ServerState.IDLE,)),  # to RESETTING
)


class IllegalMove(Exception):
    """A server was moved between pool places in a way the pool's rules do not allow: a bug."""


class WriterChanged(UpstreamUnavailable):
    """The writer a login was meant for was lost or replaced meanwhile: the caller goes back to
    the failover gate (held, then the new writer) instead of failing its client."""


class Parker(Protocol):
    """The client a parked server stays with."""

    def give_back(self, server: ServerConnection) -> None:
        """Unlink `server` and hand it to `Pool.release` (another client needs it)."""


Opener = Callable[["Endpoint", dict[str, str], "str | None"], Awaitable[ServerConnection]]


@dataclass(frozen=True)
class PoolSettings:
    size: int
    checkout_timeout: float
    reset_query: str
    server_lifetime: float
    server_idle_timeout: float
    server_check_after_idle: float
    connect_timeout: float
    max_prepared_statements: int
    min_idle: int = 0
    max_concurrent_connects: int = 4


class Pool:
    def __init__(
        self,
        user: str,
        database: str,
        settings: PoolSettings,
        topology: TopologyMonitor,
        opener: Opener,
        replica: Endpoint | None = None,
    ) -> None:
        self.user = user
        self.database = database
        self.settings = settings
        self.idle: deque[ServerConnection] = deque()  # reset and ready; newest at the right
        self.active: set[ServerConnection] = set()  # linked to a client
        # At rest but still linked to the client that used it last, oldest first (see above).
        self.parked: dict[ServerConnection, Parker] = {}
        self.resetting: set[ServerConnection] = set()  # running the reset query after release
        self._places: dict[ServerConnection, int] = {}  # where each server is (absent: NOWHERE)
        self.connecting = 0  # logins in progress
        self.waiters: deque[asyncio.Future[ServerConnection | None]] = deque()
        self._topology = topology
        # The one endpoint this pool's servers may be connected to, read natively at every
        # checkout (compiled): the writer as the monitor publishes it, or for a replica pool
        # (`replica`) a cell of its own holding that replica, emptied when it is retired.
        self.replica = replica
        if replica is None:
            self._writer = topology.published
        else:
            cell = WriterCell()
            cell.writer = replica
            self._writer = cell
        self.retired: str | None = None  # why a replica pool no longer hands out servers
        self._open = opener
        self._tasks: set[asyncio.Task[None]] = set()
        self._connect_slots = asyncio.Semaphore(settings.max_concurrent_connects)
        self._housekeeper: asyncio.Task[None] | None = None
        # The password new connections log in with (passthrough: the last one PostgreSQL accepted).
        self._password: str | None = None

    @property
    def known_password(self) -> str | None:
        """The password this pool logs in with (passthrough: the last one PostgreSQL accepted)."""
        return self._password

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.parked) + len(self.active) + len(self.resetting) + self.connecting

    def place_of(self, server: ServerConnection) -> int:
        """Where `server` is (NOWHERE, IDLE, ACTIVE, PARKED or RESETTING)."""
        return self._places.get(server, NOWHERE)

    def _move(self, server: ServerConnection, to: int, client: Parker | None = None) -> None:
        """Move `server` to place `to` (`client`: the one it stays with, for PARKED): the only
        code that changes the pool's lists. Raises IllegalMove if the rules do not allow the
        move from where the server is, or its state does not fit the new place."""
        places = self._places
        frm = places.get(server, NOWHERE)
        allowed_from, states = _MOVES[to]
        if frm not in allowed_from or (to != NOWHERE and server.state not in states):
            raise IllegalMove(
                f"server {server.id}: {PLACE_NAMES[frm]} -> {PLACE_NAMES[to]} "
                f"is not a move the pool makes (server state {server.state.value})"
            )
        if frm == IDLE:
            idle = self.idle
            if idle and idle[-1] is server:  # the common case: the newest is taken
                idle.pop()
            else:
                idle.remove(server)
        elif frm == ACTIVE:
            self.active.discard(server)
        elif frm == PARKED:
            del self.parked[server]
        elif frm == RESETTING:
            self.resetting.discard(server)
        if to == NOWHERE:
            places.pop(server, None)
            return
        places[server] = to
        if to == IDLE:
            self.idle.append(server)
        elif to == ACTIVE:
            self.active.add(server)
        elif to == PARKED:
            assert client is not None
            self.parked[server] = client
        else:
            self.resetting.add(server)

    def park(self, server: ServerConnection, client: Parker) -> bool:
        """Let `client` keep `server` between transactions; False if another client waits for one
        (then the caller releases it). The caller made sure the server is at rest."""
        if self.waiters:
            return False
        self._move(server, PARKED, client)
        server.last_used = clock()
        return True

    def unpark(self, server: ServerConnection) -> bool:
        """The parked server's client starts a transaction on it: True if it still may (else the
        client gives it back and is served like any other)."""
        now = clock()
        if (
            self._usable(server, now, ServerState.ACTIVE) is not None  # (still linked to it)
            or now - server.last_used > self.settings.server_check_after_idle
        ):
            return False
        self._move(server, ACTIVE)
        return True

    def _reclaim(self) -> bool:
        """Take the longest-parked server back from its client into `idle` (or to a waiter)."""
        for server, client in self.parked.items():
            client.give_back(server)  # which calls `release`
            return True
        return False

    def _usable(
        self, server: ServerConnection, now: float, state: ServerState = ServerState.IDLE
    ) -> str | None:
        """Why `server` (in `state`) must not be handed out, or None if it may."""
        if server.state is not state or server.transport is None:
            return server.close_reason or "connection closed"
        writer = self._writer.writer
        if server.endpoint is not writer and server.endpoint != writer:  # `is`: the common case, cheaply
            role = "writer" if self.replica is None else "replica in use"
            return f"{server.endpoint} is no longer the {role}"
        if now - server.created_at > self.settings.server_lifetime:
            return "server_lifetime reached"
        if now - server.last_used > self.settings.server_idle_timeout:
            return "server_idle_timeout reached"
        return None

    async def acquire(self, password: str | None) -> ServerConnection:
        """A logged-in server connection to the writer, waiting up to `checkout_timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.checkout_timeout
        while True:
            server = await self._take_idle()
            if server is not None:
                return server
            if self._reclaim():
                continue  # a kept server rather than a new connection: the database's are scarce
            if self.total < self.settings.size:
                return await self._open_new(password)
            waiter: asyncio.Future[ServerConnection | None] = loop.create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    handed = await waiter
            except TimeoutError:
                raise TooManyClients(
                    f'no server connection for user "{self.user}" database "{self.database}" '
                    f"became free within pool.checkout_timeout ({self.settings.checkout_timeout:g}s); "
                    f"all {self.settings.size} (pool.size) are in use"
                ) from None
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled() and sys.exc_info()[0] is not None:
                    # Handed a connection just as we gave up: put it back rather than leak it.
                    lost = waiter.result()
                    if lost is not None:
                        self._rest(lost)
            if handed is not None:
                return handed  # `_wake_one` already counted it as active
            # None: capacity freed up (a connection was dropped); loop to open one.

    def take_idle_now(self) -> ServerConnection | None:
        """An idle server that needs no liveness check, or None (then use `acquire`)."""
        if self.waiters:
            return None  # first come, first served: waiters go first
        if not self.idle and (not self._reclaim() or not self.idle):
            return None  # (a new connection is `acquire`'s to open)
        server = self.idle[-1]
        now = clock()
        if (
            self._usable(server, now) is not None
            or now - server.last_used > self.settings.server_check_after_idle
        ):
            return None
        self._move(server, ACTIVE)
        return server

    async def _take_idle(self) -> ServerConnection | None:
        now = clock()
        while self.idle:
            server = self.idle[-1]
            why = self._usable(server, now)
            if why is None and now - server.last_used > self.settings.server_check_after_idle:
                self._move(server, RESETTING)
                why = await self._check_alive(server)
                if why is None and self.place_of(server) != RESETTING:
                    continue  # closed (and dropped) just as the check ended
            if why is not None:
                self._drop(server, why)
                continue
            self._move(server, ACTIVE)
            return server
        return None

    async def _check_alive(self, server: ServerConnection) -> str | None:
        # A connection idle for long may have been cut by a NAT or a restarted server; find out
        # here (the caller moved it to `resetting` meanwhile) rather than fail the client's first
        # query on it.
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await server.simple_query("SELECT 1")
            return None
        except (ProxyError, TimeoutError) as exc:
            return f"liveness check failed: {exc}"

    async def _open_new(self, password: str | None, for_idle: bool = False) -> ServerConnection:
        self.connecting += 1
        if password is not None:
            self._password = password
        try:
            # A burst of clients (or a reconnect storm after failover) must not become a burst of
            # simultaneous logins against a database that is just coming up.
            async with self._connect_slots:
                if self.replica is None:
                    server = await self._open_on_writer(password)
                else:
                    server = await self._open_on_replica(self.replica, password)
        except BaseException:
            self.connecting -= 1
            self._wake_one(None)  # the slot this login held is free again
            raise
        self.connecting -= 1
        server.on_close(self._closed)
        server.statements = ServerStatements(self.settings.max_prepared_statements)
        if for_idle:
            self._rest(server)
        else:
            self._move(server, ACTIVE)
        return server

    async def _open_on_writer(self, password: str | None) -> ServerConnection:
        """Log in to the writer. A crashed writer refuses (or a partitioned one never answers)
        before the probes have noticed: such a failure is checked with a fresh probe, and if the
        writer is gone it becomes WriterChanged, so the client is held rather than failed."""
        topology = self._topology
        writer = await topology.wait_for_writer(self.settings.connect_timeout)
        params = {"user": self.user, "database": self.database}
        opening = asyncio.ensure_future(self._open(writer, params, password))
        # No await while an exception is being handled (in an except or finally block): compiled
        # by mypyc, such an await can leave the exception behind to be raised again later
        # (proxy/compiled.py). So failures are caught, the login is wound down, then they go on.
        interrupted: BaseException | None = None
        try:
            while not opening.done():
                changed = asyncio.ensure_future(topology.writer_changed())
                try:
                    await asyncio.wait({opening, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if not opening.done() and topology.writer != writer:
                    raise WriterChanged(f"the writer {writer} was lost while logging in to it")
        except BaseException as exc:  # that, or this request's own cancellation
            interrupted = exc
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
        if interrupted is not None:
            raise interrupted
        try:
            return opening.result()
        except (UpstreamUnavailable, UpstreamError) as exc:
            if isinstance(exc, UpstreamError) and exc.code not in SERVER_GONE_STATES:
                raise  # e.g. a wrong password or too many connections: the writer is fine
            failure = exc
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.connect_timeout):
                await topology.confirm_writer(writer, failure.message)
        if topology.writer == writer:
            raise failure  # a fresh probe still finds it the writer: the failure is real
        raise WriterChanged(f"{writer} failed and is no longer the writer: {failure.message}") from failure

    async def _open_on_replica(self, replica: Endpoint, password: str | None) -> ServerConnection:
        """Log in to the replica, and make sure it is one: a server that has left recovery
        (promoted) is never handed out from a replica pool, so nothing meant for a replica writes
        through it. One round trip, per new server only. A failure is reported to the monitor,
        which skips the replica until a probe has looked again."""
        if self.retired is not None or self._writer.writer is None:
            raise UpstreamUnavailable(f"replica {replica} is not used for reads: {self.retired}")
        params = {"user": self.user, "database": self.database}
        failure: ProxyError | None = None
        server: ServerConnection | None = None
        try:
            server = await self._open(replica, params, password)
            answer = await server.simple_query("SELECT pg_is_in_recovery()")
            if not answer.rows or answer.rows[0][0] != "t":
                failure = UpstreamUnavailable(f"{replica} is no longer a replica (not in recovery)")
        except UpstreamError as exc:
            if exc.code not in SERVER_GONE_STATES:
                raise  # a wrong password or too many connections: the replica is fine
            failure = exc
        except UpstreamUnavailable as exc:
            failure = exc
        if failure is not None:
            if server is not None:
                server.close(failure.message)
            self._topology.report_replica_failure(replica, failure.message)
            raise failure
        assert server is not None
        return server

    def retire(self, reason: str) -> None:
        """A replica pool whose replica left the topology, became unreachable or was promoted:
        no server is handed out again (those in use are closed when released); idle ones close now."""
        if self.replica is None:
            raise ValueError("the writer pool is never retired")
        self.retired = reason
        self._writer.writer = None
        for server in [*self.idle, *self.resetting]:
            self._drop(server, reason)
        for server, client in list(self.parked.items()):
            client.give_back(server)  # released, then closed: no longer usable
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            self._housekeeper = None
        while self._wake_one(None):
            pass  # waiters loop, find the pool retired and fail (the caller picks another server)

    def start_housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        self._housekeeper = loop.create_task(self._housekeep(), name=f"pool-{self.user}-{self.database}")

    async def _housekeep(self) -> None:
        """Close idle connections past server_idle_timeout / server_lifetime; keep min_idle open."""
        interval = max(
            0.05, min(1.0, self.settings.server_idle_timeout / 4, self.settings.server_lifetime / 4)
        )
        while True:
            await asyncio.sleep(interval)
            now = clock()
            for server in list(self.idle):
                why = self._usable(server, now)
                if why is not None:
                    self._drop(server, why)
            for server, client in list(self.parked.items()):
                # Parked long enough to need a liveness check, or past its lifetime: into the
                # idle list, where those rules are applied.
                if (
                    now - server.last_used
                    > min(self.settings.server_check_after_idle, self.settings.server_idle_timeout)
                    or now - server.created_at > self.settings.server_lifetime
                ):
                    client.give_back(server)
            idle = len(self.idle) + len(self.parked)
            missing = min(self.settings.min_idle - idle, self.settings.size - self.total)
            if missing > 0 and self._writer.writer is not None:
                results = await asyncio.gather(
                    *(self._open_new(self._password, for_idle=True) for _ in range(missing)),
                    return_exceptions=True,
                )
                for result in results:
                    if isinstance(result, BaseException) and not isinstance(result, ProxyError):
                        logs.event("pool_refill_failed", logs.WARNING, error=repr(result))

    def release(
        self, server: ServerConnection, reset: bool = True, resync: bool = False, unknown: bool = False
    ) -> None:
        """Take a server back from a client: reuse it once it is in step, else close it.

        `reset` (session mode) runs `reset_query` first; transaction mode hands the server on as is,
        keeping its prepared statements and settings (the next client's are applied over them).
        `resync`: the client may have left an extended-protocol batch open (messages with no Sync
        yet, or an error the server skips to the next Sync from). `unknown` (transaction mode):
        the client changed session state the sidecar has not read back yet (its maintenance did
        not run), so the server's settings are not what `applied` says.

        The rules. A server goes to another client only at a message boundary both ways, with its
        last Query or Sync answered and every answer read, so the next client's first answer is
        its own. Nothing here costs the data path anything: the client and the server already
        track each condition, and it is looked at only now.
        * Closed, inside a transaction block, a Query or Sync of the client's unanswered (it may
          run for long; closing cancels it), or part of a server message relayed: close it.
          (Part of a client message relayed, a CopyData cut short, is the client's to close with
          `discard`: the server would read whatever it is sent next as the rest of that message.)
        * Answers owed to the sidecar's own queries (given up when their client left during its
          login or maintenance) or to the client's open batch (`resync`, or answers of its
          unsynced messages still coming): put back in step before anything else runs (RESYNC,
          answered by a ReadyForQuery; everything before it is read and dropped), bounded by
          `connect_timeout`, then closed if it is not idle.
        * Then session mode runs `reset_query` (in the same write as the RESYNC, so no extra
          round trip); transaction mode runs DISCARD ALL if `unknown` or a query of the sidecar's
          own was given up (its effect on the settings is unknown), else nothing.
        Only then is the server idle (or handed to a waiter), with its ParameterStatus values as
        the reset left them, which is what the next client is told.
        """
        # A parked server has been idle since it was parked: keep that time (liveness check,
        # idle timeout).
        idle_since = server.last_used if self.place_of(server) == PARKED else None
        if server.client is not None or server.state is ServerState.ACTIVE:
            server.unlink()  # (a transaction-mode client unlinks it itself before handing it back)
        why = server.unrecoverable
        if why is None and not server.settle():
            why = "unexpected output from the server between transactions"
        if why is None:
            why = self._usable(server, clock())
        if why is not None:
            self._drop(server, why)
            return
        resync = resync or not server.at_rest  # (now: answers still owed to someone)
        sql: str | None = None
        if reset and self.settings.reset_query.strip():
            sql = self.settings.reset_query
        elif unknown or server.owed_own:
            sql = "DISCARD ALL"
        if sql is None and not resync:
            server.last_used = clock() if idle_since is None else idle_since
            self._rest(server)
            return
        self._move(server, RESETTING)
        task = asyncio.get_running_loop().create_task(self._reset(server, sql, resync, reset))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def discard(self, server: ServerConnection, reason: str) -> None:
        """Close a client's server that cannot be put back in step (see `release`)."""
        if server.client is not None or server.state is ServerState.ACTIVE:
            server.unlink()
        self._drop(server, reason)

    async def _reset(self, server: ServerConnection, sql: str | None, resync: bool, session: bool) -> None:
        # A timer, not asyncio.timeout(): that context manager runs as interpreted coroutines,
        # about 25k instructions per reset, and session mode resets at every client's exit.
        # On expiry the server is dropped, which ends the pending read with UpstreamUnavailable.
        what = "resync" if sql is None else "reset query"
        deadline = asyncio.get_running_loop().call_later(
            self.settings.connect_timeout, self._reset_timed_out, server, what
        )
        try:
            if sql is None:
                await server.resync()
            else:
                await server.simple_query(sql, resync=resync)
        except ProxyError as exc:
            if self.place_of(server) == RESETTING:  # not dropped by the deadline already
                self._drop(server, f"{what} failed: {exc}")
            return
        finally:
            deadline.cancel()
        if self.place_of(server) != RESETTING:
            return  # dropped meanwhile (closed just as the answer came)
        server.tracker.clear()
        if not server.at_rest:
            # e.g. the client's unsynced batch had opened a transaction block: it is aborted now,
            # but still open.
            self._drop(server, "not idle after the client left mid-batch")
            return
        if sql is not None:
            # DISCARD ALL (the default reset) leaves the server as it was after login.
            server.applied = {}
            server.marker_prepared = False  # (whatever the reset query, to be safe)
            server.held_notifications.clear()  # (the previous client's)
            if not session:
                server.statements.replace_all(set())
                server.unnamed_from = None
        server.last_used = clock()
        self._rest(server)

    def _reset_timed_out(self, server: ServerConnection, what: str) -> None:
        self._drop(server, f"{what} failed: no answer within {self.settings.connect_timeout:g}s")

    def _rest(self, server: ServerConnection) -> None:
        """`server` is back in step: to the oldest waiter, else idle."""
        if server.state is not ServerState.IDLE:  # closed meanwhile (one a waiter gave up on)
            self._drop(server, server.close_reason or "server closed the connection")
        elif not self._wake_one(server):
            self._move(server, IDLE)

    def _wake_one(self, server: ServerConnection | None) -> bool:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                if server is not None:
                    self._move(server, ACTIVE)
                waiter.set_result(server)
                return True
        return False

    def forget(self, server: ServerConnection) -> None:
        """A client's server closed under it: no longer counted."""
        self._move(server, NOWHERE)

    def _drop(self, server: ServerConnection, reason: str) -> None:
        logs.event("server_closed", server=server.id, upstream=str(server.endpoint), reason=reason)
        self._move(server, NOWHERE)
        server.close(reason)
        self._wake_one(None)

    def _closed(self, server: ServerConnection) -> None:
        # The server went away on its own (idle in the pool, or mid-session).
        if self.place_of(server) in (IDLE, RESETTING):
            self._drop(server, server.close_reason or "server closed the connection")

    def resize(self, settings: PoolSettings) -> None:
        """New settings (a reload). Grown: clients waiting on a full pool are woken, each to open
        a connection in the room just made. Shrunk: surplus idle (and parked) connections close
        now; busy ones retire through server_idle_timeout."""
        grown = settings.size - self.settings.size
        self.settings = settings
        for _ in range(grown):
            if not self._wake_one(None):
                break
        while self.total > settings.size and (self.idle or self.parked):
            if not self.idle:
                self._reclaim()
                continue
            self._drop(self.idle[0], "pool.size reduced by reload")

    def drop_endpoint(self, endpoint: Endpoint, reason: str) -> None:
        """Close every idle connection to `endpoint` (active ones are cut by their clients)."""
        for server in [s for s in (*self.idle, *self.resetting) if s.endpoint == endpoint]:
            self._drop(server, reason)

    def close_all(self, reason: str) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
        for server in [*self.idle, *self.resetting, *self.active, *self.parked]:
            self._move(server, NOWHERE)
            server.close(reason)
