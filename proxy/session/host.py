"""What a client session needs from the process around it, and nothing more.

`ClientSession` is written against `SessionHost`, a structural type: `proxy.app.Sidecar`
satisfies it without naming it, so the session modules never import the process layer (not even
for annotations) and a unit test can drive a session with a small fake. Each member is here
because a session step uses it; a new need is added here first. (Interpreted on purpose: the
session reads these per login or per failover, never per message; the one member read per
message, the gate, is copied onto the compiled session at construction.)

Generic in the client type `C`, so that the registries keyed by client (`cancel_keys`,
`client_opened`...) keep their precise type without this module importing the client.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

if TYPE_CHECKING:
    from sidecar_config import Endpoint, SidecarConfig

    from ..hold import Gate
    from ..metrics import Stats
    from ..outcome import CommitOutcomeLedger
    from ..pool import Pool
    from ..protocol.auth import ScramVerifier
    from ..server import ServerConnection
    from ..spool.frontdoor import FrontDoorCache
    from ..spool.outage import OutageResponder
    from ..spool.record import SpoolRecord
    from ..statements import StatementRegistry
    from ..topology import TopologyMonitor

# The database name that opens the admin console instead of a pool (the same name as
# `proxy.admin.ADMIN_DATABASE`, kept here so the session needs no import of the console;
# tests/unit/test_client_states.py checks the two agree).
ADMIN_DATABASE: Final = "pgsidecar"

C = TypeVar("C")

# The admin console's side of the hand-off: read whole messages, send bytes.
Reader = Callable[[], Awaitable[tuple[int, bytes]]]
Sender = Callable[[bytes], None]


class AdminHandle(Protocol):
    """One admin console session, as the client session drives it."""

    async def login(self, password: str | None) -> None: ...

    async def serve(self, backend_key: bytes) -> str: ...


class Spooling(Protocol):
    """The spool service, as an outage session uses it."""

    @property
    def frontdoor(self) -> FrontDoorCache: ...

    @property
    def spooling(self) -> bool: ...

    def responder(self, user: str, database: str, settings: dict[str, str]) -> OutageResponder: ...

    async def append(self, record: SpoolRecord) -> None: ...

    def note_login(self, user: str, database: str, password: str | None) -> None: ...


class SessionHost(Protocol[C]):
    """The sidecar, as seen by one client session."""

    @property
    def config(self) -> SidecarConfig: ...

    @property
    def gate(self) -> Gate: ...

    @property
    def stats(self) -> Stats: ...

    @property
    def statements(self) -> StatementRegistry: ...

    @property
    def topology(self) -> TopologyMonitor: ...

    @property
    def spooling(self) -> Spooling | None: ...

    @property
    def commit_outcome(self) -> CommitOutcomeLedger: ...

    @property
    def cancel_keys(self) -> dict[int, C]: ...

    @property
    def client_ssl_context(self) -> ssl.SSLContext | None: ...

    def client_opened(self, client: C) -> None: ...

    def admit(self, client: C) -> None: ...

    def client_closed(self, client: C, counted: bool) -> None: ...

    async def forward_cancel(self, key: tuple[int, int], conn_id: str) -> None: ...

    async def pass_gate(self) -> None: ...

    def writer_connection_lost(self, endpoint: Endpoint, reason: str) -> None: ...

    def pool_for(self, user: str, database: str) -> Pool: ...

    def replica_pool_for(self, user: str, database: str, replica: Endpoint) -> Pool: ...

    async def open_server(
        self, endpoint: Endpoint, params: dict[str, str], password: str | None, timeout: float | None = None
    ) -> ServerConnection: ...

    def mock_salt(self, user: str) -> bytes: ...

    def scram_verifier(self, user: str, secret: str | None) -> ScramVerifier | None: ...

    def passthrough_known(self, user: str, password: str | None) -> bool: ...

    def passthrough_verified(self, user: str, password: str | None) -> None: ...


# Makes the admin console for a client session that logged in to ADMIN_DATABASE.
AdminFactory = Callable[[C, Reader, Sender], AdminHandle]
