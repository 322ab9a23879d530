"""Scores of one evaluation set at smaller widths and compact precisions, from its full-width float32 embeddings.

A variant is (width m, precision): every embedding is cut to its prefix P_m (`model.widths.truncate`,
re-normalised), then stored as float32, int8 or binary (`evaluation.compact`) and scored as deployed. Its
metrics are keyed `metric@m` (width) and `metric@m:int8` / `metric:binary` (precision; float32 and the full
width add nothing; `model.widths.metric_key`), so `flat_metrics` gives `val/stsb/cosine_spearman@64` and
`summary_metrics` `val/avg@64`. One encoding pass serves every variant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

from torch import Tensor

from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.evaluation.compact import (PRECISIONS, RESCORE_DEPTH, binary_rescored_ranking, int8_ranges,
                                           quantize_binary, quantize_int8, unpack_signs)
from codiemb_pl.evaluation.retrieval import retrieval_metrics
from codiemb_pl.evaluation.suite import score_set
from codiemb_pl.model.widths import metric_key, truncate

Variant = tuple[Optional[int], str]   # (width or None = full, precision)


def calibration_ranges(calibration: Tensor, dims: Sequence[Optional[int]]) -> dict[Optional[int], Tensor]:
    """int8 ranges at each width, from full-width calibration embeddings (training texts) cut to that width."""
    return {dim: int8_ranges(truncate(calibration.float(), dim)) for dim in dims}


def compact_embeddings(embeddings: Tensor, dim: Optional[int], precision: str,
                       ranges: Optional[Tensor] = None) -> Tensor:
    """What the scorer compares at (dim, precision), as float32: the prefix, its int8 codes, or its ±1 signs."""
    cut = truncate(embeddings.float(), dim)
    if precision == "float32":
        return cut
    if precision == "int8":
        if ranges is None:
            raise ValueError("int8 needs ranges calibrated on training texts (calibration_ranges)")
        return quantize_int8(cut, ranges).float()
    if precision == "binary":
        return unpack_signs(quantize_binary(cut), cut.shape[-1])
    raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")


def score_variant(vset: EvalSet, embeddings: Mapping[str, Tensor], dim: Optional[int], precision: str = "float32",
                  ranges: Optional[Tensor] = None, rescore_depth: int = RESCORE_DEPTH) -> dict[str, float]:
    """The metrics of `vset` at (dim, precision) (module docstring); binary retrieval ranks by Hamming distance and
    rescores the first `rescore_depth` candidates with the float query (`compact.binary_rescored_ranking`)."""
    if vset.task == "ir" and precision == "binary":
        query = truncate(embeddings["query"].float(), dim)
        packed = quantize_binary(truncate(embeddings["corpus"].float(), dim))
        width = query.shape[-1]
        return retrieval_metrics(query, unpack_signs(packed, width), vset.query_ids, vset.doc_ids, vset.qrels,
                                 rank=lambda queries, k: binary_rescored_ranking(queries, packed, width, k,
                                                                                 rescore_depth))
    return score_set(vset, {name: compact_embeddings(value, dim, precision, ranges)
                            for name, value in embeddings.items()})


def variant_metrics(vset: EvalSet, embeddings: Mapping[str, Tensor], variants: Sequence[Variant],
                    ranges: Optional[Mapping[Optional[int], Tensor]] = None) -> dict[str, float]:
    """{metric_key(metric, dim, precision): value} of every variant (the full-width float32 one adds the plain
    keys); `ranges` ({width: int8 ranges}, `calibration_ranges`) is needed for int8 variants."""
    out: dict[str, float] = {}
    for dim, precision in variants:
        scored = score_variant(vset, embeddings, dim, precision, (ranges or {}).get(dim))
        out.update({metric_key(metric, dim, precision): value for metric, value in scored.items()})
    return out


def smaller_widths(dims: Sequence[int], full: int) -> list[int]:
    """The widths of `dims` below `full`, largest first (the full width is scored as the plain keys)."""
    return sorted({int(d) for d in dims if int(d) < full}, reverse=True)

