"""The durable write spool (ARCHITECTURE.md, P5): records, stores (SQLite, DynamoDB) and the replayer.

While no writer exists, a transaction made only of simple INSERTs is acknowledged once a
`SpoolRecord` of it is durably appended to a `SpoolStore`; when a writer returns, a `Replayer`
applies the records in id order, exactly once (a ledger row in the same upstream transaction).
"""

from .backends import open_store
from .record import DeadLetter, SpooledStatement, SpoolRecord, new_record_id
from .store import SpoolError, SpoolRefused, SpoolStore, SpoolUnavailable

__all__ = [
    "DeadLetter",
    "SpoolError",
    "SpoolRecord",
    "SpoolRefused",
    "SpoolStore",
    "SpoolUnavailable",
    "SpooledStatement",
    "new_record_id",
    "open_store",
]
