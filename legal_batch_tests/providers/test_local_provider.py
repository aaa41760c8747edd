"""The local provider answers a large embeddings job on every core with exactly the lines it writes
answering it in one process (vectors, token counts, the request a model cannot answer)."""

from __future__ import annotations

import base64

import numpy as np
import orjson

from legal_batch.providers.base import EmbeddingRequest
from legal_batch.providers.local import _POOL_FROM, LocalProvider

MODEL = "local-lexical-v1"


def _answer(provider: LocalProvider, texts: list[str]) -> tuple[list[dict], list[dict], dict]:
    job = {"id": "local-job", "model": MODEL, "metadata": {"shard_key": "s1"}, "status": "in_progress"}
    folder = provider._dir(job["id"])
    folder.mkdir(parents=True)
    (folder / "input.jsonl").write_bytes(b"".join(
        provider.format_line(EmbeddingRequest(f"c{i}", text), endpoint="embeddings", model=MODEL)
        for i, text in enumerate(texts)))
    provider._process(job)

    def lines(name: str) -> list[dict]:
        found = []
        for raw in (folder / name).read_bytes().splitlines():
            line = orjson.loads(raw)
            line.pop("id")
            (line.get("response") or {}).pop("request_id", None)
            found.append(line)
        return found

    return lines("output.jsonl"), lines("errors.jsonl"), job["request_counts"]


def test_a_large_job_on_every_core_answers_as_one_process_does(tmp_path):
    texts = [f"the tenant held over after notice {n} and the landlord sued for mesne profits" for n in range(_POOL_FROM)]
    texts[7] = "the of and"  # no features: the model cannot answer it
    one = _answer(LocalProvider(tmp_path / "one", embed_workers=1), texts)
    many = _answer(LocalProvider(tmp_path / "many", embed_workers=2), texts)

    assert many == one
    output, errors, counts = many
    assert counts == {"total": _POOL_FROM, "completed": _POOL_FROM - 1, "failed": 1}
    assert [e["custom_id"] for e in errors] == ["c7"]
    encoded = output[0]["response"]["body"]["data"][0]["embedding"]  # asked for base64, as OpenAI's requests are
    assert np.frombuffer(base64.b64decode(encoded), dtype="<f4").shape == (1024,)


def test_each_line_is_answered_in_the_encoding_format_it_asks_for(tmp_path):
    """`base64` (what our requests ask for, as the OpenAI provider's do) gives the little-endian float32
    bytes; `float`, or no `encoding_format` (the API's default), a JSON list — the same vector."""
    provider = LocalProvider(tmp_path, embed_workers=1)
    job = {"id": "local-formats", "model": MODEL, "metadata": {"shard_key": "s1"}, "status": "in_progress"}
    folder = provider._dir(job["id"])
    folder.mkdir(parents=True)
    text = "the tenant held over after notice and the landlord sued for mesne profits"
    asked = orjson.loads(provider.format_line(EmbeddingRequest("b64", text), endpoint="embeddings", model=MODEL))
    assert asked["body"]["encoding_format"] == "base64"
    floats = {**asked, "custom_id": "floats", "body": {**asked["body"], "encoding_format": "float"}}
    default = {**asked, "custom_id": "default", "body": {k: v for k, v in asked["body"].items() if k != "encoding_format"}}
    (folder / "input.jsonl").write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in (asked, floats, default)))
    provider._process(job)

    answers = {line["custom_id"]: line["response"]["body"]["data"][0]["embedding"]
               for line in map(orjson.loads, (folder / "output.jsonl").read_bytes().splitlines())}
    assert isinstance(answers["b64"], str) and isinstance(answers["floats"], list)
    decoded = np.frombuffer(base64.b64decode(answers["b64"]), dtype="<f4")
    assert decoded.shape == (1024,)
    assert decoded.tolist() == np.asarray(answers["floats"], dtype=np.float32).tolist() == \
        np.asarray(answers["default"], dtype=np.float32).tolist()
