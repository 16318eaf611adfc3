"""Spool benchmark: acknowledged INSERT transactions per second during a full outage, and replay speed.

``python -m bench.spool_bench [--backends sqlite,dynamodb] [--clients 1,4,16] [--duration S]
[--mode session|transaction] [--log-level info] [--profile DIR] [--json PATH]`` (``make bench-spool``;
extra flags via ``make bench-spool ARGS="..."``)

For every backend, on a fresh PostgreSQL 15 topology (``demo_app.cluster``: region A writer a1 and
standby a2; b1 is stopped at once and left out of the sidecar's config) and a fresh sidecar process
(``python -m proxy run -c ...``, ``failover.hold_timeout`` 1s, ``spool.backend`` sqlite or dynamodb;
DynamoDB is moto's ``ThreadedMotoServer`` on a free loopback port with fake AWS credentials):

1. one client logs in while the database is up (this fills the front-door cache), then every
   PostgreSQL node is stopped (``pg_ctl stop -m immediate``) and /metrics is polled until
   ``pgsidecar_cluster_state{state="outage"} 1``;
2. for each client count, a separate load process (asyncio, psycopg ``AsyncConnection``, one
   connection per client, autocommit) logs in through the sidecar (front-door cache) and runs
   single-row ``INSERT ... VALUES (%s, %s, %s)`` transactions for ``--duration`` seconds; an INSERT
   counts as acknowledged when psycopg returns without error. Printed per (backend, clients):
   acknowledged TPS, latency p50/p99/max, errors, and the CPU used meanwhile by the sidecar, the
   load process and (dynamodb) the moto server, in % of one core: on this 2-core machine the
   clients compete with the sidecar, so the figures show which side was the bottleneck;
3. a2 is started and promoted; /metrics (``pgsidecar_spool_pending``,
   ``pgsidecar_spool_records_total{result="replayed"}``) is polled until everything acknowledged
   has been replayed; replay rows/s is measured from the first replayed record to the last;
   the rows on a2 are compared with the acknowledged ids (nothing missing, nothing extra).

Targets (the spool issue): sqlite ≥ 2,000 single-row transactions/s with 16 clients; replay
≥ 2,000 rows/s (both backends are reported; the targets are judged where they are stated: the
TPS target for sqlite, the replay target for every backend, marked PASS or MISS).

``--profile DIR`` runs ``py-spy record --nonblocking`` on the sidecar during the largest client
count and during the replay, writes the raw (folded) stacks to DIR and prints the functions with
the most samples. Sampling costs the sidecar a little: take figures from a run without it.

Every process it starts (PostgreSQL, sidecar, load processes, py-spy, moto) is stopped on the way
out (try/finally), also after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.context
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from bench import exit_on_sigterm
from demo_app.cluster import APP_DB, REGION_A, Topology, make_pg_dir, make_topology
from tests.harness.load import log_events, percentile
from tests.harness.sidecar import REMOVE, SIDECAR_PASSWORDS, SidecarProcess, free_port, sidecar_config

BACKENDS = ("sqlite", "dynamodb")
USER = "app_scram"
TABLE = "spool_bench"
DDL = (
    f"CREATE TABLE {TABLE} (id text PRIMARY KEY, client int NOT NULL, payload text NOT NULL); "
    f"GRANT ALL ON {TABLE} TO {USER}"
)
INSERT = f"INSERT INTO {TABLE} (id, client, payload) VALUES (%s, %s, %s)"
PAYLOAD = "order #{seq}: 1 x flat white, 1 x croissant"

TPS_TARGET = 2000.0
TPS_TARGET_BACKEND = "sqlite"
TPS_TARGET_CLIENTS = 16
REPLAY_TARGET = 2000.0

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


_SCRAPE_INTERVAL = 0.1  # seconds between /metrics scrapes while replaying


def say(text: str = "") -> None:
    print(text, flush=True)


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which."""


# ---------------------------------------------------------------------------------------------
# The load process
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    conninfo: str
    clients: int
    duration: float
    prefix: str  # makes ids unique across phases and backends


