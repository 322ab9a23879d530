"""Fidelity: our loaders + TextEncoder + metrics reproduce MTEB's figures for all-MiniLM-L6-v2 (SPEC §9).

STS-B test Spearman 0.8203 (± 0.002) and SciFact test nDCG@10 0.6451 (± 0.003). Encoding SciFact's
5183 documents takes a couple of minutes on a CPU, hence `slow` (CI still runs it).
"""

from __future__ import annotations

import time

import pytest
import torch

from codiemb_pl.data.sources import SourceConfig, load_ir_corpus, load_sts_pairs
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.evaluation import retrieval_metrics, sts_metrics

from conftest import minilm_path

MTEB_STSB_TEST_SPEARMAN = 0.8203
MTEB_SCIFACT_TEST_NDCG_AT_10 = 0.6451
ENCODE_BATCH_SIZE = 64

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


def test_scifact_test_ndcg_matches_mteb(shared_data, minilm_encoder):
    retrieval_set = load_ir_corpus(SourceConfig(name="scifact", task="ir", path=str(shared_data / "ir/scifact"),
                                                split="test"))
    assert (len(retrieval_set.corpus), len(retrieval_set.qrels)) == (5183, 300)
    query_ids, doc_ids = list(retrieval_set.qrels), list(retrieval_set.corpus)
    started = time.perf_counter()
    query_emb = minilm_encoder.encode([retrieval_set.queries[qid] for qid in query_ids], batch_size=ENCODE_BATCH_SIZE)
    corpus_emb = minilm_encoder.encode([retrieval_set.corpus[did] for did in doc_ids], batch_size=ENCODE_BATCH_SIZE)
    encoded = time.perf_counter()
    metrics = retrieval_metrics(query_emb, corpus_emb, query_ids, doc_ids, retrieval_set.qrels)
    print(f"SciFact test: {metrics} (encode {encoded - started:.0f} s, metrics {time.perf_counter() - encoded:.2f} s)")
    assert metrics["ndcg_at_10"] == pytest.approx(MTEB_SCIFACT_TEST_NDCG_AT_10, abs=0.003)
    # SciFact has few relevant documents per query: recall@100 is high and MAP sits just under nDCG.
    assert metrics["recall_at_100"] > 0.85
    assert metrics["map_at_100"] < metrics["ndcg_at_10"]
    assert metrics["mrr_at_10"] > metrics["map_at_100"] - 1e-9
