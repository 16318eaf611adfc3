"""RDS IAM tokens (proxy/aws.py) and `secretsmanager:` reference parsing, without any AWS endpoint.

Signing an IAM token is local SigV4 presigning, so these tests need only fake credentials. Each
token is checked against an independent SigV4 implementation below (hashlib/hmac, no botocore), so
a token that merely looks right would not pass.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import threading
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from proxy.aws import (
    DEFAULT_REFRESH_AFTER,
    TOKEN_LIFETIME,
    Boto3TokenGenerator,
    IamTokenError,
    IamTokenSource,
    looks_like_aws_region,
    region_of_rds_host,
)
from sidecar_config import Endpoint, parse_config
from sidecar_config.secrets import SecretResolutionError, SecretsManagerRef

ACCESS_KEY = "AKIDPGSIDECARTEST"
SECRET_KEY = "pgsidecar/test/secret+key"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[None]:
    """Fake static credentials and nothing else: no profile files, no instance metadata."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield


# ---------------------------------------------------------------------------------------------
# An independent SigV4 verifier for RDS IAM tokens
# ---------------------------------------------------------------------------------------------


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def verify_token(
    token: str, *, host: str, port: int, user: str, region: str, secret_key: str
) -> dict[str, str]:
    """Check `token` as AWS would (format, scope, signature); returns its query parameters."""
    netloc, sep, query = token.partition("/?")
    assert sep, f"not host:port/?query: {token[:60]}"
    assert netloc == f"{host}:{port}"
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    params = dict(pairs)
    assert len(params) == len(pairs), "a parameter appears twice"
    assert params["Action"] == "connect"
    assert params["DBUser"] == user
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert params["X-Amz-Expires"] == "900"
    assert params["X-Amz-SignedHeaders"] == "host"
    access_key, date, scope_region, service, terminator = params["X-Amz-Credential"].split("/")
    assert (scope_region, service, terminator) == (region, "rds-db", "aws4_request")
    amz_date = params["X-Amz-Date"]
    assert amz_date.startswith(date) and len(amz_date) == 16 and amz_date.endswith("Z")
    signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    assert abs((datetime.datetime.now(datetime.UTC) - signed_at).total_seconds()) < 300

    # SigV4, query-string flavour: canonical request, string to sign, derived key.
    def enc(text: str) -> str:
        return urllib.parse.quote(text, safe="-_.~")

    canonical_query = "&".join(
        f"{enc(k)}={enc(v)}" for k, v in sorted(pairs) if k != "X-Amz-Signature"
    )
    canonical_request = "\n".join(
        ["GET", "/", canonical_query, f"host:{host}:{port}", "", "host",
         hashlib.sha256(b"").hexdigest()]
    )
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, f"{date}/{region}/rds-db/aws4_request",
         hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret_key).encode(), date), region), "rds-db"), "aws4_request")
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    assert params["X-Amz-Signature"] == expected, "signature does not verify"
    params["_access_key"] = access_key
    return params


# ---------------------------------------------------------------------------------------------
# Region names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["us-east-1", "eu-central-2", "ap-southeast-4", "us-gov-west-1", "cn-northwest-1", "il-central-1"]
)
def test_aws_region_names_are_recognised(name):
    assert looks_like_aws_region(name)


@pytest.mark.parametrize("name", ["region-a", "home", "us-east", "US-EAST-1", "us-east-1a", "eu_west_1", ""])
def test_local_region_labels_are_not_aws_regions(name):
    assert not looks_like_aws_region(name)


@pytest.mark.parametrize(
    ("host", "region"),
    [
        ("mydb.cluster-c9akciq32xyz.us-east-1.rds.amazonaws.com", "us-east-1"),
        ("inst-1.c9akciq32xyz.eu-west-3.rds.amazonaws.com", "eu-west-3"),
        ("mydb.cluster-ro-abc.cn-north-1.rds.amazonaws.com.cn", "cn-north-1"),
        ("MyDB.Cluster-ABC.AP-SOUTH-1.RDS.AMAZONAWS.COM", "ap-south-1"),
        ("127.0.0.1", None),
        ("db.internal.example", None),
        ("us-east-1.rds.amazonaws.com.evil.example", None),
    ],
)
def test_region_of_an_rds_host_name(host, region):
    assert region_of_rds_host(host) == region


