"""TopologyMonitor: the one owner of "who is the writer", and of which replicas may serve reads.

Providers (behind the `TopologyProvider` protocol) report what each node says about itself; the
monitor decides which node is the writer and publishes it. Everything that opens a server
connection asks the monitor first, so a later failover only has to change the monitor's answer.
The same probe round publishes the replicas (`replicas`, `choose_replica`), with a lag bound per
replica, so reads can go on while there is no writer; nothing about them costs the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from . import logs
from .protocol.sqlstate import ProxyError, UpstreamUnavailable
from .server import QueryResult, ServerConnection
from .writer import WriterCell

if TYPE_CHECKING:
    from sidecar_config import Endpoint, RegionConfig

# On a writer, the WAL file name starts with the timeline: a promoted standby's is higher than the
# old primary's, which is what tells a stale writer apart from the real one.
WRITER_PROBE_SQL = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END"
)
# `static` asks the same single query for replication positions too (no extra round trip): a
# writer's flush and insert LSNs, a standby's replay LSN, the age of its last replayed commit (on
# its own clock) and whether replay is paused. LSNs as byte offsets (`lsn - '0/0'`).
STATIC_PROBE_SQL = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END, "
    "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
    "ELSE pg_current_wal_flush_lsn() END - '0/0')::text, "
    "CASE WHEN pg_is_in_recovery() THEN NULL ELSE (pg_current_wal_insert_lsn() - '0/0')::text END, "
    "CASE WHEN pg_is_in_recovery() "
    "THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::text END, "
    "CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused()::text END"
)
# Same positions as text LSNs, for clients: `SELECT pg_current_wal_insert_lsn()` after a commit is
# the exact bound of that commit (see TopologyMonitor.commit_mark for the free alternative).
COMMIT_LSN_SQL = "SELECT pg_current_wal_insert_lsn()"


def parse_lsn(text: str) -> int:
    """`16/B374D848` -> its byte offset, as `lsn - '0/0'` gives it."""
    high, _, low = text.partition("/")
    if not low:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


@dataclass(frozen=True)
class NodeStatus:
    """One node as seen by one probe."""

    endpoint: Endpoint
    region: str
    reachable: bool
    writer: bool = False
    timeline: int = 0
    error: str | None = None
    # Replication positions, where the provider reads them (None: not known).
    lsn: int | None = None  # a writer's flush LSN, a standby's replay LSN
    insert_lsn: int | None = None  # a writer's insert LSN: every commit acknowledged ends at or before it
    replay_age: float | None = None  # a standby: seconds since its last replayed commit was committed
    paused: bool | None = None  # a standby: replay paused (pg_wal_replay_pause)
    lag: float | None = None  # a reader's lag as the provider itself reports it (aurora), seconds


@dataclass(frozen=True)
class ReplicaInfo:
    """A host that is not the writer, as the last probe saw it (`TopologyMonitor.replicas`)."""

    endpoint: Endpoint
    region: str
    reachable: bool  # False: role unknown (not answering)
    lag_seconds: float | None  # the bound on how old its data is (see TopologyMonitor); None: unknown
    replay_lsn: int | None = None
    paused: bool | None = None
    error: str | None = None


class TopologyProvider(Protocol):
    async def probe(self, timeline_floor: int = 0) -> list[NodeStatus]:
        """Every node's status. `timeline_floor`: the newest writer timeline seen so far; a writer
        on it or above is decisive (a provider may stop waiting for slower nodes)."""
        ...

    def adopt(self, fresh: TopologyProvider) -> bool: ...

    async def close(self) -> None: ...


# After a decisive writer answer, how long a probe still waits for the other hosts.
_STRAGGLER_GRACE = 0.1

Connector = Callable[["Endpoint"], Awaitable[ServerConnection]]


class ProbeConnections:
    """Kept-open probe connections, one per node, each use bounded by `timeout` (connect + query)."""

    def __init__(self, connector: Connector, timeout: float) -> None:
        self._connect = connector
        self._timeout = timeout  # a black-holed host costs no more than this per probe
        self._conns: dict[Endpoint, ServerConnection] = {}

    async def query(self, endpoint: Endpoint, sql: str) -> QueryResult | str:
        """The result, or why the node could not answer."""
        try:
            async with asyncio.timeout(self._timeout):
                conn = self._conns.get(endpoint)
                if conn is None or conn.transport is None:
                    conn = await self._connect(endpoint)
                    self._conns[endpoint] = conn
                return await conn.simple_query(sql)
        except (ProxyError, OSError, TimeoutError) as exc:
            self._forget(endpoint, "probe failed")
            return "probe timed out" if isinstance(exc, TimeoutError) else str(exc)
        except asyncio.CancelledError:
            # Abandoned mid-query (a decisive answer came from elsewhere): the connection is in an
            # unknown protocol state, so it is not reused.
            self._forget(endpoint, "probe abandoned")
            raise

    def _forget(self, endpoint: Endpoint, reason: str) -> None:
        stale = self._conns.pop(endpoint, None)
        if stale is not None:
            stale.close(reason)

    def adopt(self, fresh: ProbeConnections, listed: set[Endpoint]) -> None:
        """Take `fresh`'s login and timeout; keep open connections to hosts still `listed` (so a
        reload does not make the writer look lost for a moment), close the others."""
        self._connect = fresh._connect
        self._timeout = fresh._timeout
        for endpoint in [e for e in self._conns if e not in listed]:
            self._conns.pop(endpoint).close("host removed from upstream.regions by reload")

    async def close(self) -> None:
        for conn in self._conns.values():
            conn.close("sidecar stopping")
        self._conns.clear()


class StaticProvider:
    """`topology: static`: ask every listed host whether it is in recovery, on a kept-open connection."""

    def __init__(self, regions: list[tuple[str, list[Endpoint]]], connector: Connector, timeout: float):
        self.regions = regions  # replaced on reload
        self._probes = ProbeConnections(connector, timeout)

    async def probe(self, timeline_floor: int = 0) -> list[NodeStatus]:
        """Ask every host at once. A black-holed host answers only with its timeout, so once a
        writer on the newest known timeline has answered, the hosts still silent are not waited
        for: they are reported unreachable this round (a writer on an older timeline is fenced
        anyway, so none of them could change the choice unless it were newer still)."""
        asked = [(region, endpoint) for region, hosts in self.regions for endpoint in hosts]
        tasks = {
            asyncio.ensure_future(self._probe_one(region, endpoint)): i
            for i, (region, endpoint) in enumerate(asked)
        }
        results: dict[int, NodeStatus] = {}
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    results[tasks[task]] = task.result()
                if any(n.writer and n.timeline >= timeline_floor for n in results.values()):
                    # Healthy hosts answer within milliseconds: a short grace still hears them
                    # (a stale writer among them gets fenced loudly), a black hole does not.
                    if pending:
                        done, pending = await asyncio.wait(pending, timeout=_STRAGGLER_GRACE)
                        for task in done:
                            results[tasks[task]] = task.result()
                    break
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        return [
            results.get(i) or NodeStatus(endpoint, region, reachable=False, error=NO_ANSWER_YET)
            for i, (region, endpoint) in enumerate(asked)
        ]

    async def _probe_one(self, region: str, endpoint: Endpoint) -> NodeStatus:
        return writer_status(region, endpoint, await self._probes.query(endpoint, STATIC_PROBE_SQL))

    def adopt(self, fresh: TopologyProvider) -> bool:
        """Take a freshly configured provider's hosts and login (reload); False if of another kind."""
        if not isinstance(fresh, StaticProvider):
            return False
        self.regions = fresh.regions
        self._probes.adopt(fresh._probes, {host for _, hosts in self.regions for host in hosts})
        return True

    async def close(self) -> None:
        await self._probes.close()


