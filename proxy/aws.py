"""RDS IAM authentication: short-lived tokens used as the upstream password (`upstream.iam_auth`).

A token is a SigV4-presigned URL, ``host:port/?Action=connect&DBUser=...&X-Amz-...``, that Aurora /
RDS PostgreSQL accepts as a cleartext password (over TLS) for 15 minutes after it was signed. It
only has to be valid when a connection logs in; established connections are not affected by its
expiry. So the sidecar keeps one token per (host, port, user) and signs a new one when the cached
one is older than `refresh_after` (10 minutes by default), well before AWS would reject it.

Signing is local (no request to AWS) and takes well under a millisecond once credentials are known.
It still runs in a worker thread (`asyncio.to_thread`), because what precedes it can block for
seconds: creating the boto3 client loads the RDS service model, and botocore fetches or refreshes
credentials synchronously inside the signing call (instance metadata, the container endpoint, STS
for web identity / assumed roles). That must never stall the event loop, which carries every
client's traffic.

boto3 is imported lazily, so a sidecar without IAM auth never pays for it.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# us-east-1, eu-central-2, ap-southeast-4, us-gov-west-1, cn-northwest-1, il-central-1: defined
# with the config, which validates upstream.aws_region with it.
from sidecar_config.regions import AWS_REGION_PATTERN, looks_like_aws_region

from . import logs
from .protocol.sqlstate import UpstreamUnavailable

if TYPE_CHECKING:
    from sidecar_config import Endpoint

__all__ = [
    "AWS_REGION_PATTERN",
    "DEFAULT_REFRESH_AFTER",
    "TOKEN_LIFETIME",
    "Boto3TokenGenerator",
    "IamTokenError",
    "IamTokenSource",
    "TokenGenerator",
    "looks_like_aws_region",
    "region_of_rds_host",
]

TOKEN_LIFETIME = 900.0
"""Seconds RDS accepts a token after signing (fixed by AWS: X-Amz-Expires=900)."""
DEFAULT_REFRESH_AFTER = 600.0
"""Sign a new token when the cached one is older than this: 5 minutes of margin for clock skew,
slow logins and a failed refresh (the old token is used while it is still valid)."""
_STALE_MARGIN = 60.0
"""A token this close to its expiry is not handed out even when signing a new one failed."""

TokenGenerator = Callable[[str, int, str, "str | None"], str]
"""``(host, port, user, region) -> token``; runs in a worker thread; raises IamTokenError."""


# mydb.cluster-c9akciq32.us-east-1.rds.amazonaws.com, inst-1.abc.cn-north-1.rds.amazonaws.com.cn
_RDS_HOST = re.compile(r"\.([a-z]{2}(?:-[a-z]+)+-\d{1,2})\.rds\.amazonaws\.com(?:\.cn)?\.?$")


def region_of_rds_host(host: str) -> str | None:
    """The region an RDS / Aurora endpoint name is in, or None for any other host."""
    match = _RDS_HOST.search(host.lower())
    return match.group(1) if match else None


class IamTokenError(UpstreamUnavailable):
    """No token could be signed (no credentials, no region, ...). 08006: the login cannot happen."""


class Boto3TokenGenerator:
    """Signs tokens with boto3's ``rds.generate_db_auth_token``, one client per region.

    Credentials come from boto3's standard chain (environment, shared config/credentials files,
    web identity, container and instance roles); the region, when the caller has none, from
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the shared config.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # boto3 sessions are not thread-safe; clients are
        self._session: Any = None
        self._clients: dict[str | None, Any] = {}

    def _client(self, region: str | None) -> Any:
        # botocore reads AWS_DEFAULT_REGION but not AWS_REGION, which other AWS SDKs, ECS and
        # Lambda set; honour both.
        region = region or os.environ.get("AWS_REGION") or None
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                import boto3  # lazily: see the module docstring

                if self._session is None:
                    self._session = boto3.session.Session()
                client = self._session.client("rds", region_name=region)
                self._clients[region] = client
            return client

    def __call__(self, host: str, port: int, user: str, region: str | None) -> str:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

        where = f"upstream {_hostport(host, port)} as {user}"
        try:
            client = self._client(region)
            token: str = client.generate_db_auth_token(
                DBHostname=host, Port=port, DBUsername=user, Region=client.meta.region_name
            )
        except NoRegionError:
            raise IamTokenError(
                f"cannot sign an IAM token for {where}: no AWS region (the upstream region name is "
                "not an AWS region, and neither upstream.aws_region nor AWS_REGION is set)"
            ) from None
        except NoCredentialsError:
            raise IamTokenError(
                f"cannot sign an IAM token for {where}: no AWS credentials found (environment, "
                "shared credentials file, web identity, container or instance role)"
            ) from None
        except (BotoCoreError, ClientError) as exc:
            # botocore's messages name what failed (a profile, an STS call), not secret values.
            raise IamTokenError(f"cannot sign an IAM token for {where}: {exc}") from None
        return token


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    signed_at: float  # on the source's clock


