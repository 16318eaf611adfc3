"""Value types shared by the config models: durations, byte sizes and network endpoints.

Each parser raises ``ValueError`` with a message that says what form was expected but does not echo
the input: the loader prints the offending raw value itself, and it may have come from a secret
reference, so only the loader knows whether it is safe to show.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, PlainValidator, WithJsonSchema

__all__ = [
    "ByteSize",
    "Duration",
    "Endpoint",
    "EndpointField",
    "format_duration",
    "parse_bytesize",
    "parse_duration",
]

# Decimal rather than float arithmetic so that "250ms" is exactly the float nearest 0.25 and a
# duration printed by format_duration() reads back as the identical float.
_DURATION_UNITS: dict[str, Decimal] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_DURATION_RE = re.compile(r"(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>ms|s|m|h)?")
_DURATION_FORMS = "seconds as a number, or a string like '250ms', '30s', '1.5s', '5m', '1h'"

# kB/MB/GB follow SI (powers of 1000) and KiB/MiB/GiB follow IEC (powers of 1024), as the names
# say; PostgreSQL's own 1024-based "MB" is deliberately not copied because the IEC spellings
# already give exact powers of two without ambiguity.
_BYTE_UNITS: dict[str, int] = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
_BYTES_RE = re.compile(r"(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[A-Za-z]+)?")
_BYTES_FORMS = "bytes as an integer, or a string like '512KiB', '64MiB', '1GiB', '100kB', '10MB'"


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``."""
    # bool is an int subclass; `true` in YAML is far more likely a mistake than "1 second".
    if isinstance(value, bool):
        raise ValueError(f"expected a duration: {_DURATION_FORMS}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None:
            if value.strip().startswith("-"):
                raise ValueError("a duration must not be negative")
            raise ValueError(f"invalid duration; expected {_DURATION_FORMS}")
        number = Decimal(match["num"]) * _DURATION_UNITS[match["unit"] or "s"]
        seconds = float(number)
    else:
        raise ValueError(f"expected a duration: {_DURATION_FORMS}")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact string for ``seconds`` that :func:`parse_duration` reads back identically."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a duration must be a finite, non-negative number of seconds")
    # repr() is the shortest string that round-trips the float, so this Decimal is exact for it.
    exact = Decimal(repr(float(seconds)))
    if exact == 0:
        return "0s"
    if exact % 3600 == 0:
        return f"{_plain(exact / 3600)}h"
    if exact % 60 == 0:
        return f"{_plain(exact / 60)}m"
    if exact < 1:
        return f"{_plain(exact * 1000)}ms"
    return f"{_plain(exact)}s"


def _plain(number: Decimal) -> str:
    # normalize() drops trailing zeros; format "f" keeps large values out of exponent notation.
    return format(number.normalize(), "f")


def parse_bytesize(value: object) -> int:
    """Bytes from an integer or a string such as ``"64MiB"``, ``"512KiB"``, ``"10MB"``, ``"100kB"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size: {_BYTES_FORMS}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError("a size must be a whole number of bytes")
        size = int(value)
    elif isinstance(value, str):
        match = _BYTES_RE.fullmatch(value.strip())
        if match is None:
            if value.strip().startswith("-"):
                raise ValueError("a size must not be negative")
            raise ValueError(f"invalid size; expected {_BYTES_FORMS}")
        unit = match["unit"] or "B"
        if unit not in _BYTE_UNITS:
            raise ValueError(f"unknown size unit {unit!r}; use one of {', '.join(_BYTE_UNITS)}")
        try:
            exact = Decimal(match["num"]) * _BYTE_UNITS[unit]
        except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
            raise ValueError(f"invalid size; expected {_BYTES_FORMS}") from None
        if exact != exact.to_integral_value():
            raise ValueError("a size must be a whole number of bytes")
        size = int(exact)
    else:
        raise ValueError(f"expected a size: {_BYTES_FORMS}")
    if size < 0:
        raise ValueError("a size must not be negative")
    return size


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"type": "string"}]}),
]
"""Seconds as a float; the config may write a number of seconds or ``"250ms"``/``"30s"``/``"5m"``/``"1h"``."""

ByteSize = Annotated[
    int,
    BeforeValidator(parse_bytesize),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}),
]
"""Bytes as an int; the config may write an integer or ``"64MiB"``/``"512KiB"``/``"10MB"``."""


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_ENDPOINT_FORM = "'host:port' or '[ipv6-address]:port', e.g. '127.0.0.1:6432' or '[::1]:6432'"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP endpoint. ``host`` holds an IPv6 address without brackets; ``str()`` adds them back."""

    host: str
    port: int

    def __post_init__(self) -> None:
        # Validated here too, not only in parse(), so that an Endpoint built in code cannot hold a
        # value that str() would render into something parse() rejects.
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError("port must be an integer from 1 to 65535")
        _check_host(self.host)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``"host:port"`` or ``"[v6addr]:port"``; a host without a port is an error."""
        text = text.strip()
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ValueError(f"unclosed '[' in IPv6 endpoint; expected {_ENDPOINT_FORM}")
            host, rest = text[1:close], text[close + 1 :]
            if not rest.startswith(":"):
                raise ValueError(f"missing port; expected {_ENDPOINT_FORM}")
            port_text = rest[1:]
            if ":" not in host:
                raise ValueError(f"brackets are only for IPv6 addresses; expected {_ENDPOINT_FORM}")
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise ValueError(f"missing port; expected {_ENDPOINT_FORM}")
            if ":" in host:
                raise ValueError(f"an IPv6 address must be in brackets; expected {_ENDPOINT_FORM}")
        if not host:
            raise ValueError(f"missing host; expected {_ENDPOINT_FORM}")
        if not port_text.isascii() or not port_text.isdigit():
            raise ValueError(f"port must be a number from 1 to 65535; expected {_ENDPOINT_FORM}")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _check_host(host: object) -> None:
    if not isinstance(host, str) or not host:
        raise ValueError(f"missing host; expected {_ENDPOINT_FORM}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address; expected {_ENDPOINT_FORM}") from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"invalid host name; expected {_ENDPOINT_FORM}")


def _coerce_endpoint(value: Any) -> Endpoint:
    if isinstance(value, Endpoint):
        return value
    if isinstance(value, str):
        return Endpoint.parse(value)
    if isinstance(value, list):
        # `listen: [::1]:6432` is a YAML syntax error, but `- [::1]` style slips through as a list.
        raise ValueError(f"expected a string {_ENDPOINT_FORM}; quote IPv6 endpoints in YAML")
    raise ValueError(f"expected a string {_ENDPOINT_FORM}")


EndpointField = Annotated[
    Endpoint,
    PlainValidator(_coerce_endpoint),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["127.0.0.1:6432", "[::1]:6432"]}),
]
"""Pydantic field type for :class:`Endpoint`: validates from ``"host:port"``, serializes back to it."""
