"""Embedding widths: the prefix rule, the `@<dim>` key suffix, and the trained widths an exported folder records.

A Matryoshka-trained encoder (`model.matryoshka_dims`, `losses/matryoshka.py`) is used at a width m by keeping
the first m coordinates of every embedding:

    P_m(e) = e[:m] / ‖e[:m]‖   (re-normalised: cosine and dot product agree again)   or   e[:m]   (truncated only)

Cosine-based scores are the same either way; sentence-transformers' `truncate_dim` truncates without
re-normalising. Metrics and logs at a width carry the suffix `@<dim>`, at a compact precision `:<precision>`
(`val/stsb/cosine_spearman@64`, `ndcg_at_10@128:int8`; `metric_key`). An export records its trained widths as
`matryoshka_dims` in `config_sentence_transformers.json` (sentence-transformers ignores the key; `truncate_dim`
is left unset so the model loads at full width). Plain functions; torch is imported by `truncate` only (the
command-line tables read the key grammar).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from codiemb_pl.errors import InputError

if TYPE_CHECKING:
    from torch import Tensor

RECORD_KEY = "matryoshka_dims"          # in config_sentence_transformers.json
FULL_PRECISION = "float32"
_METRIC_KEY = re.compile(r"^(?P<key>[^@:]+)(@(?P<dim>[1-9][0-9]*))?(:(?P<precision>[a-z0-9]+))?$")


def truncate(embeddings: "Tensor", dim: Optional[int], renormalize: bool = True) -> "Tensor":
    """P_dim: the first `dim` coordinates of every row (last axis), re-normalised to unit length when
    `renormalize`; the tensor itself when `dim` is None or not below the full width."""
    if dim is None or dim >= embeddings.shape[-1]:
        return embeddings
    import torch.nn.functional as F

    part = embeddings[..., :dim]
    return F.normalize(part, p=2, dim=-1) if renormalize else part


def metric_key(key: str, dim: Optional[int] = None, precision: str = FULL_PRECISION) -> str:
    """`key@dim:precision`, leaving out the full width (None) and float32."""
    key = key if dim is None else f"{key}@{dim}"
    return key if precision == FULL_PRECISION else f"{key}:{precision}"


def split_metric_key(key: str) -> tuple[str, Optional[int], str]:
    """(key, width or None, precision) of `key@dim:precision` (`metric_key`'s inverse)."""
    match = _METRIC_KEY.match(key)
    if match is None:
        return key, None, FULL_PRECISION
    return match["key"], int(match["dim"]) if match["dim"] else None, match["precision"] or FULL_PRECISION


def check_dims(dims: Any, where: str, embedding_dim: Optional[int] = None) -> list[int]:
    """`dims` as a list of distinct integers in [1, embedding_dim], largest first (one InputError line otherwise)."""
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or \
            not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise InputError(where, f"expected a list of integers, got {dims!r}", "e.g. [384, 256, 128, 64]")
    values = [int(d) for d in dims]
    bad = [d for d in values if d < 1 or (embedding_dim is not None and d > embedding_dim)]
    if bad:
        limit = f"1 to the embedding dimension {embedding_dim}" if embedding_dim else "positive integers"
        raise InputError(where, f"width {bad[0]} is out of range", f"use widths from {limit}")
    if len(set(values)) != len(values):
        raise InputError(where, f"{values} lists a width twice", "list each width once")
    return sorted(values, reverse=True)


def check_width(dim: Optional[int], embedding_dim: int, where: str) -> Optional[int]:
    """One width for truncation: None (full width) or an integer in [1, embedding_dim]."""
    if dim is None:
        return None
    return check_dims([dim], where, embedding_dim)[0]


def trained_dims_of(config: Any, where: str) -> list[int]:
    """The widths a `config_sentence_transformers.json` content records (`RECORD_KEY`), checked; [] when none."""
    dims = config.get(RECORD_KEY) if isinstance(config, dict) else None
    return check_dims(dims, f"{where}: {RECORD_KEY}") if dims else []


def members_trained_dims(members: Sequence[tuple[str, Optional[Sequence[int]]]]
                         ) -> tuple[Optional[list[int]], list[str]]:
    """(widths, notes) of a model fused from `members` ((label, recorded widths or None)): the widths every member
    was trained at (None when they share none), and a note when members differ (a width missing from one member is
    not claimed for the merge)."""
    if not any(dims for _, dims in members):
        return None, []
    shared = set.intersection(*(set(dims or ()) for _, dims in members))
    notes = []
    if any(set(dims or ()) != shared for _, dims in members):
        notes.append("members record different Matryoshka widths ("
                     + "; ".join(f"{label}: {list(dims) if dims else 'none'}" for label, dims in members)
                     + f"): the merge records the widths all of them share, {sorted(shared, reverse=True) or 'none'}")
    return (sorted(shared, reverse=True) or None), notes
