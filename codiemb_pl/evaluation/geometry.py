"""Geometry of an embedding space (SPEC §8, the paper's analysis), on plain tensors.

For an embedding matrix E ∈ R^{n×d} with singular values σ_1 ≥ … ≥ σ_m (m = min(n, d)) and rows
f(x) L2-normalised where a definition says so:

* token-wise similarity = mean over sentences s of the mean pairwise cosine of s's token states,
  (1 / (n_s (n_s − 1))) Σ_{i≠j} cos(h_i, h_j) = (‖Σ_i ĥ_i‖² − n_s) / (n_s (n_s − 1)), ĥ = h/‖h‖;
  sentences with fewer than two tokens are skipped.
* numerical rank     = |{i : σ_i > tol · σ_1}| (default tol = 1e-3: directions carrying less than
  0.1 % of the largest singular value count as collapsed).
* SVD entropy        = −Σ_i p_i log p_i with p_i = σ_i / Σ_j σ_j (natural log; log m at most, for a
  perfectly isotropic spectrum, 0 for a rank-one matrix).
* condition number   = σ_1 / σ_m (inf when σ_m = 0).
* anisotropy         = mean cos(f(x_i), f(x_j)) over random pairs i ≠ j drawn with a seeded generator.
* alignment          = E_{(x,y) positive} ‖f(x) − f(y)‖² (Wang & Isola, α = 2, on normalised f).
* uniformity         = log E_{i<j} exp(−t ‖f(x_i) − f(x_j)‖²), t = 2, over all distinct pairs (normalised f).

Spectral quantities use the raw (uncentred) matrix as SPEC §8 states; all maths is float64 on the CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "token_wise_similarity",
    "singular_values",
    "numerical_rank",
    "svd_entropy",
    "condition_number",
    "anisotropy",
    "alignment",
    "uniformity",
    "embedding_geometry",
    "GEOMETRY_METRIC_NAMES",
]

DEFAULT_RANK_TOLERANCE = 1e-3
GEOMETRY_METRIC_NAMES = ("token_similarity", "numerical_rank", "svd_entropy", "condition_number",
                         "anisotropy", "alignment", "uniformity")


def _as_matrix(embeddings: Tensor, name: str = "embeddings") -> Tensor:
    matrix = torch.as_tensor(embeddings).detach().to(device="cpu", dtype=torch.float64)
    if matrix.dim() != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [n, d] matrix, got shape {tuple(matrix.shape)}")
    return matrix


def token_wise_similarity(token_states: Tensor, attention_mask: Tensor) -> float:
    """Mean over sentences of the mean pairwise cosine between a sentence's (unmasked) token states.

    `token_states` is `[b, t, d]`, `attention_mask` `[b, t]` (1 = token, 0 = padding). NaN when no
    sentence has two tokens.
    """
    if token_states.dim() != 3 or attention_mask.shape != token_states.shape[:2]:
        raise ValueError(f"token_states [b, t, d] and attention_mask [b, t] must agree, got "
                         f"{tuple(token_states.shape)} and {tuple(attention_mask.shape)}")
    states = F.normalize(token_states.detach().to(device="cpu", dtype=torch.float64), dim=-1, eps=1e-12)
    mask = attention_mask.detach().to(device="cpu", dtype=torch.float64)
    counts = mask.sum(dim=1)
    summed = (states * mask.unsqueeze(-1)).sum(dim=1)                  # Σ_i ĥ_i per sentence
    valid = counts >= 2
    if not bool(valid.any()):
        return math.nan
    n = counts[valid]
    per_sentence = ((summed[valid] ** 2).sum(dim=1) - n) / (n * (n - 1))
    return float(per_sentence.mean())


def singular_values(embeddings: Tensor) -> Tensor:
    """Singular values of the (uncentred) embedding matrix, descending, float64."""
    return torch.linalg.svdvals(_as_matrix(embeddings))


def numerical_rank(embeddings: Tensor, tol: float = DEFAULT_RANK_TOLERANCE) -> int:
    """Number of singular values above `tol · σ_max`."""
    sigma = singular_values(embeddings)
    return int((sigma > tol * sigma[0]).sum()) if float(sigma[0]) > 0 else 0


def svd_entropy(embeddings: Tensor) -> float:
    """−Σ p_i log p_i of the normalised singular values p_i = σ_i / Σσ (0·log 0 = 0)."""
    sigma = singular_values(embeddings)
    total = float(sigma.sum())
    if total == 0.0:
        return math.nan
    p = sigma / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def condition_number(embeddings: Tensor) -> float:
    """σ_max / σ_min over the min(n, d) singular values (inf when σ_min is 0)."""
    sigma = singular_values(embeddings)
    smallest = float(sigma[-1])
    return math.inf if smallest == 0.0 else float(sigma[0]) / smallest


def anisotropy(embeddings: Tensor, num_pairs: int = 10_000, seed: int = 0) -> float:
    """Mean cosine similarity of `num_pairs` random pairs of distinct rows (seeded; NaN if n < 2)."""
    matrix = F.normalize(_as_matrix(embeddings), dim=1, eps=1e-12)
    n = matrix.shape[0]
    if n < 2:
        return math.nan
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, n, (num_pairs,), generator=generator)
    offset = torch.randint(1, n, (num_pairs,), generator=generator)   # j = i + offset mod n, never i
    second = (first + offset) % n
    return float((matrix[first] * matrix[second]).sum(dim=1).mean())


def alignment(embeddings_x: Tensor, embeddings_y: Tensor) -> float:
    """E ‖f(x) − f(y)‖² over positive pairs (row i of x with row i of y), f L2-normalised."""
    x = F.normalize(_as_matrix(embeddings_x, "embeddings_x"), dim=1, eps=1e-12)
    y = F.normalize(_as_matrix(embeddings_y, "embeddings_y"), dim=1, eps=1e-12)
    if x.shape != y.shape:
        raise ValueError(f"positive pairs need equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return float(((x - y) ** 2).sum(dim=1).mean())


def uniformity(embeddings: Tensor, t: float = 2.0) -> float:
    """log of the mean of exp(−t ‖f_i − f_j‖²) over all pairs i < j (log-sum-exp, f L2-normalised)."""
    matrix = F.normalize(_as_matrix(embeddings), dim=1, eps=1e-12)
    n = matrix.shape[0]
    if n < 2:
        return math.nan
    squared_distances = torch.pdist(matrix, p=2) ** 2
    return float(torch.logsumexp(-t * squared_distances, dim=0) - math.log(squared_distances.numel()))


def embedding_geometry(embeddings: Tensor, positives_x: Tensor | None = None, positives_y: Tensor | None = None,
                       tol: float = DEFAULT_RANK_TOLERANCE, num_pairs: int = 10_000, seed: int = 0,
                       uniformity_max_points: int = 5_000) -> dict[str, float]:
    """Every embedding-matrix metric of the module (alignment NaN without positive pairs).

    `embeddings` is the whole set (spectrum, anisotropy, uniformity); `positives_x[i]`, `positives_y[i]`
    are the two sides of positive pair i (alignment). Uniformity costs O(n²) memory, so above
    `uniformity_max_points` rows it is computed on a seeded random sample of that many rows.
    """
    matrix = _as_matrix(embeddings)
    sample = matrix
    if matrix.shape[0] > uniformity_max_points:
        rows = torch.randperm(matrix.shape[0], generator=torch.Generator().manual_seed(seed))[:uniformity_max_points]
        sample = matrix[rows]
    has_pairs = positives_x is not None and positives_y is not None and len(positives_x) > 0
    return {
        "numerical_rank": float(numerical_rank(embeddings, tol=tol)),
        "svd_entropy": svd_entropy(embeddings),
        "condition_number": condition_number(embeddings),
        "anisotropy": anisotropy(embeddings, num_pairs=num_pairs, seed=seed),
        "alignment": alignment(positives_x, positives_y) if has_pairs else math.nan,
        "uniformity": uniformity(sample),
    }
