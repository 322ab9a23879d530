"""Fidelity: our loaders + TextEncoder + metrics reproduce MTEB's figures for all-MiniLM-L6-v2 (SPEC §9).

STS-B: the whole test split end to end, Spearman 0.8203 (± 0.002).

SciFact test nDCG@10 0.6451 (± 0.003) is proven in parts that together give the full-corpus figure, since
MTEB's figure is sentence-transformers' embeddings scored by pytrec_eval on SciFact as its loader reads it:

* the loader reads SciFact as MTEB does: `test_data_sources.test_real_scifact` (counts, judgements) and the
  BEIR reader tests (a document is `title + " " + text`);
* encoder equality: `TextEncoder` gives sentence-transformers' embeddings (≤ 1e-5) on SciFact's test queries
  and a few hundred of its documents (most longer than the 256-token window, so truncation is covered);
* metric equality: `retrieval_metrics` gives pytrec_eval's values (the scorer MTEB calls; nDCG@10, MAP@100,
  Recall@100, MRR@10) for every test query on a small judged corpus (every judged document + seeded
  distractors), scored from the same fixed embeddings; hand-computed cases: `test_evaluation_metrics.py`.

The full corpus (5 183 documents, ~5 min on 2 CPU cores) is `python benchmarks/scifact_fidelity.py` (a table;
`--report benchmarks/RESULTS.md` records it there).
"""

from __future__ import annotations

import random

import pytest
import torch

from codiemb_pl.data.sources import SourceConfig, load_ir_corpus, load_sts_pairs
from codiemb_pl.evaluation import per_query_retrieval_metrics, retrieval_metrics, sts_metrics
from codiemb_pl.model.encoder import TextEncoder

from conftest import minilm_path
from pytrec_reference import deciding_near_ties, pytrec_eval_metrics

MTEB_STSB_TEST_SPEARMAN = 0.8203
ENCODE_BATCH_SIZE = 64
JUDGED_CORPUS_SIZE = 400       # SciFact test's 283 judged documents + 117 seeded distractors
ENCODER_CHECK_DOCUMENTS = 256  # of those, compared with sentence-transformers
EMBEDDING_TOLERANCE = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_encoder() -> TextEncoder:
    torch.manual_seed(0)
    encoder = TextEncoder(minilm_path())
    assert encoder.max_seq_length == 256 and encoder.pooling == "mean" and encoder.normalize
    return encoder


def test_stsb_test_spearman_matches_mteb(shared_data, minilm_encoder):
    pairs = load_sts_pairs(SourceConfig(name="stsb", task="sts", path=str(shared_data / "sts/stsb/test.jsonl")))
    assert len(pairs) == 1379
    emb1 = minilm_encoder.encode([pair.text1 for pair in pairs], batch_size=ENCODE_BATCH_SIZE)
    emb2 = minilm_encoder.encode([pair.text2 for pair in pairs], batch_size=ENCODE_BATCH_SIZE)
    metrics = sts_metrics(emb1, emb2, torch.tensor([pair.score for pair in pairs]))
    print(f"STS-B test: {metrics}")
    assert metrics["cosine_spearman"] == pytest.approx(MTEB_STSB_TEST_SPEARMAN, abs=0.002)
    assert 0.80 < metrics["cosine_pearson"] < 0.86


