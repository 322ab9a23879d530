"""Evaluation metrics against hand-computed values on tiny rankings, and invariants of the ranking."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from codiemb_pl.evaluation import (
    average_ranks,
    evaluate_rankings,
    pearson,
    per_query_retrieval_metrics,
    query_metrics,
    rank_corpus,
    retrieval_metrics,
    spearman,
    sts_metrics,
)

# ----------------------------------------------------------------------------------------------- STS


def loop_average_ranks(values: list[float]) -> list[float]:
    """Reference: rank = 1 + #smaller + (#equal - 1) / 2, by brute force."""
    return [1 + sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2 for x in values]


def loop_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_pearson_hand_computed():
    # x̄ = 2, ȳ = 7/3: Σ xc·yc = 3, Σ xc² = 2, Σ yc² = 42/9  ->  r = 3 / sqrt(84/9) = 9 / sqrt(84)
    assert pearson([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(9 / math.sqrt(84), abs=1e-12)


def test_spearman_hand_computed_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred products sum 4.5, Σ xc² = 4.5, Σ yc² = 5
    assert average_ranks([1.0, 2.0, 2.0, 3.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-12)


def test_spearman_with_many_ties_matches_loop_reference():
    rng = random.Random(0)
    for trial in range(20):
        n = rng.randint(2, 40)
        x = [float(rng.randint(0, 4)) for _ in range(n)]
        y = [float(rng.randint(0, 5)) / 5 for _ in range(n)]
        if len(set(x)) == 1 or len(set(y)) == 1:
            continue
        assert average_ranks(x).tolist() == loop_average_ranks(x)
        expected = loop_pearson(loop_average_ranks(x), loop_average_ranks(y))
        assert spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, abs=1e-12), trial


def test_spearman_matches_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 10, (200,), generator=generator).float()
    y = x + torch.randn(200, generator=generator) * 3
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x.double().numpy(), y.double().numpy()).statistic, abs=1e-12)


