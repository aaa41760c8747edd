"""The DynamoDB source (the receipt-line pattern): a table of items with a key, a text attribute and an
embedding-status attribute.

`scan` reads items whose status is neither `SUCCESS` nor `FAILED`, at most `page_budget` pages of
`page_size` items a call (`Scan` with `Limit`, `ExclusiveStartKey` and a filter), and returns a
cursor (the last evaluated key, JSON) to resume from. Items without the text attribute, or whose
text is not a non-empty string, are reported with their key and the reason; the rest are records.
Throttling (`ProvisionedThroughputExceededException` and the other throttling codes) is retried with
backoff by botocore's standard retry mode (the one retry policy); when it persists beyond those
attempts the call stops early, says `throttled`, and its cursor resumes where it stopped — never a
failure, never a page skipped.

`write_status` writes each outcome back with `UpdateItem`: `SUCCESS`, the model and an ISO timestamp,
or `FAILED` with the reason (`RETRY` with the reason when the failure is retryable: a later scan reads
it again); only an item that still exists is updated. Updates that stay throttled are returned as not written.

Record ids are the key values joined by `|` (each with `%` and `|` percent-encoded): `IMAGE#1|LINE#3`.
The client is boto3's, so the standard variables apply (`AWS_REGION`, `AWS_ENDPOINT_URL_DYNAMODB`,
credentials).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote, unquote

from legal_batch.sources.base import (
    MetadataValue,
    SourcePage,
    SourceProblem,
    SourceRecord,
    StatusReport,
    StatusUpdate,
)

SUCCESS = "SUCCESS"
FAILED = "FAILED"
RETRY = "RETRY"
THROTTLING_CODES = frozenset({"ProvisionedThroughputExceededException", "ThrottlingException",
                              "RequestLimitExceeded"})
_MAX_ATTEMPTS = 8


def dynamodb_client(*, max_attempts: int = _MAX_ATTEMPTS) -> Any:
    """A boto3 DynamoDB client with botocore's standard retry mode: exponential backoff with jitter on
    throttling and transient errors, `max_attempts` attempts in all (the first included)."""
    import boto3
    from botocore.config import Config

    return boto3.client("dynamodb", config=Config(retries={"mode": "standard", "total_max_attempts": max_attempts}))


class DynamoDBSource:
    """See the module docstring."""

    name = "dynamodb"

    def __init__(self, table: str, *, text_attribute: str = "text", status_attribute: str = "embedding_status",
                 page_size: int = 100, client: Any | None = None, write_concurrency: int = 4) -> None:
        self.table = table
        self.text_attribute = text_attribute
        self.status_attribute = status_attribute
        self.model_attribute = f"{status_attribute}_model"
        self.at_attribute = f"{status_attribute}_at"
        self.error_attribute = f"{status_attribute}_error"
        self.page_size = page_size
        self.client = client if client is not None else dynamodb_client()
        self.write_concurrency = max(1, write_concurrency)
        described = self.client.describe_table(TableName=table)["Table"]
        ordered = sorted(described["KeySchema"], key=lambda part: part["KeyType"] != "HASH")
        self.key_names = [part["AttributeName"] for part in ordered]
        types = {d["AttributeName"]: d["AttributeType"] for d in described["AttributeDefinitions"]}
        self.key_types = [types[name] for name in self.key_names]

    # -- ids --------------------------------------------------------------------------------------

    def record_id(self, key: Mapping[str, Mapping[str, str]]) -> str:
        parts = []
        for name, kind in zip(self.key_names, self.key_types, strict=True):
            value = key[name][kind]
            parts.append(quote(value if isinstance(value, str) else str(value), safe="#:/-_.~@=+,;!$&'()* "))
        return "|".join(parts)

    def key(self, record_id: str) -> dict[str, dict[str, str]]:
        parts = record_id.split("|")
        if len(parts) != len(self.key_names):
            raise ValueError(f"{record_id!r} is not a record id of table {self.table} (key: "
                             f"{', '.join(self.key_names)})")
        return {name: {kind: unquote(part)} for name, kind, part in zip(self.key_names, self.key_types, parts,
                                                                        strict=True)}

    # -- reading ----------------------------------------------------------------------------------

    def scan(self, *, cursor: str | None = None, page_budget: int = 10) -> SourcePage:
        from botocore.exceptions import ClientError

        page = SourcePage(cursor=cursor)
        start = json.loads(cursor) if cursor else None
        while page.pages < max(1, page_budget):
            request: dict[str, Any] = {
                "TableName": self.table, "Limit": self.page_size,
                "FilterExpression": "attribute_not_exists(#status) OR NOT (#status IN (:success, :failed))",
                "ExpressionAttributeNames": {"#status": self.status_attribute},
                "ExpressionAttributeValues": {":success": {"S": SUCCESS}, ":failed": {"S": FAILED}},
            }
            if start:
                request["ExclusiveStartKey"] = start
            try:
                answer = self.client.scan(**request)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in THROTTLING_CODES:
                    page.throttled = True
                    return page
                raise
            page.pages += 1
            page.scanned += int(answer.get("ScannedCount", 0))
            for item in answer.get("Items", []):
                self._take(item, page)
            start = answer.get("LastEvaluatedKey")
            page.cursor = json.dumps(start, sort_keys=True) if start else None
            if not start:
                break
        return page

    def _take(self, item: Mapping[str, Mapping[str, Any]], page: SourcePage) -> None:
        record_id = self.record_id(item)
        value = item.get(self.text_attribute)
        if value is None:
            page.problems.append(SourceProblem(record_id, f"table {self.table}, key {record_id}: no "
                                               f"{self.text_attribute!r} attribute"))
            return
        kind, text = next(iter(value.items()))
        if kind != "S":
            page.problems.append(SourceProblem(record_id, f"table {self.table}, key {record_id}: "
                                               f"{self.text_attribute!r} is of type {kind}, not a string"))
            return
        if not text.strip():
            page.problems.append(SourceProblem(record_id, f"table {self.table}, key {record_id}: "
                                               f"{self.text_attribute!r} is empty"))
            return
        skip = {self.text_attribute, self.status_attribute, self.model_attribute, self.at_attribute,
                self.error_attribute}
        metadata = {name: plain for name, typed in item.items()
                    if name not in skip and (plain := _scalar(typed)) is not None}
        page.records.append(SourceRecord(record_id, text, metadata))

    # -- writing back -----------------------------------------------------------------------------

    def write_status(self, updates: Iterable[StatusUpdate], *, at: datetime | None = None) -> StatusReport:
        stamp = (at or datetime.now(UTC)).isoformat()
        report = StatusReport()
        updates = list(updates)
        with ThreadPoolExecutor(max_workers=self.write_concurrency) as pool:
            for update, problem in zip(updates, pool.map(lambda u: self._write_one(u, stamp), updates), strict=True):
                if problem is None:
                    report.written += 1
                else:
                    report.not_written.append(SourceProblem(update.id, problem))
        return report

    def write_failed(self, problems: Iterable[SourceProblem], *, at: datetime | None = None) -> StatusReport:
        """Mark records the scan could not use (`SourcePage.problems`) `FAILED` with their reason."""
        return self.write_status((StatusUpdate(p.id, error=p.reason) for p in problems), at=at)

    def _write_one(self, update: StatusUpdate, stamp: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        names = {"#status": self.status_attribute, "#at": self.at_attribute}
        if update.error is None:
            names |= {"#model": self.model_attribute, "#error": self.error_attribute}
            expression = "SET #status = :status, #model = :model, #at = :at REMOVE #error"
            values = {":status": {"S": SUCCESS}, ":model": {"S": update.model or ""}, ":at": {"S": stamp}}
        else:
            names |= {"#error": self.error_attribute}
            expression = "SET #status = :status, #error = :error, #at = :at"
            values = {":status": {"S": RETRY if update.retryable else FAILED}, ":error": {"S": update.error[:4_000]},
                      ":at": {"S": stamp}}
        try:
            key = self.key(update.id)
            names |= {f"#k{index}": name for index, name in enumerate(key)}
            self.client.update_item(TableName=self.table, Key=key, UpdateExpression=expression,
                                    ExpressionAttributeNames=names, ExpressionAttributeValues=values,
                                    ConditionExpression=" AND ".join(f"attribute_exists(#k{index})"
                                                                      for index in range(len(key))))
        except ValueError as exc:
            return str(exc)
        except BotoCoreError as exc:  # endpoint unreachable, credentials: tried again next pass
            return f"table {self.table}, key {update.id}: {exc}"
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ConditionalCheckFailedException":
                return f"table {self.table}, key {update.id}: the item no longer exists"
            what = "throttled beyond the retries; write it again later" if code in THROTTLING_CODES else code
            return f"table {self.table}, key {update.id}: {what} ({exc.response.get('Error', {}).get('Message', '')})"
        return None


def _scalar(typed: Mapping[str, Any]) -> MetadataValue | None:
    """A DynamoDB attribute value as a plain scalar (S, N, BOOL); None for other types."""
    kind, value = next(iter(typed.items()))
    if kind == "S":
        return value
    if kind == "BOOL":
        return bool(value)
    if kind == "N":
        number = Decimal(value)
        return int(number) if number == number.to_integral_value() else float(number)
    return None
