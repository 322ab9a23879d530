"""Matryoshka training (Kusupati et al. 2022; SPEC §10): one objective scored on nested prefixes of the embeddings.

For widths m_1 > m_2 > … > m_k and weights w_j, with E the embeddings of one forward pass:

    L = Σ_j w_j · L_task(P_{m_j}(E)),   P_m(e) = e[:m] / ‖e[:m]‖   (e[:m] when the encoder does not normalise)

(`model.widths.truncate`). The losses read dot products of unit vectors as cosines, so each prefix is
re-normalised when the encoder normalises; the full width passes through untouched, so widths = [d] is plain
training. The gradient reaching E is Σ_j w_j ∂L_task(P_{m_j}(E))/∂E, which is what the gradient cache stores and
replays (`training/grad_cache.py`). Cross-device gathers run once at full width and the prefixes are sliced from
the gathered tensors (`losses/objectives.py`). Plain tensors, no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.model.widths import metric_key, check_dims, truncate


@dataclass(frozen=True)
class MatryoshkaWidths:
    """The trained widths, largest first, their loss weights, and whether prefixes are re-normalised."""

    dims: tuple[int, ...]
    weights: tuple[float, ...]
    renormalize: bool = True

    def prefix(self, embeddings: Tensor, dim: Optional[int]) -> Tensor:
        """P_dim of `embeddings` (see the module docstring)."""
        return truncate(embeddings, dim, self.renormalize)


def matryoshka_widths(dims: Optional[Sequence[int]], weights: Optional[Sequence[float]] = None, *,
                      embedding_dim: Optional[int] = None, renormalize: bool = True) -> Optional[MatryoshkaWidths]:
    """`model.matryoshka_dims` / `model.matryoshka_weights` checked (distinct widths in [1, embedding_dim]; one
    finite weight ≥ 0 per width, not all 0, default 1 each) and sorted largest first; None without widths."""
    if not dims:
        if weights:
            raise InputError("model.matryoshka_weights", "weights given without model.matryoshka_dims",
                             "set model.matryoshka_dims (e.g. [384, 256, 128, 64]) or drop the weights")
        return None
    ordered = check_dims(dims, "model.matryoshka_dims", embedding_dim)
    given = [float(w) for w in weights] if weights is not None else [1.0] * len(ordered)
    if len(given) != len(ordered):
        raise InputError("model.matryoshka_weights", f"{len(given)} weights for {len(ordered)} widths",
                         "give one weight per width of model.matryoshka_dims, in the same order")
    if any(not 0.0 <= w < float("inf") for w in given) or not any(given):
        raise InputError("model.matryoshka_weights", f"{given}: a negative or non-finite weight, or only zeros",
                         "use finite weights >= 0, at least one above 0 (default: 1 each)")
    weight_of = dict(zip([int(d) for d in dims], given))
    return MatryoshkaWidths(tuple(ordered), tuple(weight_of[d] for d in ordered), renormalize)


def over_widths(loss_at: Callable[[Optional[int]], Tensor], widths: Optional[MatryoshkaWidths]
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """(Σ_j w_j · loss_at(m_j), {"loss@m_j": loss_at(m_j) detached}); (`loss_at(None)`, {}) without widths."""
    if widths is None:
        return loss_at(None), {}
    total: Optional[Tensor] = None
    logs: dict[str, Tensor] = {}
    for dim, weight in zip(widths.dims, widths.weights):
        value = loss_at(dim)
        logs[metric_key("loss", dim)] = value.detach()
        total = weight * value if total is None else total + weight * value
    assert total is not None
    return total, logs
