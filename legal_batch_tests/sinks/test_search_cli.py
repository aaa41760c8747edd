"""`legal-batch search --sink`: the query is embedded by the configured provider and answered by the
named sink's own index (here an embedded Chroma and the Weaviate emulator)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from legal_batch.providers.base import EmbeddingRequest
from legal_batch.resources.providers import make_provider
from legal_batch.settings import get_settings
from legal_batch.sinks import registry
from legal_batch.sinks.base import VectorRecord, chunk_metadata
from legal_batch_tests.emulators.weaviate import WeaviateEmulator

TEXTS = {
    "case-a": "The appellant was convicted of trafficking in a dangerous drug found in his flat.",
    "case-b": "The tenant claimed adverse possession of the garden strip after twelve years of use.",
    "case-c": "The contract was frustrated when the venue burned down before the concert.",
}


def _store(sink_name: str) -> None:
    settings = get_settings(fresh=True)
    provider = make_provider("local", settings)
    model = settings.embedding_model or provider.default_model("embeddings")
    results = provider.realtime([EmbeddingRequest(key, text) for key, text in TEXTS.items()], endpoint="embeddings",
                                model=model)
    records = [VectorRecord(r.custom_id, 0, r.vector, TEXTS[r.custom_id], chunk_metadata(
        record_id=r.custom_id, chunk_index=0, model=model, text=TEXTS[r.custom_id], chunk_type="facts",
        citation=f"[2024] {r.custom_id.upper()}")) for r in results]
    sink = registry.open_sink(sink_name, model=model, dimensions=settings.embedding_dimensions, settings=settings)
    try:
        assert sink.upsert(records) == []
    finally:
        sink.close()


@pytest.mark.parametrize("sink_name", ["chroma", "weaviate"])
def test_search_answers_from_the_named_sink(lb_env, monkeypatch, sink_name):
    from legal_batch.cli import app

    with WeaviateEmulator() as weaviate:
        for key, value in weaviate.env().items():
            monkeypatch.setenv(key, value)
        _store(sink_name)
        found = CliRunner().invoke(app, ["search", "adverse possession of a garden", "--k", "2", "--sink", sink_name])
    assert found.exit_code == 0, found.output
    first = found.output.split("\n1. ", 1)[1]
    assert first.startswith("[2024] CASE-B case-b — chunk 0 (facts)")
    assert "adverse possession of the garden strip" in first


def test_the_first_configured_sink_is_searched_by_default(lb_env, monkeypatch):
    from legal_batch.cli import app

    monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_SINKS", "chroma,pgvector")
    _store("chroma")
    found = CliRunner().invoke(app, ["search", "frustrated contract venue burned", "--k", "1"])
    assert found.exit_code == 0, found.output
    assert "chroma collection legal_batch-" in found.output and "case-c" in found.output
