"""deploy/: the systemd unit, the container image, the Kubernetes manifest and the CloudFormation
template are checked against each other and against the sidecar's own config validation.

Nothing here can start systemd, build an image, reach a cluster or create AWS resources, so each
artifact gets what can be checked on this machine: its file parses, the settings that make it
work are there (and agree with the sidecar config it carries), every embedded config passes
`pgsidecar check-config`, systemd-analyze verifies the unit, and cfn-lint lints the template.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "pgsidecar.service"
SYSTEMD_CONFIG = DEPLOY / "systemd" / "sidecar.yaml"
SYSUSERS = DEPLOY / "systemd" / "pgsidecar.sysusers"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
CONTAINER_IGNORE = DEPLOY / "container" / "Containerfile.dockerignore"
CONTAINER_CONFIG = DEPLOY / "container" / "sidecar.yaml"
K8S = DEPLOY / "kubernetes" / "pgsidecar.yaml"
CFN = DEPLOY / "cloudformation" / "aurora-global.yaml"
README = DEPLOY / "README.md"
DASHBOARD = DEPLOY / "grafana" / "pgsidecar.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"

# What the `env:VAR` references of the example configs need to validate. Dummy values: the check
# is about the config's shape, not about these secrets.
CONFIG_ENV = {
    "CAFE_DB_PASSWORD": "cafe-password-for-tests",
    "PGSIDECAR_ADMIN_PASSWORD": "admin-password-for-tests",
    "APP_DB_USER": "app",
    "APP_DB_PASSWORD": "app-password-for-tests",
    "PGSIDECAR_UPSTREAM": "db.example.com:5432",
}

ENV_REF = re.compile(r"\benv:([A-Za-z_][A-Za-z0-9_]*)")


# ---------------------------------------------------------------- helpers


def check_config(path: Path) -> dict[str, Any]:
    """Run `python -m proxy check-config -c PATH` as an operator would; return the effective config."""
    env = {**os.environ, **CONFIG_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"check-config {path} failed:\n{result.stderr}{result.stdout}"
    assert "valid" in result.stdout.splitlines()[0]
    effective = yaml.safe_load(result.stdout)
    assert isinstance(effective, dict)
    return effective


def env_refs(text: str) -> set[str]:
    return set(ENV_REF.findall(text))


def port_of(endpoint: str) -> int:
    return int(endpoint.rpartition(":")[2])


def host_of(endpoint: str) -> str:
    return endpoint.rpartition(":")[0]


def seconds(value: str) -> float:
    """A systemd time span as written in the unit ("45s", "2min", "1min 30s", "90")."""
    units = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


# ---------------------------------------------------------------- every artifact


@pytest.mark.parametrize(
    "path",
    [UNIT, SYSTEMD_CONFIG, SYSUSERS, CONTAINERFILE, CONTAINER_IGNORE, CONTAINER_CONFIG, K8S, CFN, DASHBOARD,
     ALERTS, ALERT_TESTS, README],
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_artifact_exists_and_is_documented(path: Path) -> None:
    assert path.is_file(), f"{path} is missing"
    if path != README:
        assert str(path.relative_to(DEPLOY)) in README.read_text(), (
            f"deploy/README.md does not mention {path}"
        )


# ---------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}}: keys may repeat (ExecReload=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}:{number}: setting outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}:{number}: not a key=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT)


@pytest.fixture(scope="module")
def systemd_config() -> dict[str, Any]:
    return check_config(SYSTEMD_CONFIG)


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values, f"[Service] {key}= is not set"
    assert len(values) == 1, f"[Service] {key}= is set {len(values)} times"
    return values[0]


def test_systemd_unit_runs_drains_and_reloads_the_sidecar(unit: dict[str, dict[str, list[str]]]) -> None:
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert one(service, "Type") in ("exec", "simple")
    argv = shlex.split(one(service, "ExecStart"))
    assert PurePosixPath(argv[0]).name == "pgsidecar" and PurePosixPath(argv[0]).is_absolute()
    assert argv[1:] == ["run", "-c", "/etc/pgsidecar/sidecar.yaml"]
    # Reload: the file is checked with the same binary, then SIGHUP goes to the main process.
    reload_lines = [shlex.split(line) for line in service["ExecReload"]]
    assert reload_lines[-1] == ["/bin/kill", "-HUP", "$MAINPID"]
    assert all(line[0] == argv[0] for line in reload_lines[:-1])
    assert one(service, "KillSignal") == "SIGTERM"
    assert one(service, "Restart") == "on-failure"
    assert seconds(one(service, "RestartSec")) > 0
    # Exit 2 is an invalid config (proxy.cli.EXIT_CONFIG): restarting cannot fix it.
    assert one(service, "RestartPreventExitStatus") == "2"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_unit_runs_as_its_own_user_with_only_the_spool_writable(
    unit: dict[str, dict[str, list[str]]], systemd_config: dict[str, Any]
) -> None:
    service = unit["Service"]
    user = one(service, "User")
    assert user not in ("root", "0")
    assert f"u {user} " in SYSUSERS.read_text(), "the sysusers.d file must create the unit's user"
    state = one(service, "StateDirectory")
    state_dir = PurePosixPath("/var/lib") / state
    assert one(service, "ReadWritePaths") == str(state_dir)
    spool = systemd_config["spool"]
    assert spool["backend"] == "sqlite"
    assert PurePosixPath(spool["path"]).parent == state_dir, "the spool must be in the StateDirectory"
    # Loopback only: the applications on the host are the only clients.
    assert host_of(systemd_config["listen"]) == "127.0.0.1"


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "CapabilityBoundingSet": "",
    "MemoryDenyWriteExecute": "yes",
    "LockPersonality": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
}


def test_systemd_unit_is_hardened(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    for key, expected in HARDENING.items():
        assert one(service, key) == expected, f"{key}="
    assert set(one(service, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["SystemCallFilter"][0] == "@system-service"


def test_systemd_timeouts_and_limits_fit_the_config(
    unit: dict[str, dict[str, list[str]]], systemd_config: dict[str, Any]
) -> None:
    service = unit["Service"]
    # SIGTERM drains for up to shutdown_timeout: systemd must not SIGKILL the drain.
    shutdown_timeout = float(systemd_config["shutdown_timeout"])
    assert seconds(one(service, "TimeoutStopSec")) >= shutdown_timeout + 10
    # One socket per client, one server connection per client in session mode, plus pools,
    # probes, the HTTP endpoint and the spool.
    max_clients = int(systemd_config["pool"]["max_clients"])
    assert int(one(service, "LimitNOFILE")) >= 2 * max_clients + 1024


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with its pgsidecar path pointed at this venv's: systemd-analyze checks that the
    executables exist, and /opt/pgsidecar is not installed here."""
    installed = Path(sys.executable).with_name("pgsidecar")
    assert installed.is_file(), f"{installed} is missing: install the project into the venv"
    path = tmp_path / UNIT.name
    path.write_text(UNIT.read_text().replace("/opt/pgsidecar/bin/pgsidecar", str(installed)))
    return path


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd); the unit was parsed above")
    return tool


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    tool = systemd_analyze()
    result = subprocess.run(
        [tool, "verify", str(unit_for_this_machine(tmp_path))], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # verify also warns (unknown keys, bad values) on stderr without failing: none is accepted.
    assert result.stderr.strip() == "", result.stderr


def test_systemd_security_exposure_is_low(tmp_path: Path) -> None:
    tool = systemd_analyze()
    if "--offline" not in subprocess.run([tool, "--help"], capture_output=True, text=True).stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(unit_for_this_machine(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    # 0 is fully locked down, 10 is unprotected; "OK" ends at 2.0 in systemd's own scale.
    assert float(match.group(1)) <= 2.0, result.stdout


MDWE_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)  # kernel older than 6.3: no MDWE prctl
    import mmap
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        pass
    else:
        sys.exit("MDWE is not in force")
    # Everything with native code on the sidecar's path, then the CLI itself.
    import asyncio, uvloop, pglast, pydantic_core, yaml, scramp, prometheus_client
    pglast.parse_sql("INSERT INTO t VALUES (1)")
    async def main():
        await asyncio.to_thread(lambda: None)
    uvloop.run(main())
    from proxy.cli import main as cli
    sys.exit(cli(["check-config", "-c", sys.argv[1]]))
    """
)


def test_sidecar_works_under_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes in the unit: the same kernel rule (prctl PR_SET_MDWE), applied
    to this process tree, must not break uvloop, pglast, pydantic-core or the CLI."""
    result = subprocess.run(
        [sys.executable, "-c", MDWE_SCRIPT, str(SYSTEMD_CONFIG)],
        cwd=REPO,
        env={**os.environ, **CONFIG_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode == 77:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- container image


def containerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction is dropped, as Docker does
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the file ends inside a continued instruction"
    return instructions


@pytest.fixture(scope="module")
def containerfile() -> list[tuple[str, str]]:
    return containerfile_instructions(CONTAINERFILE)


@pytest.fixture(scope="module")
def container_config() -> dict[str, Any]:
    return check_config(CONTAINER_CONFIG)


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


KNOWN_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "RUN",
    "WORKDIR",
    "COPY",
    "ADD",
    "LABEL",
    "USER",
    "VOLUME",
    "EXPOSE",
    "HEALTHCHECK",
    "STOPSIGNAL",
    "ENTRYPOINT",
    "CMD",
    "SHELL",
    "ONBUILD",
}


def test_containerfile_is_a_pinned_multi_stage_build(containerfile: list[tuple[str, str]]) -> None:
    unknown = {keyword for keyword, _ in containerfile} - KNOWN_INSTRUCTIONS
    assert not unknown, f"not Dockerfile instructions: {unknown}"
    args = {
        name: default
        for keyword, rest in containerfile
        if keyword == "ARG"
        for name, _, default in [rest.partition("=")]
    }
    froms = [rest.split() for keyword, rest in containerfile if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    for words in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
        name, _, tag = image.partition("@")[0].partition(":")
        assert name == "python", image
        assert tag.startswith("3.11-slim"), f"{image}: pin python 3.11 slim"
    # Built from the wheel `pip wheel .` makes (pip's isolated build, so the data path is compiled
    # as anywhere else), then installed from it: not editable, the runtime stage has no source tree.
    runs = [rest for keyword, rest in containerfile if keyword == "RUN"]
    assert any(re.search(r"pip wheel (\S+ )*\.(\s|$)", r) for r in runs), runs
    assert not any("--no-build-isolation" in r for r in runs)
    installs = [r for r in runs if "pip install" in r]
    assert installs and all(re.search(r"pip install (\S+ )*/wheels/pgsidecar-\*\.whl", r) for r in installs)
    assert not any(" -e " in r or "--editable" in r for r in installs)
    assert any("proxy.compiled.status != 'compiled'" in r for r in runs), "fail a build that runs the sources"
    assert "COPY --from=build" in " ".join(f"{k} {r}" for k, r in final_stage(containerfile))


def test_containerfile_copies_only_files_that_exist(containerfile: list[tuple[str, str]]) -> None:
    ignore_rules = [
        line for line in CONTAINER_IGNORE.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert ignore_rules[0] == "*", "the ignore file is an allow-list"
    allowed = {rule[1:].rstrip("/") for rule in ignore_rules if rule.startswith("!")}
    copies = [rest.split() for keyword, rest in containerfile if keyword == "COPY"]
    for words in copies:
        if words[0].startswith("--from="):
            continue
        *sources, _destination = [w for w in words if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by {CONTAINER_IGNORE.name}"


def test_container_runs_the_sidecar_as_non_root(
    containerfile: list[tuple[str, str]], container_config: dict[str, Any]
) -> None:
    runtime = final_stage(containerfile)
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in runtime:
        by_keyword.setdefault(keyword, []).append(rest)
    user = by_keyword["USER"][-1].partition(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root USER (runAsNonRoot can only check a uid)"
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    command = exec_form(by_keyword["ENTRYPOINT"][-1]) + exec_form(by_keyword["CMD"][-1])
    assert command[:3] == ["pgsidecar", "run", "-c"]
    config_path = command[3]
    copies = [rest.split() for rest in by_keyword["COPY"]]
    assert ["deploy/container/sidecar.yaml", config_path] in copies, "the image carries the config it runs"
    # The ports the config listens on are the ones the image declares.
    exposed = {int(port.partition("/")[0]) for rest in by_keyword["EXPOSE"] for port in rest.split()}
    assert exposed == {6432, 9930}
    assert {port_of(container_config["listen"]), port_of(container_config["metrics_listen"])} == exposed
    # 0.0.0.0: a published port reaches the container's interface, not its loopback.
    assert host_of(container_config["listen"]) == "0.0.0.0"
    # The spool lives on the declared volume.
    volumes = {v for rest in by_keyword["VOLUME"] for v in exec_form(rest)}
    assert container_config["spool"]["backend"] == "sqlite"
    assert str(PurePosixPath(container_config["spool"]["path"]).parent) in volumes


def test_container_healthcheck_calls_healthz_with_python(
    containerfile: list[tuple[str, str]], container_config: dict[str, Any]
) -> None:
    (healthcheck,) = [rest for keyword, rest in final_stage(containerfile) if keyword == "HEALTHCHECK"]
    options, _, command = healthcheck.partition("CMD ")
    argv = exec_form(command)
    assert argv[0] == "python", "slim images have no curl or wget"
    url = re.search(r"http://[^'\"]+", argv[-1])
    assert url, argv
    parts = urlsplit(url.group(0))
    assert parts.path == "/healthz"
    assert parts.port == port_of(container_config["metrics_listen"])
    assert "--timeout=" in options and "--interval=" in options
    # The command itself works: it is valid Python (compiled, not run: nothing listens here).
    compile(argv[-1], "<HEALTHCHECK>", "exec")


def test_container_config_passes_check_config(container_config: dict[str, Any]) -> None:
    assert container_config["auth"]["method"] == "scram-sha-256"
    assert set(env_refs(CONTAINER_CONFIG.read_text())) <= set(CONFIG_ENV)


# ---------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def k8s_documents() -> list[dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(K8S.read_text()) if d is not None]
    assert all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in documents)
    return documents


def k8s_object(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in documents if d["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def pod_spec(k8s_documents: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = k8s_object(k8s_documents, "Deployment")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def sidecar_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod_spec.get("initContainers", [])
    (container,) = [c for c in containers if c["name"] == "pgsidecar"]
    return container


@pytest.fixture(scope="module")
def k8s_config_text(k8s_documents: list[dict[str, Any]], sidecar_container: dict[str, Any]) -> str:
    """The sidecar.yaml the pgsidecar container reads: its -c path, through its volume mounts."""
    config_map = k8s_object(k8s_documents, "ConfigMap")
    args = sidecar_container["args"]
    assert args[:2] == ["run", "-c"]
    path = PurePosixPath(args[2])
    (mount,) = [m for m in sidecar_container["volumeMounts"] if path.parent == PurePosixPath(m["mountPath"])]
    (volume,) = [
        v
        for v in k8s_object(k8s_documents, "Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == mount["name"]
    ]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    text: str = config_map["data"][path.name]
    return text


@pytest.fixture(scope="module")
def k8s_config(k8s_config_text: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("k8s") / "sidecar.yaml"
    path.write_text(k8s_config_text)
    return check_config(path)


def test_k8s_objects(k8s_documents: list[dict[str, Any]]) -> None:
    assert {d["kind"] for d in k8s_documents} == {"ServiceAccount", "ConfigMap", "Deployment"}
    deployment = k8s_object(k8s_documents, "Deployment")
    assert deployment["apiVersion"] == "apps/v1"
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_k8s_pgsidecar_is_a_native_sidecar(
    pod_spec: dict[str, Any], sidecar_container: dict[str, Any]
) -> None:
    # An init container that is restarted and kept running (Kubernetes >= 1.29), so it starts
    # before and stops after the application containers.
    assert sidecar_container["restartPolicy"] == "Always"
    assert "pgsidecar" not in {c["name"] for c in pod_spec["containers"]}
    assert "startupProbe" in sidecar_container, "the application must not start before the sidecar listens"


def named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port]
    return int(found)


def test_k8s_probes_hit_the_sidecars_http_endpoint(
    sidecar_container: dict[str, Any], k8s_config: dict[str, Any]
) -> None:
    metrics_port = port_of(k8s_config["metrics_listen"])
    # The kubelet probes the pod IP: the endpoint must not be bound to loopback only.
    assert host_of(k8s_config["metrics_listen"]) == "0.0.0.0"
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        http_get = sidecar_container[probe]["httpGet"]
        assert http_get["path"] == path, probe
        assert named_port(sidecar_container, http_get["port"]) == metrics_port, probe


def test_k8s_application_reaches_the_sidecar_on_loopback(
    pod_spec: dict[str, Any], k8s_config: dict[str, Any]
) -> None:
    assert k8s_config["listen"] == "127.0.0.1:6432"
    (app,) = pod_spec["containers"]
    (url,) = [e["value"] for e in app["env"] if e["name"] == "DATABASE_URL"]
    parts = urlsplit(url)
    assert (parts.hostname, parts.port) == ("127.0.0.1", 6432)
    user = parts.username
    assert user in {u["name"] for u in k8s_config["auth"]["users"]}


def test_k8s_grace_period_covers_the_drain(pod_spec: dict[str, Any], k8s_config: dict[str, Any]) -> None:
    grace = pod_spec["terminationGracePeriodSeconds"]
    shutdown_timeout = float(k8s_config["shutdown_timeout"])
    (app,) = pod_spec["containers"]
    pre_stop = app["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The application's preStop runs first, then its drain, then the sidecar's.
    assert grace > int(pre_stop[1]) + shutdown_timeout


def test_k8s_containers_are_locked_down(pod_spec: dict[str, Any]) -> None:
    pod_security = pod_spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    for container in [*pod_spec["initContainers"], *pod_spec["containers"]]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]
        assert container["resources"]["requests"], container["name"]


def test_k8s_image_user_matches_the_container_image(
    pod_spec: dict[str, Any], containerfile: list[tuple[str, str]]
) -> None:
    users = [rest for keyword, rest in final_stage(containerfile) if keyword == "USER"]
    uid = int(users[-1].partition(":")[0])
    assert pod_spec["securityContext"]["runAsUser"] == uid


def test_k8s_every_env_reference_of_the_config_is_provided(
    sidecar_container: dict[str, Any], k8s_config_text: str
) -> None:
    provided = {e["name"] for e in sidecar_container["env"]}
    missing = env_refs(k8s_config_text) - provided
    assert not missing, f"the config reads env vars the container does not set: {missing}"
    # Secrets come from Secret objects, never from literal values in the manifest.
    for entry in sidecar_container["env"]:
        if entry["name"] in env_refs(k8s_config_text):
            assert "secretKeyRef" in entry["valueFrom"], entry["name"]


def test_k8s_tls_ca_file_is_mounted(sidecar_container: dict[str, Any], k8s_config: dict[str, Any]) -> None:
    ca_file = PurePosixPath(k8s_config["upstream"]["ca_file"])
    mounts = {PurePosixPath(m["mountPath"]) for m in sidecar_container["volumeMounts"]}
    assert ca_file.parent in mounts


def test_k8s_metrics_are_scraped_and_the_role_is_irsa(
    k8s_documents: list[dict[str, Any]], pod_spec: dict[str, Any], k8s_config: dict[str, Any]
) -> None:
    annotations = k8s_object(k8s_documents, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port_of(k8s_config["metrics_listen"])
    assert annotations["prometheus.io/path"] == "/metrics"
    account = k8s_object(k8s_documents, "ServiceAccount")
    assert pod_spec["serviceAccountName"] == account["metadata"]["name"]
    assert re.fullmatch(
        r"arn:aws:iam::\d{12}:role/.+", account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    )


def test_k8s_spool_is_the_cloudformation_table(k8s_config: dict[str, Any], cfn: dict[str, Any]) -> None:
    spool = k8s_config["spool"]
    assert spool["backend"] == "dynamodb"
    assert spool["dynamodb"]["table"] == cfn["Parameters"]["SpoolTableName"]["Default"]
    # The table is made by CloudFormation and the policy grants no CreateTable.
    assert spool["dynamodb"]["create_table"] is False
    assert k8s_config["upstream"]["iam_auth"] is True
    assert k8s_config["upstream"]["topology"] == "aurora-global"


# ---------------------------------------------------------------- CloudFormation


class CfnLoader(yaml.SafeLoader):
    """YAML loader for CloudFormation's short forms (!Ref, !GetAtt, !Sub, ...)."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.MappingNode)
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


CfnLoader.add_multi_constructor("!", _cfn_tag)


@pytest.fixture(scope="module")
def cfn() -> dict[str, Any]:
    template = yaml.load(CFN.read_text(), Loader=CfnLoader)  # a SafeLoader subclass: safe
    assert isinstance(template, dict)
    return template


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_cfn_lint_is_clean() -> None:
    # Fail, never skip: cfn-lint is a dev dependency, and a template nobody lints rots.
    assert importlib.util.find_spec("cfnlint") is not None, (
        "cfn-lint is not installed: pip install -e '.[dev]' (it is pinned in pyproject's dev extras)"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from cfnlint.runner import main; sys.exit(main())",
            "--include-checks",
            "I",
            "--",
            str(CFN),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_cfn_role_parameter_selects_primary_or_secondary(cfn: dict[str, Any]) -> None:
    assert cfn["Parameters"]["Role"]["AllowedValues"] == ["primary", "secondary"]
    resources = cfn["Resources"]
    primary_only = {
        "GlobalCluster",
        "PrimaryDBCluster",
        "SpoolTable",
        "MasterSecret",
        "MasterSecretAttachment",
    }
    for name in primary_only:
        assert resources[name]["Condition"] == "IsPrimary", name
    assert resources["SecondaryDBCluster"]["Condition"] == "IsSecondary"
    assert resources["GlobalCluster"]["Type"] == "AWS::RDS::GlobalCluster"
    assert resources["PrimaryDBCluster"]["Properties"]["GlobalClusterIdentifier"] == {"Ref": "GlobalCluster"}
    secondary = resources["SecondaryDBCluster"]["Properties"]
    assert secondary["GlobalClusterIdentifier"] == {"Ref": "GlobalClusterIdentifier"}
    # A secondary inherits users and data from the primary.
    assert not {"MasterUsername", "MasterUserPassword", "DatabaseName"} & secondary.keys()
    # Writer + reader in each region, on whichever cluster this stack made.
    instances = [r for r in resources.values() if r["Type"] == "AWS::RDS::DBInstance"]
    assert len(instances) == 2
    for instance in instances:
        assert "Condition" not in instance
        assert instance["Properties"]["PubliclyAccessible"] is False


def test_cfn_clusters_are_encrypted_protected_and_use_iam_auth(cfn: dict[str, Any]) -> None:
    resources = cfn["Resources"]
    for name in ("PrimaryDBCluster", "SecondaryDBCluster"):
        cluster = resources[name]
        props = cluster["Properties"]
        assert props["Engine"] == "aurora-postgresql"
        assert props["EngineVersion"] == {"Ref": "EngineVersion"}
        assert props["EnableIAMDatabaseAuthentication"] is True
        assert props["StorageEncrypted"] is True
        assert props["DeletionProtection"] is True
        assert props["DBSubnetGroupName"] == {"Ref": "DBSubnetGroup"}
        assert cluster["DeletionPolicy"] == "Snapshot"
    assert resources["DBSubnetGroup"]["Properties"]["SubnetIds"] == {"Ref": "SubnetIds"}
    versions = cfn["Parameters"]["EngineVersion"]["AllowedValues"]
    assert {v.split(".")[0] for v in versions} == {"15", "16"}
    force_ssl = resources["DBClusterParameterGroup"]["Properties"]["Parameters"]["rds.force_ssl"]
    assert force_ssl == "1"


def test_cfn_spool_table_matches_the_sidecar(cfn: dict[str, Any]) -> None:
    table = cfn["Resources"]["SpoolTable"]
    assert table["Type"] == "AWS::DynamoDB::GlobalTable"
    props = table["Properties"]
    assert props["KeySchema"] == [
        {"AttributeName": "pk", "KeyType": "HASH"},
        {"AttributeName": "sk", "KeyType": "RANGE"},
    ]
    assert {(a["AttributeName"], a["AttributeType"]) for a in props["AttributeDefinitions"]} == {
        ("pk", "S"),
        ("sk", "S"),
    }
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["SSESpecification"]["SSEEnabled"] is True
    regions = [replica["Region"] for replica in props["Replicas"]]
    assert regions == [{"Ref": "AWS::Region"}, {"Ref": "PeerRegion"}]
    for replica in props["Replicas"]:
        assert replica["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}


def test_cfn_sidecar_policy_grants_what_the_sidecar_uses(cfn: dict[str, Any]) -> None:
    policy = cfn["Resources"]["SidecarPolicy"]
    assert policy["Type"] == "AWS::IAM::ManagedPolicy"
    statements = {
        s["Sid"]: s
        for s in walk(policy["Properties"]["PolicyDocument"]["Statement"])
        if isinstance(s, dict) and "Sid" in s
    }
    login = statements["IamDatabaseLogin"]
    assert login["Action"] == "rds-db:connect"
    text = json.dumps(login["Resource"])
    assert ":rds-db:${AWS::Region}:${AWS::AccountId}:dbuser:${ResourceId}/${SidecarDBUser}" in text
    assert {"Fn::GetAtt": ["PrimaryDBCluster", "DBClusterResourceId"]} in list(walk(login["Resource"]))
    assert {"Fn::GetAtt": ["SecondaryDBCluster", "DBClusterResourceId"]} in list(walk(login["Resource"]))
    spool = statements["SpoolTable"]
    assert set(spool["Action"]) == {
        "dynamodb:GetItem",
        "dynamodb:PutItem",
        "dynamodb:DeleteItem",
        "dynamodb:UpdateItem",
        "dynamodb:Query",
        "dynamodb:DescribeTable",
        "dynamodb:ConditionCheckItem",
    }
    assert "table/${SpoolTableName}" in json.dumps(spool["Resource"])
    # Nothing broader than the statements above (no wildcard actions anywhere).
    actions = [
        a
        for s in statements.values()
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    ]
    assert not any("*" in a for a in actions)
    assert statements["MasterSecret"]["Action"] == "secretsmanager:GetSecretValue"


def test_cfn_outputs_feed_the_sidecar_config(cfn: dict[str, Any]) -> None:
    outputs = cfn["Outputs"]
    for name in (
        "ClusterEndpoint",
        "ReaderEndpoint",
        "InstanceEndpointPattern",
        "ClusterResourceId",
        "SpoolTableName",
        "SidecarPolicyArn",
    ):
        assert name in outputs, name
    assert outputs["SidecarPolicyArn"]["Value"] == {"Ref": "SidecarPolicy"}
    assert outputs["SpoolTableName"]["Value"] == {"Ref": "SpoolTable"}
    pattern = outputs["InstanceEndpointPattern"]["Value"]["Fn::Sub"][0]
    assert pattern.startswith("?.")


def test_example_configs_use_the_instance_pattern_shape_of_the_outputs(
    systemd_config: dict[str, Any], k8s_config: dict[str, Any]
) -> None:
    for config in (systemd_config, k8s_config):
        for region in config["upstream"]["regions"]:
            (host,) = region["hosts"]
            cluster_host = host_of(host)
            assert ".cluster-" in cluster_host
            # What the InstanceEndpointPattern output computes from the cluster endpoint.
            assert region["instance_endpoint_pattern"] == "?." + cluster_host.split(".cluster-", 1)[1]
