"""SpoolService: the sidecar's side of the full-outage spool (ARCHITECTURE.md, Cluster state).

It owns the store, the SQL classifier and the front-door cache, and runs one background loop that
replays whatever is pending whenever a writer is known. `proxy.spool` holds the parts (records,
stores, classifier, responder, replayer); this module wires them to the sidecar's topology,
upstream logins and metrics.

While the cluster is in OUTAGE, sessions that need a server are handed an `OutageResponder`
instead (see `session.outage_session.OutageSession.enter`). In RECOVERING the gate stays closed
for new work until the backlog has drained or `spool.max_drain_hold` has passed; the drain then
moves the cluster to UP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import logs
from .hold import HoldController
from .hold import SpoolNow as SpoolNow  # (importable from here: client.py does)
from .metrics import Stats
from .pool import Pool
from .protocol.sqlstate import ProxyError, UpstreamUnavailable
from .server import ServerConnection
from .spool import SpoolError, SpoolRecord, SpoolStore, open_store
from .spool.classify import Classifier
from .spool.frontdoor import FrontDoorCache, fill_from_server
from .spool.outage import OutageResponder
from .spool.replay import Replayer
from .spool.store import owner_only
from .topology import ClusterState, TopologyMonitor

if TYPE_CHECKING:
    from sidecar_config import Endpoint, SidecarConfig


class SpoolHost(Protocol):
    """What the spool service uses of the process that runs it (the Sidecar)."""

    config: SidecarConfig
    spool_pending: int  # transactions in the store; kept here, shown by metrics and the console

    @property
    def stats(self) -> Stats: ...

    @property
    def topology(self) -> TopologyMonitor: ...

    @property
    def hold(self) -> HoldController: ...

    @property
    def pools(self) -> Mapping[tuple[str, str], Pool]: ...

    async def open_server(
        self, endpoint: Endpoint, params: dict[str, str], password: str | None, timeout: float | None = None
    ) -> ServerConnection: ...

    def release_after_drain_hold(self) -> None: ...


# How often the drain loop looks for work when nothing told it to.
_IDLE_POLL = 1.0
# After a drain stopped on a transient error (the writer is still coming up), wait this long.
_RETRY_AFTER = 0.5
# Refill a (user, database)'s front-door answers when older than this.
_FRONTDOOR_MAX_AGE = 3600.0


def replay_connector(sidecar: SpoolHost) -> Callable[[str, str], Awaitable[ServerConnection]]:
    """How a Replayer logs in, in the sidecar's drain loop and in `pgsidecar spool replay` /
    `init-db` alike: to the writer the topology knows now, as the record's user, like any upstream
    login (TLS, connect timeout, IAM token or configured password). A user whose pool already
    logged in (passthrough) uses the password PostgreSQL accepted there."""

    async def connect(user: str, database: str) -> ServerConnection:
        writer = sidecar.topology.writer
        if writer is None:
            # A ProxyError, as a failed login would be: the Replayer reports it for the record
            # and stops the drain; the next one starts over once a writer is known.
            raise UpstreamUnavailable("no writable upstream")
        pool = sidecar.pools.get((user, database))
        password = pool.known_password if pool is not None else None
        params = {"user": user, "database": database, "application_name": "pgsidecar-replay"}
        return await sidecar.open_server(writer, params, password)

    return connect


def frontdoor_path(spool_path: Path) -> Path:
    """The front-door cache lives next to the spool file (also with the DynamoDB backend: it is
    per sidecar, not shared)."""
    return spool_path.with_name(spool_path.name + ".frontdoor.json")


class SpoolService:
    def __init__(self, sidecar: SpoolHost) -> None:
        self.sidecar = sidecar
        config = sidecar.config.spool
        self.store: SpoolStore | None = None
        self.classifier = Classifier(config.tables)
        self.frontdoor = FrontDoorCache.load(frontdoor_path(config.path))
        owner_only(frontdoor_path(config.path))  # one an older version wrote with the umask's mode
        # The replay lease's owner names this sidecar, not this process: a sidecar restarted after
        # a crash (SIGKILL, OOM) mid-replay takes its own lease back at once, instead of waiting
        # out the dead process's lease (30 s) while RECOVERING holds every new transaction.
        # host + listen address is unique while the process runs: the OS lets only one process
        # listen there (pids are not: a container's sidecar is pid 1 on every restart anyway).
        self.owner = f"{socket.gethostname()}:{sidecar.config.listen}"
        self._connect = replay_connector(sidecar)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fills: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._recovering_since: float | None = None
        self.last_error: str | None = None

    async def start(self) -> None:
        self.store = await open_store(self.sidecar.config.spool)
        assert self.store is not None
        self.sidecar.spool_pending = await self.store.count()
        self._task = asyncio.get_running_loop().create_task(self._drain_loop(), name="spool-drain")
        logs.event(
            "spool_opened",
            backend=self.sidecar.config.spool.backend,
            pending=self.sidecar.spool_pending,
        )

    async def stop(self) -> None:
        for task in [self._task, *self._fills.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.store is not None:
            await self.store.close()  # every acknowledged record is already durable
        with contextlib.suppress(OSError):
            self.frontdoor.save()

    # ---------------------------------------------------------------- outage sessions

    @property
    def spooling(self) -> bool:
        """Whether writes go to the spool now: no writer anywhere, after the hold."""
        return self.store is not None and self.sidecar.hold.spooling

    def responder(self, user: str, database: str, settings: dict[str, str]) -> OutageResponder:
        return OutageResponder(self.frontdoor, self.classifier, user, database, settings)

    async def append(self, record: SpoolRecord) -> None:
        """Store durably (raises SpoolError); counted once it is."""
        assert self.store is not None
        await self.store.append(record)
        self.sidecar.stats.spool_records["spooled"] += 1
        self.sidecar.spool_pending += 1
        logs.event(
            "spooled",
            record=record.id,
            user=record.user,
            database=record.database,
            statements=len(record.statements),
        )

    # ---------------------------------------------------------------- front door

    def note_login(self, user: str, database: str, password: str | None) -> None:
        """A client logged in through a real server: make sure a later outage can greet the next
        client of this (user, database) and answer its driver's introspection."""
        key = (user, database)
        if key in self._fills or not self.frontdoor.needs_fill(user, database, _FRONTDOOR_MAX_AGE):
            return
        task = asyncio.get_running_loop().create_task(self._fill(user, database, password))
        self._fills[key] = task
        task.add_done_callback(lambda _t: self._fills.pop(key, None))

    async def _fill(self, user: str, database: str, password: str | None) -> None:
        writer = self.sidecar.topology.writer
        if writer is None:
            return
        params = {"user": user, "database": database, "application_name": "pgsidecar-frontdoor"}
        try:
            server = await self.sidecar.open_server(writer, params, password)
        except ProxyError as exc:
            logs.event("frontdoor_fill_failed", logs.WARNING, user=user, database=database, error=exc.message)
            return
        try:
            stored = await fill_from_server(self.frontdoor, server, user, database)
        except ProxyError as exc:
            logs.event("frontdoor_fill_failed", logs.WARNING, user=user, database=database, error=exc.message)
            return
        finally:
            server.close("front-door cache filled")
        try:
            await asyncio.to_thread(self.frontdoor.save)
        except OSError as exc:
            logs.event("frontdoor_save_failed", logs.WARNING, error=str(exc))
        logs.event("frontdoor_filled", user=user, database=database, answers=stored)

    # ---------------------------------------------------------------- replay

    def state_changed(self, state: ClusterState) -> None:
        loop = asyncio.get_running_loop()
        self._recovering_since = loop.time() if state is ClusterState.RECOVERING else None
        self._wake.set()

    def kick(self) -> None:
        """Replay now (admin REPLAY)."""
        self._wake.set()

    async def _drain_loop(self) -> None:
        topology = self.sidecar.topology
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if topology.writer is not None and (
                self.sidecar.spool_pending > 0 or topology.state is ClusterState.RECOVERING
            ):
                await self._drain_once()
            if topology.state is ClusterState.RECOVERING:
                if self.sidecar.spool_pending == 0:
                    topology.recovered()
                    continue
                since = self._recovering_since
                if since is not None and loop.time() - since >= self.sidecar.config.spool.max_drain_hold:
                    self._recovering_since = None
                    self.sidecar.release_after_drain_hold()
            delay = _RETRY_AFTER if self.sidecar.spool_pending and topology.writer else _IDLE_POLL
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _drain_once(self) -> None:
        store = self.store
        assert store is not None
        # A chunk of records shares one replay transaction (one commit flush, one store write).
        chunk = self.sidecar.config.spool.replay_batch
        replayer = Replayer(
            store, self._connect, self.sidecar.stats, self.owner, batch_size=2 * chunk, chunk_size=chunk
        )
        try:
            result = await replayer.drain()
        except (SpoolError, ProxyError, OSError) as exc:
            self.last_error = str(exc)
            logs.event("spool_drain_failed", logs.WARNING, error=str(exc))
            return
        if result.remaining >= 0:
            self.sidecar.spool_pending = result.remaining
        else:
            with contextlib.suppress(SpoolError):
                self.sidecar.spool_pending = await store.count()
        self.last_error = result.stopped_by_error
        if result.replayed or result.duplicate or result.dead_letter or result.stopped_by_error:
            logs.event(
                "spool_drained",
                replayed=result.replayed,
                duplicate=result.duplicate,
                dead_letter=result.dead_letter,
                remaining=self.sidecar.spool_pending,
                stopped_by=result.stopped_by_error,
            )
