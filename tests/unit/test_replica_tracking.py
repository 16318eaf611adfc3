"""TopologyMonitor's replica view: the lag definition, the chooser and commit marks, stepped with
scripted probe results and explicit times (no sockets; the real thing is in
tests/integration/test_replicas.py)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.topology import NodeStatus, ReplicaInfo, TopologyMonitor, format_lsn, parse_lsn
from sidecar_config import Endpoint

W = Endpoint("10.0.0.1", 5432)  # home, writer
R1 = Endpoint("10.0.0.2", 5432)  # home
R2 = Endpoint("10.0.0.3", 5432)  # home
D1 = Endpoint("10.1.0.1", 5432)  # dr
REGION = {W: "home", R1: "home", R2: "home", D1: "dr"}


class _Idle:
    async def probe(self, timeline_floor: int = 0) -> list[NodeStatus]:
        return []

    def adopt(self, fresh: object) -> bool:
        return True

    async def close(self) -> None:
        pass


def monitor(max_lag: float = 5.0) -> TopologyMonitor:
    mon = TopologyMonitor(_Idle(), 0.25)
    mon.set_routing(("home", "dr"), max_lag)
    return mon


def writer(lsn: int, insert: int | None = None) -> NodeStatus:
    return NodeStatus(W, "home", True, writer=True, timeline=1, lsn=lsn, insert_lsn=insert or lsn)


def standby(ep: Endpoint, lsn: int | None, age: float | None = 1.0, paused: bool = False) -> NodeStatus:
    return NodeStatus(ep, REGION[ep], True, lsn=lsn, replay_age=age, paused=paused)


def down(ep: Endpoint) -> NodeStatus:
    return NodeStatus(ep, REGION[ep], False, error="connection refused")


def step(mon: TopologyMonitor, nodes: list[NodeStatus], started: float, now: float, seq: int = 0) -> None:
    best = next((n for n in nodes if n.writer and n.reachable), None)
    mon._track_replicas(nodes, best, seq, started, now)


def lag(mon: TopologyMonitor, ep: Endpoint) -> float | None:
    info = mon.replica(ep)
    assert info is not None
    return info.lag_seconds


def test_lsn_text_round_trip() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("0/3000060")) == "0/3000060"


def test_caught_up_standby_has_no_lag_and_a_paused_one_grows() -> None:
    mon = monitor()
    step(mon, [writer(100), standby(R1, 100), standby(R2, 100)], 0.0, 0.1)
    assert lag(mon, R1) == 0.0 and lag(mon, R2) == 0.0
    # R2 paused at 100; the writer moves on, R1 keeps up.
    step(mon, [writer(200), standby(R1, 200), standby(R2, 100, paused=True)], 1.0, 1.1)
    assert lag(mon, R1) == 0.0
    assert lag(mon, R2) == 1.1  # the writer was last seen at <= 100 when the probe at 0.0 started
    step(mon, [writer(300), standby(R1, 290), standby(R2, 100, paused=True)], 7.0, 7.1)
    assert lag(mon, R2) == 7.1
    assert lag(mon, R1) == 6.1  # behind this probe's 300, holds what the writer had at 1.0
    info = mon.replica(R2)
    assert info is not None and info.paused is True and info.replay_lsn == 100


def test_quiet_writer_paused_standby_holds_everything() -> None:
    mon = monitor()
    for t in range(10):
        step(mon, [writer(500), standby(R1, 500, age=3600.0, paused=True)], float(t), t + 0.1)
    assert lag(mon, R1) == 0.0  # nothing was written that it lacks, however old its last commit


def test_behind_the_whole_history_the_replay_timestamp_bounds_the_lag() -> None:
    mon = monitor()
    step(mon, [writer(1000), standby(R1, 10, age=42.0)], 5.0, 5.1)
    assert lag(mon, R1) == 42.0
    step(mon, [writer(1000), standby(R1, 10, age=None)], 6.0, 6.1)
    assert lag(mon, R1) is None  # nothing bounds it: unknown, never chosen


def test_without_a_writer_lag_is_frozen_at_the_last_sighting() -> None:
    mon = monitor()
    step(mon, [writer(100), standby(R1, 100), standby(D1, 100)], 0.0, 0.1)
    step(mon, [writer(200), standby(R1, 200), standby(D1, 100)], 1.0, 1.1)
    # The writer is gone: R1 holds everything it was last seen with, D1 was 1 s behind then.
    for now in (5.0, 50.0, 500.0):
        step(mon, [down(W), standby(R1, 200), standby(D1, 100)], now - 0.1, now)
        assert lag(mon, R1) == 0.0
        assert lag(mon, D1) == 1.0
    assert mon.choose_replica() == R1  # home first
    assert mon.replica(W) is not None and mon.replica(W).reachable is False  # type: ignore[union-attr]


def test_no_writer_ever_seen_compares_standbys_with_each_other() -> None:
    mon = monitor()
    step(mon, [down(W), standby(R1, 300, age=10.0), standby(D1, 200, age=25.0)], 0.0, 0.1)
    assert lag(mon, R1) == 0.0
    assert lag(mon, D1) == 15.0


def test_choose_replica_home_first_round_robin_lag_bound_and_min_lsn() -> None:
    mon = monitor(max_lag=5.0)
    step(mon, [writer(100), standby(R1, 100), standby(R2, 100), standby(D1, 100)], 0.0, 0.1)
    picks = [mon.choose_replica() for _ in range(4)]
    assert picks == [R1, R2, R1, R2]  # home region, round robin; dr unused while home qualifies
    step(mon, [writer(900), standby(R1, 100), standby(R2, 100), standby(D1, 900)], 9.0, 9.1)
    assert lag(mon, R1) == 9.1 and lag(mon, R2) == 9.1
    assert mon.choose_replica() == D1  # home lags past the bound: the next region
    step(mon, [writer(950), standby(R1, 950), standby(R2, 900), standby(D1, 920)], 10.0, 10.1)
    assert mon.choose_replica(min_lsn=940) == R1
    assert mon.choose_replica(min_lsn=940) == R1  # R2 has not replayed 940
    assert mon.choose_replica(min_lsn=951) is None  # nobody has: the writer
    mon.report_replica_failure(R1, "connection reset")
    assert mon.choose_replica(min_lsn=940) is None  # skipped until the next probe
    assert mon.choose_replica() in (R2,)
    step(mon, [writer(950), standby(R1, 950), standby(R2, 950), down(D1)], 11.0, 11.1)
    assert {mon.choose_replica(), mon.choose_replica()} == {R1, R2}


def test_zero_lag_bound_and_unknown_lag() -> None:
    mon = monitor(max_lag=0.0)
    step(mon, [writer(100), standby(R1, 99), standby(R2, 100)], 0.0, 0.1)
    assert mon.choose_replica() == R2
    step(mon, [writer(100), standby(R1, None, age=None)], 1.0, 1.1)
    assert mon.choose_replica() is None


def test_commit_marks_resolve_through_the_next_probe() -> None:
    mon = monitor()
    step(mon, [writer(100, insert=110), standby(R1, 110)], 0.0, 0.1, seq=1)
    mon._probes_started = 1
    mark = mon.commit_mark()  # a write committed after probe 1 started
    assert mon.commit_lsn(mark) is None
    assert mon.choose_replica(after_mark=mark) is None  # until a later probe: the writer
    step(mon, [writer(150, insert=160), standby(R1, 150)], 1.0, 1.1, seq=2)
    assert mon.commit_lsn(mark) == 160
    assert mon.choose_replica(after_mark=mark) is None  # R1 has replayed 150 < 160
    step(mon, [writer(160, insert=160), standby(R1, 160)], 2.0, 2.1, seq=3)
    assert mon.choose_replica(after_mark=mark) == R1


def test_writer_and_fenced_writers_are_never_replicas() -> None:
    mon = monitor()
    stale = NodeStatus(R2, "home", True, writer=True, timeline=0, lsn=5)
    step(mon, [writer(100), standby(R1, 100), stale], 0.0, 0.1)
    assert [r.endpoint for r in mon.replicas] == [R1]
    assert isinstance(mon.replicas[0], ReplicaInfo)


def test_listener_hears_set_changes_and_refresh_publishes() -> None:
    heard: list[frozenset[Endpoint]] = []

    class Scripted(_Idle):
        def __init__(self) -> None:
            self.answers = [
                [writer(100), standby(R1, 100), standby(D1, 100)],
                [writer(100), standby(R1, 100), standby(D1, 100)],
                [NodeStatus(R1, "home", True, writer=True, timeline=2, lsn=120), down(W), standby(D1, 100)],
            ]

        async def probe(self, timeline_floor: int = 0) -> list[NodeStatus]:
            return self.answers.pop(0)

    async def run() -> None:
        mon = TopologyMonitor(Scripted(), 0.25)
        mon.add_replica_listener(heard.append)
        for _ in range(3):
            await mon.refresh()
        assert mon.writer == R1
        assert [r.endpoint for r in mon.replicas if r.reachable] == [D1]
        assert mon.writer_lsn == 120
        assert not mon.is_replica(R1) and mon.is_replica(D1)

    asyncio.run(run())
    assert heard == [frozenset({R1, D1}), frozenset({D1})]


def test_a_standby_slower_than_the_writer_keeps_its_view_briefly() -> None:
    heard: list[frozenset[Endpoint]] = []
    mon = monitor()
    mon.add_replica_listener(heard.append)
    late = NodeStatus(R1, "home", False, error="no answer yet")
    step(mon, [writer(100), standby(R1, 100)], 0.0, 0.1)
    step(mon, [writer(100), late], 0.5, 0.6)
    info = mon.replica(R1)
    assert info is not None and info.reachable and info.lag_seconds == pytest.approx(0.5)
    assert mon.choose_replica() == R1
    assert heard == [frozenset({R1})]  # no flap: its pools stay
    step(mon, [writer(100), late], 3.0, 3.1)  # still silent past the carry-over: unreachable
    assert mon.replica(R1).reachable is False  # type: ignore[union-attr]
    assert mon.choose_replica() is None
    step(mon, [writer(100), standby(R1, 100)], 4.0, 4.1)
    step(mon, [writer(100), down(R1)], 4.2, 4.3)  # a failed answer is never carried over
    assert mon.replica(R1).reachable is False  # type: ignore[union-attr]
    assert heard == [frozenset({R1}), frozenset(), frozenset({R1}), frozenset()]
