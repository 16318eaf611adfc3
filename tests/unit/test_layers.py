"""The config package stands alone: loading it imports nothing of `proxy` (the import-linter
contracts in pyproject.toml check the same statically; this checks what really gets imported)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sidecar_config_imports_nothing_of_proxy() -> None:
    probe = (
        "import sys, sidecar_config; "
        "sidecar_config.parse_config; "
        "print(sorted(m for m in sys.modules if m == 'proxy' or m.startswith('proxy.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
