"""Named crash points for fault-injection tests: with `LEGAL_BATCH_CRASH_AT=<name>` the process
kills itself (SIGKILL, no cleanup, no atexit) when it reaches that point, so tests can prove that a
fresh process resumes without losing or duplicating work.

Points: `after_request_file`, `after_job_row`, `after_provider_accepted`, `after_download`,
`mid_ingest` (results written, transaction not committed), `after_sink_write` (a further vector sink
written, the ledger not committed).
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_request_file", "after_job_row", "after_provider_accepted", "after_download", "mid_ingest",
          "after_sink_write")


def crash_point(name: str) -> None:
    if os.environ.get("LEGAL_BATCH_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
