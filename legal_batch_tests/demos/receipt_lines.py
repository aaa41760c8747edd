"""The receipt-line example end to end (`make demo-receipts`): receipt lines without embeddings in a
DynamoDB table, embedded through the batch pipeline into Chroma, each line's status written back.

DynamoDB is moto's server on this machine (started here, in memory; through unpatched boto3 over
HTTP, as against AWS); Chroma is the embedded one under `$LEGAL_BATCH_HOME/chroma`; the provider is
the configured one (local by default). Our tables go to their own schema (`receipts_demo`) so the
judgments demo is left alone. Against AWS, the same command runs with `AWS_REGION`, credentials and
`LEGAL_BATCH_DYNAMODB_TABLE` pointing at your table (and no AWS_ENDPOINT_URL_DYNAMODB).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

from legal_batch_tests.emulators.dynamodb import DynamoDBServer

TABLE = "receipt_lines"
STORES = ["Corner Mart", "Harbour Grocer", "Wing On Market", "City Pharmacy"]
ITEMS = ["WHOLE MILK 2L", "OAT MILK 1L", "FREE RANGE EGGS 12", "JASMINE RICE 5KG", "SOY SAUCE 500ML",
         "GREEN TEA 100 BAGS", "PAPER TOWELS 6PK", "PARACETAMOL 500MG 20", "BOK CHOY 500G", "DARK CHOCOLATE 85%",
         "SPARKLING WATER 6X330ML", "INSTANT NOODLES 5PK", "TOFU FIRM 300G", "DISH SOAP LEMON 1L"]


def _lines(count: int) -> list[dict]:
    rng = random.Random(7)
    lines = []
    for n in range(count):
        item = rng.choice(ITEMS)
        quantity = rng.randint(1, 4)
        price = rng.randint(80, 4_500) / 100
        lines.append({"receipt_id": {"S": f"RCPT-{n // 6:04d}"}, "line_no": {"N": str(n % 6)},
                      "text": {"S": f"{item} x{quantity} @ {price:.2f} = {quantity * price:.2f}"},
                      "store": {"S": STORES[(n // 6) % len(STORES)]}})
    return lines


def main(count: int = 240) -> int:
    import logging

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: no line per request

    cli = str(Path(sys.executable).with_name("legal-batch"))
    with DynamoDBServer() as server:
        env = {**os.environ, **server.env(), "LEGAL_BATCH_SCHEMA": os.environ.get("LEGAL_BATCH_SCHEMA", "receipts_demo"),
               "LEGAL_BATCH_DYNAMODB_TABLE": TABLE, "LEGAL_BATCH_CHROMA_COLLECTION": "receipt_lines"}
        client = boto3.client("dynamodb", region_name=env["AWS_REGION"], endpoint_url=server.endpoint_url,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_table(TableName=TABLE, BillingMode="PAY_PER_REQUEST",
                            KeySchema=[{"AttributeName": "receipt_id", "KeyType": "HASH"},
                                       {"AttributeName": "line_no", "KeyType": "RANGE"}],
                            AttributeDefinitions=[{"AttributeName": "receipt_id", "AttributeType": "S"},
                                                  {"AttributeName": "line_no", "AttributeType": "N"}])
        items = _lines(count) + [
            {"receipt_id": {"S": "RCPT-BAD"}, "line_no": {"N": "0"}},                      # no text
            {"receipt_id": {"S": "RCPT-BAD"}, "line_no": {"N": "1"}, "text": {"N": "12.5"}}]  # not a string
        for start in range(0, len(items), 25):
            client.batch_write_item(RequestItems={TABLE: [{"PutRequest": {"Item": item}}
                                                          for item in items[start: start + 25]]})
        print(f"DynamoDB table {TABLE}: {len(items)} receipt lines without embeddings (2 unusable)", flush=True)

        command = [cli, "embeddings", "run", "--source", "dynamodb", "--sink", "chroma", "--wait",
                   "--poll-interval", "1"]
        print("$ " + " ".join(command[1:]), flush=True)
        code = subprocess.call(command, env=env)

        statuses: Counter[str] = Counter()
        example_error = ""
        for page in client.get_paginator("scan").paginate(TableName=TABLE):
            for item in page["Items"]:
                status = item.get("embedding_status", {}).get("S", "(none)")
                statuses[status] += 1
                if status == "FAILED" and not example_error:
                    example_error = item["embedding_status_error"]["S"]
        print("statuses written back to DynamoDB: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
        if example_error:
            print(f"  e.g. FAILED: {example_error}")
        search = [cli, "search", "--sink", "chroma", "oat milk"]
        print("$ " + " ".join(search[1:]), flush=True)
        code = subprocess.call(search, env=env) or code
        return 0 if code == 0 and statuses.get("SUCCESS") == count else 1


if __name__ == "__main__":
    sys.exit(main())
