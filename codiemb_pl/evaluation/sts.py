"""Semantic textual similarity metrics: correlation of the pairs' cosine similarity with gold scores.

Definitions (as SciPy / MTEB compute them, for a sample of n pairs):

* Pearson  r(x, y) = Σ (x_i - x̄)(y_i - ȳ) / sqrt(Σ (x_i - x̄)² · Σ (y_i - ȳ)²)
* Spearman ρ(x, y) = r(rank(x), rank(y)), where tied values share the average of the ranks they
  occupy (a run of t equal values at positions p..p+t-1 of the ascending order all get p + (t-1)/2).

Everything is computed in float64 on the CPU; a constant input (zero variance) gives NaN, as SciPy does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["average_ranks", "pearson", "spearman", "paired_cosine", "sts_metrics"]


def _as_float64_vector(values: Tensor | list[float], name: str) -> Tensor:
    vector = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)
    if vector.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(vector.shape)}")
    return vector


def _check_same_length(x: Tensor, y: Tensor) -> None:
    if x.numel() != y.numel():
        raise ValueError(f"x and y must have the same length, got {x.numel()} and {y.numel()}")
    if x.numel() < 2:
        raise ValueError(f"a correlation needs at least 2 values, got {x.numel()}")


def average_ranks(values: Tensor | list[float]) -> Tensor:
    """1-based ranks of `values` (ascending), ties sharing the mean of the ranks they span (float64)."""
    vector = _as_float64_vector(values, "values")
    order = torch.argsort(vector, stable=True)
    sorted_values = vector[order]
    _, run_lengths = torch.unique_consecutive(sorted_values, return_counts=True)
    run_starts = torch.cumsum(run_lengths, dim=0) - run_lengths          # 0-based first position of each run
    run_mean_rank = run_starts.to(torch.float64) + (run_lengths.to(torch.float64) + 1.0) / 2.0
    ranks = torch.empty_like(vector)
    ranks[order] = torch.repeat_interleave(run_mean_rank, run_lengths)
    return ranks


def pearson(x: Tensor | list[float], y: Tensor | list[float]) -> float:
    """Pearson correlation r = cov(x, y) / (std(x) · std(y)); NaN if either input is constant."""
    x64, y64 = _as_float64_vector(x, "x"), _as_float64_vector(y, "y")
    _check_same_length(x64, y64)
    x_centred, y_centred = x64 - x64.mean(), y64 - y64.mean()
    denominator = torch.sqrt((x_centred * x_centred).sum() * (y_centred * y_centred).sum()).item()
    if denominator == 0.0:
        return math.nan
    r = (x_centred * y_centred).sum().item() / denominator
    return max(-1.0, min(1.0, r))


def spearman(x: Tensor | list[float], y: Tensor | list[float]) -> float:
    """Spearman rank correlation: Pearson of the average-tie ranks of x and y."""
    x64, y64 = _as_float64_vector(x, "x"), _as_float64_vector(y, "y")
    _check_same_length(x64, y64)
    return pearson(average_ranks(x64), average_ranks(y64))


def paired_cosine(emb1: Tensor, emb2: Tensor) -> Tensor:
    """Row-wise cosine similarity cos(a_i, b_i) = a_i·b_i / (|a_i| |b_i|) of two [n, d] matrices (float64, CPU)."""
    if emb1.dim() != 2 or emb1.shape != emb2.shape:
        raise ValueError(f"emb1 and emb2 must both be [n, d] with equal shapes, got "
                         f"{tuple(emb1.shape)} and {tuple(emb2.shape)}")
    a = emb1.detach().to(device="cpu", dtype=torch.float64)
    b = emb2.detach().to(device="cpu", dtype=torch.float64)
    return F.cosine_similarity(a, b, dim=1, eps=1e-12)


STS_METRIC_NAMES = ("cosine_spearman", "cosine_pearson")


def sts_metrics(emb1: Tensor, emb2: Tensor, gold: Tensor | list[float]) -> dict[str, float]:
    """Spearman and Pearson correlation between the pairs' cosine similarity and the gold scores.

    `emb1[i]`, `emb2[i]` embed the two sides of pair i (normalised or not); `gold[i]` is its score on
    any scale (correlations are scale-free). Returns {"cosine_spearman", "cosine_pearson"} (MTEB's names).
    """
    cosine = paired_cosine(emb1, emb2)
    gold64 = _as_float64_vector(gold, "gold")
    if gold64.numel() != cosine.numel():
        raise ValueError(f"gold has {gold64.numel()} scores for {cosine.numel()} embedding pairs")
    return dict(zip(STS_METRIC_NAMES, (spearman(cosine, gold64), pearson(cosine, gold64))))
