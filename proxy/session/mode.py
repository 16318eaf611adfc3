"""What the rest of a session needs of its pool mode's relay, whichever mode it is.

`SessionRelay` (session mode) and `TransactionRouting` (transaction mode) are the two subclasses;
a session builds the one its pool mode needs. The core, the attach step, the failover carry-over
and the outage session hold it as a `Mode`: the relay's inspector to go back to after answering
locally, the client's named statements (to show an outage responder or an aborted transaction, and
to learn what the client prepared meanwhile), and the open extended-protocol batch. A native base
class, not a Protocol: its methods are called through the vtable (ARCHITECTURE.md, "The compiled
data path"); none of them is called per message.
"""

from __future__ import annotations

from ..protocol import messages as m
from ..protocol.framing import Action, Relay


class Mode:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        # The REQUEST_* kind of the extended-protocol batch the client has open (no Sync yet), or
        # None. Read by the core too: a server given back mid-batch must be resynchronised.
        self.batch_kind: int | None = None

    def inspect(self, type_byte: int, msg: memoryview) -> Action:
        """The relay's inspector while the session forwards to a server."""
        raise NotImplementedError

    def watch(self) -> bytes:
        """The message types the relay must hand to `inspect` now."""
        raise NotImplementedError

    def forward(self) -> None:
        """Make the relay forward through this mode (at construction, and after answering locally)."""
        self.relay.set_inspector(self.inspect, self.watch())

    def take_held(self, held: bytes) -> bool:
        """Just linked to a server, the input held meanwhile (`held`, taken from the relay):
        True if the mode's fast path sent it (as one request it marks for the commit-outcome
        ledger may be), False to relay it through `inspect` as usual."""
        return False

    def known_statements(self) -> dict[str, bytes]:
        """The client's named statements, as Parse messages under the client's own names."""
        raise NotImplementedError

    def learn_statement(self, name: str, parse: bytes, replace: bool) -> None:
        """A statement the client prepared (`parse`: its Parse message) while no server saw it (an
        aborted transaction answered locally, an outage): prepared wherever the session runs
        next. `replace`: over one of the same name (transaction mode keeps that one otherwise)."""
        raise NotImplementedError

    def forget_statement(self, name: str) -> None:
        """A statement the client closed while no server saw it."""
        raise NotImplementedError

    def statements_for_new_server(self) -> list[bytes]:
        """Parse messages a new server must run before the session's next request (session mode:
        the session's statements, which live on its own server; transaction mode: none, they are
        prepared on demand)."""
        return []

    def statement_text(self, name: str) -> str | None:
        """The SQL text of the client's prepared statement `name` (None: not known)."""
        parse = self.known_statements().get(name)
        return None if parse is None else m.decode_parse(parse[5:]).query

    def unmovable(self) -> str | None:
        """Why the session cannot move to another server (LISTEN, a temporary table...), or None."""
        return None
