"""Reading, validating and printing the config, with errors that name the field and hide secrets.

Secrets must not leak through error text: values are shown from the raw tree *before* secret
resolution (so a bad ``env:VAR`` field shows ``env:VAR``, not what it resolved to), secret fields
are shown as ``***``, containers are only described, and as a last line of defence every known
secret string is blanked out of each message. Exceptions are raised outside ``except`` blocks so
that no pydantic or YAML exception, whose text quotes inputs and source lines, is chained on.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_core import ErrorDetails

from .models import FIELD_ERROR_TYPE, SidecarConfig
from .secrets import Loc, SecretContext, registered_prefixes, resolve_secrets
from .units import Endpoint

__all__ = ["ConfigError", "ConfigProblem", "dump_effective", "load_config", "parse_config"]

_MISSING = object()
_MAX_SHOWN = 80


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a config."""

    path: str
    """Dotted field path with ``[i]`` list indexes (``auth.users[0].password``); empty when the
    problem is with the file as a whole."""
    reason: str
    got: str | None = None
    """The offending value as shown to the user (already redacted), if there is one to show."""

    def __str__(self) -> str:
        text = f"{self.path}: {self.reason}" if self.path else self.reason
        return text if self.got is None else f"{text} (got {self.got})"


class ConfigError(Exception):
    """The config cannot be used. ``str()`` is a header line, then one line per problem."""

    def __init__(self, source: str, problems: Sequence[ConfigProblem]) -> None:
        self.source = source
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        count = len(self.problems)
        header = f"{source}: invalid configuration ({count} problem{'' if count == 1 else 's'})"
        super().__init__("\n".join([header, *(str(problem) for problem in self.problems)]))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, tuple[ConfigProblem, ...]]]:
        # The default reduce would call ConfigError(message), which does not match __init__.
        return (ConfigError, (self.source, self.problems))


def load_config(path: str | Path) -> SidecarConfig:
    """Read, resolve and validate a YAML config file. Raises :class:`ConfigError`."""
    path = Path(path)
    source = str(path)
    text, problem = _read(path)
    if problem is None:
        data, problem = _parse_yaml(text)
    if problem is not None:
        raise ConfigError(source, [problem])
    if data is None:
        raise ConfigError(source, [ConfigProblem("", "the file is empty; expected a YAML mapping")])
    return parse_config(data, source, base_dir=path.parent)


