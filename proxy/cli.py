"""The `pgsidecar` command line (also `python -m proxy`)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import secrets
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from sidecar_config import ConfigError, SidecarConfig, dump_effective, load_config

from . import logs

if TYPE_CHECKING:
    from .app import Sidecar
    from .spool import SpoolStore

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _load(path: str) -> SidecarConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"pgsidecar: invalid configuration\n{exc}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    logs.configure(cfg.log_format, cfg.log_level)
    import uvloop

    from .app import ListenError, Sidecar

    async def main() -> None:
        await Sidecar(cfg, args.config).serve_forever()

    from .spool import SpoolError

    try:
        uvloop.run(main())
    except ListenError as exc:
        # Typically the address is taken: say which setting and address, instead of a traceback.
        logs.event("startup_failed", logs.ERROR, setting=exc.setting, address=exc.address, error=exc.reason)
        return EXIT_FAILED
    except OSError as exc:
        logs.event("startup_failed", logs.ERROR, error=str(exc))
        return EXIT_FAILED
    except SpoolError as exc:
        # The spool cannot be opened (spool.path unusable, DynamoDB unreachable): one line.
        logs.event("startup_failed", logs.ERROR, error=str(exc))
        return EXIT_FAILED
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    if cfg.spool.backend == "sqlite":
        from pathlib import Path

        from .spool.sqlite_store import spool_path_problem

        problem = spool_path_problem(Path(cfg.spool.path))
        if problem is not None:
            print(f"pgsidecar: invalid configuration\n{problem}", file=sys.stderr)
            return EXIT_CONFIG
    print(f"# {args.config}: valid. Effective configuration (secrets hidden):")
    print(dump_effective(cfg), end="")
    for warning in cfg.warnings():
        print(f"pgsidecar: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from demo_app.demo import run_demo

    return run_demo(once=args.once)


# ------------------------------------------------------------------------------ spool commands


class CliFailure(Exception):
    """A command failed for a reason the message explains; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")[:-4] + "Z"


