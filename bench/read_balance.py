"""Select-only through the sidecar with `routing.reads: balance` over a writer and two replicas,
against the same sidecar with `routing.reads: writer`, in the same run.

``python -m bench.read_balance [--duration 5] [--rounds 2] [--modes session,transaction]``

Builds the pgbench database on a fresh primary (`bench.pgbench_compare.build_database`), two
streaming replicas of it in the same region (both qualify, so `balance` round-robins over them),
then for each pool mode and round runs ``pgbench -S -c 8 -j 2`` through a sidecar that lists all
three hosts, once with `writer` and once with `balance` (alternating). Each run gets its own
sidecar; once it has stopped (its server connections closed, which flushes their statistics), the
share of transactions each server ran is read from `pg_stat_database.xact_commit` deltas. Prints
the TPS of both, their ratio (median of the rounds), and the shares.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from bench import exit_on_sigterm
from bench.pgbench_compare import (
    CASES,
    CLEANUP,
    MAX_CLIENTS,
    MAX_CONNECTIONS,
    PASSWORD,
    USER,
    Mode,
    Sidecar,
    build_database,
    run_pgbench,
    say,
    wait_query_ok,
)
from demo_app.cluster import APP_DB, PgNode, make_pg_dir, make_standby

POOL_SIZE = 10


class RoutedSidecar(Sidecar):
    """The bench's sidecar, listing a writer and its replicas, with `routing.reads` set."""

    def __init__(self, workdir: Path, mode: Mode, hosts: list[PgNode], reads: str, label: str) -> None:
        super().__init__(workdir, mode, hosts[0], POOL_SIZE, label=f"-{reads}{label}")
        self.hosts = hosts
        self.reads = reads

    def start(self) -> RoutedSidecar:
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "metrics_listen": None,
            "log_level": "warning",
            "shutdown_timeout": "5s",
            "pool": {"mode": self.mode, "size": self.pool_size, "max_clients": MAX_CLIENTS},
            "auth": {"method": "scram-sha-256", "users": [{"name": USER, "password": PASSWORD}]},
            "upstream": {
                "topology": "static",
                "tls": "disable",
                "regions": [{"name": "local", "hosts": [h.hostport for h in self.hosts]}],
            },
            "routing": {"reads": self.reads},
            "spool": {"backend": "none"},
        }
        path = self.dir / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        self._launch("proxy", "run", "-c", str(path))
        wait_query_ok(self.port, self.name, self.log)
        time.sleep(1.0)  # (a few probe rounds: the replicas' lag is known)
        return self


def commits(nodes: list[PgNode]) -> list[int]:
    return [
        int(node.query("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (APP_DB,))[0][0])
        for node in nodes
    ]


def run(
    workdir: Path, nodes: list[PgNode], mode: Mode, reads: str, label: str, duration: int
) -> tuple[float, list[int]]:
    sidecar = RoutedSidecar(workdir, mode, nodes, reads, label).start()
    before = commits(nodes)
    try:
        result = run_pgbench(sidecar.port, CASES["select"], duration)
    finally:
        sidecar.stop()
    time.sleep(0.5)  # (the backends' exit flushes their counts)
    after = commits(nodes)
    return result.tps, [b - a for a, b in zip(before, after, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="session,transaction")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    base = make_pg_dir(prefix="pgsidecar-readbench-")
    CLEANUP.push("temp dir", lambda: shutil.rmtree(base, ignore_errors=True))
    try:
        primary = build_database(base)
        say("two streaming replicas (pg_basebackup) ...")
        replicas = [make_standby(primary, base, name, sync=False, start=False) for name in ("r1", "r2")]
        for replica in replicas:
            # (A standby needs at least the primary's max_connections.)
            replica.set_config({"max_connections": MAX_CONNECTIONS, "shared_buffers": "256MB"}, reload=False)
            replica.start()
            CLEANUP.push("PostgreSQL", partial(replica.stop, mode="immediate"))
        primary.wait_caught_up(replicas)
        nodes = [primary, *replicas]
        names = ["writer", "replica r1", "replica r2"]
        for mode in [m for m in args.modes.split(",") if m]:
            tps: dict[str, list[float]] = {"writer": [], "balance": []}
            shares: list[list[int]] = []
            for rnd in range(args.rounds):
                order = ("writer", "balance") if rnd % 2 == 0 else ("balance", "writer")
                for reads in order:
                    value, delta = run(base, nodes, mode, reads, f"-{mode}-{rnd}", args.duration)
                    tps[reads].append(value)
                    if reads == "balance":
                        shares.append(delta)
                    say(f"  {mode} round {rnd + 1} {reads:8s} tps {value:9.1f}  commits {delta}")
            w, b = statistics.median(tps["writer"]), statistics.median(tps["balance"])
            total = [sum(col) for col in zip(*shares, strict=True)]
            all_commits = sum(total) or 1
            say(f"\nselect-only (-S), {mode} mode, -c 8 -j 2, {args.rounds} rounds of {args.duration}s:")
            say(f"  writer-only tps {w:.1f}   balance tps {b:.1f}   ratio balance/writer {b / w:.3f}")
            parts = [f"{name} {100 * n / all_commits:.1f}%" for name, n in zip(names, total, strict=True)]
            say("  share of reads under balance: " + ", ".join(parts))
            say()
    finally:
        CLEANUP.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
