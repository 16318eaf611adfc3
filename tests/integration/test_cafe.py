"""The Cafe demo app through the sidecar while the database is up (demo_app/cafe).

The app runs in-process (Flask's test client) with its DSN pointing at a real sidecar in front of
the shared topology; every assertion about data is made on the writer directly.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient

from demo_app.cafe import create_app, install_schema, order_digest
from demo_app.stack import APP_PASSWORD, APP_USER
from tests.harness.pg import APP_DB, Topology


@pytest.fixture
def cafe(shared_topology: Topology, sidecar_factory) -> Iterator[Flask]:
    install_schema(shared_topology.a1.dsn(dbname=APP_DB), APP_USER)
    sidecar = sidecar_factory()
    app = create_app(f"postgresql+psycopg://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{sidecar.port}/{APP_DB}")
    app.testing = True
    yield app
    app.extensions["cafe_engine"].dispose()


def on_writer(topo: Topology, sql: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
    with psycopg.connect(topo.a1.dsn(dbname=APP_DB), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def book(client: FlaskClient, name: str, notes: str, when: str = "2031-07-14T20:15", people: str = "4"):
    return client.post("/reserve", data={"name": name, "people": people, "when": when, "notes": notes})


def test_pages_render(cafe: Flask) -> None:
    client = cafe.test_client()
    pages = (("/", b'action="/reserve"'), ("/orders", b'id="orders"'), ("/contact", b'id="send"'))
    for path, marker in pages:
        resp = client.get(path)
        assert resp.status_code == 200, path
        assert marker in resp.data, path


def test_order_booked_once_even_if_submitted_twice(cafe: Flask, shared_topology: Topology) -> None:
    client = cafe.test_client()
    name, notes = f"Ada {uuid.uuid4().hex[:8]}", "window seat, please"
    first = book(client, name, notes)
    second = book(client, name, notes)  # the browser re-POSTs the same form
    digest = order_digest(name, 4, datetime(2031, 7, 14, 20, 15, tzinfo=UTC), notes)
    for resp in (first, second):
        assert resp.status_code == 303
        assert f"ref={digest}" in resp.headers["Location"]
    thanks = client.get(first.headers["Location"])
    assert thanks.status_code == 200 and digest.encode() in thanks.data

    rows = on_writer(
        shared_topology,
        "SELECT ordrdgst, ordrname, ordrppl, ordrdttm, ordrtxt FROM cafe.ordersraw WHERE ordrname = %s",
        (name,),
    )
    assert rows == [(digest, name, 4, datetime(2031, 7, 14, 20, 15, tzinfo=UTC), notes)]
    # Both submissions reached the database; ON CONFLICT made the second one a no-op.
    applied = on_writer(
        shared_topology, "SELECT count(*) FROM cafe.orders_applied WHERE ordrdgst = %s", (digest,)
    )
    assert applied == [(2,)]

    listing = client.get("/orders")
    assert listing.status_code == 200
    assert name.encode() in listing.data and digest.encode() in listing.data


def test_different_orders_are_distinct_rows(cafe: Flask, shared_topology: Topology) -> None:
    client = cafe.test_client()
    name = f"Bob {uuid.uuid4().hex[:8]}"
    assert book(client, name, "", when="2031-07-15T19:00").status_code == 303
    assert book(client, name, "", when="2031-07-15T21:00").status_code == 303
    rows = on_writer(shared_topology, "SELECT count(*) FROM cafe.ordersraw WHERE ordrname = %s", (name,))
    assert rows == [(2,)]


def test_invalid_order_is_refused_without_a_row(cafe: Flask, shared_topology: Topology) -> None:
    client = cafe.test_client()
    name = f"Eve {uuid.uuid4().hex[:8]}"
    resp = book(client, name, "", people="0")
    assert resp.status_code == 400 and b"Party size" in resp.data
    count = "SELECT count(*) FROM cafe.ordersraw WHERE ordrname = %s"
    assert on_writer(shared_topology, count, (name,)) == [(0,)]


def test_contact_message_stored(cafe: Flask, shared_topology: Topology) -> None:
    client = cafe.test_client()
    body = f"Do you have oat milk? {uuid.uuid4().hex}"
    resp = client.post("/contact", data={"name": "Carol", "email": "carol@example.com", "body": body})
    assert resp.status_code == 200 and b'id="sent"' in resp.data
    rows = on_writer(
        shared_topology, "SELECT name, email, created_at FROM cafe.messages WHERE body = %s", (body,)
    )
    assert len(rows) == 1
    name, email, created_at = rows[0]
    assert (name, email) == ("Carol", "carol@example.com")
    assert isinstance(created_at, datetime)
    assert abs((datetime.now(UTC) - created_at).total_seconds()) < 60


def test_orders_page_is_a_read_only_transaction(cafe: Flask, shared_topology: Topology) -> None:
    """The list says it only reads (BEGIN READ ONLY, what lets the sidecar serve it from a replica);
    the pooled connection it used books the next table as usual (the setting does not stick)."""
    from sqlalchemy import event

    engine = cafe.extensions["cafe_engine"]
    seen: list[tuple[str, bool | None]] = []

    def note(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append((statement.split()[0].upper(), conn.connection.dbapi_connection.read_only))

    event.listen(engine, "before_cursor_execute", note)
    try:
        client = cafe.test_client()
        for _ in range(3):  # one pooled connection, reused: list, book, list, book, ...
            assert client.get("/orders").status_code == 200
            assert book(client, f"Ro {uuid.uuid4().hex[:8]}", "").status_code == 303
    finally:
        event.remove(engine, "before_cursor_execute", note)
    selects = [ro for verb, ro in seen if verb == "SELECT"]
    inserts = [ro for verb, ro in seen if verb == "INSERT"]
    assert selects and all(ro is True for ro in selects), seen
    assert len(inserts) == 3 and all(not ro for ro in inserts), seen