@pytest.fixture(scope="module")
def scifact_judged(shared_data, minilm_encoder) -> dict:
    """SciFact test: every query, a corpus of its judged documents plus seeded distractors (judged first,
    in a seeded order), and our MiniLM embeddings of both."""
    full = load_ir_corpus(SourceConfig(name="scifact", task="ir", path=str(shared_data / "ir/scifact"), split="test"))
    judged = sorted({doc_id for judgements in full.qrels.values() for doc_id in judgements})
    others = sorted(set(full.corpus) - set(judged))
    rng = random.Random(0)
    distractors = rng.sample(others, JUDGED_CORPUS_SIZE - len(judged))
    doc_ids = judged + distractors
    rng.shuffle(doc_ids)
    query_ids = list(full.qrels)
    documents = [full.corpus[doc_id] for doc_id in doc_ids]
    queries = [full.queries[query_id] for query_id in query_ids]
    return {"qrels": full.qrels, "doc_ids": doc_ids, "query_ids": query_ids, "documents": documents,
            "queries": queries, "judged": set(judged),
            "doc_emb": minilm_encoder.encode(documents, batch_size=ENCODE_BATCH_SIZE),
            "query_emb": minilm_encoder.encode(queries, batch_size=ENCODE_BATCH_SIZE)}


def test_scifact_encoder_matches_sentence_transformers(scifact_judged, minilm_encoder):
    """The embeddings MTEB's figure is computed from: sentence-transformers' encode of the same texts."""
    from sentence_transformers import SentenceTransformer

    documents = scifact_judged["documents"][:ENCODER_CHECK_DOCUMENTS]
    tokens = [len(ids) for ids in minilm_encoder.tokenizer(documents)["input_ids"]]
    assert sum(count > minilm_encoder.max_seq_length for count in tokens) > ENCODER_CHECK_DOCUMENTS // 2  # truncated
    reference = SentenceTransformer(minilm_path(), device="cpu")
    assert reference.max_seq_length == minilm_encoder.max_seq_length
    expected_docs = reference.encode(documents, batch_size=ENCODE_BATCH_SIZE, convert_to_tensor=True)
    expected_queries = reference.encode(scifact_judged["queries"], batch_size=ENCODE_BATCH_SIZE, convert_to_tensor=True)
    ours_docs = scifact_judged["doc_emb"][:ENCODER_CHECK_DOCUMENTS]
    doc_gap = (ours_docs - expected_docs).abs().max().item()
    query_gap = (scifact_judged["query_emb"] - expected_queries).abs().max().item()
    print(f"SciFact max |ours - sentence-transformers|: documents {doc_gap:.2e}, queries {query_gap:.2e}")
    assert doc_gap <= EMBEDDING_TOLERANCE and query_gap <= EMBEDDING_TOLERANCE


def test_scifact_retrieval_metrics_match_pytrec_eval(scifact_judged):
    """Our ranking and metrics against the independent scorer, per query, on real embeddings."""
    data = scifact_judged
    # no neighbours among a query's first 101 lie within float32 rounding of each other unless equally
    # relevant, so neither the rounding nor the tie rules (ours: corpus order; trec_eval: document id) decide a value
    assert not deciding_near_ties(data["query_emb"], data["doc_emb"], data["query_ids"], data["doc_ids"], data["qrels"])
    ours = per_query_retrieval_metrics(data["query_emb"], data["doc_emb"], data["query_ids"], data["doc_ids"],
                                       data["qrels"])
    reference = pytrec_eval_metrics(data["query_emb"], data["doc_emb"], data["query_ids"], data["doc_ids"],
                                    data["qrels"])
    assert set(ours) == set(reference) == set(data["query_ids"]) and len(ours) == 300
    for query_id, values in reference.items():
        for name, value in values.items():
            assert ours[query_id][name] == pytest.approx(value, abs=1e-9), (query_id, name)
    # the values span the range (relevant documents at many ranks), so the comparison above is not vacuous
    ndcg = [values["ndcg_at_10"] for values in reference.values()]
    assert min(ndcg) == 0.0 and max(ndcg) == 1.0 and 0.1 < sum(0 < v < 1 for v in ndcg) / len(ndcg)
    means = retrieval_metrics(data["query_emb"], data["doc_emb"], data["query_ids"], data["doc_ids"], data["qrels"])
    for name, mean in means.items():
        assert mean == pytest.approx(sum(values[name] for values in reference.values()) / len(reference), abs=1e-9)
    print(f"SciFact test queries on {len(data['doc_ids'])} documents: {means}")
