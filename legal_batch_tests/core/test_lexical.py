"""The local lexical embedding model on text in any script, and the local provider's answer when a
text has nothing to embed (pure, no database)."""

from pathlib import Path

import numpy as np
import pytest

from legal_batch.core.lexical import NoFeatures, embed
from legal_batch.providers.base import EmbeddingRequest
from legal_batch.providers.local import LocalProvider

JUDICIAL_REVIEW_ZH = ("申請人就入境事務處處長拒絕其居留申請的決定提出司法覆核申請。本院認為，處長在作出決定時已考慮所有相關因素，"
                      "該決定並無不合理之處。司法覆核申請駁回。")
THEFT_ZH = "经审理查明，被告人王某在某商场内窃取被害人李某手机一部，价值人民币三千元。本院认为，其行为已构成盗窃罪。"
DRINK_DRIVING_ZH = "被告人罗某酒后驾驶机动车，血液中乙醇含量为每百毫升二百毫克，属醉酒驾驶，其行为已构成危险驾驶罪。"


def cosine(a: str, b: str) -> float:
    return float(embed(a) @ embed(b))


def test_chinese_texts_get_distinct_vectors_that_rank_by_shared_characters():
    vectors = [embed(text) for text in (JUDICIAL_REVIEW_ZH, THEFT_ZH, DRINK_DRIVING_ZH)]
    for vector in vectors:
        assert vector.shape == (1024,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
    assert len({v.tobytes() for v in vectors}) == 3, "each Chinese text has its own vector"
    assert cosine("司法覆核", JUDICIAL_REVIEW_ZH) > 0.2
    assert cosine("司法覆核", JUDICIAL_REVIEW_ZH) > 3 * max(cosine("司法覆核", THEFT_ZH), cosine("司法覆核", DRINK_DRIVING_ZH))
    assert cosine("盗窃手机", THEFT_ZH) > cosine("盗窃手机", DRINK_DRIVING_ZH) + 0.1


def test_full_width_and_case_variants_are_the_same_features():
    assert np.array_equal(embed("ＡＢＣ　Ｌｔｄ ２０１９"), embed("abc ltd 2019"))


def test_inflected_and_shortened_words_still_match():
    base = "the claimant acquired title by adverse possession of the garden"
    assert cosine(base, "she possessed the land adversely for years") > 0.1
    assert cosine(base, "she possessed the land adversely for years") > cosine(base, "drug trafficking sentence") + 0.1


def test_other_alphabets_are_words_too():
    greek = embed("η προσφυγή απορρίπτεται ως αβάσιμη")
    russian = embed("апелляционная жалоба оставлена без удовлетворения")
    assert float(greek @ russian) < 0.2
    assert float(russian @ embed("жалоба оставлена без удовлетворения")) > 0.5


@pytest.mark.parametrize("text", ["the of and", "", "   ", "...", "—", "It is."])
def test_a_text_without_features_has_no_vector(text: str):
    with pytest.raises(NoFeatures, match="no words or characters"):
        embed(text)


def test_the_local_provider_refuses_a_featureless_query_instead_of_matching_everything(tmp_path: Path):
    provider = LocalProvider(tmp_path)
    results = list(provider.realtime([EmbeddingRequest("q1", "the of and"), EmbeddingRequest("q2", "司法覆核")],
                                     endpoint="embeddings", model="local-lexical-v1"))
    assert results[0].vector is None and not results[0].retryable
    assert "no words or characters" in (results[0].error or "")
    assert results[1].vector is not None and results[1].error is None


def test_a_featureless_chunk_fails_its_item_in_a_batch_job(tmp_path: Path):
    provider = LocalProvider(tmp_path / "jobs")
    request_file = tmp_path / "requests.jsonl"
    with request_file.open("wb") as out:
        for custom_id, text in (("chunk-1", "the of and"), ("chunk-2", "司法覆核申請駁回")):
            out.write(provider.format_line(EmbeddingRequest(custom_id, text), endpoint="embeddings",
                                           model="local-lexical-v1"))
    job = provider.submit(request_file=request_file, endpoint="embeddings", model="local-lexical-v1",
                          client_token="t1", shard_key="s1")
    status = provider.poll(job.provider_job_id)
    while status.state not in ("completed", "partial", "failed", "expired"):
        status = provider.poll(job.provider_job_id)
    files = provider.download(job.provider_job_id, status, tmp_path / "out")
    results = {r.custom_id: r for r in provider.iter_results(files, endpoint="embeddings")}
    assert (status.completed, status.failed) == (1, 1)
    assert results["chunk-1"].vector is None and not results["chunk-1"].retryable
    assert "no words or characters" in (results["chunk-1"].error or "")
    assert results["chunk-2"].vector is not None


def test_a_text_whose_features_all_hash_to_one_sign_still_embeds():
    from legal_batch.core.lexical import embed

    for text in ("w12", "x", "7", "法"):
        vector = embed(text, dims=8)
        assert vector.shape == (8,) and abs(float((vector ** 2).sum()) - 1.0) < 1e-5
