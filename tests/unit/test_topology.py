"""The cluster state machine of TopologyMonitor, driven by a scripted provider: no sockets, no
PostgreSQL. Each test runs its own event loop (asyncio.run) and steps the monitor with `refresh()`,
or runs it for real (`start()`) with a short check_interval where the timing is the point."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import pytest

from proxy.protocol.sqlstate import UpstreamUnavailable
from proxy.server import QueryResult, ServerConnection
from proxy.topology import (
    ClusterState,
    NodeStatus,
    StaticProvider,
    TopologyMonitor,
    TopologyProvider,
)
from sidecar_config import Endpoint

UP, FAILING_OVER, OUTAGE, RECOVERING = (
    ClusterState.UP, ClusterState.FAILING_OVER, ClusterState.OUTAGE, ClusterState.RECOVERING,
)  # fmt: skip
HOME, DR = "home", "dr"
A = Endpoint("10.0.0.1", 5432)  # home
B = Endpoint("10.0.0.2", 5432)  # home
C = Endpoint("10.1.0.1", 5432)  # dr
REGION = {A: HOME, B: HOME, C: DR}


def writer(ep: Endpoint, timeline: int = 1) -> NodeStatus:
    return NodeStatus(ep, REGION[ep], reachable=True, writer=True, timeline=timeline)


def reader(ep: Endpoint) -> NodeStatus:
    return NodeStatus(ep, REGION[ep], reachable=True, writer=False)


def down(ep: Endpoint, error: str = "connection refused") -> NodeStatus:
    return NodeStatus(ep, REGION[ep], reachable=False, error=error)


class Hang:
    """A probe that never answers by itself (until cancelled, or `release`d if it has an answer)."""

    def __init__(self, then: list[NodeStatus] | None = None) -> None:
        self.then = then
        self.started = asyncio.Event()
        self.release = asyncio.Event()


Answer = list[NodeStatus] | BaseException | Hang


class FakeProvider:
    """A TopologyProvider whose answers the test scripts: each probe takes the next scripted answer,
    and repeats the last one once the script has run out (like a cluster that stays as it is)."""

    def __init__(self, *answers: Answer) -> None:
        self.script: deque[Answer] = deque(answers)
        self.last: Answer = []
        self.floors: list[int] = []  # the timeline_floor each probe was given
        self.adopted: list[TopologyProvider] = []
        self.adopt_answer = True
        self.closed = False

    def then(self, *answers: Answer) -> None:
        self.script.extend(answers)

    async def probe(self, timeline_floor: int = 0) -> list[NodeStatus]:
        self.floors.append(timeline_floor)
        answer = self.script.popleft() if self.script else self.last
        self.last = answer
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, Hang):
            answer.started.set()
            await answer.release.wait()
            if answer.then is None:
                raise AssertionError("a hanging probe without an answer was released")
            return list(answer.then)
        return list(answer)

    def adopt(self, fresh: TopologyProvider) -> bool:
        self.adopted.append(fresh)
        return self.adopt_answer

    async def close(self) -> None:
        self.closed = True


@dataclass
class Seen:
    previous: ClusterState
    state: ClusterState
    previous_writer: Endpoint | None
    writer: Endpoint | None


@dataclass
class Recorder:
    """A listener recording every transition, and counting failovers from what the monitor exposes
    at that moment exactly as the Sidecar's listener does (kind by lost vs new writer region)."""

    monitor: TopologyMonitor
    seen: list[Seen] = field(default_factory=list)
    failovers: dict[str, int] = field(default_factory=lambda: {"instance": 0, "region": 0})
    durations: list[float] = field(default_factory=list)

    def __call__(
        self,
        previous: ClusterState,
        state: ClusterState,
        previous_writer: Endpoint | None,
        new: Endpoint | None,
    ) -> None:
        mon = self.monitor
        # The listener sees the new state already published.
        assert (mon.state, mon.writer, mon.published.writer) == (state, new, new)
        self.seen.append(Seen(previous, state, previous_writer, new))
        if new is None:
            return
        lost, lost_at = mon.lost_writer, mon.lost_at
        if lost is not None and lost_at is not None and lost != new:
            kind = "instance" if mon.lost_region == mon.writer_region else "region"
            self.failovers[kind] += 1
            self.durations.append(asyncio.get_running_loop().time() - lost_at)

    def steps(self) -> list[tuple[ClusterState, ClusterState, Endpoint | None, Endpoint | None]]:
        return [(s.previous, s.state, s.previous_writer, s.writer) for s in self.seen]


