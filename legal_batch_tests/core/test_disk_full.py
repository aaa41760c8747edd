"""A full disk while writing a request file or downloading an output file: one line naming the file,
the space left and what to do; no partial file; nothing recorded in the ledger — and the next run,
with room, carries on from where the shard stood.

The files root is a 64 KB tmpfs (mounted here: the tests run as root); where mounting is not
allowed, the file layer refuses the write with ENOSPC instead (`os.fsync`, as a full disk does)."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from legal_batch.core import batch, ledger
from legal_batch.core.jsonl import DiskFull
from legal_batch.core.seed import seed_demo_cases
from legal_batch.flows.embeddings.flow import EmbeddingsFlow, sync_chunks
from legal_batch.providers.local import LocalProvider

MODEL = "local-lexical-v1"


@pytest.fixture
def tiny_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on a 64 KB file system."""
    root = tmp_path / "tiny"
    root.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(root)):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr("legal_batch.core.jsonl.os.fsync", fsync)
    try:
        yield root
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)


def _shard(conn) -> tuple[EmbeddingsFlow, LocalProvider, str]:
    seed_demo_cases(conn, cases=3)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    provider = LocalProvider(Path(os.environ["LEGAL_BATCH_HOME"]) / "local_provider")
    flow = EmbeddingsFlow(model=MODEL)
    (shard_key,) = batch.plan(conn, flow, provider, model=MODEL).shard_keys
    return flow, provider, shard_key


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _assert_one_line_naming(error: DiskFull, path: Path) -> None:
    message = str(error)
    assert "\n" not in message
    assert f"cannot write {path}: no space left on its disk" in message or "quota" in message
    assert "MB free" in message and "LEGAL_BATCH_HOME" in message


def test_a_request_file_on_a_full_disk_leaves_the_shard_planned(lb_env, conn, tiny_disk):
    flow, provider, shard_key = _shard(conn)
    items_before = conn.execute("SELECT custom_id, state, attempts FROM batch_items ORDER BY custom_id").fetchall()

    with pytest.raises(DiskFull) as full:
        batch.write_request_file(conn, flow, provider, shard_key, files_root=tiny_disk)

    _assert_one_line_naming(full.value, batch.request_file_path(tiny_disk, flow.name, shard_key))
    assert _files(tiny_disk) == [], "the partial file was removed"
    job = ledger.get_job(conn, shard_key)
    assert (job.state, job.input_location, job.input_bytes) == ("planned", None, None)
    assert conn.execute("SELECT custom_id, state, attempts FROM batch_items ORDER BY custom_id").fetchall() \
        == items_before

    written = batch.write_request_file(conn, flow, provider, shard_key, files_root=lb_env.home_dir / "files")
    assert written.lines == job.request_count
    assert ledger.get_job(conn, shard_key).state == "exported"


def test_an_output_download_on_a_full_disk_records_nothing_and_is_fetched_again(lb_env, conn, tiny_disk):
    flow, provider, shard_key = _shard(conn)
    batch.write_request_file(conn, flow, provider, shard_key, files_root=lb_env.home_dir / "files")
    batch.submit_shard(conn, flow, provider, shard_key)
    job = ledger.get_job(conn, shard_key)
    while provider.poll(job.provider_job_id or "").state != "completed":
        pass
    batch.poll_open_jobs(conn, lambda _: provider, flow="embeddings")
    before = ledger.get_job(conn, shard_key)
    assert before.state == "completed"

    with pytest.raises(DiskFull) as full:
        batch.download_outputs(conn, provider, shard_key, files_root=tiny_disk)

    _assert_one_line_naming(full.value, batch.output_dir(tiny_disk, flow.name, shard_key) / "output.jsonl")
    assert not [p for p in _files(tiny_disk) if p.name.endswith((".tmp", ".jsonl"))], "no partial or whole file"
    after = ledger.get_job(conn, shard_key)
    assert (after.state, after.output_location, after.updated_at) == (before.state, before.output_location,
                                                                     before.updated_at)
    assert conn.execute("SELECT count(*) FROM batch_items WHERE state = 'done'").fetchone()[0] == 0

    files = batch.download_outputs(conn, provider, shard_key, files_root=lb_env.home_dir / "files")
    report = batch.ingest_shard(conn, flow, provider, shard_key, files=files)
    assert report.done == job.request_count and report.failed == 0
    assert conn.execute("SELECT count(*) FROM case_embeddings").fetchone()[0] == job.request_count
