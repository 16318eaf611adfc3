"""The Cafe's tables, created by whoever sets the demo up (the runner, a test), never by the app.

`cafe.orders_applied` is not the app's: it is the demo's instrument for "nothing twice". The unique
digest keeps `cafe.ordersraw` clean even if a transaction reached the database twice (the second
`INSERT ... ON CONFLICT DO NOTHING` is a silent no-op), so the table alone cannot show a double
replay. A BEFORE INSERT row trigger fires for every row an INSERT proposes, including rows that
ON CONFLICT then skips, and what it writes commits with the transaction: one row per INSERT
that reached the database. More than one row for a digest that was submitted once means the same
transaction was applied twice.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS cafe;

CREATE TABLE IF NOT EXISTS cafe.ordersraw (
    ordrid   serial PRIMARY KEY,
    ordrdgst char(20) UNIQUE NOT NULL,
    ordrname text NOT NULL,
    ordrppl  int NOT NULL,
    ordrdttm timestamptz NOT NULL,
    ordrtxt  text NOT NULL DEFAULT ''
);

CREATE TABLE IF NOT EXISTS cafe.messages (
    id         serial PRIMARY KEY,
    name       text NOT NULL,
    email      text NOT NULL,
    body       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS cafe.orders_applied (
    ordrdgst   char(20) NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS orders_applied_dgst ON cafe.orders_applied (ordrdgst);

-- SECURITY DEFINER: the app's role needs no right on the instrument table.
CREATE OR REPLACE FUNCTION cafe.note_order_applied() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    INSERT INTO cafe.orders_applied (ordrdgst) VALUES (NEW.ordrdgst);
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS ordersraw_applied ON cafe.ordersraw;
CREATE TRIGGER ordersraw_applied BEFORE INSERT ON cafe.ordersraw
    FOR EACH ROW EXECUTE FUNCTION cafe.note_order_applied();
"""

_GRANTS = """
GRANT USAGE ON SCHEMA cafe TO {role};
GRANT SELECT, INSERT ON cafe.ordersraw, cafe.messages TO {role};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA cafe TO {role};
"""


def install_schema(conninfo: str, app_role: str) -> None:
    """Create (idempotently) the Cafe's schema through a superuser `conninfo` on the writer and let
    `app_role` use it."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)
        conn.execute(sql.SQL(_GRANTS).format(role=sql.Identifier(app_role)))
