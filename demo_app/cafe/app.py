"""The Cafe: a plain Flask + SQLAlchemy 2 + psycopg 3 web app.

It knows nothing about failover, outages or the sidecar: its only configuration is a DSN (env
`CAFE_DSN`), there are no retries, and a database error becomes an error page. Whatever keeps
bookings flowing through a failover is the sidecar's doing, which is the point of the demo.

Writes are single `INSERT`s of bound parameters (and `now()`), without RETURNING, each in its own
`engine.begin()` transaction: the shape an ordinary app has, and the shape the sidecar's outage spool
accepts. The reservations list, which only reads, is a `READ ONLY` transaction: the usual way an
app lets its reads be served by a replica.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from typing import Any

from flask import Flask, redirect, render_template_string, request, url_for
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.wrappers import Response

from . import templates

MAX_NAME = 100
MAX_TEXT = 2000
MAX_PARTY = 20

# The digest makes a booking idempotent: the same form submitted twice (a double click, a browser
# re-POST) is the same row, and the second INSERT does nothing.
INSERT_ORDER = text(
    "INSERT INTO cafe.ordersraw (ordrdgst, ordrname, ordrppl, ordrdttm, ordrtxt)"
    " VALUES (:dgst, :name, :ppl, :dttm, :txt) ON CONFLICT (ordrdgst) DO NOTHING"
)
INSERT_MESSAGE = text(
    "INSERT INTO cafe.messages (name, email, body, created_at) VALUES (:name, :email, :body, now())"
)
LIST_ORDERS = text(
    "SELECT ordrid, ordrdgst, ordrname, ordrppl, ordrdttm, ordrtxt FROM cafe.ordersraw"
    " ORDER BY ordrid DESC LIMIT :limit"
)
COUNT_ORDERS = text("SELECT count(*) FROM cafe.ordersraw")


def order_digest(name: str, people: int, when: datetime, notes: str) -> str:
    """20 hex characters identifying an order by its fields."""
    canonical = "\x1f".join((name, str(people), when.astimezone(UTC).isoformat(), notes))
    return hashlib.blake2b(canonical.encode(), digest_size=10).hexdigest()


def parse_when(value: str) -> datetime:
    """A `datetime-local` form value (no zone). The Cafe keeps its book in UTC."""
    parsed = datetime.fromisoformat(value.strip())
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _order_form(form: Any) -> tuple[dict[str, Any] | None, list[str]]:
    errors: list[str] = []
    name = str(form.get("name", "")).strip()
    notes = str(form.get("notes", "")).strip()
    if not name or len(name) > MAX_NAME:
        errors.append(f"Please give a name (at most {MAX_NAME} characters).")
    try:
        people = int(form.get("people", ""))
        if not 1 <= people <= MAX_PARTY:
            raise ValueError
    except ValueError:
        errors.append(f"Party size must be a number from 1 to {MAX_PARTY}.")
        people = 0
    try:
        when = parse_when(str(form.get("when", "")))
    except ValueError:
        errors.append("Please pick a date and time.")
        when = datetime.now(UTC)
    if len(notes) > MAX_TEXT:
        errors.append(f"Notes are limited to {MAX_TEXT} characters.")
    if errors:
        return None, errors
    return {"name": name, "ppl": people, "dttm": when, "txt": notes,
            "dgst": order_digest(name, people, when, notes)}, []  # fmt: skip


def create_app(dsn: str | None = None) -> Flask:
    """The Cafe's WSGI app; `dsn` defaults to env `CAFE_DSN` (an SQLAlchemy URL or libpq DSN)."""
    dsn = dsn or os.environ.get("CAFE_DSN")
    if not dsn:
        raise RuntimeError("set CAFE_DSN, e.g. postgresql+psycopg://user:password@127.0.0.1:6432/appdb")
    if "://" not in dsn:
        # A libpq key=value string: hand it to psycopg untouched.
        url, connect_args = "postgresql+psycopg://", {"conninfo": dsn}
    else:
        url, connect_args = dsn.replace("postgresql://", "postgresql+psycopg://", 1), {}
    engine: Engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)

    app = Flask(__name__)
    app.extensions["cafe_engine"] = engine

    def page(body: str, status: int = 200, **context: Any) -> tuple[str, int]:
        return render_template_string(templates.LAYOUT.replace("{BODY}", body), **context), status

    @app.get("/")
    def reservation_form() -> tuple[str, int]:
        return page(templates.RESERVE, errors=[], form={})

    @app.post("/reserve")
    def reserve() -> Response | tuple[str, int]:
        order, errors = _order_form(request.form)
        if order is None:
            return page(templates.RESERVE, 400, errors=errors, form=request.form)
        with engine.begin() as conn:
            conn.execute(INSERT_ORDER, order)
        # Post/redirect/get; the thank-you page reads nothing from the database.
        return redirect(url_for("thanks", ref=order["dgst"], name=order["name"]), code=303)

    @app.get("/thanks")
    def thanks() -> tuple[str, int]:
        return page(templates.THANKS, ref=request.args.get("ref", ""), name=request.args.get("name", ""))

    @app.get("/orders")
    def orders() -> tuple[str, int]:
        # A page that only reads says so (BEGIN READ ONLY), as an app does when it has read replicas:
        # the database refuses a write here, and a proxy may send the transaction to a replica.
        with engine.connect().execution_options(postgresql_readonly=True) as conn:
            rows = conn.execute(LIST_ORDERS, {"limit": 200}).all()
            total = conn.execute(COUNT_ORDERS).scalar_one()
        return page(templates.ORDERS, rows=rows, total=total)

    @app.get("/contact")
    def contact_form() -> tuple[str, int]:
        return page(templates.CONTACT, errors=[], form={}, sent=False)

    @app.post("/contact")
    def contact() -> tuple[str, int]:
        form = request.form
        fields = {k: str(form.get(k, "")).strip() for k in ("name", "email", "body")}
        errors = [f"Please fill in {k}." for k, v in fields.items() if not v]
        if any(len(v) > MAX_TEXT for v in fields.values()):
            errors.append(f"Fields are limited to {MAX_TEXT} characters.")
        if errors:
            return page(templates.CONTACT, 400, errors=errors, form=form, sent=False)
        with engine.begin() as conn:
            conn.execute(INSERT_MESSAGE, fields)
        return page(templates.CONTACT, errors=[], form={}, sent=True)

    @app.errorhandler(SQLAlchemyError)
    def database_error(exc: SQLAlchemyError) -> tuple[str, int]:
        # The one concession to reality: say what went wrong instead of a bare 500.
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return page(templates.ERROR, 503, detail=detail[0] if detail else type(exc).__name__)

    return app
