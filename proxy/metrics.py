"""Prometheus metrics (ARCHITECTURE.md, P6), without cost on the data path.

The data path bumps plain integers on a `Stats` object (no locks, no label lookups); gauges are not
kept at all but computed from the sidecar's own state (clients, pools, topology) when `/metrics` is
scraped. One declarative table (`FAMILIES`) gives every metric its name, type and help text; the
admin console's SHOW STATS reads the same `Stats`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from prometheus_client.core import Metric

PREFIX = "pgsidecar_"

# Query latencies of a local sidecar in front of a database: sub-millisecond to a held failover.
QUERY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FAILOVER_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60)

CLIENT_STATES = ("login", "waiting", "active", "idle")
SERVER_STATES = ("connecting", "idle", "active", "resetting")
CLUSTER_STATES = ("up", "failing_over", "outage", "recovering")
FAILOVER_KINDS = ("instance", "region")
SPOOL_RESULTS = ("spooled", "replayed", "duplicate", "dead_letter")
# A transaction cut by a failover: replayed on the new writer with every answer equal, given up
# because an answer differed, or because it was over failover.replay_max_bytes, or because it held
# something a replay cannot carry (COPY, a cursor, a statement PostgreSQL refuses in a transaction).
REPLAY_RESULTS = ("replayed", "diverged", "too_large", "not_replayable")
# A COMMIT whose answer never came: its marker was found on the new writer (committed), it was not
# and the transaction was replayed and committed there, or nothing could tell (08007).
COMMIT_OUTCOMES = ("committed", "replayed", "unknown")


class Histogram:
    """A single-threaded histogram: `observe` is a few compares and two additions."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = tuple(float(bound) for bound in bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # A walk up from the lowest bucket rather than `bisect`: compiled, it is a few float
        # compares (query latencies fall in the first buckets), not a call into the bisect module.
        i = 0
        for bound in self.bounds:
            if value <= bound:
                break
            i += 1
        self.counts[i] = self.counts[i] + 1  # (compiled: unboxed, where `+=` is a generic call)
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


@dataclass
class Stats:
    """Counters the data path and the state machines bump directly."""

    transactions: int = 0  # ReadyForQuery 'I': a transaction or autocommit statement finished
    queries: int = 0  # request/response round trips (Query, Sync, FunctionCall) answered
    query_duration: Histogram = field(default_factory=lambda: Histogram(QUERY_BUCKETS))
    upstream_errors: Counter[str] = field(default_factory=Counter)  # by SQLSTATE
    failovers: Counter[str] = field(default_factory=Counter)  # by kind
    failover_duration: Histogram = field(default_factory=lambda: Histogram(FAILOVER_BUCKETS))
    spool_records: Counter[str] = field(default_factory=Counter)  # by result
    clients_accepted: int = 0
    clients_refused: Counter[str] = field(default_factory=Counter)  # by SQLSTATE
    # Errors the sidecar itself sent to logged-in clients (failover cuts, holds that timed out,
    # outage refusals), by SQLSTATE; upstream's own errors are relayed, not counted here.
    client_errors: Counter[str] = field(default_factory=Counter)
    server_logins: int = 0
    # Transactions cut by a failover, by REPLAY_RESULTS; and unanswered COMMITs, by COMMIT_OUTCOMES.
    # Counters rather than attributes per label, so the session bumps them as it does client_errors.
    transaction_replays: Counter[str] = field(default_factory=Counter)
    commit_outcomes: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()


