"""The wheel: `pip wheel .` builds pgsidecar with the compiled data path for this platform, and a
fresh venv that installs it starts with `data_path=compiled` (PGSIDECAR_PURE=1: the Python sources
it also carries).

`make wheel-check` runs it (2 to 4 minutes; .ci/run runs it after `make test`). The wheel is built
once, from a copy of the sources, in pip's isolated build environment, as a user outside this
checkout would build it (the build requirements come from pip's cache, filled when `make` created
.venv with the same pins). The fresh venv gets its dependencies from this venv's site-packages
through a .pth line (no network, and none of this checkout's own code: a path line in a .pth file
does not run the editable install's finder).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from proxy import compiled
from tests.harness.pg import free_port

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "setup.py", "proxy", "sidecar_config", "demo_app")
BUILD_TIMEOUT = 900  # mypyc type-checks and compiles the data path: a minute or two

# The build runs in the module's first test.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + 300)
# Building takes about 2 minutes of a 2-core machine: `make wheel-check` runs these (.ci/run does,
# after `make test`), not every `make test`.
needs_wheel_check = pytest.mark.skipif(
    os.environ.get("PGSIDECAR_WHEEL_CHECK") != "1", reason="builds the wheel: run by `make wheel-check`"
)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PGSIDECAR_PURE", "PYTHONPATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(work / "src")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(work / "dist"), str(src)],
        env=_clean_env(), capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    [built] = (work / "dist").glob("pgsidecar-*.whl")
    return built


def _copy_sources(dest: Path) -> Path:
    dest.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.so", "compiled.json", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=skip)
        else:
            shutil.copy2(path, dest / name)
    return dest


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("venv") / "venv"
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=_clean_env(),
    ).stdout.strip()  # fmt: skip
    (Path(site) / "pgsidecar-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        env=_clean_env(), check=True, timeout=300,
    )  # fmt: skip
    yield root


@needs_wheel_check
def test_wheel_carries_the_compiled_data_path_and_its_sources(wheel: Path) -> None:
    assert "-cp3" in wheel.name and wheel.name.endswith(f"{sysconfig.get_platform().replace('-', '_')}.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for module in compiled.MODULES:
        stem = module.replace(".", "/")
        assert f"{stem}{suffix}" in names, f"{module}: no extension in the wheel"
        assert f"{stem}.py" in names, f"{module}: no source in the wheel"
    assert "proxy/compiled.json" in names
    assert f"proxy/data_path__mypyc{suffix}" in names
    assert not any(n.startswith(("tests/", "bench/", "deploy/")) for n in names)


def _start_log(venv_root: Path, tmp_path: Path, env: dict[str, str]) -> str:
    """`pgsidecar run` from the fresh venv (outside the checkout) until it listens; its log."""
    listen, metrics = free_port(), free_port()
    config = {
        "listen": f"127.0.0.1:{listen}",
        "metrics_listen": f"127.0.0.1:{metrics}",
        "auth": {"method": "trust"},
        # Nothing listens there: the sidecar starts, listens and looks for a writer.
        "upstream": {"tls": "disable", "regions": [{"name": "home", "hosts": [f"127.0.0.1:{free_port()}"]}]},
        "spool": {"backend": "none"},
    }
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "sidecar.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(venv_root / "bin" / "pgsidecar"), "run", "-c", str(path)],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "event=listening" not in log.read_text():
            assert proc.poll() is None, f"pgsidecar exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"pgsidecar did not start:\n{log.read_text()}"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(30)
    return next(line for line in log.read_text().splitlines() if "event=listening" in line)


@needs_wheel_check
def test_fresh_install_of_the_wheel_runs_the_compiled_data_path(fresh_venv: Path, tmp_path: Path) -> None:
    line = _start_log(fresh_venv, tmp_path, _clean_env())
    assert "data_path=compiled" in line, line
    # It is the installed package that ran, not this checkout.
    where = subprocess.run(
        [str(fresh_venv / "bin" / "python"), "-c", "import proxy; print(proxy.__file__)"],
        cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(fresh_venv) in where and str(REPO) not in where


@needs_wheel_check
def test_wheel_falls_back_to_its_sources_when_asked(fresh_venv: Path, tmp_path: Path) -> None:
    line = _start_log(fresh_venv, tmp_path, {**_clean_env(), "PGSIDECAR_PURE": "1"})
    assert 'data_path="python sources (PGSIDECAR_PURE is set)"' in line, line


def test_build_requirements_pin_what_the_package_pins() -> None:
    """mypyc type-checks against the build environment: it must hold the very versions that run."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requires = set(project["build-system"]["requires"])
    runtime = set(project["project"]["dependencies"])
    build_extra = set(project["project"]["optional-dependencies"]["build"])
    assert runtime | build_extra == requires


@needs_wheel_check
def test_without_the_compiled_data_path_the_wheel_runs_its_sources(tmp_path: Path) -> None:
    """Where nothing can be compiled (PGSIDECAR_PURE=1 at build time stands in for a platform without
    a compiler: setup.py then builds no extension), the wheel is pure Python, installs anywhere and
    runs the sources, saying why."""
    src = _copy_sources(tmp_path / "src")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
        env={**_clean_env(), "PGSIDECAR_PURE": "1"}, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    [pure] = (tmp_path / "dist").glob("pgsidecar-*.whl")
    assert pure.name.endswith("-py3-none-any.whl"), pure.name
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=_clean_env(),
    ).stdout.strip()  # fmt: skip
    (Path(site) / "pgsidecar-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(pure)],
                   env=_clean_env(), check=True, timeout=300)  # fmt: skip
    line = _start_log(root, tmp_path, _clean_env())
    assert 'data_path="python sources (not compiled' in line, line
