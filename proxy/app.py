"""Sidecar: the process-wide owner of the listener, pools, topology monitor and client registry."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import secrets
import signal
import ssl
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from pydantic import ValidationError

from sidecar_config import ConfigError, ConfigProblem, SidecarConfig, config_items, load_config

from . import compiled, http, logs
from .admin import AdminConsole
from .aws import IamTokenSource, looks_like_aws_region, region_of_rds_host
from .client import ClientSession
from .hold import Gate, HoldController
from .metrics import Stats, make_registry
from .outcome import CommitOutcomeLedger
from .pool import Pool, PoolSettings
from .protocol.auth import ScramVerifier, mock_salt
from .protocol.sqlstate import ProxyError, ShuttingDown, TooManyClients, UpstreamUnavailable
from .server import ServerConnection, TlsSettings, connect, send_cancel
from .spooling import SpoolService
from .statements import StatementRegistry
from .topology import AuroraProvider, ClusterState, StaticProvider, TopologyMonitor, TopologyProvider

if TYPE_CHECKING:
    from sidecar_config import Endpoint


class Sidecar:
    def __init__(self, config: SidecarConfig, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path  # re-read by reload() (SIGHUP, admin RELOAD)
        self.clients: set[ClientSession] = set()  # every open client connection
        self.admitted = 0  # clients past startup, counted against pool.max_clients
        self.pools: dict[tuple[str, str], Pool] = {}
        # Pools for reads on replicas, by (user, database, replica); made on first use, retired
        # (and removed) when their replica stops being a reachable replica.
        self.replica_pools: dict[tuple[str, str, Endpoint], Pool] = {}
        # Open sessions by the secret of the key they were given (unique; process ids need not be).
        self.cancel_keys: dict[int, ClientSession] = {}
        self.statements = StatementRegistry()  # sidecar-wide prepared statement names
        self.stats = Stats()
        self.spool_pending = 0  # transactions in the spool (full outage)
        # host:port -> region, for metric labels.
        self.region_of = {str(h): r.name for r in config.upstream.regions for h in r.hosts}
        for region in config.upstream.regions:
            self.region_of.update({str(e): region.name for e in (region.instances or {}).values()})
        self._http: asyncio.Server | None = None
        # Whether new work may start, wait, or go to the spool (PAUSE, failover, outage, drain).
        self.hold = HoldController(
            config.failover.hold_timeout, _spool_grace(config), lambda: self.topology.problem
        )
        # The gate every client read checks (a native attribute of a compiled object).
        self.gate: Gate = self.hold.gate
        # The task confirming the writer after one of its connections closed under a client
        # (`writer_connection_lost`; the hold itself is the controller's).
        self._confirm_task: asyncio.Task[None] | None = None
        self.client_ssl_context = self._client_ssl_context()
        self.tls = TlsSettings(
            config.upstream.tls, str(config.upstream.ca_file) if config.upstream.ca_file else None
        )
        # RDS IAM tokens for upstream logins (upstream.iam_auth); made on first use, so a reload
        # that turns IAM on needs nothing else, and a sidecar without it never loads boto3.
        self.iam_tokens: IamTokenSource | None = None
        self.topology = TopologyMonitor(
            self._make_provider(), config.failover.check_interval, config.failover.hold_timeout
        )
        self.topology.add_listener(self._cluster_state_changed)
        self.topology.add_replica_listener(self._replicas_changed)
        self._set_routing()
        self._listener: asyncio.Server | None = None
        self._verifiers: dict[tuple[str, str], ScramVerifier] = {}
        # Passthrough: HMAC of the last password PostgreSQL accepted per user, under a key that
        # lives only in this process, so a later login with the same password skips the upstream
        # round trip without the password itself being kept beyond its session.
        self._verified_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        # The secret behind the salts shown to unknown user names. Derived from the configured
        # secrets where there are some, so it stays the same across restarts as a configured
        # verifier's salt does (one-way: it reveals nothing of them); else random.
        secrets_text = [u.password.get_secret_value() for u in config.auth.users if u.password is not None]
        self._mock_key = (
            hashlib.sha256("\x00".join(["pgsidecar mock SCRAM salt", *secrets_text]).encode()).digest()
            if secrets_text
            else secrets.token_bytes(32)
        )
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()  # one reload at a time: each diffs against the last
        self._background: set[asyncio.Task[None]] = set()  # signal-started tasks, kept from GC
        self.spooling = SpoolService(self) if config.spool.backend != "none" else None
        # Whether each pool's (user, database) can have its cut COMMITs resolved exactly (marker
        # ledger installed and usable), the marker ids, and the pruner.
        self.commit_outcome = CommitOutcomeLedger(self, self._ledger_connection)
        self.topology.add_listener(self.commit_outcome.cluster_state_changed)

    # ---------------------------------------------------------------- wiring

    def _client_ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.client_tls
        if tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        return ctx

    def _make_provider(self) -> TopologyProvider:
        upstream = self.config.upstream
        probe_user = upstream.probe_user or (
            self.config.auth.users[0].name if self.config.auth.users else "postgres"
        )
        params = {
            "user": probe_user,
            "database": upstream.probe_database,
            "application_name": "pgsidecar-probe",
        }

        async def probe_connector(endpoint: Endpoint) -> ServerConnection:
            return await self.open_server(endpoint, params, None, timeout=self.config.failover.probe_timeout)

        timeout = self.config.failover.probe_timeout
        if upstream.topology == "static":
            regions = [(r.name, list(r.hosts)) for r in upstream.regions]
            return StaticProvider(regions, probe_connector, timeout)
        return AuroraProvider(
            list(upstream.regions), probe_connector, timeout, global_db=upstream.topology == "aurora-global"
        )

    async def open_server(
        self,
        endpoint: Endpoint,
        params: dict[str, str],
        password: str | None,
        timeout: float | None = None,
    ) -> ServerConnection:
        try:
            if password is None:
                password = await self.upstream_password(params["user"], endpoint)
            server = await connect(
                endpoint,
                params,
                password,
                tls=self.tls,
                timeout=timeout if timeout is not None else self.config.upstream.connect_timeout,
                max_message_size=self.config.limits.max_message_size,
                stats=self.stats,
            )
        except ProxyError as exc:
            self.stats.upstream_errors[exc.code] += 1
            raise
        self.stats.server_logins += 1
        return server

    async def upstream_password(self, user: str, endpoint: Endpoint | None = None) -> str | None:
        """The password to log in upstream as `user` with (None: none known, e.g. trust).

        With upstream.iam_auth it is an RDS IAM token for `endpoint` (required then: a token is
        signed for one host and port), cached and re-signed before it expires.
        """
        if self.config.upstream.iam_auth:
            if endpoint is None:
                raise ValueError("upstream_password: an IAM token is signed for one endpoint; pass it")
            if self.iam_tokens is None:
                self.iam_tokens = IamTokenSource(self._iam_region)
            return await self.iam_tokens.token(endpoint, user)
        user_cfg = self.config.auth.user(user)
        if user_cfg is None or user_cfg.password is None:
            return None
        secret = user_cfg.password.get_secret_value()
        # A SCRAM verifier authenticates clients but cannot log in anywhere.
        return None if ScramVerifier.is_verifier(secret) else secret

    def _iam_region(self, endpoint: Endpoint) -> str | None:
        """The AWS region to sign `endpoint`'s IAM tokens for (None: boto3's default, AWS_REGION).

        A token only works in the database's own region. An RDS host name says which that is;
        else the configured region's name if it is an AWS one; else upstream.aws_region.
        """
        from_host = region_of_rds_host(endpoint.host)
        if from_host is not None:
            return from_host
        name = self.region_of.get(str(endpoint))
        if name is not None and looks_like_aws_region(name):
            return name
        return self.config.upstream.aws_region

    # ---------------------------------------------------------------- the gate (PAUSE / hold)

    @property
    def held_requests(self) -> int:
        """Requests waiting for a writer (or a RESUME) now."""
        return self.hold.held

    @property
    def draining(self) -> bool:
        """SIGTERM received: not ready, sessions close as they go idle."""
        return self.hold.draining

    def close_gate(self, reason: str) -> None:
        """An operator's PAUSE."""
        self.hold.close(reason)

    def open_gate(self) -> None:
        """An operator's RESUME."""
        self.hold.open()

    def pass_gate(self) -> Coroutine[None, None, None]:
        """Awaited, returns when new transactions may start (HoldController.pass_, handed on as
        is: no coroutine of its own per checkout)."""
        return self.hold.pass_()

    def writer_connection_lost(self, endpoint: Endpoint, reason: str) -> None:
        """A server connection closed under a client. If it was to the writer, hold new
        transactions until a probe that starts now says whether it still is the writer.

        A crash closes the writer's connections one by one, tens of milliseconds before a probe
        declares the failover: without the hold, a transaction started meanwhile (typically the
        check an application makes after 08007) runs on a connection to the dying writer whose
        backend has not exited yet. It is then cut too, or worse, reads there: a commit that was
        waiting for its synchronous standby is invisible on the old writer but present on the
        new one, so "not there, retry" duplicates it."""
        if endpoint != self.topology.writer:
            return  # not the writer
        if not self.hold.hold_to_confirm(endpoint):
            return  # already held (failover, PAUSE, a confirmation under way)
        self._confirm_task = asyncio.get_running_loop().create_task(self._confirm_writer(endpoint, reason))

    async def _confirm_writer(self, endpoint: Endpoint, reason: str) -> None:
        try:
            still = await self.topology.confirm_writer(endpoint, reason)
        finally:
            self._confirm_task = None
        self.hold.confirmed(endpoint, still and self.topology.writer == endpoint)

    # ---------------------------------------------------------------- failover

    def _cluster_state_changed(
        self,
        previous: ClusterState,
        state: ClusterState,
        previous_writer: Endpoint | None,
        writer: Endpoint | None,
    ) -> None:
        """Listener of the topology state machine: hold, cut, release, count."""
        if self.spooling is not None:
            self.spooling.state_changed(state)
        # Spool in OUTAGE; without a writer, hold new transactions.
        self.hold.cluster_state(state, writer is not None)
        if writer is None:
            # Never send anything more to the old writer.
            if previous_writer is not None:
                self._drop_connections_to(previous_writer, "the writer was lost")
            return
        if previous_writer is not None and previous_writer != writer:
            self._drop_connections_to(previous_writer, f"the writer is now {writer}")
        lost = self.topology.lost_writer
        lost_at = self.topology.lost_at
        if lost is not None and lost_at is not None and lost != writer:
            kind = "instance" if self.topology.lost_region == self.topology.writer_region else "region"
            seconds = asyncio.get_running_loop().time() - lost_at
            self.stats.failovers[kind] += 1
            self.stats.failover_duration.observe(seconds)
            logs.event(
                "failover_completed",
                kind=kind,
                previous_writer=str(lost),
                writer=str(writer),
                seconds=round(seconds, 3),
            )
        if state is ClusterState.RECOVERING and self.spooling is None:
            # Nothing spooled to replay: recovery is immediate.
            self.topology.recovered()
            return
        if state is ClusterState.UP:
            self.hold.release_failover()

    async def _outage_at_startup(self) -> None:
        """Started while no writer exists anywhere (e.g. restarted mid-outage): spool at once.
        Without a spool the first clients simply get 08006 naming the unreachable hosts."""
        wait = self.config.failover.probe_timeout + self.config.failover.check_interval + 1.0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self.topology.first_probe.wait()
        if self.topology.writer is None and self.topology.state is ClusterState.OUTAGE:
            self.topology.recovery_required = True
            self.hold.hold_for_failover("no writer at startup")
            self.hold.start_spooling()

    def release_after_drain_hold(self) -> None:
        """spool.max_drain_hold passed in RECOVERING: new work goes ahead of the backlog."""
        if self.hold.for_failover:
            logs.event(
                "drain_hold_expired",
                logs.WARNING,
                pending=self.spool_pending,
                max_drain_hold=self.config.spool.max_drain_hold,
            )
            self.hold.release_failover()

    def _drop_connections_to(self, endpoint: Endpoint, reason: str) -> None:
        for pool in self.pools.values():
            pool.drop_endpoint(endpoint, reason)
        for client in list(self.clients):
            server = client.server
            if server is not None and server.endpoint == endpoint:
                client.cut_server(reason)

    def readiness(self) -> tuple[bool, str]:
        """/readyz: ready while a writer is known or the spool accepts writes."""
        topology = self.topology
        if self.draining:
            return False, "shutting down"
        if self._listener is None:
            return False, "starting"
        if topology.writer is not None:
            return True, f"writer {topology.writer} ({topology.writer_region})"
        if self.hold.spooling:
            return True, f"no writer ({topology.problem}); simple INSERT transactions are spooled"
        return False, f"no writer: {topology.problem}"

    def pool_for(self, user: str, database: str) -> Pool:
        pool = self.pools.get((user, database))
        if pool is None:
            pool = Pool(user, database, self._pool_settings(), self.topology, self.open_server)
            pool.start_housekeeping()
            self.pools[(user, database)] = pool
            self.commit_outcome.watch(user, database)
        return pool

    def replica_pool_for(self, user: str, database: str, replica: Endpoint) -> Pool:
        """The pool for reads on `replica` (an endpoint `topology.choose_replica` named): same
        pool.size and mode as the writer's pools, servers verified in recovery when opened.
        Raises UpstreamUnavailable if `replica` is not a reachable replica now (then read from
        another one, or the writer)."""
        key = (user, database, replica)
        pool = self.replica_pools.get(key)
        if pool is None:
            if not self.topology.is_replica(replica):
                raise UpstreamUnavailable(f"{replica} is not a reachable replica now")
            settings = self._pool_settings()
            pool = Pool(user, database, settings, self.topology, self.open_server, replica=replica)
            pool.start_housekeeping()
            self.replica_pools[key] = pool
        return pool

    def _replicas_changed(self, replicas: frozenset[Endpoint]) -> None:
        """Retire the pools of replicas that left the topology, stopped answering or were
        promoted (a promoted replica's pool is never used for the writer: the writer's pools are
        separate and follow `topology.writer`)."""
        for key, pool in list(self.replica_pools.items()):
            endpoint = key[2]
            if endpoint in replicas and endpoint != self.topology.writer:
                continue
            # (Heard before the writer transition of the same probe: a promoted replica's pool
            # is retired before it is named the writer.)
            promoted = any(n.endpoint == endpoint and n.reachable and n.writer for n in self.topology.nodes)
            reason = (
                f"replica {endpoint} is a writer now (promoted)"
                if promoted
                else f"{endpoint} is no longer a reachable replica"
            )
            del self.replica_pools[key]
            pool.retire(reason)
            logs.event("replica_pool_retired", upstream=str(endpoint), user=key[0], database=key[1],
                       reason=reason)  # fmt: skip

    def _set_routing(self) -> None:
        regions = tuple(r.name for r in self.config.upstream.regions)
        self.topology.set_routing(regions, self.config.routing.max_replica_lag)

    async def _ledger_connection(self, user: str, database: str) -> ServerConnection:
        """A connection to the current writer as a pool's user, for the commit-outcome ledger's
        checks and pruning (a passthrough user logs in with the password its pool learnt)."""
        writer = self.topology.writer
        if writer is None:
            raise UpstreamUnavailable("no writable upstream")
        pool = self.pools.get((user, database))
        password = pool.known_password if pool is not None else None
        params = {"user": user, "database": database, "application_name": "pgsidecar-ledger"}
        return await self.open_server(writer, params, password)

    def _pool_settings(self) -> PoolSettings:
        cfg = self.config.pool
        return PoolSettings(
            size=cfg.size,
            checkout_timeout=cfg.checkout_timeout,
            reset_query=cfg.reset_query,
            server_lifetime=cfg.server_lifetime,
            server_idle_timeout=cfg.server_idle_timeout,
            server_check_after_idle=cfg.server_check_after_idle,
            connect_timeout=self.config.upstream.connect_timeout,
            max_prepared_statements=cfg.max_prepared_statements,
            min_idle=cfg.min_idle,
            max_concurrent_connects=cfg.max_concurrent_connects,
        )

    def scram_verifier(self, user: str, secret: str | None) -> ScramVerifier | None:
        """Cached SCRAM verifier per (user, secret): deriving one costs 4096 HMAC rounds."""
        if secret is None or self.config.auth.method != "scram-sha-256":
            return None
        key = (user, secret)
        verifier = self._verifiers.get(key)
        if verifier is None:
            verifier = ScramVerifier.for_secret(secret)
            self._verifiers[key] = verifier
        return verifier

    def mock_salt(self, user: str) -> bytes:
        """The SCRAM salt shown to a user name that is not configured (see ClientAuthenticator)."""
        return mock_salt(user, self._mock_key)

    def _password_tag(self, password: str | None) -> bytes:
        return hmac.new(self._verified_key, (password or "").encode(), hashlib.sha256).digest()

    def passthrough_known(self, user: str, password: str | None) -> bool:
        tag = self._verified.get(user)
        return tag is not None and hmac.compare_digest(tag, self._password_tag(password))

    def passthrough_verified(self, user: str, password: str | None) -> None:
        self._verified[user] = self._password_tag(password)

    # ---------------------------------------------------------------- clients

    def client_opened(self, client: ClientSession) -> None:
        self.clients.add(client)

    def admit(self, client: ClientSession) -> None:
        limit = self.config.pool.max_clients
        if self.admitted >= limit:
            raise TooManyClients(f"too many clients: pool.max_clients ({limit}) reached")
        self.admitted += 1

    def client_closed(self, client: ClientSession, counted: bool) -> None:
        self.clients.discard(client)
        if counted:
            self.admitted -= 1

    async def forward_cancel(self, key: tuple[int, int], conn_id: str) -> None:
        client = self.cancel_keys.get(key[1])
        if client is not None and client.backend_key != key:
            client = None  # the secret alone is not enough: PostgreSQL checks both halves too
        # Only a server running something of the client's: a server kept between transactions
        # may be taken over by another client before the cancel lands.
        server = client.running_on if client is not None else None
        if client is None or server is None or server.backend_key is None:
            # As PostgreSQL does: an unknown key is ignored without telling the sender anything.
            logs.event("cancel_ignored", conn=conn_id, reason="no session with that key")
            return
        try:
            await send_cancel(server.endpoint, server.backend_key, self.config.upstream.connect_timeout)
        except (OSError, TimeoutError) as exc:
            logs.event("cancel_failed", logs.WARNING, conn=conn_id, target=client.id, error=str(exc))
            return
        logs.event("cancel_forwarded", conn=conn_id, target=client.id, server=server.id)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # The sockets first: a taken address must stop the start before anything else is opened
        # (the spool file, the probes' connections). Bound, but not accepting until the end.
        listen = self.config.listen
        try:
            listener = await loop.create_server(
                lambda: ClientSession(self, partial(AdminConsole, self)),
                listen.host,
                listen.port,
                reuse_address=True,
                backlog=1024,
                start_serving=False,
            )
        except OSError as exc:
            raise ListenError("listen", str(listen), exc) from exc
        # Metrics and health next, serving at once: an operator (or a test) can already scrape;
        # /readyz says "starting" until the listener accepts clients.
        if self.config.metrics_listen is not None:
            where = self.config.metrics_listen
            try:
                self._http = await http.serve(where.host, where.port, make_registry(self), self.readiness)
            except OSError as exc:
                listener.close()
                raise ListenError("metrics_listen", str(where), exc) from exc
        if self.spooling is not None:
            await self.spooling.start()
            if self.spool_pending > 0:
                # Transactions spooled before a restart replay before any new write runs.
                self.topology.recovery_required = True
                self.hold.hold_for_failover("replaying what the spool kept from before the restart")
        self.topology.start()
        self.commit_outcome.start()
        if self.spooling is not None:
            await self._outage_at_startup()
        # What startup built (modules, config models, the AWS and metrics clients) lives as long
        # as the process: out of the cyclic collector's way, its full collections, which session
        # churn (a login allocates hundreds of objects) keeps triggering, scan only what came after.
        # (Collected first, so that no garbage of startup's is kept for good.)
        gc.collect()
        gc.freeze()
        await listener.start_serving()
        self._listener = listener
        logs.event(
            "listening",
            listen=str(listen),
            mode=self.config.pool.mode,
            auth=self.config.auth.method,
            topology=self.config.upstream.topology,
            data_path=compiled.status,  # "compiled", or why the Python sources run (slower)
        )
        for warning in self.config.warnings():
            logs.event("config_warning", logs.WARNING, warning=warning)

    async def stop(self, reason: str) -> None:
        """Drain, then close everything.

        New connections are refused at once. A session with a transaction open or a request in
        flight gets up to `shutdown_timeout` to finish it; every other session is closed with 57P01
        as soon as it is idle. Past the deadline the rest are closed too (PostgreSQL rolls back).
        """
        timeout = self.config.shutdown_timeout
        logs.event("shutting_down", reason=reason, clients=len(self.clients), shutdown_timeout=timeout)
        if self._listener is not None:
            self._listener.close()
        # A session between transactions that sends more is held at the gate instead of starting
        # a transaction that the deadline could cut; held, it counts as idle and is closed below.
        self.hold.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for client in list(self.clients):
                server = client.server
                if server is None or server.at_rest:
                    client.fail(ShuttingDown("pgsidecar is shutting down"))
            if not self.clients or loop.time() >= deadline:
                break
            # Polled rather than signalled: cheap for the few seconds a drain lasts.
            await asyncio.sleep(0.02)
        for client in list(self.clients):
            client.fail(
                ShuttingDown(
                    f"pgsidecar is shutting down: the transaction did not finish within "
                    f"shutdown_timeout ({timeout:g}s) and was rolled back"
                )
            )
        for pool in [*self.pools.values(), *self.replica_pools.values()]:
            pool.close_all("sidecar shutting down")
        await self.commit_outcome.stop()
        await self.topology.stop()
        if self.spooling is not None:
            await self.spooling.stop()
        if self._http is not None:
            self._http.close()
        self._stopped.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested)
        await self.start()
        await stop_requested.wait()
        await self.stop("signal")
        with contextlib.suppress(Exception):
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    # ---------------------------------------------------------------- reload (SIGHUP, admin RELOAD)

    def _reload_requested(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_from_signal())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_from_signal(self) -> None:
        try:
            await self.reload(source="SIGHUP")
        except ConfigError:
            pass  # logged as reload_refused; the running config stays
        except Exception as exc:  # a signal handler has nobody to raise to
            logs.event("reload_failed", logs.ERROR, error=repr(exc))

    async def reload(self, source: str = "SIGHUP") -> ReloadOutcome:
        """Re-read the config file and apply what can change without dropping a client.

        Raises ConfigError (after logging `reload_refused`) when the file is not valid; the running
        config then stays in effect, untouched.
        """
        async with self._reload_lock:
            try:
                wanted = await self._read_config()
                merged = _merge_live(self.config, wanted)
            except ConfigError as exc:
                logs.event("reload_refused", logs.WARNING, source=source, reason=str(exc))
                raise
            running = config_items(self.config)
            changed = _changed_keys(running, config_items(merged))
            needs_restart = _changed_keys(config_items(merged), config_items(wanted))
            self._apply_config(merged)
            logs.event("config_reloaded", source=source, changed=changed, needs_restart=needs_restart)
            return ReloadOutcome(changed, needs_restart)

    async def _read_config(self) -> SidecarConfig:
        if self.config_path is None:
            raise ConfigError(
                "<no config file>", [ConfigProblem("", "pgsidecar was started without a config file")]
            )
        # In a thread: resolving a secret reference may call out to a secrets store.
        return await asyncio.to_thread(load_config, self.config_path)

    def _apply_config(self, config: SidecarConfig) -> None:
        old, self.config = self.config, config
        # Auth, admin_users, limits, max_clients and shutdown_timeout are read from self.config
        # where they are used (each login, each new connection), so replacing it applies them.
        if (config.log_format, config.log_level) != (old.log_format, old.log_level):
            logs.configure(config.log_format, config.log_level)
        settings = self._pool_settings()
        for pool in [*self.pools.values(), *self.replica_pools.values()]:
            pool.resize(settings)
        self._set_routing()
        self.hold.retune(config.failover.hold_timeout, _spool_grace(config))
        self.region_of = {str(h): r.name for r in config.upstream.regions for h in r.hosts}
        for region in config.upstream.regions:
            self.region_of.update({str(e): region.name for e in (region.instances or {}).values()})
        self._retarget_topology()
        # After `pgsidecar init-db` (or a GRANT, or failover.commit_outcome turned on), a reload
        # makes the sidecar look for the ledger again at once.
        self.commit_outcome.recheck()

    def _retarget_topology(self) -> None:
        # The running monitor keeps its state and open probe connections; it takes the new interval,
        # hold and hosts, so a reload does not make the writer look lost for a moment.
        failover = self.config.failover
        if not self.topology.retune(self._make_provider(), failover.check_interval, failover.hold_timeout):
            logs.event("reload_topology_kind_needs_restart", logs.WARNING)


