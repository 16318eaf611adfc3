"""`routing`: the read-routing settings, their defaults, validation and SHOW CONFIG rows."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar_config import ConfigError, config_items, parse_config


def _config(**routing: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"upstream": {"regions": [{"name": "home", "hosts": ["127.0.0.1:5432"]}]}}
    if routing:
        data["routing"] = routing
    return data


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml")
    return str(info.value).splitlines()[1:]


def test_defaults() -> None:
    cfg = parse_config(_config(), "test.yaml")
    assert cfg.routing.reads == "failover"
    assert cfg.routing.max_replica_lag == 5.0
    assert cfg.routing.read_only_users == [] and cfg.routing.read_only_databases == []


def test_values_parse() -> None:
    cfg = parse_config(
        _config(reads="balance", max_replica_lag="250ms", read_only_users=["reporter"],
                read_only_databases=["analytics"]),
        "test.yaml",
    )  # fmt: skip
    assert cfg.routing.reads == "balance"
    assert cfg.routing.max_replica_lag == 0.25
    assert cfg.routing.read_only_users == ["reporter"]
    assert cfg.routing.read_only_databases == ["analytics"]
    assert parse_config(_config(max_replica_lag=0), "test.yaml").routing.max_replica_lag == 0


@pytest.mark.parametrize(
    ("routing", "starts"),
    [
        ({"reads": "replicas"}, "routing.reads: Input should be 'writer', 'failover' or 'balance'"),
        ({"max_replica_lag": "-1s"}, "routing.max_replica_lag:"),
        ({"max_replica_lag": "soon"}, "routing.max_replica_lag: invalid duration"),
        ({"read_only_users": [""]}, "routing.read_only_users[0]:"),
        ({"read_only_databases": ["a", "a"]}, 'routing.read_only_databases: "a" is listed twice'),
        ({"max_lag": "1s"}, "routing.max_lag: unknown key"),
    ],
)
def test_errors_name_the_field(routing: dict[str, Any], starts: str) -> None:
    lines = _problems(_config(**routing))
    assert len(lines) == 1, lines
    assert lines[0].startswith(starts), lines


def test_show_config_rows() -> None:
    items = config_items(parse_config(_config(reads="balance", read_only_users=["r1", "r2"]), "test.yaml"))
    assert items["routing.reads"] == "balance"
    assert items["routing.max_replica_lag"] == 5.0
    assert items["routing.read_only_users"] == ["r1", "r2"]  # one row for the whole list
    assert items["routing.read_only_databases"] == []
