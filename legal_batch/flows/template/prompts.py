"""``prompts.json``: the system prompt and the per-row user prompt template.

The file holds ``system_prompt``, ``user_prompt_template`` and ``input_placeholders`` (the
column names the template uses). ``{name}`` is replaced by the row's value only where ``name``
is a declared placeholder; every other brace is kept as written, so JSON examples in a prompt
survive. There is no ``{{`` escaping and ``str.format`` is never used.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from legal_batch.flows.template.errors import TemplateError

__all__ = [
    "FormattedPrompt",
    "PromptTemplate",
    "TruncationStats",
    "check_columns",
    "format_prompt",
    "load_prompts",
]

PROMPTS_FILE = "prompts.json"
_REQUIRED_KEYS = ("system_prompt", "user_prompt_template", "input_placeholders")
# What a user would read as a placeholder: `{identifier}`. JSON examples such as
# `{"verdict": "..."}` do not match.
_PLACEHOLDER_LIKE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class PromptTemplate:
    """The prompts for one run; ``input_placeholders`` are column names, in declared order."""

    system_prompt: str
    user_prompt_template: str
    input_placeholders: tuple[str, ...]


@dataclass(frozen=True)
class FormattedPrompt:
    """The prompts for one row; ``truncated_fields`` names the columns that were cut."""

    system: str
    user: str
    truncated_fields: tuple[str, ...]


@dataclass
class TruncationStats:
    """Counts of truncated fields over a run: per column, and rows with any cut."""

    rows_seen: int = 0
    rows_affected: int = 0
    fields_truncated: Counter[str] = field(default_factory=Counter)

    def add(self, prompt: FormattedPrompt) -> None:
        """Count one formatted row."""
        self.rows_seen += 1
        if prompt.truncated_fields:
            self.rows_affected += 1
            self.fields_truncated.update(prompt.truncated_fields)

    def merge(self, other: TruncationStats) -> None:
        """Add another accumulator's counts (e.g. from another file or split)."""
        self.rows_seen += other.rows_seen
        self.rows_affected += other.rows_affected
        self.fields_truncated.update(other.fields_truncated)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready counts, columns sorted by name."""
        return {
            "rows_seen": self.rows_seen,
            "rows_affected": self.rows_affected,
            "fields_truncated": dict(sorted(self.fields_truncated.items())),
        }


def load_prompts(path_or_dir: str | Path) -> PromptTemplate:
    """Read ``prompts.json`` (the file itself, or the folder holding it).

    Raises ``TemplateError`` naming the file for a missing key, a wrong type, a ``{name}`` used
    in the template but not declared in ``input_placeholders``, or a declared one never used.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / PROMPTS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TemplateError(f"cannot read prompts file {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise TemplateError(
            f"prompts file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    if not isinstance(raw, dict):
        raise TemplateError(
            f"prompts file {path} must hold a JSON object with keys {', '.join(_REQUIRED_KEYS)}"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise TemplateError(f"prompts file {path} is missing {', '.join(missing)}")
    for key in ("system_prompt", "user_prompt_template"):
        if not isinstance(raw[key], str):
            raise TemplateError(f"prompts file {path}: {key} must be a string")
    placeholders = raw["input_placeholders"]
    if not isinstance(placeholders, list) or not all(isinstance(name, str) and name for name in placeholders):
        raise TemplateError(f"prompts file {path}: input_placeholders must be a list of column names")
    duplicates = sorted(name for name, count in Counter(placeholders).items() if count > 1)
    if duplicates:
        raise TemplateError(
            f"prompts file {path}: input_placeholders lists {_quoted(duplicates)} more than once"
        )

    template = raw["user_prompt_template"]
    used = set(_PLACEHOLDER_LIKE.findall(template))
    undeclared = sorted(used - set(placeholders))
    if undeclared:
        raise TemplateError(
            f"prompts file {path}: user_prompt_template uses {_braced(undeclared)} but input_placeholders "
            f"does not declare {_plural(undeclared, 'it', 'them')}; add {_plural(undeclared, 'it', 'them')} "
            "to input_placeholders or remove the braces"
        )
    unused = [name for name in placeholders if "{" + name + "}" not in template]
    if unused:
        raise TemplateError(
            f"prompts file {path}: input_placeholders declares {_quoted(unused)} but user_prompt_template "
            f"never uses {_braced(unused)}"
        )
    return PromptTemplate(raw["system_prompt"], template, tuple(placeholders))


def check_columns(template: PromptTemplate, columns: Sequence[str], *, file: str) -> None:
    """Raise ``TemplateError`` if ``file`` lacks a column the template needs.

    The message names the missing columns, suggests near matches, and lists what ``file`` has.
    """
    available = [str(column) for column in columns]
    missing = [name for name in template.input_placeholders if name not in available]
    if not missing:
        return
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, available, n=1) or [
            column for column in available if column.casefold() == name.casefold()
        ]
        if close:
            hints.append(f"{name!r} → did you mean {close[0]!r}?")
    message = (
        f"{file} has no column {_quoted(missing)} needed by input_placeholders in prompts.json. "
        f"Available columns: {', '.join(available) or '(none)'}."
    )
    if hints:
        message += " " + " ".join(hints)
    raise TemplateError(message)


def format_prompt(
    template: PromptTemplate,
    row: Mapping[str, object],
    *,
    max_field_chars: int = 20_000,
    marker: str = " …[truncated]",
) -> FormattedPrompt:
    """Fill the user prompt template from one row.

    Nulls (``None``, NaN, ``pandas.NA``) become empty strings. A value longer than
    ``max_field_chars`` keeps its first ``max_field_chars`` characters followed by ``marker``.
    Values are inserted verbatim: braces inside them are never treated as placeholders.
    """
    if max_field_chars < 1:
        raise ValueError(f"max_field_chars must be at least 1, got {max_field_chars}")
    values: dict[str, str] = {}
    truncated: list[str] = []
    for name in template.input_placeholders:
        try:
            text = _as_text(row[name])
        except KeyError:
            raise TemplateError(f"row has no column {name!r} needed by input_placeholders") from None
        if len(text) > max_field_chars:
            text = text[:max_field_chars] + marker
            truncated.append(name)
        values[name] = text
    user = _substitute(template.user_prompt_template, values) if values else template.user_prompt_template
    return FormattedPrompt(template.system_prompt, user, tuple(truncated))


def _substitute(template: str, values: Mapping[str, str]) -> str:
    # One pass, so a value containing `{other}` is not substituted again.
    names = sorted(values, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in names))
    return pattern.sub(lambda match: values[match.group(0)[1:-1]], template)


def _as_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return str(value)


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _braced(names: Sequence[str]) -> str:
    return ", ".join("{" + name + "}" for name in names)


def _plural(names: Sequence[str], one: str, many: str) -> str:
    return one if len(names) == 1 else many