@dataclass
class LoadResult:
    ids: list[str] = field(default_factory=list)  # acknowledged
    latencies: list[float] = field(default_factory=list)  # seconds, acknowledged in the window
    in_window: int = 0  # acknowledged and finished before the deadline
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # this process, from "go" to the end
    elapsed_s: float = 0.0  # "go" to the last client finished
    failure: str | None = None


def load_process(spec: dict[str, Any], ready: Any, go: Any, results: Any) -> None:
    """Entry point of a load process (spawned: no inherited threads, its own GIL). Plain dicts
    cross the process boundary: the classes of a ``-m`` main module pickle under two names."""
    try:
        results.put(asdict(asyncio.run(_load(LoadSpec(**spec), ready, go))))
    except BaseException as exc:  # the parent must hear about it rather than wait forever
        results.put(asdict(LoadResult(failure=f"{type(exc).__name__}: {exc}")))


async def _load(spec: LoadSpec, ready: Any, go: Any) -> LoadResult:
    conns = await asyncio.gather(
        *(
            psycopg.AsyncConnection.connect(spec.conninfo, autocommit=True, application_name=f"bench-{i}")
            for i in range(spec.clients)
        )
    )
    result = LoadResult()
    errors: Counter[str] = Counter()
    try:
        ready.put(len(conns))
        if not await asyncio.to_thread(go.wait, 120):
            raise BenchError("the parent never said go")
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + spec.duration

        async def client(n: int, conn: psycopg.AsyncConnection[Any]) -> None:
            seq = 0
            while time.perf_counter() < deadline:
                seq += 1
                rid = f"{spec.prefix}-{n}-{seq}"
                start = time.perf_counter()
                try:
                    await conn.execute(INSERT, (rid, n, PAYLOAD.format(seq=seq)))
                except psycopg.Error as exc:
                    errors[exc.sqlstate or type(exc).__name__] += 1
                    if len(result.first_errors) < 5:
                        text = " ".join(str(exc).split())
                        result.first_errors.append(f"client {n}: {exc.sqlstate} {text[:240]}")
                    if conn.closed:
                        return
                    await asyncio.sleep(0.01)  # do not spin on a refusing sidecar
                    continue
                end = time.perf_counter()
                result.ids.append(rid)
                if end <= deadline:
                    result.in_window += 1
                    result.latencies.append(end - start)

        await asyncio.gather(*(client(n, c) for n, c in enumerate(conns)))
        result.elapsed_s = time.perf_counter() - t0
        result.cpu_s = time.process_time() - cpu0
    finally:
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()
    result.errors = dict(errors)
    return result


@dataclass
class Cpu:
    sidecar_s: float = 0.0  # all threads
    sidecar_loop_s: float = 0.0  # the event loop's thread alone
    own_s: float = 0.0  # this process (the moto server, when there is one)
    machine_busy_pct: float = 0.0  # every CPU of the machine, other workers included


def run_load(spec: LoadSpec, sidecar_pid: int) -> tuple[LoadResult, Cpu]:
    """One phase: the load result and the CPU used meanwhile."""
    ctx = multiprocessing.get_context("spawn")
    ready: multiprocessing.Queue[int] = ctx.Queue()
    results: multiprocessing.Queue[dict[str, Any]] = ctx.Queue()
    go = ctx.Event()
    proc = ctx.Process(target=load_process, args=(asdict(spec), ready, go, results), name="spool-bench-load")
    proc.start()
    try:
        try:
            ready.get(timeout=60)
        except queue.Empty:
            # Either it failed (its result says why) or its logins hang.
            why = "its clients did not log in within 60s"
            with contextlib.suppress(queue.Empty):
                why = str(results.get(timeout=1)["failure"])
            raise BenchError(f"the load process failed before starting: {why}") from None
        side0, loop0 = proc_cpu_s(sidecar_pid), main_thread_cpu_s(sidecar_pid)
        own0 = time.process_time()
        busy0, total0 = machine_busy()
        go.set()
        try:
            result = LoadResult(**results.get(timeout=spec.duration + 120))
        except queue.Empty:
            raise BenchError("the load process did not report within duration + 120s") from None
        busy1, total1 = machine_busy()
        cpu = Cpu(
            sidecar_s=proc_cpu_s(sidecar_pid) - side0,
            sidecar_loop_s=main_thread_cpu_s(sidecar_pid) - loop0,
            own_s=time.process_time() - own0,
            machine_busy_pct=100 * (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1),
        )
        if result.failure is not None:
            raise BenchError(f"load process failed: {result.failure}")
        proc.join(30)
        return result, cpu
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)


