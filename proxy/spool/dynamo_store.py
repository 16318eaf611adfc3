"""The fleet / multi-region spool: one DynamoDB table shared by every sidecar.

Single-table layout, partition key `pk` and sort key `sk` (both strings):

    pk = "pending"  sk = record id   body (record JSON), created_at
    pk = "dead"     sk = record id   body, created_at, error, sqlstate, failed_at
    pk = "lease"    sk = "replay"    owner, expires_at

Record ids sort by creation time, so a Query on a partition in sort-key order is FIFO. Every put
of a record is conditional (`attribute_not_exists`), so an id is never overwritten; moves between
partitions are TransactWriteItems, so a record is never in both or neither. (One partition per
state concentrates traffic on one partition key; a spool only sees traffic during an outage, far
below DynamoDB's per-partition limits for the write rates a sidecar fleet can acknowledge.)

boto3 is synchronous: every call runs on this store's own small thread pool, bounded by a
timeout, so the event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .. import logs
from .record import DeadLetter, SpoolRecord
from .store import SpoolRefused, SpoolStore, SpoolUnavailable

T = TypeVar("T")

PENDING = "pending"
DEAD = "dead"
LEASE_PK = "lease"
LEASE_SK = "replay"

# DynamoDB refuses items over 400 KB (names + values). A record must also still fit once it is a
# dead letter, which adds the error text (capped below) and a few small attributes.
ITEM_LIMIT = 400 * 1024
MAX_ERROR_CHARS = 2000
DEAD_LETTER_EXTRA = MAX_ERROR_CHARS * 4 + 256  # UTF-8 worst case of the error, plus the rest

CALL_TIMEOUT = 30.0  # one boto3 call, including botocore's own retries
TABLE_ACTIVE_TIMEOUT = 300.0


def _number_size(value: float) -> int:
    # DynamoDB stores numbers in a variable-width form of up to 21 bytes; counting the maximum
    # keeps the estimate on the safe side.
    return 21


def item_size(item: dict[str, dict[str, str]]) -> int:
    """The size DynamoDB charges an item (for S and N attributes), rounded up for numbers."""
    total = 0
    for name, value in item.items():
        total += len(name.encode())
        if "S" in value:
            total += len(value["S"].encode())
        elif "N" in value:
            total += _number_size(float(value["N"]))
        else:  # not used by this store; count generously
            total += len(str(value).encode())
    return total


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _cancellation_reasons(exc: BaseException) -> list[str]:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return []
    return [str(r.get("Code", "")) for r in response.get("CancellationReasons", [])]


class DynamoSpoolStore(SpoolStore):
    name = "dynamodb"

    def __init__(
        self,
        table: str,
        region: str,
        endpoint_url: str | None = None,
        create_table: bool = True,
        *,
        page_size: int | None = None,
        call_timeout: float = CALL_TIMEOUT,
        max_workers: int = 8,
    ) -> None:
        self.table = table
        self.region = region
        self.endpoint_url = endpoint_url
        self.create_table = create_table
        self.page_size = page_size  # Query page limit (None: DynamoDB's 1 MB pages)
        self.call_timeout = call_timeout
        self._max_workers = max_workers
        self._client: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # ---------------------------------------------------------------- plumbing

    def _where(self) -> str:
        return f"DynamoDB table {self.table!r} (region {self.region}" + (
            f", endpoint {self.endpoint_url})" if self.endpoint_url else ")"
        )

    async def _run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None, **kwargs: Any) -> T:
        """Run a blocking boto3 call on the pool; map AWS failures to SpoolUnavailable."""
        if self._pool is None:
            raise SpoolUnavailable("the spool store is not open")
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        try:
            async with asyncio.timeout(timeout or self.call_timeout):
                return await loop.run_in_executor(self._pool, call)
        except TimeoutError as exc:
            raise SpoolUnavailable(
                f"{self._where()}: no answer within {timeout or self.call_timeout:g}s"
            ) from exc

    def _unavailable(self, what: str, exc: BaseException) -> SpoolUnavailable:
        from botocore.exceptions import NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return SpoolUnavailable(
                f"{self._where()}: no AWS credentials found (environment, shared files, or instance role)"
            )
        logs.event(
            "spool_write_failed" if what.startswith("write") else "spool_read_failed",
            logs.ERROR,
            backend="dynamodb",
            table=self.table,
            operation=what,
            error=str(exc),
        )
        return SpoolUnavailable(f"{self._where()}: {what} failed: {exc}")

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._client is not None:
            return
        self._pool = concurrent.futures.ThreadPoolExecutor(
            self._max_workers, thread_name_prefix="spool-dynamo"
        )
        try:
            self._client = await self._run(self._make_client)
            await self._run(self._ensure_table, timeout=TABLE_ACTIVE_TIMEOUT)
        except BaseException:
            await self.close()
            raise

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            connect_timeout=5,
            read_timeout=10,
            # Standard mode retries throttling and 5xx with backoff; CALL_TIMEOUT bounds the total.
            retries={"max_attempts": 4, "mode": "standard"},
        )
        return boto3.session.Session().client("dynamodb", endpoint_url=self.endpoint_url, config=config)

    def _ensure_table(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client
        try:
            try:
                described = client.describe_table(TableName=self.table)["Table"]
            except ClientError as exc:
                if _error_code(exc) != "ResourceNotFoundException":
                    raise
                if not self.create_table:
                    raise SpoolUnavailable(
                        f"{self._where()} does not exist and spool.dynamodb.create_table is false: "
                        "create it with partition key 'pk' (string) and sort key 'sk' (string)"
                    ) from None
                self._create()
                described = client.describe_table(TableName=self.table)["Table"]
            keys = {k["AttributeName"]: k["KeyType"] for k in described.get("KeySchema", [])}
            if keys != {"pk": "HASH", "sk": "RANGE"}:
                raise SpoolUnavailable(
                    f"{self._where()} has key schema {keys}; the spool needs partition key 'pk' and "
                    "sort key 'sk' (strings): use another table name (spool.dynamodb.table)"
                )
            if described.get("TableStatus") != "ACTIVE":
                client.get_waiter("table_exists").wait(
                    TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": int(TABLE_ACTIVE_TIMEOUT)}
                )
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("opening the table", exc) from exc

    def _create(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.create_table(
                TableName=self.table,
                AttributeDefinitions=[
                    {"AttributeName": "pk", "AttributeType": "S"},
                    {"AttributeName": "sk", "AttributeType": "S"},
                ],
                KeySchema=[
                    {"AttributeName": "pk", "KeyType": "HASH"},
                    {"AttributeName": "sk", "KeyType": "RANGE"},
                ],
                # On demand: a spool is idle for months, then takes an outage's burst.
                BillingMode="PAY_PER_REQUEST",
            )
            logs.event("spool_table_created", backend="dynamodb", table=self.table, region=self.region)
        except ClientError as exc:
            if _error_code(exc) != "ResourceInUseException":  # another sidecar created it first
                raise
        self._client.get_waiter("table_exists").wait(
            TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": int(TABLE_ACTIVE_TIMEOUT)}
        )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        self._client = None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True)

    # ---------------------------------------------------------------- records

    @staticmethod
    def _record_item(pk: str, record: SpoolRecord, body: str) -> dict[str, dict[str, str]]:
        return {
            "pk": {"S": pk},
            "sk": {"S": record.id},
            "body": {"S": body},
            "created_at": {"N": repr(record.created_at)},
        }

    async def append(self, record: SpoolRecord) -> None:
        body = record.to_json()
        item = self._record_item(PENDING, record, body)
        size = item_size(item)
        if size + DEAD_LETTER_EXTRA > ITEM_LIMIT:
            # Refused before writing: DynamoDB would reject it anyway, and the client must hear
            # "not spooled" now rather than learn later that its acknowledged write was lost.
            raise SpoolRefused(
                f"transaction too large to spool in DynamoDB: {size} bytes "
                f"(an item holds at most {ITEM_LIMIT - DEAD_LETTER_EXTRA} bytes of record)"
            )
        await self._run(self._put_new, item, record.id)

    def _put_new(self, item: dict[str, dict[str, str]], record_id: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.transact_write_items(
                TransactItems=[
                    # The id must be new in pending *and* among the dead letters.
                    {
                        "Put": {
                            "TableName": self.table,
                            "Item": item,
                            "ConditionExpression": "attribute_not_exists(sk)",
                        }
                    },
                    {
                        "ConditionCheck": {
                            "TableName": self.table,
                            "Key": {"pk": {"S": DEAD}, "sk": {"S": record_id}},
                            "ConditionExpression": "attribute_not_exists(sk)",
                        }
                    },
                ]
            )
        except ClientError as exc:
            code = _error_code(exc)
            if code == "TransactionCanceledException" and "ConditionalCheckFailed" in _cancellation_reasons(
                exc
            ):
                raise SpoolRefused(f"spool record id {record_id} already exists") from None
            if code == "ValidationException":
                raise SpoolRefused(f"DynamoDB refused the record: {exc}") from None
            raise self._unavailable("write (append)", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("write (append)", exc) from exc

    def _query_all(self, pk: str, limit: int | None, select_count: bool = False) -> tuple[list[Any], int]:
        """Query one partition in sort-key order, following pages; (items, count)."""
        from botocore.exceptions import BotoCoreError, ClientError

        items: list[Any] = []
        counted = 0
        start: dict[str, Any] | None = None
        try:
            while True:
                kwargs: dict[str, Any] = {
                    "TableName": self.table,
                    "KeyConditionExpression": "pk = :pk",
                    "ExpressionAttributeValues": {":pk": {"S": pk}},
                    "ConsistentRead": True,  # an append acknowledged a moment ago must be seen
                    "ScanIndexForward": True,
                }
                if select_count:
                    kwargs["Select"] = "COUNT"
                page_limit = self.page_size
                if limit is not None:
                    remaining = limit - len(items)
                    page_limit = remaining if page_limit is None else min(page_limit, remaining)
                if page_limit is not None:
                    kwargs["Limit"] = page_limit
                if start is not None:
                    kwargs["ExclusiveStartKey"] = start
                page = self._client.query(**kwargs)
                counted += int(page.get("Count", 0))
                items.extend(page.get("Items", []))
                start = page.get("LastEvaluatedKey")
                if start is None or (limit is not None and len(items) >= limit):
                    return items, counted
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable(f"read ({pk})", exc) from exc

    async def pending(self, limit: int = 100) -> list[SpoolRecord]:
        if limit <= 0:
            return []
        items, _ = await self._run(self._query_all, PENDING, limit)
        return [SpoolRecord.from_json(item["body"]["S"]) for item in items]

    async def count(self) -> int:
        _, counted = await self._run(self._query_all, PENDING, None, True)
        return counted

    async def remove(self, record_id: str) -> None:
        await self._run(self._delete, PENDING, record_id)

    async def remove_many(self, record_ids: Sequence[str]) -> None:
        # BatchWriteItem takes 25 deletes per call: 25 times fewer round trips for a replayed chunk.
        batches = [record_ids[i : i + 25] for i in range(0, len(record_ids), 25)]
        await asyncio.gather(*(self._run(self._delete_batch, PENDING, batch) for batch in batches))

    def _delete_batch(self, pk: str, sks: Sequence[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        requests = [{"DeleteRequest": {"Key": {"pk": {"S": pk}, "sk": {"S": sk}}}} for sk in sks]
        try:
            for attempt in range(8):
                answer = self._client.batch_write_item(RequestItems={self.table: requests})
                requests = answer.get("UnprocessedItems", {}).get(self.table, [])
                if not requests:
                    return
                time.sleep(min(1.0, 0.05 * 2**attempt))  # throttled: back off, then the rest
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("write (remove)", exc) from exc
        raise SpoolUnavailable(f"{self._where()}: {len(requests)} removals still unprocessed after retries")

    def _delete(self, pk: str, sk: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_item(TableName=self.table, Key={"pk": {"S": pk}, "sk": {"S": sk}})
        except (ClientError, BotoCoreError) as exc:
            raise self._unavailable("write (remove)", exc) from exc

    async def dead_letter(self, record: SpoolRecord, error: str, sqlstate: str) -> None:
        item = self._record_item(DEAD, record, record.to_json())
        item["error"] = {"S": error[:MAX_ERROR_CHARS] or "unknown error"}  # DynamoDB refuses empty strings
        item["sqlstate"] = {"S": sqlstate or "XX000"}
        item["failed_at"] = {"N": repr(time.time())}
        await self._run(self._move, item, PENDING, record.id)

    def _move(self, item: dict[str, dict[str, str]], from_pk: str, record_id: str) -> bool:
        """Put `item` and delete (from_pk, id) in one transaction; False if the source was gone."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.transact_write_items(
                TransactItems=[
                    {
                        "Delete": {
                            "TableName": self.table,
                            "Key": {"pk": {"S": from_pk}, "sk": {"S": record_id}},
                            "ConditionExpression": "attribute_exists(sk)",
                        }
                    },
                    {"Put": {"TableName": self.table, "Item": item}},
                ]
            )
        except ClientError as exc:
            if _error_code(exc) == "TransactionCanceledException" and "ConditionalCheckFailed" in (
                _cancellation_reasons(exc)
            ):
                return False  # no longer there: someone else moved or removed it
            raise self._unavailable("write (move)", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("write (move)", exc) from exc
        return True

    async def dead_letters(self) -> list[DeadLetter]:
        items, _ = await self._run(self._query_all, DEAD, None)
        return [
            DeadLetter(
                SpoolRecord.from_json(item["body"]["S"]),
                item.get("error", {}).get("S", ""),
                item.get("sqlstate", {}).get("S", ""),
                float(item.get("failed_at", {}).get("N", "0")),
            )
            for item in items
        ]

    async def retry_dead_letters(self, ids: list[str] | None = None) -> int:
        items, _ = await self._run(self._query_all, DEAD, None)
        wanted = None if ids is None else set(ids)
        moved = 0
        for item in items:
            record_id = item["sk"]["S"]
            if wanted is not None and record_id not in wanted:
                continue
            back = {k: item[k] for k in ("sk", "body", "created_at")}
            back["pk"] = {"S": PENDING}
            if await self._run(self._move, back, DEAD, record_id):
                moved += 1
        return moved

    # ---------------------------------------------------------------- lease

    def _put_lease(self, owner: str, ttl: float, condition: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        now = time.time()
        try:
            self._client.put_item(
                TableName=self.table,
                Item={
                    "pk": {"S": LEASE_PK},
                    "sk": {"S": LEASE_SK},
                    "owner": {"S": owner},
                    "expires_at": {"N": repr(now + ttl)},
                },
                ConditionExpression=condition,
                ExpressionAttributeNames={"#owner": "owner", "#exp": "expires_at"}
                if "#exp" in condition
                else {"#owner": "owner"},
                ExpressionAttributeValues={":owner": {"S": owner}, ":now": {"N": repr(now)}}
                if ":now" in condition
                else {":owner": {"S": owner}},
            )
        except ClientError as exc:
            if _error_code(exc) == "ConditionalCheckFailedException":
                return False
            raise self._unavailable("write (lease)", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("write (lease)", exc) from exc
        return True

    async def acquire_lease(self, owner: str, ttl: float) -> bool:
        # Free, expired (wall clock: sidecars' clocks are assumed NTP-synced, well within a TTL),
        # or already ours.
        return await self._run(
            self._put_lease, owner, ttl, "attribute_not_exists(pk) OR #exp < :now OR #owner = :owner"
        )

    async def renew_lease(self, owner: str, ttl: float) -> bool:
        return await self._run(self._put_lease, owner, ttl, "#owner = :owner")

    async def release_lease(self, owner: str) -> None:
        await self._run(self._release, owner)

    def _release(self, owner: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_item(
                TableName=self.table,
                Key={"pk": {"S": LEASE_PK}, "sk": {"S": LEASE_SK}},
                ConditionExpression="#owner = :owner",
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={":owner": {"S": owner}},
            )
        except ClientError as exc:
            if _error_code(exc) != "ConditionalCheckFailedException":  # not ours any more: fine
                raise self._unavailable("write (lease)", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("write (lease)", exc) from exc
