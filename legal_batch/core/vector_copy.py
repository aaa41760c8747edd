"""Vectors as one binary COPY stream (`binary_copy_data`): what the embeddings flow's sink and the
pgvector sink send to Postgres, built with numpy in one buffer, no Python work per row."""

from __future__ import annotations

import numpy as np

_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
_COPY_TRAILER = b"\xff\xff"


def binary_copy_data(case_ids: list[str], chunk_indexes: list[int], vectors: np.ndarray, *,
                     model: str | None = None, hashes: list[str] | None = None, half: bool = False) -> memoryview:
    """A whole `COPY ... (case_id, chunk_index[, model][, text_sha256], embedding) FROM STDIN WITH
    (FORMAT BINARY)` stream (header, tuples, trailer) built with numpy in one buffer: no Python work
    per row.

    `case_ids` are canonical uuid strings, `hashes` (optional) 64-character hex digests, `vectors` a
    (rows, dims) array (cast to float32, as pgvector stores them; with `half`, to float16, rounded to
    nearest as pgvector's own `::halfvec` cast does, for a `halfvec` column). The `vector` wire format is
    dims (uint16), 0 (uint16), then the float32s, all big-endian; `halfvec`'s the same with float16s."""
    rows, dims = vectors.shape
    if len(case_ids) != rows or len(chunk_indexes) != rows:
        raise ValueError(f"{len(case_ids)} case ids and {len(chunk_indexes)} chunk indexes for {rows} vectors")
    uuids = bytes.fromhex("".join(case_ids).replace("-", ""))
    if len(uuids) != 16 * rows:
        raise ValueError(f"case ids are not canonical uuids: {case_ids[:3]}...")
    name = b"" if model is None else model.encode()
    fields: list[tuple] = [("fields", ">i2"), ("uuid_len", ">i4"), ("uuid", "V16"), ("index_len", ">i4"),
                           ("index", ">i4")]
    if model is not None:
        fields += [("model_len", ">i4"), ("model", f"S{len(name)}")] if name else [("model_len", ">i4")]
    if hashes is not None:
        if len(hashes) != rows:
            raise ValueError(f"{len(hashes)} text hashes for {rows} vectors")
        fields += [("sha_len", ">i4"), ("sha", "S64")]
    component = 2 if half else 4
    fields += [("vector_len", ">i4"), ("dims", ">u2"), ("unused", ">u2"), ("vector", f">f{component}", (dims,))]
    row = np.dtype(fields)
    stream = np.empty(len(_COPY_SIGNATURE) + rows * row.itemsize + len(_COPY_TRAILER), dtype=np.uint8)
    stream[: len(_COPY_SIGNATURE)] = np.frombuffer(_COPY_SIGNATURE, dtype=np.uint8)
    stream[len(stream) - len(_COPY_TRAILER):] = np.frombuffer(_COPY_TRAILER, dtype=np.uint8)
    tuples = stream[len(_COPY_SIGNATURE): len(stream) - len(_COPY_TRAILER)].view(row)
    tuples["fields"] = 3 + (model is not None) + (hashes is not None)
    tuples["uuid_len"] = 16
    tuples["uuid"] = np.frombuffer(uuids, dtype="V16")
    tuples["index_len"] = 4
    tuples["index"] = chunk_indexes
    if model is not None:
        tuples["model_len"] = len(name)
        if name:
            tuples["model"] = name
    if hashes is not None:
        tuples["sha_len"] = 64
        tuples["sha"] = np.array(hashes, dtype="S64")
    tuples["vector_len"] = 4 + component * dims
    tuples["dims"] = dims
    tuples["unused"] = 0
    tuples["vector"] = vectors
    return memoryview(stream)