class ListenError(Exception):
    """An address the config names could not be bound (taken, not local, not permitted)."""

    def __init__(self, setting: str, address: str, error: OSError) -> None:
        super().__init__(f"cannot listen on {address} ({setting}): {error.strerror or error}")
        self.setting = setting  # the config key: listen or metrics_listen
        self.address = address
        self.reason = error.strerror or str(error)


@dataclass(frozen=True)
class ReloadOutcome:
    changed: list[str]  # settings (dotted keys) now in effect with their new value
    needs_restart: list[str]  # changed in the file but kept at their running value until restart


# What a reload applies to the running sidecar, as dotted config paths; any other change (listen,
# metrics_listen, pool.mode, TLS, topology kind, spool, ...) needs a restart and is kept. A list
# of what is live rather than of what is not, so that a setting added later is never claimed to
# be applied when nothing reads it again.
_LIVE_SETTINGS = (
    "admin_users",
    "log_format",
    "log_level",
    "shutdown_timeout",
    "pool.size",
    "pool.min_idle",
    "pool.max_clients",
    "pool.checkout_timeout",
    "pool.server_idle_timeout",
    "pool.server_lifetime",
    "pool.server_check_after_idle",
    "pool.max_prepared_statements",
    "pool.reset_query",
    "auth",
    "upstream.regions",
    "upstream.connect_timeout",
    # The probe logs in as a configured user: kept live so that it follows changes to auth.users.
    "upstream.probe_user",
    "upstream.probe_database",
    "failover",
    "routing",
    "limits",
)


