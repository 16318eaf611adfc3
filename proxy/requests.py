"""What a request sent to a server was, for the answer owed if the server is lost before
answering it (ARCHITECTURE.md, Failover carry-over): a COMMIT's outcome is unknown (08007); so is
an autocommit write's; a read outside a transaction block is simply retried (40001).

A module of its own, below both the server (`InFlight` keeps the kinds) and the client (which
classifies what it sends), so that neither imports the other for three constants.
"""

from __future__ import annotations

from typing import Final

REQUEST_OTHER: Final = 0
REQUEST_COMMIT: Final = 1
REQUEST_READ: Final = 2


def merge_kinds(a: int | None, b: int) -> int:
    """The kind of a batch (statements up to one Sync): a COMMIT anywhere makes it a COMMIT; it
    is a read only if every statement is."""
    if a is None:
        return b
    if REQUEST_COMMIT in (a, b):
        return REQUEST_COMMIT
    return REQUEST_READ if a == b == REQUEST_READ else REQUEST_OTHER
