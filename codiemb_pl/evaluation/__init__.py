"""Evaluation metrics on plain tensors: STS correlations and full-corpus retrieval (trec_eval definitions).

The names below load on first use (PEP 562), so `codiemb_pl.evaluation.tables` (plain-text tables, used by
the commands' `--help`-light paths) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RETRIEVAL_METRIC_NAMES": "retrieval", "evaluate_rankings": "retrieval", "per_query_retrieval_metrics": "retrieval",
    "query_metrics": "retrieval", "rank_corpus": "retrieval", "retrieval_metrics": "retrieval",
    "average_ranks": "sts", "paired_cosine": "sts", "pearson": "sts", "spearman": "sts", "sts_metrics": "sts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
