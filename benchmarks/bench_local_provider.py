"""The local provider's offline embedding model on one core and on every core.

    python -m benchmarks.bench_local_provider [--jobs 4] [--requests 5000]

Answers `--jobs` jobs of `--requests` judgment-length embedding requests with one provider object,
first with `embed_workers=1` (in process), then with one worker per CPU (the default; the pool is
started once per process and kept), and prints `name=value` lines: vectors/s of each and the speedup.
Nothing here is a test; the figures are of this machine at this moment (load average printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from legal_batch.providers.base import EmbeddingRequest  # noqa: E402
from legal_batch.providers.local import LocalProvider  # noqa: E402

TEXT = ("The appellant contends that the judge erred in admitting the evidence of the search of the flat, which was "
        "carried out without a warrant and in the absence of the occupier. ")


def rate(workers: int, jobs: int, requests: int, root: Path) -> float:
    provider = LocalProvider(root / f"w{workers}", embed_workers=workers)
    lines = b"".join(provider.format_line(EmbeddingRequest(f"c{i}", f"{i} {TEXT * 6}"), endpoint="embeddings",
                                          model="local-lexical-v1") for i in range(requests))
    started = time.perf_counter()
    for n in range(jobs):
        job = {"id": f"local-bench{n}", "model": "local-lexical-v1", "metadata": {"shard_key": f"s{n}"},
               "status": "in_progress"}
        folder = provider._dir(job["id"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "input.jsonl").write_bytes(lines)
        provider._process(job)
    return jobs * requests / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--requests", type=int, default=5_000)
    args = parser.parse_args()
    print(f"load_average_1m={os.getloadavg()[0]:.2f} cpus={os.cpu_count()}")
    with tempfile.TemporaryDirectory() as folder:
        one = rate(1, args.jobs, args.requests, Path(folder))
        every = rate(os.cpu_count() or 1, args.jobs, args.requests, Path(folder))
    print(f"local_embed_one_core_vectors_per_s={one:.0f}")
    print(f"local_embed_all_cores_vectors_per_s={every:.0f}")
    print(f"local_embed_speedup={every / one:.2f}")


if __name__ == "__main__":
    main()
