"""Which build of the data path runs: the mypyc-compiled modules, or their Python sources.

`pip install` compiles the modules below with mypyc when it can (setup.py): the same source, as C
extensions, about half the CPU per transaction. The extension files sit next to the sources
(editable install), and Python's import system prefers them, so an extension built from an older
source would silently run old code. `select()` (run by `proxy/__init__.py` before anything else
is imported) prevents that: it compares the sources with the digests recorded when they were
compiled, and if any differ, or any extension is missing, or `PGSIDECAR_PURE=1` is set, every
module below is imported from its source instead. All or none: compiled modules call each other
directly, so a mix would run a stale module. This file is not compiled itself.

Rules for the compiled modules (tests/unit/test_compiled.py checks the first):
* No `await` (nor `async with`/`async for`) inside an except or finally block: a mypyc-compiled
  coroutine that suspends while handling an exception can raise that exception again at a later
  await. Catch, step out of the handler, then await.
* Annotations are enforced at runtime (a `bytes` parameter rejects a memoryview), and classes are
  native: no monkeypatching, and libraries that look methods up with `inspect.ismethod` need
  `@mypyc_attr(native_class=False)` (sqlclass's pglast Visitor).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Final

# The data path: everything a relayed message touches. (Order does not matter.)
MODULES: Final = (
    "proxy.client",
    "proxy.session.states",
    "proxy.session.mode",
    "proxy.session.core",
    "proxy.session.scan",
    "proxy.session.attach",
    "proxy.session.session_relay",
    "proxy.session.transaction_routing",
    "proxy.session.carryover",
    "proxy.session.replay",
    "proxy.session.outage_session",
    "proxy.session.login",
    "proxy.server",
    "proxy.pool",
    "proxy.hold",  # Gate: read at every client read
    "proxy.writer",  # WriterCell: read at every checkout
    "proxy.requests",  # request kinds: classified per request
    "proxy.statements",
    "proxy.sqlclass",
    "proxy.journal",  # TransactionJournal: fed per relayed request and answer
    "proxy.outcome_answer",  # commit markers: an id, a Query and an answer per writing COMMIT
    "proxy.metrics",
    "proxy.protocol.framing",
    "proxy.protocol.messages",
)
# The package's parent (the project root in a checkout).
ROOT: Final = Path(__file__).resolve().parent.parent
# Digests of the sources as they were compiled; written by setup.py after a successful build.
MANIFEST: Final = Path(__file__).resolve().with_name("compiled.json")

# What `select()` decided, for the startup log: "compiled", or why the sources run instead.
status = "not selected yet"


def source_path(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def source_digests() -> dict[str, str]:
    return {name: hashlib.sha256(source_path(name).read_bytes()).hexdigest() for name in MODULES}


def extension_path(module: str) -> Path | None:
    """The compiled extension beside `module`'s source, if there is one."""
    source = source_path(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def pure_requested() -> bool:
    """PGSIDECAR_PURE=1: run (and build) the Python sources only."""
    return os.environ.get("PGSIDECAR_PURE", "") not in ("", "0")


def _why_not_compiled() -> str | None:
    if pure_requested():
        return "PGSIDECAR_PURE is set"
    missing = [name for name in MODULES if extension_path(name) is None]
    if missing:
        return f"not compiled ({', '.join(missing)}): install with a C compiler present"
    try:
        recorded = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return f"no readable build manifest at {MANIFEST}: rebuild (make build)"
    changed = sorted(name for name, digest in source_digests().items() if recorded.get(name) != digest)
    if changed:
        return f"source changed since it was compiled ({', '.join(changed)}): rebuild (make build)"
    return None


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Imports the data path's modules from their .py files, ahead of the extension files."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def select() -> str:
    """Decide, once per process, which build of the data path is imported; returns `status`."""
    global status
    if status != "not selected yet":
        return status
    reason = _why_not_compiled()
    if reason is None:
        status = "compiled"
    else:
        status = f"python sources ({reason})"
        # (Also where no extension exists: the finder then picks what import would have.)
        sys.meta_path.insert(0, _SourceFinder())
    return status


def write_manifest(package_dir: Path = MANIFEST.parent) -> None:
    """Record the sources just compiled (setup.py, after the extensions are built), in the
    package directory the extensions went to."""
    (package_dir / MANIFEST.name).write_text(json.dumps(source_digests(), indent=1, sort_keys=True) + "\n")
