"""Shared fixtures: real PostgreSQL topologies and sidecar processes (see tests/harness/)."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from tests.harness import pg
from tests.harness.sidecar import HostsSpec, SidecarProcess, sidecar_config

SidecarFactory = Callable[..., SidecarProcess]


@pytest.fixture(scope="session")
def pg_base_dir() -> Iterator[Path]:
    """Session temp dir owned by the postgres OS user; every node of the session lives below it."""
    try:
        pg.find_bindir()
    except pg.PgHarnessError as exc:
        # Fail, never skip: a green run without PostgreSQL would prove nothing.
        pytest.fail(str(exc), pytrace=False)
    base = pg.make_pg_dir(prefix="pgsidecar-tests-")
    yield base
    pg.stop_all_nodes()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_topology(pg_base_dir: Path) -> Iterator[pg.Topology]:
    """One a1/a2/b1 topology for the whole session. Read-only use: never crash, stop or promote
    its nodes (use ``fresh_topology`` for that); ``_guard_shared_topology`` checks."""
    topo = pg.make_topology(pg_base_dir)
    yield topo
    topo.stop_all()


@pytest.fixture(autouse=True)
def _guard_shared_topology(request: pytest.FixtureRequest) -> Iterator[None]:
    # A test that breaks the shared topology would make later, unrelated tests fail in confusing
    # ways; name the culprit instead.
    yield
    if "shared_topology" not in request.fixturenames:
        return
    topo: pg.Topology = request.getfixturevalue("shared_topology")
    problems = [n.name + " is down" for n in topo.nodes if not n.is_running()]
    if not problems:
        if topo.a1.in_recovery():
            problems.append("a1 is no longer the writer")
        problems += [n.name + " was promoted" for n in (topo.a2, topo.b1) if not n.in_recovery()]
    if problems:
        pytest.fail(
            f"{request.node.nodeid} broke shared_topology ({'; '.join(problems)}); "
            "destructive tests must use fresh_topology",
            pytrace=False,
        )


@pytest.fixture
def fresh_topology(pg_base_dir: Path) -> Iterator[pg.Topology]:
    """A new a1/a2/b1 topology for one test, free to crash, promote and re-point."""
    topo = pg.make_topology(pg_base_dir)
    yield topo
    topo.stop_all()
    shutil.rmtree(topo.base_dir, ignore_errors=True)


@pytest.fixture
def sidecar_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SidecarFactory]:
    """``factory(config_overrides=None, topology=None, **sidecar_kwargs) -> SidecarProcess``
    (started). ``topology`` defaults to ``shared_topology``; may also be a region -> hosts mapping.
    Every sidecar started is stopped at teardown."""
    started: list[SidecarProcess] = []
    counter = itertools.count(1)

    def factory(
        config_overrides: Mapping[str, Any] | None = None,
        topology: HostsSpec | None = None,
        **sidecar_kwargs: Any,
    ) -> SidecarProcess:
        hosts: HostsSpec = topology if topology is not None else request.getfixturevalue("shared_topology")
        config = sidecar_config(hosts, config_overrides)
        proc = SidecarProcess(config, tmp_path / f"sidecar-{next(counter)}", **sidecar_kwargs)
        started.append(proc)
        return proc.start()

    yield factory
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """A moto server (real HTTP, DynamoDB/Secrets Manager/RDS APIs) for one test module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