def parse_config(
    data: Mapping[str, Any], source: str = "<config>", *, base_dir: str | Path | None = None
) -> SidecarConfig:
    """Resolve secret references in ``data`` and validate it. Raises :class:`ConfigError`.

    ``base_dir`` anchors relative ``file:`` references (default: the working directory).
    """
    if not isinstance(data, Mapping):
        shown = _describe(data)
        raise ConfigError(source, [ConfigProblem("", "the top level must be a mapping of settings", shown)])
    context = SecretContext(Path(base_dir)) if base_dir is not None else SecretContext()
    resolution = resolve_secrets(data, context)
    if resolution.errors:
        # Validation is skipped: an unresolved "env:X" would otherwise be accepted as a literal
        # password, and other errors would be reported against values that are not the real ones.
        raise ConfigError(source, [ConfigProblem(_format_loc(loc), why) for loc, why in resolution.errors])

    try:
        return SidecarConfig.model_validate(resolution.value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
    secrets = resolution.secret_values | _secret_literals(data)
    problems = [_problem(error, data, secrets) for error in errors]
    raise ConfigError(source, problems)


def dump_effective(cfg: SidecarConfig) -> str:
    """The effective config (defaults filled in) as YAML; secrets as ``***``, durations in seconds."""
    return yaml.safe_dump(
        _plain(cfg.model_dump(mode="python")), sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, Path | Endpoint):
        return str(value)
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


# --- reading -------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[str, ConfigProblem | None]:
    try:
        return path.read_text(encoding="utf-8"), None
    except FileNotFoundError:
        return "", ConfigProblem("", "config file not found")
    except IsADirectoryError:
        return "", ConfigProblem("", "is a directory, not a config file")
    except PermissionError:
        return "", ConfigProblem("", "config file is not readable (permission denied)")
    except UnicodeDecodeError as exc:
        return "", ConfigProblem("", f"config file is not valid UTF-8 (byte offset {exc.start})")
    except OSError as exc:
        return "", ConfigProblem("", f"config file cannot be read ({exc.strerror})")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would otherwise let the last one win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            # Merge keys (<<) legitimately repeat keys that the mapping then overrides.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# `listen: [::1]:6432` unquoted is a YAML flow sequence followed by junk: a confusing parse error.
_UNQUOTED_V6 = re.compile(r"(?:^|[\s,{\[])\[[0-9A-Fa-f:.%]*:[0-9A-Fa-f:.%]*\]:\d")


def _parse_yaml(text: str) -> tuple[Any, ConfigProblem | None]:
    try:
        return yaml.load(text, Loader=_StrictLoader), None
    except yaml.MarkedYAMLError as exc:
        # Built from the problem and position only: str(exc) quotes the source line, which may hold
        # a literal password.
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        lines = text.splitlines()
        if mark is not None and mark.line < len(lines) and _UNQUOTED_V6.search(lines[mark.line]):
            what += '; an IPv6 endpoint must be quoted in YAML, as in listen: "[::1]:6432"'
        return None, ConfigProblem("", f"{where}YAML syntax error: {what}")
    except yaml.YAMLError:
        return None, ConfigProblem("", "YAML syntax error")


# --- error reporting -----------------------------------------------------------------------------


def _problem(
    error: ErrorDetails, raw: Mapping[str, Any], secrets: frozenset[str] | set[str]
) -> ConfigProblem:
    loc: Loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind == FIELD_ERROR_TYPE:
        loc = (*loc, *ctx["field"])
    reason = error["msg"]
    got: str | None
    if kind == "value_error":
        reason = reason.removeprefix("Value error, ")
    if kind == "extra_forbidden":
        reason, got = _unknown_key(loc), None
    elif kind == "missing":
        got = None
    else:
        got = _shown_value(loc, raw, error["input"] if kind != FIELD_ERROR_TYPE else _MISSING)
    return ConfigProblem(
        _redact(_format_loc(loc), secrets), _redact(reason, secrets), _redact_opt(got, secrets)
    )


def _shown_value(loc: Loc, raw: Mapping[str, Any], fallback: Any) -> str | None:
    value = _lookup(raw, loc)
    if value is _MISSING:
        value = fallback
    if value is _MISSING:
        return None
    if _is_secret_field(loc) and not _is_reference_text(value):
        return "***"
    return _describe(value)


def _is_reference_text(value: Any) -> bool:
    return isinstance(value, str) and value.partition(":")[0] in registered_prefixes() and ":" in value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        shown = value if len(value) <= _MAX_SHOWN else value[:_MAX_SHOWN] + "..."
        return repr(shown)
    # Containers are only described: printing one could show a secret that sits inside it.
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}" if value else "an empty list"
    return f"a value of type {type(value).__name__}"


def _redact(text: str, secrets: Iterable[str]) -> str:
    # Longest first, so a secret containing a shorter one is blanked whole.
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _redact_opt(text: str | None, secrets: Iterable[str]) -> str | None:
    return None if text is None else _redact(text, secrets)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":  # pydantic's marker for "the key of the previous mapping entry"
            out += "[key]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(top level)"


def _lookup(raw: Any, loc: Loc) -> Any:
    node = raw
    for part in loc:
        found = (isinstance(node, Mapping) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        )
        if not found:
            return _MISSING
        node = node[part]
    return node


def _unknown_key(loc: Loc) -> str:
    owner = _unwrap(_annotation_at(loc[:-1]))
    key = str(loc[-1]) if loc else ""
    if not (isinstance(owner, type) and issubclass(owner, BaseModel)):
        return "unknown key"
    known = list(owner.model_fields)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of: {', '.join(known)}"


# --- walking the model types alongside the raw tree ----------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` so what is left is the type that holds the value."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _annotation_at(loc: Loc) -> Any:
    annotation: Any = SidecarConfig
    for part in loc:
        annotation = _unwrap(annotation)
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            annotation = field.annotation
        elif origin is list and isinstance(part, int):
            annotation = typing.get_args(annotation)[0]
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return None
    return annotation


def _is_secret_field(loc: Loc) -> bool:
    return _unwrap(_annotation_at(loc)) is SecretStr


def _secret_literals(raw: Mapping[str, Any]) -> set[str]:
    """Plain-text values written directly into secret fields of the raw tree."""
    found: set[str] = set()
    _collect_secrets(SidecarConfig, raw, found)
    return found


def _collect_secrets(annotation: Any, node: Any, found: set[str]) -> None:
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if annotation is SecretStr:
        if isinstance(node, str) and node and not _is_reference_text(node):
            found.add(node)
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if isinstance(node, Mapping):
            for key, value in node.items():
                field = annotation.model_fields.get(key) if isinstance(key, str) else None
                if field is not None:
                    _collect_secrets(field.annotation, value, found)
    elif origin is list and isinstance(node, list):
        for item in node:
            _collect_secrets(typing.get_args(annotation)[0], item, found)
    elif origin is dict and isinstance(node, Mapping):
        for item in node.values():
            _collect_secrets(typing.get_args(annotation)[1], item, found)
