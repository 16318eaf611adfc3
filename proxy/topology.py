"""TopologyMonitor: the one owner of "who is the writer".

Providers (behind the `TopologyProvider` protocol) report what each node says about itself; the
monitor decides which node is the writer and publishes it. Everything that opens a server
connection asks the monitor first, so a later failover only has to change the monitor's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
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
STATIC_PROBE_SQL = (
    "SELECT pg_is_in_recovery(), "
    "CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END"
)


@dataclass(frozen=True)
class NodeStatus:
    """One node as seen by one probe."""

    endpoint: Endpoint
    region: str
    reachable: bool
    writer: bool = False
    timeline: int = 0
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
            results.get(i) or NodeStatus(endpoint, region, reachable=False, error="no answer yet")
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
    """A node's status from the answer to STATIC_PROBE_SQL."""
    if isinstance(answer, str):
        return NodeStatus(endpoint, region, reachable=False, error=answer)
    in_recovery, walfile_tli = answer.rows[0]
    writer = in_recovery == "f"
    timeline = int(walfile_tli, 16) if writer and walfile_tli else 0
    return NodeStatus(endpoint, region, reachable=True, writer=writer, timeline=timeline)


# Aurora's own topology functions (and the test clusters' emulation of them). The writer is the
# row whose session is MASTER_SESSION_ID; with several (a stale view from a lagging reader), the
# most recently updated wins.
AURORA_TOPOLOGY_SQL = (
    "SELECT server_id, (session_id = 'MASTER_SESSION_ID')::text, "
    "coalesce(extract(epoch FROM last_update_timestamp), 0)::text, NULL "
    "FROM aurora_replica_status()"
)
AURORA_GLOBAL_TOPOLOGY_SQL = (
    "SELECT server_id, (session_id = 'MASTER_SESSION_ID')::text, '0', aws_region "
    "FROM aurora_global_db_instance_status()"
)


@dataclass(frozen=True)
class InstanceRow:
    instance_id: str
    is_writer: bool
    updated: float
    region: str  # the instance's region (aurora-global), else the region whose host answered


class AuroraProvider:
    """`topology: aurora` / `aurora-global`: read the cluster topology through any reachable
    instance, map instance ids to endpoints, and confirm the writer on its own connection before
    naming it (nothing is sent to a node that has not itself said it is not in recovery)."""

    def __init__(self, regions: list[RegionConfig], connector: Connector, timeout: float, global_db: bool):
        self.regions = regions
        self._global = global_db
        self._probes = ProbeConnections(connector, timeout)
        self._unmapped: set[str] = set()  # instance ids already reported as unmapped

    async def probe(self, timeline_floor: int = 0) -> list[NodeStatus]:
        sql = AURORA_GLOBAL_TOPOLOGY_SQL if self._global else AURORA_TOPOLOGY_SQL
        asked = [(region, host) for region in self.regions for host in region.hosts]
        answers = await asyncio.gather(*(self._probes.query(host, sql) for _, host in asked))
        rows: dict[str, InstanceRow] = {}
        errors: list[NodeStatus] = []
        for (region, host), answer in zip(asked, answers, strict=True):
            if isinstance(answer, str):
                errors.append(NodeStatus(host, region.name, reachable=False, error=answer))
                continue
            for instance_id, is_writer, updated, aws_region in answer.rows:
                if instance_id is None:
                    continue
                row = InstanceRow(
                    instance_id,
                    is_writer == "true",
                    float(updated or 0),
                    aws_region or self._listed_region(instance_id) or region.name,
                )
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
            status = writer_status(row.region, endpoint, await self._probes.query(endpoint, STATIC_PROBE_SQL))
            if status.writer and confirmed is None:
                confirmed = status
            else:
                nodes.append(status)
        for row in rows.values():
            endpoint = self._endpoint(row)
            if endpoint is not None and not row.is_writer:
                nodes.append(NodeStatus(endpoint, row.region, reachable=True, writer=False))
        if confirmed is not None:
            nodes.insert(0, confirmed)
        return nodes + errors

    def adopt(self, fresh: TopologyProvider) -> bool:
        if not isinstance(fresh, AuroraProvider) or fresh._global != self._global:
            return False
        self.regions = fresh.regions
        listed = {host for region in self.regions for host in region.hosts}
        listed |= {e for region in self.regions for e in (region.instances or {}).values()}
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
        await self._probes.close()


class ClusterState(Enum):
    UP = "up"
    FAILING_OVER = "failing_over"
    OUTAGE = "outage"
    RECOVERING = "recovering"


StateListener = Callable[["ClusterState", "ClusterState", "Endpoint | None", "Endpoint | None"], None]


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