class IamTokenSource:
    """Cached IAM tokens per (host, port, user), re-signed before they expire.

    Concurrent requests for the same key share one signing; a caller that is cancelled (e.g. by a
    probe timeout) does not cancel it, so the next attempt finds the token ready.
    """

    def __init__(
        self,
        region_for: Callable[[Endpoint], str | None],
        *,
        refresh_after: float = DEFAULT_REFRESH_AFTER,
        generator: TokenGenerator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < refresh_after < TOKEN_LIFETIME - _STALE_MARGIN:
            raise ValueError(f"refresh_after must be within (0, {TOKEN_LIFETIME - _STALE_MARGIN:g}) seconds")
        self._region_for = region_for
        self.refresh_after = refresh_after
        self._generate = generator if generator is not None else Boto3TokenGenerator()
        self._clock = clock
        self._tokens: dict[tuple[str, int, str], _Token] = {}
        self._signing: dict[tuple[str, int, str], asyncio.Task[str]] = {}
        self.signed = 0  # tokens signed so far (tests, logs)

    async def token(self, endpoint: Endpoint, user: str) -> str:
        key = (endpoint.host, endpoint.port, user)
        cached = self._tokens.get(key)
        if cached is not None and self._clock() - cached.signed_at < self.refresh_after:
            return cached.value
        task = self._signing.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._sign(key, self._region_for(endpoint)))
            self._signing[key] = task
            task.add_done_callback(lambda done: self._signed(key, done))
        try:
            return await asyncio.shield(task)
        except IamTokenError as exc:
            # A failed refresh (say, the instance metadata service hiccuped) need not fail logins
            # while the previous token is still accepted.
            if cached is not None and self._clock() - cached.signed_at < TOKEN_LIFETIME - _STALE_MARGIN:
                logs.event(
                    "iam_token_refresh_failed",
                    logs.WARNING,
                    upstream=_hostport(key[0], key[1]),
                    user=user,
                    error=exc.message,
                    action="using the previous token",
                )
                return cached.value
            raise

    async def _sign(self, key: tuple[str, int, str], region: str | None) -> str:
        host, port, user = key
        started = self._clock()
        value = await asyncio.to_thread(self._generate, host, port, user, region)
        self._tokens[key] = _Token(value, started)
        self.signed += 1
        logs.event("iam_token_signed", upstream=_hostport(host, port), user=user, region=region)
        return value

    def _signed(self, key: tuple[str, int, str], task: asyncio.Task[str]) -> None:
        if self._signing.get(key) is task:
            del self._signing[key]
        if not task.cancelled():
            # Retrieved here so that an error nobody awaited (every caller was cancelled) is not
            # reported as "Task exception was never retrieved".
            task.exception()

    def forget(self) -> None:
        """Drop every cached token (e.g. after credentials were rotated)."""
        self._tokens.clear()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
