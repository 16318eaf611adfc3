"""The SQLite spool store and the record format, against real files (no mocks)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.spool import (
    DeadLetter,
    SpooledStatement,
    SpoolRecord,
    SpoolRefused,
    SpoolUnavailable,
    new_record_id,
    open_store,
)
from proxy.spool.sqlite_store import SqliteSpoolStore
from sidecar_config.models import SpoolConfig


def _record(n: int = 0, values: tuple[bytes | None, ...] = (b"1",), user: str = "app") -> SpoolRecord:
    stmt = SpooledStatement(
        sql="INSERT INTO t (a) VALUES ($1)",
        param_oids=(23,),
        param_formats=(0,) * len(values),
        values=values,
        tag="INSERT 0 1",
    )
    return SpoolRecord.new(user, "appdb", [stmt], {"search_path": "public", "TimeZone": "UTC", "n": str(n)})


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# ---------------------------------------------------------------- record format


def test_record_ids_sort_in_creation_order_and_are_unique() -> None:
    ids = [new_record_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert len(ids[0].split("-")[0]) == 20


def test_statement_validates_formats() -> None:
    with pytest.raises(ValueError, match="param_formats"):
        SpooledStatement("INSERT INTO t VALUES ($1)", (), (), (b"x",))
    with pytest.raises(ValueError, match="0 or 1"):
        SpooledStatement("INSERT INTO t VALUES ($1)", (), (2,), (b"x",))


def test_from_json_rejects_garbage() -> None:
    for text in ("[]", "{}", '{"id": 1}', "not json"):
        with pytest.raises(ValueError):
            SpoolRecord.from_json(text)


_values = st.lists(st.one_of(st.none(), st.binary(max_size=64)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(
    sql=st.text(max_size=200),
    values=_values,
    binary=st.data(),
    settings_map=st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=5),
    user=st.text(min_size=1, max_size=30),
    created_at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_record_json_round_trip_is_exact(sql, values, binary, settings_map, user, created_at) -> None:
    formats = tuple(binary.draw(st.sampled_from((0, 1))) for _ in values)
    oids = tuple(binary.draw(st.integers(0, 0xFFFFFFFF)) for _ in values[: len(values) // 2])
    stmt = SpooledStatement(sql, oids, formats, tuple(values), "INSERT 0 1")
    record = SpoolRecord(new_record_id(), created_at, user, "db", settings_map, (stmt, stmt))
    text = record.to_json()
    assert text.isascii()
    assert record.size_bytes() == len(text.encode())
    assert SpoolRecord.from_json(text) == record


# ---------------------------------------------------------------- sqlite store


def test_durable_across_reopen_and_fifo(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "spool.db"  # parent directories are created
    records = [_record(i, (bytes([i, 0, 255]), None)) for i in range(20)]

    async def write() -> None:
        store = SqliteSpoolStore(path)
        await store.open()
        for r in reversed(records):  # appended out of order: pending() still sorts by id
            await store.append(r)
        await store.close()

    async def read() -> tuple[list[SpoolRecord], int, list[SpoolRecord]]:
        store = SqliteSpoolStore(path)
        await store.open()
        try:
            return await store.pending(100), await store.count(), await store.pending(5)
        finally:
            await store.close()

    run(write())
    # The file is a real SQLite database in WAL mode with synchronous=FULL at the writer.
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    pending, count, first5 = run(read())
    assert pending == records
    assert count == 20
    assert first5 == records[:5]


def test_concurrent_appends_are_group_committed(tmp_path: Path) -> None:
    async def main() -> tuple[int, int, int]:
        store = SqliteSpoolStore(tmp_path / "spool.db")
        await store.open()
        try:
            records = [_record(i) for i in range(300)]
            await asyncio.gather(*(store.append(r) for r in records))
            return store.commits, store.appends, await store.count()
        finally:
            await store.close()

    commits, appends, count = run(main())
    assert appends == 300 and count == 300
    assert 1 <= commits < 300


def test_duplicate_id_refused_and_others_in_same_group_commit(tmp_path: Path) -> None:
    async def main() -> list[object]:
        store = SqliteSpoolStore(tmp_path / "spool.db")
        await store.open()
        try:
            first = _record(1)
            await store.append(first)
            others = [_record(i) for i in range(5)]
            results = await asyncio.gather(
                store.append(first), *(store.append(r) for r in others), return_exceptions=True
            )
            assert await store.count() == 6
            return list(results)
        finally:
            await store.close()

    results = run(main())
    assert isinstance(results[0], SpoolRefused)
    assert results[1:] == [None] * 5


def test_too_large_refused(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteSpoolStore(tmp_path / "spool.db", max_record_bytes=10_000)
        await store.open()
        try:
            with pytest.raises(SpoolRefused, match="too large"):
                await store.append(_record(0, (b"x" * 20_000,)))
            assert await store.count() == 0
        finally:
            await store.close()

    run(main())


def test_dead_letter_and_retry(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteSpoolStore(tmp_path / "spool.db")
        await store.open()
        try:
            records = [_record(i) for i in range(4)]
            for r in records:
                await store.append(r)
            await store.dead_letter(records[1], "duplicate key value", "23505")
            await store.dead_letter(records[2], "relation does not exist", "42P01")
            assert await store.pending() == [records[0], records[3]]
            dead = await store.dead_letters()
            assert [d.record for d in dead] == [records[1], records[2]]
            assert isinstance(dead[0], DeadLetter)
            assert (dead[0].error, dead[0].sqlstate) == ("duplicate key value", "23505")
            assert dead[0].failed_at > 0
            # A dead-lettered id cannot be appended again.
            with pytest.raises(SpoolRefused):
                await store.append(records[1])
            # Dead-lettering something no longer pending is a no-op.
            await store.remove(records[3].id)
            await store.dead_letter(records[3], "x", "XX000")
            assert len(await store.dead_letters()) == 2
            assert await store.retry_dead_letters([records[2].id, "no-such-id"]) == 1
            assert await store.pending() == [records[0], records[2]]
            assert await store.retry_dead_letters() == 1
            assert await store.pending() == records[:3]
            assert await store.dead_letters() == []
        finally:
            await store.close()

    run(main())


def test_lease_exclusive_between_two_stores_on_one_file(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"

    async def main() -> None:
        a, b = SqliteSpoolStore(path), SqliteSpoolStore(path)
        await a.open()
        await b.open()
        try:
            assert await a.acquire_lease("a", 30)
            assert not await b.acquire_lease("b", 30)
            assert await a.acquire_lease("a", 30)  # re-entrant for its owner
            assert await a.renew_lease("a", 30)
            assert not await b.renew_lease("b", 30)
            await b.release_lease("b")  # not b's: no effect
            assert not await b.acquire_lease("b", 30)
            await a.release_lease("a")
            assert await b.acquire_lease("b", 0.2)
            assert not await a.acquire_lease("a", 30)
            await asyncio.sleep(0.3)  # b's lease expires
            assert await a.acquire_lease("a", 30)
            assert not await b.renew_lease("b", 30)
            # Both stores see each other's appends.
            await a.append(_record(1))
            assert await b.count() == 1
        finally:
            await a.close()
            await b.close()

    run(main())


def test_unusable_path_gives_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    async def main() -> None:
        with pytest.raises(SpoolUnavailable, match=r"spool\.path"):
            await SqliteSpoolStore(blocker / "spool.db").open()
        store = SqliteSpoolStore(tmp_path / "x.db")
        with pytest.raises(SpoolUnavailable, match="not open"):
            await store.append(_record())

    run(main())


def test_open_store_factory(tmp_path: Path) -> None:
    async def main() -> None:
        assert await open_store(SpoolConfig(backend="none")) is None
        store = await open_store(SpoolConfig(backend="sqlite", path=tmp_path / "f.db"))
        assert isinstance(store, SqliteSpoolStore)
        await store.append(_record())
        assert await store.count() == 1
        await store.close()
        await store.close()  # twice is fine

    run(main())
