"""The fake-driven session tests, run from the Python sources when this process imported the
compiled build (the compiled session rejects the fakes' types; see tests/unit/session_fakes.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .session_fakes import COMPILED

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not COMPILED, reason="the sources run here already")
def test_session_state_and_fast_path_tests_from_the_sources() -> None:
    files = [
        str(HERE / name)
        for name in ("test_client_states.py", "test_fast_paths.py", "test_transaction_replay.py")
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        env={**os.environ, "PGSIDECAR_PURE": "1"},
        cwd=HERE.parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]
