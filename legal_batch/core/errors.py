"""The error type for a mistake the user can fix: a setting or an argument that cannot be used."""

from __future__ import annotations


class QuotaTooSmall(ValueError):
    """A single request needs more of the queue than the provider's whole quota: no shard can hold it."""


class RunFailed(RuntimeError):
    """A Dagster run the command needed failed; the message carries the failed step's own error (one
    line) and the run id, whose logs in `dagster dev` hold the rest."""


class UserError(ValueError):
    """A setting or argument that cannot be used as given.

    The message names the setting or argument, its value, and what to do. The CLI prints it as one
    line on stderr, without a traceback, and exits with `exit_code` (2: a usage or configuration
    error)."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
