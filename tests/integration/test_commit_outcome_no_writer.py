"""A COMMIT cut while no writer exists (issue 20): its outcome is learnt once a writer returns,
past `failover.hold_timeout` (up to `failover.commit_outcome_timeout`), and the writer that
returns may be the very server that crashed (restarted: its old backend died with it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from proxy.outcome import MARKER_DDL
from tests.conftest import SidecarFactory
from tests.harness import pg
from tests.harness.sidecar import SidecarProcess
from tests.integration.test_commit_outcome import _wait_outcome
from tests.integration.test_failover import (
    USER,
    connect,
    ids_on,
    insert_sql,
    make_table,
    sqlstate_of_call,
    wait_backend,
    wait_state,
)
from tests.integration.test_transaction_replay import outcomes

HOLD = 1.0  # failover.hold_timeout: the COMMIT's wait for a writer outlasts it several times


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="no-writer-client")
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


def _sidecar(
    topo: pg.Topology, sidecar_factory: SidecarFactory, mode: str, **failover: Any
) -> SidecarProcess:
    topo.a1.execute(MARKER_DDL, dbname=pg.APP_DB)
    topo.a1.wait_caught_up([topo.a2])
    config: dict[str, Any] = {
        "admin_users": [USER],
        "pool": {"mode": mode},
        "upstream": {"probe_user": USER, "probe_database": pg.APP_DB},
        "failover": {"hold_timeout": HOLD, **failover},
    }
    sidecar = sidecar_factory(config, topology=topo)
    assert _wait_outcome(sidecar, lambda v: v != "unchecked") == "marker"
    return sidecar


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_commit_cut_with_no_writer_waits_for_one(
    fresh_topology: pg.Topology, sidecar_factory: SidecarFactory, pool: ThreadPoolExecutor, mode: str
) -> None:
    """a1 crashes with the COMMIT waiting for its synchronous standby (which has it); no writer
    for three hold_timeouts; then a2 is promoted: the client gets COMMIT, the row is there once."""
    topo = fresh_topology
    table = make_table(topo.a1)
    sidecar = _sidecar(topo, sidecar_factory, mode)
    conn = connect(sidecar, autocommit=False, application_name="committer")
    conn.execute(insert_sql(table, "once", "committer"))
    pg.set_sync_standbys(topo.a1, ["nobody"])
    commit = pool.submit(sqlstate_of_call, conn.commit)
    wait_backend(topo.a1, "application_name = 'committer' AND wait_event = 'SyncRep'")
    topo.a1.wait_caught_up([topo.a2])
    crash = time.time()
    topo.a1.crash()
    wait_state(sidecar, "failing_over", crash)
    time.sleep(3 * HOLD)
    assert not commit.done(), "the COMMIT was answered while no writer existed"
    topo.a2.promote()
    state, _ = commit.result(timeout=30)
    assert state is None, f"COMMIT cut with no writer: expected success, got {state}"
    assert ids_on(topo.a2, table) == ["once"]
    assert outcomes(sidecar, "committed") == 1
    assert outcomes(sidecar, "unknown") == 0
    conn.execute(insert_sql(table, "next", "committer"))
    conn.commit()
    assert ids_on(topo.a2, table) == ["next", "once"]
    conn.close()


def test_a_commit_cut_by_a_crash_resolves_on_the_restarted_server(
    fresh_topology: pg.Topology, sidecar_factory: SidecarFactory, pool: ThreadPoolExecutor
) -> None:
    """The writer crashes and comes back (crash recovery, the same address): the old backend died
    with the old postmaster, so the marker there is the answer. An autocommit INSERT whose commit
    was flushed locally (waiting for a synchronous standby that never confirms) is committed."""
    topo = fresh_topology
    table = make_table(topo.a1)
    sidecar = _sidecar(topo, sidecar_factory, "session")
    conn = connect(sidecar, application_name="autocommitter")
    pg.set_sync_standbys(topo.a1, ["nobody"])
    insert = pool.submit(sqlstate_of_call, lambda: conn.execute(insert_sql(table, "once", "ac")))
    wait_backend(topo.a1, "application_name = 'autocommitter' AND wait_event = 'SyncRep'")
    crash = time.time()
    topo.a1.crash()
    wait_state(sidecar, "failing_over", crash)
    time.sleep(2 * HOLD)
    assert not insert.done(), "the INSERT was answered while no writer existed"
    pg.set_sync_standbys(topo.a1, [])  # (written to its config: in force when it starts)
    topo.a1.start()
    state, _ = insert.result(timeout=30)
    assert state is None, f"autocommit INSERT cut by a crash: expected success, got {state}"
    assert ids_on(topo.a1, table) == ["once"]
    assert outcomes(sidecar, "committed") == 1
    conn.execute(insert_sql(table, "next", "ac"))
    assert ids_on(topo.a1, table) == ["next", "once"]
    conn.close()
