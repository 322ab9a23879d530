"""The independent retrieval scorer for tests: pytrec_eval (trec_eval's C code), used the way MTEB uses it."""

from __future__ import annotations

import pytrec_eval
import torch
import torch.nn.functional as F


def pytrec_eval_metrics(query_emb: torch.Tensor, doc_emb: torch.Tensor, query_ids: list[str], doc_ids: list[str],
                        qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """`{query id: {metric: value}}` from pytrec_eval, named as `evaluation.retrieval` names them.

    MTEB's way: every document's cosine score (float64 here) is the run; pytrec_eval's ndcg_cut.10,
    map_cut.100 and recall.100 on it, and its recip_rank on the run cut to each query's 10 best (MRR@10).
    trec_eval breaks equal scores by document id, not by corpus order: compare on scores without ties.
    """
    scores = (F.normalize(query_emb.double(), dim=1) @ F.normalize(doc_emb.double(), dim=1).T).tolist()
    run = {query_id: dict(zip(doc_ids, row)) for query_id, row in zip(query_ids, scores)}
    top_ten = {query_id: dict(sorted(ranked.items(), key=lambda item: -item[1])[:10])
               for query_id, ranked in run.items()}
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "map_cut.100", "recall.100"}).evaluate(run)
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top_ten)
    return {query_id: {"ndcg_at_10": values["ndcg_cut_10"], "mrr_at_10": reciprocal[query_id]["recip_rank"],
                       "recall_at_100": values["recall_100"], "map_at_100": values["map_cut_100"]}
            for query_id, values in cut.items()}


def deciding_near_ties(query_emb: torch.Tensor, doc_emb: torch.Tensor, query_ids: list[str], doc_ids: list[str],
                       qrels: dict[str, dict[str, int]], depth: int = 101, gap: float = 1e-6) -> list[tuple]:
    """Pairs of neighbours among a query's `depth` best documents whose cosine scores lie within `gap` (float32
    rounding can order them either way, and the tie rules differ: ours corpus order, trec_eval document id)
    AND whose judged relevances differ, so that their order could change a metric at cut-offs ≤ 100.
    Empty means both scorers must agree whatever the rounding."""
    scores = F.normalize(query_emb.double(), dim=1) @ F.normalize(doc_emb.double(), dim=1).T
    top = scores.topk(min(depth, scores.shape[1]), dim=1)
    found = []
    for row, query_id in enumerate(query_ids):
        judged = qrels.get(query_id, {})
        values, indices = top.values[row].tolist(), top.indices[row].tolist()
        for rank in range(len(values) - 1):
            first, second = doc_ids[indices[rank]], doc_ids[indices[rank + 1]]
            if values[rank] - values[rank + 1] < gap and judged.get(first, 0) != judged.get(second, 0):
                found.append((query_id, first, second, values[rank] - values[rank + 1]))
    return found
