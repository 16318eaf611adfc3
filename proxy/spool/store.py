"""The storage contract every spool backend implements, and the factory that picks one.

Semantics every backend guarantees (the replayer and the client path rely on them):
* `append` returns only once the record is durable; it never overwrites an existing id.
* `pending` lists records oldest id first (ids sort by creation time).
* `dead_letter` moves a record from pending to the dead letters atomically: it is never in both
  lists and never in neither.
* the lease is advisory mutual exclusion between replayers sharing one store (several sidecars
  on one DynamoDB table, or processes on one SQLite file); exactly-once does not depend on it
  (the upstream ledger does that), order and wasted work do.
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from .. import logs
from .record import DeadLetter, SpoolRecord


class SpoolError(Exception):
    """Base of the spool's own errors; the message is meant for an operator."""


class SpoolRefused(SpoolError):
    """This record can never be stored (too large, duplicate id): do not retry it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SpoolUnavailable(SpoolError):
    """The store cannot be reached or written right now (I/O error, throttling, network)."""


def owner_only(path: Path) -> None:
    """Take group and other permissions off `path` if it exists (best effort: a file owned by
    someone else is left as it is, and logged)."""
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
    except FileNotFoundError:
        return
    except OSError as exc:
        logs.event("spool_file_mode", logs.WARNING, path=str(path), error=exc.strerror or str(exc))


class SpoolStore(abc.ABC):
    """Async interface of a spool backend. Implementations never block the event loop."""

    name: str = "spool"

    @abc.abstractmethod
    async def open(self) -> None:
        """Create/verify the storage (file, tables); raise SpoolUnavailable with a clear message."""

    @abc.abstractmethod
    async def append(self, record: SpoolRecord) -> None:
        """Store `record` durably; returns once it would survive a crash of this host.

        Raises SpoolRefused for a record that can never be stored, SpoolUnavailable for a
        transient failure (the record may or may not have been stored in that case only if the
        failure came after the write was sent; the ledger makes a later replay safe either way).
        """

    @abc.abstractmethod
    async def pending(self, limit: int = 100) -> list[SpoolRecord]:
        """Up to `limit` pending records, oldest id first."""

    @abc.abstractmethod
    async def count(self) -> int:
        """Number of pending records."""

    @abc.abstractmethod
    async def remove(self, record_id: str) -> None:
        """Forget a pending record (it was applied upstream). Removing an absent id is a no-op."""

    async def remove_many(self, record_ids: Sequence[str]) -> None:
        """Forget several applied records; a backend may do it in one durable write."""
        await asyncio.gather(*(self.remove(record_id) for record_id in record_ids))

    @abc.abstractmethod
    async def dead_letter(self, record: SpoolRecord, error: str, sqlstate: str) -> None:
        """Move `record` from pending to the dead letters, atomically."""

    @abc.abstractmethod
    async def dead_letters(self) -> list[DeadLetter]:
        """All dead letters, oldest record id first."""

    @abc.abstractmethod
    async def retry_dead_letters(self, ids: list[str] | None = None) -> int:
        """Move dead letters (all, or those in `ids`) back to pending; returns how many moved."""

    @abc.abstractmethod
    async def acquire_lease(self, owner: str, ttl: float) -> bool:
        """Take the replay lease for `ttl` seconds if it is free, expired, or already `owner`'s."""

    @abc.abstractmethod
    async def renew_lease(self, owner: str, ttl: float) -> bool:
        """Extend `owner`'s lease by `ttl` from now; False if `owner` no longer holds it."""

    @abc.abstractmethod
    async def release_lease(self, owner: str) -> None:
        """Give the lease up if `owner` holds it."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources (threads, connections). Safe to call twice."""

    async def __aenter__(self) -> SpoolStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
