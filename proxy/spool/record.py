"""What the spool stores: one acknowledged client transaction, with everything needed to replay it.

A record is self-contained: the SQL text, the parameter types, formats and raw values exactly as
the client sent them (bytes, so binary parameters survive untouched), and the session settings
that change how those bytes and that text are read (search_path, TimeZone, DateStyle, ...).
Records serialize to JSON (values base64) so every store keeps the same, inspectable format.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1

# Process-unique part of record ids: random, so two sidecars (or two processes on one host)
# never produce the same id even when their clocks agree to the nanosecond.
_NODE = secrets.token_hex(4)
_seq = itertools.count()
_id_lock = threading.Lock()
_last_ns = 0


def new_record_id() -> str:
    """A globally unique id that sorts (as a string) in creation order.

    `<20-digit time_ns>-<8 hex random node>-<pid>-<seq>`: the zero-padded time gives the order
    across sidecars (as good as their clocks), and within this process the time is forced to be
    strictly increasing so ids never tie or go backwards even if the wall clock steps back.
    """
    global _last_ns
    with _id_lock:
        now = max(time.time_ns(), _last_ns + 1)
        _last_ns = now
        seq = next(_seq)
    return f"{now:020d}-{_NODE}-{os.getpid():07d}-{seq:010d}"


@dataclass(frozen=True)
class SpooledStatement:
    """One statement of a spooled transaction, as it is to be re-executed (extended protocol)."""

    sql: str
    param_oids: tuple[int, ...] = ()  # Parse's parameter types; may be fewer than values (0: infer)
    param_formats: tuple[int, ...] = ()  # one per value: 0 text, 1 binary (already expanded)
    values: tuple[bytes | None, ...] = ()  # raw parameter bytes; None is SQL NULL
    tag: str = ""  # the CommandComplete tag the client was given, e.g. "INSERT 0 2"

    def __post_init__(self) -> None:
        # Checked here so a malformed record is refused when spooled, not discovered at replay.
        if len(self.param_formats) != len(self.values):
            raise ValueError(
                f"param_formats has {len(self.param_formats)} entries for {len(self.values)} values "
                "(expand Bind's format codes to one per parameter)"
            )
        if len(self.param_oids) > len(self.values):
            raise ValueError(f"{len(self.param_oids)} parameter types for {len(self.values)} values")
        if any(f not in (0, 1) for f in self.param_formats):
            raise ValueError(f"parameter formats must be 0 or 1, got {self.param_formats}")
        if any(not 0 <= oid <= 0xFFFFFFFF for oid in self.param_oids):
            raise ValueError(f"parameter type OIDs out of range: {self.param_oids}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "sql": self.sql,
            "param_oids": list(self.param_oids),
            "param_formats": list(self.param_formats),
            "values": [None if v is None else base64.b64encode(v).decode("ascii") for v in self.values],
            "tag": self.tag,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpooledStatement:
        values = tuple(
            None if v is None else base64.b64decode(v.encode("ascii"), validate=True) for v in data["values"]
        )
        return cls(
            sql=str(data["sql"]),
            param_oids=tuple(int(o) for o in data["param_oids"]),
            param_formats=tuple(int(f) for f in data["param_formats"]),
            values=values,
            tag=str(data.get("tag", "")),
        )


@dataclass(frozen=True)
class SpoolRecord:
    """One client transaction acknowledged while no writer existed."""

    id: str
    created_at: float  # unix seconds
    user: str
    database: str
    settings: dict[str, str] = field(default_factory=dict)  # session settings to SET LOCAL on replay
    statements: tuple[SpooledStatement, ...] = ()

    @classmethod
    def new(
        cls,
        user: str,
        database: str,
        statements: tuple[SpooledStatement, ...] | list[SpooledStatement],
        settings: dict[str, str] | None = None,
    ) -> SpoolRecord:
        """A record with a fresh id and the current time."""
        return cls(new_record_id(), time.time(), user, database, dict(settings or {}), tuple(statements))

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "id": self.id,
            "created_at": self.created_at,
            "user": self.user,
            "database": self.database,
            "settings": dict(self.settings),
            "statements": [s.to_dict() for s in self.statements],
        }

    def to_json(self) -> str:
        # ensure_ascii (the default) keeps the text 7-bit: every store takes it as is, and even
        # lone surrogates in SQL text survive the round trip as \\u escapes.
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpoolRecord:
        version = data.get("v", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported spool record format version {version!r}")
        settings = data.get("settings", {})
        if not isinstance(settings, dict):
            raise ValueError("settings must be an object")
        return cls(
            id=str(data["id"]),
            created_at=float(data["created_at"]),
            user=str(data["user"]),
            database=str(data["database"]),
            settings={str(k): str(v) for k, v in settings.items()},
            statements=tuple(SpooledStatement.from_dict(s) for s in data["statements"]),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SpoolRecord:
        """Parse a record; any malformation raises ValueError (never KeyError/TypeError)."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("a spool record must be a JSON object")
            return cls.from_dict(data)
        except (KeyError, TypeError, AttributeError, binascii.Error, UnicodeError) as exc:
            raise ValueError(f"malformed spool record: {exc!r}") from exc

    def size_bytes(self) -> int:
        """Size of the stored form (the JSON text), which is what storage limits apply to."""
        return len(self.to_json())

    @property
    def first_sql(self) -> str:
        return self.statements[0].sql if self.statements else ""


@dataclass(frozen=True)
class DeadLetter:
    """A record that replay could not apply for a reason retrying will not fix."""

    record: SpoolRecord
    error: str
    sqlstate: str
    failed_at: float  # unix seconds

    @property
    def id(self) -> str:
        return self.record.id
