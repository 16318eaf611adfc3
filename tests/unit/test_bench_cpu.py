"""The benchmark's per-run proxy CPU figures (bench/pgbench_compare.py), read from this process's
own /proc entries."""

from __future__ import annotations

import os
import resource
import time

import pytest

from bench.pgbench_compare import CpuSample, cpu_sample, proxy_cpu

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="needs Linux schedstat")


def burn(seconds: float) -> None:
    """Stay on the CPU in user space for `seconds` of wall time (the vDSO clock: no system calls)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(200))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_busy_process_reads_as_runnable_with_its_cpu_per_transaction() -> None:
    before, used = cpu_sample(os.getpid()), cpu_seconds()
    burn(0.3)
    after, used = cpu_sample(os.getpid()), cpu_seconds() - used
    assert before is not None and after is not None
    cpu = proxy_cpu(before, after, 1000)
    assert cpu is not None
    # The same CPU time as getrusage says (schedstat's ns against rusage's µs: close), per 1,000.
    assert cpu.total_us == pytest.approx(used * 1e6 / 1000, rel=0.1)
    assert cpu.user_us > cpu.sys_us  # a loop with no system calls: user time (split by 100 Hz ticks)
    # Runnable throughout: on a CPU, or waiting for one when the machine is busy with other work.
    assert cpu.on_cpu + cpu.waiting > 0.8


def test_sleeping_process_is_neither_on_cpu_nor_waiting() -> None:
    before = cpu_sample(os.getpid())
    time.sleep(0.3)
    after = cpu_sample(os.getpid())
    cpu = proxy_cpu(before, after, 10)
    assert cpu is not None
    assert cpu.on_cpu < 0.2 and cpu.waiting < 0.2


def test_no_figures_without_samples_or_transactions() -> None:
    sample = CpuSample(10, 5, 1_000_000, 0, 1.0)
    later = CpuSample(20, 5, 2_000_000, 0, 2.0)
    assert proxy_cpu(sample, later, 0) is None  # pgbench processed nothing
    assert proxy_cpu(None, later, 100) is None
    assert proxy_cpu(sample, None, 100) is None
    assert proxy_cpu(later, sample, 100) is None  # out of order


def test_split_follows_ticks_and_amount_follows_schedstat() -> None:
    cpu = proxy_cpu(CpuSample(0, 0, 0, 0, 0.0), CpuSample(30, 10, 4_000_000, 1_000_000, 0.01), 100)
    assert cpu is not None
    assert cpu.total_us == pytest.approx(40.0)  # 4 ms on CPU over 100 transactions
    assert cpu.user_us == pytest.approx(30.0)  # three quarters of the ticks were user ticks
    assert cpu.on_cpu == pytest.approx(0.4) and cpu.waiting == pytest.approx(0.1)


def test_a_process_that_is_gone_gives_none() -> None:
    # Above the kernel's pid_max, so no process has it.
    assert cpu_sample(2**23) is None
