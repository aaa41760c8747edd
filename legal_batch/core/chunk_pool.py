"""Chunking on every core: a pool of worker processes that run a pure function over the items of a
batch, cut into small sub-batches so the workers stay evenly busy.

Workers start with `spawn` (a fresh interpreter: never a fork of a process that holds psycopg
connections or threads), load the tokenizer once, and exit when the main process is gone. With one worker the function runs in this
process when the batch's results are asked for, and no pool is started.

A worker that dies (killed, out of memory) breaks the whole pool: every batch in it raises
`WorkerDied`; the caller `restart`s the pool and submits those batches again. The database is never
touched here: the caller reads and writes, the workers only compute.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Generic, TypeVar

from legal_batch.core.crash import crash_point

T = TypeVar("T")
R = TypeVar("R")

SUB_BATCH = 4
"""Items per task sent to a worker: small, so the last tasks of a batch finish close together."""


class WorkerDied(RuntimeError):
    """A worker process died while working: the pool is broken and its pending batches are lost."""


def _start_worker(parent: int) -> None:
    """In each worker: load the tokenizer once, and leave when the main process is gone (a worker
    holds both ends of its task queue, so it would otherwise wait forever, an orphan)."""
    from legal_batch.core.tokens import encoding

    encoding("cl100k_base").encode_ordinary("warm up")

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _run(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    crash_point("chunk_worker")
    return [fn(item) for item in items]


class Pending(Generic[R]):
    """The results of one submitted batch, in the order of its items."""

    def __init__(self, futures: list[Future[list[R]]] | None = None,
                 compute: Callable[[], list[R]] | None = None) -> None:
        self._futures = futures or []
        self._compute = compute

    def result(self) -> list[R]:
        """Wait for every sub-batch. Raises `WorkerDied` when a worker died meanwhile."""
        if self._compute is not None:
            return self._compute()
        results: list[R] = []
        try:
            for future in self._futures:
                results.extend(future.result())
        except BrokenProcessPool as exc:
            raise WorkerDied(f"a chunking worker process died ({exc})") from exc
        return results

    def cancel(self) -> None:
        for future in self._futures:
            future.cancel()


class ChunkPool:
    """`workers` processes (1: none, work runs in this process); use as a context manager."""

    def __init__(self, workers: int, *, sub_batch: int = SUB_BATCH) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.workers = workers
        self.sub_batch = sub_batch
        self.restarts = 0
        """How many times the pool was recreated after a worker died."""
        self._executor: ProcessPoolExecutor | None = None

    def submit(self, fn: Callable[[T], R], items: Sequence[T]) -> Pending[R]:
        """Start `fn` on each item (`fn` must be a module-level function: it is pickled by name)."""
        if self.workers == 1:
            return Pending(compute=lambda: [fn(item) for item in items])
        executor = self._pool()
        try:
            futures = [executor.submit(_run, fn, items[i:i + self.sub_batch])
                       for i in range(0, len(items), self.sub_batch)]
        except BrokenProcessPool as exc:
            return Pending([_failed(exc)])
        return Pending(futures)

    def restart(self) -> None:
        """Replace a broken pool with a fresh one (its workers start on the next `submit`)."""
        self._shutdown()
        self.restarts += 1

    def close(self) -> None:
        self._shutdown()

    def __enter__(self) -> ChunkPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker, initargs=(os.getpid(),))
        return self._executor

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future
