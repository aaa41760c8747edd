"""Named crash points for fault-injection tests: with `LEGAL_BATCH_CRASH_AT=<name>` the process
kills itself (SIGKILL, no cleanup, no atexit) when it reaches that point, so tests can prove that a
fresh process resumes without losing or duplicating work. With `LEGAL_BATCH_CRASH_ONCE=<path>` as
well, only the first process to reach the point dies (it creates `path`; the others see it and go
on) — for a point in a worker process that its pool starts again.

Points of a run (`POINTS`): `after_request_file`, `after_job_row`, `after_provider_accepted`,
`after_download`, `mid_ingest` (results written, transaction not committed), `after_sink_write` (a
further vector sink written, the ledger not committed).

Points of chunking (`CHUNKING_POINTS`): `chunk_worker` (a chunking worker process, as it starts a
sub-batch), `mid_chunking` (the main process, after a batch of cases was committed: the next batch's
chunks written, its transaction not committed).
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_request_file", "after_job_row", "after_provider_accepted", "after_download", "mid_ingest",
          "after_sink_write")
CHUNKING_POINTS = ("chunk_worker", "mid_chunking")


def crash_point(name: str) -> None:
    if os.environ.get("LEGAL_BATCH_CRASH_AT") != name:
        return
    once = os.environ.get("LEGAL_BATCH_CRASH_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