def writer_status(region: str, endpoint: Endpoint, answer: QueryResult | str) -> NodeStatus:
    """A node's status from the answer to STATIC_PROBE_SQL (or WRITER_PROBE_SQL: no positions)."""
    if isinstance(answer, str):
        return NodeStatus(endpoint, region, reachable=False, error=answer)
    row = answer.rows[0]
    in_recovery, walfile_tli = row[0], row[1]
    writer = in_recovery == "f"
    timeline = int(walfile_tli, 16) if writer and walfile_tli else 0
    if len(row) < 6:
        return NodeStatus(endpoint, region, reachable=True, writer=writer, timeline=timeline)
    lsn, insert_lsn, age, paused = row[2], row[3], row[4], row[5]
    return NodeStatus(
        endpoint,
        region,
        reachable=True,
        writer=writer,
        timeline=timeline,
        lsn=int(lsn) if lsn is not None else None,
        insert_lsn=int(insert_lsn) if insert_lsn is not None else None,
        replay_age=max(0.0, float(age)) if age is not None else None,
        paused=paused == "true" if paused is not None else None,
    )


# Aurora's own topology functions (and the test clusters' emulation of them). The writer is the
# row whose session is MASTER_SESSION_ID; with several (a stale view from a lagging reader), the
# most recently updated wins.
AURORA_TOPOLOGY_SQL = (
    "SELECT server_id, (session_id = 'MASTER_SESSION_ID')::text, "
    "coalesce(extract(epoch FROM last_update_timestamp), 0)::text, NULL, replica_lag_in_msec::text "
    "FROM aurora_replica_status()"
)
AURORA_GLOBAL_TOPOLOGY_SQL = (
    "SELECT server_id, (session_id = 'MASTER_SESSION_ID')::text, '0', aws_region, "
    "visibility_lag_in_msec::text "
    "FROM aurora_global_db_instance_status()"
)
# A reader named by the topology function but not among the configured hosts: is it up, and still
# a reader? (Its lag comes from the function.)
AURORA_READER_SQL = "SELECT pg_is_in_recovery()"


