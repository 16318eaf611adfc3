"""SQLSTATE codes the sidecar itself emits, and the error type that carries one to a client.

Every error the sidecar originates (as opposed to relays from PostgreSQL) is raised as a
`ProxyError` subclass looked up from this table, never built from ad-hoc strings, so a client
always gets a code its driver can act on and an operator gets the same code in the log line.
"""

from __future__ import annotations

from enum import StrEnum


class SqlState(StrEnum):
    """The codes pgsidecar sends plus the ones it must recognise from upstream."""

    CONNECTION_EXCEPTION = "08000"
    CONNECTION_FAILURE = "08006"
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = "08001"
    TRANSACTION_RESOLUTION_UNKNOWN = "08007"
    PROTOCOL_VIOLATION = "08P01"
    FEATURE_NOT_SUPPORTED = "0A000"
    INVALID_AUTHORIZATION_SPECIFICATION = "28000"
    INVALID_PASSWORD = "28P01"
    SERIALIZATION_FAILURE = "40001"
    INSUFFICIENT_PRIVILEGE = "42501"
    SYNTAX_ERROR = "42601"
    TOO_MANY_CONNECTIONS = "53300"
    ADMIN_SHUTDOWN = "57P01"
    CRASH_SHUTDOWN = "57P02"
    CANNOT_CONNECT_NOW = "57P03"
    QUERY_CANCELED = "57014"
    READ_ONLY_SQL_TRANSACTION = "25006"
    INVALID_PARAMETER_VALUE = "22023"
    INTERNAL_ERROR = "XX000"


class ProxyError(Exception):
    """An error the sidecar reports to a client as an ErrorResponse.

    `fatal` errors end the client connection after being sent (FATAL severity); others are sent
    as ERROR and the session continues.
    """

    sqlstate: SqlState = SqlState.INTERNAL_ERROR
    fatal: bool = True

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        # The SQLSTATE actually sent: the class's own, or one relayed from PostgreSQL.
        self.code = code or self.sqlstate.value


class ProtocolViolation(ProxyError):
    sqlstate = SqlState.PROTOCOL_VIOLATION


class UpstreamUnavailable(ProxyError):
    sqlstate = SqlState.CONNECTION_FAILURE


class AuthenticationFailed(ProxyError):
    sqlstate = SqlState.INVALID_PASSWORD


class UnknownUser(ProxyError):
    sqlstate = SqlState.INVALID_AUTHORIZATION_SPECIFICATION


class TooManyClients(ProxyError):
    sqlstate = SqlState.TOO_MANY_CONNECTIONS


class CannotConnectNow(ProxyError):
    sqlstate = SqlState.CANNOT_CONNECT_NOW


class FeatureNotSupported(ProxyError):
    sqlstate = SqlState.FEATURE_NOT_SUPPORTED


class InsufficientPrivilege(ProxyError):
    sqlstate = SqlState.INSUFFICIENT_PRIVILEGE


class ShuttingDown(ProxyError):
    sqlstate = SqlState.ADMIN_SHUTDOWN


_BY_STATE: dict[str, type[ProxyError]] = {
    cls.sqlstate.value: cls
    for cls in (
        ProtocolViolation,
        UpstreamUnavailable,
        AuthenticationFailed,
        UnknownUser,
        TooManyClients,
        CannotConnectNow,
        FeatureNotSupported,
        InsufficientPrivilege,
        ShuttingDown,
    )
}


def error_class(sqlstate: str) -> type[ProxyError]:
    """The ProxyError subclass for a SQLSTATE (the base class when the code has none)."""
    return _BY_STATE.get(sqlstate, ProxyError)


# Upstream errors that mean "this server is going away or is no longer a writer": the data path
# reports them to the topology monitor (failover issue) instead of treating them as query errors.
SERVER_GONE_STATES = frozenset(
    {SqlState.ADMIN_SHUTDOWN, SqlState.CRASH_SHUTDOWN, SqlState.CANNOT_CONNECT_NOW}
)