def _short(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("-+-".join("-" * w for w in widths))
    lines.extend(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "\n".join(lines)


def _run_spool_command(
    args: argparse.Namespace, body: Callable[[SidecarConfig], Coroutine[Any, Any, int]]
) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    logs.configure(cfg.log_format, cfg.log_level)
    try:
        return asyncio.run(body(cfg))
    except CliFailure as exc:
        print(f"pgsidecar: {exc}", file=sys.stderr)
        return exc.code


async def _open_spool(cfg: SidecarConfig) -> SpoolStore:
    from .spool import SpoolError, open_store

    try:
        store = await open_store(cfg.spool)
    except SpoolError as exc:
        raise CliFailure(f"cannot open the spool: {exc}") from exc
    if store is None:
        raise CliFailure("spool.backend is none: there is no spool to operate on", EXIT_CONFIG)
    return store


def cmd_spool_list(args: argparse.Namespace) -> int:
    from .spool import SpoolError

    async def body(cfg: SidecarConfig) -> int:
        store = await _open_spool(cfg)
        try:
            records = await store.pending(args.limit)
            total = await store.count()
        except (SpoolError, ValueError) as exc:
            raise CliFailure(f"cannot read the spool: {exc}") from exc
        finally:
            await store.close()
        rows = [
            [r.id, _when(r.created_at), r.user, r.database, str(len(r.statements)), _short(r.first_sql)]
            for r in records
        ]
        print(_table(("id", "created_at", "user", "database", "statements", "first statement"), rows))
        shown = f" (showing the oldest {len(records)})" if len(records) < total else ""
        print(f"{total} pending record(s) in the {cfg.spool.backend} spool{shown}")
        return EXIT_OK

    return _run_spool_command(args, body)


def cmd_spool_dead_letters(args: argparse.Namespace) -> int:
    from .spool import SpoolError

    async def body(cfg: SidecarConfig) -> int:
        store = await _open_spool(cfg)
        try:
            dead = await store.dead_letters()
        except (SpoolError, ValueError) as exc:
            raise CliFailure(f"cannot read the spool: {exc}") from exc
        finally:
            await store.close()
        rows = [
            [d.id, _when(d.failed_at), d.sqlstate, _short(d.error, 70), d.record.user, d.record.database,
             _short(d.record.first_sql, 40)]
            for d in dead
        ]  # fmt: skip
        print(_table(("id", "failed_at", "sqlstate", "error", "user", "database", "first statement"), rows))
        print(f"{len(dead)} dead letter(s); `pgsidecar spool replay --retry` puts them back in the queue")
        return EXIT_OK

    return _run_spool_command(args, body)


async def _find_writer(sidecar: Sidecar) -> None:
    """Probe the configured hosts (as the sidecar would) until a writer answers, briefly."""
    topology = sidecar.topology
    for attempt in range(3):
        await topology.refresh()
        if topology.writer is not None:
            return
        if attempt < 2:
            await asyncio.sleep(0.5)
    raise CliFailure(f"no writable upstream found: {topology.problem}")


def cmd_spool_replay(args: argparse.Namespace) -> int:
    from .app import Sidecar
    from .spool import SpoolError
    from .spool.replay import Replayer
    from .spooling import replay_connector

    async def body(cfg: SidecarConfig) -> int:
        store = await _open_spool(cfg)
        sidecar = Sidecar(cfg, args.config)
        try:
            if args.retry:
                try:
                    moved = await store.retry_dead_letters(None)
                except SpoolError as exc:
                    raise CliFailure(f"cannot move dead letters back: {exc}") from exc
                print(f"{moved} dead letter(s) moved back to pending")
            await _find_writer(sidecar)
            print(f"replaying into the writer {sidecar.topology.writer}")
            owner = f"cli:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
            result = await Replayer(store, replay_connector(sidecar), sidecar.stats, owner).drain()
        finally:
            await sidecar.topology.stop()
            await store.close()
        print(
            f"replayed {result.replayed}, already applied {result.duplicate}, "
            f"dead-lettered {result.dead_letter}, still pending {result.remaining}"
        )
        if result.lease_busy:
            raise CliFailure("another sidecar is replaying this spool right now (it holds the lease)")
        if result.stopped_by_error is not None:
            raise CliFailure(f"replay stopped: {result.stopped_by_error}")
        if result.dead_letter:
            print("some records failed: see `pgsidecar spool dead-letters`", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK

    return _run_spool_command(args, body)


def cmd_init_db(args: argparse.Namespace) -> int:
    from .app import Sidecar
    from .outcome import MARKER_TABLE, ensure_marker_ledger
    from .protocol.sqlstate import ProxyError
    from .spool.replay import LEDGER_TABLE, ensure_ledger
    from .spooling import replay_connector

    async def body(cfg: SidecarConfig) -> int:
        user = args.user or cfg.upstream.probe_user or "postgres"
        databases = args.database or [cfg.upstream.probe_database]
        sidecar = Sidecar(cfg, args.config)
        try:
            await _find_writer(sidecar)
            connect = replay_connector(sidecar)
            for database in databases:
                try:
                    conn = await connect(user, database)
                    try:
                        await ensure_ledger(conn)
                        # Also with commit_outcome off: a reload may turn it on.
                        await ensure_marker_ledger(conn)
                    finally:
                        conn.close("init-db done")
                except ProxyError as exc:
                    raise CliFailure(
                        f"cannot create {LEDGER_TABLE} / {MARKER_TABLE} in {database} as {user}: "
                        f"{exc.message}"
                    ) from exc
                writer = sidecar.topology.writer
                print(f"{LEDGER_TABLE} and {MARKER_TABLE} ready in database {database} on {writer}")
        finally:
            await sidecar.topology.stop()
        return EXIT_OK

    return _run_spool_command(args, body)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgsidecar",
        description="PostgreSQL wire-protocol sidecar: pooling, failover and a durable write spool.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the sidecar in the foreground (SIGTERM drains and exits)")
    run.add_argument("-c", "--config", required=True, help="path to sidecar.yaml")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("-c", "--config", required=True, help="path to sidecar.yaml")
    check.set_defaults(func=cmd_check_config)
    spool = sub.add_parser("spool", help="inspect and operate the write spool")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True)
    listing = spool_sub.add_parser("list", help="pending records, oldest first")
    listing.add_argument("-c", "--config", required=True, help="path to sidecar.yaml")
    listing.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    listing.set_defaults(func=cmd_spool_list)
    dead = spool_sub.add_parser("dead-letters", help="records that replay could not apply, with the error")
    dead.add_argument("-c", "--config", required=True, help="path to sidecar.yaml")
    dead.set_defaults(func=cmd_spool_dead_letters)
    replay = spool_sub.add_parser("replay", help="replay pending records into the current writer now")
    replay.add_argument("-c", "--config", required=True, help="path to sidecar.yaml")
    replay.add_argument("--retry", action="store_true", help="move dead letters back to pending first")
    replay.set_defaults(func=cmd_spool_replay)
    init_db = sub.add_parser(
        "init-db",
        help="create the spool replay ledger (pgsidecar.spool_applied) and the commit-outcome ledger "
        "(pgsidecar.commit_marker) in the application database(s)",
    )
    init_db.add_argument("-c", "--config", required=True, help="path to sidecar.yaml")
    init_db.add_argument(
        "-d", "--database", action="append", help="database to prepare (repeatable; default: probe_database)"
    )
    init_db.add_argument("-U", "--user", help="user to connect as (default: upstream.probe_user)")
    init_db.set_defaults(func=cmd_init_db)
    demo = sub.add_parser("demo", help="the Cafe app through the sidecar, and a failover/outage drill")
    demo.add_argument("--once", action="store_true", help="exit after the drill (0: nothing lost)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