def test_aws_region_config_field():
    base = {"upstream": {"regions": [{"name": "home", "hosts": ["db:5432"]}], "tls": "require"}}
    cfg = parse_config({"upstream": {**base["upstream"], "iam_auth": True, "aws_region": "eu-west-1"}})
    assert cfg.upstream.aws_region == "eu-west-1"
    with pytest.raises(Exception, match=r"upstream\.aws_region: must be an AWS region name"):
        parse_config({"upstream": {**base["upstream"], "aws_region": "home"}})
    with pytest.raises(Exception, match=r"upstream\.tls: IAM authentication needs TLS"):
        parse_config({"upstream": {**base["upstream"], "iam_auth": True, "tls": "disable"}})


# ---------------------------------------------------------------------------------------------
# Tokens signed by boto3
# ---------------------------------------------------------------------------------------------


def test_boto3_token_has_the_documented_format_and_a_valid_signature(aws_env):
    token = Boto3TokenGenerator()("db.example.internal", 5432, "cafeapp", "eu-west-1")
    assert token.startswith("db.example.internal:5432/?")
    assert "Action=connect" in token and "DBUser=cafeapp" in token
    params = verify_token(
        token, host="db.example.internal", port=5432, user="cafeapp", region="eu-west-1",
        secret_key=SECRET_KEY,
    )
    assert params["_access_key"] == ACCESS_KEY


def test_boto3_token_for_a_user_name_that_needs_escaping(aws_env):
    token = Boto3TokenGenerator()("127.0.0.1", 6543, "app user+1@x", "us-west-2")
    verify_token(token, host="127.0.0.1", port=6543, user="app user+1@x", region="us-west-2",
                 secret_key=SECRET_KEY)


