"""The LLM headnote prompt as a file: the law reporter's instructions (the system text: what to
write, in which language and style, how to cite the case), the words that introduce the few-shot
examples, and the labels of the case details sent before each judgment.

The built-in template, `headnote_prompt.toml` beside this module (shipped with the package), holds
the product's text and documents every key. A run uses another with `LEGAL_BATCH_HEADNOTE_PROMPT=path`
or `legal-batch headnotes run --prompt PATH`; a file gives the keys it changes, the others keep the
built-in text. The template's text (not its path) is stored with each shard planned
(`HeadnotesFlow.job_params`), so the request file is written with the prompt the run was planned with
in whichever process writes it, even after the file has changed or gone.
"""

from __future__ import annotations

import string
import tomllib
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from importlib import resources
from pathlib import Path

from legal_batch.core.errors import UserError

BUILT_IN = "built-in"
"""The `source` of the template shipped with the package."""


@dataclass(frozen=True)
class PromptTemplate:
    """The texts of the headnote prompt (see `headnote_prompt.toml` for what each one is)."""

    system: str
    examples_of_the_form: str
    examples_in_house_style: str
    example_label: str
    request: str
    language: str
    label_neutral_citation: str
    label_citation: str
    label_court: str
    label_case_name: str
    label_decision_date: str
    label_judgment: str
    source: str = BUILT_IN
    """Where the texts come from: the file's path, or `BUILT_IN`."""

    def as_params(self) -> dict:
        """The template as a shard's job parameters (JSON)."""
        return asdict(self)

    @classmethod
    def from_params(cls, params: dict | None) -> PromptTemplate:
        """The template a shard was planned with (`as_params`); the built-in one for a shard planned
        before prompts were stored."""
        if not params:
            return default_prompt()
        return cls(**{**asdict(default_prompt()), **{k: v for k, v in params.items() if k in _KEYS | {"source"}}})

    def example_heading(self, n: int) -> str:
        return self.example_label.format(n=n)

    def language_line(self, language: str) -> str | None:
        return self.language.format(language=language) if self.language else None


_KEYS = frozenset(f.name for f in fields(PromptTemplate)) - {"source"}
_PLACEHOLDERS = {"language": {"language"}, "example_label": {"n"}}
"""The keys whose text is formatted, and the placeholders each may use."""


@lru_cache(maxsize=1)
def default_prompt() -> PromptTemplate:
    """The built-in template (`headnote_prompt.toml`, package data)."""
    text = resources.files("legal_batch.flows.headnotes").joinpath("headnote_prompt.toml").read_text(encoding="utf-8")
    values = tomllib.loads(text)
    return PromptTemplate(**values)


def load_prompt(path: str | Path | None, *, setting: str = "LEGAL_BATCH_HEADNOTE_PROMPT") -> PromptTemplate:
    """The template in the TOML file at `path` over the built-in one (`None`: the built-in one).

    Raises `UserError` naming `setting`, the file and what is wrong: a file that cannot be read, TOML
    that does not parse (with its line), a key the template does not have, a value that is not text,
    an empty system text, a placeholder a key cannot use."""
    if path is None or str(path).strip() == "":
        return default_prompt()
    where = f"{setting}={str(path)!r}"
    file = Path(path).expanduser()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{where}: no such file; give a headnote prompt template (TOML, like the built-in "
                        f"{_built_in_path()}) or leave it unset for the built-in prompt") from None
    except OSError as exc:
        raise UserError(f"{where} cannot be read: {exc.strerror or exc}") from None
    try:
        values = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text (byte {exc.start + 1})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{where} is not valid TOML: {exc}") from None
    unknown = sorted(set(values) - _KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(_KEYS))}")
    for key, value in values.items():
        if not isinstance(value, str):
            raise UserError(f"{where}: {key} is a {type(value).__name__}, not text (quote it)")
        allowed = _PLACEHOLDERS.get(key)
        if allowed is not None:
            used = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
            if used - allowed or any(not name for name in used):
                shown = ", ".join("{" + name + "}" for name in sorted(allowed))
                raise UserError(f"{where}: {key} uses a placeholder other than {shown}: {value!r}")
    if not values.get("system", "x").strip():
        raise UserError(f"{where}: system is empty; give the instructions, or leave the key out for the built-in ones")
    return PromptTemplate(**{**asdict(default_prompt()), **values, "source": str(file.resolve())})


def _built_in_path() -> str:
    return str(resources.files("legal_batch.flows.headnotes").joinpath("headnote_prompt.toml"))
