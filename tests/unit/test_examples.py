"""examples/: every example config passes `pgsidecar check-config` as it stands, with its secrets
from the environment variables it names, and says what its name promises (Aurora: the instance
endpoint pattern, IAM, verify-full with the RDS bundle; Aurora Global: two regions, DynamoDB)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
LOCAL = EXAMPLES / "local-postgres.yaml"
AURORA = EXAMPLES / "aurora.yaml"
GLOBAL = EXAMPLES / "aurora-global.yaml"

# The only secret the examples read; README's quick start exports it.
SECRET_ENV = {"APP_DB_PASSWORD": "app-password-for-tests"}
ENV_REF = re.compile(r"\benv:([A-Za-z_][A-Za-z0-9_]*)")


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`pgsidecar check-config -c PATH` from the repository root, as README shows it."""
    base = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "-c", str(path.relative_to(REPO))],
        cwd=REPO, env={**base, **(env if env is not None else SECRET_ENV)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def effective(path: Path) -> dict[str, Any]:
    result = check_config(path)
    assert result.returncode == 0, f"check-config {path.name} failed:\n{result.stderr}{result.stdout}"
    assert "valid" in result.stdout.splitlines()[0]
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


@pytest.mark.parametrize("path", [LOCAL, AURORA, GLOBAL], ids=lambda p: p.name)
def test_example_passes_check_config_with_its_secret_from_the_environment(path: Path) -> None:
    assert set(ENV_REF.findall(path.read_text())) == set(SECRET_ENV)
    config = effective(path)
    # The effective config hides the secret it resolved.
    assert SECRET_ENV["APP_DB_PASSWORD"] not in yaml.safe_dump(config)
    assert config["listen"] == "127.0.0.1:6432"
    assert config["auth"]["method"] == "scram-sha-256"


@pytest.mark.parametrize("path", [LOCAL, AURORA, GLOBAL], ids=lambda p: p.name)
def test_example_without_its_secret_is_refused_naming_the_variable(path: Path) -> None:
    result = check_config(path, env={})
    assert result.returncode != 0
    assert "APP_DB_PASSWORD" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_local_example_is_a_static_topology_with_a_sqlite_spool() -> None:
    config = effective(LOCAL)
    upstream = config["upstream"]
    assert upstream["topology"] == "static"
    assert upstream["regions"][0]["hosts"] == ["127.0.0.1:5432"]
    assert config["spool"]["backend"] == "sqlite"


def test_aurora_example_uses_instance_endpoints_iam_and_verified_tls() -> None:
    config = effective(AURORA)
    upstream = config["upstream"]
    assert upstream["topology"] == "aurora"
    assert upstream["iam_auth"] is True
    assert upstream["tls"] == "verify-full"
    assert upstream["ca_file"].endswith("rds-global-bundle.pem")
    [region] = upstream["regions"]
    assert ".cluster-" in region["hosts"][0]
    assert region["instance_endpoint_pattern"].startswith("?.")
    assert "truststore.pki.rds.amazonaws.com/global/global-bundle.pem" in AURORA.read_text()


def test_aurora_global_example_spans_two_regions_with_the_dynamodb_spool() -> None:
    config = effective(GLOBAL)
    upstream = config["upstream"]
    assert upstream["topology"] == "aurora-global"
    assert upstream["iam_auth"] is True and upstream["tls"] == "verify-full"
    regions = upstream["regions"]
    assert len(regions) == 2
    for region in regions:
        assert region["name"] in region["hosts"][0]  # each region's own cluster endpoint
        assert region["name"] in region["instance_endpoint_pattern"]
    spool = config["spool"]
    assert spool["backend"] == "dynamodb"
    assert spool["dynamodb"]["create_table"] is False
    assert spool["dynamodb"]["region"] == regions[0]["name"]


def test_readme_lists_every_example_and_only_make_targets_that_exist() -> None:
    readme = (REPO / "README.md").read_text()
    for path in EXAMPLES.glob("*.yaml"):
        assert f"examples/{path.name}" in readme, f"README does not mention examples/{path.name}"
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    for target in set(re.findall(r"`make ([a-z][a-z-]*)", readme)):
        assert target in targets, f"README names `make {target}`, which the Makefile does not have"
