"""The DynamoDB source through unpatched boto3 over HTTP to moto's server (behind a proxy that can
throttle, legal_batch_tests/emulators/dynamodb.py): bounded pages and a cursor, unusable items reported
with their key, throttling backed off, statuses written back."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from legal_batch.sources.base import StatusUpdate
from legal_batch.sources.dynamodb import DynamoDBSource, dynamodb_client
from legal_batch_tests.emulators.dynamodb import DynamoDBServer

LINES = 230


@pytest.fixture
def server(monkeypatch):
    with DynamoDBServer() as running:
        for key, value in running.env().items():
            monkeypatch.setenv(key, value)
        yield running


@pytest.fixture
def table_name() -> str:
    """moto's state is per process, shared by every server it starts: one table name per test."""
    return f"receipt_lines_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def table(server, table_name):
    client = dynamodb_client()
    client.create_table(TableName=table_name, BillingMode="PAY_PER_REQUEST",
                        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                                   {"AttributeName": "sk", "KeyType": "RANGE"}],
                        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                              {"AttributeName": "sk", "AttributeType": "S"}])
    lines = [{"pk": {"S": f"IMAGE#{n // 10}"}, "sk": {"S": f"LINE#{n % 10:05d}"}, "text": {"S": f"MILK 2L {n}"},
              "price": {"N": "1.25"}, "quantity": {"N": "2"}} for n in range(LINES)]
    for start in range(0, LINES, 25):
        client.batch_write_item(RequestItems={table_name: [{"PutRequest": {"Item": item}}
                                                           for item in lines[start: start + 25]]})
    client.put_item(TableName=table_name, Item={"pk": {"S": "IMAGE#x"}, "sk": {"S": "LINE#notext"}})
    client.put_item(TableName=table_name, Item={"pk": {"S": "IMAGE#x"}, "sk": {"S": "LINE#number"}, "text": {"N": "42"}})
    client.put_item(TableName=table_name, Item={"pk": {"S": "IMAGE#x"}, "sk": {"S": "LINE#blank"}, "text": {"S": "  "}})
    client.put_item(TableName=table_name, Item={"pk": {"S": "IMAGE#y"}, "sk": {"S": "LINE#done"}, "text": {"S": "BREAD"},
                                           "embedding_status": {"S": "SUCCESS"}})
    client.put_item(TableName=table_name, Item={"pk": {"S": "IMAGE#y"}, "sk": {"S": "LINE#failed"},
                                           "text": {"S": "EGGS"}, "embedding_status": {"S": "FAILED"}})
    client.put_item(TableName=table_name, Item={"pk": {"S": "IMAGE#y"}, "sk": {"S": "LINE#retry"},
                                           "text": {"S": "TEA"}, "embedding_status": {"S": "RETRY"}})
    return client


def _drain(source: DynamoDBSource, *, page_budget: int):
    cursor, records, problems, calls = None, [], [], 0
    while True:
        page = source.scan(cursor=cursor, page_budget=page_budget)
        calls += 1
        assert page.pages <= page_budget
        records += page.records
        problems += page.problems
        cursor = page.cursor
        if cursor is None:
            return records, problems, calls


def test_scan_pages_under_a_budget_and_resumes_from_its_cursor(server, table, table_name):
    source = DynamoDBSource(table_name, page_size=25)
    first = source.scan(page_budget=2)
    assert first.pages == 2 and first.cursor is not None and first.scanned == 50
    records, problems, calls = _drain(source, page_budget=2)
    ids = [record.id for record in records]
    assert len(ids) == len(set(ids)) == LINES + 1  # every open line once, and the RETRY one
    assert calls >= (LINES + 6) // 50
    assert "IMAGE#3|LINE#00004" in ids and "IMAGE#y|LINE#retry" in ids
    assert "IMAGE#y|LINE#done" not in ids and "IMAGE#y|LINE#failed" not in ids
    line = next(r for r in records if r.id == "IMAGE#3|LINE#00004")
    assert line.text == "MILK 2L 34"
    assert line.metadata == {"pk": "IMAGE#3", "sk": "LINE#00004", "price": 1.25, "quantity": 2}
    assert len(line.change_marker) == 64

    reasons = {problem.id: problem.reason for problem in problems}
    assert reasons == {
        "IMAGE#x|LINE#notext": f"table {table_name}, key IMAGE#x|LINE#notext: no 'text' attribute",
        "IMAGE#x|LINE#number": f"table {table_name}, key IMAGE#x|LINE#number: 'text' is of type N, not a string",
        "IMAGE#x|LINE#blank": f"table {table_name}, key IMAGE#x|LINE#blank: 'text' is empty",
    }


