"""The answer to a commit marker (`outcome.marker_query`), which the server connection swallows:
here, apart from the rest of `proxy.outcome`, so that `proxy.server` can use it without importing
the ledger service (which imports the server)."""

from __future__ import annotations

from .protocol import messages as m


class MarkerAnswer:
    """Recognises the answer to `marker_query`, which the session swallows (the client never
    asked for it): RowDescription, DataRow ('t' or 'f'), CommandComplete "SELECT 1",
    ReadyForQuery; or ErrorResponse then ReadyForQuery ('E').

    `feed` each backend message in order; it returns True at the ReadyForQuery that ends the
    answer. NotificationResponse and ParameterStatus are not part of the answer (PostgreSQL may
    send them at any time): `feed` ignores them and the session relays them as usual. NoticeResponse
    is swallowed (the client did not run this).

    After an error the transaction is aborted, and the client's COMMIT, already sent behind the
    marker, answers "ROLLBACK": the session must not relay that tag as it is but send the marker's
    ErrorResponse (`error`) in its place followed by the COMMIT's ReadyForQuery, as PostgreSQL does
    when a deferred constraint fails at COMMIT, so that the client knows nothing was committed.
    """

    __slots__ = ("done", "error", "marked")

    def __init__(self) -> None:
        self.marked: bool | None = None  # True: the marker row was written (the transaction had an xid)
        self.error: dict[str, str] | None = None  # the ErrorResponse's fields, if the call failed
        self.done = False

    def feed(self, type_byte: int, body: bytes | memoryview) -> bool:
        if self.done:
            raise ValueError("the marker's answer is already complete")
        if type_byte == m.B_DATA_ROW:
            values = m.decode_data_row(body)
            self.marked = len(values) == 1 and values[0] == b"t"
        elif type_byte == m.B_ERROR:
            self.error = m.decode_error_fields(body)
        elif type_byte == m.B_READY_FOR_QUERY:
            self.done = True
        elif type_byte not in (
            m.B_ROW_DESCRIPTION,
            m.B_COMMAND_COMPLETE,
            m.B_NOTICE,
            m.B_NOTIFICATION,
            m.B_PARAMETER_STATUS,
        ):
            raise ValueError(f"unexpected message {chr(type_byte)!r} in the answer to the commit marker")
        return self.done

    @staticmethod
    def passes_through(type_byte: int) -> bool:
        """A message that arrives during the marker's answer but belongs to the client."""
        return type_byte in (m.B_NOTIFICATION, m.B_PARAMETER_STATUS)
