"""IR objective: multi-positive InfoNCE with hard and cross-device negatives (SPEC §3).

For positive slot k and local query i (global index g = query_offset + i), with candidates the
k-th positives of all B queries and all B*N hard negatives of the global batch:

    L = 1/P Σ_k 1/b Σ_i −log( exp(s(q_i, d+_{g,k})/τ)
                              / [Σ_j exp(s(q_i, d+_{j,k})/τ) + Σ_{j,m} exp(s(q_i, d−_{j,m})/τ)] )

s is the dot product of already L2-normalised embeddings. A query's own other positive slots are
never candidates (only slot k is used for slot k). Padding negatives (``negative_mask`` False) are
dropped. The optional false-negative mask drops, from query i's denominator, every candidate whose
text id equals one of query i's positive ids, except the target itself, which is never dropped:
so every row keeps a finite logit and the loss stays finite.

Each rank averages over its own b queries; with equal b on every rank, DDP's gradient average
turns this into the mean over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _candidate_logits(queries: Tensor, positives_slot: Tensor, negatives: Tensor | None) -> Tensor:
    """Similarities [b, B + B*N] of queries to [slot positives of all queries] ++ [all negatives]."""
    candidates = positives_slot
    if negatives is not None and negatives.shape[1] > 0:
        candidates = torch.cat([positives_slot, negatives.reshape(-1, negatives.shape[-1])], dim=0)
    return queries @ candidates.T


def _false_negative_mask(
    query_positive_ids: Tensor, positive_slot_ids: Tensor | None, negative_ids: Tensor | None,
    num_positive_columns: int, num_negative_columns: int,
) -> Tensor:
    """Bool [b, B + B*N]: True where a candidate's id equals one of the query's positive ids."""
    b = query_positive_ids.shape[0]
    device = query_positive_ids.device
    blocks = []
    for ids, width in ((positive_slot_ids, num_positive_columns), (negative_ids, num_negative_columns)):
        if width == 0:
            continue
        if ids is None:
            blocks.append(torch.zeros(b, width, dtype=torch.bool, device=device))
            continue
        flat_ids = ids.reshape(-1).to(device)
        # [b, C, P] -> any over the query's P positive ids
        blocks.append((flat_ids[None, :, None] == query_positive_ids[:, None, :]).any(dim=-1))
    return torch.cat(blocks, dim=1)


def multi_positive_info_nce(
    queries: Tensor,
    positives: Tensor,
    negatives: Tensor | None,
    *,
    temperature: float,
    query_offset: int = 0,
    negative_mask: Tensor | None = None,
    query_positive_ids: Tensor | None = None,
    positive_ids: Tensor | None = None,
    negative_ids: Tensor | None = None,
) -> Tensor:
    """Multi-positive InfoNCE of local queries against the (gathered) global candidate batch.

    Args:
        queries: [b, d] local queries, L2-normalised.
        positives: [B, P, d] positives of all B global queries (query-major).
        negatives: [B, N, d] hard negatives of all global queries, or None (in-batch only).
        temperature: τ > 0.
        query_offset: global index of local query 0 (rank * b under DDP).
        negative_mask: [B, N] bool, False where a negative slot is padding.
        query_positive_ids: [b, P] text ids of the local queries' positives; defaults to
            ``positive_ids[query_offset : query_offset + b]`` when ``positive_ids`` is given.
        positive_ids: [B, P] text ids of all positives (enables the false-negative mask).
        negative_ids: [B, N] text ids of all negatives.

    Returns:
        Scalar loss: mean over slots k and local queries of the cross-entropy.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = queries.shape[0]
    num_queries, num_slots = positives.shape[0], positives.shape[1]
    if not 0 <= query_offset <= num_queries - b:
        raise ValueError(f"query_offset {query_offset} with {b} local queries exceeds the {num_queries} global ones")
    if negatives is not None and negatives.shape[1] == 0:
        negatives = None
    num_negative_columns = 0 if negatives is None else negatives.shape[0] * negatives.shape[1]

    targets = torch.arange(query_offset, query_offset + b, device=queries.device)
    excluded = torch.zeros(b, num_queries + num_negative_columns, dtype=torch.bool, device=queries.device)
    if negatives is not None and negative_mask is not None:
        excluded[:, num_queries:] |= ~negative_mask.reshape(1, -1).to(queries.device)

    if query_positive_ids is None and positive_ids is not None:
        query_positive_ids = positive_ids[query_offset: query_offset + b]
    use_false_negative_mask = query_positive_ids is not None and (positive_ids is not None or negative_ids is not None)

    rows = torch.arange(b, device=queries.device)
    slot_losses = []
    for slot in range(num_slots):
        logits = _candidate_logits(queries, positives[:, slot], negatives) / temperature
        slot_excluded = excluded
        if use_false_negative_mask:
            slot_ids = None if positive_ids is None else positive_ids[:, slot]
            negative_id_block = negative_ids if negatives is not None else None
            slot_excluded = excluded | _false_negative_mask(
                query_positive_ids, slot_ids, negative_id_block, num_queries, num_negative_columns)
        slot_excluded = slot_excluded.clone()
        slot_excluded[rows, targets] = False  # the target is never removed
        logits = logits.masked_fill(slot_excluded, float("-inf"))
        slot_losses.append(F.cross_entropy(logits, targets))
    return torch.stack(slot_losses).mean()


@torch.no_grad()
def ir_batch_diagnostics(
    queries: Tensor,
    positives: Tensor,
    negatives: Tensor | None,
    negative_mask: Tensor | None = None,
    query_offset: int = 0,
) -> dict[str, Tensor]:
    """Retrieval diagnostics for positive slot 0 (no gradient).

    Returns:
        ``accuracy``: fraction of local queries whose target scores strictly above every other
        candidate (ties count against it); ``mean_rank_of_positive``: mean 1-based rank,
        rank = 1 + #(other candidates scoring >= target); ``margin``: mean over queries with at
        least one real hard negative of s(q, own pos0) − max s(q, own hard negatives), 0 if none.
    """
    b = queries.shape[0]
    if negatives is not None and negatives.shape[1] == 0:
        negatives = None
    rows = torch.arange(b, device=queries.device)
    targets = rows + query_offset
    scores = _candidate_logits(queries, positives[:, 0], negatives).float()
    valid = torch.ones_like(scores, dtype=torch.bool)
    if negatives is not None and negative_mask is not None:
        valid[:, positives.shape[0]:] = negative_mask.reshape(1, -1).to(queries.device)
    valid[rows, targets] = False  # "other" candidates only
    target_scores = scores[rows, targets]
    beaten_by = ((scores >= target_scores[:, None]) & valid).sum(dim=1)
    rank = beaten_by.float() + 1.0
    accuracy = (beaten_by == 0).float().mean()

    margin = torch.zeros((), device=queries.device)
    if negatives is not None:
        own_negatives = negatives[targets]  # [b, N, d]
        own_scores = torch.einsum("bd,bnd->bn", queries, own_negatives).float()
        if negative_mask is not None:
            own_valid = negative_mask[targets].to(queries.device)
            own_scores = own_scores.masked_fill(~own_valid, float("-inf"))
        hardest = own_scores.max(dim=1).values
        has_negative = torch.isfinite(hardest)
        if has_negative.any():
            margin = (target_scores[has_negative] - hardest[has_negative]).mean()
    return {"accuracy": accuracy, "mean_rank_of_positive": rank.mean(), "margin": margin}
