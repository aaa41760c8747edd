"""The one error type the template flow raises for bad user input."""

from __future__ import annotations


class TemplateError(ValueError):
    """A user-supplied input (data file, prompts.json, schema) cannot be used.

    The message names the file and says what to change.
    """
