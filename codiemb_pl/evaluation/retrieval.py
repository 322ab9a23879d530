"""Full-corpus dense retrieval and its trec_eval metrics (nDCG@10, MRR@10, Recall@100, MAP@100).

Ranking: every query is scored against every document by cosine similarity, in chunks of the corpus
(and blocks of queries) so memory stays bounded by `query_block × (chunk_size + top_k)` scores; a
running top-k is merged with each chunk. Ties are broken deterministically: equal scores are ordered
by ascending corpus index (the earlier document in `doc_ids` ranks first).

Metrics for one query with judged relevances rel(d) (missing judgement = 0), the ranked list
d_1, d_2, ... and R = number of judged documents with rel > 0 (trec_eval definitions):

* nDCG@k   = DCG@k / IDCG@k, DCG@k = Σ_{i≤k} gain(d_i) / log2(i + 1), gain = max(rel, 0) (the graded
             relevance itself, trec_eval's ndcg_cut); IDCG@k is the same sum over the query's judged
             gains sorted in decreasing order; 0 when IDCG@k = 0.
* MRR@k    = 1 / i for the first i ≤ k with rel(d_i) > 0, else 0.
* Recall@k = |{i ≤ k : rel(d_i) > 0}| / R, 0 when R = 0.
* MAP@k    = Σ_{i ≤ k, rel(d_i) > 0} Precision@i / R, Precision@i = |{j ≤ i : rel(d_j) > 0}| / i;
             0 when R = 0 (relevant documents never retrieved count in R, as in trec_eval).

Averaging (as MTEB does with pytrec_eval): a query is scored when it has at least one judgement in
`qrels` and an embedding in `query_ids`; a query whose judgements are all 0 is still scored and
contributes 0 to every metric (trec_eval's convention). Queries without judgements are not scored;
a document whose id equals the query's id is not removed (SPEC §8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "rank_corpus",
    "query_metrics",
    "evaluate_rankings",
    "per_query_retrieval_metrics",
    "retrieval_metrics",
    "RETRIEVAL_METRIC_NAMES",
]

NDCG_CUTOFF = 10
MRR_CUTOFF = 10
RECALL_CUTOFF = 100
MAP_CUTOFF = 100
RETRIEVAL_METRIC_NAMES = ("ndcg_at_10", "mrr_at_10", "recall_at_100", "map_at_100")


def _merge_top_k(best_scores: Tensor, best_indices: Tensor, chunk_scores: Tensor, chunk_indices: Tensor,
                 k: int) -> tuple[Tensor, Tensor]:
    """Keep the k best of (running best ∪ chunk), ordered by score desc then corpus index asc.

    Invariant that makes the stable sort break ties by index: the running list holds equal scores in
    ascending index order, all its indices are below the chunk's, and the chunk is in index order, so
    within every group of equal scores the concatenation is in ascending index order.
    """
    scores = torch.cat([best_scores, chunk_scores], dim=1)
    indices = torch.cat([best_indices, chunk_indices], dim=1)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(scores, 1, order), torch.gather(indices, 1, order)


@torch.no_grad()
def rank_corpus(query_emb: Tensor, corpus_emb: Tensor, top_k: int = 1000, chunk_size: int = 20_000,
                query_block_size: int = 256) -> tuple[Tensor, Tensor]:
    """Top-k corpus documents per query by cosine similarity.

    Returns `(scores[q, k], indices[q, k])` on the CPU (float32 scores, int64 corpus row indices),
    with k = min(top_k, number of documents), best first; equal scores rank the lower corpus index
    first. Embeddings need not be normalised; they are compared in float32 on the corpus's device.
    Peak extra memory is about 12 bytes × query_block_size × (chunk_size + k) (scores + sort order):
    ~65 MB with the defaults.
    """
    if query_emb.dim() != 2 or corpus_emb.dim() != 2 or query_emb.shape[1] != corpus_emb.shape[1]:
        raise ValueError(f"query_emb [q, d] and corpus_emb [n, d] must share d, got "
                         f"{tuple(query_emb.shape)} and {tuple(corpus_emb.shape)}")
    if corpus_emb.shape[0] == 0:
        raise ValueError("corpus_emb is empty: there is nothing to rank")
    if top_k < 1 or chunk_size < 1 or query_block_size < 1:
        raise ValueError(f"top_k, chunk_size and query_block_size must be >= 1, got "
                         f"{top_k}, {chunk_size}, {query_block_size}")
    device = corpus_emb.device
    queries = F.normalize(query_emb.detach().to(device=device, dtype=torch.float32), dim=1)
    corpus = F.normalize(corpus_emb.detach().to(dtype=torch.float32), dim=1)
    num_docs = corpus.shape[0]
    k = min(top_k, num_docs)

    all_scores, all_indices = [], []
    for block_start in range(0, queries.shape[0], query_block_size):
        block = queries[block_start:block_start + query_block_size]
        best_scores = torch.empty(block.shape[0], 0, dtype=torch.float32, device=device)
        best_indices = torch.empty(block.shape[0], 0, dtype=torch.long, device=device)
        for chunk_start in range(0, num_docs, chunk_size):
            chunk = corpus[chunk_start:chunk_start + chunk_size]
            chunk_scores = block @ chunk.T
            chunk_indices = torch.arange(chunk_start, chunk_start + chunk.shape[0], device=device)
            best_scores, best_indices = _merge_top_k(
                best_scores, best_indices, chunk_scores, chunk_indices.expand(block.shape[0], -1), k)
        all_scores.append(best_scores.cpu())
        all_indices.append(best_indices.cpu())
    if not all_scores:
        return torch.empty(0, k, dtype=torch.float32), torch.empty(0, k, dtype=torch.long)
    return torch.cat(all_scores), torch.cat(all_indices)


def query_metrics(ranked_relevances: Sequence[int], judged_relevances: Sequence[int]) -> dict[str, float]:
    """The four metrics for one query (formulas in the module docstring).

    `ranked_relevances[i]` is the judged relevance of the document at rank i + 1 (0 if unjudged);
    `judged_relevances` are all of this query's judgements (retrieved or not).
    """
    num_relevant = sum(1 for rel in judged_relevances if rel > 0)

    dcg = sum(max(rel, 0) / math.log2(rank + 1)
              for rank, rel in enumerate(ranked_relevances[:NDCG_CUTOFF], start=1))
    ideal_gains = sorted((max(rel, 0) for rel in judged_relevances), reverse=True)[:NDCG_CUTOFF]
    ideal_dcg = sum(gain / math.log2(rank + 1) for rank, gain in enumerate(ideal_gains, start=1))
    ndcg = dcg / ideal_dcg if ideal_dcg > 0 else 0.0

    reciprocal_rank = next((1.0 / rank for rank, rel in enumerate(ranked_relevances[:MRR_CUTOFF], start=1)
                            if rel > 0), 0.0)

    relevant_in_top = sum(1 for rel in ranked_relevances[:RECALL_CUTOFF] if rel > 0)
    recall = relevant_in_top / num_relevant if num_relevant else 0.0

    precision_sum, hits = 0.0, 0
    for rank, rel in enumerate(ranked_relevances[:MAP_CUTOFF], start=1):
        if rel > 0:
            hits += 1
            precision_sum += hits / rank
    average_precision = precision_sum / num_relevant if num_relevant else 0.0

    return {"ndcg_at_10": ndcg, "mrr_at_10": reciprocal_rank,
            "recall_at_100": recall, "map_at_100": average_precision}


def evaluate_rankings(rankings: Mapping[str, Sequence[str]],
                      qrels: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, float]]:
    """Per-query metrics for ranked document-id lists: `{query id: {metric: value}}`.

    Only queries present in both `rankings` and `qrels` (with at least one judgement) are scored.
    """
    per_query = {}
    for query_id, ranked_doc_ids in rankings.items():
        judgements = qrels.get(query_id)
        if not judgements:
            continue
        ranked_relevances = [judgements.get(doc_id, 0) for doc_id in ranked_doc_ids]
        per_query[query_id] = query_metrics(ranked_relevances, list(judgements.values()))
    return per_query


Ranker = Callable[[Tensor, int], Tensor]   # (query embeddings [q, d], k) -> corpus row indices [q, k], best first


def per_query_retrieval_metrics(query_emb: Tensor, corpus_emb: Tensor, query_ids: Sequence[str],
                                doc_ids: Sequence[str], qrels: Mapping[str, Mapping[str, int]],
                                top_k: int = 1000, chunk_size: int = 20_000,
                                rank: Ranker | None = None) -> dict[str, dict[str, float]]:
    """Rank the whole corpus for each judged query and return `{query id: {metric: value}}`; `rank` replaces the
    cosine ranking (`rank_corpus`), e.g. binary search with rescoring (`evaluation.compact`)."""
    if len(query_ids) != query_emb.shape[0] or len(doc_ids) != corpus_emb.shape[0]:
        raise ValueError(f"got {len(query_ids)} query ids for {query_emb.shape[0]} query embeddings and "
                         f"{len(doc_ids)} doc ids for {corpus_emb.shape[0]} document embeddings")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("doc_ids contains duplicates: each document must have a unique id")
    if len(set(query_ids)) != len(query_ids):
        raise ValueError("query_ids contains duplicates: each query must have a unique id")
    judged_rows = [row for row, query_id in enumerate(query_ids) if qrels.get(query_id)]
    if not judged_rows:
        return {}
    depth = max(top_k, RECALL_CUTOFF, MAP_CUTOFF)
    if rank is None:
        _, top_indices = rank_corpus(query_emb[judged_rows], corpus_emb, top_k=depth, chunk_size=chunk_size)
    else:
        top_indices = rank(query_emb[judged_rows], depth)
    rankings = {query_ids[row]: [doc_ids[index] for index in indices]
                for row, indices in zip(judged_rows, top_indices.tolist())}
    return evaluate_rankings(rankings, qrels)


def retrieval_metrics(query_emb: Tensor, corpus_emb: Tensor, query_ids: Sequence[str], doc_ids: Sequence[str],
                      qrels: Mapping[str, Mapping[str, int]], top_k: int = 1000,
                      chunk_size: int = 20_000, rank: Ranker | None = None) -> dict[str, float]:
    """Mean over judged queries of nDCG@10, MRR@10, Recall@100 and MAP@100 (NaN if no query is judged)."""
    per_query = per_query_retrieval_metrics(query_emb, corpus_emb, query_ids, doc_ids, qrels,
                                            top_k=top_k, chunk_size=chunk_size, rank=rank)
    if not per_query:
        return {name: math.nan for name in RETRIEVAL_METRIC_NAMES}
    return {name: sum(values[name] for values in per_query.values()) / len(per_query)
            for name in RETRIEVAL_METRIC_NAMES}
