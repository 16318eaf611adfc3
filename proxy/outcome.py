"""The commit-outcome ledger: the exact answer to "did this COMMIT commit?" after a failover.

A COMMIT whose answer never came (the writer crashed, the connection was cut) may or may not have
committed. To find out, the session runs, inside the client's transaction and just before its
COMMIT, `marker_statement(marker_id)`: a call of `pgsidecar.mark_commit(uuid)` that inserts the
marker id into `pgsidecar.commit_marker` when, and only when, the transaction has written (it has
a transaction id). The marker row commits or rolls back with the client's rows. After the cut, on
the confirmed new writer, `resolve()` looks the marker up: there means committed, not there means
not committed.

Why a marker and not `pg_xact_status(xid)`: an xid is a counter local to one timeline's history. A
standby promoted before it received the old writer's last WAL never saw the xid handed out there,
and hands the same numbers out again to its own new transactions: asked about the lost
transaction's xid, it answers about somebody else's transaction ("committed"), and the sidecar
would acknowledge a transaction that does not exist. The marker is a 128-bit id that nobody else
ever writes, in a row that exists only if that very transaction's commit record is part of the
new writer's history: looking it up cannot be confused by reuse.

Why "not there" on the confirmed new writer means "did not commit anywhere that counts": the
writer is confirmed only after fencing (an older timeline, or a second writer, is never used
again), and a promoted standby has replayed all the WAL it received before it accepts writes, so a
snapshot taken there afterwards sees every commit of the old timeline that will ever be part of
the cluster's history. A commit that reached only the old writer's disk (asynchronous standby, or
one that crashed before the synchronous standby confirmed) dies with the fenced timeline: replaying
the transaction once on the new writer is then the only copy that counts. One case is different:
the "new" writer is the same server, still running (a cut connection, a blip); the old backend
may then still be finishing the COMMIT, so `resolve` first terminates it and waits for it to be
gone (`old_backend_pid`), after which its transaction is settled one way or the other.

Functions, not grants on the table: the ledger is used as whatever user a pool logs in as, and
`mark_commit`, `commit_marked` and `prune_commit_markers` are SECURITY DEFINER functions that any
user may call. No application user can read the table, delete a fresh marker (which would turn a
committed transaction into a replayed, doubled one), or insert in a read-only transaction (a plain
`INSERT ... WHERE pg_current_xact_id_if_assigned() IS NOT NULL` fails there with 25006 even when it
would insert nothing, aborting the client's transaction: checked on PostgreSQL 15).

Marker ids are uuids: a random 64-bit prefix drawn once per process and a 64-bit counter, so they
are unique across sidecars and restarts (two processes collide only if they draw the same 64-bit
prefix) and never reused; 16 bytes fixed-width, the cheapest unique key PostgreSQL indexes, and
ascending within a process, so each sidecar's inserts land at one spot of the index rather than on
random pages as random uuids would.

Not on the data path: the session builds one marker per write COMMIT (`MarkerIds.next`, a counter
and a format), and this module's service runs availability checks and the pruner in the
background.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Literal, Protocol

from . import logs
from .outcome_answer import MarkerAnswer as MarkerAnswer  # (defined there: the server swallows it)
from .outcome_answer import MarkerIds as MarkerIds
from .outcome_answer import MarkerSource, _checked_id, pool_key
from .outcome_answer import marker_query as marker_query
from .outcome_answer import marker_statement as marker_statement
from .protocol import messages as m
from .protocol.sqlstate import ProxyError, SqlState, UpstreamUnavailable
from .server import ServerConnection, UpstreamError

if TYPE_CHECKING:
    from sidecar_config import Endpoint, SidecarConfig

    from .topology import ClusterState, TopologyMonitor

MARKER_TABLE: Final = "pgsidecar.commit_marker"
MARK_FUNCTION: Final = "pgsidecar.mark_commit(uuid)"

# Rows older than this are deleted by the pruner (floor: the prune function's own, below). A marker
# is read only while a COMMIT cut by a failover is resolved, which happens once the new writer is
# confirmed: within failover.hold_timeout (30 s by default) of the cut, or the client gets 57P03. An
# hour is far beyond any sane hold, and at 10,000 write transactions a second keeps the table at
# some 36 million small rows at most; the service takes max(this, 2 x hold_timeout + 60 s).
MARKER_RETENTION_SECONDS: Final = 3600.0
# How often the pruner runs on the writer.
PRUNE_INTERVAL_SECONDS: Final = 300.0
# Rows deleted per prune statement (its own short transaction), so a large backlog never holds
# long locks or makes one huge WAL record; and at most this many statements per run.
PRUNE_BATCH: Final = 10_000
PRUNE_MAX_BATCHES: Final = 1000
# An availability check that could not reach the writer is tried again after this long.
RECHECK_AFTER_SECONDS: Final = 5.0
# The ledger found missing or not usable (or a login for the check refused: a passthrough pool
# learns its password only at a client's login) is looked for again after this long.
UNAVAILABLE_RECHECK_SECONDS: Final = 60.0
# How long resolve() waits for an old backend on the same server to exit.
TERMINATE_WAIT_MS: Final = 5000

# Created by `pgsidecar init-db` with the spool ledger; idempotent. The prune function refuses to
# delete rows younger than 10 minutes whoever calls it, so granting it to PUBLIC cannot be used to
# erase the marker of a transaction still being resolved.
MARKER_DDL: Final = """
CREATE SCHEMA IF NOT EXISTS pgsidecar;
CREATE TABLE IF NOT EXISTS pgsidecar.commit_marker (
    id uuid PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON pgsidecar.commit_marker FROM PUBLIC;
CREATE OR REPLACE FUNCTION pgsidecar.mark_commit(marker uuid) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER AS $fn$
BEGIN
    -- Called at every writing COMMIT, so without a SET clause (a function-level search_path is
    -- set and undone at each call, about a sixth of the call's cost): instead every name is
    -- schema-qualified, so the caller's search_path cannot put its own objects in here.
    -- No xid: nothing was written, nothing to resolve. Read-only: the INSERT would fail (25006)
    -- and abort the client's transaction; such a transaction wrote only temporary tables.
    IF pg_catalog.pg_current_xact_id_if_assigned() IS NULL
        OR pg_catalog.current_setting('transaction_read_only')::pg_catalog.bool THEN
        RETURN false;
    END IF;
    INSERT INTO pgsidecar.commit_marker (id) VALUES (marker);
    RETURN true;
END
$fn$;
CREATE OR REPLACE FUNCTION pgsidecar.commit_marked(marker uuid) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM pgsidecar.commit_marker WHERE id = marker)
$fn$;
CREATE OR REPLACE FUNCTION pgsidecar.prune_commit_markers(older_than_seconds double precision, batch integer)
RETURNS integer
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    WITH gone AS (
        DELETE FROM pgsidecar.commit_marker WHERE id IN (
            SELECT id FROM pgsidecar.commit_marker
            WHERE at < now() - make_interval(secs => greatest(older_than_seconds, 600))
            LIMIT greatest(batch, 1)
            FOR UPDATE SKIP LOCKED)
        RETURNING 1)
    SELECT count(*)::integer FROM gone
$fn$;
GRANT USAGE ON SCHEMA pgsidecar TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgsidecar.mark_commit(uuid), pgsidecar.commit_marked(uuid),
    pgsidecar.prune_commit_markers(double precision, integer) TO PUBLIC;
"""

# One round trip: is everything there, and may this user call it? (has_function_privilege on a
# function that does not exist raises, hence the CASEs.)
AVAILABILITY_SQL: Final = (
    "SELECT to_regclass('pgsidecar.commit_marker') IS NOT NULL, "
    "array_to_string(ARRAY(SELECT f FROM unnest(ARRAY['pgsidecar.mark_commit(uuid)', "
    "'pgsidecar.commit_marked(uuid)', 'pgsidecar.prune_commit_markers(double precision,integer)']) AS f "
    "WHERE to_regprocedure(f) IS NULL), ', '), "
    "array_to_string(ARRAY(SELECT f FROM unnest(ARRAY['pgsidecar.mark_commit(uuid)', "
    "'pgsidecar.commit_marked(uuid)', 'pgsidecar.prune_commit_markers(double precision,integer)']) AS f "
    "WHERE to_regprocedure(f) IS NOT NULL AND NOT has_function_privilege(to_regprocedure(f), 'EXECUTE')), "
    "', '), current_user, current_database(), pg_is_in_recovery()"
)


# ---------------------------------------------------------------- marker ids and statement
# (In `proxy.outcome_answer`, compiled with the data path: a session draws an id and builds the
# marker's Query at every writing COMMIT.)

# ---------------------------------------------------------------- resolve, prune, availability


Outcome = Literal["committed", "not_committed"]


class OutcomeUnknown(ProxyError):
    """The outcome could not be established (the session answers 08007)."""

    sqlstate = SqlState.TRANSACTION_RESOLUTION_UNKNOWN
    fatal = False


async def resolve(
    conn: ServerConnection, marker_id: str, old_backend_pid: int | None = None, old_age: float | None = None
) -> Outcome:
    """Whether the transaction that wrote `marker_id` committed, asked on `conn`: a connection to
    the confirmed (fenced) writer, opened after the cut.

    `old_backend_pid`: pass it when that writer is the very server (same endpoint and timeline,
    postmaster not restarted) the transaction ran on, and only then (a pid elsewhere is someone
    else's backend): the old backend may still be committing, so it is terminated and waited for
    first. Raises OutcomeUnknown when it cannot be (or the node is not a writer), UpstreamError or
    another ProxyError when the question itself fails: both mean "unknown".

    `old_age`: with `old_backend_pid`, how many seconds ago the old connection was opened (the
    sidecar's own clock: a duration, so no two clocks are compared). If the server's postmaster
    started since, the server restarted (a crash, then recovery) and the old backend is gone
    with it: its pid, perhaps someone else's now, is left alone.
    """
    ident = _checked_id(marker_id)
    if old_backend_pid is not None and old_age is not None:
        restarted = await conn.simple_query(
            "SELECT pg_postmaster_start_time() > clock_timestamp() - "
            f"make_interval(secs => {max(0.0, float(old_age))!r})"
        )
        if restarted.rows and restarted.rows[0][0] == "t":
            old_backend_pid = None
    if old_backend_pid is not None:
        gone = await conn.simple_query(
            f"SELECT coalesce(bool_and(pg_terminate_backend(pid, {TERMINATE_WAIT_MS})), true) "
            f"FROM pg_stat_activity WHERE pid = {int(old_backend_pid)} AND pid <> pg_backend_pid()"
        )
        if not gone.rows or gone.rows[0][0] != "t":
            raise OutcomeUnknown(
                f"the old backend {old_backend_pid} did not exit within {TERMINATE_WAIT_MS} ms"
            )
    result = await conn.simple_query(f"SELECT pgsidecar.commit_marked('{ident}'::uuid), pg_is_in_recovery()")
    if not result.rows or result.rows[0][1] != "f":
        raise OutcomeUnknown("the node asked about a commit marker is not a writer")
    return "committed" if result.rows[0][0] == "t" else "not_committed"


async def prune(conn: ServerConnection, older_than_seconds: float, batch: int = PRUNE_BATCH) -> int:
    """Delete markers older than `older_than_seconds` (never younger than 10 minutes: the function's
    floor), `batch` rows per statement, each its own transaction; returns how many were deleted."""
    total = 0
    for _ in range(PRUNE_MAX_BATCHES):
        result = await conn.simple_query(
            f"SELECT pgsidecar.prune_commit_markers({float(older_than_seconds)!r}, {int(batch)})"
        )
        deleted = int(result.rows[0][0] or 0) if result.rows else 0
        total += deleted
        if deleted < batch:
            break
    return total


async def ensure_marker_ledger(conn: ServerConnection) -> None:
    """Create the marker table and its functions (idempotent; needs CREATE on the database)."""
    for attempt in range(3):
        try:
            await conn.simple_query(MARKER_DDL)
            return
        except UpstreamError as exc:
            # Two init-db at once: a catalog unique violation, or "tuple concurrently updated"
            # (XX000) on CREATE OR REPLACE FUNCTION; the next attempt finds it all in place.
            if attempt < 2 and exc.code in ("23505", "42P06", "42P07", "XX000"):
                continue
            raise


async def availability(conn: ServerConnection) -> str | None:
    """None when the ledger may be used on `conn` (as its user, in its database), else why not.
    Raises UpstreamUnavailable on a node in recovery (the question is for the writer)."""
    result = await conn.simple_query(AVAILABILITY_SQL)
    table, missing, refused, user, database, recovery = result.rows[0]
    if recovery == "t":
        # The writer is changing under the check: not an answer about the ledger (retried).
        raise UpstreamUnavailable("the node asked is in recovery, not the writer")
    if table != "t" or missing:
        return f"the ledger {MARKER_TABLE} is not installed in database {database}: run pgsidecar init-db"
    if refused:
        return (
            f'user "{user}" may not execute {refused} in database {database}: '
            "run pgsidecar init-db (it grants EXECUTE to PUBLIC)"
        )
    return None


# ---------------------------------------------------------------- the sidecar's service


class LedgerHost(Protocol):
    """What the service uses of the sidecar."""

    @property
    def config(self) -> SidecarConfig: ...

    @property
    def topology(self) -> TopologyMonitor: ...


Connector = Callable[[str, str], Awaitable[ServerConnection]]
"""(user, database) -> a logged-in connection to the current writer."""

READY: Final = "marker"


class CommitOutcomeLedger:
    """Knows, per (user, database) a pool serves, whether the marker may be used there, and keeps
    the marker tables pruned. Checks run at start (the probe user and database, which `init-db`
    prepares by default), for each new pool, and again after every change of writer."""

    def __init__(self, host: LedgerHost, connect: Connector) -> None:
        self._host = host
        self._connect = connect
        # What sessions ask at each writing COMMIT (compiled): kept in step with `_status` and
        # the config by `_set_status` and `recheck`.
        self.source = MarkerSource()
        self.source.enabled = self.enabled
        # (user, database) -> READY, "unchecked: ...", or "unavailable: ..." (why).
        self._status: dict[tuple[str, str], str] = {}
        self._to_check: set[tuple[str, str]] = set()
        self._retry_at: dict[tuple[str, str], float] = {}  # loop time a key may be checked again
        self._generation = 0  # bumped at each change of writer
        self._warned: set[tuple[str, str, str]] = set()  # logged once per (user, database, reason)
        self._unavailable: set[tuple[str, str]] = set()  # last found unavailable (to log its return)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_prune: float | None = None  # loop time of the last prune (None: prune at once)
        self.pruned = 0  # markers deleted by this process
        self.checks = 0  # availability checks completed

    @property
    def enabled(self) -> bool:
        return self._host.config.failover.commit_outcome == "marker"

    def ready(self, user: str, database: str) -> bool:
        """Whether the session may write a marker for this pool (and so resolve its COMMITs)."""
        return self.enabled and self._status.get((user, database)) == READY

    @property
    def ids(self) -> MarkerIds:
        return self.source.ids

    def new_marker(self, user: str, database: str) -> str | None:
        """A fresh marker id for a COMMIT of this pool's, or None when the ledger may not be used
        there (the COMMIT then goes without one, and a cut gets 08007 as before)."""
        return self.source.new_marker(pool_key(user, database))

    def _set_status(self, key: tuple[str, str], status: str) -> None:
        self._status[key] = status
        if status == READY:
            self.source.ready.add(pool_key(*key))
        else:
            self.source.ready.discard(pool_key(*key))

    async def resolve(
        self, user: str, database: str, marker_id: str, old_backend_pid: int | None = None
    ) -> Outcome:
        """`resolve` on a new connection to the current (confirmed) writer as the pool's user.
        Raises OutcomeUnknown (08007) for whatever keeps the answer from being known."""
        if self._host.topology.writer is None:
            raise OutcomeUnknown("no writer is known to ask whether the COMMIT committed")
        conn: ServerConnection | None = None
        failure: str
        try:
            conn = await self._connect(user, database)
            return await resolve(conn, marker_id, old_backend_pid)
        except OutcomeUnknown:
            raise
        except (ProxyError, OSError, TimeoutError) as exc:
            failure = str(exc) or type(exc).__name__
        finally:
            if conn is not None:
                conn.close("commit outcome resolved")
        raise OutcomeUnknown(f"could not ask the writer whether the COMMIT committed: {failure}")

    def status(self, user: str, database: str) -> str:
        if not self.enabled:
            return "off (config)"
        return self._status.get((user, database), "unchecked")

    def summary(self) -> str:
        """One value for SHOW TOPOLOGY: marker | off (config) | unavailable: ... | unchecked."""
        if not self.enabled:
            return "off (config)"
        problems = [
            f"{status} ({user}@{database})"
            for (user, database), status in sorted(self._status.items())
            if status.startswith("unavailable")
        ]
        if problems:
            return problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        if not self._status or any(status != READY for status in self._status.values()):
            return "unchecked"
        return READY

    def watch(self, user: str, database: str) -> None:
        """A pool for (user, database) exists: check it (once, then after each failover)."""
        key = (user, database)
        if key not in self._status:
            self._set_status(key, "unchecked")
            self._to_check.add(key)
            self._wake.set()

    def cluster_state_changed(
        self,
        previous: ClusterState,
        state: ClusterState,
        previous_writer: Endpoint | None,
        writer: Endpoint | None,
    ) -> None:
        """Topology listener: a new writer is checked again before any marker is sent to it (a
        marker call that fails aborts the client's transaction)."""
        if writer is not None and writer != previous_writer:
            self._generation += 1
            for key in self._status:
                self._set_status(key, "unchecked")
                self._to_check.add(key)
                self._retry_at.pop(key, None)
            self._wake.set()

    def recheck(self) -> None:
        """Check every pool again now (a reload: init-db may just have been run, or the marker
        turned on); what is usable stays usable meanwhile."""
        self._generation += 1
        self.source.enabled = self.enabled
        for key in self._status:
            self._to_check.add(key)
            self._retry_at.pop(key, None)
        self._wake.set()

    def start(self) -> None:
        config = self._host.config
        probe = (config.upstream.probe_user or "postgres", config.upstream.probe_database)
        self.watch(*probe)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="commit-outcome-ledger")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wake_at = [self._retry_at.get(key, now) for key in self._to_check]
            if self._last_prune is not None:
                wake_at.append(self._last_prune + PRUNE_INTERVAL_SECONDS)
            wait = max(0.0, min(wake_at, default=now + PRUNE_INTERVAL_SECONDS) - now)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            self._wake.clear()
            if not self.enabled or self._host.topology.writer is None:
                # Nothing to do until a writer is known (or the config turns the marker on):
                # wait for a nudge, or look again after a while.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECHECK_AFTER_SECONDS):
                        await self._wake.wait()
                continue
            try:
                now = loop.time()
                for key in sorted(self._to_check):
                    if self._retry_at.get(key, now) <= now:
                        await self._check(key)
                if self._last_prune is None or loop.time() - self._last_prune >= PRUNE_INTERVAL_SECONDS:
                    self._last_prune = loop.time()
                    await self._prune_all()
            except Exception as exc:  # a bug here must not end the loop (the data path goes on)
                logs.event("commit_outcome_check_failed", logs.ERROR, error=repr(exc))
                await asyncio.sleep(RECHECK_AFTER_SECONDS)

    async def _check(self, key: tuple[str, str]) -> None:
        user, database = key
        generation = self._generation  # a change of writer meanwhile asks for another check
        loop = asyncio.get_running_loop()
        conn: ServerConnection | None = None
        reason: str | None = None
        try:
            conn = await self._connect(user, database)
            reason = await availability(conn)
        except UpstreamError as exc:
            # PostgreSQL refused (login, a missing database...): not the ledger's fault, but the
            # marker cannot be used either. Asked again now and then, and after each failover.
            reason = f"cannot log in to check it: {m.error_summary(exc.fields)}"
        except (ProxyError, OSError, TimeoutError) as exc:
            # No answer at all (the writer is going away, a timeout): try again shortly.
            if generation == self._generation:
                self._set_status(key, f"unchecked: {exc.message if isinstance(exc, ProxyError) else exc}")
                self._retry_at[key] = loop.time() + RECHECK_AFTER_SECONDS
            return
        finally:
            if conn is not None:
                conn.close("commit outcome check done")
        if generation != self._generation:
            return  # the writer changed during the check: the next one counts
        self.checks += 1
        if reason is None:
            self._to_check.discard(key)
            self._retry_at.pop(key, None)
        else:
            # Looked at again now and then: an operator who runs init-db (or grants) after the
            # warning should not have to restart the sidecar. (RELOAD asks at once: `recheck`.)
            self._retry_at[key] = loop.time() + UNAVAILABLE_RECHECK_SECONDS
        if reason is None:
            if key in self._unavailable:
                self._unavailable.discard(key)
                logs.event("commit_outcome_available", user=user, database=database)
            self._set_status(key, READY)
            return
        self._set_status(key, f"unavailable: {reason}")
        self._unavailable.add(key)
        if (user, database, reason) not in self._warned:
            self._warned.add((user, database, reason))
            logs.event(
                "commit_outcome_unavailable",
                logs.WARNING,
                user=user,
                database=database,
                reason=reason,
                effect="a COMMIT cut by a failover gets 08007 (outcome unknown) instead of its outcome",
            )

    async def _prune_all(self) -> None:
        retention = max(MARKER_RETENTION_SECONDS, 2 * self._host.config.failover.hold_timeout + 60.0)
        done: set[str] = set()
        for (user, database), status in sorted(self._status.items()):
            if status != READY or database in done:
                continue
            done.add(database)
            conn: ServerConnection | None = None
            try:
                conn = await self._connect(user, database)
                deleted = await prune(conn, retention)
            except (ProxyError, OSError, TimeoutError) as exc:
                logs.event("commit_markers_prune_failed", logs.WARNING, database=database, error=str(exc))
                continue
            finally:
                if conn is not None:
                    conn.close("commit marker prune done")
            self.pruned += deleted
            if deleted:
                logs.event("commit_markers_pruned", database=database, deleted=deleted)
