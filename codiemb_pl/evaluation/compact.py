"""Compact embeddings: int8 and binary quantisation, and how each is scored (sentence-transformers' semantics).

int8 (sentence-transformers' `quantize_embeddings(..., "int8", ranges)`): per dimension j, ranges
[lo_j, hi_j] = min / max over calibration embeddings (training texts, never the test corpus), step_j =
(hi_j − lo_j)/255 (1 where hi_j = lo_j), and

    q_j = clip(⌊(x_j − lo_j)/step_j⌋, 0, 255) − 128   (an int8 code; values outside the range saturate)

Scored as deployed: cosine similarity of the int8 codes (query and documents both quantised).

binary (`quantize_embeddings(..., "binary")`): bit_j = [x_j > 0], packed 8 per byte (`np.packbits`). Both sides
are read as sign vectors s = 2·bit − 1 ∈ {−1, +1}^d, with Hamming distance H(a, b) = (d − s_a·s_b)/2.
STS: cosine of the ±1 vectors, s_a·s_b / d = 1 − 2H/d. Retrieval, as commonly deployed: the corpus is ranked
by Hamming distance to the binary query (ties: lower corpus index first), the first `rescore_depth` candidates
are rescored with the float query, q·s_d (sentence-transformers' rescoring with {0, 1} bits ranks identically:
q·b = (q·s + Σq)/2), and the rest keep their Hamming order.

Bytes per vector: float32 4·d, int8 d, binary ⌈d/8⌉.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PRECISIONS = ("float32", "int8", "binary")
RESCORE_DEPTH = 40          # binary retrieval: top 10 with sentence-transformers' rescore_multiplier 4


def bytes_per_vector(dim: int, precision: str) -> int:
    """Storage of one `dim`-wide vector at `precision`."""
    if precision == "float32":
        return 4 * dim
    if precision == "int8":
        return dim
    if precision == "binary":
        return math.ceil(dim / 8)
    raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")


def int8_ranges(calibration: Tensor) -> Tensor:
    """[2, d]: per-dimension minimum and maximum of the calibration embeddings [n, d] (float32)."""
    if calibration.dim() != 2 or calibration.shape[0] < 2:
        raise ValueError(f"int8 calibration needs at least 2 embeddings [n, d], got shape {tuple(calibration.shape)}")
    values = calibration.detach().float().cpu()
    return torch.stack([values.min(dim=0).values, values.max(dim=0).values])


def quantize_int8(embeddings: Tensor, ranges: Tensor) -> Tensor:
    """int8 codes [n, d] of `embeddings` under `ranges` [2, d] (formula in the module docstring)."""
    values = embeddings.detach().float().cpu()
    if ranges.shape != (2, values.shape[-1]):
        raise ValueError(f"ranges must be [2, {values.shape[-1]}], got {tuple(ranges.shape)}")
    low = ranges[0].float()
    steps = (ranges[1].float() - low) / 255
    steps = torch.where(steps == 0, torch.ones_like(steps), steps)
    codes = torch.clamp(torch.floor((values - low) / steps), 0, 255) - 128
    return codes.to(torch.int8)


def quantize_binary(embeddings: Tensor) -> Tensor:
    """Packed bits [n, ⌈d/8⌉] (uint8, most significant bit first, as `np.packbits`): bit_j = [x_j > 0]."""
    bits = (embeddings.detach().cpu() > 0).to(torch.uint8)
    pad = (-bits.shape[-1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits.view(*bits.shape[:-1], -1, 8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, dim: int) -> Tensor:
    """The ±1 sign vectors [n, dim] (float32) of packed bits [n, ⌈dim/8⌉]."""
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :dim]
    return bits.float() * 2 - 1


def hamming_distances(query_packed: Tensor, corpus_packed: Tensor, dim: int) -> Tensor:
    """H[i, k] = number of differing bits of query i and document k, (dim − s_i·s_k)/2 (int64)."""
    signs_q, signs_c = unpack_signs(query_packed, dim), unpack_signs(corpus_packed, dim)
    return ((dim - signs_q @ signs_c.T) / 2).round().long()


@torch.no_grad()
def binary_rescored_ranking(query_float: Tensor, corpus_packed: Tensor, dim: int, top_k: int,
                            rescore_depth: int = RESCORE_DEPTH, query_block_size: int = 256) -> Tensor:
    """Corpus row indices [q, min(top_k, n)] per query: the Hamming order of the binary query (ties: lower index
    first) with its first `rescore_depth` candidates re-sorted by q·s (ties: Hamming order), cut to `top_k`:
    sentence-transformers' search of top_k · rescore_multiplier binary candidates rescored to top_k when
    rescore_depth ≥ top_k."""
    corpus_signs = unpack_signs(corpus_packed, dim)
    num_docs = corpus_signs.shape[0]
    k = min(top_k, num_docs)
    depth = min(rescore_depth, num_docs)
    rankings = []
    for start in range(0, query_float.shape[0], query_block_size):
        block = query_float[start:start + query_block_size].detach().float().cpu()
        block_signs = unpack_signs(quantize_binary(block), dim)
        distances = torch.round((dim - block_signs @ corpus_signs.T) / 2)
        order = torch.argsort(distances, dim=1, stable=True)[:, :max(k, depth)]
        head = order[:, :depth]
        rescored = torch.einsum("qd,qkd->qk", block, corpus_signs[head])
        resort = torch.argsort(-rescored, dim=1, stable=True)
        rankings.append(torch.cat([torch.gather(head, 1, resort), order[:, depth:]], dim=1)[:, :k])
    return torch.cat(rankings) if rankings else torch.empty(0, k, dtype=torch.long)
