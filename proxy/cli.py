"""The `pgsidecar` command line (also `python -m proxy`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sidecar_config import ConfigError, SidecarConfig, dump_effective, load_config

from . import logs

EXIT_OK = 0
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

    from .app import Sidecar

    async def main() -> None:
        await Sidecar(cfg, args.config).serve_forever()

    try:
        uvloop.run(main())
    except OSError as exc:
        # Typically the listen address is taken: say which, instead of a traceback.
        logs.event("startup_failed", logs.ERROR, listen=str(cfg.listen), error=str(exc))
        return 1
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    print(f"# {args.config}: valid. Effective configuration (secrets hidden):")
    print(dump_effective(cfg), end="")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from demo_app.smoke import run_smoke_demo

    return run_smoke_demo()


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
    demo = sub.add_parser("demo", help="run the local demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
