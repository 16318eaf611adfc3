"""Session settings that follow a client from one server connection to another.

Names are kept lowercase (GUC names are case-insensitive). Values are applied with
`set_config(name, value, false)`, which reads a value exactly as a startup packet's `-c` option
does: `search_path=a,public` stays a list, where `SET x = 'a,public'` would make it one name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .protocol.messages import quote_ident, quote_literal

# The session-level settings in force, in the base units `set_config` reads back unchanged.
CAPTURE_SQL = "SELECT lower(name), setting FROM pg_catalog.pg_settings WHERE source = 'session'"


def capture_sql(custom_names: Iterable[str]) -> str:
    """CAPTURE_SQL plus the custom settings named (set ones only: NULL is never set, '' reset)."""
    names = sorted(custom_names)
    if not names:
        return CAPTURE_SQL
    array = ", ".join(quote_literal(name) for name in names)
    return (
        f"{CAPTURE_SQL} UNION ALL SELECT n, v FROM (SELECT n, pg_catalog.current_setting(n, true) AS v "
        f"FROM pg_catalog.unnest(ARRAY[{array}]::text[]) AS n) AS custom WHERE v <> ''"
    )


def set_config_sql(settings: Mapping[str, str]) -> str:
    calls = ", ".join(
        f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
        for name, value in settings.items()
    )
    return f"SELECT {calls}"


def sync_sql(wanted: Mapping[str, str], applied: Mapping[str, str]) -> str | None:
    """SQL that turns a server's `applied` settings into `wanted`, or None if they already match."""
    statements = [f"RESET {_qualified(name)}" for name in applied if name not in wanted]
    changed = {name: value for name, value in wanted.items() if applied.get(name) != value}
    if changed:
        statements.append(set_config_sql(changed))
    return "; ".join(statements) or None


def lower_keys(settings: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in settings.items()}


def _qualified(name: str) -> str:
    # Custom settings are dotted (`myapp.tenant`): quote each part, not the whole name.
    return ".".join(quote_ident(part) for part in name.split("."))
