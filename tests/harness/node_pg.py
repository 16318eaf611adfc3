"""Run tests/harness/node/workload.mjs (node-postgres, the common Node.js driver) against a sidecar.

`make test` installs Node.js and npm from Debian when missing and the pinned `pg` package from
package-lock.json (`npm ci`) into tests/harness/node/node_modules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import workloads

NODE_DIR = Path(__file__).with_name("node")
WORKLOAD = NODE_DIR / "workload.mjs"
TIMEOUT = 120


def node() -> str:
    binary = shutil.which("node")
    if binary is None or not (NODE_DIR / "node_modules" / "pg").is_dir():
        pytest.fail(
            "node or node-postgres not found: `make test` installs Debian's nodejs and npm, then "
            "`npm ci` in tests/harness/node",
            pytrace=False,
        )
    return binary


def run_workload(
    host: str, port: int, db: str, user: str, password: str, table: str, ref: str, tasks: int, rounds: int
) -> workloads.WorkloadResult:
    """Run the workload: `table (w int, i int)` takes its inserts, `ref (id, label)` holds ids
    1..100 labelled 'r<id>'."""
    out = subprocess.run(
        [node(), str(WORKLOAD), host, str(port), db, user, password, table, ref, str(tasks), str(rounds)],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=NODE_DIR,
    )  # fmt: skip
    summary = None
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    return workloads.WorkloadResult(
        returncode=out.returncode,
        inserted=summary["inserted"] if summary else None,
        errors=summary["errors"] if summary else [],
        output=out.stdout + out.stderr,
    )
