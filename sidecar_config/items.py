"""The effective config as a flat table of dotted keys, for the admin console's SHOW CONFIG and
for a reload's report of what changed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .models import SidecarConfig


def config_items(config: SidecarConfig) -> dict[str, Any]:
    """The effective config as dotted key -> value (`auth.users[0].name`), in config order.

    Secrets stay `SecretStr`: equal when their values are, so a reload notices a changed password,
    and rendered as *** by the console. Lists of plain values stay whole (one row for the hosts of
    a region); lists of mappings get one key per item.
    """
    items: dict[str, Any] = {}
    _flatten(config.model_dump(mode="python"), "", items)
    return items


def _flatten(value: Any, key: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for name, item in value.items():
            _flatten(item, f"{key}.{name}" if key else str(name), out)
    elif isinstance(value, list | tuple) and any(isinstance(item, Mapping) for item in value):
        for index, item in enumerate(value):
            _flatten(item, f"{key}[{index}]", out)
    else:
        out[key] = value
