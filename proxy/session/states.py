"""The states of one client session, and which changes between them are allowed.

`ClientState` names them; the session stores the plain int (`ClientSession.state`) and compares it
with the module constants below, which mypyc inlines: checking the state on the hot path is one
integer compare. `SessionCore.to` is the only place that changes it, against `allowed`.
(ARCHITECTURE.md, "Client session", has the table with what enters and leaves each state.)
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from mypy_extensions import mypyc_attr


class ClientState(IntEnum):
    LOGGING_IN = 0  # SSL/GSS negotiation, startup packet, authentication
    CONNECTING = 1  # authenticated, the login waits for its first server
    ADMIN = 2  # on the admin console: no server ever
    LINKED = 3  # the relay forwards to `server`
    IDLE = 4  # no server and nothing under way (transaction mode between transactions, a cut session)
    PARKED = 5  # transaction mode between transactions, the last server kept (`pool.parked`)
    HELD = 6  # input held while a server is acquired (`_attach_next`)
    GATED = 7  # session mode: server kept but unlinked, input held until the gate opens
    MAINTAINING = 8  # unlinked: the sidecar's own queries run on `server` (settings, statements)
    ABORTED = 9  # answering locally until the client ends the transaction a failover cut
    OUTAGE = 10  # played by an OutageResponder (spool) while no writer exists
    CLOSED = 11


# The same values as plain constants, for the compiled code (an IntEnum member is a generic
# attribute lookup there; these are inlined). tests/unit/test_client_states.py checks they agree.
LOGGING_IN: Final = 0
CONNECTING: Final = 1
ADMIN: Final = 2
LINKED: Final = 3
IDLE: Final = 4
PARKED: Final = 5
HELD: Final = 6
GATED: Final = 7
MAINTAINING: Final = 8
ABORTED: Final = 9
OUTAGE: Final = 10
CLOSED: Final = 11
COUNT: Final = 12

# Where each state may go (every state may close).
TRANSITIONS: Final[dict[ClientState, tuple[ClientState, ...]]] = {
    ClientState.LOGGING_IN: (ClientState.CONNECTING, ClientState.ADMIN),
    ClientState.CONNECTING: (ClientState.IDLE,),
    ClientState.ADMIN: (),
    ClientState.LINKED: (ClientState.IDLE, ClientState.PARKED, ClientState.GATED, ClientState.MAINTAINING),
    ClientState.IDLE: (ClientState.LINKED, ClientState.HELD, ClientState.ABORTED, ClientState.OUTAGE),
    ClientState.PARKED: (ClientState.LINKED, ClientState.IDLE),
    ClientState.HELD: (ClientState.LINKED, ClientState.OUTAGE, ClientState.IDLE),
    ClientState.GATED: (ClientState.LINKED, ClientState.IDLE),
    ClientState.MAINTAINING: (ClientState.LINKED, ClientState.IDLE),
    ClientState.ABORTED: (ClientState.IDLE,),
    ClientState.OUTAGE: (ClientState.IDLE,),
    ClientState.CLOSED: (),
}


def _allowed_table() -> bytes:
    table = bytearray(COUNT * COUNT)
    for old, targets in TRANSITIONS.items():
        for new in (*targets, ClientState.CLOSED):
            if old is not ClientState.CLOSED:
                table[old * COUNT + new] = 1
    return bytes(table)


# allowed[old * COUNT + new]: 1 if the session may go from `old` to `new`.
allowed: Final = _allowed_table()

# The `client_connections{state}` label of each state (OUTAGE shows "waiting" while a verdict
# is pending: see `ClientSession.metric_state`).
METRIC_LABELS: Final = (
    "login",  # LOGGING_IN
    "waiting",  # CONNECTING
    "idle",  # ADMIN
    "active",  # LINKED
    "idle",  # IDLE
    "idle",  # PARKED
    "waiting",  # HELD
    "active",  # GATED: its server is still its own
    "active",  # MAINTAINING
    "idle",  # ABORTED
    "idle",  # OUTAGE
    "idle",  # CLOSED
)

# States whose entry and exit are logged (event=client_state, debug): the rare ones. The states a
# transaction-mode session passes through at every transaction are not, to keep that path cheap.
LOGGED: Final = bytes(1 if s in (GATED, ABORTED, OUTAGE) else 0 for s in range(COUNT))


@mypyc_attr(native_class=False)  # (mypyc compiles no subclass of a builtin exception)
class IllegalTransition(RuntimeError):
    """A session step tried a state change the table does not allow: a bug in the session."""


def name(state: int) -> str:
    return ClientState(state).name.lower()
