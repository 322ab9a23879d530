"""One step from two task gradients (SPEC §10, joint steps): sum, PCGrad or MGDA on the whole flattened gradient.

Each rule gives g = w_1·g_1 + w_2·g_2 with scalar weights that depend only on the Gram entries of the two
gradients (`gradient_conflict.GradientGram`: g_11 = ‖g_1‖², g_22 = ‖g_2‖², g_12 = g_1·g_2), so the combination of
the flattened gradient is applied parameter by parameter without building the flat vector:

    sum      w = (1, 1)
    pcgrad   (Yu et al. 2020) when g_12 < 0 each gradient loses its component along the other one,
             g_1' = g_1 − (g_12 / g_22)·g_2,   g_2' = g_2 − (g_12 / g_11)·g_1,   g = g_1' + g_2'
             ⇒ w = (1 − g_12 / g_11, 1 − g_12 / g_22); w = (1, 1) when g_12 ≥ 0. With two tasks the paper's
             random pair order does not matter (each gradient is projected against the other's original one),
             so nothing is drawn from any RNG.
    mgda     (Sener & Koltun 2018, two tasks) α* = clip(((g_2 − g_1)·g_2) / ‖g_1 − g_2‖², 0, 1)
                                                = clip((g_22 − g_12) / (g_11 + g_22 − 2·g_12), 0, 1),
             g = α*·g_1 + (1 − α*)·g_2: the min-norm point of the segment [g_1, g_2]; α* = ½ when g_1 = g_2.

‖g‖² = w_1²·g_11 + 2·w_1·w_2·g_12 + w_2²·g_22 (`combined_norm`; MGDA's min-norm point shortens the step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from torch import Tensor

from codiemb_pl.training.gradient_conflict import GradientGram, gram_of

COMBINATIONS = ("sum", "pcgrad", "mgda")


def mgda_alpha(gram: GradientGram) -> float:
    """α* of two-task MGDA (module docstring); ½ when the gradients are equal (every α gives the same point)."""
    distance = gram.g11 + gram.g22 - 2.0 * gram.g12   # ‖g_1 − g_2‖²
    if distance <= 0.0:
        return 0.5
    return min(1.0, max(0.0, (gram.g22 - gram.g12) / distance))


def combination_weights(gram: GradientGram, method: str) -> tuple[float, float]:
    """(w_1, w_2) of `method` (sum | pcgrad | mgda) for gradients with Gram entries `gram`."""
    if method == "sum":
        return 1.0, 1.0
    if method == "pcgrad":
        if gram.g12 >= 0.0:
            return 1.0, 1.0
        return 1.0 - gram.g12 / gram.g11, 1.0 - gram.g12 / gram.g22   # g_12 < 0: both norms are positive
    if method == "mgda":
        alpha = mgda_alpha(gram)
        return alpha, 1.0 - alpha
    raise ValueError(f"unknown gradient combination {method!r}; use one of {', '.join(COMBINATIONS)}")


def combined_norm(gram: GradientGram, weights: tuple[float, float]) -> float:
    """‖w_1·g_1 + w_2·g_2‖ from the Gram entries."""
    w1, w2 = weights
    return math.sqrt(max(0.0, w1 * w1 * gram.g11 + 2.0 * w1 * w2 * gram.g12 + w2 * w2 * gram.g22))


def combine(first: Sequence[Optional[Tensor]], second: Sequence[Optional[Tensor]], method: str
            ) -> tuple[list[Optional[Tensor]], GradientGram, tuple[float, float]]:
    """`method` applied to two gradients given as matching lists of tensors (one per parameter; None = zero):
    (combined tensors, written into `second`'s tensors where they exist; the Gram entries; the weights)."""
    gram = gram_of(first, second)
    weights = combination_weights(gram, method)
    return weighted_sum(first, second, weights), gram, weights


def weighted_sum(first: Sequence[Optional[Tensor]], second: Sequence[Optional[Tensor]],
                 weights: tuple[float, float]) -> list[Optional[Tensor]]:
    """w_1·first + w_2·second per tensor, in place in `second`'s tensors (a new tensor where `second` has None)."""
    w1, w2 = weights
    out: list[Optional[Tensor]] = []
    for a, b in zip(first, second):
        if b is None:
            out.append(None if a is None else a.mul(w1))
        elif a is None:
            out.append(b.mul_(w2))
        else:
            out.append(b.mul_(w2).add_(a.to(b.dtype), alpha=w1))
    return out