@dataclass(frozen=True)
class InstanceRow:
    instance_id: str
    is_writer: bool
    updated: float
    region: str  # the instance's region (aurora-global), else the region whose host answered
    lag: float | None = None  # seconds (replica_lag_in_msec / visibility_lag_in_msec), None: not given


class AuroraProvider:
    """`topology: aurora` / `aurora-global`: read the cluster topology through any reachable
    instance, map instance ids to endpoints, and confirm the writer on its own connection before
    naming it (nothing is sent to a node that has not itself said it is not in recovery)."""

    def __init__(self, regions: list[RegionConfig], connector: Connector, timeout: float, global_db: bool):
        self.regions = regions
        self._global = global_db
        self._probes = ProbeConnections(connector, timeout)
        self._unmapped: set[str] = set()  # instance ids already reported as unmapped
        # Readers named by the topology function that are not configured hosts are checked
        # (reachable, in recovery) in the background: a check started at one probe is used by
        # whichever probe finds it finished, so a black-holed reader never slows the writer's probe.
        self._reader_checks: dict[Endpoint, asyncio.Task[QueryResult | str]] = {}
        self._reader_answers: dict[Endpoint, QueryResult | str] = {}

    def _collect_reader_checks(self) -> None:
        """Move the answers of finished reader checks into `_reader_answers`."""
        for endpoint, task in list(self._reader_checks.items()):
            if task.done():
                del self._reader_checks[endpoint]
                if task.cancelled():
                    continue
                exc = task.exception()
                # (query() turns every expected failure into a reason; anything else is a bug,
                # which must not stop the writer's probe)
                self._reader_answers[endpoint] = repr(exc) if exc is not None else task.result()

    def _check_readers(self, readers: set[Endpoint]) -> None:
        """Check `readers` from now on (one check at a time each); forget every other one."""
        for endpoint in [e for e in self._reader_answers if e not in readers]:
            del self._reader_answers[endpoint]
        for endpoint in [e for e in self._reader_checks if e not in readers]:
            self._reader_checks.pop(endpoint).cancel()
        for endpoint in readers:
            if endpoint not in self._reader_checks:
                self._reader_checks[endpoint] = asyncio.ensure_future(
                    self._probes.query(endpoint, AURORA_READER_SQL)
                )

    async def probe(self, timeline_floor: int = 0) -> list[NodeStatus]:
        sql = AURORA_GLOBAL_TOPOLOGY_SQL if self._global else AURORA_TOPOLOGY_SQL
        asked = [(region, host) for region in self.regions for host in region.hosts]
        configured = {host for _, host in asked}
        answers = await asyncio.gather(*(self._probes.query(host, sql) for _, host in asked))
        self._collect_reader_checks()
        reader_answers = dict(self._reader_answers)
        rows: dict[str, InstanceRow] = {}
        errors: list[NodeStatus] = []
        answered: set[Endpoint] = set()
        lags: dict[str, float] = {}
        for (region, host), answer in zip(asked, answers, strict=True):
            if isinstance(answer, str):
                errors.append(NodeStatus(host, region.name, reachable=False, error=answer))
                continue
            answered.add(host)
            for instance_id, is_writer, updated, aws_region, lag_ms in answer.rows:
                if instance_id is None:
                    continue
                row = InstanceRow(
                    instance_id,
                    is_writer == "true",
                    float(updated or 0),
                    aws_region or self._listed_region(instance_id) or region.name,
                )
                if lag_ms is not None and is_writer != "true":
                    # Each instance reports itself at 0: the highest report is the one that knows.
                    lags[instance_id] = max(lags.get(instance_id, 0.0), float(lag_ms) / 1000.0)
                known = rows.get(instance_id)
                # Several readers report the same instance: keep the freshest report of it.
                if known is None or (row.updated, row.is_writer) > (known.updated, known.is_writer):
                    rows[instance_id] = row
        nodes: list[NodeStatus] = []
        writers = sorted((r for r in rows.values() if r.is_writer), key=lambda r: r.updated, reverse=True)
        confirmed: NodeStatus | None = None
        for row in writers:
            endpoint = self._endpoint(row)
            if endpoint is None:
                if row.instance_id not in self._unmapped:
                    self._unmapped.add(row.instance_id)
                    logs.event(
                        "aurora_instance_unmapped",
                        logs.ERROR,
                        instance=row.instance_id,
                        region=row.region,
                        hint="set upstream.regions[].instance_endpoint_pattern or instances",
                    )
                continue
            status = writer_status(row.region, endpoint, await self._probes.query(endpoint, WRITER_PROBE_SQL))
            if status.writer and confirmed is None:
                confirmed = status
            else:
                nodes.append(status)
        readers: set[Endpoint] = set()
        for row in rows.values():
            endpoint = self._endpoint(row)
            if endpoint is None or row.is_writer:
                continue
            readers.add(endpoint)
            check = reader_answers.get(endpoint)
            if endpoint in answered:
                reachable, error = True, None  # a configured host: its own topology answer says so
            elif endpoint in configured:
                continue  # a configured host that did not answer: already listed as unreachable
            elif check is None:
                reachable, error = False, "not checked yet"  # its first check is still running
            elif isinstance(check, str):
                reachable, error = False, check
            elif not check.rows or check.rows[0][0] != "t":
                reachable, error = False, "not in recovery"
            else:
                reachable, error = True, None
            nodes.append(
                NodeStatus(endpoint, row.region, reachable=reachable, writer=False, error=error,
                           lag=lags.get(row.instance_id))
            )  # fmt: skip
        self._check_readers({e for e in readers if e not in configured})
        if confirmed is not None:
            nodes.insert(0, confirmed)
        return nodes + errors

    def adopt(self, fresh: TopologyProvider) -> bool:
        if not isinstance(fresh, AuroraProvider) or fresh._global != self._global:
            return False
        self.regions = fresh.regions
        listed = {host for region in self.regions for host in region.hosts}
        listed |= {e for region in self.regions for e in (region.instances or {}).values()}
        self._check_readers(set())
        self._probes.adopt(fresh._probes, listed)
        return True

    def _listed_region(self, instance_id: str) -> str | None:
        """The first region whose explicit `instances` map names this instance: where it lives,
        whichever reader happened to report it (failovers are counted by region)."""
        for region in self.regions:
            if region.instances and instance_id in region.instances:
                return region.name
        return None

    def _endpoint(self, row: InstanceRow) -> Endpoint | None:
        ordered = sorted(self.regions, key=lambda r: r.name != row.region)
        for region in ordered:
            endpoint = region.instance_endpoint(row.instance_id)
            if endpoint is not None:
                return endpoint
        return None

    async def close(self) -> None:
        for task in self._reader_checks.values():
            task.cancel()
        if self._reader_checks:
            await asyncio.gather(*self._reader_checks.values(), return_exceptions=True)
        self._reader_checks.clear()
        await self._probes.close()