def test_session_token_is_carried_in_the_token(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzE-session")
    token = Boto3TokenGenerator()("h", 5432, "u", "us-east-1")
    params = verify_token(token, host="h", port=5432, user="u", region="us-east-1", secret_key=SECRET_KEY)
    assert params["X-Amz-Security-Token"] == "FwoGZXIvYXdzE-session"


def test_region_falls_back_to_aws_region_then_aws_default_region(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    token = Boto3TokenGenerator()("h", 5432, "u", None)
    verify_token(token, host="h", port=5432, user="u", region="eu-north-1", secret_key=SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "sa-east-1")  # botocore alone ignores this one
    token = Boto3TokenGenerator()("h", 5432, "u", None)
    verify_token(token, host="h", port=5432, user="u", region="sa-east-1", secret_key=SECRET_KEY)


def test_no_region_anywhere_is_a_clear_error(aws_env):
    with pytest.raises(IamTokenError, match=r"upstream h:5432 as u: no AWS region") as info:
        Boto3TokenGenerator()("h", 5432, "u", None)
    assert info.value.code == "08006"


def test_no_credentials_is_a_clear_error(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(IamTokenError, match="upstream h:5432 as u: no AWS credentials found"):
        Boto3TokenGenerator()("h", 5432, "u", "us-east-1")


# ---------------------------------------------------------------------------------------------
# IamTokenSource: cache and refresh
# ---------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingGenerator:
    """Signs with boto3 for real, counting calls; can be made to fail or to block."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str, str | None]] = []
        self.fail = False
        self.gate: threading.Event | None = None
        self.thread_names: list[str] = []
        self._real = Boto3TokenGenerator()

    def __call__(self, host: str, port: int, user: str, region: str | None) -> str:
        self.calls.append((host, port, user, region))
        self.thread_names.append(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail:
            raise IamTokenError(f"cannot sign an IAM token for upstream {host}:{port} as {user}: test")
        return self._real(host, port, user, region)


EP = Endpoint("127.0.0.1", 5432)


def _source(gen: CountingGenerator, clock: FakeClock, refresh_after: float = DEFAULT_REFRESH_AFTER,
            region: str | None = "us-east-1") -> IamTokenSource:
    return IamTokenSource(lambda ep: region, refresh_after=refresh_after, generator=gen, clock=clock)


def test_tokens_are_cached_per_host_port_and_user(aws_env):
    gen, clock = CountingGenerator(), FakeClock()
    source = _source(gen, clock)

    async def scenario() -> None:
        first = await source.token(EP, "app")
        clock.now += DEFAULT_REFRESH_AFTER - 1
        assert await source.token(EP, "app") == first
        assert len(gen.calls) == 1
        other_user = await source.token(EP, "other")
        other_port = await source.token(Endpoint("127.0.0.1", 5433), "app")
        assert len({first, other_user, other_port}) == 3
        assert len(gen.calls) == 3 and source.signed == 3
        verify_token(other_port, host="127.0.0.1", port=5433, user="app", region="us-east-1",
                     secret_key=SECRET_KEY)

    asyncio.run(scenario())
    # Signing ran in a worker thread, not on the event loop's.
    assert all(name != threading.main_thread().name for name in gen.thread_names)


def test_token_is_re_signed_after_the_configured_age(aws_env):
    gen, clock = CountingGenerator(), FakeClock()
    source = _source(gen, clock, refresh_after=30)

    async def scenario() -> None:
        first = await source.token(EP, "app")
        clock.now += 29.9
        assert await source.token(EP, "app") == first
        clock.now += 0.2
        time.sleep(1.1)  # X-Amz-Date has one-second resolution: make the new token differ
        second = await source.token(EP, "app")
        assert second != first
        verify_token(second, host="127.0.0.1", port=5432, user="app", region="us-east-1",
                     secret_key=SECRET_KEY)
        assert await source.token(EP, "app") == second

    asyncio.run(scenario())
    assert len(gen.calls) == 2


def test_default_refresh_is_well_inside_the_token_lifetime():
    assert DEFAULT_REFRESH_AFTER == 600 and TOKEN_LIFETIME == 900
    with pytest.raises(ValueError):
        IamTokenSource(lambda ep: None, refresh_after=TOKEN_LIFETIME)


def test_concurrent_logins_share_one_signing(aws_env):
    gen, clock = CountingGenerator(), FakeClock()
    gen.gate = gate = threading.Event()
    source = _source(gen, clock)

    async def scenario() -> list[str]:
        tasks = [asyncio.create_task(source.token(EP, "app")) for _ in range(20)]
        await asyncio.sleep(0.05)
        # The loop is free while signing blocks in its thread.
        assert not any(t.done() for t in tasks)
        gate.set()
        return await asyncio.gather(*tasks)

    tokens = asyncio.run(scenario())
    assert len(set(tokens)) == 1
    assert len(gen.calls) == 1


def test_a_cancelled_caller_does_not_waste_the_signing(aws_env):
    gen, clock = CountingGenerator(), FakeClock()
    gen.gate = gate = threading.Event()
    source = _source(gen, clock)

    async def scenario() -> None:
        # A probe gives up (probe_timeout) while the token is being signed...
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await source.token(EP, "app")
        gate.set()
        # ...and its retry gets the token that signing produced meanwhile.
        await source.token(EP, "app")

    asyncio.run(scenario())
    assert len(gen.calls) == 1


def test_a_failed_refresh_keeps_using_a_still_valid_token(aws_env):
    gen, clock = CountingGenerator(), FakeClock()
    source = _source(gen, clock)

    async def scenario() -> None:
        first = await source.token(EP, "app")
        gen.fail = True
        clock.now += DEFAULT_REFRESH_AFTER + 10
        assert await source.token(EP, "app") == first  # 610 s old: AWS still accepts it
        clock.now += TOKEN_LIFETIME - DEFAULT_REFRESH_AFTER - 10 - 30  # 870 s: too close to expiry
        with pytest.raises(IamTokenError, match="test"):
            await source.token(EP, "app")
        gen.fail = False
        calls = len(gen.calls)
        await source.token(EP, "app")
        assert len(gen.calls) == calls + 1  # signed anew (same text within the same second)

    asyncio.run(scenario())


def test_signing_errors_reach_the_caller(aws_env):
    gen, clock = CountingGenerator(), FakeClock()
    gen.fail = True
    source = _source(gen, clock)

    async def scenario() -> None:
        with pytest.raises(IamTokenError) as info:
            await source.token(EP, "app")
        assert info.value.code == "08006"
        gen.fail = False
        await source.token(EP, "app")  # the failure is not cached

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------
# Sidecar wiring: upstream_password and the region a token is signed for
# ---------------------------------------------------------------------------------------------


def _sidecar(upstream: dict[str, object]):
    from proxy.app import Sidecar

    cfg = parse_config(
        {
            "auth": {"method": "scram-sha-256", "users": [{"name": "app", "password": "client-pw"}]},
            "upstream": {
                "tls": "require",
                "regions": [
                    {"name": "us-west-2", "hosts": ["10.0.0.1:5432"]},
                    {"name": "dr-site", "hosts": ["10.0.1.1:5432"]},
                ],
                **upstream,
            },
            "metrics_listen": None,
        }
    )
    return Sidecar(cfg)


def test_upstream_password_is_the_configured_password_without_iam(aws_env):
    async def scenario() -> None:
        sidecar = _sidecar({})
        assert await sidecar.upstream_password("app") == "client-pw"
        assert await sidecar.upstream_password("app", Endpoint("10.0.0.1", 5432)) == "client-pw"
        assert sidecar.iam_tokens is None

    asyncio.run(scenario())


def test_upstream_password_is_an_iam_token_for_the_endpoint_and_its_region(aws_env):
    async def scenario() -> None:
        sidecar = _sidecar({"iam_auth": True, "aws_region": "eu-west-1"})
        # Region from the region's name (an AWS region)...
        token = await sidecar.upstream_password("app", Endpoint("10.0.0.1", 5432))
        assert token is not None
        verify_token(token, host="10.0.0.1", port=5432, user="app", region="us-west-2", secret_key=SECRET_KEY)
        # ...from upstream.aws_region when the name is a local label...
        token = await sidecar.upstream_password("app", Endpoint("10.0.1.1", 5432))
        assert token is not None
        verify_token(token, host="10.0.1.1", port=5432, user="app", region="eu-west-1", secret_key=SECRET_KEY)
        # ...and from the host name for an RDS endpoint (e.g. an Aurora instance found by topology).
        rds = "inst-2.c9akciq32xyz.ap-northeast-1.rds.amazonaws.com"
        token = await sidecar.upstream_password("app", Endpoint(rds, 5432))
        assert token is not None
        verify_token(token, host=rds, port=5432, user="app", region="ap-northeast-1", secret_key=SECRET_KEY)
        assert sidecar.iam_tokens is not None and sidecar.iam_tokens.signed == 3
        with pytest.raises(ValueError, match="pass it"):
            await sidecar.upstream_password("app")

    asyncio.run(scenario())


def test_iam_token_errors_fail_the_upstream_login_with_08006(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")

    async def scenario() -> None:
        sidecar = _sidecar({"iam_auth": True})
        with pytest.raises(IamTokenError, match="no AWS credentials") as info:
            await sidecar.open_server(Endpoint("10.0.0.1", 5432), {"user": "app", "database": "d"}, None)
        assert info.value.code == "08006"
        assert sidecar.stats.upstream_errors["08006"] == 1

    asyncio.run(scenario())


# ---------------------------------------------------------------------------------------------
# secretsmanager: references
# ---------------------------------------------------------------------------------------------

ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ARN, SecretsManagerRef(ARN, region="eu-west-1")),
        (f"{ARN}:password", SecretsManagerRef(ARN, "password", region="eu-west-1")),
        (f"{ARN}::AWSPREVIOUS:", SecretsManagerRef(ARN, None, "AWSPREVIOUS", region="eu-west-1")),
        (f"{ARN}:password::v-1", SecretsManagerRef(ARN, "password", None, "v-1", region="eu-west-1")),
        ("prod/db", SecretsManagerRef("prod/db")),
        ("prod/db:password", SecretsManagerRef("prod/db", "password")),
        (
            "arn:aws-cn:secretsmanager:cn-north-1:123456789012:secret:x-AbCdEf:k",
            SecretsManagerRef("arn:aws-cn:secretsmanager:cn-north-1:123456789012:secret:x-AbCdEf", "k",
                              region="cn-north-1"),
        ),
    ],
)
def test_secretsmanager_references_parse(text, expected):
    assert SecretsManagerRef.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("arn:aws:s3:::bucket", "is not a Secrets Manager secret ARN"),
        ("arn:aws:secretsmanager:us-east-1:1:secret", "is not a Secrets Manager secret ARN"),
        (f"{ARN}:", "empty JSON key"),
        ("prod/db:", "empty JSON key"),
        (f"{ARN}:a:b:c:d", "too many ':' parts"),
        (":password", "needs a secret ARN or name"),
    ],
)
def test_bad_secretsmanager_references_are_explained(text, problem):
    with pytest.raises(SecretResolutionError, match=problem):
        SecretsManagerRef.parse(text)