FAMILIES = {
    f.name: f
    for f in (
        Family("client_connections", "gauge", "Client connections by state", ("state",)),
        Family(
            "server_connections",
            "gauge",
            "Upstream connections by region, host and state",
            ("region", "host", "state"),
        ),
        Family("transactions_total", "counter", "Transactions (and autocommit statements) completed"),
        Family("queries_total", "counter", "Client requests answered (Query, Sync, FunctionCall)"),
        Family("query_duration_seconds", "histogram", "Time from a client request to its ReadyForQuery"),
        Family("writer_info", "gauge", "1 for the current writer", ("region", "host")),
        Family("cluster_state", "gauge", "1 for the current cluster state", ("state",)),
        Family("failovers_total", "counter", "Completed failovers", ("kind",)),
        Family("failover_duration_seconds", "histogram", "Time from writer lost to new writer in use"),
        Family("held_requests", "gauge", "Requests held while no writer is known"),
        Family("spool_pending", "gauge", "Transactions in the spool awaiting replay"),
        Family("spool_records_total", "counter", "Spool records by outcome", ("result",)),
        Family(
            "upstream_errors_total", "counter", "Errors from or about upstream, by SQLSTATE", ("sqlstate",)
        ),
        Family("clients_accepted_total", "counter", "Client connections that completed login"),
        Family("clients_refused_total", "counter", "Client connections refused, by SQLSTATE", ("sqlstate",)),
        Family("server_logins_total", "counter", "Upstream connections opened and logged in"),
        Family(
            "client_errors_total",
            "counter",
            "Errors the sidecar itself sent to logged-in clients (failover cuts, holds, outage), by SQLSTATE",
            ("sqlstate",),
        ),
        Family(
            "stale_writers_fenced_total",
            "counter",
            "Nodes refused as writer (an older timeline, or a second writer on the newest), each once",
        ),
        Family(
            "transaction_replays_total",
            "counter",
            "Transactions cut by a failover and replayed on the new writer, by result",
            ("result",),
        ),
        Family(
            "commit_outcomes_total",
            "counter",
            "COMMITs cut by a failover before their answer, by how their outcome was settled",
            ("outcome",),
        ),
        Family("pool_waiting_clients", "gauge", "Clients waiting for a free server connection"),
        Family(
            "replica_lag_seconds",
            "gauge",
            "Bound on how old each reachable replica's data is, as of the latest probe",
            ("region", "host"),
        ),
        Family("prepared_statements", "gauge", "Distinct statements named sidecar-wide (transaction mode)"),
    )
}