class ClusterState(Enum):
    UP = "up"
    FAILING_OVER = "failing_over"
    OUTAGE = "outage"
    RECOVERING = "recovering"


StateListener = Callable[["ClusterState", "ClusterState", "Endpoint | None", "Endpoint | None"], None]
# Called with the endpoints of the reachable replicas whenever that set changes.
ReplicaListener = Callable[[frozenset["Endpoint"]], None]

# Writer positions kept to turn a replica's replay LSN into a time bound: one entry per distinct
# LSN (a quiet writer adds none), so at 4 probes a second this covers a minute of steady writes
# and any length of quiet. Older than that, the replay timestamp bounds the lag.
_LSN_HISTORY = 256
# How long a standby that answers after the writer (past the straggler grace) keeps its last view.
_CARRY_OVER = 2.0
NO_ANSWER_YET = "no answer yet"
# Commit marks resolved to a writer insert LSN: a session's mark is looked up within a few probes.
_MARK_HISTORY = 64


class TopologyMonitor:
    """Probes every `check_interval`, owns the cluster state machine and publishes the writer.

    `UP(writer) -> FAILING_OVER` when the writer stops answering as a writer (new transactions are
    held); `-> UP(new writer)` when one is confirmed, or `-> OUTAGE` after `hold_timeout` without one;
    `OUTAGE -> RECOVERING -> UP` when a writer returns (the spool replays in RECOVERING).
    Every transition goes through `_transition`, which logs it once and notifies listeners.
    """

    def __init__(self, provider: TopologyProvider, check_interval: float, hold_timeout: float = 30.0) -> None:
        self._provider = provider
        self._interval = check_interval
        self.hold_timeout = hold_timeout
        self.published = WriterCell()  # `writer`, where the pool reads it
        self.writer_region: str | None = None
        self.writer_timeline = 0
        self.state = ClusterState.OUTAGE  # nothing is known until the first probe answers
        self.nodes: list[NodeStatus] = []  # the latest probe, for SHOW TOPOLOGY and logs
        # The highest writer timeline ever seen: a writer below it is stale (an old primary that
        # came back read-write) and is never used, even while the real writer is unreachable.
        self.max_timeline = 0
        self.lost_at: float | None = None  # loop time the writer was lost (failover duration)
        self.lost_writer: Endpoint | None = None
        self.lost_region: str | None = None
        self._listeners: list[StateListener] = []
        self._changed = asyncio.Event()
        self._probe_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_problem: str = "no probe has completed yet"
        self._fenced: set[tuple[Endpoint, int]] = set()  # logged once per (node, timeline)
        self.probes = 0  # probes completed
        self.first_probe = asyncio.Event()  # set once the first probe has completed
        # Set by the owner when the next writer must go through RECOVERING even though none was
        # lost in this process's lifetime (a spool left over from before a restart).
        self.recovery_required = False
        self._probes_started = 0
        self._probe_done = asyncio.Event()
        # Replicas, republished whole after every probe (readers take the tuple, never a copy).
        self.replicas: tuple[ReplicaInfo, ...] = ()
        self.max_replica_lag = 5.0  # routing.max_replica_lag (set by the owner, live on reload)
        self.region_order: tuple[str, ...] = ()  # config order, home first (unknown regions last)
        self.writer_lsn: int | None = None  # the writer's flush LSN at the latest probe that reached it
        self.writer_insert_lsn: int | None = None  # its insert LSN then
        self._lsn_history: deque[tuple[int, float]] = deque(maxlen=_LSN_HISTORY)  # (lsn, loop time)
        self._writer_seen_at: float | None = None  # start of the latest probe the writer answered
        self._mark_lsns: deque[tuple[int, int]] = deque(maxlen=_MARK_HISTORY)  # (probe seq, insert LSN)
        self._groups: tuple[tuple[ReplicaInfo, ...], ...] = ()  # qualifying-by-reachability, by region
        self._next: list[int] = []  # round-robin position per group
        self._suspect: set[Endpoint] = set()  # reported failed by the data path since the last probe
        self._replica_set: frozenset[Endpoint] = frozenset()
        self._replica_listeners: list[ReplicaListener] = []
        self._measured_at: dict[Endpoint, float] = {}  # when each replica last answered a probe

    @property
    def fenced(self) -> int:
        """Stale writers refused so far, each (node, timeline) once."""
        return len(self._fenced)

    def retune(self, provider: TopologyProvider, check_interval: float, hold_timeout: float) -> bool:
        """Apply a reloaded config: probe interval, hold, and hosts (False: the topology kind
        changed, which needs a restart)."""
        self._interval = check_interval
        self.hold_timeout = hold_timeout
        return self._provider.adopt(provider)

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="topology-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._provider.close()

    async def _run(self) -> None:
        while True:
            # Cleared before the probe, so a failure reported during it asks for another at once.
            self._probe_now.clear()
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._probe_now.wait()

    async def refresh(self) -> None:
        self._probes_started += 1
        seq = self._probes_started
        started = asyncio.get_running_loop().time()
        try:
            nodes = await self._provider.probe(self.max_timeline)
        except Exception as exc:  # a provider bug must not stop the monitor
            logs.event("topology_probe_failed", logs.ERROR, error=repr(exc))
            return
        finally:
            self.probes += 1
            self.first_probe.set()
            self._probe_done.set()
            self._probe_done = asyncio.Event()
        self.nodes = nodes
        best = self._choose_writer(nodes)
        now = asyncio.get_running_loop().time()
        try:
            self._track_replicas(nodes, best, seq, started, now)
        except Exception as exc:  # never let the replica view stop writer tracking
            logs.event("replica_tracking_failed", logs.ERROR, error=repr(exc))
        if best is not None:
            self._writer_confirmed(best)
            return
        if self.state is ClusterState.UP:
            self._transition(ClusterState.FAILING_OVER, None, None, self._last_problem)
        elif self.state is ClusterState.FAILING_OVER:
            if self.lost_at is not None and now - self.lost_at >= self.hold_timeout:
                self._transition(ClusterState.OUTAGE, None, None, self._last_problem)
        elif self.state is ClusterState.RECOVERING:
            self._transition(ClusterState.OUTAGE, None, None, self._last_problem)

    # ------------------------------------------------------------------ replicas

    def add_replica_listener(self, listener: ReplicaListener) -> None:
        self._replica_listeners.append(listener)

    def set_routing(self, region_order: tuple[str, ...], max_replica_lag: float) -> None:
        """Config order of the regions (home first) and routing.max_replica_lag (also on reload)."""
        self.region_order = region_order
        self.max_replica_lag = max_replica_lag
        self._regroup()

    def _track_replicas(
        self, nodes: list[NodeStatus], writer: NodeStatus | None, seq: int, started: float, now: float
    ) -> None:
        """Publish `replicas` from this probe.

        Lag, the bound on how old a replica's data is, in seconds:
        * a provider that reports lag itself (aurora: replica_lag_in_msec, aurora-global:
          visibility_lag_in_msec) is taken at its word;
        * static, with a writer: each probe records the writer's flush LSN with the time the probe
          started (a time at which the writer had written no more than that). A standby whose
          replay LSN is at or past this probe's writer LSN has lag 0; else its lag is the time
          since the writer was last seen at an LSN the standby has replayed (it holds everything
          the writer had then). Behind every kept sample, the age of its last replayed commit
          (on its own clock) bounds it, and never less than the oldest sample's age. A paused
          standby on a busy writer thus shows a lag growing with the clock; on a quiet writer it
          holds everything, and shows 0.
        * static, without a writer (failing over, outage): the same, measured at the moment the
          writer was last seen, so a standby that was current then stays at its lag of then (it
          holds everything anyone can still read). With no writer ever seen (started during an
          outage), the newest standby (by replay LSN, else by replayed-commit age) has lag 0 and
          each other one the difference of their replayed-commit ages.
        """
        if writer is not None:
            self.writer_lsn = writer.lsn
            self.writer_insert_lsn = writer.insert_lsn
            if writer.lsn is not None:
                history = self._lsn_history
                if history and history[-1][0] == writer.lsn:
                    history[-1] = (writer.lsn, started)  # still there: the later time is the tighter
                elif not history or writer.lsn > history[-1][0]:
                    history.append((writer.lsn, started))
                self._writer_seen_at = started
            if writer.insert_lsn is not None:
                self._mark_lsns.append((seq, writer.insert_lsn))
        candidates = [n for n in nodes if not n.writer and (writer is None or n.endpoint != writer.endpoint)]
        reachable = [n for n in candidates if n.reachable]
        newest_lsn = max((n.lsn for n in reachable if n.lsn is not None), default=None)
        newest_age = min((n.replay_age for n in reachable if n.replay_age is not None), default=None)
        seen: set[Endpoint] = set()
        replicas: list[ReplicaInfo] = []
        previous = {r.endpoint: r for r in self.replicas}
        for node in candidates:
            if node.endpoint in seen:
                continue
            seen.add(node.endpoint)
            if not node.reachable:
                carried = self._carry_over(node, previous.get(node.endpoint), now)
                replicas.append(
                    carried or ReplicaInfo(node.endpoint, node.region, False, None, error=node.error)
                )
                continue
            lag = node.lag
            if lag is None:
                lag = self._lag_of(node, writer, now, newest_lsn, newest_age)
            self._measured_at[node.endpoint] = now
            replicas.append(
                ReplicaInfo(node.endpoint, node.region, True, lag, node.lsn, node.paused, node.error)
            )
        for endpoint in [e for e in self._measured_at if e not in seen]:
            del self._measured_at[endpoint]
        self.replicas = tuple(replicas)
        self._suspect.clear()
        self._regroup()
        current = frozenset(r.endpoint for r in replicas if r.reachable)
        if current != self._replica_set:
            self._replica_set = current
            for listener in self._replica_listeners:
                listener(current)

    def _carry_over(self, node: NodeStatus, before: ReplicaInfo | None, now: float) -> ReplicaInfo | None:
        """A standby the probe stopped waiting for (the writer had answered, it had not yet, see
        StaticProvider.probe) keeps its last view for a moment, its lag grown by the time since
        it was measured, rather than flap to unreachable (which would retire its pools) on one
        slow answer. A failed answer is never carried over."""
        measured = self._measured_at.get(node.endpoint)
        if (
            node.error != NO_ANSWER_YET
            or before is None
            or not before.reachable
            or measured is None
            or now - measured > _CARRY_OVER
        ):
            return None
        lag = before.lag_seconds + (now - measured) if before.lag_seconds is not None else None
        return ReplicaInfo(before.endpoint, before.region, True, lag, before.replay_lsn, before.paused,
                           NO_ANSWER_YET)  # fmt: skip

    def _lag_of(
        self,
        node: NodeStatus,
        writer: NodeStatus | None,
        now: float,
        newest_lsn: int | None,
        newest_age: float | None,
    ) -> float | None:
        replay = node.lsn
        history = self._lsn_history
        if writer is None and not history:
            # Never saw a writer: relative to the newest standby reachable now.
            if replay is not None and newest_lsn is not None and replay >= newest_lsn:
                return 0.0
            if node.replay_age is not None and newest_age is not None:
                return max(0.0, node.replay_age - newest_age)
            return None
        if replay is None:
            return None
        # With a writer: now; without: frozen at the last moment the writer was seen.
        at = now if writer is not None or self._writer_seen_at is None else self._writer_seen_at
        reference = writer.lsn if writer is not None and writer.lsn is not None else None
        if reference is None and history:
            reference = history[-1][0]
        if reference is not None and replay >= reference:
            return 0.0
        for lsn, seen_at in reversed(history):
            if lsn <= replay:
                return max(0.0, at - seen_at)
        oldest = max(0.0, at - history[0][1]) if history else 0.0
        if node.replay_age is None:
            return oldest if history and writer is None else None
        return max(oldest, node.replay_age)

    def _regroup(self) -> None:
        """Reachable replicas, by region: home first, then config order (others last)."""
        order = {name: i for i, name in enumerate(self.region_order)}
        by_region: dict[str, list[ReplicaInfo]] = {}
        for replica in self.replicas:
            if replica.reachable and replica.endpoint not in self._suspect:
                by_region.setdefault(replica.region, []).append(replica)
        regions = sorted(by_region, key=lambda r: (order.get(r, len(order)), r))
        groups = tuple(tuple(by_region[r]) for r in regions)
        if len(groups) != len(self._next):
            self._next = [0] * len(groups)
        self._groups = groups

    def choose_replica(
        self, min_lsn: int | None = None, after_mark: int | None = None, prefer: Endpoint | None = None
    ) -> Endpoint | None:
        """A replica to read from, or None (then the writer, or hold).

        Qualifying: reachable (and not reported failed since the last probe), lag known and at most
        `max_replica_lag`, and replayed at least `min_lsn` (read-your-writes), or at least the
        position of the commit behind `after_mark` (`commit_mark`; None while no probe since the
        mark has reached the writer). Home region first, then the others in config order; round
        robin within a region. Works without a writer (from the last probe's lags). `prefer`: the
        replica a session-mode client is on already, kept while it qualifies (a move costs a
        checkout and a restore of the session's settings and statements).
        """
        if after_mark is not None:
            bound = self.commit_lsn(after_mark)
            if bound is None:
                return None
            min_lsn = bound if min_lsn is None else max(min_lsn, bound)
        limit = self.max_replica_lag
        groups = self._groups
        if prefer is not None:
            for group in groups:
                for replica in group:
                    if replica.endpoint == prefer and self._fresh(replica, limit, min_lsn):
                        return prefer
        positions = self._next
        for g, group in enumerate(groups):
            n = len(group)
            start = positions[g] % n
            for i in range(n):
                replica = group[(start + i) % n]
                if self._fresh(replica, limit, min_lsn):
                    positions[g] = (start + i + 1) % n
                    return replica.endpoint
        return None

    @staticmethod
    def _fresh(replica: ReplicaInfo, limit: float, min_lsn: int | None) -> bool:
        lag = replica.lag_seconds
        if lag is None or lag > limit:
            return False
        return min_lsn is None or (replica.replay_lsn is not None and replica.replay_lsn >= min_lsn)

    def commit_mark(self) -> int:
        """Call when a client's write has committed (its ReadyForQuery seen): a token for
        `choose_replica(after_mark=...)`. Free: the next probe to start reads the writer's insert
        LSN, which is at or past the end of that commit; until it has, the client reads from the
        writer (at most about one check_interval plus a probe round trip)."""
        return self._probes_started

    def commit_lsn(self, mark: int) -> int | None:
        """The writer insert LSN read by the first probe started after `mark` (None: none yet)."""
        for seq, lsn in self._mark_lsns:
            if seq > mark:
                return lsn
        return None

    def report_replica_failure(self, endpoint: Endpoint, reason: str) -> None:
        """The data path could not use replica `endpoint`: skip it until a probe has looked again."""
        if endpoint in self._suspect:
            return
        logs.event("replica_failure_reported", logs.WARNING, upstream=str(endpoint), reason=reason)
        self._suspect.add(endpoint)
        self._regroup()
        self._probe_now.set()

    def replica(self, endpoint: Endpoint) -> ReplicaInfo | None:
        """The latest probe's view of `endpoint` as a replica (None: not one)."""
        for replica in self.replicas:
            if replica.endpoint == endpoint:
                return replica
        return None

    def is_replica(self, endpoint: Endpoint) -> bool:
        """Reachable and a replica at the latest probe (never the writer)."""
        return endpoint in self._replica_set and endpoint != self.writer

    # ------------------------------------------------------------------ the writer

    def _choose_writer(self, nodes: list[NodeStatus]) -> NodeStatus | None:
        writers = [n for n in nodes if n.reachable and n.writer]
        # The newest timeline counts, including one first seen in this very probe: a standby
        # promoted while the old primary still answers supersedes it at once, and the old one is
        # fenced now, not kept because it was "current".
        newest = max([self.max_timeline, *(w.timeline for w in writers)])
        current = [n for n in writers if n.timeline >= newest]
        for stale in writers:
            if stale.timeline < newest and (stale.endpoint, stale.timeline) not in self._fenced:
                self._fenced.add((stale.endpoint, stale.timeline))
                logs.event(
                    "stale_writer_fenced",
                    logs.ERROR,
                    upstream=str(stale.endpoint),
                    timeline=stale.timeline,
                    newest_timeline=newest,
                    action="never used: it claims to be writer on an older timeline",
                )
        if not current:
            unreachable = [f"{n.endpoint} ({n.error})" for n in nodes if not n.reachable]
            fenced = [str(n.endpoint) for n in writers if n not in current]
            self._last_problem = (
                "no node reports itself as writer"
                + (f"; unreachable: {', '.join(unreachable)}" if unreachable else "")
                + (f"; fenced stale writers: {', '.join(fenced)}" if fenced else "")
            )
            return None
        # Several writers on the newest timeline: split brain. Prefer the current writer (no
        # flapping), else the first in configured order (home region first), and say so loudly.
        best = next((n for n in current if n.endpoint == self.writer), None) or max(
            current, key=lambda n: n.timeline
        )
        for other in current:
            if other is not best and (other.endpoint, other.timeline) not in self._fenced:
                self._fenced.add((other.endpoint, other.timeline))
                logs.event(
                    "stale_writer_fenced",
                    logs.ERROR,
                    upstream=str(other.endpoint),
                    timeline=other.timeline,
                    writer=str(best.endpoint),
                    action="two writers claim the newest timeline; keeping the current one",
                )
        return best

    def _writer_confirmed(self, node: NodeStatus) -> None:
        self.max_timeline = max(self.max_timeline, node.timeline)
        self.writer_timeline = node.timeline
        if self.state in (ClusterState.UP, ClusterState.RECOVERING) and node.endpoint == self.writer:
            return  # RECOVERING ends only when the spool has drained (`recovered`)
        recovering = self.state is ClusterState.RECOVERING or (
            self.state is ClusterState.OUTAGE and (self.writer_seen or self.recovery_required)
        )
        target = ClusterState.RECOVERING if recovering else ClusterState.UP
        self.recovery_required = False
        self._transition(target, node.endpoint, node.region, None)

    @property
    def writer(self) -> Endpoint | None:
        """The confirmed writer, None while unknown."""
        return self.published.writer

    @writer.setter
    def writer(self, endpoint: Endpoint | None) -> None:
        self.published.writer = endpoint

    @property
    def writer_seen(self) -> bool:
        """Whether a writer was ever known (an outage at startup is not a recovery)."""
        return self.max_timeline > 0 and self.lost_writer is not None

    def recovered(self) -> None:
        """RECOVERING -> UP once the spool has drained (called by whoever replays it)."""
        if self.state is ClusterState.RECOVERING:
            self._transition(ClusterState.UP, self.writer, self.writer_region, None)

    def _transition(
        self, state: ClusterState, writer: Endpoint | None, region: str | None, reason: str | None
    ) -> None:
        """The single transition point for writer and cluster state: logs it and tells listeners."""
        previous_state, previous_writer = self.state, self.writer
        if state is previous_state and writer == previous_writer:
            return
        now = asyncio.get_running_loop().time()
        if previous_writer is not None and writer != previous_writer:
            # Lost, or replaced within one probe round (then the failover took no time at all).
            self.lost_at = now
            self.lost_writer = previous_writer
            self.lost_region = self.writer_region
        self.state = state
        self.writer = writer
        self.writer_region = region if writer is not None else None
        fields: dict[str, object] = {
            "state": state.value,
            "previous_state": previous_state.value,
            "writer": str(writer) if writer else None,
            "region": region,
        }
        if writer is None:
            fields["lost_writer"] = str(self.lost_writer) if self.lost_writer else None
            fields["reason"] = reason
        elif self.lost_at is not None:
            fields["previous_writer"] = str(self.lost_writer) if self.lost_writer else None
            fields["seconds_without_writer"] = round(now - self.lost_at, 3)
        logs.event("cluster_state", logs.INFO if writer is not None else logs.WARNING, **fields)
        for listener in self._listeners:
            listener(previous_state, state, previous_writer, writer)
        if writer is not None:
            self.lost_at = None
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def problem(self) -> str:
        """Why there is no writer (for /readyz and error messages)."""
        return self._last_problem

    def report_failure(self, endpoint: Endpoint, reason: str) -> None:
        """The data path saw `endpoint` fail: probe now rather than at the next interval."""
        logs.event("upstream_failure_reported", logs.WARNING, upstream=str(endpoint), reason=reason)
        self._probe_now.set()

    async def confirm_writer(self, endpoint: Endpoint, reason: str) -> bool:
        """The data path could not use `endpoint` (refused, reset, shutting down): is it still the
        writer? Answered by a probe that starts after the failure, so a client is never failed on
        the word of a probe that ran before the crash, and never retried forever either."""
        self.report_failure(endpoint, reason)
        wanted = self._probes_started + 1  # the first probe to start from now on
        while self.probes < wanted:
            await self._probe_done.wait()
        return self.writer == endpoint

    async def writer_changed(self) -> None:
        """Return at the next change of writer or cluster state."""
        await self._changed.wait()

    async def wait_for_writer(self, timeout: float) -> Endpoint:
        """The writer, waiting up to `timeout` seconds for one to be known."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.writer is None:
            self._probe_now.set()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UpstreamUnavailable(f"no writable upstream: {self._last_problem}")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()
        return self.writer
