"""Secret references in config values: ``env:VAR``, ``file:PATH``, ``secretsmanager:ARN[:KEY]``, and
whatever is registered later.

References are resolved in the raw YAML tree before validation, so every field (not only passwords)
may use them and the models only ever see plain values. Resolution errors name the variable or file
but never contain a resolved value, because their text ends up in logs and on terminals.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Loc",
    "SecretContext",
    "SecretResolution",
    "SecretResolutionError",
    "SecretResolver",
    "SecretsManagerRef",
    "register_resolver",
    "registered_prefixes",
    "resolve_reference",
    "resolve_secrets",
    "unregister_resolver",
]

Loc = tuple[str | int, ...]
"""A position in the raw config tree: mapping keys and list indexes from the root."""


class SecretResolutionError(Exception):
    """A reference could not be resolved. The message names what was looked up, never a value."""


@dataclass(frozen=True, slots=True)
class SecretContext:
    """What a resolver may need besides the reference itself."""

    # Relative `file:` paths are taken from the config file's directory rather than the process's
    # working directory, so a config behaves the same whether started by hand or by systemd.
    base_dir: Path = field(default_factory=Path.cwd)


SecretResolver = Callable[[str, SecretContext], str]
"""Called with the text after ``prefix:`` and the context; returns the value or raises
:class:`SecretResolutionError`."""


def _resolve_env(name: str, context: SecretContext) -> str:
    if not name:
        raise SecretResolutionError("env: needs a variable name, as in env:DB_PASSWORD")
    value = os.environ.get(name)
    if value is None:
        raise SecretResolutionError(f"environment variable {name} is not set")
    return value


def _resolve_file(path_text: str, context: SecretContext) -> str:
    if not path_text:
        raise SecretResolutionError("file: needs a path, as in file:/run/secrets/db_password")
    path = context.base_dir / Path(path_text).expanduser()
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SecretResolutionError(f"secret file {path} does not exist") from None
    except IsADirectoryError:
        raise SecretResolutionError(f"secret file {path} is a directory") from None
    except PermissionError:
        raise SecretResolutionError(f"secret file {path} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        # The decode error's text quotes the offending bytes, which are part of the secret.
        raise SecretResolutionError(f"secret file {path} is not valid UTF-8") from None
    except OSError as exc:
        raise SecretResolutionError(f"secret file {path} cannot be read ({exc.strerror})") from None
    # Files written by `echo` or editors end in a newline that is not part of the secret.
    return content.rstrip("\r\n")


# --- AWS Secrets Manager ---------------------------------------------------------------------

_SM_USAGE = (
    "secretsmanager: needs a secret ARN or name, optionally followed by :JSON_KEY (and, as in ECS, "
    ":VERSION_STAGE:VERSION_ID), as in "
    "secretsmanager:arn:aws:secretsmanager:us-east-1:123456789012:secret:db-AbCdEf:password"
)


@dataclass(frozen=True, slots=True)
class SecretsManagerRef:
    """A parsed ``secretsmanager:`` reference."""

    secret_id: str  # the ARN or name, as given to GetSecretValue
    key: str | None = None  # a key of the JSON object in SecretString; None: the whole string
    version_stage: str | None = None
    version_id: str | None = None
    region: str | None = None  # from the ARN; None: boto3's default (AWS_REGION, ...)

    @classmethod
    def parse(cls, ref: str) -> SecretsManagerRef:
        if ref.startswith("arn:"):
            # arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME; the name has no colons.
            parts = ref.split(":")
            if len(parts) < 7 or parts[2] != "secretsmanager" or parts[5] != "secret" or not parts[6]:
                raise SecretResolutionError(
                    f"{ref!r} is not a Secrets Manager secret ARN "
                    "(arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME[:JSON_KEY])"
                )
            secret_id, rest, region = ":".join(parts[:7]), parts[7:], parts[3] or None
        else:
            name, *rest = ref.split(":")
            if not name:
                raise SecretResolutionError(_SM_USAGE)
            secret_id, region = name, None
        if len(rest) > 3:
            raise SecretResolutionError(f"secret {secret_id}: too many ':' parts; {_SM_USAGE}")
        key, stage, version = [*rest, "", "", ""][:3]
        if rest and not any(rest):
            raise SecretResolutionError(f"secret {secret_id}: empty JSON key after ':'")
        return cls(secret_id, key or None, stage or None, version or None, region)


def _fetch_secret_string(ref: SecretsManagerRef) -> str:
    # Imported here: boto3 takes a noticeable time to import, and most configs never need it.
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
    )

    what = f"secret {ref.secret_id}"
    # Config is loaded at start-up and on reload: a black-holed endpoint must not hang either for
    # minutes (botocore's defaults are 60 s timeouts with retries).
    config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"})
    request: dict[str, str] = {"SecretId": ref.secret_id}
    if ref.version_stage:
        request["VersionStage"] = ref.version_stage
    if ref.version_id:
        request["VersionId"] = ref.version_id
    # Error texts below come from AWS's error code and message, which describe the request
    # (ARN, principal, action), never the secret; exceptions are not chained for the same reason.
    try:
        # Endpoint and credentials come from the standard AWS settings (AWS_ENDPOINT_URL[_SECRETS_
        # MANAGER], AWS_ACCESS_KEY_ID, profiles, instance roles), as for any AWS tool.
        # botocore reads AWS_DEFAULT_REGION but not AWS_REGION, which other AWS SDKs, ECS and
        # Lambda set; honour both.
        region = ref.region or os.environ.get("AWS_REGION") or None
        client = boto3.session.Session().client("secretsmanager", region_name=region, config=config)
        response = client.get_secret_value(**request)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", "Unknown"), error.get("Message", "")
        if code == "ResourceNotFoundException":
            reason = f"{what} not found in AWS Secrets Manager"
        elif code in ("AccessDeniedException", "AccessDenied"):
            reason = f"access to {what} denied by AWS: {message}"
        else:
            reason = f"reading {what} from AWS Secrets Manager failed: {code}: {message}"
        raise SecretResolutionError(reason) from None
    except NoRegionError:
        raise SecretResolutionError(
            f"{what}: no AWS region; give the secret's full ARN or set AWS_REGION"
        ) from None
    except NoCredentialsError:
        raise SecretResolutionError(f"{what}: no AWS credentials found to read it with") from None
    except EndpointConnectionError as exc:
        raise SecretResolutionError(f"{what}: cannot reach AWS Secrets Manager ({exc})") from None
    except BotoCoreError as exc:
        raise SecretResolutionError(f"reading {what} from AWS Secrets Manager failed: {exc}") from None
    value = response.get("SecretString")
    if not isinstance(value, str):
        raise SecretResolutionError(f"{what} has no SecretString (binary secrets are not supported)")
    return value


def _resolve_secretsmanager(ref_text: str, context: SecretContext) -> str:
    if not ref_text:
        raise SecretResolutionError(_SM_USAGE)
    ref = SecretsManagerRef.parse(ref_text)
    value = _fetch_secret_string(ref)
    if ref.key is None:
        return value
    try:
        document = json.loads(value)
    except ValueError:
        # The decode error's text quotes the document, i.e. the secret.
        document = None
    if not isinstance(document, dict):
        raise SecretResolutionError(
            f"secret {ref.secret_id} is not a JSON object, so it has no key {ref.key!r}"
        )
    if ref.key not in document:
        raise SecretResolutionError(f"secret {ref.secret_id} has no key {ref.key!r}")
    item = document[ref.key]
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, str | int | float):
        return str(item)
    raise SecretResolutionError(
        f"key {ref.key!r} of secret {ref.secret_id} is not a string or number"
    )


_RESOLVERS: dict[str, SecretResolver] = {
    "env": _resolve_env,
    "file": _resolve_file,
    "secretsmanager": _resolve_secretsmanager,
}


def register_resolver(prefix: str, resolver: SecretResolver, *, replace: bool = False) -> None:
    """Make ``prefix:REST`` values resolve through ``resolver`` (e.g. a future ``secretsmanager``)."""
    if not prefix or not prefix.isidentifier():
        raise ValueError(f"resolver prefix must be an identifier, got {prefix!r}")
    if prefix in _RESOLVERS and not replace:
        raise ValueError(f"a resolver for {prefix!r} is already registered")
    _RESOLVERS[prefix] = resolver


def unregister_resolver(prefix: str) -> None:
    """Remove a resolver; unknown prefixes are ignored."""
    _RESOLVERS.pop(prefix, None)


def registered_prefixes() -> tuple[str, ...]:
    return tuple(_RESOLVERS)


def resolve_reference(value: str, context: SecretContext | None = None) -> str | None:
    """The resolved value if ``value`` is a reference with a registered prefix, else ``None``.

    Raises :class:`SecretResolutionError` if it is a reference that cannot be resolved.
    """
    # Only registered prefixes count, so ordinary values that contain a colon ("db:5432") pass
    # through untouched.
    prefix, sep, rest = value.partition(":")
    if not sep:
        return None
    resolver = _RESOLVERS.get(prefix)
    if resolver is None:
        return None
    return resolver(rest, context or SecretContext())


@dataclass(slots=True)
class SecretResolution:
    """The result of resolving a raw config tree."""

    value: Any
    """The tree with every reference replaced by its value (untouched where resolution failed)."""
    references: dict[Loc, str] = field(default_factory=dict)
    """Where a reference was, and its original text: error messages show this instead of the value."""
    errors: list[tuple[Loc, str]] = field(default_factory=list)
    """Every reference that failed, so one run reports all of them."""
    secret_values: set[str] = field(default_factory=set)
    """Every non-empty value a reference resolved to, to be kept out of any message."""


def resolve_secrets(data: Any, context: SecretContext | None = None) -> SecretResolution:
    """Resolve every string value in ``data`` (mappings, lists, scalars), returning a new tree.

    Mapping keys are left alone: they are field names, not values. Resolved values are not
    resolved again, so a secret that happens to start with ``env:`` stays as it is.
    """
    ctx = context or SecretContext()
    result = SecretResolution(value=None)
    result.value = _walk(data, (), ctx, result)
    return result


def _walk(node: Any, loc: Loc, ctx: SecretContext, result: SecretResolution) -> Any:
    if isinstance(node, str):
        try:
            resolved = resolve_reference(node, ctx)
        except SecretResolutionError as exc:
            result.errors.append((loc, str(exc)))
            return node
        if resolved is None:
            return node
        result.references[loc] = node
        if resolved:
            result.secret_values.add(resolved)
        return resolved
    if isinstance(node, Mapping):
        return {key: _walk(value, (*loc, key), ctx, result) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [_walk(value, (*loc, index), ctx, result) for index, value in enumerate(node)]
    return node
