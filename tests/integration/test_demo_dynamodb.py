"""The demo's local DynamoDB endpoint (demo_app/dynamodb_endpoint.py): concurrent transactional
writes, as the sidecar's spool and replayer send them during the drill, all succeed, and its
output goes to its own log file, not the demo's console.

(moto served threaded, as before, fails such a load: 51 of 480 transact_write_items got HTTP 500,
"dictionary changed size during iteration", each with a traceback on the demo's console.)
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import boto3
import pytest

from demo_app.stack import FAKE_AWS_ENV, LocalDynamoDB

WRITERS = 6
WRITES = 20


@pytest.fixture
def endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    dynamodb = LocalDynamoDB(tmp_path / "dynamodb.log")
    yield dynamodb
    dynamodb.stop()


def test_concurrent_transactional_writes_all_succeed_and_log_to_the_file(endpoint: LocalDynamoDB) -> None:
    client = boto3.client("dynamodb", endpoint_url=endpoint.endpoint_url)
    client.create_table(
        TableName="spool",
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                              {"AttributeName": "sk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        BillingMode="PAY_PER_REQUEST",
    )  # fmt: skip
    errors: list[str] = []

    def write(worker: int) -> None:
        own = boto3.client("dynamodb", endpoint_url=endpoint.endpoint_url)
        for i in range(WRITES):
            key = {"S": f"{worker}-{i}"}
            try:
                own.transact_write_items(TransactItems=[
                    {"Put": {"TableName": "spool", "Item": {"pk": {"S": "record"}, "sk": key},
                             "ConditionExpression": "attribute_not_exists(pk)"}},
                    {"Put": {"TableName": "spool", "Item": {"pk": {"S": "seq"}, "sk": key}}},
                ])  # fmt: skip
            except Exception as exc:
                errors.append(repr(exc)[:300])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, f"{len(errors)} failed, e.g. {errors[0]}"
    count = client.query(
        TableName="spool", KeyConditionExpression="pk = :p",
        ExpressionAttributeValues={":p": {"S": "record"}}, Select="COUNT",
    )["Count"]  # fmt: skip
    assert count == WRITERS * WRITES
    log = endpoint.log_path.read_text()
    assert '"POST / HTTP/1.1" 200' in log  # the request log is here, not on the console
    assert "Traceback" not in log
