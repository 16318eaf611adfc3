"""Builds the data path's modules (proxy.compiled.MODULES) with mypyc, as C extensions.

Everything else is in pyproject.toml. mypyc type-checks the whole program, so it needs mypy and
the runtime dependencies: `make build` runs `setup.py build_ext --inplace` in the project's venv,
which has them; `pip wheel .` / `pip install .` get them into pip's isolated build environment from
pyproject.toml's [build-system] requirements (the same pins), so the wheel carries the compiled
modules for the platform that built it. The compiled modules are the same Python source, so an
install without them still works: with PGSIDECAR_PURE=1, without mypy, or when the compile fails,
pgsidecar runs from the sources (more CPU per transaction) and says so at startup.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


@functools.cache
def _compiled_module() -> Any:
    # Loaded from its file: importing the package would import the modules being built.
    spec = importlib.util.spec_from_file_location("_pgsidecar_compiled", HERE / "proxy" / "compiled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fall_back(why: str) -> None:
    print(f"pgsidecar: {why}; the Python sources will run instead", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python install working instead of failing it."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any compiler or toolchain failure
            _fall_back(f"compiling the data path failed ({exc})")
            return
        if self.extensions:
            module = _compiled_module()
            module.write_manifest(HERE / "proxy")
            if not self.inplace:  # a wheel: the manifest goes where the extensions went
                module.write_manifest(Path(self.build_lib) / "proxy")


def _extensions() -> list[Any]:
    if _compiled_module().pure_requested():
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _fall_back("mypyc is not installed")
        return []
    module = _compiled_module()
    sources = [str(module.source_path(name).relative_to(HERE)) for name in module.MODULES]
    # One shared library inside the package (proxy/data_path__mypyc...so), so an editable install
    # finds it beside the modules.
    try:
        return list(mypycify(sources, opt_level="3", group_name="proxy.data_path"))
    except (SystemExit, Exception) as exc:  # mypyc exits on a type error
        _fall_back(f"mypyc could not compile the data path ({exc})")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
