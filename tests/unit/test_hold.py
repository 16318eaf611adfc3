"""HoldController: proceed, wait or spool, from the cluster state, PAUSE and the shutdown drain.
No sockets; each test runs its own event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from proxy.hold import HoldController, SpoolNow
from proxy.protocol.sqlstate import CannotConnectNow
from proxy.topology import ClusterState
from sidecar_config import Endpoint

UP, FAILING_OVER, OUTAGE, RECOVERING = (
    ClusterState.UP, ClusterState.FAILING_OVER, ClusterState.OUTAGE, ClusterState.RECOVERING,
)  # fmt: skip


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def controller(hold_timeout: float = 30.0, spool: bool = False) -> HoldController:
    return HoldController(hold_timeout, 0.05 if spool else None, lambda: "a1 refused the connection")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_open_gate_passes_at_once() -> None:
    async def test() -> None:
        hold = controller()
        assert not hold.gate.closed
        await asyncio.wait_for(hold.pass_(), 1)
        assert hold.held == 0

    run(test)


def test_pause_holds_without_limit_until_resume() -> None:
    async def test() -> None:
        hold = controller(hold_timeout=0.01)
        hold.close("admin PAUSE")
        assert hold.gate.closed and hold.reason == "admin PAUSE"
        waiting = asyncio.create_task(hold.pass_())
        await asyncio.sleep(0.05)  # well past hold_timeout: a PAUSE has no limit
        assert not waiting.done() and hold.held == 1
        hold.open()
        await asyncio.wait_for(waiting, 5)
        assert not hold.gate.closed and hold.held == 0 and hold.reason == ""

    run(test)


def test_failover_hold_ends_in_57P03_without_a_spool() -> None:
    async def test() -> None:
        hold = controller(hold_timeout=0.05)
        hold.cluster_state(FAILING_OVER, writer_known=False)
        assert hold.gate.closed and hold.for_failover and not hold.spooling
        with pytest.raises(CannotConnectNow) as caught:
            await asyncio.wait_for(hold.pass_(), 5)
        assert caught.value.code == "57P03"
        assert "failover.hold_timeout" in caught.value.message
        assert "a1 refused the connection" in caught.value.message
        assert hold.held == 0

    run(test)


def test_a_writer_within_the_hold_releases_the_waiters() -> None:
    async def test() -> None:
        hold = controller()
        hold.cluster_state(FAILING_OVER, writer_known=False)
        waiting = [asyncio.create_task(hold.pass_()) for _ in range(3)]
        await settle()
        assert hold.held == 3
        hold.cluster_state(UP, writer_known=True)
        assert hold.gate.closed  # UP alone does not release: the Sidecar does, after counting
        assert hold.release_failover()
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert not hold.gate.closed and hold.held == 0 and not hold.for_failover

    run(test)


def test_outage_with_a_spool_spools_the_waiting_and_the_new() -> None:
    async def test() -> None:
        hold = controller(spool=True)
        hold.cluster_state(FAILING_OVER, writer_known=False)
        waiting = asyncio.create_task(hold.pass_())
        await settle()
        hold.cluster_state(OUTAGE, writer_known=False)
        assert hold.spooling
        with pytest.raises(SpoolNow):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(SpoolNow):  # and new work, at once
            await hold.pass_()
        # A writer again: RECOVERING ends the spooling, the hold stays until the drain ends.
        hold.cluster_state(RECOVERING, writer_known=True)
        assert not hold.spooling and hold.gate.closed
        assert hold.release_failover()
        await asyncio.wait_for(hold.pass_(), 1)

    run(test)


def test_outage_without_a_spool_is_not_spooling() -> None:
    async def test() -> None:
        hold = controller(hold_timeout=0.05)
        hold.cluster_state(OUTAGE, writer_known=False)
        assert not hold.spooling
        with pytest.raises(CannotConnectNow):
            await asyncio.wait_for(hold.pass_(), 5)

    run(test)


def test_a_spool_extends_the_hold_until_outage_is_seen() -> None:
    async def test() -> None:
        hold = controller(hold_timeout=0.01, spool=True)  # grace 0.05s on top
        hold.cluster_state(FAILING_OVER, writer_known=False)
        waiting = asyncio.create_task(hold.pass_())
        await asyncio.sleep(0.02)  # past hold_timeout, within the grace
        hold.cluster_state(OUTAGE, writer_known=False)
        with pytest.raises(SpoolNow):
            await asyncio.wait_for(waiting, 5)

    run(test)


def test_the_end_of_a_failover_does_not_open_a_pause() -> None:
    async def test() -> None:
        hold = controller()
        hold.close("admin PAUSE")
        hold.cluster_state(UP, writer_known=True)
        assert not hold.release_failover()  # no failover hold to end
        assert hold.gate.closed and hold.reason == "admin PAUSE"

    run(test)


def test_drain_holds_new_work_and_says_so() -> None:
    async def test() -> None:
        hold = controller()
        hold.drain()
        assert hold.draining and hold.gate.closed and hold.reason == "shutting down"
        waiting = asyncio.create_task(hold.pass_())
        await settle()
        assert not waiting.done() and hold.held == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert hold.held == 0

    run(test)


def test_retune_applies_to_requests_held_from_then_on() -> None:
    async def test() -> None:
        hold = controller(hold_timeout=30.0)
        hold.retune(0.02, None)
        hold.hold_for_failover("failover: failing_over")
        with pytest.raises(CannotConnectNow, match=r"held 0\.02s"):
            await asyncio.wait_for(hold.pass_(), 5)

    run(test)


def test_a_lost_writer_connection_holds_until_confirmed() -> None:
    async def test() -> None:
        hold = controller()
        writer = Endpoint("10.0.0.1", 5432)
        assert hold.hold_to_confirm(writer)
        assert hold.gate.closed and hold.for_failover
        assert not hold.hold_to_confirm(writer)  # held already
        waiting = asyncio.create_task(hold.pass_())
        await settle()
        hold.confirmed(writer, True)
        await asyncio.wait_for(waiting, 5)
        assert not hold.gate.closed and hold.confirming is None

    run(test)


def test_a_failover_takes_over_the_confirmation_hold() -> None:
    async def test() -> None:
        hold = controller()
        writer = Endpoint("10.0.0.1", 5432)
        hold.hold_to_confirm(writer)
        waiting = asyncio.create_task(hold.pass_())
        await settle()
        hold.cluster_state(FAILING_OVER, writer_known=False)
        assert hold.reason == "failover: failing_over" and hold.confirming is None
        hold.confirmed(writer, False)  # the probe's answer comes after: changes nothing
        assert hold.gate.closed and not waiting.done()
        hold.cluster_state(UP, writer_known=True)
        assert hold.release_failover()
        await asyncio.wait_for(waiting, 5)

    run(test)
