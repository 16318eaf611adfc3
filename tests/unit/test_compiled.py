"""The compiled data path (proxy/compiled.py): used only when it matches the sources."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import proxy
import proxy.client
from proxy import compiled

ROOT = Path(proxy.__file__).resolve().parent.parent
BUILT = all(compiled.extension_path(name) is not None for name in compiled.MODULES)
needs_build = pytest.mark.skipif(not BUILT, reason="the data path is not compiled here (make build)")

PROBE = (
    "import proxy, proxy.client, proxy.protocol.framing as f; "
    "print(proxy.compiled.status); print(proxy.client.__file__); print(f.__file__)"
)


def probe(root: Path, **env: str) -> list[str]:
    """Import the package at `root` in a fresh interpreter: status, and where two modules came from."""
    environment = {k: v for k, v in os.environ.items() if k != "PGSIDECAR_PURE"}
    environment.update(env, PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=root, env=environment, capture_output=True, text=True, check=True
    )
    return out.stdout.splitlines()


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """The package as built here (extensions and manifest included), in a directory of its own."""
    shutil.copytree(ROOT / "proxy", tmp_path / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "sidecar_config", tmp_path / "sidecar_config")
    return tmp_path


@needs_build
def test_this_suite_runs_the_compiled_data_path() -> None:
    # `make test` builds it first; a stale or failed build would otherwise go unnoticed (and the
    # tests would be testing the sources, not what ships).
    assert compiled.status == "compiled", compiled.status
    assert Path(proxy.client.__file__).suffix == ".so"


@needs_build
def test_a_copy_that_matches_its_build_imports_the_extensions(package_copy: Path) -> None:
    status, client, framing = probe(package_copy)
    assert status == "compiled"
    assert client.endswith(".so") and framing.endswith(".so")


@needs_build
def test_a_changed_source_runs_from_the_sources_all_of_them(package_copy: Path) -> None:
    source = package_copy / "proxy" / "server.py"
    source.write_text(source.read_text() + "\n# edited after the build\n")
    status, client, framing = probe(package_copy)
    assert status.startswith("python sources (source changed since it was compiled (proxy.server)")
    # Not only the changed module: compiled modules call each other directly.
    assert client.endswith("proxy/client.py") and framing.endswith("proxy/protocol/framing.py")


@needs_build
def test_a_missing_manifest_runs_from_the_sources(package_copy: Path) -> None:
    (package_copy / "proxy" / "compiled.json").unlink()
    status, client, _ = probe(package_copy)
    assert status.startswith("python sources (no readable build manifest")
    assert client.endswith("proxy/client.py")


def test_pgsidecar_pure_runs_from_the_sources(package_copy: Path) -> None:
    status, client, framing = probe(package_copy, PGSIDECAR_PURE="1")
    assert status == "python sources (PGSIDECAR_PURE is set)"
    assert client.endswith("proxy/client.py") and framing.endswith("proxy/protocol/framing.py")


def test_without_extensions_the_sources_run_and_say_why(package_copy: Path) -> None:
    for built in (package_copy / "proxy").rglob("*.so"):
        built.unlink()
    status, client, _ = probe(package_copy)
    assert status.startswith("python sources (not compiled (proxy.client, ")
    assert client.endswith("proxy/client.py")


def awaits_while_handling(tree: ast.AST) -> list[str]:
    """`await`, `async with` and `async for` inside an except or finally block (not counting
    functions defined there)."""
    found: list[str] = []

    def visit(node: ast.AST, handling: str | None) -> None:
        if isinstance(node, ast.Await | ast.AsyncWith | ast.AsyncFor) and handling:
            found.append(f"line {node.lineno}: {ast.unparse(node).splitlines()[0]} (in {handling})")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            handling = None
        if isinstance(node, ast.Try | ast.TryStar):
            for child in (*node.body, *node.orelse):
                visit(child, handling)
            for handler in node.handlers:
                for child in handler.body:
                    visit(child, f"the except block at line {handler.lineno}")
            for child in node.finalbody:
                visit(child, f"the finally block of the try at line {node.lineno}")
            return
        for sub in ast.iter_child_nodes(node):
            visit(sub, handling)

    visit(tree, None)
    return found


def test_compiled_modules_never_await_while_handling_an_exception() -> None:
    # mypyc-compiled coroutines mishandle an await that suspends while an exception is being
    # handled: the exception can be raised again at a later await (seen: a failover retry loop
    # failing the client with the first attempt's WriterChanged, three times over).
    problems = {
        name: awaits_while_handling(ast.parse(compiled.source_path(name).read_text()))
        for name in compiled.MODULES
    }
    assert {name: found for name, found in problems.items() if found} == {}


def test_the_await_audit_finds_what_it_looks_for() -> None:
    source = (
        "async def f():\n"
        "    try:\n        await a()\n"
        "    except E:\n        await b()\n"
        "    finally:\n        async with c():\n            pass\n"
        "    try:\n        pass\n"
        "    except E:\n        async def later():\n            await d()\n"
    )
    found = awaits_while_handling(ast.parse(source))
    assert [line.split(":")[0] for line in found] == ["line 5", "line 7"]
