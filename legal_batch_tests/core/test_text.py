"""Chunking, token counts, the lexical model and the demo corpus (pure, no database)."""

import re

import numpy as np
import pytest

from legal_batch.core.chunking import chunk_text
from legal_batch.core.demo_corpus import generate_case, generate_cases
from legal_batch.core.lexical import embed
from legal_batch.core.tokens import count_tokens, encoding


def test_offline_cl100k_gives_the_published_token_ids():
    assert encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert count_tokens("Hello world " * 1000) == 2001


def test_chunks_are_exact_slices_under_the_budget_with_overlap():
    text = generate_case(7, 3).full_text
    chunks = chunk_text(text, max_tokens=300, overlap_tokens=40)
    assert len(chunks) > 3
    for previous, chunk in zip(chunks, chunks[1:], strict=False):
        assert chunk.char_start < previous.char_end, "consecutive chunks overlap"
        assert chunk.char_end > previous.char_end
    for chunk in chunks:
        assert chunk.text == text[chunk.char_start : chunk.char_end]
        assert chunk.token_count == count_tokens(chunk.text)
        assert chunk.token_count <= 300 + 5
        assert len(chunk.sha256) == 64
    assert chunks[0].char_start == 0
    assert chunks[-1].char_end == len(text.rstrip()) or chunks[-1].char_end == len(text)


def test_chunks_follow_paragraphs_and_sections():
    text = generate_case(1, 11).full_text
    chunks = chunk_text(text, max_tokens=400, overlap_tokens=0)
    kinds = [c.chunk_type for c in chunks]
    assert kinds[0] == "header"
    assert {"facts", "reasoning", "order"} <= set(kinds)
    assert kinds.index("facts") < kinds.index("reasoning") < kinds.index("order")
    # without overlap, chunks end at paragraph boundaries
    for chunk in chunks[:-1]:
        assert text[chunk.char_end : chunk.char_end + 2] == "\n\n"


def test_a_paragraph_longer_than_the_budget_is_cut_at_token_boundaries():
    text = "1. " + "word " * 3000
    chunks = chunk_text(text, max_tokens=200, overlap_tokens=20)
    assert len(chunks) >= 15
    assert all(c.token_count <= 205 for c in chunks)
    assert "".join(text[c.char_start : c.char_end] for c in chunks).count("word") >= 3000


def test_lexical_embeddings_are_deterministic_unit_vectors_that_rank_similar_text_higher():
    land = embed("adverse possession of land fenced garden twelve years")
    land2 = embed("the plaintiff fenced the garden and acquired possessory title by adverse possession")
    drugs = embed("trafficking in a dangerous drug methamphetamine sentence")
    assert land.shape == (1024,) and land.dtype == np.float32
    assert np.linalg.norm(land) == pytest.approx(1.0, abs=1e-6)
    assert float(land @ land2) > float(land @ drugs) + 0.2
    assert np.array_equal(land, embed("adverse possession of land fenced garden twelve years"))


def test_demo_corpus_is_deterministic_and_looks_like_hong_kong_judgments():
    cases = list(generate_cases(300, seed=42))
    again = generate_case(42, 17)
    assert cases[17] == again
    assert len({c.id for c in cases}) == 300
    for case in cases:
        assert re.fullmatch(r"\[\d{4}\] HK(CFA|CA|CFI|DC) \d+", case.neutral_citation)
        assert case.neutral_citation in case.full_text
        assert " v " in case.case_name
        assert re.search(r"^1\. ", case.full_text, re.M)
    lengths = [len(c.full_text) for c in cases]
    assert min(lengths) >= 2_000 and max(lengths) <= 205_000
    assert max(lengths) > 60_000 and min(lengths) < 8_000, "a realistic spread of lengths"
    assert {c.court for c in cases} == {"Court of Final Appeal", "Court of Appeal", "Court of First Instance",
                                         "District Court"}
