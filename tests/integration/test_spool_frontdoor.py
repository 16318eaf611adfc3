"""The degraded path end to end with real parts: the front door is filled from real PostgreSQL,
real drivers (SQLAlchemy 2 + psycopg, psycopg 3 autocommit/transactions/pipeline, pg8000) are
served entirely by OutageResponder behind a tiny asyncio server, and the records they produce are
replayed on the real PostgreSQL, where the rows land with the pinned timestamps."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pg8000.dbapi
import pg8000.native
import psycopg
import pytest
from sqlalchemy import create_engine, text

from proxy.protocol import messages as m
from proxy.protocol.framing import MessageReader
from proxy.server import TlsSettings, connect
from proxy.spool.classify import Classifier
from proxy.spool.frontdoor import FrontDoorCache, fill_from_server, split_messages
from proxy.spool.outage import OutageResponder, Store, Unspoolable
from proxy.spool.record import SpoolRecord
from sidecar_config.units import Endpoint
from tests.harness import pg

USER, DB = "app_scram", "appdb"
PASSWORD = pg.USERS[USER]
AT = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


class OutageServer:
    """Speaks startup (trust) with the cached ParameterStatus, then lets OutageResponder answer
    everything; Store verdicts are 'stored' at once, Unspoolable ones refused at once."""

    def __init__(self, cache: FrontDoorCache, tables: list[str]) -> None:
        self.cache = cache
        self.classifier = Classifier(tables)
        self.records: list[SpoolRecord] = []
        self.refusals: list[str] = []
        self.ids = itertools.count(1)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> OutageServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = MessageReader(1 << 20)
        startup = None
        while startup is None:
            frames.feed(await reader.read(65536))
            body = frames.read_startup()
            if body is None:
                continue
            packet = m.decode_startup(body)
            if packet.code in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE):
                writer.write(b"N")
                continue
            startup = packet.params
        params = self.cache.startup_parameters(startup["user"], startup.get("database", ""), startup)
        assert params is not None
        writer.write(
            m.auth_ok()
            + b"".join(m.parameter_status(k, v) for k, v in params.items())
            + m.backend_key_data(4242, 1)
            + m.ready_for_query()
        )
        responder = OutageResponder(
            self.cache, self.classifier, startup["user"], startup.get("database", ""),
            {k: v for k, v in startup.items() if k not in ("user", "database")},
            clock=lambda: AT, new_id=lambda: f"{next(self.ids):06d}",
        )  # fmt: skip
        while True:
            msg = frames.read_message()
            if msg is None:
                data = await reader.read(65536)
                if not data:
                    break
                frames.feed(data)
                continue
            type_byte, body = msg
            if type_byte == m.F_TERMINATE:
                break
            reply = responder.feed(type_byte, body)
            out = reply.data
            while reply.verdict is not None:
                if isinstance(reply.verdict, Store):
                    self.records.append(reply.verdict.record)
                    reply = responder.stored()
                    out += reply.data
                else:
                    assert isinstance(reply.verdict, Unspoolable)
                    self.refusals.append(reply.verdict.reason)
                    out += responder.refuse(reply.verdict.reason)
                    break
            writer.write(out)
        writer.close()


@pytest.fixture(scope="module")
def table(shared_topology: pg.Topology) -> Iterator[str]:
    name = f"spool_it_{secrets.token_hex(4)}"
    shared_topology.a1.execute(
        f"CREATE TABLE {name} (id int PRIMARY KEY, name text, at timestamptz DEFAULT now(), "
        f"local_at timestamp, day date, amount numeric, data bytea)",
        dbname=DB,
    )
    shared_topology.a1.execute(f"GRANT ALL ON {name} TO {USER}", dbname=DB)
    yield name
    shared_topology.a1.execute(f"DROP TABLE {name}", dbname=DB)


@pytest.fixture(scope="module")
def cache(shared_topology: pg.Topology, tmp_path_factory: pytest.TempPathFactory) -> FrontDoorCache:
    node = shared_topology.a1
    path = tmp_path_factory.mktemp("frontdoor") / "frontdoor.json"

    async def fill() -> FrontDoorCache:
        fresh = FrontDoorCache(path)
        server = await connect(
            Endpoint(node.host, node.port), {"user": USER, "database": DB}, PASSWORD,
            tls=TlsSettings("disable"), timeout=10, max_message_size=1 << 20,
        )  # fmt: skip
        try:
            stored = await fill_from_server(fresh, server, USER, DB)
        finally:
            server.close("done")
        assert stored == len(fresh.known_queries()) + len(fresh.known_extended())
        fresh.save()
        return fresh

    asyncio.run(fill())
    # What the clients below are served is what a restarted sidecar reads back from the file.
    return FrontDoorCache.load(path)


def test_fill_stores_what_postgresql_sends(shared_topology: pg.Topology, cache: FrontDoorCache) -> None:
    node = shared_topology.a1
    params = cache.parameters(USER, DB)
    assert params is not None
    assert params["server_version"].startswith("15") and params["integer_datetimes"] == "on"
    assert params["session_authorization"] == USER
    with psycopg.connect(node.dsn(user=USER, dbname=DB, password=PASSWORD)) as conn:
        version = conn.execute("select pg_catalog.version()").fetchone()
        schema = conn.execute("select current_schema()").fetchone()
    assert version is not None and schema is not None
    answer = cache.answer(USER, DB, "select  pg_catalog.version() ;")  # whitespace-insensitive
    assert answer is not None
    (t, desc), (d, row), (c, done) = [(chr(k), raw[5:]) for k, raw in split_messages(answer)]
    assert (t, d, c) == ("T", "D", "C")
    assert m.decode_row_description(desc) == ["version"]
    assert m.decode_data_row(row) == [version[0].encode()]
    assert m.decode_command_complete(done) == "SELECT 1"
    # Byte-exact: the same query through a raw trust connection gives the same messages.
    raw = socket.create_connection((node.host, node.port), timeout=10)
    try:
        raw.sendall(m.startup_message({"user": "app_trust", "database": DB}))
        got = _read_until_ready(raw)
        raw.sendall(m.query("select current_schema()"))
        got = _read_until_ready(raw)
    finally:
        raw.close()
    assert got[: -len(m.ready_for_query())] == cache.answer(USER, DB, "select current_schema()")


def _read_until_ready(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        assert chunk
        data += chunk
        parts = split_messages(data)
        if parts and parts[-1][0] == m.B_READY_FOR_QUERY and sum(len(p) for _, p in parts) == len(data):
            return data


def test_drivers_served_by_outage_responder_then_replayed(
    shared_topology: pg.Topology, cache: FrontDoorCache, table: str
) -> None:
    with OutageServer(cache, [table]) as fake:
        port = fake.port
        url = f"postgresql+psycopg://{USER}:x@127.0.0.1:{port}/{DB}"
        # SQLAlchemy 2 + psycopg: engine initialization (version, schema, isolation level, hstore
        # TypeInfo in a savepoint), pre-ping, a transaction with one and with many parameter sets.
        engine = create_engine(url, pool_pre_ping=True)
        with engine.begin() as conn:
            conn.execute(
                text(f"INSERT INTO {table} (id, name, at) VALUES (:i, :n, now())"), {"i": 1, "n": "sa"}
            )
            conn.execute(
                text(f"INSERT INTO {table} (id, name, amount) VALUES (:i, :n, :a)"),
                [{"i": 2, "n": "sa2", "a": 1.5}, {"i": 3, "n": "sa3", "a": 2}],
            )
        # pre-ping on checkout, then a SELECT: refused with 57P03
        with engine.connect() as conn, pytest.raises(Exception, match=r"57P03|no database writer"):
            conn.execute(text(f"SELECT * FROM {table}"))
        engine.dispose()
        assert len(fake.records) == 1 and len(fake.records[0].statements) == 3

        dsn = f"host=127.0.0.1 port={port} user={USER} dbname={DB} sslmode=disable"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {table} (id, name, data, local_at, day) "
                "VALUES (%s, %s, %s, localtimestamp, current_date)",
                (4, "auto", b"\x00\xff"),
            )
            with conn.transaction():
                conn.execute(f"INSERT INTO {table} (id, name) VALUES (%s, %s)", (5, "tx"))
                conn.execute(f"INSERT INTO {table} (id, name) VALUES (%s, %s)", (6, "tx"))
            with conn.pipeline():
                conn.execute(f"INSERT INTO {table} (id, name) VALUES (%s, %s)", (7, "pipe"))
                conn.execute(f"INSERT INTO {table} (id, name) VALUES (%s, %s)", (8, "pipe"))
            with pytest.raises(psycopg.errors.CannotConnectNow):
                conn.execute("select count(*) from pg_class")
        with psycopg.connect(dsn) as conn:  # not autocommit: psycopg sends BEGIN ... COMMIT
            conn.execute(f"INSERT INTO {table} (id, name) VALUES (%s, %s)", (9, "implicit-begin"))
        assert len(fake.records) == 5

        p = pg8000.dbapi.connect(user=USER, password="x", host="127.0.0.1", port=port, database=DB)
        cur = p.cursor()
        cur.execute(f"INSERT INTO {table} (id, name, at) VALUES (%s, %s, %s)", (10, "pg8000", AT))
        p.commit()
        p.close()
        native = pg8000.native.Connection(USER, password="x", host="127.0.0.1", port=port, database=DB)
        native.run(f"INSERT INTO {table} (id, name) VALUES (:i, :n)", i=11, n="native")
        native.close()
        records = list(fake.records)
        refusals = list(fake.refusals)

    assert len(records) == 7
    assert refusals == ["SELECT is not a simple INSERT", "SELECT is not a simple INSERT"]
    assert [len(r.statements) for r in records] == [3, 1, 2, 2, 1, 1, 1]
    for record in records:
        assert record.settings["TimeZone"] and record.settings["DateStyle"]
    _replay(shared_topology.a1, records)

    rows = {
        r[0]: r[1:]
        for r in shared_topology.a1.query(
            f"SELECT id, name, at, local_at, day, amount, data FROM {table} ORDER BY id", dbname=DB
        )
    }
    assert sorted(rows) == list(range(1, 12))
    assert rows[1][1] == AT  # now() pinned to the spool time
    assert rows[2][4] == 1.5 and rows[3][4] == 2
    tz = records[1].settings["TimeZone"]
    assert rows[4][2] == AT.astimezone(_zone(tz)).replace(tzinfo=None)  # localtimestamp pinned
    assert rows[4][3] == AT.astimezone(_zone(tz)).date()
    assert bytes(rows[4][5]) == b"\x00\xff"
    assert rows[10][1] == AT and rows[11][0] == "native"


def _zone(name: str) -> dt.tzinfo:
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def _replay(node: pg.PgNode, records: list[SpoolRecord]) -> None:
    """A minimal replayer: one transaction per record, the record's settings SET LOCAL, each
    statement with its raw parameter bytes, types and formats exactly as the client sent them."""
    with psycopg.connect(node.dsn(user=USER, dbname=DB, password=PASSWORD), autocommit=True) as conn:
        pgconn = conn.pgconn
        for record in records:
            conn.execute("BEGIN")
            for name, value in record.settings.items():
                conn.execute("SELECT set_config(%s, %s, true)", (name, value))
            for stmt in record.statements:
                oids = list(stmt.param_oids) + [0] * (len(stmt.values) - len(stmt.param_oids))
                result = pgconn.exec_params(
                    stmt.sql.encode(), list(stmt.values), oids, list(stmt.param_formats)
                )
                assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
                assert result.command_status is not None
                assert result.command_status.decode() == stmt.tag
            conn.execute("COMMIT")


def test_cache_file_round_trip(cache: FrontDoorCache, tmp_path: Path) -> None:
    target = tmp_path / "copy.json"
    cache.save(target)
    again = FrontDoorCache.load(target)
    for sql in cache.known_queries():
        assert again.answer(USER, DB, sql) == cache.answer(USER, DB, sql)
    assert again.parameters(USER, DB) == cache.parameters(USER, DB)
    assert FrontDoorCache.load(tmp_path / "missing.json").parameters(USER, DB) is None
