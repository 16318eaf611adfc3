"""The typed configuration. Defaults here are the documented defaults (README.md, Configuration reference).

Cross-field checks raise :func:`_field_error`, which carries the path of the field at fault relative
to the model being validated, so the loader can report ``auth.users[1].password`` rather than just
``auth``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .regions import looks_like_aws_region
from .scram import ScramVerifier
from .units import ByteSize, Duration, Endpoint, EndpointField

__all__ = [
    "AuthConfig",
    "AuthMethod",
    "ClientTlsConfig",
    "DynamoDBSpoolConfig",
    "FailoverConfig",
    "LimitsConfig",
    "PoolConfig",
    "RegionConfig",
    "RoutingConfig",
    "ScramVerifier",
    "SidecarConfig",
    "SpoolConfig",
    "UpstreamConfig",
    "UserConfig",
]

FIELD_ERROR_TYPE = "config_field"
"""Error type of cross-field errors; their ``ctx["field"]`` is the location of the field at fault,
relative to the model that raised it."""


def _field_error(subpath: tuple[str | int, ...], reason: str) -> PydanticCustomError:
    return PydanticCustomError(FIELD_ERROR_TYPE, "{reason}", {"reason": reason, "field": subpath})


class _Model(BaseModel):
    # forbid: a misspelt key would otherwise be silently ignored and its default used instead.
    model_config = ConfigDict(extra="forbid")


Name = Annotated[str, Field(min_length=1)]
AuthMethod = Literal["trust", "md5", "scram-sha-256", "passthrough"]


_KiB = 1024
_MiB = 1024**2
_GiB = 1024**3


class PoolConfig(_Model):
    mode: Literal["session", "transaction"] = Field(
        default="session",
        description="session: a client keeps one server connection; transaction: per transaction",
    )
    size: int = Field(default=20, ge=1, description="server connections per (user, database)")
    min_idle: int = Field(default=0, ge=0, description="idle server connections kept open per pool")
    max_clients: int = Field(default=1000, ge=1, description="client connections accepted; more get 53300")
    checkout_timeout: Duration = Field(default=30.0, gt=0, description="wait for a free server connection")
    server_idle_timeout: Duration = Field(default=600.0, gt=0, description="close servers idle this long")
    server_lifetime: Duration = Field(default=3600.0, gt=0, description="close servers older than this")
    server_check_after_idle: Duration = Field(
        default=30.0, ge=0, description="a server idle longer than this gets a liveness check on checkout"
    )
    max_prepared_statements: int = Field(
        default=200, ge=0, description="named prepared statements tracked per server connection"
    )
    max_concurrent_connects: int = Field(
        default=4, ge=1, description="server connections being opened at once per pool"
    )
    reset_query: str = Field(
        default="DISCARD ALL", description="run when a server returns to the pool; empty for none"
    )

    @model_validator(mode="after")
    def _min_idle_within_size(self) -> Self:
        if self.min_idle > self.size:
            raise _field_error(("min_idle",), f"must not exceed pool.size ({self.size})")
        return self


class UserConfig(_Model):
    name: Name
    password: SecretStr | None = Field(
        default=None, description="plain text or a SCRAM-SHA-256 verifier (as in pg_authid)"
    )

    @field_validator("password")
    @classmethod
    def _check_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if not secret:
            raise ValueError("must not be empty")
        if secret.startswith(ScramVerifier.PREFIX):
            ScramVerifier.parse(secret)
        return value

    @property
    def password_kind(self) -> Literal["plain", "scram-sha-256"] | None:
        """``"scram-sha-256"`` for a verifier, ``"plain"`` for a clear-text password, else ``None``."""
        if self.password is None:
            return None
        if self.password.get_secret_value().startswith(ScramVerifier.PREFIX):
            return "scram-sha-256"
        return "plain"

    @property
    def scram_verifier(self) -> ScramVerifier | None:
        """The parsed verifier when the password is one."""
        if self.password is None or self.password_kind != "scram-sha-256":
            return None
        return ScramVerifier.parse(self.password.get_secret_value())


class AuthConfig(_Model):
    method: AuthMethod = Field(default="scram-sha-256", description="how clients authenticate to the sidecar")
    users: list[UserConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_users(self) -> Self:
        seen: dict[str, int] = {}
        for index, user in enumerate(self.users):
            if user.name in seen:
                raise _field_error(
                    ("users", index, "name"),
                    f"duplicate user name (first defined at auth.users[{seen[user.name]}])",
                )
            seen[user.name] = index
        if self.method in ("md5", "scram-sha-256"):
            for index, user in enumerate(self.users):
                if user.password is None:
                    raise _field_error(
                        ("users", index, "password"), f"required when auth.method is {self.method}"
                    )
                if self.method == "md5" and user.password_kind == "scram-sha-256":
                    # md5 needs the clear text (or its md5 hash); a SCRAM verifier cannot produce it.
                    raise _field_error(
                        ("users", index, "password"),
                        "a SCRAM verifier cannot be used with auth.method md5; give the plain password",
                    )
        return self

    def user(self, name: str) -> UserConfig | None:
        """The configured user called ``name``, if any."""
        for candidate in self.users:
            if candidate.name == name:
                return candidate
        return None


class RegionConfig(_Model):
    name: Name
    hosts: list[EndpointField] = Field(min_length=1, description="where to look for the writer")
    instance_endpoint_pattern: str | None = Field(
        default=None,
        description="aurora: instance endpoint, '?' standing for the instance id; port default: hosts[0]'s",
    )
    instances: dict[str, EndpointField] | None = Field(
        default=None, description="aurora: explicit instance id -> endpoint map (wins over the pattern)"
    )

    @field_validator("instance_endpoint_pattern")
    @classmethod
    def _check_pattern(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "?" not in value:
            raise ValueError("must contain '?', which stands for the instance id")
        try:
            _pattern_endpoint(value, "instance-1", 5432)
        except ValueError as exc:
            raise ValueError(f"does not give a valid endpoint: {exc}") from None
        return value

    def instance_endpoint(self, instance_id: str) -> Endpoint | None:
        """Where to reach an instance: the explicit map first, then the pattern, else ``None``."""
        if self.instances is not None and instance_id in self.instances:
            return self.instances[instance_id]
        if self.instance_endpoint_pattern is not None:
            return _pattern_endpoint(self.instance_endpoint_pattern, instance_id, self.hosts[0].port)
        return None


def _pattern_endpoint(pattern: str, instance_id: str, default_port: int) -> Endpoint:
    text = pattern.replace("?", instance_id)
    # A pattern usually names only the host ("?.abc.us-east-1.rds.amazonaws.com"): instances listen
    # on the cluster's port, so take it from the configured hosts.
    if text.startswith("[") or text.rpartition(":")[2].isdigit():
        return Endpoint.parse(text)
    return Endpoint(text, default_port)


class UpstreamConfig(_Model):
    topology: Literal["static", "aurora", "aurora-global"] = Field(
        default="static",
        description="how the writer is found: pg_is_in_recovery() or Aurora topology functions",
    )
    tls: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    ca_file: Path | None = Field(default=None, description="CA bundle; required for verify-full")
    regions: list[RegionConfig] = Field(min_length=1, description="ordered: the first is home")
    connect_timeout: Duration = Field(default=5.0, gt=0)
    iam_auth: bool = Field(default=False, description="log in to the database with RDS IAM tokens")
    aws_region: str | None = Field(
        default=None,
        description="iam_auth: region to sign tokens for when neither the RDS host name nor the "
        "region's name is an AWS region (else AWS_REGION)",
    )
    probe_user: Name | None = Field(
        default=None, description="user the topology probe logs in as; default: first auth user"
    )
    probe_database: Name = "postgres"

    @field_validator("aws_region")
    @classmethod
    def _check_aws_region(cls, value: str | None) -> str | None:
        if value is not None and not looks_like_aws_region(value):
            raise ValueError("must be an AWS region name such as us-east-1")
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.tls == "verify-full" and self.ca_file is None:
            raise _field_error(("ca_file",), "required when upstream.tls is verify-full")
        if self.iam_auth and self.tls == "disable":
            raise _field_error(("tls",), "IAM authentication needs TLS; use prefer, require or verify-full")
        seen: dict[str, int] = {}
        for index, region in enumerate(self.regions):
            if region.name in seen:
                raise _field_error(
                    ("regions", index, "name"),
                    f"duplicate region name (first defined at upstream.regions[{seen[region.name]}])",
                )
            seen[region.name] = index
        if self.topology != "static":
            for index, region in enumerate(self.regions):
                if region.instance_endpoint_pattern is None and region.instances is None:
                    # Aurora reports instance ids, not addresses; without a mapping the writer it
                    # names could never be reached, so fail now rather than at the first failover.
                    raise _field_error(
                        ("regions", index, "instance_endpoint_pattern"),
                        f"instance_endpoint_pattern or instances is required when upstream.topology "
                        f"is {self.topology}",
                    )
        return self

    @property
    def home_region(self) -> RegionConfig:
        return self.regions[0]


class FailoverConfig(_Model):
    check_interval: Duration = Field(default=0.25, gt=0, description="how often the writer is probed")
    hold_timeout: Duration = Field(
        default=30.0, ge=0, description="how long new transactions wait for a writer before outage handling"
    )
    probe_timeout: Duration = Field(
        default=1.0, gt=0, description="a probe slower than this counts as failed"
    )
    transaction_replay: bool = Field(
        default=True,
        description="replay a transaction cut by a failover on the new writer, continuing only if "
        "every answer matches what the client already got",
    )
    replay_max_bytes: ByteSize = Field(
        default=_MiB, ge=_KiB, le=_GiB,
        description="what a client may send in one transaction and still have it replayed (1KiB..1GiB); "
        "memory per client is bounded by it",
    )
    commit_outcome_timeout: Duration = Field(
        default=300.0, ge=0, le=1800,  # (markers are kept an hour: an answer must come well before)
        description="how long a COMMIT cut by a failover waits for a writer to learn its outcome, "
        "past hold_timeout (a COMMIT cut while no writer exists anywhere); then 08007",
    )
    commit_outcome: Literal["marker", "off"] = Field(
        default="marker",
        description="marker: a COMMIT cut by a failover gets its true outcome from a marker written in "
        "the transaction (needs `pgsidecar init-db`); off: it gets 08007",
    )


class RoutingConfig(_Model):
    reads: Literal["writer", "failover", "balance"] = Field(
        default="failover",
        description="writer: every read to the writer; failover: read-only work to a replica only "
        "while there is no writer; balance: read-only work spread over healthy replicas",
    )
    max_replica_lag: Duration = Field(
        default=5.0, ge=0, description="a replica lagging more than this is not used for reads"
    )
    read_only_users: list[Name] = Field(
        default_factory=list, description="users whose every session is read-only work"
    )
    read_only_databases: list[Name] = Field(
        default_factory=list, description="databases whose every session is read-only work"
    )

    @field_validator("read_only_users", "read_only_databases")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in value:
            if name in seen:
                raise ValueError(f'"{name}" is listed twice')
            seen.add(name)
        return value


class DynamoDBSpoolConfig(_Model):
    table: Name = "pgsidecar-spool"
    region: Name = "us-east-1"
    endpoint_url: str | None = Field(default=None, description="override, e.g. a local moto server")
    create_table: bool = Field(default=True, description="create the table if it does not exist")

    @field_validator("endpoint_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class SpoolConfig(_Model):
    backend: Literal["none", "sqlite", "dynamodb"] = Field(
        default="sqlite", description="where writes go while no writer exists; none disables spooling"
    )
    path: Path = Field(default=Path("./pgsidecar-spool.db"), description="sqlite file")
    tables: list[Name] | None = Field(default=None, description="tables that may be spooled; null: any")
    max_drain_hold: Duration = Field(
        default=30.0, ge=0, description="longest that new work is held while the spool replays"
    )
    replay_batch: int = Field(
        default=500, ge=1, le=10000,
        description="spooled transactions replayed together in one upstream transaction",
    )
    dynamodb: DynamoDBSpoolConfig = Field(default_factory=DynamoDBSpoolConfig)

    @field_validator("tables")
    @classmethod
    def _check_tables(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            # An empty list reads as both "nothing" and "no restriction"; make the writer choose.
            raise ValueError("must not be empty: omit it to allow any table, or set spool.backend to none")
        return value




class LimitsConfig(_Model):
    max_message_size: ByteSize = Field(
        default=64 * 1024**2, ge=_KiB, le=_GiB, description="largest protocol message accepted (1KiB..1GiB)"
    )
    client_login_timeout: Duration = Field(
        default=15.0, gt=0, description="a client must finish startup and authentication within this"
    )


class ClientTlsConfig(_Model):
    cert_file: Path
    key_file: Path


class SidecarConfig(_Model):
    listen: EndpointField = Field(default=Endpoint("127.0.0.1", 6432))
    metrics_listen: EndpointField | None = Field(
        default=Endpoint("127.0.0.1", 9930), description="/metrics, /healthz, /readyz; null disables"
    )
    admin_users: list[Name] = Field(
        default_factory=lambda: ["postgres"],
        description="users allowed on the admin console (database pgsidecar)",
    )
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_timeout: Duration = Field(default=30.0, ge=0, description="how long SIGTERM waits for clients")
    pool: PoolConfig = Field(default_factory=PoolConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    upstream: UpstreamConfig
    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    client_tls: ClientTlsConfig | None = None

    def warnings(self) -> list[str]:
        """What is valid but will likely not work, for check-config and the startup log.

        The topology probe must log in upstream with credentials from this file: a probe user
        without a password in auth.users (passthrough with no users, say) only works where
        PostgreSQL trusts that user, so this warns rather than refuses.
        """
        upstream = self.upstream
        if upstream.iam_auth:
            return []  # the probe logs in with an IAM token
        user = upstream.probe_user or "postgres"
        configured = self.auth.user(user)
        if configured is not None and configured.password_kind == "plain":
            return []
        if configured is not None and configured.password_kind == "scram-sha-256":
            why = f'auth.users gives "{user}" a SCRAM verifier, which cannot log in anywhere'
        elif not self.auth.users:
            why = f"auth.users is empty (auth.method {self.auth.method})"
        else:
            why = f'auth.users has no password for "{user}"'
        return [
            f'upstream.probe_user: the topology probe logs in as "{user}" without a password: {why}. '
            "Unless PostgreSQL trusts that user (pg_hba.conf trust), the probe can never log in and "
            "no writer will ever be found. List the probe user with its plain password in auth.users "
            "(and set upstream.probe_user to it), or use upstream.iam_auth."
        ]

    @model_validator(mode="after")
    def _cross_section(self) -> Self:
        if self.metrics_listen is not None and self.metrics_listen == self.listen:
            raise _field_error(("metrics_listen",), "must differ from listen")
        if self.upstream.probe_user is None and self.auth.users:
            # Filled in here, not left to the proxy, so that the effective config shows who probes.
            # A copy, because the UpstreamConfig may be an object the caller passed in and still holds.
            self.upstream = self.upstream.model_copy(update={"probe_user": self.auth.users[0].name})
        return self