def test_throttling_is_backed_off_and_never_fails_the_scan(server, table, table_name):
    source = DynamoDBSource(table_name, page_size=50)
    server.throttle("Scan", 3)  # within botocore's standard retries: backed off, then served
    page = source.scan(page_budget=1)
    assert server.throttled["Scan"] == 3 and page.pages == 1 and not page.throttled and len(page.records) == 50

    patient = DynamoDBSource(table_name, page_size=50, client=dynamodb_client(max_attempts=2))
    server.throttle("Scan", 100)  # beyond the retries: stop early, keep the cursor, no exception
    stalled = patient.scan(cursor=page.cursor, page_budget=3)
    assert stalled.throttled and stalled.pages == 0 and stalled.cursor == page.cursor and not stalled.records
    server.throttle("Scan", 0)
    resumed = patient.scan(cursor=stalled.cursor, page_budget=1)
    assert resumed.pages == 1 and not {r.id for r in resumed.records} & {r.id for r in page.records}


def test_statuses_are_written_back_and_done_items_leave_the_scan(server, table, table_name):
    source = DynamoDBSource(table_name, page_size=100)
    at = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    report = source.write_status([
        StatusUpdate("IMAGE#0|LINE#00001", model="text-embedding-3-small"),
        StatusUpdate("IMAGE#0|LINE#00002", error="openai batch_123 line 7: context_length_exceeded"),
        StatusUpdate("IMAGE#0|LINE#00003", error="chroma unreachable", retryable=True),
        StatusUpdate("IMAGE#y|LINE#retry", model="text-embedding-3-small"),
        StatusUpdate("IMAGE#9|LINE#gone", model="text-embedding-3-small"),
    ], at=at)
    assert report.written == 4
    assert [p.id for p in report.not_written] == ["IMAGE#9|LINE#gone"]
    assert "no longer exists" in report.not_written[0].reason

    def item(sk: str, pk: str = "IMAGE#0") -> dict:
        return table.get_item(TableName=table_name, Key={"pk": {"S": pk}, "sk": {"S": sk}})["Item"]

    done = item("LINE#00001")
    assert done["embedding_status"] == {"S": "SUCCESS"}
    assert done["embedding_status_model"] == {"S": "text-embedding-3-small"}
    assert done["embedding_status_at"] == {"S": "2025-03-01T12:00:00+00:00"}
    failed = item("LINE#00002")
    assert failed["embedding_status"] == {"S": "FAILED"}
    assert failed["embedding_status_error"] == {"S": "openai batch_123 line 7: context_length_exceeded"}
    assert item("LINE#00003")["embedding_status"] == {"S": "RETRY"}
    assert "embedding_status_error" not in item("LINE#retry", "IMAGE#y")
    assert table.get_item(TableName=table_name, Key={"pk": {"S": "IMAGE#9"}, "sk": {"S": "LINE#gone"}}).get("Item") is None

    records, problems, _ = _drain(source, page_budget=10)
    ids = {record.id for record in records}
    assert "IMAGE#0|LINE#00001" not in ids and "IMAGE#0|LINE#00002" not in ids
    assert "IMAGE#0|LINE#00003" in ids  # retryable: read again
    assert source.write_failed(problems).written == 3
    assert not _drain(source, page_budget=10)[1]  # reported once, marked FAILED, not read again


def test_throttled_status_writes_are_backed_off_or_returned_not_written(server, table, table_name):
    source = DynamoDBSource(table_name, client=dynamodb_client(max_attempts=3), write_concurrency=1)
    server.throttle("UpdateItem", 2)
    assert source.write_status([StatusUpdate("IMAGE#1|LINE#00001", model="m")]).written == 1
    server.throttle("UpdateItem", 3)
    report = source.write_status([StatusUpdate("IMAGE#1|LINE#00002", model="m")])
    assert report.written == 0
    assert "throttled beyond the retries; write it again later" in report.not_written[0].reason


def test_record_ids_round_trip_keys_with_separators(server, table_name):
    client = dynamodb_client()
    client.create_table(TableName=table_name, BillingMode="PAY_PER_REQUEST",
                        KeySchema=[{"AttributeName": "name", "KeyType": "HASH"}],
                        AttributeDefinitions=[{"AttributeName": "name", "AttributeType": "S"}])
    client.put_item(TableName=table_name, Item={"name": {"S": "ACME | Ltd 100%"}, "text": {"S": "ACME Limited"}})
    source = DynamoDBSource(table_name)
    (record,) = source.scan().records
    assert record.id == "ACME %7C Ltd 100%25"
    assert source.key(record.id) == {"name": {"S": "ACME | Ltd 100%"}}
    assert source.write_status([StatusUpdate(record.id, model="m")]).written == 1
    assert source.scan().records == []


def test_the_source_registry_names_its_module():
    from legal_batch.core.errors import UserError
    from legal_batch.sources.registry import source_module

    assert source_module("dynamodb").DynamoDBSource is DynamoDBSource
    with pytest.raises(UserError, match="unknown source 'kafka'"):
        source_module("kafka")