def monitor_for(
    provider: FakeProvider, check_interval: float = 60.0, hold_timeout: float = 30.0
) -> tuple[TopologyMonitor, Recorder]:
    monitor = TopologyMonitor(provider, check_interval, hold_timeout)
    recorder = Recorder(monitor)
    monitor.add_listener(recorder)
    return monitor, recorder


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` (generous bound for a loaded machine)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [cast("dict[str, object]", getattr(r, "fields", {})) for r in caplog.records if r.msg == name]


# ---------------------------------------------------------------- startup


def test_first_probe_with_a_writer_is_up():
    async def scenario() -> None:
        provider = FakeProvider([writer(A, 3), reader(B), reader(C)])
        monitor, rec = monitor_for(provider)
        assert (monitor.state, monitor.writer, monitor.probes) == (OUTAGE, None, 0)
        assert not monitor.first_probe.is_set()
        await monitor.refresh()
        assert (monitor.state, monitor.writer, monitor.writer_region) == (UP, A, HOME)
        assert monitor.published.writer == A
        assert (monitor.writer_timeline, monitor.max_timeline) == (3, 3)
        assert monitor.probes == 1 and monitor.first_probe.is_set()
        assert monitor.nodes == [writer(A, 3), reader(B), reader(C)]
        assert rec.steps() == [(OUTAGE, UP, None, A)]
        assert rec.failovers == {"instance": 0, "region": 0}
        assert not monitor.writer_seen  # no writer was ever lost: not a recovery
        # The same answer again changes nothing and tells no one.
        await monitor.refresh()
        assert len(rec.seen) == 1 and provider.floors == [0, 3]

    asyncio.run(scenario())


def test_no_writer_at_startup_stays_outage_without_a_transition():
    async def scenario() -> None:
        provider = FakeProvider([down(A, "probe timed out"), reader(B), down(C)])
        monitor, rec = monitor_for(provider)
        assert monitor.problem == "no probe has completed yet"
        await monitor.refresh()
        await monitor.refresh()
        assert (monitor.state, monitor.writer) == (OUTAGE, None)
        assert rec.seen == [] and monitor.probes == 2 and monitor.first_probe.is_set()
        assert monitor.problem == (
            "no node reports itself as writer; unreachable: 10.0.0.1:5432 (probe timed out), "
            "10.1.0.1:5432 (connection refused)"
        )
        # The first writer after all: UP directly (nothing was lost in this process's life).
        provider.then([reader(A), writer(B)])
        await monitor.refresh()
        assert rec.steps() == [(OUTAGE, UP, None, B)]

    asyncio.run(scenario())


def test_recovery_required_at_startup_goes_through_recovering():
    async def scenario() -> None:
        monitor, rec = monitor_for(FakeProvider([writer(A)]))
        monitor.recovery_required = True  # e.g. a spool left over from before a restart
        await monitor.refresh()
        assert (monitor.state, monitor.writer) == (RECOVERING, A)
        assert not monitor.recovery_required
        await monitor.refresh()
        assert monitor.state is RECOVERING  # only the drain ends it
        monitor.recovered()
        assert rec.steps() == [(OUTAGE, RECOVERING, None, A), (RECOVERING, UP, A, A)]
        assert rec.failovers == {"instance": 0, "region": 0}

    asyncio.run(scenario())


# ---------------------------------------------------------------- failover


def test_writer_lost_then_a_new_writer_in_the_same_region_is_an_instance_failover():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B), reader(C)])
        monitor, rec = monitor_for(provider)
        await monitor.refresh()
        provider.then([down(A), reader(B), reader(C)])
        await monitor.refresh()
        assert (monitor.state, monitor.writer, monitor.published.writer) == (FAILING_OVER, None, None)
        assert (monitor.writer_region, monitor.lost_writer, monitor.lost_region) == (None, A, HOME)
        assert monitor.lost_at is not None
        assert "unreachable: 10.0.0.1:5432 (connection refused)" in monitor.problem
        # Still none: held, no new transition.
        await monitor.refresh()
        assert monitor.state is FAILING_OVER and len(rec.seen) == 2
        provider.then([down(A), writer(B, 2), reader(C)])
        await monitor.refresh()
        assert (monitor.state, monitor.writer, monitor.writer_region) == (UP, B, HOME)
        assert rec.steps() == [
            (OUTAGE, UP, None, A),
            (UP, FAILING_OVER, A, None),
            (FAILING_OVER, UP, None, B),
        ]
        assert rec.failovers == {"instance": 1, "region": 0}
        assert len(rec.durations) == 1 and rec.durations[0] >= 0
        assert monitor.lost_at is None  # the failover is over
        assert monitor.max_timeline == 2 and monitor.writer_seen

    asyncio.run(scenario())


def test_a_writer_in_another_region_is_a_region_failover():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B), reader(C)])
        monitor, rec = monitor_for(provider)
        await monitor.refresh()
        provider.then([down(A), down(B), reader(C)], [down(A), down(B), writer(C, 2)])
        await monitor.refresh()
        await monitor.refresh()
        assert (monitor.state, monitor.writer, monitor.writer_region) == (UP, C, DR)
        assert rec.steps()[-1] == (FAILING_OVER, UP, None, C)
        assert rec.failovers == {"instance": 0, "region": 1}

    asyncio.run(scenario())


def test_a_writer_replaced_within_one_probe_round_goes_up_to_up():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)], [reader(A), writer(B, 2)])
        monitor, rec = monitor_for(provider)
        await monitor.refresh()
        await monitor.refresh()
        assert rec.steps() == [(OUTAGE, UP, None, A), (UP, UP, A, B)]
        assert (monitor.lost_writer, monitor.lost_region) == (A, HOME)
        assert rec.failovers == {"instance": 1, "region": 0}
        assert len(rec.durations) == 1 and 0 <= rec.durations[0] < 1.0  # lost and replaced at once

    asyncio.run(scenario())


def test_the_old_writer_coming_back_during_failover_is_not_a_failover():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)], [down(A), reader(B)], [writer(A), reader(B)])
        monitor, rec = monitor_for(provider)
        for _ in range(3):
            await monitor.refresh()
        assert rec.steps() == [
            (OUTAGE, UP, None, A),
            (UP, FAILING_OVER, A, None),
            (FAILING_OVER, UP, None, A),
        ]
        assert rec.failovers == {"instance": 0, "region": 0}

    asyncio.run(scenario())


# ---------------------------------------------------------------- fencing


def test_a_restarted_old_primary_on_an_older_timeline_is_fenced(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="pgsidecar")

    async def scenario() -> None:
        provider = FakeProvider(
            [writer(A, 1), reader(B)],
            [down(A), reader(B)],
            [down(A), writer(B, 2)],  # B promoted: a new timeline
            [writer(A, 1), writer(B, 2)],  # A restarted read-write on its old timeline
            [writer(A, 1), writer(B, 2)],
        )
        monitor, rec = monitor_for(provider)
        for _ in range(5):
            await monitor.refresh()
        assert (monitor.state, monitor.writer, monitor.max_timeline) == (UP, B, 2)
        assert rec.steps()[-1] == (FAILING_OVER, UP, None, B)
        fenced = events(caplog, "stale_writer_fenced")
        assert len(fenced) == 1  # logged once per (node, timeline), not every probe
        assert fenced[0]["upstream"] == "10.0.0.1:5432" and fenced[0]["timeline"] == 1
        assert fenced[0]["newest_timeline"] == 2
        assert provider.floors == [0, 1, 1, 2, 2]  # the newest timeline seen is passed down

        # The real writer lost: the stale one is still never used, however long it is alone.
        provider.then([writer(A, 1), down(B)])
        await monitor.refresh()
        await monitor.refresh()
        assert (monitor.state, monitor.writer) == (FAILING_OVER, None)
        assert "fenced stale writers: 10.0.0.1:5432" in monitor.problem
        assert "unreachable: 10.0.0.2:5432" in monitor.problem
        monitor.retune(provider, 60.0, 0.0)
        await monitor.refresh()
        assert (monitor.state, monitor.writer) == (OUTAGE, None)
        assert all(s.writer != A for s in rec.seen[1:])

    asyncio.run(scenario())


def test_two_writers_while_none_is_current_the_newest_timeline_wins():
    async def scenario() -> None:
        provider = FakeProvider([writer(A, 4), writer(C, 5), writer(B, 3)])
        monitor, rec = monitor_for(provider)
        await monitor.refresh()
        assert (monitor.writer, monitor.max_timeline) == (C, 5)
        assert rec.steps() == [(OUTAGE, UP, None, C)]

    asyncio.run(scenario())


def test_two_writers_on_the_same_timeline_keep_the_current_one(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="pgsidecar")

    async def scenario() -> None:
        # Split brain with no timeline to tell them apart: the first in configured order at
        # startup, then the current writer is kept (no flapping) whatever the order.
        provider = FakeProvider([writer(A, 2), writer(B, 2)], [writer(B, 2), writer(A, 2)])
        monitor, rec = monitor_for(provider)
        await monitor.refresh()
        assert monitor.writer == A
        await monitor.refresh()
        assert monitor.writer == A and rec.steps() == [(OUTAGE, UP, None, A)]
        fenced = events(caplog, "stale_writer_fenced")
        assert [(f["upstream"], f["writer"]) for f in fenced] == [("10.0.0.2:5432", "10.0.0.1:5432")]

    asyncio.run(scenario())


def test_a_writer_on_a_newer_timeline_beats_the_current_writer():
    async def scenario() -> None:
        # A standby was promoted (timeline 2) while the current writer A, cut off from it but
        # not from us, still says it is the writer on timeline 1. The newest timeline is the
        # real writer: writes sent to A would be lost with A's diverged history.
        provider = FakeProvider([writer(A, 1), reader(B)], [writer(A, 1), writer(B, 2)])
        monitor, rec = monitor_for(provider)
        await monitor.refresh()
        await monitor.refresh()
        assert (monitor.writer, monitor.max_timeline) == (B, 2)
        assert rec.steps() == [(OUTAGE, UP, None, A), (UP, UP, A, B)]

    asyncio.run(scenario())


# ---------------------------------------------------------------- hold timeout, outage, recovery


def test_failing_over_becomes_outage_only_after_the_hold_timeout():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)], [down(A), reader(B)])
        monitor, rec = monitor_for(provider, hold_timeout=3600.0)
        await monitor.refresh()
        for _ in range(3):
            await monitor.refresh()
        assert monitor.state is FAILING_OVER
        # A reload shortens the hold: it counts from the loss, so the next probe ends it.
        provider.adopt_answer = True
        assert monitor.retune(provider, 60.0, 0.0)
        assert monitor.hold_timeout == 0.0
        await monitor.refresh()
        assert (monitor.state, monitor.writer) == (OUTAGE, None)
        assert rec.steps()[-1] == (FAILING_OVER, OUTAGE, None, None)
        assert monitor.lost_writer == A and monitor.writer_seen

    asyncio.run(scenario())


def test_hold_timeout_on_a_running_monitor():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)])
        monitor, rec = monitor_for(provider, check_interval=0.005, hold_timeout=0.05)
        monitor.start()
        try:
            await until(lambda: monitor.state is UP)
            provider.then([down(A), reader(B)])
            await until(lambda: monitor.state is FAILING_OVER)
            lost_at = monitor.lost_at
            assert lost_at is not None
            await until(lambda: monitor.state is OUTAGE)
            assert asyncio.get_running_loop().time() - lost_at >= 0.05
            assert rec.steps() == [
                (OUTAGE, UP, None, A),
                (UP, FAILING_OVER, A, None),
                (FAILING_OVER, OUTAGE, None, None),
            ]
        finally:
            await monitor.stop()
        assert provider.closed

    asyncio.run(scenario())


def test_outage_then_the_writer_returns_recovering_until_recovered():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)], [down(A), reader(B)])
        monitor, rec = monitor_for(provider, hold_timeout=0.0)
        await monitor.refresh()
        await monitor.refresh()
        await monitor.refresh()
        assert monitor.state is OUTAGE
        monitor.recovered()  # not RECOVERING: nothing happens
        assert monitor.state is OUTAGE and len(rec.seen) == 3
        provider.then([writer(A), reader(B)])
        await monitor.refresh()
        # The writer is published (the spool replays through it) but the state says recovering.
        assert (monitor.state, monitor.writer, monitor.published.writer) == (RECOVERING, A, A)
        assert await monitor.wait_for_writer(0.0) == A
        for _ in range(3):
            await monitor.refresh()
        assert monitor.state is RECOVERING  # not UP before the spool has drained
        monitor.recovered()
        assert (monitor.state, monitor.writer) == (UP, A)
        monitor.recovered()
        assert rec.steps()[3:] == [(OUTAGE, RECOVERING, None, A), (RECOVERING, UP, A, A)]
        assert rec.failovers == {"instance": 0, "region": 0}  # the same writer came back

    asyncio.run(scenario())


def test_outage_then_a_new_writer_is_a_counted_failover_through_recovering():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(C)], [down(A), down(C)])
        monitor, rec = monitor_for(provider, hold_timeout=0.0)
        for _ in range(3):
            await monitor.refresh()
        assert monitor.state is OUTAGE
        provider.then([down(A), writer(C, 2)])
        await monitor.refresh()
        assert (monitor.state, monitor.writer, monitor.writer_region) == (RECOVERING, C, DR)
        assert rec.failovers == {"instance": 0, "region": 1}
        assert monitor.lost_at is None

    asyncio.run(scenario())


def test_recovering_writer_lost_again_is_outage_and_another_writer_stays_recovering():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)], [down(A), reader(B)])
        monitor, rec = monitor_for(provider, hold_timeout=0.0)
        for _ in range(3):
            await monitor.refresh()
        provider.then([writer(A), reader(B)], [down(A), reader(B)])
        await monitor.refresh()
        assert monitor.state is RECOVERING
        await monitor.refresh()
        assert (monitor.state, monitor.writer) == (OUTAGE, None)  # straight back, no hold
        assert rec.steps()[-1] == (RECOVERING, OUTAGE, A, None)
        # Back to RECOVERING with A, then B replaces A before the drain ends: still recovering.
        provider.then([writer(A), reader(B)], [down(A), writer(B, 2)])
        await monitor.refresh()
        await monitor.refresh()
        assert (monitor.state, monitor.writer) == (RECOVERING, B)
        assert rec.steps()[-2:] == [(OUTAGE, RECOVERING, None, A), (RECOVERING, RECOVERING, A, B)]
        assert rec.failovers == {"instance": 1, "region": 0}
        monitor.recovered()
        assert (monitor.state, monitor.writer) == (UP, B)

    asyncio.run(scenario())


# ---------------------------------------------------------------- waiting for a writer


def test_wait_for_writer_returns_once_a_writer_is_confirmed():
    async def scenario() -> None:
        # A long check interval: only wait_for_writer's own request for a probe gets the writer.
        provider = FakeProvider([down(A), reader(B)], [down(A), writer(B)])
        monitor, _ = monitor_for(provider, check_interval=3600.0)
        monitor.start()
        try:
            await until(lambda: monitor.probes == 1)
            assert await monitor.wait_for_writer(5.0) == B
            assert monitor.state is UP
        finally:
            await monitor.stop()

    asyncio.run(scenario())


def test_wait_for_writer_times_out_with_the_reason():
    async def scenario() -> None:
        provider = FakeProvider([down(A), reader(B)])
        monitor, _ = monitor_for(provider, check_interval=0.005)
        monitor.start()
        try:
            with pytest.raises(UpstreamUnavailable) as caught:
                await monitor.wait_for_writer(0.05)
            assert caught.value.sqlstate == "08006"
            assert str(caught.value) == (
                "no writable upstream: no node reports itself as writer; "
                "unreachable: 10.0.0.1:5432 (connection refused)"
            )
            assert monitor.probes >= 1
        finally:
            await monitor.stop()

    asyncio.run(scenario())


def test_wait_for_writer_held_through_a_failover_gets_the_new_writer():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)])
        monitor, _ = monitor_for(provider, check_interval=0.005)
        monitor.start()
        try:
            await until(lambda: monitor.state is UP)
            provider.then([down(A), reader(B)])
            await until(lambda: monitor.state is FAILING_OVER)
            waiter = asyncio.create_task(monitor.wait_for_writer(5.0))
            await asyncio.sleep(0.02)
            assert not waiter.done()  # held, not failed
            provider.then([down(A), writer(B, 2)])
            assert await waiter == B
        finally:
            await monitor.stop()

    asyncio.run(scenario())


def test_report_failure_probes_at_once():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)], [down(A), reader(B)])
        monitor, _ = monitor_for(provider, check_interval=3600.0)
        monitor.start()
        try:
            await until(lambda: monitor.probes == 1)
            monitor.report_failure(A, "connection reset")
            await until(lambda: monitor.probes == 2)
            assert monitor.state is FAILING_OVER
        finally:
            await monitor.stop()

    asyncio.run(scenario())


def test_confirm_writer_still_the_writer():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)])
        monitor, _ = monitor_for(provider, check_interval=3600.0)
        monitor.start()
        try:
            await until(lambda: monitor.probes == 1)
            assert await asyncio.wait_for(monitor.confirm_writer(A, "server closed the connection"), 5.0)
            assert monitor.probes == 2  # answered by a fresh probe
            assert not await asyncio.wait_for(monitor.confirm_writer(B, "refused"), 5.0)
        finally:
            await monitor.stop()

    asyncio.run(scenario())


def test_confirm_writer_ignores_a_probe_already_running_when_the_failure_happened():
    async def scenario() -> None:
        # The probe in flight when the writer failed was asked before the failure: it still says
        # A. Only the probe started after it counts, and that one finds B.
        in_flight = Hang([writer(A), reader(B)])
        provider = FakeProvider([writer(A), reader(B)], in_flight, [down(A), writer(B, 2)])
        monitor, _ = monitor_for(provider, check_interval=0.005)
        monitor.start()
        try:
            await asyncio.wait_for(in_flight.started.wait(), 5.0)
            assert monitor.writer == A
            confirming = asyncio.create_task(monitor.confirm_writer(A, "connection reset"))
            await asyncio.sleep(0.01)
            in_flight.release.set()
            assert await asyncio.wait_for(confirming, 5.0) is False
            assert monitor.writer == B
        finally:
            await monitor.stop()

    asyncio.run(scenario())


def test_confirm_writer_gives_up_with_the_failed_writer_on_failover():
    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)], [down(A), reader(B)])
        monitor, _ = monitor_for(provider, check_interval=3600.0)
        monitor.start()
        try:
            await until(lambda: monitor.probes == 1)
            assert not await asyncio.wait_for(monitor.confirm_writer(A, "refused"), 5.0)
            assert monitor.state is FAILING_OVER
        finally:
            await monitor.stop()

    asyncio.run(scenario())


# ---------------------------------------------------------------- retune


def test_retune_applies_interval_and_hold_and_hands_the_hosts_to_the_provider():
    async def scenario() -> None:
        provider = FakeProvider([writer(A)])
        monitor, _ = monitor_for(provider, check_interval=3600.0, hold_timeout=30.0)
        monitor.start()
        try:
            await until(lambda: monitor.probes == 1)
            fresh = FakeProvider()
            assert monitor.retune(fresh, 0.005, 7.0)
            assert provider.adopted == [fresh] and monitor.hold_timeout == 7.0
            # The new interval applies from the next wait (the pending one is an hour long).
            monitor.report_failure(A, "wake up")
            await until(lambda: monitor.probes >= 5)
            provider.adopt_answer = False  # e.g. static -> aurora: needs a restart
            assert not monitor.retune(FakeProvider(), 0.005, 7.0)
        finally:
            await monitor.stop()

    asyncio.run(scenario())


# ---------------------------------------------------------------- a failing or hanging provider


def test_a_probe_that_raises_does_not_stop_the_monitor(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="pgsidecar")

    async def scenario() -> None:
        provider = FakeProvider([writer(A), reader(B)], RuntimeError("provider bug"))
        monitor, rec = monitor_for(provider, check_interval=0.005)
        monitor.start()
        try:
            await until(lambda: monitor.probes >= 5)
            assert monitor._task is not None and not monitor._task.done()
            # Nothing was learnt from a failed probe: the state stands as it was.
            assert (monitor.state, monitor.writer) == (UP, A)
            assert rec.steps() == [(OUTAGE, UP, None, A)]
            failed = events(caplog, "topology_probe_failed")
            assert failed and failed[0]["error"] == "RuntimeError('provider bug')"
            # The next answer is acted on as usual.
            provider.then([down(A), reader(B)])
            await until(lambda: monitor.state is FAILING_OVER)
        finally:
            await monitor.stop()

    asyncio.run(scenario())


def test_a_hung_provider_does_not_hang_waiters_or_stop():
    async def scenario() -> None:
        hung = Hang()
        provider = FakeProvider(hung)
        monitor, rec = monitor_for(provider, check_interval=0.005)
        monitor.start()
        await asyncio.wait_for(hung.started.wait(), 5.0)
        with pytest.raises(UpstreamUnavailable, match="no probe has completed yet"):
            await monitor.wait_for_writer(0.02)
        await asyncio.wait_for(monitor.stop(), 5.0)
        assert provider.closed and rec.seen == [] and monitor.probes == 1

    asyncio.run(scenario())


# StaticProvider over fake connections: the per-node probe timeout is what turns a hung or
# refusing node into an unreachable one.


class FakeConnection:
    """A kept-open probe connection answering as its host currently behaves."""

    def __init__(self, behaviour: dict[Endpoint, str], endpoint: Endpoint) -> None:
        self.behaviour = behaviour
        self.endpoint = endpoint
        self.transport: object | None = object()

    async def simple_query(self, sql: str) -> QueryResult:
        what = self.behaviour[self.endpoint]
        if what == "hang":
            await asyncio.Event().wait()
        if what == "refuse":
            raise ConnectionResetError(104, "Connection reset by peer")
        result = QueryResult()
        result.rows = [["t", None]] if what == "reader" else [["f", what.removeprefix("writer:")]]
        return result

    def close(self, reason: str) -> None:
        self.transport = None


def connector(behaviour: dict[Endpoint, str]) -> Callable[[Endpoint], Awaitable[ServerConnection]]:
    """Per host: "writer:<hex timeline>", "reader", "hang" or "refuse" (changeable mid-test)."""

    async def connect(endpoint: Endpoint) -> ServerConnection:
        what = behaviour[endpoint]
        if what == "hang":
            await asyncio.Event().wait()
        if what == "refuse":
            raise ConnectionRefusedError(111, "Connection refused")
        return cast(ServerConnection, FakeConnection(behaviour, endpoint))

    return connect


def test_static_provider_reports_hung_and_refusing_hosts_unreachable():
    async def scenario() -> None:
        behaviour = {A: "hang", B: "refuse", C: "writer:0000000A"}
        provider = StaticProvider([(HOME, [A, B]), (DR, [C])], connector(behaviour), timeout=0.05)
        # A floor above C's timeline: C is not decisive, so every host's own answer is awaited.
        nodes = await asyncio.wait_for(provider.probe(timeline_floor=11), 5.0)
        assert nodes == [
            NodeStatus(A, HOME, reachable=False, error="probe timed out"),
            NodeStatus(B, HOME, reachable=False, error="[Errno 111] Connection refused"),
            NodeStatus(C, DR, reachable=True, writer=True, timeline=10),
        ]
        await provider.close()

    asyncio.run(scenario())


def test_static_provider_does_not_wait_for_a_black_hole_once_the_writer_answered():
    async def scenario() -> None:
        behaviour = {A: "writer:00000002", B: "hang", C: "reader"}
        provider = StaticProvider([(HOME, [A, B]), (DR, [C])], connector(behaviour), timeout=3600.0)
        nodes = await asyncio.wait_for(provider.probe(timeline_floor=2), 5.0)
        assert nodes == [
            NodeStatus(A, HOME, reachable=True, writer=True, timeline=2),
            NodeStatus(B, HOME, reachable=False, error="no answer yet"),
            NodeStatus(C, DR, reachable=True, writer=False),
        ]
        await provider.close()

    asyncio.run(scenario())


def test_monitor_over_static_provider_fails_over_when_the_writer_hangs():
    async def scenario() -> None:
        behaviour = {A: "writer:00000001", B: "reader"}
        provider = StaticProvider([(HOME, [A, B])], connector(behaviour), timeout=0.05)
        monitor = TopologyMonitor(provider, 3600.0, 30.0)
        await monitor.refresh()
        assert (monitor.state, monitor.writer) == (UP, A)
        # A is black-holed: its kept-open probe connection gets no answer.
        behaviour[A] = "hang"
        await asyncio.wait_for(monitor.refresh(), 5.0)
        assert (monitor.state, monitor.writer) == (FAILING_OVER, None)
        assert "10.0.0.1:5432 (probe timed out)" in monitor.problem
        behaviour[B] = "writer:00000002"  # promoted
        await asyncio.wait_for(monitor.refresh(), 5.0)
        assert (monitor.state, monitor.writer, monitor.max_timeline) == (UP, B, 2)
        await monitor.stop()

    asyncio.run(scenario())