def _family(name: str) -> Metric:
    spec = FAMILIES[name]
    full = PREFIX + name
    if spec.kind == "counter":
        # prometheus_client appends _total itself.
        return CounterMetricFamily(full.removesuffix("_total"), spec.help, labels=spec.labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(full, spec.help, labels=spec.labels)
    return HistogramMetricFamily(full, spec.help, labels=spec.labels)


# What the collector reads at scrape time, as Protocols: this module sits below everything it
# reports on (the server bumps `Stats`), so it names none of their classes.


class ClientView(Protocol):
    @property
    def metric_state(self) -> str: ...


class ServerView(Protocol):
    @property
    def endpoint(self) -> object: ...


class PoolView(Protocol):
    @property
    def waiters(self) -> Sized: ...

    @property
    def idle(self) -> Iterable[ServerView]: ...

    @property
    def parked(self) -> Iterable[ServerView]: ...

    @property
    def active(self) -> Iterable[ServerView]: ...

    @property
    def resetting(self) -> Iterable[ServerView]: ...


class ReplicaView(Protocol):
    @property
    def endpoint(self) -> object: ...

    @property
    def region(self) -> str: ...

    @property
    def lag_seconds(self) -> float | None: ...

    @property
    def reachable(self) -> bool: ...


class TopologyView(Protocol):
    @property
    def writer(self) -> object | None: ...

    @property
    def replicas(self) -> Iterable[ReplicaView]: ...

    @property
    def writer_region(self) -> str | None: ...

    @property
    def state(self) -> ClusterStateView: ...

    @property
    def fenced(self) -> int: ...


class ClusterStateView(Protocol):
    @property
    def value(self) -> str: ...


class SidecarView(Protocol):
    @property
    def stats(self) -> Stats: ...

    @property
    def clients(self) -> Collection[ClientView]: ...

    @property
    def region_of(self) -> Mapping[str, str]: ...

    @property
    def pools(self) -> Mapping[tuple[str, str], PoolView]: ...

    @property
    def replica_pools(self) -> Mapping[Any, PoolView]: ...  # by (user, database, replica endpoint)

    @property
    def topology(self) -> TopologyView: ...

    @property
    def held_requests(self) -> int: ...

    @property
    def spool_pending(self) -> int: ...

    @property
    def statements(self) -> Sized: ...


class SidecarCollector(Collector):
    """Reads the sidecar's state at scrape time."""

    def __init__(self, sidecar: SidecarView) -> None:
        self.sidecar = sidecar

    def collect(self) -> Iterator[Metric]:
        sidecar = self.sidecar
        stats = sidecar.stats
        families = {name: _family(name) for name in FAMILIES}

        def gauge(name: str, value: float, *labels: str) -> None:
            families[name].add_metric(list(labels), value)  # type: ignore[attr-defined]

        clients = Counter(c.metric_state for c in sidecar.clients)
        for state in CLIENT_STATES:
            gauge("client_connections", clients.get(state, 0), state)
        regions = sidecar.region_of
        servers: Counter[tuple[str, str, str]] = Counter()
        waiting = 0
        for pool in (*sidecar.pools.values(), *sidecar.replica_pools.values()):
            waiting += len(pool.waiters)
            for state, conns in (
                ("idle", (*pool.idle, *pool.parked)),
                ("active", pool.active),
                ("resetting", pool.resetting),
            ):
                for conn in conns:
                    host = str(conn.endpoint)
                    servers[(regions.get(host, ""), host, state)] += 1
        for (region, host, state), n in sorted(servers.items()):
            gauge("server_connections", n, region, host, state)
        gauge("pool_waiting_clients", waiting)
        gauge("transactions_total", stats.transactions)
        gauge("queries_total", stats.queries)
        families["query_duration_seconds"].add_metric(  # type: ignore[attr-defined]
            [], stats.query_duration.cumulative(), stats.query_duration.total
        )
        topology = sidecar.topology
        if topology.writer is not None:
            gauge("writer_info", 1, topology.writer_region or "", str(topology.writer))
        for state in CLUSTER_STATES:
            gauge("cluster_state", 1 if topology.state.value == state else 0, state)
        for kind in FAILOVER_KINDS:
            gauge("failovers_total", stats.failovers.get(kind, 0), kind)
        families["failover_duration_seconds"].add_metric(  # type: ignore[attr-defined]
            [], stats.failover_duration.cumulative(), stats.failover_duration.total
        )
        gauge("held_requests", sidecar.held_requests)
        gauge("spool_pending", sidecar.spool_pending)
        for result in SPOOL_RESULTS:
            gauge("spool_records_total", stats.spool_records.get(result, 0), result)
        for sqlstate, n in sorted(stats.upstream_errors.items()):
            gauge("upstream_errors_total", n, sqlstate)
        gauge("clients_accepted_total", stats.clients_accepted)
        for sqlstate, n in sorted(stats.clients_refused.items()):
            gauge("clients_refused_total", n, sqlstate)
        gauge("server_logins_total", stats.server_logins)
        for sqlstate, n in sorted(stats.client_errors.items()):
            gauge("client_errors_total", n, sqlstate)
        gauge("stale_writers_fenced_total", topology.fenced)
        for replica in topology.replicas:
            if replica.reachable and replica.lag_seconds is not None:
                gauge("replica_lag_seconds", replica.lag_seconds, replica.region, str(replica.endpoint))
        for result in REPLAY_RESULTS:
            gauge("transaction_replays_total", stats.transaction_replays.get(result, 0), result)
        for outcome in COMMIT_OUTCOMES:
            gauge("commit_outcomes_total", stats.commit_outcomes.get(outcome, 0), outcome)
        gauge("prepared_statements", len(sidecar.statements))
        yield from families.values()


def make_registry(sidecar: SidecarView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(sidecar))
    return registry
