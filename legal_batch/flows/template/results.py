"""Result columns for each row, and the run's processing summary.

Each row gains one text column per top-level schema field plus four status columns, all named
with a prefix (``llm_`` by default) so they cannot overwrite input columns:

- ``{prefix}<field>``: the value; strings as-is, other values as compact JSON; null when absent.
- ``{prefix}status``: ``success`` when a JSON object came back, else ``error``.
- ``{prefix}error``: why the row failed or did not validate; null otherwise.
- ``{prefix}validation_passed``: whether the object matched the schema.
- ``{prefix}parse_status``: ``success``, ``validation_failed``, ``json_failed`` or ``error``
  (the provider returned no response).

A response that parses but does not validate keeps its values in the field columns, so the
user can see what the model said; ``validation_passed`` is false for it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel

from legal_batch.flows.template.errors import TemplateError
from legal_batch.flows.template.prompts import TruncationStats
from legal_batch.flows.template.response_json import parse_response
from legal_batch.flows.template.schema import validate_response

__all__ = [
    "ParseStatus",
    "ProcessingSummary",
    "SplitCounts",
    "append_results",
    "result_column_names",
    "result_columns_for",
    "write_summary",
]

ParseStatus = Literal["success", "validation_failed", "json_failed", "error"]
UNSPLIT = "unsplit"
_STATUS_COLUMNS = ("status", "error", "validation_passed", "parse_status")


def result_column_names(columns: Sequence[str], *, prefix: str = "llm_") -> list[str]:
    """The result columns added to each row, in order: schema fields, then status columns."""
    return [prefix + name for name in (*columns, *_STATUS_COLUMNS)]


def result_columns_for(
    response_text: str | None,
    provider_error: str | None,
    model: type[BaseModel],
    columns: Sequence[str],
    *,
    prefix: str = "llm_",
    prefill: str = "",
) -> dict[str, object]:
    """Parse and validate one response into its result columns.

    ``provider_error`` (the request failed; there is no response) wins over ``response_text``.
    ``columns`` are the schema's top-level fields (see ``schema.result_columns``).
    """
    if provider_error is not None:
        return _row(columns, {}, prefix, "error", provider_error)
    parsed = parse_response(response_text, prefill=prefill)
    if parsed.data is None:
        return _row(columns, {}, prefix, "json_failed", parsed.error)
    values, problem = validate_response(model, parsed.data)
    if values is None:
        return _row(columns, parsed.data, prefix, "validation_failed", problem)
    return _row(columns, values, prefix, "success", None)


def _row(
    columns: Sequence[str],
    values: Mapping[str, Any],
    prefix: str,
    parse_status: ParseStatus,
    error: str | None,
) -> dict[str, object]:
    row: dict[str, object] = {prefix + name: _cell(values.get(name)) for name in columns}
    row[prefix + "status"] = "success" if parse_status in {"success", "validation_failed"} else "error"
    row[prefix + "error"] = error
    row[prefix + "validation_passed"] = parse_status == "success"
    row[prefix + "parse_status"] = parse_status
    return row


def _cell(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def append_results(
    frame: pd.DataFrame,
    results: Sequence[Mapping[str, object]],
    *,
    columns: Sequence[str],
    prefix: str = "llm_",
    file: str,
) -> pd.DataFrame:
    """Return ``frame`` with the result columns added, typed for stable output.

    ``results`` holds one :func:`result_columns_for` dict per row, in row order. Result columns
    are Arrow strings, ``{prefix}validation_passed`` Arrow booleans. Raises ``TemplateError`` if
    a result column would replace a column of ``file``.
    """
    names = result_column_names(columns, prefix=prefix)
    clashes = [name for name in names if name in frame.columns]
    if clashes:
        raise TemplateError(
            f"{file} already has column(s) {', '.join(clashes)}; choose another result prefix than {prefix!r}"
        )
    if len(results) != len(frame):
        raise ValueError(f"{file}: {len(results)} results for {len(frame)} rows")
    added = {
        name: pd.array(
            [result[name] for result in results],
            dtype=pd.ArrowDtype(pa.bool_() if name == prefix + "validation_passed" else pa.string()),
        )
        for name in names
    }
    return pd.concat([frame, pd.DataFrame(added, index=frame.index)], axis=1)


@dataclass
class SplitCounts:
    """Row outcomes within one split (or within unsplit input)."""

    records: int = 0
    successes: int = 0
    failures: int = 0
    validation_passed: int = 0
    parse_status: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "records": self.records,
            "successes": self.successes,
            "failures": self.failures,
            "validation_passed": self.validation_passed,
            "validation_rate": _rate(self.validation_passed, self.records),
            "parse_status": dict(sorted(self.parse_status.items())),
        }


@dataclass
class ProcessingSummary:
    """What one run did, written next to its outputs by :func:`write_summary`.

    ``validation_rate`` is rows that passed validation over all rows. ``fallback_note`` says
    why the run did not use the batch API when ``batch_used`` is false.
    """

    name: str
    batch_used: bool = False
    job_ids: list[str] = field(default_factory=list)
    fallback_note: str | None = None
    truncation: TruncationStats = field(default_factory=TruncationStats)
    splits: dict[str, SplitCounts] = field(default_factory=dict)

    def add(self, result: Mapping[str, object], *, split: str | None, prefix: str = "llm_") -> None:
        """Count one row's result columns (from :func:`result_columns_for`)."""
        counts = self.splits.setdefault(split or UNSPLIT, SplitCounts())
        counts.records += 1
        if result[prefix + "status"] == "success":
            counts.successes += 1
        else:
            counts.failures += 1
        if result[prefix + "validation_passed"]:
            counts.validation_passed += 1
        counts.parse_status[str(result[prefix + "parse_status"])] += 1

    def totals(self) -> SplitCounts:
        """Counts over all splits."""
        total = SplitCounts()
        for counts in self.splits.values():
            total.records += counts.records
            total.successes += counts.successes
            total.failures += counts.failures
            total.validation_passed += counts.validation_passed
            total.parse_status.update(counts.parse_status)
        return total

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            **self.totals().as_dict(),
            "batch_used": self.batch_used,
            "job_ids": list(self.job_ids),
            "fallback_note": self.fallback_note,
            "truncation": self.truncation.as_dict(),
            "splits": {split: counts.as_dict() for split, counts in self.splits.items()},
        }


def write_summary(summary: ProcessingSummary, output_dir: str | Path, *, now: datetime | None = None) -> Path:
    """Write ``processing_summary_<name>_<UTC timestamp>.json`` into ``output_dir``; return its path.

    Never overwrites: a second summary in the same second gets a ``_2`` suffix.
    """
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    stamp = moment.strftime("%Y%m%dT%H%M%SZ")
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", summary.name).strip("_") or "run"
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    content = orjson.dumps(
        {**summary.as_dict(), "written_at": moment.isoformat()}, option=orjson.OPT_INDENT_2
    )
    attempt = 1
    while True:
        suffix = "" if attempt == 1 else f"_{attempt}"
        path = directory / f"processing_summary_{safe_name}_{stamp}{suffix}.json"
        try:
            with path.open("xb") as handle:
                handle.write(content)
        except FileExistsError:
            attempt += 1
            continue
        return path


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0
