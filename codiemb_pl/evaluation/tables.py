"""Plain-text metric tables printed by the CLI and callbacks (torch-free: `codiemb evaluate --help` imports it)."""

from __future__ import annotations

import math
from typing import Optional

from codiemb_pl.model.widths import FULL_PRECISION, metric_key, split_metric_key

HEADLINE_METRICS = ("ndcg_at_10", "cosine_spearman")   # evaluation.suite.HEADLINE's IR and STS metrics
BYTES_PER_VECTOR = "bytes_per_vector"   # a set's `bytes_per_vector@m:precision` (`codiemb evaluate`), not a score


def is_variant(key: str) -> bool:
    """Whether `key` is scored at a smaller width or a compact precision (`ndcg_at_10@64`, `avg:int8`)."""
    return split_metric_key(key)[1:] != (None, FULL_PRECISION)


def format_metrics_table(per_set: dict[str, dict[str, float]], summary: dict[str, float], title: str) -> str:
    """A plain-text table: one row per validation set, one column per metric, then the averages; scores at other
    widths and precisions follow in a second table (`variants_table`)."""
    metrics = sorted({m for values in per_set.values() for m in values
                      if not is_variant(m) and not m.startswith(BYTES_PER_VECTOR)})
    width = max([len(n) for n in per_set] + [8])
    lines = [title, f"{'set':<{width}}  " + "  ".join(f"{m:>15}" for m in metrics)]
    for name, values in per_set.items():
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{values[m]:>15.4f}" if m in values else f"{'':>15}" for m in metrics))
    for key, value in summary.items():
        if not is_variant(key):
            lines.append(f"{key:<{width}}  {value:>15.4f}")
    variants = variants_table(per_set, summary)
    return "\n".join(lines) + (f"\n{variants}" if variants else "")


def variants_table(per_set: dict[str, dict[str, float]], summary: dict[str, float]) -> str:
    """The headline metric of each set (and the averages) by width (columns) and precision (rows), from the variant
    keys of `per_set` / `summary`, then the bytes per vector when the sets carry them. Empty without variants."""
    found = [split_metric_key(key) for values in [*per_set.values(), summary] for key in values
             if not key.startswith(BYTES_PER_VECTOR)]
    dims = sorted({dim for _, dim, _ in found if dim is not None}, reverse=True)
    precisions = list(dict.fromkeys(["float32"] + [precision for _, _, precision in found]))
    if not dims and precisions == ["float32"]:
        return ""
    columns: list[Optional[int]] = [None] + dims
    sizes = next((values for values in per_set.values() if BYTES_PER_VECTOR in values), {})
    full_dim = int(sizes[BYTES_PER_VECTOR]) // 4 if sizes else None
    labels = [f"{full_dim or 'full'}" if dim is None else str(dim) for dim in columns]
    rows: list[tuple[str, dict[str, float], str]] = []
    for name, values in per_set.items():
        headline = next((m for m in HEADLINE_METRICS if m in values), None)
        if headline is not None:
            rows += [(f"{name} {precision}", values, headline) for precision in precisions]
    rows += [(f"{key} {precision}", summary, key) for key in ("ir_avg", "sts_avg", "avg") if key in summary
             for precision in precisions]
    name_width = max(len(label) for label, _, _ in rows + [("bytes per vector float32", {}, "")])
    lines = ["by width (headline metric: ndcg_at_10 for IR, cosine_spearman for STS)",
             f"{'set, precision':<{name_width}}  " + "  ".join(f"{label:>8}" for label in labels)]
    for label, values, metric in rows:
        precision = label.rsplit(" ", 1)[1]
        cells = [values.get(metric_key(metric, dim, precision), math.nan) for dim in columns]
        lines.append(f"{label:<{name_width}}  " + "  ".join(
            f"{value:>8.4f}" if math.isfinite(value) else f"{'-':>8}" for value in cells))
    for precision in precisions if sizes else ():
        cells = [sizes.get(metric_key(BYTES_PER_VECTOR, dim, precision), math.nan) for dim in columns]
        label = f"bytes per vector {precision}"
        lines.append(f"{label:<{name_width}}  " + "  ".join(
            f"{value:>8.0f}" if math.isfinite(value) else f"{'-':>8}" for value in cells))
    return "\n".join(lines)


def comparison_table(history: list[tuple[str, dict[str, float]]]) -> str:
    """Rows: validation metrics; columns: the labelled validation passes (e.g. start, final)."""
    if not history:
        return ""
    keys = sorted({k for _, metrics in history for k in metrics})
    width = max(len(k) for k in keys)
    header = f"{'metric':<{width}}  " + "  ".join(f"{label:>12}" for label, _ in history)
    lines = [header, "-" * len(header)]
    for key in keys:
        cells = [f"{metrics[key]:>12.4f}" if key in metrics else f"{'':>12}" for _, metrics in history]
        lines.append(f"{key:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def hard_negative_report(name: str, histogram, n_negatives: int) -> str:
    """How the `n_negatives` hard-negative slots of an IR sub-dataset are really filled, from `histogram[k]`, the
    number of records with `k` distinct negatives (the collate's rule, `data.collate.pick_fixed_count`): a record
    with more draws N of them, one with fewer repeats them (re-sampled) to fill the N slots, one with none has
    its slots masked out (when others in its batch have negatives)."""
    histogram = [int(count) for count in histogram]
    total = sum(histogram)
    if not total or n_negatives <= 0:
        return ""
    present = [k for k, count in enumerate(histogram) if count]
    low, high = present[0], present[-1]
    median = (_sorted_value(histogram, (total - 1) // 2) + _sorted_value(histogram, total // 2)) / 2
    line = (f"[codiemb] {name}: {n_negatives} hard-negative slot{'s' if n_negatives != 1 else ''} per query; "
            f"records have {low:g}/{median:g}/{high:g} distinct hard negatives (min/median/max)")
    fewer = sum(histogram[1:n_negatives])
    empty = histogram[0]
    if fewer:
        line += f"; {fewer} of {total} records have fewer than {n_negatives} and repeat theirs to fill the slots"
    if empty:
        line += f"; {empty} have none (their slots are masked out)"
    return line


def _sorted_value(histogram: list[int], position: int) -> int:
    """The `position`-th (from 0) of the values a histogram counts, in increasing order."""
    seen = 0
    for value, count in enumerate(histogram):
        seen += count
        if seen > position:
            return value
    raise IndexError(position)