def _merge_live(running: SidecarConfig, wanted: SidecarConfig) -> SidecarConfig:
    """`running` with the live settings of `wanted`; validated again, as the mix is new."""
    tree = running.model_dump(mode="python")
    source = wanted.model_dump(mode="python")
    for path in _LIVE_SETTINGS:
        *parents, leaf = path.split(".")
        src, dst = source, tree
        for part in parents:
            src, dst = src[part], dst[part]
        dst[leaf] = src[leaf]
    try:
        return SidecarConfig.model_validate(tree)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    # Only locations and messages: the input values of a config may be secrets.
    problems = [
        ConfigProblem(".".join(str(p) for p in e["loc"]), f"{e['msg']} (with settings kept until restart)")
        for e in errors
    ]
    raise ConfigError("reload", problems)


def _changed_keys(before: dict[str, object], after: dict[str, object]) -> list[str]:
    missing = object()
    return [key for key in {**before, **after} if before.get(key, missing) != after.get(key, missing)]


def _spool_grace(config: SidecarConfig) -> float | None:
    """How much longer than the failover hold a held request waits with a spool: the cluster
    enters OUTAGE at the first probe after hold_timeout (None: no spool)."""
    if config.spool.backend == "none":
        return None
    return config.failover.check_interval + config.failover.probe_timeout