def test_constant_input_gives_nan_and_bad_shapes_raise():
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    with pytest.raises(ValueError):
        pearson([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        sts_metrics(torch.randn(3, 4), torch.randn(3, 5), torch.randn(3))
    with pytest.raises(ValueError):
        sts_metrics(torch.randn(3, 4), torch.randn(3, 4), torch.randn(4))


def test_sts_metrics_hand_computed():
    # cosines: pair 0 -> 1, pair 1 -> 0, pair 2 -> cos 45° = 1/√2 (unnormalised rows on purpose)
    emb1 = torch.tensor([[2.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    emb2 = torch.tensor([[5.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    gold = torch.tensor([5.0, 1.0, 2.0])
    cosines = [1.0, 0.0, 1 / math.sqrt(2)]
    metrics = sts_metrics(emb1, emb2, gold)
    assert metrics["cosine_spearman"] == pytest.approx(1.0)       # same order as gold
    assert metrics["cosine_pearson"] == pytest.approx(loop_pearson(cosines, [5.0, 1.0, 2.0]), abs=1e-12)


def test_sts_metrics_invariant_to_row_scale_and_gold_affine_map():
    generator = torch.Generator().manual_seed(2)
    emb1, emb2 = torch.randn(50, 8, generator=generator), torch.randn(50, 8, generator=generator)
    gold = torch.rand(50, generator=generator) * 5
    base = sts_metrics(emb1, emb2, gold)
    scale = torch.rand(50, 1, generator=generator) + 0.1
    moved = sts_metrics(emb1 * scale, emb2 * 3, gold / 5 + 7)
    # inputs are float32, so the scaled copies differ from the originals by rounding only
    assert moved["cosine_spearman"] == pytest.approx(base["cosine_spearman"], abs=1e-6)
    assert moved["cosine_pearson"] == pytest.approx(base["cosine_pearson"], abs=1e-6)


# ------------------------------------------------------------------------------------------ Ranking


def exact_unit_vectors(count: int, generator: torch.Generator) -> torch.Tensor:
    """Rows of ±1 with 16 or 4 non-zeros: norms 4 or 2, so normalised entries and all dot products are
    exact in float32 and equal scores are exactly equal (many ties) whatever the matmul blocking."""
    signs = torch.randint(0, 2, (count, 16), generator=generator).float() * 2 - 1
    sparse = torch.rand(count, generator=generator) < 0.5
    signs[sparse, 4:] = 0
    return signs


def reference_ranking(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int) -> list[list[int]]:
    """Full sort by (score desc, index asc) in float64."""
    queries = torch.nn.functional.normalize(query_emb.double(), dim=1)
    corpus = torch.nn.functional.normalize(corpus_emb.double(), dim=1)
    scores = (queries @ corpus.T).tolist()
    return [sorted(range(len(row)), key=lambda j: (-row[j], j))[:k] for row in scores]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 40, 41, 1000])
@pytest.mark.parametrize("top_k", [1, 5, 41, 60])
def test_chunked_ranking_equals_full_sort(chunk_size: int, top_k: int):
    generator = torch.Generator().manual_seed(3)
    queries, corpus = exact_unit_vectors(6, generator), exact_unit_vectors(41, generator)
    scores, indices = rank_corpus(queries, corpus, top_k=top_k, chunk_size=chunk_size, query_block_size=4)
    k = min(top_k, 41)
    assert indices.shape == scores.shape == (6, k)
    assert indices.tolist() == reference_ranking(queries, corpus, k)
    expected_scores = torch.gather(torch.nn.functional.normalize(queries, dim=1)
                                   @ torch.nn.functional.normalize(corpus, dim=1).T, 1, indices)
    assert torch.equal(scores, expected_scores)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


def test_ties_break_by_lower_corpus_index_whatever_the_chunking():
    corpus = torch.tensor([[1.0, 0.0]] * 7 + [[0.0, 1.0]] * 3)
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    for chunk_size in (1, 2, 3, 10):
        _, indices = rank_corpus(query, corpus, top_k=10, chunk_size=chunk_size)
        assert indices.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [7, 8, 9, 0, 1, 2, 3, 4, 5, 6]]


def test_ranking_is_scale_free_and_top_k_is_clamped():
    generator = torch.Generator().manual_seed(4)
    queries, corpus = torch.randn(3, 8, generator=generator), torch.randn(12, 8, generator=generator)
    scores, indices = rank_corpus(queries, corpus, top_k=1000)
    scaled_scores, scaled_indices = rank_corpus(queries * 5, corpus * (torch.rand(12, 1, generator=generator) + 0.1),
                                                top_k=1000)
    assert indices.shape == (3, 12)
    assert torch.equal(indices, scaled_indices)
    assert torch.allclose(scores, scaled_scores, atol=1e-6)
    assert float(scores.max()) <= 1.0 + 1e-6


# ------------------------------------------------------------------------------------ IR metrics

# Three documents on the unit circle: d0 at 0°, d1 at 30°, d2 at 90°.
DOCS = torch.tensor([[1.0, 0.0], [math.cos(math.pi / 6), math.sin(math.pi / 6)], [0.0, 1.0]])
DOC_IDS = ["d0", "d1", "d2"]
# qA at 0° ranks d0, d1, d2; qB at 90° ranks d2, d1, d0; qC ranks like qA; qD has no judgement.
QUERIES = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [1.0, 1.0]])
QUERY_IDS = ["qA", "qB", "qC", "qD"]
QRELS = {
    "qA": {"d1": 2, "d2": 1},     # ranked relevances [0, 2, 1]
    "qB": {"d2": 1, "d0": 0},     # ranked relevances [1, 0, 0]
    "qC": {"d0": 0},              # judged but nothing relevant: scores 0 everywhere, still averaged
}
# qA: DCG = 2/log2(3) + 1/log2(4); IDCG = 2/log2(2) + 1/log2(3); first relevant at rank 2;
#     both relevant retrieved; AP = (1/2 + 2/3) / 2.
QA_EXPECTED = {
    "ndcg_at_10": (2 / math.log2(3) + 1 / 2) / (2 + 1 / math.log2(3)),
    "mrr_at_10": 0.5,
    "recall_at_100": 1.0,
    "map_at_100": (1 / 2 + 2 / 3) / 2,
}
QB_EXPECTED = {"ndcg_at_10": 1.0, "mrr_at_10": 1.0, "recall_at_100": 1.0, "map_at_100": 1.0}
QC_EXPECTED = {"ndcg_at_10": 0.0, "mrr_at_10": 0.0, "recall_at_100": 0.0, "map_at_100": 0.0}


def test_per_query_metrics_hand_computed():
    per_query = per_query_retrieval_metrics(QUERIES, DOCS, QUERY_IDS, DOC_IDS, QRELS)
    assert set(per_query) == {"qA", "qB", "qC"}           # qD has no judgement: not scored
    for query_id, expected in (("qA", QA_EXPECTED), ("qB", QB_EXPECTED), ("qC", QC_EXPECTED)):
        assert per_query[query_id] == pytest.approx(expected, abs=1e-12), query_id


def test_mean_metrics_hand_computed():
    metrics = retrieval_metrics(QUERIES, DOCS, QUERY_IDS, DOC_IDS, QRELS)
    assert set(metrics) == {"ndcg_at_10", "mrr_at_10", "recall_at_100", "map_at_100"}
    for name, value in metrics.items():
        assert value == pytest.approx((QA_EXPECTED[name] + QB_EXPECTED[name] + QC_EXPECTED[name]) / 3,
                                      abs=1e-12), name
    assert metrics["ndcg_at_10"] == pytest.approx((0.669670 + 1.0) / 3, abs=1e-6)


def test_query_metrics_cutoffs_and_unretrieved_relevant_documents():
    # relevant at ranks 3, 11 and 150, plus one relevant document never retrieved (R = 4)
    ranked = [0] * 200
    ranked[2], ranked[10], ranked[149] = 1, 1, 1
    metrics = query_metrics(ranked, judged_relevances=[1, 1, 1, 1, 0])
    assert metrics["mrr_at_10"] == pytest.approx(1 / 3)
    assert metrics["recall_at_100"] == pytest.approx(2 / 4)
    assert metrics["map_at_100"] == pytest.approx((1 / 3 + 2 / 11) / 4)
    # IDCG@10 over four gains of 1: Σ_{i=1..4} 1/log2(i+1)
    assert metrics["ndcg_at_10"] == pytest.approx((1 / 2) / sum(1 / math.log2(i + 1) for i in range(1, 5)))
    # relevance beyond rank 10 does not reach MRR@10
    assert query_metrics([0] * 10 + [1], [1])["mrr_at_10"] == 0.0


def test_graded_gain_is_the_relevance_itself_not_exponential():
    # ranking [1, 2] vs ideal [2, 1]: trec_eval gain = rel -> (1 + 2/log2 3) / (2 + 1/log2 3)
    metrics = query_metrics([1, 2], [2, 1])
    assert metrics["ndcg_at_10"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_evaluate_rankings_skips_unjudged_queries():
    rankings = {"qA": ["d0", "d1", "d2"], "q-unjudged": ["d0"], "qB": ["d2", "d1", "d0"]}
    per_query = evaluate_rankings(rankings, QRELS)
    assert set(per_query) == {"qA", "qB"}
    assert per_query["qA"] == pytest.approx(QA_EXPECTED)


def test_document_with_the_query_id_is_not_removed():
    # as MTEB with SPEC §8: the document "x" is retrieved for query "x" and counts as relevant
    metrics = retrieval_metrics(torch.tensor([[1.0, 0.0]]), DOCS, ["x"], ["x", "y", "z"], {"x": {"x": 1}})
    assert metrics["ndcg_at_10"] == 1.0 and metrics["mrr_at_10"] == 1.0


def test_small_top_k_still_ranks_the_first_hundred():
    corpus = torch.stack([torch.tensor([math.cos(a), math.sin(a)]) for a in torch.linspace(0, 1.5, 150).tolist()])
    doc_ids = [f"d{i}" for i in range(150)]
    metrics = retrieval_metrics(torch.tensor([[1.0, 0.0]]), corpus, ["q"], doc_ids, {"q": {"d49": 1}}, top_k=10)
    assert metrics["recall_at_100"] == 1.0
    assert metrics["map_at_100"] == pytest.approx(1 / 50)


def test_no_judged_query_gives_nan_and_bad_ids_raise():
    assert all(math.isnan(v) for v in retrieval_metrics(QUERIES, DOCS, QUERY_IDS, DOC_IDS, {}).values())
    with pytest.raises(ValueError):
        retrieval_metrics(QUERIES, DOCS, QUERY_IDS, ["d0", "d0", "d2"], QRELS)
    with pytest.raises(ValueError):
        retrieval_metrics(QUERIES, DOCS, QUERY_IDS[:2], DOC_IDS, QRELS)


def test_metrics_agree_with_brute_force_on_random_rankings():
    rng = random.Random(5)
    generator = torch.Generator().manual_seed(5)
    queries, corpus = torch.randn(8, 6, generator=generator), torch.randn(30, 6, generator=generator)
    doc_ids = [f"d{i}" for i in range(30)]
    qrels = {f"q{i}": {f"d{j}": rng.choice([0, 1, 2, 3]) for j in rng.sample(range(30), 6)} for i in range(8)}
    per_query = per_query_retrieval_metrics(queries, corpus, [f"q{i}" for i in range(8)], doc_ids, qrels)
    full = reference_ranking(queries, corpus, 30)
    for i in range(8):
        judged = qrels[f"q{i}"]
        ranked = [judged.get(doc_ids[j], 0) for j in full[i]]
        ideal = sorted(judged.values(), reverse=True)
        ideal_dcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal[:10]))
        dcg = sum(g / math.log2(r + 2) for r, g in enumerate(ranked[:10]))
        expected_ndcg = dcg / ideal_dcg if ideal_dcg else 0.0
        assert per_query[f"q{i}"]["ndcg_at_10"] == pytest.approx(expected_ndcg, abs=1e-12)
        assert 0.0 <= per_query[f"q{i}"]["map_at_100"] <= per_query[f"q{i}"]["recall_at_100"] <= 1.0


def test_metrics_match_pytrec_eval_with_graded_zero_and_deep_judgements():
    """Against the independent scorer (trec_eval's C code, as MTEB calls it), per query: graded relevance 0-3,
    a query judged only 0, relevant documents below rank 100 (Recall@100 and MAP@100 < their full values)."""
    from pytrec_reference import deciding_near_ties, pytrec_eval_metrics

    rng = random.Random(11)
    generator = torch.Generator().manual_seed(11)
    queries, corpus = torch.randn(24, 16, generator=generator), torch.randn(300, 16, generator=generator)
    query_ids, doc_ids = [f"q{i}" for i in range(24)], [f"doc{i:03d}" for i in range(300)]
    qrels = {query_id: {doc_ids[j]: rng.choice([0, 1, 1, 2, 3]) for j in rng.sample(range(300), rng.randint(1, 40))}
             for query_id in query_ids[:22]}                        # q22, q23 unjudged: not scored
    qrels["q0"] = {doc_id: 0 for doc_id in qrels["q0"]}             # judged, none relevant: scored, all 0
    assert not deciding_near_ties(queries, corpus, query_ids, doc_ids, qrels)   # no tie rule decides anything
    ours = per_query_retrieval_metrics(queries, corpus, query_ids, doc_ids, qrels)
    reference = pytrec_eval_metrics(queries, corpus, query_ids, doc_ids, qrels)
    assert set(ours) == set(reference) == set(query_ids[:22])
    for query_id, values in reference.items():
        assert ours[query_id] == pytest.approx(values, abs=1e-12), query_id
    assert ours["q0"] == {name: 0.0 for name in ours["q0"]}
    assert sum(values["recall_at_100"] < 1 for values in ours.values()) >= 5   # deep relevant documents occur
    assert sum(0 < values["ndcg_at_10"] < 1 for values in ours.values()) >= 5


def test_all_permutations_of_three_documents_ideal_order_scores_one():
    for order in itertools.permutations([2, 1, 0]):
        metrics = query_metrics(list(order), [2, 1, 0])
        assert (metrics["ndcg_at_10"] == pytest.approx(1.0)) == (list(order) == [2, 1, 0])
