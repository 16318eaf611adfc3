"""The DynamoDB spool store against a real DynamoDB HTTP endpoint (moto's server on a free port)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import boto3
import pytest

from proxy.spool import SpooledStatement, SpoolRecord, SpoolRefused, SpoolUnavailable, open_store
from proxy.spool.dynamo_store import ITEM_LIMIT, DynamoSpoolStore
from sidecar_config.models import DynamoDBSpoolConfig, SpoolConfig

REGION = "us-east-1"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Fake credentials from the standard chain; no profile files, no instance metadata.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDPGSIDECARSPOOL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "pgsidecar-spool-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


def _table() -> str:
    return f"spool-{uuid.uuid4().hex[:10]}"


def _record(n: int, size: int = 8) -> SpoolRecord:
    stmt = SpooledStatement(
        "INSERT INTO t (a, b) VALUES ($1, $2)",
        (23, 17),
        (0, 1),
        (str(n).encode(), b"\x00" * size),
        "INSERT 0 1",
    )
    return SpoolRecord.new("app", "appdb", [stmt], {"TimeZone": "UTC"})


def _store(endpoint: str, table: str, **kwargs: object) -> DynamoSpoolStore:
    return DynamoSpoolStore(table, REGION, endpoint, **kwargs)  # type: ignore[arg-type]


def test_creates_table_and_keeps_fifo_over_many_pages(moto_endpoint: str) -> None:
    table = _table()

    async def main() -> None:
        store = await open_store(
            SpoolConfig(backend="dynamodb", dynamodb=DynamoDBSpoolConfig(table=table, region=REGION,
                                                                         endpoint_url=moto_endpoint))
        )  # fmt: skip
        assert isinstance(store, DynamoSpoolStore)
        store.page_size = 3  # force many Query pages
        try:
            records = [_record(i) for i in range(20)]
            # Appended concurrently and out of order: FIFO comes from the sort key.
            await asyncio.gather(*(store.append(r) for r in reversed(records)))
            assert await store.count() == 20
            assert await store.pending(100) == records
            assert await store.pending(7) == records[:7]
            await store.remove(records[0].id)
            await store.remove("no-such-id")  # absent: no error
            assert (await store.pending(1))[0] == records[1]
        finally:
            await store.close()

    asyncio.run(main())
    described = boto3.client("dynamodb", region_name=REGION, endpoint_url=moto_endpoint).describe_table(
        TableName=table
    )["Table"]
    assert described["TableStatus"] == "ACTIVE"
    assert {k["AttributeName"]: k["KeyType"] for k in described["KeySchema"]} == {"pk": "HASH", "sk": "RANGE"}


def test_fifo_across_dynamodb_1mb_pages(moto_endpoint: str) -> None:
    # Records of ~250 KB: four of them exceed DynamoDB's own 1 MB Query page.
    async def main() -> None:
        store = _store(moto_endpoint, _table())
        await store.open()
        try:
            records = [_record(i, size=180_000) for i in range(6)]
            for r in records:
                await store.append(r)
            assert [r.id for r in await store.pending(100)] == [r.id for r in records]
            assert await store.count() == 6
        finally:
            await store.close()

    asyncio.run(main())


def test_existing_table_is_reused_and_missing_table_is_a_clear_error(moto_endpoint: str) -> None:
    table = _table()

    async def main() -> None:
        with pytest.raises(SpoolUnavailable, match=rf"{table}.*does not exist.*create_table is false"):
            await _store(moto_endpoint, table, create_table=False).open()
        first = _store(moto_endpoint, table)
        await first.open()
        await first.append(_record(1))
        await first.close()
        again = _store(moto_endpoint, table, create_table=False)
        await again.open()
        assert await again.count() == 1
        await again.close()

    asyncio.run(main())


def test_duplicate_id_and_oversize_record_refused(moto_endpoint: str) -> None:
    async def main() -> None:
        store = _store(moto_endpoint, _table())
        await store.open()
        try:
            record = _record(1)
            await store.append(record)
            with pytest.raises(SpoolRefused, match="already exists"):
                await store.append(record)
            big = _record(2, size=ITEM_LIMIT)
            with pytest.raises(SpoolRefused, match="too large"):
                await store.append(big)
            # Just under the limit is stored, and still fits once dead-lettered with an error.
            fits = _record(3, size=270_000)
            await store.append(fits)
            await store.dead_letter(fits, "E" * 5000, "23505")
            assert [d.record for d in await store.dead_letters()] == [fits]
            # A dead-lettered id is not accepted as new either.
            with pytest.raises(SpoolRefused, match="already exists"):
                await store.append(fits)
            assert [r.id for r in await store.pending()] == [record.id]
        finally:
            await store.close()

    asyncio.run(main())


def test_dead_letters_and_retry(moto_endpoint: str) -> None:
    async def main() -> None:
        store = _store(moto_endpoint, _table())
        await store.open()
        try:
            records = [_record(i) for i in range(4)]
            for r in records:
                await store.append(r)
            await store.dead_letter(
                records[1], 'duplicate key value violates unique constraint "t_pkey"', "23505"
            )
            await store.dead_letter(records[2], 'relation "nope" does not exist', "42P01")
            await store.dead_letter(records[2], "again", "42P01")  # no longer pending: no-op
            assert await store.pending() == [records[0], records[3]]
            dead = await store.dead_letters()
            assert [(d.record, d.sqlstate) for d in dead] == [(records[1], "23505"), (records[2], "42P01")]
            assert dead[1].error == 'relation "nope" does not exist' and dead[1].failed_at > 0
            assert await store.retry_dead_letters([records[2].id]) == 1
            assert await store.pending() == [records[0], records[2], records[3]]
            assert await store.retry_dead_letters(None) == 1
            assert await store.dead_letters() == []
            assert await store.count() == 4
        finally:
            await store.close()

    asyncio.run(main())


def test_lease_exclusive_renewed_and_expires(moto_endpoint: str) -> None:
    table = _table()

    async def main() -> None:
        a, b = _store(moto_endpoint, table), _store(moto_endpoint, table)
        await a.open()
        await b.open()
        try:
            assert await a.acquire_lease("sidecar-a", 30)
            assert not await b.acquire_lease("sidecar-b", 30)
            assert await a.renew_lease("sidecar-a", 30)
            assert not await b.renew_lease("sidecar-b", 30)
            await b.release_lease("sidecar-b")  # not b's: no effect
            assert not await b.acquire_lease("sidecar-b", 30)
            await a.release_lease("sidecar-a")
            assert await b.acquire_lease("sidecar-b", 0.3)
            assert not await a.acquire_lease("sidecar-a", 30)
            await asyncio.sleep(0.5)
            assert await a.acquire_lease("sidecar-a", 30)  # b's expired
            assert not await b.renew_lease("sidecar-b", 30)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_unreachable_endpoint_is_unavailable(tmp_path: Path) -> None:
    from tests.harness.pg import free_port

    async def main() -> None:
        store = DynamoSpoolStore(_table(), REGION, f"http://127.0.0.1:{free_port()}", call_timeout=20)
        with pytest.raises(SpoolUnavailable, match="DynamoDB table"):
            await store.open()

    asyncio.run(main())
