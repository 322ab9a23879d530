"""STS objective: order-aware losses on one batch of scored pairs (SPEC §4).

``pred`` [n] are cosine similarities p_i = s(e(x1_i), e(x2_i)); ``target`` [n] are gold scores y_i
in [0, 1]. Every loss returns a scalar that stays connected to ``pred`` (zero-valued when the batch
carries no signal) so callers can always call ``backward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from codiemb_pl.errors import InputError

PRO_MIN_GAP = 1e-8


def _zero_like_loss(pred: Tensor) -> Tensor:
    """A zero scalar that keeps the graph to ``pred`` (so backward works and yields zero grads)."""
    return pred.sum() * 0.0


def pearson_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """L_P = 1 − ρ(p, y), population statistics.

    ρ = mean(p̃ ỹ) / sqrt((var p + eps)(var y + eps)), p̃ = p − mean p, ỹ = y − mean y. The eps
    keeps the gradient finite for constant predictions. 0 when y has fewer than 2 distinct values.
    """
    target = target.to(pred.dtype)
    if torch.unique(target).numel() < 2:
        return _zero_like_loss(pred)
    pred_centered = pred - pred.mean()
    target_centered = target - target.mean()
    covariance = (pred_centered * target_centered).mean()
    variance_product = (pred_centered.pow(2).mean() + eps) * (target_centered.pow(2).mean() + eps)
    return 1.0 - covariance / variance_product.sqrt()


def descending_average_ranks(values: Tensor) -> Tensor:
    """0-based ranks in descending order, ties share their average rank (rank 0 = largest).

    rank_i = #{j : v_j > v_i} + (#{j : v_j = v_i} − 1) / 2.
    """
    greater = (values[None, :] > values[:, None]).sum(dim=1)
    equal = (values[None, :] == values[:, None]).sum(dim=1)
    return greater.to(values.dtype) + (equal.to(values.dtype) - 1.0) / 2.0


def rank_kl_loss(pred: Tensor, target: Tensor, temperature: float = 0.05) -> Tensor:
    """L_KL = (1/n) Σ_i π_i (log π_i − log q_i).

    z_i = (n−1−rank_i)/(n−1) from descending average-tie ranks of y, π = softmax(z/τ),
    q = softmax(p/τ). 0 when n < 2.
    """
    n = pred.shape[0]
    if n < 2:
        return _zero_like_loss(pred)
    ranks = descending_average_ranks(target.to(pred.dtype))
    scaled_ranks = (n - 1 - ranks) / (n - 1)
    log_target = F.log_softmax(scaled_ranks / temperature, dim=0)
    log_pred = F.log_softmax(pred / temperature, dim=0)
    return (log_target.exp() * (log_target - log_pred)).sum() / n


def pro_loss(pred: Tensor, target: Tensor, temperature: float = 0.05) -> Tensor:
    """PRO: L = −1/|K| Σ_{k∈K} log( e^{w_k s_k} / (e^{w_k s_k} + Σ_{j∈J_k} e^{w_j s_j}) ).

    Pairs sorted by y descending; J_k = {j : y_k − y_j > 1e-8} (the strictly worse, later items),
    w_j = y_k − y_j, w_k = max_{j∈J_k} w_j, s = p/τ; K = positions with non-empty J_k; 0 if K empty.
    Vectorised over (k, j) with masking.
    """
    target = target.to(pred.dtype)
    order = torch.argsort(target, descending=True, stable=True)
    y = target[order]
    logits = pred[order] / temperature
    gaps = y[:, None] - y[None, :]                                    # [k, j] = y_k − y_j
    later_worse = gaps > PRO_MIN_GAP
    has_worse = later_worse.any(dim=1)
    if not has_worse.any():
        return _zero_like_loss(pred)
    worse_terms = (gaps * logits[None, :]).masked_fill(~later_worse, float("-inf"))
    anchor_weight = gaps.masked_fill(~later_worse, 0.0).max(dim=1).values
    anchor_term = anchor_weight * logits
    log_denominator = torch.logsumexp(torch.cat([anchor_term[:, None], worse_terms], dim=1), dim=1)
    return (log_denominator - anchor_term)[has_worse].mean()


def mid_nce_loss(
    emb1: Tensor, emb2: Tensor, target: Tensor, threshold: float = 0.8, temperature: float = 0.02,
) -> Tensor:
    """In-batch InfoNCE x1_i → x2_j over the pairs with y ≥ threshold (cosine similarity).

    With S the selected pairs: L = 1/|S| Σ_{i∈S} −log( e^{s(x1_i,x2_i)/τ} / Σ_{j∈S} e^{s(x1_i,x2_j)/τ} ).
    Embeddings are L2-normalised here (middle-layer states usually are not). 0 when S is empty.
    """
    selected = target >= threshold
    if not selected.any():
        return _zero_like_loss(emb1) + _zero_like_loss(emb2)
    anchors = F.normalize(emb1[selected], dim=-1)
    candidates = F.normalize(emb2[selected], dim=-1)
    logits = anchors @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def cosent_loss(pred: Tensor, target: Tensor, scale: float = 20.0) -> Tensor:
    """CoSENT: log(1 + Σ_{(a,b): y_a < y_b} exp((p_a − p_b)·scale)); 0 when no ordered pair."""
    target = target.to(pred.dtype)
    wrongly_ordered = target[:, None] < target[None, :]              # [a, b]: y_a < y_b
    differences = ((pred[:, None] - pred[None, :]) * scale)[wrongly_ordered]
    with_one = torch.cat([differences.new_zeros(1), differences])    # e^0 = the "1 +"
    return torch.logsumexp(with_one, dim=0) + _zero_like_loss(pred)


@dataclass
class STSLossConfig:
    """Weights (per component) and hyper-parameters of the combined STS loss; reference defaults.

    Attributes:
        pearson: weight of the Pearson loss 1 − ρ(p, y).
        rank_kl: weight of the rank-KL loss.
        pro: weight of the PRO (preference ranking) loss.
        mid_nce: weight of MidNCE, the InfoNCE on middle-layer embeddings.
        cosent: weight of CoSENT (0 in CoDiEmb's combination).
        rank_kl_temperature: τ_r of the rank-KL softmaxes.
        pro_temperature: τ_p of PRO's logits.
        mid_nce_temperature: τ of MidNCE.
        mid_nce_threshold: minimum normalised score of a pair MidNCE treats as a positive.
        cosent_scale: CoSENT's scale (1 / its temperature).
    """

    pearson: float = 2.0
    rank_kl: float = 5.0
    pro: float = 0.5
    mid_nce: float = 1.0
    cosent: float = 0.0
    rank_kl_temperature: float = 0.05
    pro_temperature: float = 0.05
    mid_nce_temperature: float = 0.02
    mid_nce_threshold: float = 0.8
    cosent_scale: float = 20.0

    def __post_init__(self) -> None:
        for name in ("pearson", "rank_kl", "pro", "mid_nce", "cosent"):
            if getattr(self, name) < 0:
                raise InputError(f"STSLossConfig.{name}", f"weight {getattr(self, name)} is negative",
                                 "use a weight >= 0 (0 disables the component)")
        for name in ("rank_kl_temperature", "pro_temperature", "mid_nce_temperature", "cosent_scale"):
            if getattr(self, name) <= 0:
                raise InputError(f"STSLossConfig.{name}", f"{getattr(self, name)} is not positive",
                                 "use a value > 0")


def sts_loss(
    pred: Tensor, target: Tensor, config: STSLossConfig | None = None,
    mid1: Tensor | None = None, mid2: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted STS loss: Σ_c weight_c · L_c over components with a non-zero weight.

    Reference: 2·L_P + 5·L_KL + 0.5·L_PRO + 1·L_MidNCE. MidNCE needs the middle-layer embeddings
    ``mid1``/``mid2``; without them it is skipped. Returns ``(total, components)``, components
    being the unweighted, detached values keyed ``pearson``, ``rank_kl``, ``pro``, ``mid_nce``,
    ``cosent`` (only those with a non-zero weight, and ``mid_nce`` only when computed).
    """
    config = config or STSLossConfig()
    component_fns = {
        "pearson": lambda: pearson_loss(pred, target),
        "rank_kl": lambda: rank_kl_loss(pred, target, config.rank_kl_temperature),
        "pro": lambda: pro_loss(pred, target, config.pro_temperature),
        "cosent": lambda: cosent_loss(pred, target, config.cosent_scale),
    }
    if mid1 is not None and mid2 is not None:
        component_fns["mid_nce"] = lambda: mid_nce_loss(
            mid1, mid2, target, config.mid_nce_threshold, config.mid_nce_temperature)
    total = _zero_like_loss(pred)
    components: dict[str, Tensor] = {}
    for name, compute in component_fns.items():
        weight = getattr(config, name)
        if weight == 0:
            continue
        value = compute()
        total = total + weight * value
        components[name] = value.detach()
    return total, components


