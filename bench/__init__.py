"""Benchmarks (not tests): each prints figures measured against PostgreSQL and PgBouncer."""

from __future__ import annotations

import signal
import sys


def exit_on_sigterm(note: str | None = None) -> None:
    """Turn SIGTERM into SystemExit, so that a benchmark's finally blocks stop every process it
    started (PostgreSQL, PgBouncer, sidecars); `note` is printed on the way out."""

    def handler(signum: int, frame: object) -> None:
        if note:
            print(f"\nterminated: {note}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
