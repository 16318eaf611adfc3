"""The `aurora` and `aurora-global` topology providers against an Aurora emulation on real clusters
(demo_app/sql/aurora_emulation.sql: aurora_replica_status() and friends from pg_stat_replication,
pg_stat_wal_receiver and cluster_name)."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from tests.harness.pg import REGION_A, REGION_B


def _aurora_config(topo, kind: str) -> dict[str, Any]:
    instances = {n.name: n.hostport for n in topo.nodes}
    return {
        "upstream": {
            "topology": kind,
            "regions": [
                # The configured hosts are only where to read the topology from; instance ids are
                # mapped to endpoints by the explicit map.
                {"name": REGION_A, "hosts": [topo.a2.hostport], "instances": instances},
                {"name": REGION_B, "hosts": [topo.b1.hostport], "instances": instances},
            ],
        }
    }


def _server_port(sidecar) -> int:
    with psycopg.connect(sidecar.dsn(), connect_timeout=15) as conn:
        row = conn.execute("SELECT inet_server_port()").fetchone()
    assert row is not None
    return int(row[0])


def test_emulation_reports_the_writer_through_a_replica(fresh_topology):
    topo = fresh_topology
    topo.install_aurora_emulation()
    rows = topo.a2.query("SELECT server_id, session_id FROM aurora_replica_status() ORDER BY 1")
    assert ("a1", "MASTER_SESSION_ID") in rows
    assert ("a2", "replica-session") in rows
    regions = dict(topo.b1.query("SELECT server_id, aws_region FROM aurora_global_db_instance_status()"))
    assert regions["a1"] == REGION_A and regions["b1"] == REGION_B


@pytest.mark.parametrize("kind", ["aurora", "aurora-global"])
def test_aurora_provider_finds_the_writer_from_a_reader_and_follows_a_failover(
    fresh_topology, sidecar_factory, kind
):
    topo = fresh_topology
    topo.install_aurora_emulation()
    sidecar = sidecar_factory(_aurora_config(topo, kind), topology=topo)
    # Only a2 (a reader) is listed as a host: the writer a1 comes from the topology function.
    assert _server_port(sidecar) == topo.a1.port

    idle = psycopg.connect(sidecar.dsn(), autocommit=True)
    topo.a1.crash()
    time.sleep(0.5)
    topo.a2.promote()
    assert _server_port(sidecar) == topo.a2.port
    row = idle.execute("SELECT inet_server_port()").fetchone()
    assert row == (topo.a2.port,), "the idle session did not move to the new writer"
    idle.close()
    # Logged by the transition that released the session: wait for the line, not a fixed delay.
    sidecar.wait_for_log("event=failover_completed kind=instance", timeout=5)


def test_aurora_global_follows_the_writer_to_another_region(fresh_topology, sidecar_factory):
    topo = fresh_topology
    topo.install_aurora_emulation()
    sidecar = sidecar_factory(_aurora_config(topo, "aurora-global"), topology=topo)
    assert _server_port(sidecar) == topo.a1.port
    topo.a1.crash()
    topo.a2.crash()
    topo.b1.promote()
    assert _server_port(sidecar) == topo.b1.port
    sidecar.wait_for_log("event=failover_completed kind=region", timeout=5)
