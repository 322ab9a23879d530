"""Evaluation metrics on plain tensors: STS correlations and full-corpus retrieval (trec_eval definitions)."""

from codiemb_pl.evaluation.retrieval import (
    RETRIEVAL_METRIC_NAMES,
    evaluate_rankings,
    per_query_retrieval_metrics,
    query_metrics,
    rank_corpus,
    retrieval_metrics,
)
from codiemb_pl.evaluation.sts import average_ranks, paired_cosine, pearson, spearman, sts_metrics

__all__ = [
    "RETRIEVAL_METRIC_NAMES",
    "average_ranks",
    "evaluate_rankings",
    "paired_cosine",
    "pearson",
    "per_query_retrieval_metrics",
    "query_metrics",
    "rank_corpus",
    "retrieval_metrics",
    "spearman",
    "sts_metrics",
]
