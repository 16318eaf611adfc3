"""Whether a statement is a plain read: `is_plain_read(sql)` (it may go to a replica) and
`is_rerunnable_read(sql)` (it may also be sent a second time to another server).

Used where a statement is sent a second time to another server (a lone read cut by a failover, run
again on the new writer; a read sent to a replica): True only when running it has no effect
beyond its answer. Decided with pglast (PostgreSQL's own parser), conservatively: anything not
known to be harmless is refused.

True only for one SELECT / VALUES / TABLE statement (WITH included, when every CTE is itself a
plain SELECT) with:
* no locking clause (FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE: they write row locks),
* no INTO (SELECT INTO creates a table),
* no data-modifying CTE (INSERT / UPDATE / DELETE / MERGE anywhere in the tree),
* only functions of pg_catalog that are immutable or stable under every overload of their name
  (`proxy.pg_functions.FUNCTIONS`, generated from PostgreSQL 15's pg_proc), less a few stable
  ones with an effect (assigning a transaction id); any other function, schema-qualified outside
  pg_catalog or unknown (a user's function, dblink, an extension's), makes it False. `now()` is
  stable and allowed: run again, it gives the new run's time, which a client that got no answer
  cannot tell from the first;
* only operators of pg_catalog implemented by such functions (`OPERATORS`), and no TABLESAMPLE
  method that is volatile (`system`, `bernoulli` are).

Not seen from the text, so not checked: what a view, a rule or a row-level security policy on a
table read calls; a user function in a schema ahead of pg_catalog on the search_path with the name
of a built-in. Sessions that use such things should keep reads on the writer.

Answers are cached per SQL text (bounded LRU), so a statement seen before costs a dict lookup.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from mypy_extensions import mypyc_attr
from pglast import parse_sql
from pglast.ast import (
    A_Expr,
    DeleteStmt,
    FuncCall,
    InsertStmt,
    MergeStmt,
    Node,
    RangeTableSample,
    SelectStmt,
    String,
    UpdateStmt,
)
from pglast.enums import A_Expr_Kind
from pglast.visitors import Visitor

from .pg_functions import FUNCTIONS, OPERATORS

# How the lists in proxy/pg_functions.py are made (on PostgreSQL 15; one name per row).
CATALOG_SQL: Final = (
    "SELECT DISTINCT proname FROM pg_proc p WHERE pronamespace = 'pg_catalog'::regnamespace "
    "AND provolatile IN ('i','s') AND prokind <> 'p' AND NOT EXISTS (SELECT 1 FROM pg_proc q "
    "WHERE q.pronamespace = 'pg_catalog'::regnamespace AND q.proname = p.proname "
    "AND q.provolatile = 'v') ORDER BY 1",
    "SELECT DISTINCT oprname FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode "
    "WHERE o.oprnamespace = 'pg_catalog'::regnamespace AND p.provolatile IN ('i','s') ORDER BY 1",
)

# Stable in pg_proc, yet not free of effects: they assign the transaction an xid (which the
# commit-outcome marker and a replica both notice), or report one that a re-run cannot reproduce.
_EFFECTFUL_STABLE: Final = frozenset(
    {
        "txid_current",
        "pg_current_xact_id",
        "txid_current_if_assigned",
        "pg_current_xact_id_if_assigned",
    }
)
ALLOWED_FUNCTIONS: Final = FUNCTIONS - _EFFECTFUL_STABLE

# Volatile in pg_catalog, yet with no effect beyond their answer: a plain read may call them on a
# replica (the routing of reads), but a re-run would not give the answer the client already has
# part of, so `is_rerunnable_read` refuses them. (The replication functions are how a client,
# and the tests, ask where a read ran.)
_VOLATILE_READS: Final = frozenset(
    {
        "random",
        "clock_timestamp",
        "timeofday",
        "gen_random_uuid",
        "pg_is_in_recovery",
        "pg_last_wal_replay_lsn",
        "pg_last_wal_receive_lsn",
        "pg_last_xact_replay_timestamp",
        "pg_is_wal_replay_paused",
    }
)
READ_FUNCTIONS: Final = ALLOWED_FUNCTIONS | _VOLATILE_READS

# Statement texts cached; longer ones are classified every time (rare, and not worth keeping).
CACHE_SIZE: Final = 4096
CACHE_MAX_TEXT: Final = 16 * 1024

_OPERATOR_KINDS: Final = (A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_OP_ANY, A_Expr_Kind.AEXPR_OP_ALL)
_WRITES: Final = (InsertStmt, UpdateStmt, DeleteStmt, MergeStmt)


def is_rerunnable_read(sql: str) -> bool:
    """True only for a single plain read with no effect beyond its answer (see the module doc)."""
    if len(sql) > CACHE_MAX_TEXT:
        return _classify(sql, ALLOWED_FUNCTIONS)
    return _rerunnable(sql)


def is_plain_read(sql: str) -> bool:
    """As `is_rerunnable_read`, but the few volatile functions that only read (`random()`,
    `pg_is_in_recovery()`, ...) are allowed: the statement may run on a replica. Unparseable or
    several statements: False."""
    if len(sql) > CACHE_MAX_TEXT:
        return _classify(sql, READ_FUNCTIONS)
    return _plain(sql)


@lru_cache(maxsize=CACHE_SIZE)
def _rerunnable(sql: str) -> bool:
    return _classify(sql, ALLOWED_FUNCTIONS)


@lru_cache(maxsize=CACHE_SIZE)
def _plain(sql: str) -> bool:
    return _classify(sql, READ_FUNCTIONS)


def _classify(sql: str, functions: frozenset[str]) -> bool:
    try:
        statements = parse_sql(sql)
    except Exception:  # a syntax error: the server will say so; nothing to re-run
        return False
    if len(statements) != 1:
        return False
    stmt = statements[0].stmt
    if not isinstance(stmt, SelectStmt):
        return False
    checker = _ReadChecker(functions)
    checker(stmt)
    return checker.ok


def _catalog_name(names: tuple[Node, ...] | None) -> str | None:
    """The object's name if it is unqualified or in pg_catalog, else None."""
    if not names:
        return None
    parts = [part.sval for part in names if isinstance(part, String)]
    if len(parts) != len(names) or len(parts) > 2:
        return None
    if len(parts) == 2 and parts[0] != "pg_catalog":
        return None
    return str(parts[-1])


# Not a native class when compiled: pglast finds visit methods with inspect.ismethod.
@mypyc_attr(native_class=False)
class _ReadChecker(Visitor):
    def __init__(self, functions: frozenset[str]) -> None:
        super().__init__()
        self.functions = functions
        self.ok = True

    def visit(self, _ancestors: object, node: Node) -> None:
        if not self.ok:
            return
        if isinstance(node, _WRITES):
            self.ok = False
        elif isinstance(node, SelectStmt):
            if node.intoClause is not None or node.lockingClause:
                self.ok = False
        elif isinstance(node, FuncCall):
            name = _catalog_name(node.funcname)
            if name is None or name not in self.functions:
                self.ok = False
        elif isinstance(node, A_Expr):
            if node.kind in _OPERATOR_KINDS:
                op = _catalog_name(node.name)
                if op is None or op not in OPERATORS:
                    self.ok = False
        elif isinstance(node, RangeTableSample):
            method = _catalog_name(node.method)
            if method is None or method not in ALLOWED_FUNCTIONS:
                self.ok = False