# ---------------------------------------------------------------------------------------------
# Sidecar observation
# ---------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process, all its threads (utime, stime: fields 14, 15)."""
    return proc_cpu_s_path(Path(f"/proc/{pid}/stat"))


def main_thread_cpu_s(pid: int) -> float:
    """CPU seconds of a process's main thread (the sidecar's event loop)."""
    return proc_cpu_s_path(Path(f"/proc/{pid}/task/{pid}/stat"))


def proc_cpu_s_path(path: Path) -> float:
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def metrics(sidecar: SidecarProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        with urllib.request.urlopen(sidecar.metrics_url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise BenchError(f"/metrics: {exc}") from exc
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        raise BenchError(f"{name}{labels} is not in /metrics")
    return samples[key]


def wait_metric(sidecar: SidecarProcess, name: str, value: float, timeout: float, **labels: str) -> float:
    """Poll until the sample equals `value`; returns the time it did."""
    deadline = time.monotonic() + timeout
    while True:
        if sample(metrics(sidecar), name, **labels) == value:
            return time.time()
        if not sidecar.is_running():
            raise BenchError(f"the sidecar exited\n{sidecar.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{name}{labels} did not reach {value} within {timeout}s\n{sidecar.log_tail()}")
        time.sleep(0.05)


class PySpy:
    """py-spy recording the sidecar in the background (``--profile``)."""

    def __init__(self, pid: int, out: Path, seconds: float) -> None:
        self.out = out
        binary = shutil.which("py-spy") or "/root/.pyenv/shims/py-spy"
        self.proc = subprocess.Popen(
            [binary, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "200",
             "--nonblocking", "-f", "raw", "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip

    def finish(self, timeout: float = 60.0) -> None:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(f"py-spy did not finish within {timeout}s") from None
        if self.proc.returncode != 0 or not self.out.exists():
            raise BenchError(f"py-spy failed ({self.proc.returncode}): {err.decode(errors='replace')[-500:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def profile_summary(path: Path, top: int = 12) -> list[str]:
    """The functions with the most samples in a py-spy raw (folded) file: self and inclusive."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return ["  (no samples)"]
    out = [f"  {total} samples; by own time:"]
    out += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out.append("  inclusive (a frame and what it calls):")
    out += [f"    {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top + 8)]
    return out


def _short(frame: str) -> str:
    # "fn (/long/path/proxy/spool/x.py:12)" -> "fn (proxy/spool/x.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


# ---------------------------------------------------------------------------------------------
# One backend
# ---------------------------------------------------------------------------------------------


@dataclass
class Phase:
    backend: str
    clients: int
    duration_s: float
    acknowledged: int
    tps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    sidecar_cpu_pct: float  # of one core
    sidecar_cpu_us_per_txn: float  # sidecar CPU per acknowledged transaction (load-independent)
    sidecar_loop_cpu_pct: float  # the event loop's thread alone
    machine_busy_pct: float  # all CPUs, in % of one core (200% = both cores of this machine busy)
    client_cpu_pct: float
    moto_cpu_pct: float | None
    first_errors: list[str] = field(default_factory=list)


@dataclass
class Replay:
    backend: str
    records: int  # acknowledged before the writer came back
    spooled_metric: int
    replayed: int
    seconds_to_first: float | None  # promoted → first replayed record seen
    seconds_to_drained: float | None  # promoted → all replayed
    rows_per_s: float  # first replayed → last replayed
    rows_in_db: int
    missing: int
    extra: int
    dead_letters: int
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (s, pending gauge, replayed)
    log_seconds: float | None = None  # sum of the sidecar's spool_replay_finished seconds
    sidecar_cpu_pct: float = 0.0  # promote → drained, of one core


@dataclass
class BackendResult:
    backend: str
    phases: list[Phase]
    replay: Replay | None
    profiles: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request to stderr: noise in the output and CPU taken from moto.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def build_topology(base: Path) -> Topology:
    topo = make_topology(base, sync=False)
    # Region A is enough: b1 would only be one more node to stop (and one more CPU consumer).
    topo.b1.crash()
    topo.a1.execute(DDL, dbname=APP_DB)
    topo.a1.wait_caught_up([topo.a2])
    return topo


def run_backend(backend: str, base: Path, args: argparse.Namespace) -> BackendResult:
    say(f"\n== {backend}: building a fresh topology ...")
    topo = build_topology(base)
    sidecar: SidecarProcess | None = None
    result = BackendResult(backend, [], None)
    try:
        with contextlib.ExitStack() as stack:
            workdir = Path(tempfile.mkdtemp(prefix=f"spool-{backend}-", dir=base))
            spool: dict[str, Any] = {"backend": backend, "path": str(workdir / "spool.db")}
            if backend == "dynamodb":
                endpoint = stack.enter_context(moto_server())
                spool["dynamodb"] = {"table": f"spool-bench-{uuid.uuid4().hex[:8]}", "region": "us-east-1",
                                     "endpoint_url": endpoint}  # fmt: skip
            config = sidecar_config(
                {REGION_A: [topo.a1, topo.a2]},
                {
                    "log_level": args.log_level,
                    "pool": {"mode": args.mode},
                    # The sidecar's defaults (check_interval 250ms, probe_timeout 1s), a short hold.
                    "failover": REMOVE,
                },
                failover={"hold_timeout": "1s"},
                spool=spool,
            )
            sidecar = SidecarProcess(config, workdir, env=FAKE_AWS_ENV, start_timeout=60).start()
            conninfo = sidecar.dsn(
                USER, SIDECAR_PASSWORDS[USER], APP_DB, sslmode="disable", connect_timeout=30
            )
            wait_metric(sidecar, "pgsidecar_cluster_state", 1, 30, state="up")

            # Warm the front door: one login while the database is up.
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("SELECT 1").fetchall()
            frontdoor = workdir / "spool.db.frontdoor.json"
            deadline = time.monotonic() + 30
            while not frontdoor.exists():
                if time.monotonic() > deadline:
                    raise BenchError(f"the front-door cache was not written\n{sidecar.log_tail()}")
                time.sleep(0.05)

            say("   stopping every PostgreSQL node ...")
            down = time.time()
            for node in (topo.a1, topo.a2):
                node.crash()
            outage = wait_metric(sidecar, "pgsidecar_cluster_state", 1, 30, state="outage")
            say(f"   OUTAGE after {outage - down:.2f}s")

            acked: set[str] = set()
            for clients in args.client_counts:
                profile: PySpy | None = None
                if args.profile is not None and clients == max(args.client_counts):
                    out = args.profile / f"{backend}-{clients}clients.txt"
                    profile = PySpy(sidecar.pid, out, args.duration + 1.5)
                    stack.callback(profile.stop)
                spec = LoadSpec(conninfo, clients, args.duration, f"{backend}-{clients}c")
                load, cpu = run_load(spec, sidecar.pid)
                side_cpu = cpu.sidecar_s
                if profile is not None:
                    profile.finish()
                    result.profiles[f"{clients} clients"] = profile_summary(profile.out)
                acked.update(load.ids)
                lat = sorted(load.latencies)
                phase = Phase(
                    backend=backend,
                    clients=clients,
                    duration_s=args.duration,
                    acknowledged=len(load.ids),
                    tps=load.in_window / args.duration,
                    p50_ms=percentile(lat, 0.50) * 1000,
                    p99_ms=percentile(lat, 0.99) * 1000,
                    max_ms=(lat[-1] if lat else 0.0) * 1000,
                    errors=load.errors,
                    sidecar_cpu_pct=100 * side_cpu / load.elapsed_s,
                    sidecar_cpu_us_per_txn=1e6 * side_cpu / max(1, len(load.ids)),
                    sidecar_loop_cpu_pct=100 * cpu.sidecar_loop_s / load.elapsed_s,
                    machine_busy_pct=cpu.machine_busy_pct,
                    client_cpu_pct=100 * load.cpu_s / load.elapsed_s,
                    moto_cpu_pct=100 * cpu.own_s / load.elapsed_s if backend == "dynamodb" else None,
                    first_errors=load.first_errors,
                )
                result.phases.append(phase)
                say(
                    f"   {clients:>3} clients: {phase.tps:8.0f} TPS  p50 {phase.p50_ms:6.2f} ms  "
                    f"p99 {phase.p99_ms:6.2f} ms  errors {sum(load.errors.values())}  CPU sidecar "
                    f"{phase.sidecar_cpu_pct:.0f}% (loop {phase.sidecar_loop_cpu_pct:.0f}%) client "
                    f"{phase.client_cpu_pct:.0f}% machine {phase.machine_busy_pct:.0f}%"
                    + (f" moto {phase.moto_cpu_pct:.0f}%" if phase.moto_cpu_pct is not None else "")
                )
            result.replay = replay(backend, topo, sidecar, acked, args, result)
    finally:
        if sidecar is not None:
            log = sidecar.log_text()
            if "Traceback" in log:
                result.notes.append("the sidecar log has a traceback")
            sidecar.stop()
        with contextlib.suppress(Exception):
            topo.stop_all()
        shutil.rmtree(topo.base_dir, ignore_errors=True)
    return result


def replay(
    backend: str, topo: Topology, sidecar: SidecarProcess, acked: set[str], args: argparse.Namespace,
    result: BackendResult,
) -> Replay:  # fmt: skip
    samples = metrics(sidecar)
    spooled = int(sample(samples, "pgsidecar_spool_records_total", result="spooled"))
    if spooled != len(acked):
        result.notes.append(f"spooled metric {spooled} != acknowledged {len(acked)}")
    say(f"   bringing a2 back (start + promote) to replay {len(acked)} records ...")
    profile: PySpy | None = None
    timeout = 120 + len(acked) / 50
    if args.profile is not None:
        profile = PySpy(sidecar.pid, args.profile / f"{backend}-replay.txt", min(timeout, 30))
    try:
        cpu0 = proc_cpu_s(sidecar.pid)
        topo.a2.start()
        topo.a2.promote()
        promoted = time.monotonic()
        timeline: list[tuple[float, int, int]] = []
        first: tuple[float, int] | None = None
        last: tuple[float, int] | None = None
        deadline = promoted + timeout
        while True:
            now = time.monotonic()
            samples = metrics(sidecar)
            pending = int(sample(samples, "pgsidecar_spool_pending"))
            done = int(sample(samples, "pgsidecar_spool_records_total", result="replayed"))
            dead = int(sample(samples, "pgsidecar_spool_records_total", result="dead_letter"))
            timeline.append((now - promoted, pending, done))
            if done and first is None:
                first = (now, done)
            if last is None or done != last[1]:
                last = (now, done)
            if done + dead >= spooled and pending == 0:
                cpu_pct = 100 * (proc_cpu_s(sidecar.pid) - cpu0) / max(1e-3, now - promoted)
                break
            if now > deadline:
                result.notes.append(f"replay incomplete after {timeout:.0f}s: {done}/{spooled}")
                cpu_pct = 100 * (proc_cpu_s(sidecar.pid) - cpu0) / max(1e-3, now - promoted)
                break
            if not sidecar.is_running():
                raise BenchError(f"the sidecar exited during the replay\n{sidecar.log_tail()}")
            time.sleep(_SCRAPE_INTERVAL)  # every scrape costs the sidecar CPU: not too often
        if profile is not None:
            profile.stop()
            if profile.out.exists():
                result.profiles["replay"] = profile_summary(profile.out)
    finally:
        if profile is not None:
            profile.stop()
    rate = 0.0
    if first is not None and last is not None and last[0] > first[0]:
        rate = (last[1] - first[1]) / (last[0] - first[0])
    with psycopg.connect(topo.a2.dsn(dbname=APP_DB), autocommit=True) as conn:
        ids = {str(r[0]) for r in conn.execute(f"SELECT id FROM {TABLE}")}
    finished = log_events(sidecar.log_text(), "spool_replay_finished")
    log_seconds = sum(float(e.fields.get("seconds", 0)) for e in finished) if finished else None
    done_at = next((t for t, p, d in timeline if d + dead >= spooled and p == 0), None)
    if first is not None and done_at is not None and done_at > first[0] - promoted:
        # Everything from the first replayed record to an empty spool (removals included): also
        # right when the whole backlog was replayed between two scrapes.
        rate = spooled / (done_at - (first[0] - promoted) + _SCRAPE_INTERVAL)
    return Replay(
        backend=backend,
        records=len(acked),
        spooled_metric=spooled,
        replayed=timeline[-1][2] if timeline else 0,
        seconds_to_first=None if first is None else first[0] - promoted,
        seconds_to_drained=done_at,
        rows_per_s=rate,
        rows_in_db=len(ids),
        missing=len(acked - ids),
        extra=len(ids - acked),
        dead_letters=dead,
        timeline=_thin(timeline),
        log_seconds=log_seconds,
        sidecar_cpu_pct=cpu_pct,
    )


def _thin(timeline: list[tuple[float, int, int]], step: float = 1.0) -> list[tuple[float, int, int]]:
    """About one sample per `step` seconds, plus the last."""
    out: list[tuple[float, int, int]] = []
    for t, p, d in timeline:
        if not out or t - out[-1][0] >= step:
            out.append((round(t, 2), p, d))
    if timeline and out[-1][0] != round(timeline[-1][0], 2):
        t, p, d = timeline[-1]
        out.append((round(t, 2), p, d))
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    say("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        say("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def _fmt_errors(errors: dict[str, int]) -> str:
    if not errors:
        return "0"
    return f"{sum(errors.values())} (" + " ".join(f"{k}:{v}" for k, v in sorted(errors.items())) + ")"


def checks(results: list[BackendResult]) -> list[tuple[str, str, bool]]:
    """(what, measured, met) for every target that applies to what was run."""
    out: list[tuple[str, str, bool]] = []
    for r in results:
        for p in r.phases:
            if r.backend == TPS_TARGET_BACKEND and p.clients == TPS_TARGET_CLIENTS:
                out.append((f"{r.backend} {p.clients} clients ≥ {TPS_TARGET:,.0f} TPS", f"{p.tps:,.0f}",
                            p.tps >= TPS_TARGET and not p.errors))  # fmt: skip
        if r.replay is not None:
            rp = r.replay
            out.append((f"{r.backend} replay ≥ {REPLAY_TARGET:,.0f} rows/s", f"{rp.rows_per_s:,.0f}",
                        rp.rows_per_s >= REPLAY_TARGET))  # fmt: skip
            out.append((f"{r.backend} rows on the writer = acknowledged",
                        f"{rp.rows_in_db}/{rp.records} (missing {rp.missing}, extra {rp.extra})",
                        rp.missing == 0 and rp.extra == 0 and rp.rows_in_db == rp.records))  # fmt: skip
    return out


def report(results: list[BackendResult], args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    say(f"\n#### Spool benchmark: {args.duration:g}s per client count, pool mode {args.mode}, "
        f"log_level {args.log_level}\n")  # fmt: skip
    rows: list[Sequence[str]] = []
    for r in results:
        for p in r.phases:
            rows.append((
                p.backend, str(p.clients), f"{p.tps:,.0f}", f"{p.p50_ms:.2f}", f"{p.p99_ms:.2f}",
                f"{p.max_ms:.1f}", str(p.acknowledged),
                _fmt_errors(p.errors),
                f"{p.sidecar_cpu_pct:.0f}% ({p.sidecar_loop_cpu_pct:.0f}%)",
                f"{p.sidecar_cpu_us_per_txn:.0f}", f"{p.client_cpu_pct:.0f}%",
                "-" if p.moto_cpu_pct is None else f"{p.moto_cpu_pct:.0f}%",
                f"{p.machine_busy_pct:.0f}%",
            ))  # fmt: skip
    if rows:
        _table(("backend", "clients", "TPS", "p50 ms", "p99 ms", "max ms", "acked", "errors",
                "sidecar CPU (loop)", "µs CPU/txn", "client CPU", "moto CPU",
                "machine busy"), rows)  # fmt: skip
    replays = [r.replay for r in results if r.replay is not None]
    if replays:
        say("")
        _table(
            ("backend", "records", "replay rows/s", "promote → first s", "promote → drained s",
             "sidecar CPU", "rows on writer", "missing", "extra", "dead letters"),
            [(rp.backend, str(rp.records), f"{rp.rows_per_s:,.0f}",
              "-" if rp.seconds_to_first is None else f"{rp.seconds_to_first:.2f}",
              "-" if rp.seconds_to_drained is None else f"{rp.seconds_to_drained:.2f}",
              f"{rp.sidecar_cpu_pct:.0f}%", str(rp.rows_in_db), str(rp.missing), str(rp.extra),
              str(rp.dead_letters)) for rp in replays],
        )  # fmt: skip
        for rp in replays:
            line = " ".join(f"{t:g}s:{p}/{d}" for t, p, d in rp.timeline)
            say(f"\n{rp.backend} replay timeline (s after promote: pending gauge/replayed): {line}")
    for r in results:
        for name, lines in r.profiles.items():
            say(f"\npy-spy, {r.backend}, {name}:")
            for text in lines:
                say(text)
    notes = [(r.backend, n) for r in results for n in r.notes]
    notes += [
        (p.backend, f"{p.clients} clients: {e}") for r in results for p in r.phases for e in p.first_errors
    ]
    if notes:
        say("\nnotes:")
        for backend, note in notes:
            say(f"  {backend}: {note}")
    verdicts = checks(results)
    if verdicts:
        say("\ntargets:")
        for what, measured, ok in verdicts:
            say(f"  {'PASS' if ok else 'MISS'}  {what}: {measured}")
    return verdicts


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.spool_bench", description=(__doc__ or "").split("\n\n")[0]
    )
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {BACKENDS}")
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    p.add_argument(
        "--duration", type=float, default=5.0, metavar="S", help="seconds per client count (default 5)"
    )
    p.add_argument(
        "--mode", choices=("session", "transaction"), default="session", help="pool.mode (default session)"
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the sidecar's log_level (default info, the sidecar's default: one line per spooled record)",
    )
    p.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the sidecar (largest client count, replay)"
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        p.error(f"--backends: unknown {unknown or 'empty list'}; choose from {','.join(BACKENDS)}")
    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error("--clients: comma-separated integers, e.g. 1,4,16")
    if not counts or min(counts) < 1:
        p.error("--clients: at least one count, each at least 1")
    if args.duration <= 0:
        p.error("--duration must be positive")
    args.backend_list = list(dict.fromkeys(backends))
    args.client_counts = list(dict.fromkeys(counts))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    base = make_pg_dir(prefix="pgsidecar-spoolbench-")
    try:
        say(
            f"spool benchmark: backends {','.join(args.backend_list)}, clients "
            f"{','.join(map(str, args.client_counts))}, {args.duration:g}s each; Python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs"
        )
        results = [run_backend(b, base, args) for b in args.backend_list]
        verdicts = report(results, args)
        if args.json is not None:
            doc = {
                "settings": {"duration_s": args.duration, "clients": args.client_counts, "mode": args.mode,
                             "log_level": args.log_level, "cpus": os.cpu_count()},
                "results": [asdict(r) for r in results],
                "targets": [{"target": w, "measured": m, "met": ok} for w, m, ok in verdicts],
            }  # fmt: skip
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
            say(f"\nJSON written to {args.json}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
